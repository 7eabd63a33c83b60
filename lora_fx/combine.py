"""Adapter arithmetic: a new adapter made of weighted existing ones, as PEFT's `add_weighted_adapter`.

    combine_adapters(gm, {"a": 0.5, "b": 0.5}, name="ab", method="svd")

The methods are PEFT's combination types, computed with PEFT's own merge functions
(`peft.utils.merge_utils`), site by site in PEFT's order so that DARE's random masks are PEFT's for the
same seed:
  - on the factors ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"): lora_A and lora_B
    are each combined with weights sqrt(|w * scaling|) (the sign on A), so B @ A is *not* the weighted
    sum of the updates (PEFT: "a very rough approximation"); every adapter needs the same rank;
  - "cat": A and B stacked (rank = the sum of ranks), exactly sum_i w_i * ΔW_i;
  - on the updates ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"): the
    combined ΔW truncated to `rank` by SVD (default: the largest rank combined).
The new adapter has alpha = rank (scaling 1, as PEFT's), lives beside the others (not active until
set_adapter), and saves, loads and folds like any adapter: folding it gives the original graph.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .adapters import adapter_weights
from .attach import attach_adapter, check_adapter_name, new_adapter
from .errors import ConfigError
from .graph_module import LoraGraphModule, regions_of, require_lora
from .regions import each_region
from .state import Adapter, LoraConfig, LoraState, Site, Weights

ON_FACTORS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ON_UPDATES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ON_FACTORS + ("cat",) + ON_UPDATES


def combine_adapters(gm: LoraGraphModule, adapters: dict[str, float], name: str, method: str = "svd", *,
                     rank: int | None = None, density: float | None = None, majority_sign_method: str = "total",
                     seed: int | None = None, svd_clamp: float | None = None) -> None:
    """Add adapter `name`, the combination of `adapters` ({name: weight}; a weight may be negative)
    by `method` (PEFT's combination_type), to `gm`. rank: the SVD methods' output rank (PEFT's svd_rank);
    density: the share of values the pruning methods keep, in (0, 1]; majority_sign_method: "total" or
    "frequency" (TIES' sign election); seed: DARE's random masks (None: torch's global generator, as PEFT)."""
    graphs = [g for _, g in each_region(gm)] if regions_of(gm) is not None else [gm]
    states = [require_lora(g, "combine_adapters") for g in graphs]
    mix = _check(states[0], adapters, name, method, rank, density, majority_sign_method, svd_clamp)
    for state in states[1:]:
        state.check_names(mix, "combine_adapters")
    method = "linear" if len(mix) == 1 else method  # PEFT: one adapter can only be scaled
    ranks = [max(max(s.adapters[a].ranks.values(), default=0) for s in states) for a in mix]
    if method in ON_FACTORS and len(set(ranks)) > 1:
        raise ConfigError(f"method {method!r} combines lora_A and lora_B entry by entry, so every adapter needs the same "
                          f"rank (PEFT's rule); {dict(zip(mix, ranks))} differ. Use method='cat' or 'svd'")
    new_rank = sum(ranks) if method == "cat" else (rank or max(ranks)) if method in ON_UPDATES else ranks[0]
    merge = _merge_utils()
    generator = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    plans = []
    with generator:
        if seed is not None:
            torch.manual_seed(seed)
        for graph, state in zip(graphs, states):
            plans.append((graph, *_combined(graph, state, mix, name, method, new_rank, density,
                                            majority_sign_method, svd_clamp, merge)))
    for graph, sites, adapter in plans:
        if sites:
            attach_adapter(graph, sites, adapter)


def _check(state: LoraState, adapters, name, method, rank, density, majority, clamp) -> dict[str, float]:
    check_adapter_name(name)
    if name in state.adapters:
        raise ConfigError(f"adapter {name!r} exists; delete_adapter it first or choose another name")
    if not isinstance(adapters, dict) or not adapters or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in adapters.values()):
        raise ConfigError(f"adapters must map adapter names to finite weights, e.g. {{'a': 0.5, 'b': 0.5}}, got {adapters!r}")
    state.check_names(adapters, "combine_adapters")
    if method not in METHODS:
        raise ConfigError(f"method must be one of PEFT's combination types {list(METHODS)}, got {method!r}")
    for a in adapters:
        config = state.adapters[a].config
        if config.use_dora or config.lora_bias:
            raise ConfigError(f"adapter {a!r} is a {'DoRA' if config.use_dora else 'lora_bias'} adapter: its "
                              f"{'magnitude' if config.use_dora else 'bias'} does not combine as LoRA's factors do; "
                              "combine plain LoRA adapters")
    prunes = method not in ("linear", "cat", "svd")
    if prunes and (density is None or isinstance(density, bool) or not isinstance(density, (int, float))
                   or not 0 < density <= 1):
        raise ConfigError(f"method {method!r} prunes: density (the share of values kept) must be in (0, 1], got {density!r}")
    if majority not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {majority!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive int (the SVD methods' output rank), got {rank!r}")
    if clamp is not None and not (isinstance(clamp, (int, float)) and 0 < clamp <= 1):
        raise ConfigError(f"svd_clamp must be a quantile in (0, 1], got {clamp!r}")
    return {a: float(w) for a, w in adapters.items()}


def _merge_utils():
    try:
        from peft.utils import merge_utils  # PEFT's own TIES / DARE / magnitude functions: the same numbers
    except ImportError:
        raise ImportError("combine_adapters uses PEFT's merge functions (TIES, DARE, magnitude pruning): "
                          "pip install peft") from None
    return merge_utils


def _combined(gm: LoraGraphModule, state: LoraState, mix: dict[str, float], name: str, method: str, rank: int,
              density, majority, clamp, merge) -> tuple[list[Site], Adapter | None]:
    """(the sites, the new adapter) of one graph; no sites where none of `mix` adapts anything here."""
    weights = {a: adapter_weights(gm, a) for a in mix}
    sites = [s for p, s in state.sites.items() if any(p in weights[a] for a in mix)]  # PEFT's module order
    if not sites:
        return [], None
    bad = [s.param for s in sites if s.kind == "experts" or s.file_param]
    if bad:
        raise ConfigError(f"{bad[0]} is adapted by parameter (PEFT's target_parameters): PEFT's add_weighted_adapter "
                          "refuses those, and so does combine_adapters")
    out: Weights = {}
    for site in sites:
        present = [(a, w) for a, w in mix.items() if site.param in weights[a]]
        out[site.param] = [
            _block(site, b, [(weights[a][site.param][b], w, state.adapters[a].scaling(site.param)) for a, w in present],
                   method, rank, density, majority, clamp, merge)
            for b in range(len(site.blocks))]
    first = state.adapters[next(iter(mix))].config
    config = LoraConfig(first.targets, rank, float(rank), first.dropout, first.init, first.trainable,
                        target_parameters=first.target_parameters, selection=dict(first.selection))
    ranks = {s.param: rank for s in sites}
    return sites, new_adapter(gm, name, config, sites, weights=out, ranks=ranks, alphas={p: float(rank) for p in ranks})


def _block(site: Site, index: int, parts: list[tuple[tuple[torch.Tensor, torch.Tensor], float, float]], method: str,
           rank: int, density, majority, clamp, merge) -> tuple[torch.Tensor, torch.Tensor]:
    """One row block's combined (lora_A, lora_B); `parts`: ((A, B), weight, scaling) per adapter,
    each combined as PEFT combines it (the scaling inside the factor weights, or inside ΔW)."""
    (a0, b0), _, _ = parts[0]
    rows = site.blocks[index].stop - site.blocks[index].start
    if method == "cat":
        a = torch.cat([a * (w * s) for (a, _), w, s in parts], 0)
        b = torch.cat([b for (_, b), _, _ in parts], 1)
        return _pad(a, 0, rank), _pad(b, 1, rank)
    if method in ON_FACTORS:
        if len({tuple(a.shape) for (a, _), _, _ in parts}) > 1:
            raise ConfigError(f"{site.param}: the adapters have other ranks here (rank_pattern); method {method!r} "
                              "combines factors entry by entry: use method='cat' or 'svd'")
        scaled = [w * s for _, w, s in parts]
        wa = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in scaled])  # the sign on A only
        wb = torch.tensor([math.sqrt(abs(x)) for x in scaled])
        a = _factor_merge(method, [a for (a, _), _, _ in parts], wa, density, majority, merge)
        b = _factor_merge(method, [b for (_, b), _, _ in parts], wb, density, majority, merge)
        return a.to(a0.dtype), b.to(b0.dtype)
    deltas = []
    for (a, b), _, s in parts:  # scaling * B @ A, PEFT's get_delta_weight
        a, b = site.as_matrix(a.float(), b.float())
        deltas.append(s * (b @ a))
    delta = _update_merge(method, deltas, torch.tensor([w for _, w, _ in parts]), density, majority, merge)
    u, sv, vh = torch.linalg.svd(delta, full_matrices=True)  # PEFT's default (svd_full_matrices=True)
    u, vh = u[:, :rank] * sv[:rank], vh[:rank]
    if clamp is not None:  # PEFT's: both factors clamped to the quantile of their joint values
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    u, vh = _pad(u, 1, rank), _pad(vh, 0, rank)  # a rank above min(out, in): zeros
    return vh.reshape(site.a_shape(rank)).to(a0.dtype), u.reshape(site.b_shape(rows, rank)).to(b0.dtype)


def _factor_merge(method, tensors, weights, density, majority, merge) -> torch.Tensor:
    if method == "linear":
        return merge.task_arithmetic(tensors, weights)
    if method == "ties":
        return merge.ties(tensors, weights, density, majority)
    if method == "dare_linear":
        return merge.dare_linear(tensors, weights, density)
    if method == "dare_ties":
        return merge.dare_ties(tensors, weights, density, majority)
    return merge.magnitude_prune(tensors, weights, density)


def _update_merge(method, deltas, weights, density, majority, merge) -> torch.Tensor:
    return merge.task_arithmetic(deltas, weights) if method == "svd" else _factor_merge(
        method.removesuffix("_svd"), deltas, weights, density, majority, merge)


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    short = size - t.shape[dim]
    if short <= 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [0, short]
    return torch.nn.functional.pad(t, pad)
