"""Serving many adapters from one ONNX Runtime session.

- `export_multi_adapter(gm, path)`: the unfolded graph, with every LoRA weight an *overridable
  initializer* (also a graph input) under a slot-independent name (`<module>.lora_A.weight`,
  `<module>.lora_B.weight`, `<module>.lora_scaling`). B and the scaling default to zero, so with no
  adapter active the session computes the base model. `kv_cache=True` exports the decoding step
  instead (generation; onnxruntime-genai runs it with `.onnx_adapter` files); `mixed=k` exports k
  adapter *banks* and an `adapter_index` input, so the rows of one batch use different adapters;
  `stacked=True` makes each bank a graph input whose first dimension (adapters + 1) is free, so
  the server stacks every loaded adapter once and a batch mixes any of them with no refill: each
  site gathers only its rows' adapters (one Gather on axis 0), whatever the number loaded.
- `export_adapter(adapter, path, model)`: ONNX Runtime's `.onnx_adapter` for one adapter (ours or
  PEFT's), zero-padded to the model's slot ranks (exact).
- `AdapterServer`: one session, adapters loaded once (memory-mapped), `run(inputs, adapter=name)` and
  `generate(input_ids, adapter=name | None | [name or None per row])`.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import lora_fx
from lora_fx import LORA_A, LoraGraphModule

from . import kv_cache as kv
from .generation import generate, session_device
from .onnx_export import ExportError, check_tokenizer, export_onnx, stage_tokenizer, staged
from .runtime import ort_run, ort_session

INDEX = "adapter_index"
_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16}


def export_multi_adapter(gm: LoraGraphModule, path, example_inputs=None, *, kv_cache: bool = False,
                         mixed: int = 0, stacked: bool = False, tokenizer=None) -> Path:
    """Export the unfolded LoRA graph with its LoRA weights as overridable initializers (see the
    module doc). `kv_cache=True`: the decoding step with its KV cache. `mixed=k`: k adapter banks
    (each sized to the graph's slots) and an `adapter_index` input (one bank per row, -1 for none).
    `stacked=True`: banks as inputs of any length, filled by `AdapterServer` with every adapter it
    loads (any number; a batch mixes any of them). `tokenizer`: its files beside a kv export."""
    state = lora_fx.unfolded_lora(gm)
    if state is None:
        raise ExportError("export_multi_adapter needs an unfolded LoRA graph (inject_lora or load_adapter's result)")
    if state.bias_sites():
        raise ExportError(f"{sorted(state.bias_sites())[:2]} carry lora_bias adapters (a lora_B bias), which a served "
                          "adapter does not hold. Fold each of them (merge_lora) and export it")
    if state.dora_sites():
        raise ExportError(f"{sorted(state.dora_sites())[:2]} carry DoRA adapters, whose magnitude rescales the weight: "
                          "a served adapter is an additive update. Fold each DoRA adapter (merge_lora) and export it")
    if state.weight_form:
        raise ExportError(
            f"{sorted(state.weight_form)[:3]} are adapted as weights (W + s*B@A: their op is not a product with an "
            "activation); a served adapter cannot be switched there. Fold each adapter and export it instead."
        )
    if isinstance(mixed, bool) or not isinstance(mixed, int) or mixed < 0:
        raise ExportError(f"mixed must be a number of adapter banks (0: one adapter per run), got {mixed!r}")
    if stacked and mixed:
        raise ExportError(f"stacked=True serves any number of adapters per batch; mixed={mixed} fixes the number of "
                          "banks instead. Give one of the two")
    check_tokenizer(tokenizer, kv_cache)
    path = Path(path)
    with staged(path) as target:  # the export and its rewrite below reach `path` whole, or not at all
        stage_tokenizer(target, tokenizer)
        if stacked or mixed:  # stacked: one bank's export, its banks then made inputs of any length
            module = lora_fx.mixed_adapters(gm.decode_step() if kv_cache else gm, mixed or 1)
            export_onnx(module, target, example_inputs, kv_cache=kv_cache)
            if stacked:
                _make_stacked(target)
            else:
                _make_overridable(target, lambda name: name if _is_bank(name) else None, zero=lambda name: False)
        else:
            export_onnx(gm, target, example_inputs, kv_cache=kv_cache)
            renamed = _make_overridable(target, lambda name: lora_fx.slot_free_name(name, state.slot),
                                        zero=lambda name: not _is_lora_a(name))  # lora_B, scaling: the base model
            expected = {lora_fx.slot_free_name(n, state.slot) for n, _ in gm.named_parameters()} - {None}
            missing = expected - set(renamed.values())
            if not renamed or missing:
                raise ExportError("the exporter did not keep the LoRA weights as named initializers (missing "
                                  f"{sorted(missing)[:3]})")
        onnx.checker.check_model(str(target))
    return path


def _make_overridable(path: Path, rename, zero) -> dict[str, str]:
    """Rename the initializers `rename` maps (None: leave it), zero those `zero` says, and make each
    a graph input too (ONNX Runtime's overridable initializer). Returns {old name: new name}."""
    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    renamed = {}
    for init in graph.initializer:
        new = rename(init.name)
        if new is None:
            continue
        renamed[init.name] = new
        if zero(new):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros(tuple(init.dims), dtype=dtype), new))
        init.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for init in graph.initializer:  # overridable: also a graph input, fed by ONNX Runtime's LoraAdapter
        if init.name in renamed.values():
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    _save(model, path)
    return renamed


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 1_900_000_000, location=f"{path.name}.data")


