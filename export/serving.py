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

import math
import re
from pathlib import Path

import numpy as np
import onnx
import torch

import lora_fx
from lora_fx.graph_module import LoraGraphModule

from .onnx_export import ExportError, export_onnx
from .runtime import ort_run, ort_session

_SLOT = re.compile(r"^(?P<holder>.+)\.(?P<which>lora_A|lora_B)\.(?P<slot>[^.]+)(?P<block>\.block\d+)?\.weight$")
_SCALE = re.compile(r"^(?P<holder>.+)\.lora_scaling\.(?P<slot>[^.]+)\.scale$")


def canonical_name(name: str, slot: str) -> str | None:
    """The slot-independent ONNX name of a LoRA weight of the graph module, or None."""
    m = _SLOT.match(name)
    if m and m["slot"] == slot:
        return f"{m['holder']}.{m['which']}{m['block'] or ''}.weight"
    m = _SCALE.match(name)
    if m and m["slot"] == slot:
        return f"{m['holder']}.lora_scaling"
    return None


def export_multi_adapter(gm: LoraGraphModule, path, example_inputs=None) -> Path:
    """Export the unfolded LoRA graph with every LoRA weight an overridable initializer (see module doc)."""
    state = getattr(gm, "_lora", None)
    if state is None or state.folded:
        raise ExportError("export_multi_adapter needs an unfolded LoRA graph (inject_lora or load_adapter's result)")
    if any(u == "weight" for row in state.report.sites for u in row.uses) if state.report else False:
        raise ExportError("some adapted weights are used as weights (not products); adapters cannot be switched there")
    path = export_onnx(gm, path, example_inputs)
    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    renamed = {}
    for init in graph.initializer:
        new = canonical_name(init.name, state.slot)
        if new is None:
            continue
        renamed[init.name] = new
        if ".lora_B" in new or new.endswith(".lora_scaling"):  # no adapter active: the base model
            zero = onnx.numpy_helper.from_array(np.zeros(tuple(init.dims), dtype=onnx.helper.tensor_dtype_to_np_dtype(init.data_type)), new)
            init.CopyFrom(zero)
        init.name = new
    missing = {canonical_name(n, state.slot) for n, _ in gm.named_parameters() if canonical_name(n, state.slot)} - set(renamed.values())
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


def adapter_tensors(adapter, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(LoRA weights by canonical name, scaling by module) of an adapter folder (ours or PEFT's), or of
    adapter `name` of an injected graph module."""
    from lora_fx.adapter_io import PREFIX, _KEY, read_adapter
    from lora_fx.adapters import pattern_value

    if isinstance(adapter, LoraGraphModule):
        state = adapter._lora
        name = name or state.active[0]
        ad = state.adapters[name]
        tensors, scales = {}, {}
        for param, pairs in lora_fx.adapter_weights(adapter, name).items():
            site = state.sites[param]
            for block, (a, b) in zip(site.blocks, pairs):
                suffix = f".block{block.index}" if site.fused else ""
                tensors[f"{site.holder}.lora_A{suffix}.weight"] = a
                tensors[f"{site.holder}.lora_B{suffix}.weight"] = b
            scales[site.holder] = ad.scaling(param)
        return tensors, scales
    config, raw = read_adapter(adapter)
    tensors, scales = {}, {}
    for key, t in raw.items():
        m = _KEY.match(key[len(PREFIX):])
        if m is None:
            raise ExportError(f"{adapter} holds full module weights ({key}); a served adapter can hold LoRA weights only")
        tensors[f"{m['holder']}.{m['which']}{('.' + m['block']) if m['block'] else ''}.weight"] = t
        if m["which"] == "lora_A":
            r = t.shape[0]
            alpha = pattern_value(config["alpha_pattern"], m["holder"], config["lora_alpha"])
            scales[m["holder"]] = alpha / (math.sqrt(r) if config["use_rslora"] else r)
    return tensors, scales


def export_adapter(adapter, path, model, name: str | None = None) -> Path:
    """Write ONNX Runtime's .onnx_adapter for one adapter, sized to the multi-adapter `model` file."""
    import onnxruntime as ort

    shapes = slot_shapes(model)
    tensors, scales = adapter_tensors(adapter, name)
    params = {}
    for key, t in tensors.items():
        if key not in shapes:
            raise ExportError(f"adapter weight {key} has no slot in {model}: it targets other modules than the served model")
        want = shapes[key]
        r = t.shape[0] if ".lora_A" in key else t.shape[1]
        slot_r = want[0] if ".lora_A" in key else want[1]
        if r > slot_r:
            raise ExportError(f"{key} has rank {r} but the served model's slot holds {slot_r}; export the model "
                              "from a graph whose largest adapter rank is at least this one")
        padded = torch.zeros(want, dtype=t.dtype)
        if ".lora_A" in key:
            padded[:r] = t
        else:
            padded[:, :r] = t
        params[key] = padded
    for holder, s in scales.items():
        key = f"{holder}.lora_scaling"
        r = next(t.shape[0] for k, t in tensors.items() if k.startswith(holder + ".lora_A"))
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
        import onnxruntime as ort

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
        import onnxruntime as ort

        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"no adapter {adapter!r} loaded; loaded: {sorted(self.adapters)}. "
                           "Load it first with server.load(name, path_to_onnx_adapter).")
        if all(isinstance(v, np.ndarray) for v in inputs.values()):
            options = ort.RunOptions()
            if adapter is not None:
                options.add_active_adapter(self.adapters[adapter])
            return self.session.run(None, inputs, run_options=options)
        return ort_run(self.session, inputs, extra=self._bound[adapter] if adapter is not None else None)
