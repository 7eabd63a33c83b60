"""Serving many adapters from one ONNX Runtime session, and batches that mix adapters."""
from __future__ import annotations

import copy

import onnx
import pytest
import torch

import export
import lora_fx
from helpers import assert_close, first_tensor, randomize_lora, rel_diff, tiny_llama, token_ids, train

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Three adapters of ranks 4, 2, 3 (c on other targets too) trained on different data, one multi-
    adapter export, an .onnx_adapter each, and each adapter folded and exported on its own."""
    d = tmp_path_factory.mktemp("serving")
    model = tiny_llama()
    IDS = token_ids()
    base = lora_fx.capture(model, IDS)
    gm = lora_fx.inject_lora(base, ["q_proj", "v_proj"], rank=4, alpha=8, init="kaiming", adapter="a")
    lora_fx.add_adapter(gm, "b", rank=2, alpha=4, init="kaiming")
    lora_fx.add_adapter(gm, "c", ["q_proj", "v_proj", "o_proj"], rank=3, alpha=3, init="kaiming")
    with torch.no_grad():
        shape = first_tensor(gm(**IDS)).shape
    for i, name in enumerate(NAMES):
        lora_fx.set_adapter(gm, name)
        train(gm, IDS, torch.randn(shape, generator=torch.Generator().manual_seed(i)), steps=8, lr=3e-2)
    multi = export.export_multi_adapter(gm, d / "multi.onnx")
    files, alone = {}, {}
    for name in NAMES:
        files[name] = export.export_adapter(gm, d / f"{name}.onnx_adapter", multi, name=name)
        alone[name] = export.export_onnx(lora_fx.merge_lora(gm, adapters=name), d / f"{name}_folded.onnx")
    base_onnx = export.export_onnx(base, d / "base.onnx")
    server = export.AdapterServer(multi)
    for name in NAMES:
        server.load(name, files[name])
    return model, gm, d, multi, server, alone, base_onnx


def _ort(path, inputs):
    return export.ort_run(export.ort_session(path), inputs)[0]


def test_each_adapter_equals_its_own_folded_export(served):
    _, _, _, _, server, alone, base = served
    x = token_ids(3, 9, seed=1)
    outs = {n: server.run(x, adapter=n)[0] for n in NAMES}
    for name in NAMES:
        assert_close(outs[name], _ort(alone[name], x), ulps=1000)
        other = next(n for n in NAMES if n != name)
        assert rel_diff(outs[name], outs[other]) > 1e-3
    assert_close(server.run(x)[0], _ort(base, x))  # no adapter: the base model
    numpy_out = server.run({"input_ids": x["input_ids"].numpy()}, adapter="b")[0]  # ORT's own LoraAdapter path
    assert_close(numpy_out, outs["b"])


def test_switching_a_hundred_times_is_stable(served):
    *_, server, _, _ = served
    x = token_ids(2, 5, seed=2)
    first = {n: server.run(x, adapter=n)[0].clone() for n in NAMES}
    for i in range(100):
        name = NAMES[i % 3]
        assert torch.equal(server.run(x, adapter=name)[0], first[name])


def test_mixed_batch_equals_rows_run_alone_in_torch_and_onnx_runtime(served):
    model, gm, d, *_ = served
    mixed = lora_fx.mixed_adapters(gm, list(NAMES))
    x = token_ids(5, 6, seed=3)
    index = torch.tensor([2, 0, -1, 1, 0])
    with torch.no_grad():
        out = mixed(**x, adapter_index=index).logits
        for row, k in enumerate(index.tolist()):
            if k < 0:
                ref = model(**x).logits[row]
            else:
                lora_fx.set_adapter(gm, NAMES[k])
                ref = gm(**x).logits[row]
            assert_close(out[row], ref, what=str(row))
    path = export.export_onnx(mixed, d / "mixed.onnx")
    assert_close(_ort(path, {**x, "adapter_index": index}), out, ulps=1000)


def test_peft_folder_to_onnx_adapter(served, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _, _, multi, server, _, _ = served
    torch.manual_seed(7)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    server.load("peft", export.export_adapter(tmp_path / "peft", tmp_path / "peft.onnx_adapter", multi))
    x = token_ids(2, 8, seed=4)
    with torch.no_grad():
        assert_close(server.run(x, adapter="peft")[0], peft_model(**x).logits, ulps=1000)


def test_refusals(served, tmp_path):
    model, gm, _, multi, server, _, _ = served
    with pytest.raises(lora_fx.AdapterNameError, match="no adapter 'zzz' loaded.*server.load"):
        server.run(token_ids(), adapter="zzz")
    with pytest.raises(KeyError):  # an AdapterNameError is a KeyError too
        server.run(token_ids(), adapter="zzz")
    base = lora_fx.capture(model, token_ids())
    big = lora_fx.inject_lora(base, ["q_proj", "v_proj"], rank=8)
    with pytest.raises(export.ExportError, match="rank 8 but the served model's slot holds 4"):
        export.export_adapter(big, tmp_path / "big.onnx_adapter", multi)
    other = lora_fx.inject_lora(base, ["k_proj"], rank=2)
    with pytest.raises(export.ExportError, match="has no slot"):
        export.export_adapter(other, tmp_path / "k.onnx_adapter", multi)
    with pytest.raises(lora_fx.AdapterNameError, match="cannot mix adapters .*'nope'"):
        lora_fx.mixed_adapters(gm, ["a", "nope"])


class SplitQKV(torch.nn.Module):
    """A fused weight consumed by split (adapted as W + s*B@A), next to a plain linear layer."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.out = torch.nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv.weight.split(8)
        return self.out(torch.nn.functional.linear(x, q) * torch.nn.functional.linear(x, v))


