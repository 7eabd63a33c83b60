"""Weights that are not plain linear layers, beyond the architecture battery: PEFT's file layouts
(expert stacks, nn.MultiheadAttention, embeddings), tied embeddings, what is refused and why."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_fx
from helpers import assert_close, assert_unchanged, max_abs, randomize_lora, rel_diff, snapshot, tiny_gpt2, token_ids
from models import H, VOCAB, ConvNet, CASES

torch_two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")


def _row(name):
    return next(c for c in CASES if c.name == name)


@pytest.fixture(scope="module")
def gpt_oss():
    torch.manual_seed(0)
    case = _row("gpt-oss")
    model = case.build().eval()
    return model, case.batch(model, 2, 7)


# ------------------------------------------------------------------------------------ experts
def test_expert_stacks_are_written_in_peft_layout(gpt_oss, tmp_path):
    """lora_A [E*r, in] expert-major (row e*r + k), lora_B [out, r*E] expert-minor (column k*E + e),
    nested base_layer holders: what PEFT's ParamWrapper saves; PEFT loads the file with equal outputs."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model, batch = gpt_oss
    gm = lora_fx.inject_lora(model, target_parameters=["gate_up_proj", "down_proj"], rank=3, alpha=6,
                             example_inputs=batch)
    randomize_lora(gm)
    d = lora_fx.save_adapter(gm, tmp_path / "a")
    saved = load_file(d / "adapter_model.safetensors")
    weights = lora_fx.adapter_weights(gm)
    experts = "model.layers.0.mlp.experts"
    # gate_up_proj is registered first: PEFT wraps it innermost (one base_layer deeper)
    for param, holder in (("gate_up_proj", f"{experts}.base_layer"), ("down_proj", experts)):
        (a, b), = weights[f"{experts}.{param}"]  # [E, r, in], [E, out, r]
        fa, fb = saved[f"base_model.model.{holder}.lora_A.weight"], saved[f"base_model.model.{holder}.lora_B.weight"]
        E, r = a.shape[0], a.shape[1]
        for e in range(E):
            for k in range(r):
                assert torch.equal(fa[e * r + k], a[e, k])
                assert torch.equal(fb[:, k * E + e], b[e, :, k])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), d).eval()
    with torch.no_grad():
        assert_close(peft_model(**batch), gm(**batch))
        assert rel_diff(gm(**batch), model(**batch)) > 1e-3
    # gpt-oss stores [E, in, out]: the update is W + (B @ A).T per expert
    site = gm.lora_state.sites[f"{experts}.gate_up_proj"]
    assert site.layout == "in_out" and site.kind == "experts"
    a, b = weights[site.param][0]
    expected = torch.stack([(b[e] @ a[e]).t() for e in range(a.shape[0])]) * (6 / 3)
    assert_close(lora_fx.delta_weight(gm, site), expected, ulps=10)


