"""PEFT's data-free initialisations that start LoRA from the base weight itself.

PiSSA (Meng et al., 2024) and OLoRA (Büyükakyüz, 2024) put the principal part of W0 into the
adapter and train beside the *residual*: scaling * B0 @ A0 is the top-r SVD (PiSSA) or the first r
columns of W0's QR (OLoRA), and the base becomes W_res = W0 - scaling * B0 @ A0, so the output at init
is the pretrained one. The residual lives in the captured graph; the user's model keeps W0; the fold
gives W_res + scaling * B @ A = W0 + ΔW in the original graph. A0 and B0 are kept on the adapter so a
save can offer PEFT's conversion to a plain LoRA on the untouched W0 (rank 2r: [A; A0], [B, -B0]).

"orthogonal" (PEFT's) leaves the base alone: A and B random with orthogonal row sets, so B @ A = 0.
The formulas are PEFT's (`LoraLayer.pissa_init`, `olora_init`, `orthogonal_init`).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .errors import ConfigError
from .paths import replace_parameter
from .quantized import dequantize, format_name, is_subclass, requantize
from .state import Adapter, Site, Weights

RESIDUAL = re.compile(r"pissa(_niter_(?P<niter>\d+))?|olora")  # the inits that change the base


def is_residual(init: str) -> bool:
    return isinstance(init, str) and RESIDUAL.fullmatch(init) is not None


def apply_residual_init(gm: nn.Module, adapter: Adapter, sites: list[Site], init: str, factors: bool = True) -> None:
    """PiSSA / OLoRA: the residual base weights into `gm` (a fresh capture, its modules its own: the
    model keeps W0), A0 / B0 into `adapter` (its weights, and `initial` for the conversion). Without
    `factors` (loading a file trained from that start) the adapter keeps its own weights."""
    bad = [s for s in sites if s.kind != "linear" or s.by_parameter]
    if bad:
        raise ConfigError(f"init={init!r} starts from a linear layer's own weight; {bad[0].param} is a {bad[0].kind} "
                          "weight: target linear layers only, or use init='kaiming'")
    weights: Weights = {}
    for site in sites:
        base = gm.get_parameter(site.param)
        fmt = format_name(base) if is_subclass(base) else ""
        if fmt and init != "olora":  # PEFT's rule: PiSSA under a float weight, then quantize the residual
            raise ConfigError(f"{site.param} is quantized ({fmt}): initialize PiSSA under float32, float16 or bfloat16 "
                              "(PEFT's rule), then quantize the residual model; OLoRA (init='olora') re-quantizes the "
                              "residual itself")
        w0 = site.matrix((dequantize(base) if fmt else base.detach()).to(torch.float32))
        scaling, rank = adapter.scaling(site.param), adapter.ranks[site.param]
        pairs, residual = [], w0.clone()
        for block in site.blocks:
            a, b = _principal(w0[block.start:block.stop], rank, scaling, init)
            residual[block.start:block.stop] -= scaling * (b @ a)
            pairs.append((a.to(base.dtype).contiguous(), b.to(base.dtype).contiguous()))
        weights[site.param] = pairs
        value = site.as_weight(residual)
        new = requantize(value, base) if fmt else value.to(base.dtype)
        replace_parameter(gm, base, nn.Parameter(new, requires_grad=False))
    if factors:
        adapter.weights = {**adapter.weights, **weights}
    adapter.initial = {p: [(a.clone(), b.clone()) for a, b in pairs] for p, pairs in weights.items()}


def _principal(w: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) for rows `w` [out, in] of a weight, PEFT's formulas."""
    if init == "olora":
        q, r = torch.linalg.qr(w)
        return r[:rank], q[:, :rank]
    niter = RESIDUAL.fullmatch(init)["niter"]
    if niter is None:
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        v, s, uh = v[:, :rank], s[:rank], uh[:rank]
    else:  # PEFT's fast PiSSA: a randomized SVD with `niter` subspace iterations
        v, s, u = torch.svd_lowrank(w, rank, niter=int(niter))
        uh = u.t()
    root = (s / scaling).sqrt()
    return root[:, None] * uh, v * root


def orthogonal_weights(site: Site, rank: int, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's "orthogonal" init per row block: A from the odd rows, B from the even rows of one random
    orthogonal matrix, so B @ A = 0 though neither is zero."""
    if rank % 2:
        raise ConfigError(f"init='orthogonal' needs an even rank (PEFT's rule), got rank {rank} for {site.owner}")
    if site.kind != "linear":
        raise ConfigError(f"init='orthogonal' is for linear layers; {site.param} is a {site.kind} weight")
    out = []
    for block in site.blocks:
        q, _ = torch.linalg.qr(torch.randn(rank, rank))
        a = torch.randn(site.in_features, rank // 2).mm(q[0::2]).T / 10.0
        b = torch.randn(rank // 2, block.stop - block.start).T.mm(q[1::2]) / 10.0
        out.append((a.contiguous().to(like.device, like.dtype), b.contiguous().to(like.device, like.dtype)))
    return out