STACK_DIM = "lora_adapters"  # a stacked bank's first dimension: the zero adapter + every loaded one


def _make_stacked(path: Path) -> None:
    """Turn each bank initializer into a graph input of free first dimension (STACK_DIM). Each must
    be read by Gathers on axis 0 only, so that a run costs the same whatever the number of adapters."""
    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    banks = [init for init in graph.initializer if _is_bank(init.name)]
    names = {init.name for init in banks}
    for node in graph.node:
        used = names.intersection(node.input)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if used and (node.op_type != "Gather" or node.input[0] not in names or axis != 0 or len(used) > 1):
            raise ExportError(f"the exporter reads adapter bank {sorted(used)[0]} with {node.op_type} (not a Gather of "
                              "the rows' adapters): a stacked export would read every adapter on every run")
    for init in banks:
        graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, [STACK_DIM, *init.dims[1:]]))
    kept = [init for init in graph.initializer if init.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    kept_info = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    _save(model, path)


def _is_lora_a(slot_free: str) -> bool:
    name = lora_fx.parse_slot_free(slot_free)
    return name is not None and name.which == LORA_A


def _is_bank(name: str) -> bool:
    return lora_fx.bank_source(name) is not None


def slot_shapes(model_path) -> dict[str, tuple[int, ...]]:
    """The shapes one adapter's weights must have for a multi-adapter model, by slot-free name
    (a mixed model: one bank's share of each bank)."""
    if not Path(model_path).is_file():
        raise ExportError(f"no model at {model_path}: give the multi-adapter model the adapter is for "
                          "(export.export_multi_adapter writes it)")
    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    overridable = {i.name: inits[i.name] for i in model.graph.input if i.name in inits}
    stacks = {i.name: tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim)  # stacked=True
              for i in model.graph.input if i.name not in inits and _is_bank(i.name)}
    overridable.update(stacks)
    shapes = {}
    for name, dims in overridable.items():
        source = lora_fx.bank_source(name)
        shapes[source or name] = dims[1:] if source else dims
    return shapes


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
    return {n.module_name: t for n, t in file.lora.items()}, dict(file.scalings)


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
        other = (t.shape[1], want[1]) if _is_lora_a(key) else (t.shape[0], want[0])
        if t.dim() != 2 or other[0] != other[1]:
            raise ExportError(f"{key} is {tuple(t.shape)} and does not fit the served model, which takes "
                              f"{tuple(want)} (up to the rank): an adapter for another base model?")
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
        key = lora_fx.scale_slot_free(holder)
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
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        fmt.export_adapter(str(partial))
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)  # whole or not at all: a killed writer leaves the previous file as it was
    finally:
        partial.unlink(missing_ok=True)
    return path