def test_expert_stacks_are_named_by_parameter_and_biases_are_refused(gpt_oss):
    model, batch = gpt_oss
    snap = snapshot(model)
    with pytest.raises(lora_fx.TargetError, match=r"3-D .*name a stack of expert matrices in target_parameters"):
        lora_fx.inject_lora(model, ["experts"], example_inputs=batch)  # the stacks' module, not the stacks
    with pytest.raises(lora_fx.TargetError, match=r"gate_up_proj_bias.*is a bias .*not a matrix"):
        lora_fx.inject_lora(model, target_parameters=["gate_up_proj_bias"], example_inputs=batch)
    with pytest.raises(lora_fx.ConfigError, match="dropout cannot apply to expert stacks"):
        lora_fx.inject_lora(model, target_parameters=["down_proj"], dropout=0.1, example_inputs=batch)
    gm = lora_fx.inject_lora(model, target_parameters=["down_proj"], example_inputs=batch)
    assert sorted(gm.lora_state.sites) == [f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)]
    assert gm.lora_report.counters == {"weight": 2}  # the stack itself: W + scaling * B @ A per expert
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------- MultiheadAttention
def test_multihead_attention_files_both_ways(tmp_path):
    """targets=["self_attn"] adapts in_proj and out_proj, under PEFT's keys (out_proj under
    base_layer). PEFT's forward adds out_proj's update twice (peft 0.21.2), so the files are
    compared weight for weight, not by PEFT's outputs."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    case = _row("mha")
    torch.manual_seed(0)
    model = case.build().eval()
    batch = case.batch(model, 2, 7)
    gm = lora_fx.inject_lora(model, ["self_attn"], rank=4, example_inputs=batch)
    assert gm.lora_report.counters == {"linear": 4}
    randomize_lora(gm)
    d = lora_fx.save_adapter(gm, tmp_path / "ours")
    ours = load_file(d / "adapter_model.safetensors")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), d)
    theirs = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["self_attn"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    again = lora_fx.load_adapter(lora_fx.capture(model, batch), tmp_path / "peft")
    file = lora_fx.adapter_file(again)
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v for k, v in file.tensors().items()}.keys() == peft_file.keys()
    assert all(torch.equal(file.tensors()[k], peft_file[k]) for k in peft_file)


# ---------------------------------------------------------------------------------- embeddings
def test_tied_embedding_trains_alone_and_refuses_to_fold():
    """GPT-2 ties wte to lm_head: LoRA on wte changes the lookup only (as PEFT's training), and
    folding, which would change lm_head too, is refused instead of done silently."""
    model = tiny_gpt2()
    ids = token_ids()
    gm = lora_fx.inject_lora(model, ["wte"], rank=2, example_inputs=ids)
    site = gm.lora_report.sites[0]
    assert site.uses == {"embedding": 1} and any("another module" in s for s in site.left_alone)
    randomize_lora(gm)
    with torch.no_grad():
        ref = copy.deepcopy(model)
        ref.transformer.wte.weight = nn.Parameter(model.transformer.wte.weight + lora_fx.delta_weight(gm, gm.lora_state.sites["transformer.wte.weight"]))
        ref.lm_head.weight = model.lm_head.weight  # the head keeps reading the untouched weight
        assert_close(gm(**ids), ref(**ids))
    with pytest.raises(lora_fx.FoldError, match="also read by .*untie"):
        lora_fx.merge_lora(gm)


def test_embedding_padding_row_gets_no_update():
    """As nn.Embedding's padding_idx: the padding row's LoRA column gets no gradient."""
    model = nn.Sequential(nn.Embedding(VOCAB, H, padding_idx=0), nn.Linear(H, 3))
    ids = torch.randint(0, VOCAB, (2, 9))
    ids[:, 0] = 0
    gm = lora_fx.inject_lora(model, ["0"], rank=4, example_inputs=(ids,))
    gm.train()
    for _ in range(2):  # after one step both factors are nonzero
        gm(ids).square().sum().backward()
        with torch.no_grad():
            for p in lora_fx.lora_parameters(gm).values():
                p -= 0.1 * p.grad
                p.grad = None
    site = gm.lora_state.sites["0.weight"]
    delta = lora_fx.delta_weight(gm, site)
    assert delta[0].abs().max() == 0 and delta[ids[0, 1]].abs().max() > 0


# ---------------------------------------------------------------------------------- convs
def test_dilated_conv_fold_equals_peft_merge(tmp_path):
    """PEFT's conv forward drops the dilation (peft 0.21.2), its merge does not: our fold of a dilated
    conv equals PEFT's merged weight, and PEFT loads the file."""
    from peft import PeftModel

    model = ConvNet().eval()
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    gm = lora_fx.inject_lora(model, ["dilated", "stem"], rank=3, example_inputs=x)
    randomize_lora(gm)
    d = lora_fx.save_adapter(gm, tmp_path / "a")
    merged = PeftModel.from_pretrained(copy.deepcopy(model), d).merge_and_unload()
    folded = lora_fx.merge_lora(gm)
    for name in ("dilated.weight", "stem.weight"):
        assert_close(merged.get_parameter(name), folded.get_parameter(name), ulps=10)
    with torch.no_grad():
        assert_close(merged(**x), gm(**x))


def test_grouped_conv_is_adapted_through_its_weight(tmp_path):
    model = ConvNet().eval()
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    gm = lora_fx.inject_lora(model, ["grouped"], rank=4, example_inputs=x)
    assert gm.lora_report.counters == {"weight": 1}
    a = lora_fx.lora_parameters(gm, lora_fx.LORA_A)["grouped.lora_A.default.weight"]
    assert a.shape == (4, 8, 3, 3)  # [r, in/groups, *kernel]: an update of the grouped weight itself
    # PEFT's grouped-conv LoRA is another function: no file PEFT would misread (issue 27: a size-mismatch
    # RuntimeError inside PeftModel.from_pretrained) is written, unless asked for lora-fx only
    randomize_lora(gm)
    with pytest.raises(lora_fx.ConfigError, match=r"grouped convolution \(groups=2\).*lora_fx_only=True"):
        lora_fx.save_adapter(gm, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    lora_fx.save_adapter(gm, tmp_path / "ours", lora_fx_only=True)
    with torch.no_grad():
        assert_close(lora_fx.load_adapter(model, tmp_path / "ours", example_inputs=x)(**x), gm(**x))


# ------------------------------------------------------------------------ PEFT's other semantics
def test_rank_above_min_in_out_is_accepted(tmp_path):
    """PEFT accepts rank > min(in, out) (adapter files from the hub have it): so does lora-fx."""
    from peft import PeftModel

    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 8)
    gm = lora_fx.inject_lora(model, ["0"], rank=16, example_inputs=(x,))
    assert max_abs(gm(x), model(x)) == 0
    randomize_lora(gm)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), lora_fx.save_adapter(gm, tmp_path / "a")).eval()
    assert_close(peft_model(x), gm(x))
    assert lora_fx.graph_diff(lora_fx.capture(model, (x,)), lora_fx.merge_lora(gm)).identical


