"""export_onnx: a captured (folded or not) graph, or any module, to ONNX through the dynamo exporter.

Every module goes through `lora_fx.capture` first, so the untouched model and a folded graph take the
same path to ONNX and come out node-for-node (and name-for-name) the same.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
from onnxscript.rewriter import pattern
from torch import nn
from torch.utils import _pytree as pytree

import lora_fx
from lora_fx import LoraGraphModule, auto_dims

from . import kv_cache as kv


class ExportError(lora_fx.LoraFxError, RuntimeError):
    """ONNX export failed; the message says whether LoRA has anything to do with it."""


def _writable_target(path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ExportError(f"cannot write {path}: no write permission; choose a writable path")


TOKENIZER_STAGE = "tokenizer"  # the staging folder's subfolder for the tokenizer's files


@contextlib.contextmanager
def staged(path: Path):
    """Write an ONNX file set (the .onnx, its external data, genai_config.json) into a staging folder
    beside `path`, and move it into place only when whole: external data first under names of its
    own (nothing is overwritten), then the .onnx by one atomic rename (the commit), then the rest. A
    writer killed at any point leaves the previous set as it was (or, after the commit, the new .onnx
    with its own data: never one file's new data under another's graph); a full disk fails in the
    staging folder, with the previous set untouched. Yields the path to write to."""
    path = Path(path)
    _writable_target(path)
    for left in path.parent.glob(f".{path.name}.partial-*"):  # a killed writer's: its process is gone
        if not _alive(left.name.rsplit("-", 2)[-2]):
            shutil.rmtree(left, ignore_errors=True)
    stage = path.parent / f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage / path.name
        _commit(stage, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ExportError(f"no space left to write {path} ({e.strerror}); the previous {path.name} was not "
                              "touched. Free some space and export again") from e
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ValueError:
        return True  # not a staging folder of ours: leave it
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tensors(graph: onnx.GraphProto):
    """Every tensor a graph holds: initializers, and node attributes (subgraphs included)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _data_files(model: onnx.ModelProto) -> set[str]:
    return {e.value for t in _tensors(model.graph) for e in t.external_data if e.key == "location"}


def _commit(stage: Path, path: Path) -> None:
    staged_onnx = stage / path.name
    model = onnx.load(str(staged_onnx), load_external_data=False)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # the writer's pid: a dead writer's leftovers can be told apart
    locations = sorted(_data_files(model))
    # staged data file -> a name of its own in the target folder (nothing there is overwritten)
    moves = {old: f"{path.name}.{token}{'' if len(locations) == 1 else f'.{i}'}.data" for i, old in enumerate(locations)}
    if moves:
        for t in _tensors(model.graph):
            for e in t.external_data:
                if e.key == "location":
                    e.value = moves[e.value]
        onnx.save(model, str(staged_onnx))  # the graph only: its data stays where it is, under the new name below
    try:
        previous = _data_files(onnx.load(str(path), load_external_data=False)) if path.is_file() else set()
    except Exception:  # what is there is not an ONNX file: nothing of it to clean up
        previous = set()
    for f in (f for f in stage.rglob("*") if f.is_file()):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    for old, new in moves.items():
        os.replace(stage / old, path.parent / new)
    os.replace(staged_onnx, path)  # the commit
    for name in (kv.GENAI_CONFIG, *kv.HF_CONFIGS):  # what goes with the graph; anything else staged is scratch
        if (stage / name).is_file():
            os.replace(stage / name, path.parent / name)
    if (stage / TOKENIZER_STAGE).is_dir():
        for f in (stage / TOKENIZER_STAGE).iterdir():
            os.replace(f, path.parent / f.name)
    for old in previous - set(moves.values()):  # the replaced graph's data
        (path.parent / old).unlink(missing_ok=True)
    for left in path.parent.glob(f"{path.name}.*-*.data"):  # data an interrupted writer moved in, never committed
        pid = left.name[len(path.name) + 1:].split("-", 1)[0]
        if left.name not in moves.values() and (pid == str(os.getpid()) or not _alive(pid)):
            left.unlink(missing_ok=True)


def output_names(gm: LoraGraphModule) -> list[str] | None:
    """Names for the flattened outputs: the keys of a ModelOutput or dict, output_<i> otherwise."""
    spec = getattr(gm, "_out_spec", None)
    if spec is None:
        return None
    dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    try:
        paths, _ = pytree.tree_flatten_with_path(dummy)
    except ValueError:  # an output type registered without key paths (diffusers' BaseOutput): its keys, if flat
        keys = list(dummy.keys()) if hasattr(dummy, "keys") else []
        return [str(k) for k in keys] if len(keys) == spec.num_leaves else [f"output_{i}" for i in range(spec.num_leaves)]
    if len(paths) == 1 and not paths[0][0]:
        return ["output"]
    names = []
    for path, _ in paths:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        names.append(".".join(parts) if parts else "output")
    if not isinstance(dummy, dict) and not hasattr(dummy, "keys"):
        names = [f"output_{n}" if n.isdigit() else n for n in names]
    return names


