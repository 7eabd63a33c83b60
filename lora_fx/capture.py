"""Capture: the untouched model as an fx graph, through torch.export (non-strict).

`torch.fx.symbolic_trace` cannot trace Hugging Face models (their `forward(**kwargs)`), so capture
builds on torch.export, with every input dim left to `Dim.AUTO` so batch and sequence stay dynamic.
`recapture` captures the same model again for other inputs, or at another dtype or device, over an
existing graph's weights. `capture_decoder` captures a causal LM as one decoding step with its KV
cache as plain tensors (what generation and the ONNX kv-cache export run).
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import types
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from . import modes
from .errors import CaptureError, InputsError
from .graph_module import CaptureInfo, LoraGraphModule
from .paths import copy_non_persistent, set_buffer, set_parameter
from .quantized import untraceable_weight

# Example sizes: >= 2 so torch.export does not specialize a dim to 0 or 1, and distinct so two dims
# are never assumed equal.
BATCH, SEQ, DECODER_SEQ = 2, 7, 5
# what a capture is of: the model's forward, or one decoding step with a KV cache (capture_decoder)
FORWARD, DECODER = "forward", "decoder"


def capture(model: nn.Module, example_inputs: Any = None) -> LoraGraphModule:
    """The untouched `model` as a `torch.fx.GraphModule`, in eval mode.

    `example_inputs` is a tuple (positional) or a dict (keyword); for a transformers
    `PreTrainedModel` it may be None, and inputs are built from its config. The graph runs at other
    batch sizes and sequence lengths, keeps the model's call signature and output type, and obeys
    `train()` / `eval()`. Parameters are the model's own objects (nothing is copied).
    """
    if not isinstance(model, nn.Module):
        raise InputsError(f"capture needs an nn.Module, got {type(model).__name__}")
    why = untraceable_weight(model)
    if why is not None:
        raise CaptureError(why)
    signature, inputs, positional = bind_example_inputs(model, example_inputs)
    return _capture(model, signature, inputs, positional, weights=None)


def capture_decoder(model: nn.Module) -> LoraGraphModule:
    """A causal LM as one decoding step: `(input_ids, attention_mask, position_ids, past_key_values)
    -> (logits, present)`, the cache a tuple of (key, value) per layer, each [batch, kv_heads, length,
    head_dim]; batch, new and past lengths dynamic (past may be empty: the prompt's step). Parameters
    are the model's own objects; the model is left as it was."""
    check_decoder(model)
    return _capture(model, _DECODER_SIGNATURE, decoder_example(model), False, weights=None, kind=DECODER)


def recapture(primary: LoraGraphModule, inputs, kind: str | None = None,
              overrides: dict[str, nn.Parameter] | None = None) -> LoraGraphModule:
    """`primary`'s source model captured again for `inputs` (a dict, or a tuple for a positional
    capture; None: example inputs of `kind`), as a forward or, with kind "decoder", as a decoding
    step, traced with `primary`'s own weights (so at their dtype and device) and sharing them:
    parameters and buffers are the primary's objects, or those in `overrides` (by name; a fold's
    new weights); weights only these inputs use are frozen."""
    cap = primary.capture_info
    source = cap.source
    kind = kind or cap.kind
    own = {**dict(primary.named_parameters(remove_duplicate=False)), **dict(primary.named_buffers(remove_duplicate=False)),
           **(overrides or {})}
    weights = tracing_weights(source, own)
    if kind == DECODER:
        check_decoder(source)
        new = _capture(source, _DECODER_SIGNATURE, inputs or decoder_example(source, weights), False, weights, kind)
    else:
        new = _capture(source, cap.signature, inputs if inputs is not None else cap.example_inputs, cap.positional,
                       weights)
    for name, p in list(new.named_parameters(remove_duplicate=False)):
        shared = own.get(name)
        set_parameter(new, name, shared if isinstance(shared, nn.Parameter) else nn.Parameter(p.detach(), requires_grad=False))
    for name, _ in list(new.named_buffers(remove_duplicate=False)):
        if name in own:
            set_buffer(new, name, own[name])
    new.capture_info = replace(new.capture_info, recapture=cap.recapture)
    new.train(primary.training)
    return new


def tracing_weights(source: nn.Module, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `own` (a graph's, by name) to trace `source` with. Tensor subclasses (an FSDP2
    shard, a quantized weight) cannot be traced through: the source's own tensor is traced there,
    which a released source (`LoraGraphModule.release_source`) no longer has."""
    weights, missing = {}, []
    for name, t in (*source.named_parameters(remove_duplicate=False), *source.named_buffers(remove_duplicate=False)):
        mine = own.get(name)
        if mine is not None and type(mine) in (nn.Parameter, torch.Tensor):
            weights[name] = mine
        elif t.device.type == "meta":
            missing.append((name, type(mine).__name__))
    if missing:
        name, kind = missing[0]
        raise CaptureError(
            f"capturing this model again needs whole weights, but {name} is a {kind} (sharded by FSDP2?) and the "
            "model's own copy was released (lora_fx.unflatten releases it). Capture the graphs you need before "
            "sharding, or save the adapter and load it into the model on one process")
    return weights


def _capture(model: nn.Module, signature, inputs, positional: bool, weights: dict | None,
             kind: str = FORWARD) -> LoraGraphModule:
    gm = _export(model, inputs, positional, training=False, weights=weights, kind=kind)
    notes = []
    train_probs = None
    sites = modes.dropout_sites(gm.graph)
    # a decoding step only generates (eval); a second, train-mode capture only where attention hides its dropout
    if sites and kind == FORWARD and modes.has_dropout(model) and modes.hidden_attention_dropout(model, gm.graph):
        try:
            train_sites = modes.dropout_sites(_export(model, inputs, positional, training=True, weights=weights).graph)
        except CaptureError as e:
            train_sites = None
            notes.append(f"train-mode capture failed, attention dropout is off in training: {e}")
        if train_sites is not None:
            if [n.target for n in train_sites] == [n.target for n in sites]:
                train_probs = [modes.dropout_p(n) for n in train_sites]
            else:
                notes.append("train-mode graph differs from the eval graph; attention dropout is off in training")
    if kind == FORWARD and caching_configs(model):
        notes.append("the KV cache is off in this capture (use_cache=False): past_key_values is not among its outputs; "
                     "generate() captures a decoding step with its cache")
    replaced = modes.make_mode_aware(gm, train_probs)
    if replaced:
        notes.append(f"{replaced} dropout sites follow train()/eval()")
    out = LoraGraphModule(gm, gm.graph)
    copy_non_persistent(model, out)
    out.capture_info = CaptureInfo(
        source=model,
        signature=signature,
        input_names=() if positional else tuple(inputs),
        positional=positional,
        example_inputs=inputs,
        notes=notes,
        recapture=recapture,
        kind=kind,
        fixed_shapes=fixed_shapes(inputs, positional) if kind == FORWARD else {},
    )
    out.eval()
    return out


def bind_example_inputs(model: nn.Module, example_inputs: Any):
    """Check example inputs against `model.forward` and name them.

    Returns (signature, inputs, positional): inputs is a dict of name -> value (cloned, so views of
    a bigger batch carry no `_base` for torch.export to guard on), or a tuple when the forward takes
    `*args`.
    """
    forward = model.forward
    signature = inspect.signature(forward)
    params = signature.parameters
    declared = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if example_inputs is None:
        example_inputs = inputs_from_config(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        unknown = [k for k in example_inputs if k not in declared]
        if unknown:
            hints = {k: difflib.get_close_matches(k, declared, n=1) for k in unknown}
            hint = "; ".join(f"{k!r}: did you mean {v[0]!r}?" for k, v in hints.items() if v)
            raise InputsError(
                f"{type(model).__name__}.forward declares no input named {unknown} (it declares "
                f"{declared}){'; ' + hint if hint else ''}. Pass only declared inputs."
            )
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise InputsError(
            f"example_inputs must be a tuple (positional), a dict (keyword) or a tensor, "
            f"got {type(example_inputs).__name__}"
        )
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise InputsError(
            f"example inputs do not fit {type(model).__name__}.forward{signature}: {e}. "
            f"It declares {declared}."
        ) from None
    clone = lambda t: t.detach().clone()  # noqa: E731
    var_positional = [n for n, p in params.items() if p.kind is p.VAR_POSITIONAL]
    if var_positional and bound.arguments.get(var_positional[0]):
        return signature, pytree.tree_map_only(torch.Tensor, clone, tuple(args)), True
    inputs = {n: v for n, v in bound.arguments.items() if not (v is None and params[n].default is None)}
    return signature, pytree.tree_map_only(torch.Tensor, clone, inputs), False


def inputs_from_config(model: nn.Module) -> dict[str, torch.Tensor]:
    """Example inputs for a transformers model, built from its config."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        raise InputsError(
            f"capturing a {type(model).__name__} needs example inputs: pass example_inputs=(x,) or "
            f"example_inputs={{'name': tensor}} with a real batch (sizes >= 2)"
        )
    params = inspect.signature(model.forward).parameters
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)  # leave the user's RNG stream alone
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 2)

    def tokens(seq):
        return torch.randint(0, max(int(vocab), 2), (BATCH, seq), generator=gen).to(device)

    if main == "input_ids":
        inputs = {"input_ids": tokens(SEQ)}
        if "attention_mask" in params:
            inputs["attention_mask"] = torch.ones(BATCH, SEQ, dtype=torch.long, device=device)
    elif main == "pixel_values":
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        chans = getattr(config, "num_channels", 3)
        inputs = {"pixel_values": torch.randn(BATCH, chans, h, w, generator=gen).to(device, dtype)}
    elif main == "input_features" and hasattr(config, "num_mel_bins"):
        frames = 2 * getattr(config, "max_source_positions", 1500)
        inputs = {"input_features": torch.randn(BATCH, config.num_mel_bins, frames, generator=gen).to(device, dtype)}
    else:
        raise InputsError(
            f"cannot build example inputs for {type(model).__name__} (main input {main!r}): pass "
            f"example_inputs={{{main!r}: tensor}} with a real batch (sizes >= 2)"
        )
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = tokens(DECODER_SEQ)
    return inputs


