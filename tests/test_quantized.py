"""LoRA beside a quantized base (torchao int8 weight-only, int4 Intx, NF4): inject, train, save,
load, the three fold choices, and what is refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lora_fx
from helpers import assert_close, max_abs, randomize_lora, tiny_llama, token_ids

torchao = pytest.importorskip("torchao", reason="the quant extra installs torchao")
from torchao.quantization import (  # noqa: E402
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    quantize_,
)
from torchao.quantization.granularity import PerGroup  # noqa: E402
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # noqa: E402

FORMATS = ["int8", "intx", "nf4"]
TARGETS = ["q_proj", "v_proj"]
Q = "model.layers.0.self_attn.q_proj.weight"


def quantized(model: nn.Module, fmt: str) -> nn.Module:
    """`model` with the linear layers of its decoder layers quantized in `fmt` (in place)."""
    layers = model.model.layers
    if fmt == "int8":
        quantize_(layers, Int8WeightOnlyConfig())
    elif fmt == "intx":
        quantize_(layers, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    elif fmt == "dynamic":
        quantize_(layers, Int8DynamicActivationInt8WeightConfig())
    else:
        for module in layers.modules():
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(to_nf4(module.weight.detach(), 32, 8), requires_grad=False)
    return model


@pytest.fixture(scope="module", params=FORMATS)
def base(request):
    """(format, the float model, the same model quantized)."""
    float_model = tiny_llama()
    return request.param, float_model, quantized(copy.deepcopy(float_model), request.param)


@pytest.fixture(scope="module")
def trained(base):
    """(LoRA trained a few steps beside `base`'s quantized model, its losses); tests leave it as it is."""
    return _trained(base[2])


def _storage(t: torch.Tensor) -> list[int]:
    """Where a tensor subclass keeps its inner tensors."""
    names, _ = t.__tensor_flatten__()
    return [getattr(t, n).data_ptr() for n in names]


def _trained(model, steps=4):
    gm = lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8)
    batch = token_ids()
    opt = torch.optim.AdamW(lora_fx.lora_parameters(gm).values(), lr=2e-2)
    gm.train()
    losses = []
    for _ in range(steps):
        loss = gm(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return gm.eval(), losses


def test_lora_trains_beside_the_quantized_weights(base, trained):
    fmt, _, model = base
    batch = token_ids()
    gm = lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8)
    assert gm.lora_report.counters == {"linear": 4}
    assert {s.quantized for s in gm.lora_state.sites.values()} == {fmt}
    assert max_abs(gm(**batch), model(**batch)) == 0  # B = 0: exactly the quantized model
    w = gm.get_parameter(Q)
    assert type(w) is type(model.get_parameter(Q)) and not w.requires_grad  # the base stays quantized, frozen
    assert _storage(w) == _storage(model.get_parameter(Q))  # and shared: no copy, quantized or not
    gm.train()
    gm(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in lora_fx.lora_parameters(gm).items()}
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)  # B = 0: only B's grad is non-zero
    losses = trained[1]
    assert losses[-1] < losses[0]


def _backward(run, gm, batch):
    """(LoRA gradients, float tensors of a quantized weight's shape saved for backward that are not a
    parameter's own storage) of one loss through `run`."""
    saved = []
    shapes = {tuple(p.shape) for p in gm.parameters() if lora_fx.quantized.is_subclass(p)}
    shapes |= {s[::-1] for s in shapes}
    own = {p.untyped_storage().data_ptr() for p in gm.parameters() if not lora_fx.quantized.is_subclass(p)}
    gm.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = run(**batch).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten())
    loss.backward()
    copies = [t for t in saved if not lora_fx.quantized.is_subclass(t) and t.is_floating_point()
              and tuple(t.shape) in shapes and t.untyped_storage().data_ptr() not in own]
    return {n: p.grad.clone() for n, p in lora_fx.lora_parameters(gm).items()}, copies


