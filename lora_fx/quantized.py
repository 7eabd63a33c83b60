"""Quantized bases: which quantized weights LoRA can sit beside, and how a fold puts an update into them.

torch.export traces a torchao weight into its dequantize chain inside the nn.Linear's forward
(int4 and NF4: `linear(x, dequantize(Wq))`; int8 weight-only: a product with the int8 matrix, then the
scale multiply). LoRA goes on the activation beside that whole chain, as QLoRA does, so the base stays
quantized in memory and is never copied. Folding into a quantized weight loses what the format cannot
hold, so it is a choice: "dequantize" (a float copy, exact), "requantize" (the same format again; what
survives is measured) or "refuse" (the default).

torchao is optional and takes a second to import: nothing here imports it at module level. A
weight's own class provides dequantize / from_hp; only the int8 granularity needs torchao itself,
which is loaded by then (the weight is one of its tensors).
"""
from __future__ import annotations

import inspect

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# torchao weight classes LoRA can sit beside -> the format name lora-fx reports
FORMATS = {"Int8Tensor": "int8", "IntxUnpackedToInt8Tensor": "intx", "NF4Tensor": "nf4"}
# what merge_lora may do with a quantized weight (fold.merge_lora's `quantized`)
FOLD_CHOICES = ("refuse", "dequantize", "requantize")


def _tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor a Parameter wraps (a quantized weight's own class), or `p`."""
    return p.data if isinstance(p, torch.nn.Parameter) else p


def is_subclass(p: torch.Tensor) -> bool:
    """A tensor subclass (a quantized weight, a DTensor shard, ...), not a plain tensor."""
    return is_traceable_wrapper_subclass(p) or type(p.data) not in (torch.Tensor, torch.nn.Parameter)


def format_name(p: torch.Tensor) -> str:
    """The quantization format of a torchao weight lora-fx adapts ("int8", "intx", "nf4"), else ""."""
    cls = type(_tensor(p))
    return FORMATS.get(cls.__name__, "") if cls.__module__.startswith("torchao.") else ""


def _bitsandbytes(p: torch.Tensor) -> str | None:
    # Params4bit / Int8Params are Parameter subclasses over a plain uint8 / int8 tensor: not tensor
    # subclasses, so they are recognised by their class
    cls = next((c for c in (type(p), type(_tensor(p))) if c.__module__.startswith("bitsandbytes")), None)
    if cls is None:
        return None
    return (f"is a bitsandbytes weight ({cls.__name__}); torch.export cannot trace bitsandbytes' kernels. "
            "Quantize the base with torchao instead (int8 weight-only, int4 Intx or NF4; see the README)")


def refusal(p: torch.Tensor) -> str | None:
    """Why LoRA cannot sit beside weight `p` (a quantized weight of a kind lora-fx does not know), or
    None when it can (a plain or a supported quantized weight)."""
    why = _bitsandbytes(p)
    if why is not None or not is_subclass(p):
        return why
    t = _tensor(p)
    cls = type(t)
    name = format_name(t)
    if not name:
        return (f"is a tensor subclass ({cls.__name__}: a quantized weight?) lora-fx does not know; LoRA sits "
                "beside torchao's int8 weight-only, int4 (Intx) and NF4 weights. Load the base model unquantized "
                "(e.g. in bfloat16) or quantize it with one of those formats")
    if getattr(t, "act_quant_kwargs", None) is not None or getattr(t, "activation_quantization", None) is not None:
        return (f"is a torchao {cls.__name__} with dynamic activation quantization; its forward rounds the activation, so "
                "no gradient reaches the layers below. Quantize weights only (Int8WeightOnlyConfig, "
                "IntxWeightOnlyConfig) to train LoRA")
    return None


def untraceable_weight(model: torch.nn.Module) -> str | None:
    """The first weight of `model` no capture can trace (bitsandbytes'), named with the reason; else None."""
    for name, p in model.named_parameters():
        why = _bitsandbytes(p)
        if why is not None:
            return f"{name} {why}"
    return None


def dequantize(p: torch.Tensor) -> torch.Tensor:
    """The float weight a torchao weight stands for, in its logical dtype."""
    t = _tensor(p)
    if format_name(t) == "nf4":
        return t.get_original_weight().to(t.dtype)
    return t.dequantize().to(t.dtype)


def requantize(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Float weight `w` quantized in `like`'s format, with `like`'s blocks and mapping (torchao's own
    quantizers, so the result is what torchao would have made of `w`)."""
    t = _tensor(like)
    cls, name = type(t), format_name(t)
    w = w.to(t.dtype)
    if name == "nf4":
        return cls.from_tensor(w, t.block_size, t.scaler_block_size)
    mapping = inspect.signature(cls.from_hp).parameters["mapping_type"].default
    symmetric = t.zero_point is None or not bool(t.zero_point.any())
    mapping = mapping if symmetric else type(mapping).ASYMMETRIC
    if name == "intx":
        return cls.from_hp(w, tuple(t.block_size), t.target_dtype, mapping_type=mapping)
    if name == "int8":
        from torchao.quantization.granularity import PerBlock  # loaded already: `like` is a torchao tensor

        return cls.from_hp(w, PerBlock(tuple(t.block_size)), mapping_type=mapping)
    raise ValueError(f"no requantizer for {cls.__name__}")