def test_rslora_scaling():
    model = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(3, 8)
    gm = lora_fx.inject_lora(model, ["0"], rank=4, alpha=8, use_rslora=True, example_inputs=(x,))
    assert gm.lora_state.adapter(None).scaling("0.weight") == 8 / 2


def test_tensor_subclass_weights_are_refused_at_inject():
    """A weight that is a tensor subclass (a quantized weight) is refused with a reason, before
    anything changes, not at the first forward."""
    two_tensor = torch_two_tensor.TwoTensor
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    w = model[0].weight.detach()
    model[0].weight = nn.Parameter(two_tensor(w.clone(), w.clone()), requires_grad=False)
    x = torch.randn(3, 8)
    try:
        cap = lora_fx.capture(model, (x,))
    except lora_fx.CaptureError as e:  # a torch that cannot export it refuses earlier, also clearly
        pytest.skip(f"torch.export does not capture TwoTensor weights here: {str(e)[:80]}")
    with pytest.raises(lora_fx.TargetError, match=r"is a tensor subclass \(TwoTensor: .*Load the base model unquantized"):
        lora_fx.inject_lora(cap, ["0"])
    assert lora_fx.inject_lora(cap, ["1"]).lora_report.counters == {"linear": 1}


# ------------------------------------------------------------------------------------ DoRA
def _dora_definition(model, gm, x):
    """The untouched model with every adapted weight replaced by W0 + delta_weight (DoRA's rescaled weight)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for site in gm.lora_state.sites.values():
            ref.get_parameter(site.param).add_(lora_fx.delta_weight(gm, site))
    return ref


def test_chained_linears_each_see_the_adapted_input():
    """A linear feeding a linear directly: the second LoRA branch reads the first one's adapted output."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    for dora in (False, True):
        gm = lora_fx.inject_lora(model, ["0", "1"], rank=2, use_dora=dora, example_inputs=(x,))
        randomize_lora(gm)
        with torch.no_grad():
            assert_close(gm(x), _dora_definition(model, gm, x)(x))
    lora_fx.add_adapter(gm, "other", rank=2)
    gm2 = lora_fx.inject_lora(model, ["0", "1"], rank=2, example_inputs=(x,))
    randomize_lora(gm2)
    mixed = lora_fx.mixed_adapters(gm2, ["default"])
    with torch.no_grad():
        assert_close(mixed(x, adapter_index=torch.zeros(4, dtype=torch.long)), gm2(x))


def test_dora_on_gpt2_conv1d_equals_peft(tmp_path):
    """GPT-2's Conv1D stores [in, out]: the magnitude is per output column."""
    from peft import PeftModel

    model, ids = tiny_gpt2(), token_ids()
    gm = lora_fx.inject_lora(model, ["c_attn", "c_fc"], rank=4, use_dora=True, example_inputs=ids)
    randomize_lora(gm)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), lora_fx.save_adapter(gm, tmp_path / "a")).eval()
    with torch.no_grad():
        assert_close(peft_model(**ids), gm(**ids))
        folded = lora_fx.merge_lora(gm)
        assert_close(folded(**ids), gm(**ids))
        assert_close(peft_model.merge_and_unload()(**ids), folded(**ids))


