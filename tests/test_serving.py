"""Serving many adapters from one ONNX Runtime session, and batches that mix adapters."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import export
import lora_fx
from helpers import first_tensor, max_abs
from test_capture import tiny_llama

IDS = {"input_ids": torch.randint(0, 64, (2, 7))}
NAMES = ("a", "b", "c")


def _train(gm, target, steps=8):
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        torch.nn.functional.mse_loss(first_tensor(gm(**IDS)), target).backward()
        opt.step()
        opt.zero_grad()
    gm.eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Three adapters of ranks 4, 2, 3 (c on other targets too) trained on different data, one multi-
    adapter export, an .onnx_adapter each, and each adapter folded and exported on its own."""
    d = tmp_path_factory.mktemp("serving")
    model = tiny_llama()
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8, init="kaiming", adapter="a", example_inputs=IDS)
    lora_fx.add_adapter(gm, "b", rank=2, alpha=4, init="kaiming")
    lora_fx.add_adapter(gm, "c", ["q_proj", "v_proj", "o_proj"], rank=3, alpha=3, init="kaiming")
    with torch.no_grad():
        shape = first_tensor(gm(**IDS)).shape
    for i, name in enumerate(NAMES):
        lora_fx.set_adapter(gm, name)
        _train(gm, torch.randn(shape, generator=torch.Generator().manual_seed(i)))
    multi = export.export_multi_adapter(gm, d / "multi.onnx")
    files, alone = {}, {}
    for name in NAMES:
        files[name] = export.export_adapter(gm, d / f"{name}.onnx_adapter", multi, name=name)
        alone[name] = export.export_onnx(lora_fx.merge_lora(gm, adapters=name), d / f"{name}_folded.onnx")
    base = export.export_onnx(model, d / "base.onnx", IDS)
    server = export.AdapterServer(multi)
    for name in NAMES:
        server.load(name, files[name])
    return model, gm, d, multi, server, alone, base


def _ort(path, inputs):
    return export.ort_run(export.ort_session(path), inputs)[0]


def test_each_adapter_equals_its_own_folded_export(served):
    _, _, _, _, server, alone, base = served
    x = {"input_ids": torch.randint(0, 64, (3, 9))}
    outs = {n: server.run(x, adapter=n)[0] for n in NAMES}
    for name in NAMES:
        assert max_abs(outs[name], _ort(alone[name], x)) <= 1e-4
        other = next(n for n in NAMES if n != name)
        assert max_abs(outs[name], outs[other]) > 1e-3
    assert max_abs(server.run(x)[0], _ort(base, x)) <= 1e-5  # no adapter: the base model
    numpy_out = server.run({"input_ids": x["input_ids"].numpy()}, adapter="b")[0]  # ORT's own LoraAdapter path
    assert np.abs(numpy_out - outs["b"].numpy()).max() <= 1e-5


def test_switching_a_hundred_times_is_stable(served):
    *_, server, _, _ = served
    x = {"input_ids": torch.randint(0, 64, (2, 5))}
    first = {n: server.run(x, adapter=n)[0].clone() for n in NAMES}
    for i in range(100):
        name = NAMES[i % 3]
        assert torch.equal(server.run(x, adapter=name)[0], first[name])


def test_mixed_batch_equals_rows_run_alone_in_torch_and_onnx_runtime(served):
    model, gm, d, *_ = served
    mixed = lora_fx.mixed_adapters(gm, list(NAMES))
    x = {"input_ids": torch.randint(0, 64, (5, 6))}
    index = torch.tensor([2, 0, -1, 1, 0])
    with torch.no_grad():
        out = mixed(**x, adapter_index=index).logits
        for row, k in enumerate(index.tolist()):
            if k < 0:
                ref = model(**x).logits[row]
            else:
                lora_fx.set_adapter(gm, NAMES[k])
                ref = gm(**x).logits[row]
            assert max_abs(out[row], ref) <= 1e-5, row
    path = export.export_onnx(mixed, d / "mixed.onnx")
    assert max_abs(_ort(path, {**x, "adapter_index": index}), out) <= 1e-4


def test_peft_folder_to_onnx_adapter(served, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _, _, multi, server, _, _ = served
    torch.manual_seed(7)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    server.load("peft", export.export_adapter(tmp_path / "peft", tmp_path / "peft.onnx_adapter", multi))
    x = {"input_ids": torch.randint(0, 64, (2, 8))}
    with torch.no_grad():
        assert max_abs(server.run(x, adapter="peft")[0], peft_model(**x).logits) <= 1e-4


def test_refusals(served, tmp_path):
    model, gm, _, multi, server, _, _ = served
    with pytest.raises(KeyError, match="no adapter 'zzz' loaded.*server.load"):
        server.run(IDS, adapter="zzz")
    big = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=8, example_inputs=IDS)
    with pytest.raises(export.ExportError, match="rank 8 but the served model's slot holds 4"):
        export.export_adapter(big, tmp_path / "big.onnx_adapter", multi)
    other = lora_fx.inject_lora(model, ["k_proj"], rank=2, example_inputs=IDS)
    with pytest.raises(export.ExportError, match="has no slot"):
        export.export_adapter(other, tmp_path / "k.onnx_adapter", multi)
    with pytest.raises(lora_fx.ConfigError, match="cannot mix adapters"):
        lora_fx.mixed_adapters(gm, ["a", "nope"])
