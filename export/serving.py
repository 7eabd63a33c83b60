"""Serving many adapters from one ONNX Runtime session.

- `export_multi_adapter(gm, path)`: the unfolded graph, with every LoRA weight an *overridable
  initializer* (also a graph input) under a slot-independent name (`<module>.lora_A.weight`,
  `<module>.lora_B.weight`, `<module>.lora_scaling`). B and the scaling default to zero, so with no
  adapter active the session computes the base model.
- `export_adapter(adapter, path, model)`: ONNX Runtime's `.onnx_adapter` for one adapter (ours or
  PEFT's), zero-padded to the model's slot ranks (exact).
- `AdapterServer`: one session, adapters loaded once (memory-mapped), `run(inputs, adapter=name)`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import lora_fx
from lora_fx import LORA_A, LoraGraphModule

from .onnx_export import ExportError, export_onnx
from .runtime import ort_run, ort_session


def export_multi_adapter(gm: LoraGraphModule, path, example_inputs=None) -> Path:
    """Export the unfolded LoRA graph with every LoRA weight an overridable initializer (see module doc)."""
    state = lora_fx.unfolded_lora(gm)
    if state is None:
        raise ExportError("export_multi_adapter needs an unfolded LoRA graph (inject_lora or load_adapter's result)")
    if state.weight_form:
        raise ExportError(
            f"{sorted(state.weight_form)[:3]} are adapted as weights (W + s*B@A: their op is not a product with an "
            "activation); a served adapter cannot be switched there. Fold each adapter and export it instead."
        )
    path = export_onnx(gm, path, example_inputs)
    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    renamed = {}
    for init in graph.initializer:
        new = lora_fx.slot_free_name(init.name, state.slot)
        if new is None:
            continue
        renamed[init.name] = new
        if not _is_lora_a(new):  # lora_B and the scaling: no adapter, the base model
            zero = onnx.numpy_helper.from_array(np.zeros(tuple(init.dims), dtype=onnx.helper.tensor_dtype_to_np_dtype(init.data_type)), new)
            init.CopyFrom(zero)
        init.name = new
    expected = {lora_fx.slot_free_name(n, state.slot) for n, _ in gm.named_parameters()} - {None}
    missing = expected - set(renamed.values())
    if not renamed or missing:
        raise ExportError(f"the exporter did not keep the LoRA weights as named initializers (missing {sorted(missing)[:3]})")
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for init in graph.initializer:  # overridable: also a graph input, fed by ONNX Runtime's LoraAdapter
        if init.name in renamed.values():
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 1_900_000_000)
    onnx.checker.check_model(str(path))
    return Path(path)


def slot_shapes(model_path) -> dict[str, tuple[int, ...]]:
    """The overridable LoRA inputs of a multi-adapter model and their shapes."""
    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {i.name: inits[i.name] for i in model.graph.input if i.name in inits}


def _is_lora_a(slot_free: str) -> bool:
    name = lora_fx.parse_slot_free(slot_free)
    return name is not None and name.which == LORA_A


def adapter_tensors(adapter, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(LoRA weights by slot-free name, scaling by module) of an adapter folder (ours or PEFT's), or of
    adapter `name` of an injected graph module."""
    if isinstance(adapter, LoraGraphModule):
        file = lora_fx.adapter_file(adapter, name)
    else:
        file = lora_fx.read_adapter(adapter)
        if file.modules:
            raise ExportError(f"{adapter} holds full module weights ({sorted(file.modules)[0]}); a served adapter "
                              "can hold LoRA weights only")
    return {n.slot_free: t for n, t in file.lora.items()}, dict(file.scalings)


def export_adapter(adapter, path, model, name: str | None = None) -> Path:
    """Write ONNX Runtime's .onnx_adapter for one adapter, sized to the multi-adapter `model` file."""
    shapes = slot_shapes(model)
    tensors, scales = adapter_tensors(adapter, name)
    params = {}
    for key, t in tensors.items():
        if key not in shapes:
            raise ExportError(f"adapter weight {key} has no slot in {model}: it targets other modules than the served model")
        want = shapes[key]
        r = t.shape[0] if _is_lora_a(key) else t.shape[1]
        slot_r = want[0] if _is_lora_a(key) else want[1]
        if r > slot_r:
            raise ExportError(f"{key} has rank {r} but the served model's slot holds {slot_r}; export the model "
                              "from a graph whose largest adapter rank is at least this one")
        padded = torch.zeros(want, dtype=t.dtype)
        if _is_lora_a(key):
            padded[:r] = t
        else:
            padded[:, :r] = t
        params[key] = padded
    for holder, s in scales.items():
        key = f"{holder}.lora_scaling"
        r = next(t.shape[0] for k, t in tensors.items() if k.startswith(holder + ".") and _is_lora_a(k))
        scale = torch.zeros(shapes[key], dtype=torch.float32)
        scale[:r] = s
        params[key] = scale
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v.detach().cpu().float().numpy()
                                                            if v.dtype == torch.bfloat16 else v.detach().cpu().numpy())
                        for k, v in params.items()})
    fmt.export_adapter(str(path))
    return Path(path)


class AdapterServer:
    """One ONNX Runtime session over a multi-adapter model; adapters loaded once, chosen per request.

    `run` takes torch tensors (IO binding, outputs stay on the session's device) or numpy arrays
    (`session.run` with ONNX Runtime's own `RunOptions.add_active_adapter`). ONNX Runtime 1.31 ignores
    active LoraAdapters in `run_with_iobinding` (measured), so the torch path binds the adapter's
    tensors as inputs itself, from the same file, placed once on the session's device.
    """

    def __init__(self, model_path, device: str = "auto", options=None):
        self.session = ort_session(model_path, device, options=options)
        self.provider = self.session.provider
        self.adapters: dict[str, object] = {}
        self._bound: dict[str, dict[str, object]] = {}

    def load(self, name: str, adapter_path) -> None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_path))  # memory-mapped
        params = ort.AdapterFormat.read_adapter(str(adapter_path)).get_parameters()
        expected = {i.name for i in self.session.get_overridable_initializers()}
        unknown = sorted(set(params) - expected)
        if unknown:
            raise ExportError(f"{adapter_path} holds {unknown[:3]}, which the served model does not take")
        device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self._bound[name] = {k: v if device == "cpu" else ort.OrtValue.ortvalue_from_numpy(v.numpy(), device, 0)
                             for k, v in params.items()}
        self.adapters[name] = adapter

    def run(self, inputs: dict, adapter: str | None = None) -> list:
        if adapter is not None and adapter not in self.adapters:
            raise lora_fx.AdapterNameError(f"no adapter {adapter!r} loaded; loaded: {sorted(self.adapters)}. "
                           "Load it first with server.load(name, path_to_onnx_adapter).")
        if all(isinstance(v, np.ndarray) for v in inputs.values()):
            options = ort.RunOptions()
            if adapter is not None:
                options.add_active_adapter(self.adapters[adapter])
            return self.session.run(None, inputs, run_options=options)
        return ort_run(self.session, inputs, extra=self._bound[adapter] if adapter is not None else None)