def test_dora_on_a_weight_read_as_a_weight():
    class SplitQKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv.weight.split(8)
            return torch.nn.functional.linear(x, q) * torch.nn.functional.linear(x, v)

    model, x = SplitQKV(), torch.randn(2, 3, 8)
    gm = lora_fx.inject_lora(model, ["qkv"], rank=2, use_dora=True, example_inputs=(x,))
    assert_close(gm(x), model(x), ulps=10)  # m = ||W0|| at init
    randomize_lora(gm)
    with torch.no_grad():
        assert_close(gm(x), _dora_definition(model, gm, x)(x))
        assert_close(lora_fx.merge_lora(gm)(x), gm(x))


def test_dora_adapters_switch_disable_and_are_not_summed():
    model, ids = tiny_gpt2(), token_ids()
    gm = lora_fx.inject_lora(model, ["c_attn"], rank=2, use_dora=True, example_inputs=ids, adapter="dora")
    randomize_lora(gm, seed=1)
    lora_fx.add_adapter(gm, "plain", rank=2)
    lora_fx.set_adapter(gm, "plain")
    randomize_lora(gm, seed=2)
    with torch.no_grad():
        plain = gm(**ids)
        lora_fx.set_adapter(gm, "dora")
        dora = gm(**ids)
        assert_close(dora, lora_fx.merge_lora(gm, "dora")(**ids))
        lora_fx.set_adapter(gm, "plain")
        assert max_abs(gm(**ids), plain) == 0 and rel_diff(plain, dora) > 1e-3
        assert_close(plain, lora_fx.merge_lora(gm, "plain")(**ids))
        lora_fx.set_adapter(gm, "dora")
        with lora_fx.disable_adapters(gm):
            assert_close(gm(**ids), model(**ids), ulps=10)
        assert max_abs(gm(**ids), dora) == 0
    with pytest.raises(lora_fx.ConfigError, match="DoRA adapter, whose magnitude rescales"):
        lora_fx.set_adapter(gm, ["dora", "plain"])
    with pytest.raises(lora_fx.FoldError, match="fold it alone"):
        lora_fx.merge_lora(gm, {"dora": 0.5})
    with pytest.raises(lora_fx.ConfigError, match="DoRA adapters"):
        lora_fx.mixed_adapters(gm, ["dora", "plain"])