def test_no_float_copy_of_a_quantized_weight_is_kept_for_backward(base):
    """Every product with a dequantized weight (all 7 linears of both layers, not only LoRA's targets)
    recomputes it in backward: the same gradients as the graph run as it is, which keeps the copies."""
    fmt, _, model = base
    gm = lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8)
    randomize_lora(gm)
    batch = {**token_ids(), "attention_mask": torch.ones_like(token_ids()["input_ids"])}  # the captured inputs
    assert len(lora_fx.recompute.frozen_products(gm, gm.graph)) == 14
    assert any("recomputes it in backward" in n for n in gm.lora_report.notes)
    as_is, kept = _backward(lambda **kw: torch.fx.GraphModule.__call__(gm, **kw), gm, batch)
    grads, copies = _backward(gm, gm, batch)
    # as it is, each product whose activation needs a gradient keeps its float weight: all but layer 0's
    # q / k / v, which read the frozen embedding
    assert len(kept) == 11 and copies == []
    for name, g in as_is.items():
        assert_close(grads[name], g, what=name)
    assert _backward(gm, gm, {**batch, "labels": batch["input_ids"]})[1] == []  # other inputs: a new capture, recomputed too
    assert gm.training_runner() is gm.training_runner()  # built once per graph
    with torch.no_grad():  # inference runs the graph itself
        assert max_abs(gm(**batch), torch.fx.GraphModule.__call__(gm, **batch)) == 0


def test_the_recompute_holds_under_torch_compile():
    """torch.compile traces the recomputing graph; AOTAutograd's partitioner would move a weight that
    depends only on frozen tensors into forward and save it: it must not."""
    model = quantized(tiny_llama(num_hidden_layers=1), "nf4")  # one layer: compile time
    gm = lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8)
    randomize_lora(gm)
    batch = {**token_ids(), "attention_mask": torch.ones_like(token_ids()["input_ids"])}
    eager, _ = _backward(gm, gm, batch)
    compiled, copies = _backward(torch.compile(gm, backend="aot_eager"), gm, batch)
    assert copies == []
    for name, g in eager.items():
        assert_close(compiled[name], g, what=name)


def test_unfolded_is_the_quantized_product_plus_the_update(base, trained):
    """y = linear(x, deq(Wq)) + scaling * B @ A x: the float model with deq(Wq) + ΔW as weights."""
    fmt, float_model, model = base
    gm = trained[0]
    reference = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            q = model.get_parameter(name)
            if type(q).__module__.startswith("torchao"):
                site = gm.lora_state.sites.get(name)
                delta = lora_fx.delta_weight(gm, site) if site is not None else 0
                p.copy_(lora_fx.quantized.dequantize(q) + delta)
    batch = token_ids()
    assert_close(gm(**batch), reference(**batch), ulps=1000)


def test_fold_choices(base, trained):
    fmt, float_model, model = base
    gm = trained[0]
    batch = token_ids()
    unfolded = gm(**batch)
    with pytest.raises(lora_fx.FoldError, match="quantized='dequantize'.*quantized='requantize'"):
        lora_fx.merge_lora(gm)

    exact = lora_fx.merge_lora(gm, quantized="dequantize")
    assert_close(exact(**batch), unfolded)
    assert lora_fx.graph_diff(lora_fx.capture(float_model), exact).identical  # the float model's graph
    assert not any(type(p).__module__.startswith("torchao") for p in exact.parameters())

    probe = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    rows = lora_fx.requantize_loss(gm, probe=probe)
    assert [r.param for r in rows] == list(gm.lora_state.sites) and all(r.format == fmt for r in rows)
    assert all(r.output_error is not None and 0 < r.kept < 1.5 for r in rows)
    if fmt == "int8":  # 8 bits keep a trained update whole: no force needed
        assert min(r.kept for r in rows) > 0.9
        lora_fx.merge_lora(gm, quantized="requantize")
    folded = lora_fx.merge_lora(gm, quantized="requantize", max_loss=None)
    assert type(folded.get_parameter(Q)) is type(model.get_parameter(Q))
    assert lora_fx.graph_diff(lora_fx.capture(model), folded).identical  # the quantized model's graph
    # what requantizing changes in the output is the measured loss, not more
    effect = max_abs(unfolded, model(**batch))
    assert max_abs(folded(**batch), unfolded) < effect
    assert max_abs(folded(**batch), exact(**batch)) > 0  # rounding happened: the report is not vacuous
    merged = lora_fx.merge_and_unload(gm, quantized="dequantize")  # the user's class, all float
    assert type(merged) is type(model) and not any(lora_fx.quantized.is_subclass(p) for p in merged.parameters())
    assert_close(merged(**batch), unfolded)


