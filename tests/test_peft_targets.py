"""For the same targets, lora-fx adapts what PEFT adapts, and writes files PEFT reads as lora-fx does:
PEFT's "all-linear" (module classes, the output layer and a weight tied to it left out), weights of
modules PEFT cannot wrap (routers: parameter targets; a parent's F.linear: refused at save), modules
the capture does not run, and PEFT's renames on MoE models whose experts transformers 5 fused."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import lora_fx
from helpers import assert_close, assert_unchanged, randomize_lora, rel_diff, snapshot
from models import HandWritten

IDS = {"input_ids": torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))}
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8)


def _moe(name: str, **kw):
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(**TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                    **kw)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


def _peft_targets(model, **config) -> set[str]:
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, **config))
    base = peft_model.base_model
    return set(base.targeted_module_names) | {n.rpartition(".")[0] for n in base.targeted_parameter_names}


def _ours(gm) -> set[str]:
    return {s.file_path if not s.file_param else s.param.rpartition(".")[0] for s in lora_fx.regions.model_sites(gm).values()}


def _round_trip_through_peft(gm, model, inputs, tmp_path):
    """Random A and B: PEFT reads our file into our outputs, and lora-fx reads PEFT's save of it back."""
    randomize_lora(gm, std=0.1)
    with torch.no_grad():
        ours = gm(**inputs)
    assert rel_diff(ours, model(**inputs)) > 1e-3
    lora_fx.save_adapter(gm, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(theirs(**inputs), ours, ulps=1000)
    theirs.save_pretrained(tmp_path / "theirs")
    again = lora_fx.load_adapter(model, tmp_path / "theirs", example_inputs=inputs)
    with torch.no_grad():
        assert_close(again(**inputs), ours, ulps=1000)


def test_all_linear_leaves_a_tied_output_embedding_out_as_peft():
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0)).eval()
    inputs = {**IDS, "decoder_input_ids": IDS["input_ids"][:, :5]}
    gm = lora_fx.inject_lora(model, "all-linear", rank=4, example_inputs=inputs)
    assert "shared.weight" not in gm.lora_state.sites  # read by lm_head too, but an embedding
    assert _ours(gm) == _peft_targets(model, target_modules="all-linear")


def test_a_router_is_adapted_only_when_named_and_saved_as_a_parameter_target(tmp_path):
    model = _moe("Qwen2Moe", shared_expert_intermediate_size=16)
    snap = snapshot(model)
    gm = lora_fx.inject_lora(model, "all-linear", rank=4, example_inputs=IDS)
    assert not any(s.owner.endswith("mlp.gate") for s in gm.lora_state.sites.values())  # a custom module: not PEFT's
    assert _ours(gm) == _peft_targets(model, target_modules="all-linear")
    gm = lora_fx.inject_lora(model, ["gate", "q_proj"], rank=4, dropout=0.1, example_inputs=IDS)
    assert {s.peft_target for s in gm.lora_state.sites.values() if s.owner.endswith("mlp.gate")} == {"parameter"}
    gm.eval()
    _round_trip_through_peft(gm, model, IDS, tmp_path)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    assert config["lora_dropout"] == 0.0 and config["lora_fx_dropout"] == 0.1  # PEFT's parameter targets take none
    assert lora_fx.load_adapter(model, tmp_path / "ours", example_inputs=IDS).lora_state.adapters["default"].config.dropout == 0.1
    assert_unchanged(model, snap)