def test_multi_adapter_export_refuses_an_adapter_added_on_a_weight_it_cannot_switch(tmp_path):
    """The refusal looks at the graph as it is now, not at what inject_lora reported."""
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    gm = lora_fx.inject_lora(SplitQKV(), ["out"], rank=2, example_inputs=(x,))
    assert gm.lora_state.weight_form == set()
    lora_fx.add_adapter(gm, "split", ["qkv"], rank=2)
    assert gm.lora_state.weight_form == {"qkv.weight"}
    with pytest.raises(export.ExportError, match=r"\['qkv.weight'\] are adapted as weights"):
        export.export_multi_adapter(gm, tmp_path / "multi.onnx")
    assert not (tmp_path / "multi.onnx").exists()


def _gathers_only(path) -> bool:
    """Whether every node that reads a stacked bank is a Gather of rows on axis 0 (so that a run
    reads its rows' adapters only, whatever the number loaded)."""
    model = onnx.load(str(path))
    banks = {i.name for i in model.graph.input if lora_fx.bank_source(i.name)}
    readers = [n for n in model.graph.node if banks.intersection(n.input)]
    axes = [next((a.i for a in n.attribute if a.name == "axis"), 0) for n in readers]
    return bool(banks) and len(readers) == len(banks) and all(n.op_type == "Gather" for n in readers) and not any(axes)


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    """64 adapters (rank 4 on q/v, or rank 2 on q only, random), their .onnx_adapter files for one
    stacked export, and each adapter's own outputs on one batch."""
    d = tmp_path_factory.mktemp("stacked")
    model = tiny_llama()
    gm = lora_fx.inject_lora(lora_fx.capture(model, token_ids()), ["q_proj", "v_proj"], rank=4, alpha=8, adapter="qv")
    lora_fx.add_adapter(gm, "q", ["q_proj"], rank=2, alpha=2)
    path = export.export_multi_adapter(gm, d / "stacked.onnx", stacked=True)
    x = token_ids(65, 6, seed=5)
    files, refs = [], []
    for k in range(64):
        name = "qv" if k % 2 else "q"
        lora_fx.set_adapter(gm, name)
        randomize_lora(gm, std=0.3, seed=100 + k)
        files.append(export.export_adapter(gm, d / f"a{k}.onnx_adapter", path, name=name))
        with torch.no_grad():
            refs.append(gm(**x).logits)
    with torch.no_grad():
        base = model(**x).logits
    return model, gm, d, path, x, files, refs, base


def test_a_stacked_export_serves_64_adapters_mixed_in_one_batch(stacked):
    """Each row of one batch is its own adapter's model (64 adapters and the base model in 65 rows),
    the stacks grow past their first capacity, the graph reads only the rows' adapters, and the
    server holds one copy of each adapter."""
    model, gm, d, path, x, files, refs, base = stacked
    assert _gathers_only(path)
    server = export.AdapterServer(path, capacity=4)  # grows 4 -> 8 -> ... -> 64 while loading
    assert_close(server.run(x)[0], base)  # nothing loaded: the base model
    for k, f in enumerate(files):
        server.load(f"a{k}", f)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    rows = [f"a{k}" for k in order] + [None]
    out = server.run(x, adapter=rows)[0]
    for row, name in enumerate(rows):
        ref = base[row] if name is None else refs[int(name[1:])][row]
        assert_close(out[row], ref, ulps=1000, what=f"row {row} ({name})")
    assert rel_diff(out[0], refs[order[1]][0]) > 1e-3  # another adapter's row would differ
    one = server.run(x, adapter="a7")[0]  # every row one adapter: the same as its rows in a mixed batch
    assert_close(one, refs[7], ulps=1000)
    folded = export.export_onnx(lora_fx.merge_lora(gm, adapters=["q"]), d / "q_folded.onnx")  # a62 is "q" (even)
    assert_close(server.run(x, adapter=["a62"] * 65)[0], _ort(folded, x), ulps=1000)
    file_bytes = sum(f.stat().st_size for f in files)
    assert server.stacked_bytes <= file_bytes + server.stacked_bytes / 65  # one copy each, plus the zero row


