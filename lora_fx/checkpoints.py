"""Checkpoints: a model's own weights read into a graph built on the meta device (`load_base`), and
training checkpoints of a run, sharded or not (`save_checkpoint` / `load_checkpoint`).

A model built under `torch.device("meta")` has shapes and no memory; `inject_lora` captures it as it
would a real one (LoRA itself is real from the start, drawn from the same random stream as on a real
model). `load_base` then reads the base weights from a Hugging Face checkpoint (safetensors, one file
or sharded with an index), each rank only the rows of its own FSDP2 shards, and computes the buffers
a checkpoint does not hold (rotary `inv_freq`) as the model's own init does. Training checkpoints
hold LoRA, the optimizer, the scheduler, the step and every rank's random state (never the base
weights), written with torch.distributed.checkpoint, so a run resumes on another number of ranks.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree

from .errors import CheckpointError
from .graph_module import LoraGraphModule, move_devices, require_lora
from .paths import set_buffer, set_parameter

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class LoadReport:
    """What `load_base` did on this rank."""
    tensors: int  # base tensors read from the checkpoint
    bytes_read: int  # this rank's bytes read (its shards' rows only, for sharded weights)
    computed: list[str]  # buffers the checkpoint does not hold, computed by the model's own init
    files: list[str]  # checkpoint files opened
    seconds: float


def checkpoint_files(checkpoint: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it: a file, or a folder with
    model.safetensors.index.json (sharded, as save_pretrained writes it) or model.safetensors."""
    path = Path(checkpoint)
    if path.is_file():
        files = [path]
    elif (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path / INDEX} is not a safetensors index (no weight_map: {e})") from e
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{path / missing[0]} is missing: {path / INDEX} lists it "
                                  f"({len(missing)} of {len(set(weight_map.values()))} shard files missing); copy the "
                                  "whole checkpoint folder")
        return {k: path / f for k, f in weight_map.items()}
    elif (path / SINGLE).is_file():
        files = [path / SINGLE]
    else:
        raise CheckpointError(f"no checkpoint at {path}: expected a .safetensors file, or a folder with {INDEX} or "
                              f"{SINGLE} (model.save_pretrained(folder) writes them)")
    return {k: f for f in files for k in _header(f)}


# safetensors' dtype names (the format's spec)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lies in a safetensors file."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset of its data in the file