def test_modules_the_capture_does_not_run_are_adapted_as_peft_wraps_them(tmp_path):
    torch.manual_seed(0)
    model = transformers.BartForCausalLM(transformers.BartConfig(
        vocab_size=128, d_model=32, decoder_layers=1, encoder_layers=1, decoder_attention_heads=4,
        encoder_attention_heads=4, decoder_ffn_dim=64, encoder_ffn_dim=64)).eval()
    gm = lora_fx.inject_lora(model, "all-linear", rank=4, example_inputs=IDS)
    unused = [s.param for s in gm.lora_report.sites if not s.uses]
    assert unused and all(".encoder_attn." in p for p in unused)  # cross-attention: no encoder states given
    assert any("not used by this capture" in n for n in gm.lora_report.notes)
    assert _ours(gm) == _peft_targets(model, target_modules="all-linear")
    gm.train()
    gm(**IDS).logits.square().mean().backward()
    assert all((p.grad is None) == (".encoder_attn." in n) for n, p in lora_fx.lora_parameters(gm).items()
               if ".lora_B." in n)
    gm.eval()
    _round_trip_through_peft(gm, model, IDS, tmp_path)
    with pytest.raises(lora_fx.TargetError, match="does not use"):
        lora_fx.inject_lora(model, ["encoder_attn.q_proj"], rank=4, example_inputs=IDS)


@pytest.mark.parametrize("capture", ["whole", "regions"])
def test_moe_targets_are_renamed_to_the_fused_experts_as_peft(capture, tmp_path):
    """By regions, the experts module is a region whose own two stacks PEFT nests (one under
    base_layer): the file's keys were `experts..base_layer` (PEFT: missing keys, other outputs)."""
    model = _moe("Qwen3Moe")
    gm = lora_fx.inject_lora(model, "all-linear", rank=4, alpha=8, example_inputs=IDS, capture=capture)
    assert _ours(gm) == _peft_targets(model, target_modules="all-linear", lora_alpha=8)
    sites = lora_fx.regions.model_sites(gm)
    experts = [s for s in sites.values() if s.kind == "experts"]
    assert {s.param.rpartition(".")[2] for s in experts} == {"gate_up_proj", "down_proj"}
    if capture == "regions":
        return _round_trip_through_peft(gm, model, IDS, tmp_path)
    adapter = gm.lora_state.adapters["default"]
    assert {adapter.ranks[s.param] for s in experts if s.param.endswith("gate_up_proj")} == {8}  # the fused pair: 2r
    assert any("as PEFT does on qwen2_moe-family models" in n for n in gm.lora_report.notes)
    _round_trip_through_peft(gm, model, IDS, tmp_path)
    with pytest.raises(lora_fx.ConfigError, match=r"renamed, as PEFT does.*'up_proj'"):
        lora_fx.inject_lora(model, ["gate_proj"], rank=4, example_inputs=IDS)


def test_a_weight_its_parent_reads_cannot_be_a_peft_file(tmp_path):
    model = HandWritten().eval()
    gm = lora_fx.inject_lora(model, ["w_in", "w_out"], rank=4, example_inputs=IDS)
    assert {s.peft_target for s in gm.lora_state.sites.values()} == {"none"}
    with pytest.raises(lora_fx.ConfigError, match=r"mixer.w_in is read outside its module's forward.*lora_fx_only=True"):
        lora_fx.save_adapter(gm, tmp_path / "peft")
    assert not (tmp_path / "peft").exists() or not any((tmp_path / "peft").iterdir())
    randomize_lora(gm)
    lora_fx.save_adapter(gm, tmp_path / "ours", lora_fx_only=True)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["lora_fx_only"] is True
    again = lora_fx.load_adapter(model, tmp_path / "ours", example_inputs=IDS)
    with torch.no_grad():
        assert_close(again(**IDS), gm(**IDS))


