"""LoftQ (Li et al., 2023): start LoRA beside a quantized base from the base's own quantization error.

With W the float weight and Q(.) the base's format, LoftQ alternates
    Q_t = Q(W - s·B_{t-1}·A_{t-1}),   s·B_t·A_t = the best rank-r approximation of W - deq(Q_t)
(t = 1..iterations, B_0·A_0 = 0), so deq(Q_T) + s·B·A is closer to W than deq(Q(W)) is. Q_T is a new
quantized base: it lives in the captured graph (the user's model keeps its own weights), a fold puts
the update into it, and every adapter of the graph shares it, as every adapter shares the base.

The float W comes from where the user has it (the float model, a state dict, or a safetensors file or
folder), as PEFT's `replace_lora_weights_loftq` reads it; quantizing uses torchao's own quantizer with
the base weight's blocks (`quantized.requantize`), so int8, int4 (Intx) and NF4 bases all work.

Unlike PEFT's `loftq_init`, which sets B·A = L·R whatever alpha is (so the approximation holds only at
alpha = r), the factors here carry 1/sqrt(scaling) each: scaling·B·A is the rank-r residual at any alpha.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .paths import replace_parameter
from .quantized import dequantize, format_name, is_subclass, requantize
from .report import LoftQRow
from .state import Adapter, Site, Weights

# the bits PEFT's loftq_config records per base format
BITS = {"nf4": 4, "intx": 4, "int8": 8}
# a base this far from the float weights it is said to quantize is another model's (relative Frobenius error)
MISMATCH = 0.5


@dataclass(frozen=True)
class LoftQConfig:
    """PEFT's LoftQConfig, for a base that is already quantized: `original` is where the float weights
    are (an nn.Module such as the float model, a state dict, or a safetensors file or folder);
    `iterations` is PEFT's loftq_iter (alternating re-quantisations; 1 = PEFT's default)."""

    original: Any
    iterations: int = 1


def check_loftq(init: str, loftq: LoftQConfig | None) -> LoftQConfig | None:
    """The LoftQ config `init` asks for, checked (ConfigError naming the fix), or None."""
    if init != "loftq":
        if loftq is not None:
            raise ConfigError(f"loftq=... is given but init={init!r}; pass init='loftq' to use it")
        return None
    if not isinstance(loftq, LoftQConfig):
        raise ConfigError("init='loftq' needs the float weights the base was quantized from: pass "
                          "loftq=lora_fx.LoftQConfig(original=float_model_or_state_dict_or_safetensors_path)")
    n = loftq.iterations
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise ConfigError(f"LoftQConfig.iterations must be a positive int (PEFT's loftq_iter; 1 by default), got {n!r}")
    if loftq.original is None:
        raise ConfigError("LoftQConfig.original is None: pass the float model, its state dict or a safetensors path")
    return loftq


def apply_loftq(gm: nn.Module, adapter: Adapter, sites: list[Site], config: LoftQConfig,
                factors: bool = True) -> list[LoftQRow]:
    """Put LoftQ's base weights into `gm` (a fresh capture: its modules are its own, so the model keeps
    its weights) and, with `factors`, LoftQ's lora_A / lora_B into `adapter` (float sites keep their
    plain init; without `factors`, as when loading a file trained from LoftQ's start, the adapter's
    own weights stay)."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    scalings = {s.param: adapter.scaling(s.param) for s in sites}
    bases, weights, rows = loftq_sites(params, sites, adapter.ranks, scalings, config)
    for param, q in bases.items():
        replace_parameter(gm, params[param], nn.Parameter(q, requires_grad=False))
    if factors:
        adapter.weights = {**adapter.weights, **weights}
    return rows


def original_weights(original, names: list[str]) -> dict[str, torch.Tensor]:
    """The float weights `names` from `original` (module, state dict or safetensors file / folder), each
    looked up by its name or that name without the model's first path component (a checkpoint of
    the inner model: "model.layers.0..." vs "layers.0...")."""
    if isinstance(original, nn.Module):
        found = dict(original.named_parameters(remove_duplicate=False))
        found.update(original.named_buffers(remove_duplicate=False))
        get, keys = found.get, found.keys()
    elif isinstance(original, dict):
        get, keys = original.get, original.keys()
    elif isinstance(original, (str, Path)):
        return _from_safetensors(Path(original), names)
    else:
        raise ConfigError(f"LoftQConfig.original must be an nn.Module, a state dict or a safetensors path, "
                          f"got {type(original).__name__}")
    out = {}
    for name in names:
        key = _key(name, keys)
        if key is None:
            raise ConfigError(f"LoftQConfig.original has no weight {name!r} (nor {name.partition('.')[2]!r}): "
                              "pass the float weights of this very model")
        out[name] = get(key)
    return out