def caching_configs(model: nn.Module) -> list:
    """The configs (every submodule's: T5's decoder stack has its own) whose KV cache capture turns
    off: a returned Cache object cannot be exported. A recurrent state of plain tensors (RWKV's
    `state`) is an output like any other, and stays."""
    if "state" in inspect.signature(type(model).forward).parameters:
        return []
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    return [c for c in configs.values() if getattr(c, "use_cache", None)]


@contextlib.contextmanager
def capture_state(model: nn.Module, training: bool):
    """Put the model in the mode to capture, with no KV cache and no fused MHA fast path; restore
    every module's own mode and the config afterwards."""
    modes_before = [(m, m.training) for m in model.modules()]
    # every config a submodule reads (T5's decoder stack has its own copy)
    caching = caching_configs(model)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.train(training)
        for c in caching:  # a returned KV cache cannot be exported; the graph computes none
            c.use_cache = False
        torch.backends.mha.set_fastpath_enabled(False)  # keep MHA's in_proj as a visible linear
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for c in caching:
            c.use_cache = True
        for m, mode in modes_before:
            m.training = mode


def bind_call(module: nn.Module, args: tuple, kwargs: dict):
    """A recorded call of `module` (`args`, `kwargs`) named as its forward names them: (signature,
    inputs, positional), as `bind_example_inputs` returns them (tensors cloned)."""
    if not kwargs:
        return bind_example_inputs(module, tuple(args))
    signature = inspect.signature(module.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise InputsError(f"a recorded call does not fit {type(module).__name__}.forward{signature}: {e}") from None
    params = signature.parameters
    if any(params[n].kind in (params[n].VAR_POSITIONAL, params[n].VAR_KEYWORD) for n in bound.arguments):
        raise InputsError(f"{type(module).__name__}.forward takes *args / **kwargs; capture it with positional inputs")
    inputs = {n: v for n, v in bound.arguments.items() if not (v is None and params[n].default is None)}
    return signature, pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), inputs), False