def test_dora_generates_as_its_fold():
    model, ids = tiny_gpt2(), token_ids(batch=1, seq=5)
    gm = lora_fx.inject_lora(model, ["c_attn"], rank=2, use_dora=True, example_inputs=ids)
    randomize_lora(gm)
    merged = lora_fx.merge_and_unload(gm)
    ours = gm.generate(**ids, max_new_tokens=6, do_sample=False)
    theirs = merged.generate(**ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("row", ["conv", "llama-embedding", "gpt-oss"])
def test_two_adapters_of_other_ranks_switch_and_sum(row):
    """Slots of conv, embedding and expert weights hold adapters side by side like linear ones:
    each alone, and both summed, equal their folds."""
    case = _row(row)
    torch.manual_seed(0)
    model = case.build().eval()
    batch = case.batch(model, 2, 7)
    gm = lora_fx.inject_lora(model, case.targets, target_parameters=case.parameters, rank=4, example_inputs=batch,
                             adapter="a")
    randomize_lora(gm, seed=1)
    lora_fx.add_adapter(gm, "b", rank=2, alpha=3)
    lora_fx.set_adapter(gm, "b")
    randomize_lora(gm, seed=2)
    with torch.no_grad():
        for active in ("a", "b", ["a", "b"]):
            lora_fx.set_adapter(gm, active)
            assert_close(gm(**batch), lora_fx.merge_lora(gm, active)(**batch), what=str(active))
        lora_fx.set_adapter(gm, "a")
        assert_close(gm(**batch), lora_fx.merge_lora(gm, "a")(**batch))
        assert rel_diff(lora_fx.merge_lora(gm, "a")(**batch), lora_fx.merge_lora(gm, "b")(**batch)) > 1e-4


# ------------------------------------------------------------------------------- lora_bias
def test_lora_bias_needs_a_bias_to_fold_into_and_is_active_alone():
    from helpers import tiny_llama

    llama, ids = tiny_llama(), token_ids()
    with pytest.raises(lora_fx.ConfigError, match="q_proj.weight's layer adds none"):
        lora_fx.inject_lora(llama, ["q_proj"], lora_bias=True, example_inputs=ids)
    with pytest.raises(lora_fx.ConfigError, match="embedding weight"):
        lora_fx.inject_lora(llama, ["embed_tokens"], lora_bias=True, example_inputs=ids)
    model, ids = tiny_gpt2(), token_ids()
    gm = lora_fx.inject_lora(model, ["c_attn"], rank=2, lora_bias=True, example_inputs=ids, adapter="biased")
    randomize_lora(gm, seed=1)
    lora_fx.add_adapter(gm, "plain", rank=2)
    with pytest.raises(lora_fx.ConfigError, match="lora_B bias .* activate it alone"):
        lora_fx.set_adapter(gm, ["biased", "plain"])
    with torch.no_grad():
        biased = gm(**ids)
        folded = lora_fx.merge_lora(gm)
        assert_close(folded(**ids), biased)
        lora_fx.set_adapter(gm, "plain")  # its lora_B has no bias: the slot's bias is zero
        assert_close(gm(**ids), model(**ids), ulps=10)
        lora_fx.set_adapter(gm, "biased")
        assert max_abs(gm(**ids), biased) == 0
    assert lora_fx.graph_diff(lora_fx.capture(model, ids), folded).identical


def test_parameter_target_is_read_as_peft_reads_it(tmp_path):
    """target_parameters on a plain [in, out] parameter used as `x @ W`: PEFT's ParamWrapper reads
    any targeted parameter as [out, in] (W + scaling * B @ A in its own layout); so does lora-fx,
    and the files go both ways."""
    from peft import LoraConfig, PeftModel, get_peft_model

    class ParamLinear(nn.Module):  # PEFT's test model: it applies LoRA while the module runs
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(10, 20))

        def forward(self, x):
            return x @ self.weight

    class XW(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = ParamLinear(), nn.Linear(20, 2)

        def forward(self, x):
            return self.head(self.lin(x))

    model, x = XW().eval(), torch.randn(4, 10)
    gm = lora_fx.inject_lora(model, target_parameters=["lin.weight"], rank=3, example_inputs=(x,))
    assert gm.lora_report.counters == {"weight": 1}
    (a, b), = lora_fx.adapter_weights(gm)["lin.weight"]
    assert a.shape == (3, 20) and b.shape == (10, 3)  # PEFT's: A [r, d1], B [d0, r]
    randomize_lora(gm)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), lora_fx.save_adapter(gm, tmp_path / "ours")).eval()
    with torch.no_grad():
        assert_close(peft_model(x), gm(x))
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=3, target_modules=[], target_parameters=["lin.weight"],
                                                             init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    again = lora_fx.load_adapter(model, tmp_path / "peft", example_inputs=(x,))
    with torch.no_grad():
        assert_close(again(x), theirs(x))
        assert rel_diff(again(x), model(x)) > 1e-4


def test_conv_forms_follow_the_weight_size(tmp_path):
    """A large conv trains on PEFT's branch, a small one on its weight (unless dropout needs the
    branch); both, plain and DoRA, equal PEFT and fold back to the original graph."""
    from peft import PeftModel

    class Convs(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.Conv2d(64, 128, 3, padding=1)  # 73728 weights: the branch
            self.small = nn.Conv2d(128, 8, 3, padding=1)  # 9216: the weight

        def forward(self, x):
            return self.small(torch.relu(self.big(x)))

    model, x = Convs().eval(), torch.randn(2, 64, 8, 8)
    base = lora_fx.capture(model, (x,))
    for dora in (False, True):
        gm = lora_fx.inject_lora(base, ["big", "small"], rank=4, use_dora=dora)
        assert gm.lora_state.weight_form == {"small.weight"}, gm.lora_state.weight_form
        randomize_lora(gm)
        theirs = PeftModel.from_pretrained(copy.deepcopy(model), lora_fx.save_adapter(gm, tmp_path / f"d{dora}")).eval()
        with torch.no_grad():
            assert max_abs(theirs(x), gm(x)) <= 1e-4 * gm(x).abs().max()
            folded = lora_fx.merge_lora(gm)
            assert max_abs(folded(x), gm(x)) <= 1e-4 * gm(x).abs().max()
        assert lora_fx.graph_diff(base, folded).identical
    gm = lora_fx.inject_lora(base, ["small"], rank=4, dropout=0.1)
    assert gm.lora_state.weight_form == set()  # LoRA dropout acts on the branch's input