def test_mixed_batches_over_a_quantized_base(base):
    """One forward, each row its own adapter, beside the quantized weights."""
    fmt, _, model = base
    gm = lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8)
    lora_fx.add_adapter(gm, "other", TARGETS, rank=2, alpha=4)
    randomize_lora(gm, std=0.1)
    batch = {**token_ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    expected = []
    for name in ("default", "other"):
        lora_fx.set_adapter(gm, name)
        expected.append(gm(**batch).logits)
    mixed = lora_fx.mixed_adapters(gm, ["default", "other"])
    out = mixed(**batch, adapter_index=torch.tensor([1, 0])).logits
    assert_close(out[0], expected[1][0])
    assert_close(out[1], expected[0][1])


def test_requantize_refuses_to_erase_a_small_update(base):
    """An update below half a quantization step is erased by requantizing: refused with the figure."""
    fmt, _, model = base
    gm = lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8)
    randomize_lora(gm, std=1e-4)
    rows = lora_fx.requantize_loss(gm)
    assert all(r.loss > 0.9 for r in rows), rows
    with pytest.raises(lora_fx.FoldError, match=r"lose more than 50% of the adapter's update .*% of ΔW kept"):
        lora_fx.merge_lora(gm, quantized="requantize")
    assert lora_fx.merge_lora(gm, quantized="requantize", max_loss=None) is not None  # forced


def test_adapter_files_are_those_of_the_float_base(base, tmp_path):
    from safetensors.torch import load_file

    fmt, float_model, model = base
    on_quantized = lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8)
    on_float = lora_fx.inject_lora(float_model, TARGETS, rank=4, alpha=8)
    randomize_lora(on_quantized)
    randomize_lora(on_float)
    lora_fx.save_adapter(on_quantized, tmp_path / "q")
    lora_fx.save_adapter(on_float, tmp_path / "f")
    a, b = load_file(tmp_path / "q" / "adapter_model.safetensors"), load_file(tmp_path / "f" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    loaded = lora_fx.load_adapter(model, tmp_path / "f")  # the float base's file, on the quantized base
    batch = token_ids()
    assert max_abs(loaded(**batch), on_quantized(**batch)) == 0


# ------------------------------------------------------------------------------------ LoftQ
def snapshot(model):
    """Every weight of a (partly) quantized model: the object and the values it stands for."""
    value = lambda p: lora_fx.quantized.dequantize(p) if lora_fx.quantized.is_subclass(p) else p  # noqa: E731
    return {n: (p, value(p).detach().clone()) for n, p in model.named_parameters()}


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now.keys() == snap.keys()
    for name, (p, v) in snap.items():
        assert now[name][0] is p and torch.equal(now[name][1], v), f"{name} changed"


def _loftq(model, float_model, iterations=1, **kw):
    return lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8, init="loftq",
                               loftq=lora_fx.LoftQConfig(float_model, iterations=iterations), **kw)


