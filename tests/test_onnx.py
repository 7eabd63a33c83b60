"""Deployment battery: every architecture row exported untouched and folded, diffed, run in ONNX Runtime."""
from __future__ import annotations

import pytest
import torch

import export
from battery import B2, S2
from helpers import first_tensor


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory):
    d = tmp_path_factory.mktemp(built.case.name)
    base = export.export_onnx(built.model, d / "base.onnx", built.batch)
    folded = export.export_onnx(built.folded(), d / "folded.onnx")
    return d, base, folded


def _ort_vs_torch(path, module, inputs) -> float:
    session = export.ort_session(path)
    names = [i.name for i in session.get_inputs()]
    out = export.ort_run(session, {n: inputs[n] for n in names})
    with torch.no_grad():
        ref = first_tensor(module(**inputs))
    return (out[0].float() - ref.float()).abs().max().item()


def test_folded_export_is_the_untouched_export(built, exported):
    _, base, folded = exported
    diff = export.onnx_diff(base, folded)
    assert diff.same_structure, str(diff)
    assert diff.same_names, str(diff)
    adapted = set(built.random_b()._lora.sites)
    assert set(diff.changed_initializers) == adapted, str(diff)


def test_onnx_runtime_runs_what_torch_runs(built, exported):
    _, base, folded = exported
    for shape in ((2, 7), (B2, S2)):
        inputs = built.case.batch(built.model, *shape, seed=7)
        assert _ort_vs_torch(base, built.model, inputs) <= 1e-4
        assert _ort_vs_torch(folded, built.folded(), inputs) <= 1e-4


def test_onnx_runtime_optimized_graphs_are_the_same(exported):
    d, base, folded = exported
    a = export.optimized_model(base, d / "base.opt.onnx")
    b = export.optimized_model(folded, d / "folded.opt.onnx")
    diff = export.onnx_diff(a, b)
    assert diff.same_structure, str(diff)


def test_unfolded_lora_graph_exports_and_runs(built, exported):
    d, base, _ = exported
    path = export.export_onnx(built.random_b(), d / "lora.onnx")
    inputs = built.case.batch(built.model, B2, S2, seed=9)
    assert _ort_vs_torch(path, built.random_b(), inputs) <= 1e-4
    diff = export.onnx_diff(base, path)
    assert not diff.same_structure  # the LoRA branch is there to see