def _ort_view(t: torch.Tensor):
    """An OrtValue over `t`'s memory (no copy; it keeps `t` alive)."""
    return ort.OrtValue.from_dlpack(torch.utils.dlpack.to_dlpack(t))


class AdapterServer:
    """One ONNX Runtime session over a multi-adapter model; adapters loaded once, chosen per request.

    `run` takes torch tensors (IO binding, outputs stay on the session's device) or numpy arrays
    (`session.run` with ONNX Runtime's own `RunOptions.add_active_adapter`). ONNX Runtime 1.31 ignores
    active LoraAdapters in `run_with_iobinding` (measured), so the torch path binds the adapter's
    tensors as inputs itself, from the same file, placed once on the session's device. A model
    exported with `mixed=k` takes a different adapter per row: the server fills its k banks from the
    loaded adapters a request names and feeds each row's bank index.

    A `stacked=True` export: each adapter is copied once into one stack per bank (row 0 the zero
    adapter, then one row per load, on the session's device), and every request binds the same
    stacks, so any mix of the loaded adapters costs what one adapter costs. The stacks grow by
    doubling (`capacity`: adapters room is made for at first); the server holds no other copy of an
    adapter. `adapter_memory` (bytes) caps the stacks' size: a load past it is refused.
    """

    def __init__(self, model_path, device: str = "auto", options=None, *, capacity: int = 16,
                 adapter_memory: int | None = None):
        self.session = ort_session(model_path, device, options=options)
        self.provider = self.session.provider
        self.adapters: dict[str, object] = {}
        self._bound: dict[str, dict[str, object]] = {}
        self._params: dict[str, dict[str, np.ndarray]] = {}
        overridable = {i.name: tuple(i.shape) for i in self.session.get_overridable_initializers()}
        self.banks = {n: shape for n, shape in overridable.items() if _is_bank(n)}  # mixed models only
        inputs = self.session.get_inputs()
        self.mixed = INDEX in {i.name for i in inputs}
        self.slots = next(iter(self.banks.values()))[0] - 1 if self.banks else 1  # adapters one batch may mix
        # what one adapter's tensors must look like, by name (a mixed model: one bank's share)
        self.shapes = {lora_fx.bank_source(n) or n: shape[1:] if _is_bank(n) else shape for n, shape in overridable.items()}
        self.stacked = any(_is_bank(i.name) and i.name not in overridable for i in inputs)
        if self.stacked:
            if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
                raise ExportError(f"capacity is the number of adapters to make room for at first (>= 1), got {capacity!r}")
            banks = [i for i in inputs if _is_bank(i.name)]
            self.shapes = {lora_fx.bank_source(i.name): tuple(i.shape[1:]) for i in banks}
            self._stack_dtype = {i.name: _TORCH_DTYPES[i.type] for i in banks}
            self._stacks: dict[str, torch.Tensor] = {}  # bank -> [capacity + 1, ...] on the session's device
            # what requests read, replaced whole by each load: (bank -> OrtValue over the rows written,
            # adapter -> its row - 1, its adapter_index)
            self._published: tuple[dict[str, object], dict[str, int]] = ({}, {})
            self._written = 0  # adapter rows written (a name loaded again takes a new one)
            self._capacity = capacity
            self._lock = threading.Lock()  # loads write rows and replace the views one at a time
        self.adapter_memory = adapter_memory
        self._row_bytes = sum(int(np.prod(self.shapes[lora_fx.bank_source(bank)])) * dtype.itemsize
                              for bank, dtype in self._stack_dtype.items()) if self.stacked else 0  # one adapter

    @property
    def stacked_bytes(self) -> int:
        """Bytes of adapter weights the stacks hold (rows in use, the zero row included)."""
        return self._row_bytes * (self._written + 1) if self.stacked else 0

    def load(self, name: str, adapter_path) -> None:
        if not Path(adapter_path).is_file():
            raise ExportError(f"no adapter file at {adapter_path}: write one with export.export_adapter(adapter, path, model)")
        adapter = ort.LoraAdapter()
        try:
            adapter.Load(str(adapter_path))  # memory-mapped
            params = ort.AdapterFormat.read_adapter(str(adapter_path)).get_parameters()
        except RuntimeError as e:  # ONNX Runtime's own words: "not a valid lora parameter format"
            raise ExportError(f"{adapter_path} is not an .onnx_adapter file ({str(e).strip().splitlines()[-1][:200]}); "
                              "write one with export.export_adapter(adapter, path, model)") from e
        unknown = sorted(set(params) - set(self.shapes))
        if unknown:
            raise ExportError(f"{adapter_path} holds {unknown[:3]}, which the served model does not take: an adapter "
                              "for other target modules; export it against this model (export.export_adapter(adapter, "
                              "path, this_model)) from a graph with this model's targets")
        wrong = [k for k, v in params.items() if tuple(v.numpy().shape) != tuple(self.shapes[k])]
        if wrong:
            k = wrong[0]
            raise ExportError(f"{adapter_path}: {k} is {tuple(params[k].numpy().shape)} and does not fit the served "
                              f"model, which takes {tuple(self.shapes[k])}: an adapter for another base model, or "
                              "written for another export?")
        if self.stacked:
            self._load_row(name, adapter_path, params)
            return
        device = session_device(self.session)
        self._params[name] = {k: v.numpy() for k, v in params.items()}
        self._bound[name] = {k: v if device == "cpu" else ort.OrtValue.ortvalue_from_numpy(v.numpy(), device, 0)
                             for k, v in params.items()}
        self.adapters[name] = adapter

    def _load_row(self, name: str, adapter_path, params: dict) -> None:
        """Copy one adapter into the next row of every stack (zeros where it has no weight), then
        publish the new views. A name loaded again takes a new row: a request running meanwhile
        still reads the old one whole."""
        with self._lock:
            row = self._written + 1
            if self.adapter_memory is not None and self._row_bytes * (row + 1) > self.adapter_memory:
                raise ExportError(f"loading {adapter_path} as {name!r} would hold {self._row_bytes * (row + 1):,} bytes of "
                                  f"adapters, past this server's adapter_memory budget of {self.adapter_memory:,} bytes "
                                  f"({len(self.adapters)} loaded, {self._row_bytes:,} bytes each): raise the budget or serve "
                                  "the other adapters from another server")
            stacks = self._stacks
            if not stacks or row >= next(iter(stacks.values())).shape[0]:
                stacks = self._grown(row)
            for bank, stack in stacks.items():
                source = lora_fx.bank_source(bank)
                if source in params:
                    stack[row].copy_(torch.from_numpy(params[source].numpy()))
                else:
                    stack[row].zero_()
            views = {bank: _ort_view(stack[:row + 1]) for bank, stack in stacks.items()}
            self._stacks, self._written = stacks, row
            self._published = (views, {**self._published[1], name: row - 1})  # one assignment: requests see both or neither
            self.adapters[name] = row - 1

    def _grown(self, row: int) -> dict[str, torch.Tensor]:
        """New stacks with room for at least `row` adapters, holding the rows in use (doubling:
        the copies cost each adapter O(1) loads on average)."""
        capacity = self._capacity
        while capacity < row:
            capacity *= 2
        self._capacity = capacity * 2  # next growth
        device = session_device(self.session)
        grown = {}
        for bank, dtype in self._stack_dtype.items():
            shape = self.shapes[lora_fx.bank_source(bank)]
            stack = torch.empty((capacity + 1, *shape), dtype=dtype, device=device)  # rows past the used ones are never read
            old = self._stacks.get(bank)
            if old is None:
                stack[0].zero_()
            else:
                stack[:row].copy_(old[:row])
            grown[bank] = stack
        return grown

    def _check(self, names) -> None:
        unknown = [n for n in names if n is not None and n not in self.adapters]
        if unknown:
            raise lora_fx.AdapterNameError(f"no adapter {unknown[0]!r} loaded; loaded: {sorted(self.adapters)}. "
                                           "Load it first with server.load(name, path_to_onnx_adapter).")

    def _inputs_for(self, rows: list[str | None]) -> dict[str, object]:
        """The extra inputs of a request whose row i uses adapter rows[i] (None: the base model)."""
        self._check(rows)
        if self.stacked:
            views, positions = self._published
            index = np.array([positions[n] if n is not None else -1 for n in rows], dtype=np.int64)
            device = session_device(self.session)
            if not views:  # nothing loaded: every row is the base model; the stacks hold the zero row only
                views = {bank: _ort_view(torch.zeros((1, *self.shapes[lora_fx.bank_source(bank)]), dtype=dtype,
                                                     device=device))
                         for bank, dtype in self._stack_dtype.items()}
            return {**views, INDEX: ort.OrtValue.ortvalue_from_numpy(index, device, 0)}
        distinct = list(dict.fromkeys(n for n in rows if n is not None))
        if not self.mixed:
            if len(distinct) > 1 or (distinct and None in rows):
                raise ExportError(f"this model serves one adapter per run, the rows asked for {distinct + [None] * (None in rows)}: "
                                  "export it with export_multi_adapter(..., mixed=k) to mix adapters in a batch")
            return self._bound[distinct[0]] if distinct else {}
        if len(distinct) > self.slots:
            raise ExportError(f"the rows use {len(distinct)} adapters but the model has {self.slots} banks; split the "
                              f"batch, or export with mixed >= {len(distinct)}")
        device = session_device(self.session)
        banks = {}
        for bank, shape in self.banks.items():
            data = np.zeros(shape, dtype=np.float32)
            source = lora_fx.bank_source(bank)
            for j, name in enumerate(distinct):  # row 0 is the zero adapter
                if source in self._params[name]:
                    data[j + 1] = self._params[name][source]
            banks[bank] = ort.OrtValue.ortvalue_from_numpy(data, device, 0)
        index = np.array([distinct.index(n) if n is not None else -1 for n in rows], dtype=np.int64)
        banks[INDEX] = ort.OrtValue.ortvalue_from_numpy(index, device, 0)
        return banks

    def run(self, inputs: dict, adapter: str | None = None) -> list:
        """One forward run: `adapter` a loaded name (or None: the base model), or one per row of a
        mixed model."""
        rows = list(adapter) if isinstance(adapter, (list, tuple)) else None
        if rows is None:
            self._check([adapter])
        if not self.mixed and rows is None and all(isinstance(v, np.ndarray) for v in inputs.values()):
            options = ort.RunOptions()
            if adapter is not None:
                options.add_active_adapter(self.adapters[adapter])
            return self.session.run(None, inputs, run_options=options)
        batch = next(iter(inputs.values())).shape[0]
        inputs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
        return ort_run(self.session, inputs, extra=self._inputs_for(rows if rows is not None else [adapter] * batch))

    def generate(self, input_ids: torch.Tensor, adapter=None, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """`export.generate` on this session (a kv-cache export): every row with `adapter` (a loaded
        name, or None for the base model), or row i with adapter[i] (a mixed model: one session run
        per step for the whole batch). Other arguments as `export.generate`."""
        kv.read_metadata(self.session)  # a clear error when the model has no KV cache
        rows = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * input_ids.shape[0]
        if len(rows) != input_ids.shape[0]:
            raise lora_fx.InputsError(f"{len(rows)} adapters given for {input_ids.shape[0]} rows; give one per row")
        return generate(self.session, input_ids, max_new_tokens, extra=self._inputs_for(rows), **kwargs)