def capture_call(module: nn.Module, args: tuple, kwargs: dict) -> LoraGraphModule:
    """`module` (a submodule of a model, say) captured on one recorded call of it, as `capture` does."""
    signature, inputs, positional = bind_call(module, args, kwargs)
    return _capture(module, signature, inputs, positional, weights=None)


def fixed_size(v) -> bool:
    """A batch of images, videos or latents (a floating tensor of 4 dims or more): captured at its
    size, with only the batch dynamic. A symbolic height and width make windowed vision models take
    minutes to trace (Swin: 777 s with every dim dynamic, 4 s with the batch only); another size
    captures the model again (`LoraGraphModule` does it on the call)."""
    return isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 4


def auto_dims(inputs):
    """torch.export dynamic_shapes for `inputs`: every dim of every tensor Dim.AUTO (export keeps it
    dynamic unless the model pins it, as a conv's channels), but only the batch of an image batch
    (`fixed_size`)."""
    def dims(v):
        if not isinstance(v, torch.Tensor):
            return None
        return {0: Dim.AUTO} if fixed_size(v) else {d: Dim.AUTO for d in range(v.dim())}

    return pytree.tree_map(dims, inputs, is_leaf=lambda v: v is None)


def fixed_shapes(inputs, positional: bool) -> dict[str, tuple[int, ...]]:
    """The sizes (all but the batch) a capture fixed, by input name (or position)."""
    items = enumerate(inputs) if positional else inputs.items()
    return {str(k): tuple(v.shape[1:]) for k, v in items if fixed_size(v)}


