"""inject_lora(): targets, hyper-parameters, what requires grad, what is shared, the report."""
import pytest
import torch
from torch import nn

import lora_fx
from helpers import assert_close, assert_unchanged, max_abs, randomize_lora, rel_diff, snapshot, tiny_gpt2, tiny_llama, token_ids
from models import CASES


def adapted(gm):
    return list(gm.lora_state.sites)


@pytest.fixture(scope="module")
def base(llama):
    """The module's one capture of the tiny Llama; tests inject into it (it stays as it was)."""
    return lora_fx.capture(llama, token_ids())


def test_list_targets_match_equal_or_dotted_suffix(base):
    gm = lora_fx.inject_lora(base, ["q_proj", "self_attn.v_proj"], rank=2)
    assert adapted(gm) == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"]
    gm = lora_fx.inject_lora(base, ["model.layers.1.mlp.up_proj"], rank=2)
    assert adapted(gm) == ["model.layers.1.mlp.up_proj.weight"]


def test_regex_is_full_matched(base):
    gm = lora_fx.inject_lora(base, r".*layers\.0\.self_attn\.(q|k)_proj", rank=2)
    assert adapted(gm) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(lora_fx.TargetError):
        lora_fx.inject_lora(base, r"q_proj", rank=2)  # not a full match of any path


def test_all_linear_leaves_out_the_output_layer(base):
    gm = lora_fx.inject_lora(base, "all-linear", rank=2)
    assert len(adapted(gm)) == 2 * 7
    assert "lm_head.weight" not in adapted(gm)


def test_nothing_matched_lists_closest_names_and_leaves_model_alone(llama, base):
    snap = snapshot(llama)
    with pytest.raises(lora_fx.TargetError) as e:
        lora_fx.inject_lora(base, ["q_prj", "value"])
    msg = str(e.value)
    assert "'q_prj': closest" in msg and "q_proj" in msg
    assert "16 adaptable weights (linear, conv, embedding)" in msg  # 7 per layer + lm_head + embed_tokens
    assert_unchanged(llama, snap)


def test_some_targets_missing_is_a_near_miss(base):
    gm = lora_fx.inject_lora(base, ["q_proj", "c_attn"], rank=2)
    assert any(n.target == "c_attn" and "matches no module" in n.reason for n in gm.lora_report.near_misses)
    assert "near miss: 'c_attn'" in str(gm.lora_report)


@pytest.mark.parametrize("targets, message", [
    (["input_layernorm"], r"1-D \(32,\), a vector .*LoRA adapts matrices"),
    (["rotary_emb"], r"matches no module path"),
])
def test_weights_not_consumed_by_linear_ops_are_refused(llama, base, targets, message):
    snap = snapshot(llama)
    with pytest.raises(lora_fx.TargetError, match=message):
        lora_fx.inject_lora(base, targets)
    assert_unchanged(llama, snap)


