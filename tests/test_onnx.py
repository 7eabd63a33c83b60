"""Deployment battery: every architecture row exported untouched and folded, diffed, run in ONNX Runtime.
Each row's exports are made once, from the row's one capture (see helpers.Built.onnx)."""
from __future__ import annotations

import collections

import onnx
import pytest
import torch

import export
import lora_fx
from helpers import B2, S2, assert_close, first_tensor


@pytest.fixture(autouse=True)
def _exportable(request):
    built = request.getfixturevalue("built") if "built" in request.fixturenames else None
    if built is not None and not built.case.onnx:
        pytest.skip(f"torch's ONNX exporter cannot translate {built.case.name} (see tests/models.py)")


def _assert_ort_runs_what_torch_runs(path, module, inputs):
    session = export.ort_session(path)
    names = [i.name for i in session.get_inputs()]
    out = export.ort_run(session, {n: inputs[n] for n in names})
    with torch.no_grad():
        ref = first_tensor(module(**inputs))
    assert_close(out[0], ref, ulps=1000)  # another runtime's kernels: other rounding


def test_folded_export_is_the_untouched_export(built, onnx_dir):
    diff = export.onnx_diff(built.onnx("base", onnx_dir), built.onnx("folded", onnx_dir))
    assert diff.same_structure, str(diff)
    assert diff.same_names, str(diff)
    gm = built.random_b()
    biases = {s.bias for s in gm.lora_state.sites.values() if lora_fx.delta_bias(gm, s) is not None}  # lora_bias
    assert set(diff.changed_initializers) == set(gm.lora_state.sites) | biases, str(diff)


def test_onnx_runtime_runs_what_torch_runs(built, onnx_dir):
    for shape in ((2, 7), (B2, S2)):
        inputs = built.case.batch(built.model, *shape, seed=7)
        _assert_ort_runs_what_torch_runs(built.onnx("base", onnx_dir), built.model, inputs)
        _assert_ort_runs_what_torch_runs(built.onnx("folded", onnx_dir), built.folded(), inputs)


def test_onnx_runtime_optimized_graphs_are_the_same(built, onnx_dir):
    a = export.optimized_model(built.onnx("base", onnx_dir), onnx_dir / f"{built.case.name}-base.opt.onnx")
    b = export.optimized_model(built.onnx("folded", onnx_dir), onnx_dir / f"{built.case.name}-folded.opt.onnx")
    diff = export.onnx_diff(a, b)
    assert diff.same_structure, str(diff)


def test_unfolded_lora_graph_exports_and_runs(built, onnx_dir):
    path = built.onnx("lora", onnx_dir)
    inputs = built.case.batch(built.model, B2, S2, seed=9)
    _assert_ort_runs_what_torch_runs(path, built.random_b(), inputs)
    assert not export.onnx_diff(built.onnx("base", onnx_dir), path).same_structure  # the LoRA branch is there to see


@pytest.mark.parametrize("cls", ["BertModel", "BertLMHeadModel", "BertForMaskedLM"])
def test_kv_export_of_a_model_without_a_kv_cache_is_a_clear_error(cls, tmp_path):
    """Issue 27: an encoder with kv_cache=True was an AttributeError inside capture."""
    import transformers

    model = getattr(transformers, cls)(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                               num_attention_heads=4, intermediate_size=64)).eval()
    with pytest.raises(export.ExportError, match="kv_cache=True: .*(no KV cache|causal LM)"):
        export.export_onnx(model, tmp_path / "m.onnx", kv_cache=True)
    assert not any(tmp_path.iterdir())


def test_onnx_runtime_fuses_every_rmsnorm(built, onnx_dir):
    """torch writes RMSNorm's x * rsqrt(v) as Mul(x, Reciprocal(Sqrt(v))), which ONNX Runtime does
    not fuse; export.fusable rewrites it as Div(x, Sqrt(v)): one SimplifiedLayerNormalization each."""
    norms = sum("RMSNorm" in type(m).__name__ for m in built.model.modules())
    if not norms:
        pytest.skip(f"{built.case.name} has no RMSNorm")
    optimized = export.optimized_model(built.onnx("base", onnx_dir), onnx_dir / f"{built.case.name}-fused.opt.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == norms, ops
    assert ops["Reciprocal"] == 0