def test_loftq_starts_closer_to_the_float_weights(base):
    """deq(Q_T) + scaling * B @ A is closer to W than the base is, for every weight; the graph runs
    that weight; the model keeps its own base."""
    fmt, float_model, model = base
    snap = snapshot(model)
    one, five = _loftq(model, float_model), _loftq(model, float_model, iterations=5)
    assert_unchanged(model, snap)
    for gm, n in ((one, 1), (five, 5)):
        rows = gm.lora_report.loftq
        assert [r.param for r in rows] == list(gm.lora_state.sites) and all(r.format == fmt for r in rows)
        assert all(r.iterations == n and 0 < r.error_after < 0.9 * r.error_before for r in rows), rows
    mean = lambda gm: sum(r.error_after for r in gm.lora_report.loftq)  # noqa: E731
    assert mean(five) <= 1.01 * mean(one)
    # the measured error is the graph's: the float model with deq(graph's base) + ΔW as weights
    reference = copy.deepcopy(float_model)
    with torch.no_grad():
        for site in five.lora_state.sites.values():
            w = reference.get_parameter(site.param)
            graph_w = lora_fx.quantized.dequantize(five.get_parameter(site.param))
            w_err = (graph_w + lora_fx.delta_weight(five, site) - float_model.get_parameter(site.param)).norm()
            row = next(r for r in five.lora_report.loftq if r.param == site.param)
            assert w_err.item() == pytest.approx(row.error_after * w.norm().item(), rel=1e-4)
            w.copy_(graph_w + lora_fx.delta_weight(five, site))
        for name, p in reference.named_parameters():  # the layers LoftQ did not touch: the base's values
            q = model.get_parameter(name)
            if name not in five.lora_state.sites and lora_fx.quantized.is_subclass(q):
                p.copy_(lora_fx.quantized.dequantize(q))
    batch = token_ids()
    assert_close(five(**batch), reference(**batch), ulps=1000)
    with torch.enable_grad():  # training runs the recompute copy over the same (LoftQ) base
        assert_close(five(**batch).logits.detach(), reference(**batch).logits, ulps=1000)