def test_all_linear_on_multihead_attention_is_peft_s_even_where_it_does_nothing(tmp_path):
    """PEFT's all-linear wraps nn.MultiheadAttention's out_proj as a Linear, which the attention never
    calls (it reads out_proj.weight itself): the LoRA is there, in the files too, and has no effect.
    lora-fx does the same, and says so; naming the attention adapts it for real (PEFT's MHA LoRA)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    gm = lora_fx.inject_lora(model, "all-linear", rank=2, example_inputs=(x,))
    assert _ours(gm) == _peft_targets(model, target_modules="all-linear")
    assert [s.param for s in gm.lora_report.sites if not s.uses] == ["layers.0.self_attn.out_proj.weight"]
    assert any("out_proj" in str(n) and "outside its module's own forward" in n.reason for n in gm.lora_report.near_misses)
    gm.eval()
    randomize_lora(gm, std=0.1)
    lora_fx.save_adapter(gm, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            assert_close(theirs(x), gm(x))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    named = lora_fx.inject_lora(model, ["self_attn"], rank=2, example_inputs=(x,))
    assert sorted(named.lora_state.sites) == ["layers.0.self_attn.in_proj_weight", "layers.0.self_attn.out_proj.weight"]
    assert all(s.uses for s in named.lora_report.sites)


@pytest.mark.parametrize("targets", ["all-linear", ["linear1", "out_proj"]])
def test_peft_s_multihead_attention_files_load_to_peft_s_numbers(targets, tmp_path):
    """A PEFT file naming nn.MultiheadAttention's out_proj itself (what PEFT writes for all-linear)
    wraps out_proj, which the attention never calls: loaded by lora-fx it has no effect either
    (it was 'missing LoRA weights for ...base_layer.out_proj'). Named in lora-fx's own targets,
    out_proj's read is adapted, and the file is refused for PEFT with the reason."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=targets, init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    before = {f.name: f.read_bytes() for f in (tmp_path / "peft").iterdir()}
    gm = lora_fx.load_adapter(model, tmp_path / "peft", example_inputs=(x,))
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            assert_close(gm(x), theirs(x))
            assert rel_diff(gm(x), model(x)) > 1e-3  # linear1's LoRA acts
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert [s.param for s in gm.lora_report.sites if not s.uses] == ["layers.0.self_attn.out_proj.weight"]
    assert {f.name: f.read_bytes() for f in (tmp_path / "peft").iterdir()} == before

    if targets == "all-linear":
        return
    ours = lora_fx.inject_lora(model, targets, rank=2, example_inputs=(x,))
    assert all(s.uses for s in ours.lora_report.sites)  # out_proj's read by the attention is adapted
    with pytest.raises(lora_fx.ConfigError, match="PEFT could not load this adapter: .*out_proj"):
        lora_fx.save_adapter(ours, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


# ------------------------------------------------------------------- PEFT's layer selection
def _llama3():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 3})).eval()


def _bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)).eval()


SELECTIONS = [  # (model, PEFT's LoraConfig fields), each: the same modules as PEFT, a file PEFT reads back
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1, layers_pattern="layers")),
    ("llama", dict(target_modules=["q_proj", "model.layers.2.self_attn.v_proj"], layers_to_transform=[0])),  # exact: kept
    ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=["o_proj"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*\.mlp\..*")),
    ("llama", dict(target_modules=["q_proj", "model.layers.1.self_attn.q_proj"], exclude_modules=["model.layers.1.self_attn.q_proj"])),
    ("bert", dict(target_modules=["query", "value", "dense"], layers_to_transform=[1], layers_pattern=["layer"])),
    ("bert", dict(target_modules=["query", "value"], exclude_modules=r"bert\.encoder\.layer\.0\..*")),
]
MODELS = {"llama": (_llama3, IDS), "bert": (_bert, IDS)}


@pytest.fixture(scope="module")
def captured():
    """One capture per model, injected into again and again (a capture without LoRA is copied)."""
    out = {}
    for name, (build, inputs) in MODELS.items():
        model = build()
        out[name] = (model, lora_fx.capture(model, inputs), inputs)
    return out