def _key(name: str, keys) -> str | None:
    keys = set(keys)
    return next((k for k in (name, name.partition(".")[2]) if k and k in keys), None)


def _from_safetensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open  # an optional extra: only LoftQ from a file needs it

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"LoftQConfig.original: no safetensors file at {path}")
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            keys = handle.keys()
            for name in names:
                key = _key(name, keys)
                if name not in out and key is not None:
                    out[name] = handle.get_tensor(key)
    missing = [n for n in names if n not in out]
    if missing:
        raise ConfigError(f"LoftQConfig.original: {path} has no weight {missing[0]!r}: pass this model's float weights")
    return out


def loftq_sites(params: dict[str, torch.Tensor], sites: list[Site], ranks: dict[str, int],
                scalings: dict[str, float], config: LoftQConfig
                ) -> tuple[dict[str, torch.Tensor], Weights, list[LoftQRow]]:
    """LoftQ for every quantized site: (new quantized base weights by name, the LoRA weights, what it
    did per weight). `params`: the graph's current weights by name. Float sites are not touched
    (nothing to correct); a graph without a quantized site is refused."""
    quantized = [s for s in sites if is_subclass(params[s.param]) and format_name(params[s.param])]
    if not quantized:
        raise ConfigError(f"init='loftq' corrects the error of a quantized base, and the {len(sites)} targeted weights "
                          f"(e.g. {sites[0].param}) are float: there is nothing to correct. Quantize the base with "
                          "torchao (NF4, int4 Intx or int8 weight-only) first, or use init='kaiming' / 'gaussian'")
    floats = original_weights(config.original, [s.param for s in quantized])
    bases, weights, rows = {}, {}, []
    for site in quantized:
        q, pairs, row = loftq_weight(floats[site.param], params[site.param], site, ranks[site.param],
                                     scalings[site.param], config.iterations)
        bases[site.param], weights[site.param] = q, pairs
        rows.append(row)
    return bases, weights, rows


@torch.no_grad()
def loftq_weight(w: torch.Tensor, base: torch.Tensor, site: Site, rank: int, scaling: float, iterations: int
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], LoftQRow]:
    """One weight's LoftQ: (the new quantized base, [(lora_A, lora_B)] per row block, its row)."""
    fmt = format_name(base)
    if is_subclass(w) or not w.is_floating_point():
        raise ConfigError(f"LoftQConfig.original's {site.param} is not a float weight ({type(w).__name__}, {w.dtype}): "
                          "pass the weights the base was quantized from, unquantized")
    if tuple(w.shape) != tuple(base.shape):
        raise ConfigError(f"LoftQConfig.original's {site.param} has shape {tuple(w.shape)}, the base's is "
                          f"{tuple(base.shape)}: pass this model's float weights")
    w = site.matrix(w.detach().to(torch.float32))
    norm = torch.linalg.matrix_norm(w).item() or 1.0
    before = torch.linalg.matrix_norm(w - site.matrix(dequantize(base).float())).item() / norm
    if before > MISMATCH:
        raise ConfigError(f"{site.param}: the base differs from LoftQConfig.original's weight by {before:.0%} "
                          f"(relative); a {fmt} base of these weights differs by a few percent. Pass the float "
                          "weights this base was quantized from")
    residual = w
    for step in range(iterations):
        q = requantize(site.as_weight(residual), base)
        error = w - site.matrix(dequantize(q).float())
        factors = [_low_rank(error[b.start:b.stop], rank) for b in site.blocks]
        approx = _place(site, error, factors)
        if step + 1 < iterations:
            residual = w - approx
    after = torch.linalg.matrix_norm(error - approx).item() / norm
    root = math.sqrt(scaling)
    like = base.dtype
    pairs = [((r / root).to(like).contiguous(), (l / root).to(like).contiguous()) for l, r in factors]
    return q, pairs, LoftQRow(site.param, fmt, iterations, before, after)


def _low_rank(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [out, r], R [r, in]) with L @ R the best rank-r approximation of `m`, split by sqrt(S) as
    PEFT's `_low_rank_decomposition`."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    l, r = u[:, :rank] * root, root[:, None] * vh[:rank]
    short = rank - root.numel()  # a rank above min(out, in): the rest of the factors stays zero
    return (nn.functional.pad(l, (0, short)), nn.functional.pad(r, (0, 0, 0, short))) if short else (l, r)


def _place(site: Site, like: torch.Tensor, factors) -> torch.Tensor:
    """The blocks' L @ R in a matrix shaped as `like` (zero outside the adapted rows)."""
    out = torch.zeros_like(like)
    for block, (l, r) in zip(site.blocks, factors):
        out[block.start:block.stop] = l @ r
    return out