def test_loftq_files_round_trip(tmp_path):
    """Saved as PEFT's LoftQ example saves (init_lora_weights=True, so PEFT does not run LoftQ again on
    load); lora-fx's record rebuilds the LoftQ base on load, and refuses to load without it."""
    fmt, float_model = "nf4", tiny_llama()
    model = quantized(copy.deepcopy(float_model), fmt)
    gm = _loftq(model, float_model, iterations=2)
    randomize_lora(gm, std=0.05)
    lora_fx.save_adapter(gm, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    with pytest.raises(lora_fx.AdapterFileError, match=r"LoftQ's start \(2 iterations\).*loftq=lora_fx.LoftQConfig"):
        lora_fx.load_adapter(model, tmp_path / "a")
    loaded = lora_fx.load_adapter(model, tmp_path / "a", loftq=lora_fx.LoftQConfig(float_model.state_dict()))
    batch = token_ids()
    assert max_abs(loaded(**batch), gm(**batch)) == 0
    lora_fx.load_adapter(gm, tmp_path / "a", name="again")  # into the graph that holds the LoftQ base
    with pytest.raises(lora_fx.AdapterFileError, match="LoftQ's start.*this graph does not hold"):
        lora_fx.load_adapter(lora_fx.inject_lora(model, TARGETS), tmp_path / "a", name="b")
    peft = pytest.importorskip("peft")
    with pytest.warns(UserWarning, match="loftq_config.*ignored"):  # PEFT's own reading of its LoftQ example's files
        assert peft.PeftConfig.from_pretrained(tmp_path / "a").init_lora_weights is True


def test_loftq_refusals():
    float_model = tiny_llama()
    nf4 = quantized(copy.deepcopy(float_model), "nf4")
    snap = snapshot(nf4)
    with pytest.raises(lora_fx.ConfigError, match="float: there is nothing to correct"):
        _loftq(float_model, float_model)
    with pytest.raises(lora_fx.ConfigError, match="iterations must be a positive int"):
        _loftq(nf4, float_model, iterations=0)
    with pytest.raises(lora_fx.ConfigError, match="init='loftq' needs the float weights"):
        lora_fx.inject_lora(nf4, TARGETS, init="loftq")
    with pytest.raises(lora_fx.ConfigError, match="pass init='loftq'"):
        lora_fx.inject_lora(nf4, TARGETS, loftq=lora_fx.LoftQConfig(float_model))
    with pytest.raises(lora_fx.ConfigError, match="differs from LoftQConfig.original's weight by .*quantized from"):
        _loftq(nf4, _other_weights(float_model))
    with pytest.raises(lora_fx.ConfigError, match="has no weight 'model.layers.0.self_attn.q_proj.weight'"):
        _loftq(nf4, {"lm_head.weight": float_model.lm_head.weight})
    gm = lora_fx.inject_lora(nf4, TARGETS)
    with pytest.raises(lora_fx.ConfigError, match="every adapter of a graph shares"):
        lora_fx.add_adapter(gm, "b", TARGETS, init="loftq")
    assert_unchanged(nf4, snap)


def _other_weights(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    return other


def test_refusals():
    model = quantized(tiny_llama(), "dynamic")
    with pytest.raises(lora_fx.TargetError, match="dynamic activation quantization.*Quantize weights only"):
        lora_fx.inject_lora(model, TARGETS)
    nf4 = quantized(tiny_llama(), "nf4")
    with pytest.raises(lora_fx.ConfigError, match="quantized \\(nf4\\).*Use plain LoRA"):
        lora_fx.inject_lora(nf4, TARGETS, use_dora=True)
    gm = lora_fx.inject_lora(nf4, TARGETS)
    with pytest.raises(lora_fx.FoldError, match="quantized='bogus': choose one of"):
        lora_fx.merge_lora(gm, quantized="bogus")


def test_bitsandbytes_weights_name_torchao():
    """bitsandbytes' weights do not export; the refusal names the supported route (a stand-in class
    from bitsandbytes' module, as bitsandbytes needs its own native library)."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor").TwoTensor
    Params4bit = type("Params4bit", (two_tensor,), {"__module__": "bitsandbytes.nn.modules"})
    reason = lora_fx.quantized.refusal(Params4bit(torch.zeros(2, 2), torch.zeros(2, 2)))
    assert "bitsandbytes" in reason and "torchao" in reason


@pytest.mark.parametrize("real", [False, True], ids=["stand-in", "bitsandbytes"])
def test_a_bitsandbytes_model_is_refused_before_capture(real):
    """bitsandbytes' Params4bit is a Parameter subclass over a plain uint8 tensor (no tensor
    subclass): the refusal is by its class, before any capture (which would fail inside its kernels)."""
    model = tiny_llama()
    layer = model.model.layers[0].self_attn
    if real:
        bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
        linear = bnb.nn.Linear4bit(32, 32, bias=False, quant_type="nf4")
        linear.weight = bnb.nn.Params4bit(layer.q_proj.weight.data.clone(), requires_grad=False,
                                          quant_type="nf4")._quantize("cpu")
        layer.q_proj = linear
    else:
        Params4bit = type("Params4bit", (nn.Parameter,), {"__module__": "bitsandbytes.nn.modules"})
        layer.q_proj.weight = Params4bit(torch.zeros(32, 32, dtype=torch.uint8), requires_grad=False)
    before = dict(model.named_parameters())
    with pytest.raises(lora_fx.TargetError, match=r"model.layers.0.self_attn.q_proj.weight is a bitsandbytes weight "
                                                  r"\(Params4bit\).*torchao"):
        lora_fx.inject_lora(model, TARGETS)
    with pytest.raises(lora_fx.CaptureError, match="bitsandbytes weight.*torchao"):
        lora_fx.capture(model)
    assert dict(model.named_parameters()) == before


# ------------------------------------------------------------------------------------ ONNX
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two adapters beside an int4 (Intx) base, exported once with the base quantized in the file."""
    export = pytest.importorskip("export")
    model = quantized(tiny_llama(), "intx")
    gm = lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8)
    lora_fx.add_adapter(gm, "other", TARGETS, rank=2, alpha=4)
    randomize_lora(gm)
    d = tmp_path_factory.mktemp("served")
    multi = export.export_multi_adapter(gm, d / "multi.onnx")
    for name in ("default", "other"):
        lora_fx.save_adapter(gm, d / name, name)
        export.export_adapter(d / name, d / f"{name}.onnx_adapter", multi)
    return gm, multi, d