@pytest.mark.parametrize("name, fields", SELECTIONS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(SELECTIONS)])
def test_layer_selection_adapts_what_peft_adapts(captured, name, fields, tmp_path):
    model, capture, inputs = captured[name]
    kw = {k: v for k, v in fields.items() if k != "target_modules"}
    gm = lora_fx.inject_lora(capture, fields["target_modules"], rank=4, **kw)
    assert _ours(gm) == _peft_targets(model, **fields)
    # PEFT's own file with these fields loads to PEFT's numbers, and lora-fx's file to lora-fx's in PEFT
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, init_lora_weights=False, **fields)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: saved[k] for k in kw} != {k: None for k in kw}  # the file carries the selection
    loaded = lora_fx.load_adapter(capture, tmp_path / "peft")
    assert _ours(loaded) == _ours(gm)
    with torch.no_grad():
        assert_close(loaded(**inputs), theirs(**inputs), ulps=1000)
    _round_trip_through_peft(gm, model, inputs, tmp_path)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key, value in kw.items():  # recorded as given (PEFT matches the adapted paths exactly anyway)
        expected = [value] if key in ("layers_to_transform", "layers_pattern") and not isinstance(value, list) else value
        assert config[key] == (sorted(expected) if key == "exclude_modules" and isinstance(expected, list) else expected)


def test_layer_selection_under_regional_capture_and_add_adapter(captured):
    model, capture, inputs = captured["llama"]
    tree = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=4, layers_to_transform=[1], capture="regions",
                               example_inputs=inputs)
    assert _ours(tree) == _peft_targets(model, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    gm = lora_fx.inject_lora(capture, ["q_proj", "v_proj"], rank=4, exclude_modules=["v_proj"])
    lora_fx.add_adapter(gm, "other", rank=2)  # the first adapter's targets and selection
    assert set(gm.lora_state.adapters["other"].ranks) == set(gm.lora_state.adapters["default"].ranks)
    lora_fx.add_adapter(gm, "third", ["q_proj", "v_proj"], rank=2, layers_to_transform=[2])
    assert {s.rpartition(".")[0] for s in gm.lora_state.adapters["third"].ranks} == \
        {"model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"}


def test_layer_selection_refusals(captured, tmp_path):
    model, capture, _ = captured["llama"]
    snap = snapshot(model)
    with pytest.raises(lora_fx.TargetError, match=r"layers_to_transform \[5\]: this model has layers 0\.\.2"):
        lora_fx.inject_lora(capture, ["q_proj"], layers_to_transform=[0, 5])
    with pytest.raises(lora_fx.TargetError, match="has no numbered layers.*'blocks.<index>.'.*set layers_pattern"):
        lora_fx.inject_lora(capture, ["q_proj"], layers_to_transform=[0], layers_pattern="blocks")
    with pytest.raises(lora_fx.ConfigError, match="cannot be used with a string target"):
        lora_fx.inject_lora(capture, "all-linear", layers_to_transform=[0])
    with pytest.raises(lora_fx.ConfigError, match="layers_pattern is given without layers_to_transform"):
        lora_fx.inject_lora(capture, ["q_proj"], layers_pattern="layers")
    with pytest.raises(lora_fx.ConfigError, match="layers_to_transform must be layer indices"):
        lora_fx.inject_lora(capture, ["q_proj"], layers_to_transform=[-1])
    with pytest.raises(lora_fx.ConfigError, match="exclude_modules .* not a valid regular expression"):
        lora_fx.inject_lora(capture, ["q_proj"], exclude_modules="(")
    with pytest.raises(lora_fx.TargetError, match="adapt no weight"):
        lora_fx.inject_lora(capture, ["q_proj"], exclude_modules=["q_proj"])
    gm = lora_fx.inject_lora(capture, ["q_proj"], exclude_modules=["k_proj", "nothing_here"])
    assert any("'nothing_here'" in n.target and "excludes no module" in n.reason for n in gm.lora_report.near_misses)
    lora_fx.save_adapter(gm, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": "first"}))
    with pytest.raises(lora_fx.AdapterFileError, match="layers_to_transform must be a layer index"):
        lora_fx.load_adapter(capture, tmp_path / "a")
    assert_unchanged(model, snap)
