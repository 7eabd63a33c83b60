"""Regional capture: a model torch.export cannot capture whole is adapted region by region (each
module holding a targeted weight captured on its own, the rest running the model's own code), and
every step works the same: init identity, PEFT's files both ways, training, adapters, fold back to
the untouched regions, merge_and_unload, generate."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

import export
import lora_fx
from helpers import assert_close, assert_unchanged, max_abs, randomize_lora, rel_diff, snapshot, tiny_llama, token_ids
from models import HandWritten

IDS = token_ids()


class Moody(nn.Module):
    """A tiny Llama behind one line torch.export cannot trace (a branch on a tensor's value)."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_llama()

    def forward(self, input_ids):
        logits = self.lm(input_ids=input_ids).logits
        if logits.mean() > 100:  # data-dependent: "Could not guard on data-dependent expression"
            logits = logits / 2
        return logits


@pytest.fixture(scope="module")
def moody():
    return Moody().eval()


def test_the_whole_model_does_not_trace_so_its_layers_are_captured_alone(moody, tmp_path):
    snap = snapshot(moody)
    gm = lora_fx.inject_lora(moody, ["q_proj", "v_proj"], rank=4, example_inputs=IDS)
    regions = gm.lora_regions
    assert type(gm) is Moody and gm is not moody
    assert "GuardOnDataDependent" in regions.reason and "captured by regions" in gm.lora_report.notes[0]
    assert sorted(regions.graphs) == [f"lm.model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    with torch.no_grad():
        assert max_abs(gm(**IDS), moody(**IDS)) == 0  # B = 0
    randomize_lora(gm, std=0.1)
    with torch.no_grad():
        ours = gm(**IDS)
    assert rel_diff(ours, moody(**IDS)) > 1e-3
    # PEFT's files both ways
    lora_fx.save_adapter(gm, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(moody), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(theirs(**IDS), ours)
    theirs.save_pretrained(tmp_path / "theirs")
    again = lora_fx.load_adapter(moody, tmp_path / "theirs", example_inputs=IDS)
    assert again.lora_regions is not None
    with torch.no_grad():
        assert_close(again(**IDS), ours)
    # training: every LoRA weight gets a gradient, no base weight does
    gm.train()
    gm(**IDS).square().mean().backward()
    gm.eval()
    lora = lora_fx.lora_parameters(gm)
    assert len(lora) == 8 and all(p.grad is not None for p in lora.values())
    assert not [n for n, p in gm.named_parameters() if p.grad is not None and n not in lora]
    # fold: every region is its untouched graph again; merge_and_unload is the model's class
    folded = lora_fx.merge_lora(gm)
    assert lora_fx.graph_diff(lora_fx.regions.untouched(gm), folded).identical
    assert not lora_fx.graph_diff(lora_fx.regions.untouched(gm), gm).identical  # the LoRA branch is there
    merged = lora_fx.merge_and_unload(gm)
    assert type(merged) is Moody and not hasattr(merged, "lora_regions")
    with torch.no_grad():
        assert_close(folded(**IDS), ours)
        assert_close(merged(**IDS), ours)
    assert_unchanged(moody, snap)


def test_regions_equal_the_whole_graph_and_generate_as_peft(tmp_path):
    llama = tiny_llama()
    whole = lora_fx.inject_lora(llama, "all-linear", rank=4, example_inputs=IDS)
    gm = lora_fx.inject_lora(llama, "all-linear", rank=4, example_inputs=IDS, capture="regions")
    assert len(gm.lora_regions.graphs) == 14 and gm.lora_regions.reason.startswith("asked for")
    randomize_lora(whole, std=0.1)
    weights = lora_fx.lora_parameters(whole)
    with torch.no_grad():
        for name, p in lora_fx.lora_parameters(gm).items():
            p.copy_(weights[name])  # the same names as the whole graph's (PEFT's)
        assert_close(gm(**IDS).logits, whole(**IDS).logits)
    lora_fx.save_adapter(gm, tmp_path / "a")
    theirs = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "a").eval()
    assert torch.equal(gm.generate(IDS["input_ids"], max_new_tokens=5, do_sample=False),
                       theirs.generate(input_ids=IDS["input_ids"], max_new_tokens=5, do_sample=False))
    # more adapters: loaded, added for some regions only, switched, disabled
    lora_fx.load_adapter(gm, tmp_path / "a", name="again")
    lora_fx.add_adapter(gm, "q", ["q_proj"], rank=2)
    with torch.no_grad():
        ours = gm(**IDS).logits
        lora_fx.set_adapter(gm, "again")
        assert max_abs(gm(**IDS).logits, ours) == 0
        lora_fx.set_adapter(gm, "q")  # B = 0
        assert max_abs(gm(**IDS).logits, llama(**IDS).logits) == 0
        lora_fx.set_adapter(gm, ["default", "q"])
        with lora_fx.disable_adapters(gm):
            assert max_abs(gm(**IDS).logits, llama(**IDS).logits) == 0
        assert_close(gm(**IDS).logits, ours)
    assert lora_fx.active_adapters(gm) == ["default", "q"]
    with pytest.raises(lora_fx.AdapterNameError):
        lora_fx.set_adapter(gm, "nope")
    assert lora_fx.active_adapters(gm) == ["default", "q"]
    # ONNX holds one graph: the merged model is exported, and it is the untouched model's export
    with pytest.warns(UserWarning, match="captured by regions; exporting lora_fx.merge_and_unload"):
        path = export.export_onnx(gm, tmp_path / "merged.onnx", IDS)
    diff = export.onnx_diff(export.export_onnx(llama, tmp_path / "base.onnx", IDS), path)
    assert diff.same_structure and diff.same_names


def test_regional_bad_input_is_a_clear_error_and_changes_nothing(moody):
    model = HandWritten().eval()
    snap = snapshot(model)
    with pytest.raises(lora_fx.TargetError, match=r"cannot isolate mixer.w_in: its module mixer is never called"):
        lora_fx.inject_lora(model, ["w_in"], rank=2, example_inputs=IDS, capture="regions")
    assert_unchanged(model, snap)
    with pytest.raises(lora_fx.ConfigError, match="capture must be one of"):
        lora_fx.inject_lora(model, ["head"], capture="parts", example_inputs=IDS)
    with pytest.raises(lora_fx.CaptureError):
        lora_fx.inject_lora(moody, ["q_proj"], rank=2, example_inputs=IDS, capture="whole")
    gm = lora_fx.inject_lora(moody, ["q_proj"], rank=2, example_inputs=IDS)
    with pytest.raises(lora_fx.TargetError, match="captured by regions.*merge_and_unload"):
        lora_fx.mixed_adapters(gm, ["default"])
    with pytest.raises(lora_fx.TargetError, match="in none of this model's regions"):
        lora_fx.add_adapter(gm, "o", ["o_proj"])
    with pytest.warns(UserWarning), pytest.raises(export.ExportError, match="captured by regions because .*GuardOnData"):
        export.export_onnx(gm, "/tmp/never.onnx", IDS)