def test_adapters_served_over_the_quantized_base(served):
    import onnx

    from export import AdapterServer

    gm, multi, d = served
    weights = {i.name: i for i in onnx.load(str(multi)).graph.initializer}
    int8 = [n for n, i in weights.items() if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8) >= 2 * 7  # every quantized weight's integers (and zero points) stay 8-bit in the file
    server = AdapterServer(multi, device="cpu")
    batch = {**token_ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    feed = {k: v.numpy() for k, v in batch.items()}
    for name in ("default", "other", None):
        server.load(name, d / f"{name}.onnx_adapter") if name else None
        if name is None:
            with lora_fx.disable_adapters(gm):
                expected = gm(**batch).logits
        else:
            lora_fx.set_adapter(gm, name)
            expected = gm(**batch).logits
        got = torch.from_numpy(server.run(feed, adapter=name)[0])
        assert_close(got, expected, ulps=1000, what=str(name))


def test_quantized_onnx_routes(tmp_path):
    """NF4 does not export to a file ONNX Runtime loads: refused, naming the other route; that route
    (fold exactly, export float, ONNX Runtime's MatMulNBits) runs close to the quantized forward."""
    export = pytest.importorskip("export")
    gm = lora_fx.inject_lora(quantized(tiny_llama(), "nf4"), TARGETS, rank=4, alpha=8)
    randomize_lora(gm)
    with pytest.raises(export.ExportError, match="nf4 weight.*quantized='dequantize'.*quantize_onnx"):
        export.export_onnx(gm, tmp_path / "nf4.onnx")
    assert not (tmp_path / "nf4.onnx").exists()
    folded = lora_fx.merge_lora(gm, quantized="dequantize")
    export.export_onnx(folded, tmp_path / "float.onnx", optimize=True)
    counts = export.quantize_onnx(tmp_path / "float.onnx", tmp_path / "int4.onnx", bits=4, block_size=32)
    assert counts["quantized"] == 2 * 7 + 1  # every linear of the 2 layers, and lm_head
    import onnx

    q = onnx.load(str(tmp_path / "int4.onnx"))
    sizes = {i.name: int(torch.tensor(i.dims).prod()) for i in q.graph.initializer}
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    packed = sum(sizes[n.input[1]] for n in nbits)  # uint8 blobs: two weights a byte
    weights = sum(
        next(a.i for a in n.attribute if a.name == "K") * next(a.i for a in n.attribute if a.name == "N") for n in nbits)
    assert packed * 2 == weights
    batch = {**token_ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    out = export.ort_run(export.ort_session(tmp_path / "int4.onnx", device="cpu"), batch)[0]
    expected = gm(**batch).logits
    with lora_fx.disable_adapters(gm):
        effect = max_abs(expected, gm(**batch))  # what the adapter changes
    # 4-bit noise (NF4's blocks read back into ORT's int4 ones, lm_head quantized too) stays far
    # below the adapter's effect (measured 0.10-0.19 of it over three seeds)
    assert max_abs(out, expected) < 0.3 * effect


def test_bfloat16_base_gets_bfloat16_lora():
    """LoRA's weights take the quantized weight's own float dtype: a bfloat16 model quantized trains
    bfloat16 LoRA, and folds exactly into bfloat16 weights."""
    model = quantized(tiny_llama().to(torch.bfloat16), "intx")
    gm = lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8)
    assert {p.dtype for p in lora_fx.lora_parameters(gm).values()} == {torch.bfloat16}
    randomize_lora(gm, std=0.1)
    batch = token_ids()
    gm.train()
    gm(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in lora_fx.lora_parameters(gm).values())
    folded = lora_fx.merge_lora(gm.eval(), quantized="dequantize")
    assert folded.get_parameter(Q).dtype == torch.bfloat16
    assert_close(folded(**batch), gm(**batch), ulps=4)  # one bfloat16 rounding of the folded weights