def export_onnx(module: nn.Module, path, example_inputs: Any = None, *, dynamic: bool = True,
                opset: int | None = None, optimize: bool = False, kv_cache: bool = False,
                external_data: bool | None = None, tokenizer=None) -> Path:
    """Export `module` (a graph lora-fx returned, or any nn.Module) to ONNX at `path`.

    Dynamic batch and sequence axes by default; inputs and outputs named as the model names them;
    weights keep their parameter names (`optimize=False`, so the untouched and the folded exports can
    be compared name for name; ONNX Runtime optimizes at load time anyway). Weights go to external
    data (a file beside it) when over 2 GB, or always with external_data=True. The file passes
    `onnx.checker`. The set is written whole or not at all (`staged`: a killed writer or a full disk
    leaves the previous export as it was). Returns the path written.

    kv_cache=True (a causal LM, or a graph of one): one decoding step instead of the forward, with
    inputs `input_ids`, `attention_mask`, `position_ids` (where the model takes them),
    `past_key_values.{i}.key` / `.value` and outputs `logits`, `present.{i}.key` / `.value`; batch,
    sequence and past length dynamic. What a generation loop needs is kept in the file's metadata
    (`export.generate` reads it); `genai_config.json` (onnxruntime-genai) and the model's
    `config.json` / `generation_config.json` (transformers, optimum) are written beside it (one
    model per folder), and the `tokenizer`'s files when one is given (its `save_pretrained`).
    `example_inputs` is not used: the step sizes its own example.
    """
    path = Path(path)
    _writable_target(path)
    check_tokenizer(tokenizer, kv_cache)
    regions = lora_fx.regions_of(module)
    if regions is not None:  # ONNX holds one graph of the whole model: the merged model is exported
        warnings.warn("this model was captured by regions; exporting lora_fx.merge_and_unload(module), which torch.export "
                      "must capture whole", stacklevel=2)
        try:
            return export_onnx(lora_fx.merge_and_unload(module), path, example_inputs, dynamic=dynamic, opset=opset,
                               optimize=optimize, kv_cache=kv_cache, external_data=external_data, tokenizer=tokenizer)
        except lora_fx.CaptureError as e:
            raise ExportError(f"ONNX export needs the whole model captured, and it was captured by regions because "
                              f"{regions.reason[:300]}; the merged model fails the same way. Export a model torch.export "
                              "can capture (replace the untraceable line), or serve the merged model in PyTorch") from e
    _check_formats(module)
    with staged(path) as target:
        _write(module, target, example_inputs, dynamic, opset, optimize, kv_cache, external_data)
        stage_tokenizer(target, tokenizer)
    return path


def check_tokenizer(tokenizer, kv_cache: bool) -> None:
    if tokenizer is not None and (not kv_cache or not hasattr(tokenizer, "save_pretrained")):
        raise ExportError("tokenizer= is written beside a kv-cache export (kv_cache=True), and must be a transformers "
                          f"tokenizer (it has save_pretrained); got {type(tokenizer).__name__}"
                          f"{'' if kv_cache else ' without kv_cache=True'}")


def stage_tokenizer(target: Path, tokenizer) -> None:
    """The tokenizer's files into the staging folder of `target`, committed with the graph."""
    if tokenizer is not None:
        tokenizer.save_pretrained(target.parent / TOKENIZER_STAGE)


def _write(module: nn.Module, path: Path, example_inputs, dynamic: bool, opset, optimize: bool, kv_cache: bool,
           external_data: bool | None) -> None:
    if kv_cache:
        try:
            gm = module.decode_step() if isinstance(module, LoraGraphModule) else lora_fx.capture_decoder(module)
        except lora_fx.InputsError as e:  # not a model with a KV cache: nothing was written
            raise ExportError(f"kv_cache=True: {e}") from None
        example_inputs = gm.capture_info.example_inputs
        args, kwargs = (), dict(example_inputs)
        dynamic_shapes = lora_fx.decoder_dims(kwargs) if dynamic else None
        names = kv.input_names(gm), kv.output_names(gm)
    else:
        gm, args, kwargs = _forward_inputs(module, example_inputs)
        dynamic_shapes = auto_dims(args if args else kwargs) if dynamic else None
        inputs, outputs = (None if args else list(kwargs)), output_names(gm)
        if inputs and outputs:  # ONNX names are one namespace: an output named like an input (a UNet's "sample") gets "_out"
            outputs = [f"{n}_out" if n in inputs else n for n in outputs]
        names = inputs, outputs
    _export(gm, path, args, kwargs, dynamic_shapes, names, opset, optimize, external_data)
    if kv_cache:
        described = kv.describe(gm)
        kv.write_metadata(path, described)
        kv.write_genai_config(path, gm, described)
        kv.write_hf_configs(path, gm)
    onnx.checker.check_model(str(path))


# quantized weight formats torch's exporter writes as ONNX that ONNX Runtime runs (int8 and the
# int4 Intx weights stay 8-bit integers in the file, dequantized by Cast / Mul nodes in the graph)
ONNX_FORMATS = {"int8", "intx"}


