"""A slice of benchmarks/zoo.py's table in CI: each row is a transformers architecture built from its
shrunk default config, run through every step of the zoo battery (PEFT's forward, inject, init
identity, PEFT's targeted weights, files both ways, training, fold + graph identity,
merge_and_unload, the model untouched). The whole table: `python benchmarks/zoo.py`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo  # noqa: E402

# one row per thing the zoo taught: PEFT's MoE renames (fused experts, 2r), a custom linear module PEFT
# does not wrap (I-BERT's QuantLinear), cross-attention the capture does not run, a model torch.export
# cannot capture whole (captured by regions) whose router LoRA moves tokens to other experts
SLICE = [("qwen3_moe", "Qwen3MoeForCausalLM"), ("ibert", "IBertForMaskedLM"), ("bart", "BartForCausalLM"),
         ("switch_transformers", "SwitchTransformersForConditionalGeneration")]


@pytest.mark.parametrize("model_type, cls", SLICE, ids=[t for t, _ in SLICE])
def test_zoo_row_passes_every_step(model_type, cls):
    row = zoo.one(model_type, cls)
    failed = {k: v for k, v in row["steps"].items() if v != "pass"}
    assert not failed, f"{failed}: {row.get('error')}\n{row.get('traceback', '')}"