def _export(model: nn.Module, inputs, positional: bool, training: bool, weights: dict | None,
            kind: str = FORWARD) -> torch.fx.GraphModule:
    ep = export_program(model, inputs, positional, training, weights, kind)
    return ep.module(check_guards=False)  # no _guards_fn node: the graph is the model's compute only


def without_fake_tensor_cache():
    """torch.export with its fake-tensor cache off. With dynamic sizes a cache hit rebuilds its output
    with `set_` under symbolic shapes, which costs more than running the op again: measured at 2 layers /
    hidden 64, qwen3_5's inject 31 -> 21 s, olmo_hybrid 28 -> 15 s, llama 3.2 -> 2.1 s (none slower)."""
    return torch._dynamo.config.patch(fake_tensor_cache_enabled=False)


def export_program(model: nn.Module, inputs, positional: bool, training: bool = False, weights: dict | None = None,
                   kind: str = FORWARD) -> torch.export.ExportedProgram:
    """torch.export's program of `model` on `inputs` (every dim Dim.AUTO), traced with `weights`
    swapped in where given; a CaptureError that says what to try where export fails."""
    args, kwargs = (inputs, {}) if positional else ((), inputs)
    dynamic = decoder_dims(inputs) if kind == DECODER else auto_dims(args if positional else kwargs)
    # tracing with other weights (another graph's, maybe at another dtype or device) leaves the
    # model's own untouched: they are swapped in for the trace only
    swap = _reparametrize_module(model, weights) if weights else contextlib.nullcontext()
    step = _as_decoder(model) if kind == DECODER else contextlib.nullcontext()
    try:
        with capture_state(model, training), swap, step, without_fake_tensor_cache():
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # torch raises many types here; all mean "could not capture"
        reason = "\n".join(str(e).strip().splitlines()[:12])
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} "
            f"({'train' if training else 'eval'} mode): {type(e).__name__}: {reason}\n"
            "What to try: make the example inputs look like a real batch (sizes >= 2); replace "
            "Python control flow on tensor values with torch.where or torch.cond; or capture a "
            "submodule that has no such flow. Your model was not changed."
        ) from e
    return ep


# ------------------------------------------------------------------------------------------ decoders