def _check_formats(module: nn.Module) -> None:
    """Refuse quantized weights whose export ONNX Runtime cannot load (NF4: torch's exporter mixes
    int8 and uint8 in its bit unpacking), before writing anything."""
    for name, p in module.named_parameters():
        if lora_fx.is_shard(p):
            raise ExportError(f"{name} is sharded across ranks (FSDP2); export needs whole weights. Save the adapter "
                              "(lora_fx.save_adapter, on every rank), load it into the model on one process and export that")
        fmt = lora_fx.quantized.format_name(p)
        if fmt and fmt not in ONNX_FORMATS:
            raise ExportError(
                f"{name} is a {fmt} weight; torch's ONNX exporter writes {fmt} in a form ONNX Runtime cannot load. "
                "Fold with lora_fx.merge_lora(gm, quantized='dequantize'), export that float graph with "
                "optimize=True and quantize it with export.quantize_onnx (ONNX Runtime's 4-bit MatMulNBits)")


def _forward_inputs(module: nn.Module, example_inputs) -> tuple[LoraGraphModule, tuple, dict]:
    """The graph to export and its inputs as (args, kwargs): the module's capture, its example inputs
    or the given ones bound to its signature."""
    gm = module if isinstance(module, LoraGraphModule) else lora_fx.capture(module, example_inputs)
    cap = gm.capture_info
    if example_inputs is None:
        if cap is None or cap.example_inputs is None:
            raise ExportError("export_onnx needs example_inputs for this module (a dict or tuple like a real batch)")
        example_inputs = cap.example_inputs
    elif cap is not None and not cap.positional and not isinstance(example_inputs, dict):
        example_inputs = cap.bind(tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,), {})
    if isinstance(example_inputs, dict):
        return gm, (), dict(example_inputs)
    return gm, tuple(example_inputs), {}


def _export(gm: LoraGraphModule, path: Path, args, kwargs, dynamic_shapes, names, opset, optimize,
            external_data: bool | None) -> None:
    was_training = gm.training
    gm.eval()
    # the exporter warns about torchvision ops it cannot register; nothing to do with this model
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
            program = torch.onnx.export(
                gm, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes, optimize=optimize,
                input_names=names[0], output_names=names[1], opset_version=opset, verbose=False, report=False,
            )
    except Exception as e:
        raise _explain_failure(gm, e) from e
    finally:
        gm.train(was_training)
    fusable(program.model)
    program.save(str(path), external_data=external_data)  # None: weights over 2 GB go to external data


# ------------------------------------------------------------------ rewrites for ONNX Runtime's fusions
def _rsqrt(op, x, v):  # torch.rsqrt(v) * x, as torch's exporter writes it (RMSNorm: x * rsqrt(mean(x^2) + eps))
    return op.Mul(x, op.Reciprocal(op.Sqrt(v)))


def _divide(op, x, v):  # x / sqrt(v): the form ONNX Runtime's SimplifiedLayerNormalization fusion matches
    return op.Div(x, op.Sqrt(v))


def fusable(model: ir.Model) -> int:
    """Rewrite `model` in place into the forms ONNX Runtime's graph fusions recognise; returns the
    number of rewrites. RMSNorm: torch writes x * rsqrt(v) as Mul(x, Reciprocal(Sqrt(v))), which
    ONNX Runtime does not fuse (0 of a Llama's RMSNorms); as Div(x, Sqrt(v)) it fuses each into one
    SimplifiedLayerNormalization. The same rewrite on every export (the untouched model's and the
    folded one's): they stay node for node the same."""
    rules = pattern.RewriteRuleSet([pattern.RewriteRule(_rsqrt, _divide, name="RsqrtAsDivide")], commute=True)
    return rules.apply_to_model(model)


def _explain_failure(gm: LoraGraphModule, error: Exception) -> ExportError:
    reason = "\n".join(str(error).strip().splitlines()[:8])
    cap = gm.capture_info
    name = type(cap.source).__name__ if cap and cap.source is not None else "this model"
    base_fails = True
    if lora_fx.unfolded_lora(gm) is not None and cap and cap.source is not None:
        try:  # does the untouched model export? then LoRA is to blame
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(lora_fx.capture(cap.source, cap.example_inputs), (),
                                  kwargs=cap.example_inputs, dynamo=True, optimize=False, verbose=False)
            base_fails = False
        except Exception:
            base_fails = True
    if base_fails:
        return ExportError(
            f"torch.onnx cannot export {name} even without LoRA (the untouched model's graph fails the "
            f"same way), so this is not caused by LoRA: {type(error).__name__}: {reason}\n"
            "Check torch's ONNX exporter issues for this architecture, or export a submodule."
        )
    return ExportError(
        f"ONNX export of the LoRA graph of {name} failed although the untouched model exports: "
        f"{type(error).__name__}: {reason}\nFold first (lora_fx.merge_lora) and export the folded graph."
    )