def test_a_stacked_server_refuses_past_its_budget_and_bad_files_unchanged(stacked, tmp_path):
    model, gm, d, path, x, files, refs, base = stacked
    one = export.AdapterServer(path)
    one.load("a0", files[0])
    server = export.AdapterServer(path, adapter_memory=3 * one.stacked_bytes // 2)  # the zero row + 2 adapters
    server.load("a0", files[0])
    server.load("a1", files[1])
    before = server.run(x, adapter=["a1", "a0"] * 32 + [None])[0]
    with pytest.raises(export.ExportError, match=r"past this server's adapter_memory budget of [\d,]+ bytes \(2 loaded"):
        server.load("a2", files[2])
    other = lora_fx.inject_lora(lora_fx.capture(tiny_llama(hidden_size=64), token_ids()), ["q_proj", "v_proj"], rank=4)
    other_path = export.export_multi_adapter(other, tmp_path / "other.onnx", stacked=True)
    wrong = export.export_adapter(other, tmp_path / "other.onnx_adapter", other_path)
    with pytest.raises(export.ExportError, match=r"does not fit the served model.*an adapter for another base model"):
        server.load("a2", wrong)
    assert sorted(server.adapters) == ["a0", "a1"]
    assert torch.equal(server.run(x, adapter=["a1", "a0"] * 32 + [None])[0], before)
    with pytest.raises(lora_fx.AdapterNameError, match="no adapter 'a2' loaded"):
        server.run(x, adapter=["a2"] * 65)
    again = export.AdapterServer(path, capacity=1)  # a name loaded again takes a new row; later loads, others
    for name, f in (("a0", files[0]), ("a0", files[1]), ("a1", files[2])):
        again.load(name, f)
    out = again.run(x, adapter=["a0", "a1"] * 32 + [None])[0]
    assert_close(out[0::2][:32], refs[1][0:64:2], ulps=1000)
    assert_close(out[1::2][:32], refs[2][1:64:2], ulps=1000)
    with pytest.raises(export.ExportError, match=r"capacity is the number of adapters .* got 0"):
        export.AdapterServer(path, capacity=0)
    with pytest.raises(export.ExportError, match=r"stacked=True serves any number of adapters per batch; mixed=2"):
        export.export_multi_adapter(gm, tmp_path / "m.onnx", stacked=True, mixed=2)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("kind", ["per-run", "mixed", "stacked"])
def test_concurrent_requests_never_get_another_adapters_answer(served, tmp_path, kind):
    """Threads send requests with different adapters (and, mixed, batches that mix them) while another
    thread loads an adapter: every answer is its own adapter's, or a clear AdapterNameError for an
    adapter not loaded yet; never another adapter's answer."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    _, gm, _, multi, *_ = served
    path = multi if kind == "per-run" else export.export_multi_adapter(gm, tmp_path / f"{kind}.onnx", mixed=2 * (kind == "mixed"),
                                                                       stacked=kind == "stacked")
    files = {n: export.export_adapter(gm, tmp_path / f"{n}.onnx_adapter", path, name=n) for n in NAMES}
    reference = export.AdapterServer(path)
    for n in NAMES:
        reference.load(n, files[n])
    inputs = [token_ids(2, 5 + i % 3, seed=20 + i) for i in range(4)]
    choices = [None, "a", "b", "c"] + ([("a", "b"), ("c", None), ("b", "c")] if kind != "per-run" else [])
    expected = {(i, c): reference.run(x, adapter=list(c) if isinstance(c, tuple) else c)[0]
                for i, x in enumerate(inputs) for c in choices}
    server = export.AdapterServer(path)
    server.load("a", files["a"])
    server.load("b", files["b"])  # "c" is loaded while requests run
    rng = random.Random(0)
    requests = [(rng.randrange(len(inputs)), rng.choice(choices)) for _ in range(120)]

    def serve(request):
        i, c = request
        try:
            return request, server.run(inputs[i], adapter=list(c) if isinstance(c, tuple) else c)[0]
        except lora_fx.AdapterNameError as e:
            assert "c" in (c if isinstance(c, tuple) else (c,)) and "'c'" in str(e)
            return request, None

    with ThreadPoolExecutor(max_workers=4) as pool:
        before = list(pool.map(serve, requests[:40]))
        loading = pool.submit(server.load, "c", files["c"])
        during = list(pool.map(serve, requests[40:80]))
        loading.result()
        after = list(pool.map(serve, requests[80:]))
    assert all(out is not None for _, out in after)  # once loaded, "c" is served
    answered = [(r, out) for r, out in before + during + after if out is not None]
    for (i, c), out in answered:
        assert_close(out, expected[(i, c)], ulps=10, what=f"request {i} with {c}")
        others = [expected[(i, o)] for o in choices if o != c and expected[(i, o)].shape == out.shape]
        assert all(rel_diff(out, o) > 1e-4 for o in others if rel_diff(expected[(i, c)], o) > 1e-3)