def _decoder_forward(self, input_ids, attention_mask, position_ids=None, past_key_values=()):
    """One decoding step of a causal LM (installed as the model's forward while it is traced)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer  # optional: only causal LMs get here

    cache = DynamicCache()
    cache.layers = []
    for key, value in past_key_values:  # the cache as given: no concatenation with an empty start
        layer = DynamicLayer()
        layer.lazy_initialization(key, value)
        layer.keys, layer.values = key, value
        cache.layers.append(layer)
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    out = type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                             **{_cache_argument(self): cache}, **kwargs)
    grown = out.cache if hasattr(out, "cache") else out.past_key_values
    return out.logits, tuple((layer.keys, layer.values) for layer in grown.layers)


_DECODER_SIGNATURE = inspect.signature(_decoder_forward).replace(
    parameters=list(inspect.signature(_decoder_forward).parameters.values())[1:])


def _cache_argument(model: nn.Module) -> str | None:
    """The forward's KV-cache argument: `cache` (transformers >= 5.24), `past_key_values`, or None."""
    params = inspect.signature(type(model).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def check_decoder(model: nn.Module) -> None:
    """Refuse, with the reason, a model that cannot run as a decoding step with a KV cache."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if _cache_argument(model) is None or head is None:
        raise InputsError(
            f"{type(model).__name__} has no KV cache to capture (its forward takes no `cache` / "
            "`past_key_values`): a kv-cache decoder needs a causal LM (a transformers *ForCausalLM)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise InputsError(
            f"{type(model).__name__} is an encoder-decoder model; lora-fx captures decoder-only causal LMs "
            "with a KV cache (export the encoder and the decoder yourself, or use the full forward)"
        )


def _takes_position_ids(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(type(model).forward).parameters


def decoder_example(model: nn.Module, weights: dict | None = None) -> dict[str, Any]:
    """Example inputs of a decoding step: batch 2, 4 new tokens after a cache of 3 (sizes >= 2 and
    distinct, so export keeps them dynamic), the cache's heads, sizes and dtype read off one small
    forward of the model (with `weights` swapped in, as the trace will have them)."""
    param = next(iter(weights.values()), None) if weights else next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2) or 2
    gen = torch.Generator().manual_seed(0)
    probe_ids = torch.randint(0, vocab, (BATCH, 2), generator=gen).to(device)
    swap = _reparametrize_module(model, weights) if weights else contextlib.nullcontext()
    with torch.no_grad(), capture_state(model, training=False), swap:
        if device.type == "meta":
            raise InputsError("capturing a decoder needs real weights to size its cache, not meta tensors")
        out = model(input_ids=probe_ids, use_cache=True)
    grown = getattr(out, "cache", None) if hasattr(out, "cache") else getattr(out, "past_key_values", None)
    if grown is None or not getattr(grown, "layers", None):
        raise InputsError(f"{type(model).__name__} returns no KV cache with use_cache=True (an encoder, or a decoder "
                          "class not configured as one, e.g. is_decoder=False): a kv-cache export needs a causal LM")
    past_len, new_len = 3, 4
    past = tuple(
        (torch.randn(BATCH, k.shape[1], past_len, k.shape[3], generator=gen).to(device, k.dtype),
         torch.randn(BATCH, v.shape[1], past_len, v.shape[3], generator=gen).to(device, v.dtype))
        for k, v in ((layer.keys, layer.values) for layer in grown.layers)
    )
    inputs = {"input_ids": torch.randint(0, vocab, (BATCH, new_len), generator=gen).to(device),
              "attention_mask": torch.ones(BATCH, past_len + new_len, dtype=torch.long, device=device)}
    if _takes_position_ids(model):
        inputs["position_ids"] = torch.arange(past_len, past_len + new_len, device=device).expand(BATCH, new_len).clone()
    inputs["past_key_values"] = past
    return inputs


def decoder_dims(inputs: dict[str, Any]) -> dict[str, Any]:
    """Dynamic dims of a decoding step: batch and length of the token inputs, batch and past length
    of the cache; heads and head size stay fixed (consumers of the ONNX file size the cache from them)."""
    dims = {name: {0: Dim.AUTO, 1: Dim.AUTO} for name in inputs if name != "past_key_values"}
    dims["past_key_values"] = tuple(({0: Dim.AUTO, 2: Dim.AUTO}, {0: Dim.AUTO, 2: Dim.AUTO})
                                    for _ in inputs["past_key_values"])
    return dims


@contextlib.contextmanager
def _as_decoder(model: nn.Module):
    """Install the decoding step as `model.forward` for one trace; the model's own forward is back after."""
    had = "forward" in model.__dict__
    before = model.__dict__.get("forward")
    model.forward = types.MethodType(_decoder_forward, model)
    try:
        yield
    finally:
        if had:
            model.forward = before
        else:
            del model.forward