def _header(path: Path) -> dict[str, _Entry]:
    """A safetensors file's table of contents. The format: an 8-byte little-endian header size, a
    JSON header {name: {dtype, shape, data_offsets}}, then the data. Read here rather than through
    safetensors' loader, which maps the file: mapped pages count as the process's memory while it
    reads, so a rank loading its shards would briefly hold them twice."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        entries = {k: _Entry(_DTYPES[v["dtype"]], tuple(v["shape"]), 8 + size + v["data_offsets"][0])
                   for k, v in header.items()}
        end = 8 + size + max((v["data_offsets"][1] for v in header.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if path.stat().st_size < end:  # found before anything is read, not halfway through loading
        raise CheckpointError(f"{path} ends before its tensors do ({path.stat().st_size} of {end} bytes): the file is "
                              "truncated (copy it again)")
    return entries


@dataclass
class _Plan:
    read: list[tuple[torch.Tensor, _Entry, Path]] = field(default_factory=list)  # meta tensor, where it lies, file
    computed: dict[int, torch.Tensor] = field(default_factory=dict)  # id(meta buffer) -> its value


def load_base(gm: LoraGraphModule, checkpoint: str | os.PathLike, *, device: str | torch.device | None = None,
              buffers: dict[str, torch.Tensor] | None = None) -> LoadReport:
    """Give `gm`'s base weights on the meta device their values from `checkpoint` (see
    `checkpoint_files`), by name; the model `gm` was captured from stays as it was (on meta).

    Sharded weights (FSDP2, after `lora_fx.unflatten(gm)` and `fully_shard`): each rank reads only
    the rows of its own shard (the bytes of its rows, read into the shard: no rank reads or holds a
    whole weight). The tree
    shares `gm`'s tensors, so loading `gm` loads the tree. Buffers the checkpoint does not hold
    (non-persistent ones, as rotary `inv_freq`) are computed by the model's own init
    (transformers' `_init_weights` on a real copy of the module that owns them) or taken from
    `buffers` ({name: tensor}). Every check (names, shapes, files) runs before anything is read, and
    in a process group every rank raises the first rank's error, so no rank goes on to train alone.
    device: where the weights go (default: the shards' device, else the CPU); LoRA moves there too."""
    started = time.perf_counter()
    require_lora(gm, "load_base")
    tensors = _meta_tensors(gm)
    names_of = {id(t): names for names, t in tensors}
    target = _target(tensors, device)
    error, plan = None, _Plan()
    try:
        if not tensors:
            raise CheckpointError("nothing to load: no tensor of this graph is on the meta device (load_base fills a "
                                  "graph captured from a model built under torch.device('meta'))")
        plan = _plan(gm, tensors, checkpoint_files(checkpoint), buffers or {})
    except CheckpointError as e:
        error = e
    error = _agreed(error)
    if error is not None:
        raise error
    read = 0
    with contextlib.ExitStack() as files:
        opened = {}
        for t, entry, path in plan.read:
            if path not in opened:
                opened[path] = files.enter_context(open(path, "rb"))
            value = _read(opened[path], entry, t, target, path)
            read += value.numel() * value.element_size()
            _replace(gm, names_of[id(t)], t, _like(t, value))
    for names, t in tensors:
        if id(t) in plan.computed:
            _replace(gm, names, t, plan.computed[id(t)].to(target))
    _move_rest(gm, target)
    _repoint_graphs(gm, target)
    return LoadReport(len(plan.read), read, sorted(names[0] for names, t in tensors if id(t) in plan.computed),
                      sorted({str(p) for _, _, p in plan.read}), time.perf_counter() - started)


def _meta_tensors(gm: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """(every name, tensor) for each meta tensor of `gm`, from one walk over its tensors (a tied
    weight has several names: the checkpoint may hold it under any, and each is re-pointed)."""
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)):
        if t.is_meta:
            names.setdefault(id(t), []).append(name)
            tensors[id(t)] = t
    return [(names[k], t) for k, t in tensors.items()]


def _target(tensors, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for _, t in tensors:
        if isinstance(t, DTensor):  # a shard: its mesh's device
            kind = t.device_mesh.device_type
            return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)
    return torch.device("cpu")


def _plan(gm: LoraGraphModule, tensors, files: dict[str, Path], given: dict[str, torch.Tensor]) -> _Plan:
    plan, to_compute = _Plan(), []
    headers = {}
    for names, t in tensors:
        name = names[0]
        if name in given or (not isinstance(t, nn.Parameter) and not any(n in files for n in names)):
            to_compute.append((name, t))
            continue
        key = next((n for n in names if n in files), None)
        if key is None:
            close = sorted(files, key=lambda k: _distance(k, name))[:3]
            raise CheckpointError(f"{name} ({tuple(t.shape)}) is not in the checkpoint ({len(files)} tensors; nearest "
                                  f"names: {close}). Is it this model's checkpoint, saved with the same module names?")
        path = files[key]
        if path not in headers:
            headers[path] = _header(path)
        entry = headers[path][key]
        shape = entry.shape
        if shape != tuple(t.shape):
            raise CheckpointError(f"{key} in {path.name} has shape {shape}, this model's {name} {tuple(t.shape)}: the "
                                  "checkpoint is another model's (or another config's)")
        plan.read.append((t, entry, path))
    plan.computed = _computed(gm, to_compute, given)
    return plan


def _distance(a: str, b: str) -> int:
    """How unalike two dotted names are (shared trailing components count most)."""
    pa, pb = a.split("."), b.split(".")
    same_tail = 0
    for x, y in zip(reversed(pa), reversed(pb)):
        if x != y:
            break
        same_tail += 1
    return -same_tail * 100 + abs(len(pa) - len(pb))


def _computed(gm: LoraGraphModule, buffers: list[tuple[str, torch.Tensor]],
              given: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Values for buffers the checkpoint does not hold: `given`, else the model's own init run on a
    real copy of each owning module (a rotary embedding: a few numbers, computed from the config)."""
    out, by_owner = {}, {}
    for name, t in buffers:
        if name in given:
            value = given[name]
            if tuple(value.shape) != tuple(t.shape):
                raise CheckpointError(f"buffers[{name!r}] has shape {tuple(value.shape)}, the model's {tuple(t.shape)}")
            out[id(t)] = value.to(t.dtype)
        else:
            by_owner.setdefault(name.rpartition(".")[0], []).append((name, t))
    if not by_owner:
        return out
    cap = gm.capture_info
    source = cap.source if cap is not None else None
    init = getattr(source, "_init_weights", None)  # transformers' own init: what from_pretrained runs on meta models
    for owner, named in by_owner.items():
        module = source.get_submodule(owner) if source is not None else None
        if init is None or module is None:
            raise CheckpointError(f"{named[0][0]} is not in the checkpoint and this model has no init that computes it "
                                  "(transformers' _init_weights): pass its value, load_base(..., buffers={name: tensor})")
        fresh = copy.deepcopy(module).to_empty(device="cpu")
        with torch.no_grad():
            init(fresh)
        values = dict(fresh.named_buffers(remove_duplicate=False))
        for name, t in named:
            value = values.get(name[len(owner) + 1:] if owner else name)
            if value is None or tuple(value.shape) != tuple(t.shape):
                raise CheckpointError(f"{name} is not in the checkpoint and its module's init does not compute it: pass "
                                      "its value, load_base(..., buffers={name: tensor})")
            out[id(t)] = value.detach().to(t.dtype)
    return out


def _agreed(error: CheckpointError | None) -> CheckpointError | None:
    """In a process group: the first rank's error on every rank (a rank that failed alone would
    leave the others waiting in their first collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return None
    rank, message = failed[0]
    return error if error is not None else CheckpointError(f"rank {rank}: {message}")


def _read(f, entry: _Entry, t: torch.Tensor, target: torch.device, path: Path) -> torch.Tensor:
    """The checkpoint's values for `t`, read into a tensor of their own: a shard's own rows only
    (FSDP2 shards dim 0: one contiguous byte range), a whole weight otherwise."""
    rows, first = entry.shape[0] if entry.shape else 1, 0
    if isinstance(t, DTensor):
        chunk = t.__create_chunk_list__()[0]
        if tuple(chunk.offsets[1:]) != (0,) * (len(entry.shape) - 1) or tuple(chunk.sizes[1:]) != entry.shape[1:]:
            raise CheckpointError(f"{t.shape} sharded as {t.placements}: load_base reads shards of dim 0 (FSDP2's "
                                  "default placement)")
        first, rows = chunk.offsets[0], chunk.sizes[0]
    value = torch.empty((rows, *entry.shape[1:]) if entry.shape else (), dtype=entry.dtype)
    row_bytes = math.prod(entry.shape[1:]) * value.element_size()
    f.seek(entry.start + first * row_bytes)
    buffer = value.view(-1).view(torch.uint8).numpy()
    if value.numel() and f.readinto(buffer) != buffer.nbytes:  # changed since it was checked
        raise CheckpointError(f"{path} ended while it was read: was it being written?")
    return value.to(device=target, dtype=t.dtype)


def _like(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` in `t`'s form: a parameter if `t` is one, a DTensor with `t`'s placement if `t` is a shard."""
    if isinstance(t, DTensor):
        value = DTensor.from_local(value, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                                   stride=t.stride())
    return nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value


def _replace(gm: nn.Module, names: list[str], old: torch.Tensor, value: torch.Tensor) -> None:
    """Point every name of `old` (found by `_meta_tensors`) to `value`."""
    for name in names:
        (set_parameter if isinstance(old, nn.Parameter) else set_buffer)(gm, name, value)


def _move_rest(gm: nn.Module, target: torch.device) -> None:
    """LoRA (real from inject, on the CPU) goes where the base went; shards are FSDP2's to place."""
    for p in gm.parameters():
        if not isinstance(p, DTensor) and p.device != target:
            p.data = p.data.to(target)
    for name, b in list(gm.named_buffers(remove_duplicate=False)):
        if b.device != target:
            set_buffer(gm, name, b.to(target))


def _repoint_graphs(gm: LoraGraphModule, target: torch.device) -> None:
    """A capture on the meta device bakes it into the graph (`.to(x.device)` in the model's code) and
    traces meta kernels' layouts: the flat graph is captured again from the loaded weights where it
    can be (it is then exactly a real capture's); where it cannot, and in the tree's graphs (whose
    weights are shards by now), the devices are re-pointed to `target` (meta's layouts stay: same values)."""
    meta = torch.device("meta")
    cap = gm.capture_info
    if cap is not None and cap.example_inputs is not None:  # the graph runs on `target` now: so do its examples
        gm.capture_info = replace(cap, example_inputs=pytree.tree_map_only(torch.Tensor, lambda t: t.to(target),
                                                                           cap.example_inputs))
    if not gm.capture_again():  # traced with real tensors, the graph is a real capture's (layouts included)
        move_devices(gm.graph, meta, target)
        gm.recompile()
    gm.forget_variants()  # graphs for other inputs were traced with the meta tensors
    tree = gm.tree
    for module in tree.modules() if tree is not None else ():
        graph = getattr(module, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            move_devices(graph, meta, target)
            code = module.__dict__.get("graph_module")  # an InterpreterModule's generated code
            if code is not None:
                code.recompile()


# ---------------------------------------------------------------------------------- training checkpoints
MANIFEST = "lora_fx_checkpoint.json"


def save_checkpoint(path: str | os.PathLike, gm: LoraGraphModule, optimizer: torch.optim.Optimizer, *,
                    module: nn.Module | None = None, scheduler=None, step: int = 0) -> Path:
    """Save a training checkpoint: the trainable tensors (LoRA's; never the base weights), the
    optimizer's state, the scheduler's, `step` and every rank's random state. Every rank calls it.

    Written with torch.distributed.checkpoint: each rank writes its own shards of LoRA and of the
    optimizer state, and `load_checkpoint` reshards on load, so a run saved on N ranks resumes on
    any number (one file per rank could only resume on N). A manifest written last
    (lora_fx_checkpoint.json: the adapters it belongs to) marks the checkpoint as whole.
    module: what the optimizer trains through, when it is not `gm` (the tree lora_fx.unflatten gave)."""
    state = require_lora(gm, "save_checkpoint")
    path = Path(path)
    lora, optim = _training_state(module if module is not None else gm, optimizer)
    rank = dist.get_rank() if _distributed() else 0
    world = dist.get_world_size() if _distributed() else 1
    if rank == 0:  # an overwritten checkpoint is not whole until its new manifest is written
        (path / MANIFEST).unlink(missing_ok=True)
    with _one_process_is_fine():
        dcp.save({"lora": lora, "optimizer": optim, "scheduler": scheduler.state_dict() if scheduler is not None else {},
                  "step": int(step), "rng": {f"rank{rank}": torch.get_rng_state()}}, checkpoint_id=str(path))
    if _distributed():
        dist.barrier()
    if rank == 0:
        manifest = {"format": "lora-fx training checkpoint", "version": 1, "world_size": world, "step": int(step),
                    "adapters": _adapters(state), "active": list(state.active), "tensors": sorted(lora)}
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, path / MANIFEST)
    if _distributed():
        dist.barrier()
    return path


def load_checkpoint(path: str | os.PathLike, gm: LoraGraphModule, optimizer: torch.optim.Optimizer, *,
                    module: nn.Module | None = None, scheduler=None) -> int:
    """Resume from `save_checkpoint`'s folder, on any number of ranks (every rank calls it): LoRA,
    the optimizer and the scheduler as they were, and this rank's random state (a rank the run did
    not have keeps its own). Returns the step. Refused, on every rank and before anything changes,
    when the checkpoint is incomplete or belongs to other adapters (targets, ranks, alphas)."""
    state = require_lora(gm, "load_checkpoint")
    path = Path(path)
    error, manifest = None, None
    try:
        manifest = _manifest(path)
        _check_adapters(manifest, state)
    except CheckpointError as e:
        error = e
    error = _agreed(error)
    if error is not None:
        raise error
    lora, optim = _training_state(module if module is not None else gm, optimizer)
    missing = sorted(set(lora) - set(manifest["tensors"]))
    if missing:
        raise CheckpointError(f"{missing[0]} trains here but is not in the checkpoint {path}")
    rank = dist.get_rank() if _distributed() else 0
    saved_rng = f"rank{rank}" if rank < manifest["world_size"] else None
    loaded = {"lora": lora, "optimizer": optim, "scheduler": scheduler.state_dict() if scheduler is not None else {},
              "step": 0, "rng": {saved_rng: torch.get_rng_state()} if saved_rng else {}}
    with _one_process_is_fine():
        dcp.load(loaded, checkpoint_id=str(path))
    _set_training_state(module if module is not None else gm, optimizer, loaded["lora"], loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if saved_rng:
        torch.set_rng_state(loaded["rng"][saved_rng])
    return int(loaded["step"])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _one_process_is_fine():
    """torch.distributed.checkpoint warns when no process group exists; one process is a use here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _training_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(trainable tensors by name, the optimizer's state by parameter name), sharded as they are."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    model, optim = get_state_dict(module, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {k: v for k, v in model.items() if k in trainable}, optim


def _set_training_state(module: nn.Module, optimizer: torch.optim.Optimizer, model: dict, optim: dict) -> None:
    set_state_dict(module, optimizer, model_state_dict=model, optim_state_dict=optim,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _adapters(state) -> dict:
    return {name: {"ranks": dict(a.ranks), "alphas": dict(a.alphas), "use_rslora": a.config.use_rslora,
                   "use_dora": a.config.use_dora, "lora_bias": a.config.lora_bias}
            for name, a in state.adapters.items()}


def _manifest(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"no training checkpoint at {path} (lora_fx.save_checkpoint writes a folder)")
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{path} is not a whole lora-fx training checkpoint: {MANIFEST} is missing (the save "
                              "did not finish, or the folder is something else). Resume from an earlier checkpoint")
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}): the checkpoint is damaged") from e


def _check_adapters(manifest: dict, state) -> None:
    """The checkpoint's adapters are this graph's: the same names, sites, ranks and alphas."""
    saved, mine = manifest.get("adapters", {}), _adapters(state)
    if set(saved) != set(mine):
        raise CheckpointError(f"the checkpoint holds adapters {sorted(saved)}, this graph {sorted(mine)}")
    for name in mine:
        a, b = saved[name], mine[name]
        extra, lacking = sorted(set(a["ranks"]) - set(b["ranks"])), sorted(set(b["ranks"]) - set(a["ranks"]))
        if extra or lacking:
            what = f"adapts {extra[0]}, which this graph does not" if extra else f"does not adapt {lacking[0]}"
            raise CheckpointError(f"adapter {name!r}: the checkpoint {what} (other targets); resume with the targets "
                                  "the run was started with")
        for field_ in ("ranks", "alphas"):
            diff = [k for k in b[field_] if a[field_][k] != b[field_][k]]
            if diff:
                raise CheckpointError(f"adapter {name!r}: {field_[:-1]} of {diff[0]} is {a[field_][diff[0]]} in the "
                                      f"checkpoint, {b[field_][diff[0]]} in this graph; resume with the run's config")
        for flag in ("use_rslora", "use_dora", "lora_bias"):
            if a[flag] != b[flag]:
                raise CheckpointError(f"adapter {name!r}: {flag} is {a[flag]} in the checkpoint, {b[flag]} here")