@pytest.mark.parametrize("kw, message", [
    (dict(rank=0), "rank must be a positive int"),
    (dict(rank=2.0), "rank must be a positive int"),
    (dict(rank=True), "rank must be a positive int"),
    (dict(alpha=0), "alpha must be a positive number"),
    (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must be a probability in \[0, 1\)"),
    (dict(init="xavier"), "init must be .gaussian.*got .xavier."),
])
def test_bad_hyperparameters(llama, base, kw, message):
    snap = snapshot(llama)
    with pytest.raises(lora_fx.ConfigError, match=message):
        lora_fx.inject_lora(base, ["q_proj"], **kw)
    assert_unchanged(llama, snap)


@pytest.mark.parametrize("spec, message", [
    ({"c_attn": [True, False] * 2 + [True]}, r"96 output rows, which do not split into 5 equal blocks"),
    ({"c_attn": [(64, True), (16, False), (8, True)]}, r"add up to 88, but the weight has 96"),
    ({"c_attn": [False, False, False]}, "enables no block"),
    ({"c_attn": "qv"}, "block spec"),
])
def test_bad_fused_block_specs(spec, message):
    model = tiny_gpt2()
    snap = snapshot(model)
    with pytest.raises(lora_fx.ConfigError, match=message):
        lora_fx.inject_lora(model, spec, example_inputs=token_ids())
    assert_unchanged(model, snap)


def test_unequal_fused_blocks_adapt_only_their_rows():
    model = tiny_gpt2()
    gm = lora_fx.inject_lora(model, {"c_attn": [(48, True), (16, False), (32, True)]}, rank=2, example_inputs=token_ids())
    randomize_lora(gm)
    site = next(iter(gm.lora_state.sites.values()))
    assert [(b.start, b.stop) for b in site.blocks] == [(0, 48), (64, 96)]
    delta = lora_fx.delta_weight(gm, site)  # [in, out] for Conv1D
    assert delta.shape == (32, 96)
    assert delta[:, 48:64].abs().max() == 0 and delta[:, :48].abs().max() > 0 and delta[:, 64:].abs().max() > 0
    names = {n for n, _ in gm.named_parameters() if "lora_" in n}
    assert "transformer.h.0.attn.c_attn.lora_A.default.block0.weight" in names
    assert "transformer.h.0.attn.c_attn.lora_B.default.block2.weight" in names


def test_gaussian_and_kaiming_init(base):
    g = lora_fx.inject_lora(base, ["q_proj"], rank=8, init="gaussian")
    k = lora_fx.inject_lora(base, ["q_proj"], rank=8, init="kaiming")
    a_g, a_k = (next(iter(lora_fx.lora_parameters(gm, lora_fx.LORA_A).values())) for gm in (g, k))
    assert a_g.shape == (8, 32)
    assert abs(a_g.std().item() - 1 / 8) < 0.03  # N(0, (1/r)^2), PEFT's "gaussian"
    bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert a_k.abs().max() <= bound and a_k.abs().max() > 0.8 * bound
    for gm in (g, k):
        assert all(p.abs().max() == 0 for p in lora_fx.lora_parameters(gm, lora_fx.LORA_B).values())


def test_base_weights_shared_not_copied_and_flags_left_alone(llama, base):
    gm = lora_fx.inject_lora(base, ["q_proj", "v_proj"])
    for name, p in llama.named_parameters():
        mine = gm.get_parameter(name)
        assert mine.data_ptr() == p.data_ptr(), name
        assert p.requires_grad and not mine.requires_grad
    names = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert names and names == list(lora_fx.lora_parameters(gm))


def test_lora_dropout_follows_train_and_eval(base):
    gm = lora_fx.inject_lora(base, ["q_proj", "v_proj"], dropout=0.5)
    randomize_lora(gm)
    assert isinstance(gm.get_submodule("model.layers.0.self_attn.q_proj.lora_dropout.default"), nn.Dropout)
    gm.eval()
    ids = token_ids()
    with torch.no_grad():
        assert max_abs(gm(**ids), gm(**ids)) == 0
        gm.train()
        assert max_abs(gm(**ids), gm(**ids)) > 0
    gm.eval()


def test_inject_follows_model_mode():
    model = tiny_llama().train()
    assert lora_fx.inject_lora(model, ["q_proj"], example_inputs=token_ids()).training
    assert model.training


def test_inject_twice_is_refused(base):
    gm = lora_fx.inject_lora(base, ["q_proj"])
    with pytest.raises(lora_fx.TargetError, match="already has LoRA"):
        lora_fx.inject_lora(gm, ["v_proj"])


def test_inject_into_a_capture_leaves_the_capture_alone(base):
    nodes = len(base.graph.nodes)
    gm = lora_fx.inject_lora(base, ["q_proj"])
    assert len(base.graph.nodes) == nodes
    assert lora_fx.graph_diff(base, lora_fx.merge_lora(gm)).identical
    assert all(p.requires_grad for p in base.parameters())


def test_trainable_modules_are_copied_and_trained():
    case = next(c for c in CASES if c.name == "bert")
    model = case.build().eval()
    batch = case.batch(model, 2, 7)
    snap = snapshot(model)
    gm = lora_fx.inject_lora(model, ["query"], trainable=["classifier"], example_inputs=batch)
    w = gm.get_parameter("classifier.weight")
    assert w.requires_grad and w.data_ptr() != model.classifier.weight.data_ptr()
    assert torch.equal(w, model.classifier.weight)
    assert gm.lora_report.trainable_modules == ["classifier"]
    assert gm.lora_report.trainable_params == sum(p.numel() for p in gm.parameters() if p.requires_grad)
    gm(**batch).logits.sum().backward()
    assert w.grad is not None
    assert_unchanged(model, snap)
    with pytest.raises(lora_fx.TargetError, match="matches no module"):
        lora_fx.inject_lora(model, ["query"], trainable=["clasifier"], example_inputs=batch)
    with pytest.raises(lora_fx.TargetError, match="both LoRA targets and fully trainable"):
        lora_fx.inject_lora(model, ["query"], trainable=["attention"], example_inputs=batch)


def test_new_inputs_share_lora_weights(base):
    gm = lora_fx.inject_lora(base, ["q_proj", "v_proj"])
    randomize_lora(gm)
    ids = token_ids()
    loss = gm(**ids, labels=ids["input_ids"]).loss  # captured again, for labels
    loss.backward()
    grads = [p.grad for p in lora_fx.lora_parameters(gm, lora_fx.LORA_B).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    variant = next(iter(gm.variants.values()))
    for name, p in lora_fx.lora_parameters(gm).items():
        assert variant.get_parameter(name) is p
    logits = gm(**ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids["input_ids"][:, 1:].reshape(-1))
    assert_close(loss, ref)


def test_report_counts_and_params(llama, base):
    gm = lora_fx.inject_lora(base, ["q_proj", "v_proj"], rank=4)
    r = gm.lora_report
    assert r.counters == {"linear": 4}
    assert r.lora_params == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    assert r.trainable_params == r.lora_params
    assert r.total_params == sum(p.numel() for p in llama.parameters()) + r.lora_params
    text = str(r)
    assert "adapted 4 weights" in text and "model.layers.1.self_attn.v_proj.weight" in text


def test_tied_output_layer_adapts_only_the_head_and_refuses_to_fold():
    model = tiny_gpt2()
    gm = lora_fx.inject_lora(model, ["lm_head"], rank=2, example_inputs=token_ids())
    randomize_lora(gm)
    site = gm.lora_report.sites[0]
    assert site.uses == {"linear": 1} and any("table" in s for s in site.left_alone)
    with pytest.raises(lora_fx.FoldError, match="also read by .*embedding.*untie"):
        lora_fx.merge_lora(gm)


def test_weight_form_for_a_split_weight():
    class SplitQKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv.weight.split(8)  # the weight is consumed by split, not by a product
            return torch.nn.functional.linear(x, q) * torch.nn.functional.linear(x, v)

    m = SplitQKV()
    x = torch.randn(2, 3, 8)
    gm = lora_fx.inject_lora(m, ["qkv"], rank=2, example_inputs=(x,))
    assert gm.lora_report.counters == {"weight": 1}
    randomize_lora(gm)
    folded = lora_fx.merge_lora(gm)
    assert_close(folded(x), gm(x), ulps=10)
    assert rel_diff(gm(x), m(x)) > 1e-4
    assert lora_fx.graph_diff(lora_fx.capture(m, (x,)), folded).identical
