"""Several adapters in one graph.

The graph holds one LoRA *slot* per adapted weight: lora_A / lora_B parameters with R rank rows and a
per-row `scale` buffer (alpha / rank of the adapter owning the row, 0 for unused rows). Adapters live
outside the graph as plain tensors; activating one (or several, summed) copies them into the slots in
place, so switching needs no new capture and no recompile, and a `torch.compile`d module keeps its
code. The active adapters' values live only in the slots (that is what trains, and no second copy is
kept); switching writes them back out first.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ._modules import resolve
from .errors import ConfigError, TargetError
from .match import NearMiss, Site, rematch
from .rewrite import init_weights, insert_lora, install_slot, lora_path, scale_path, slot_rank, strip_lora


@dataclass
class LoraConfig:
    """One adapter's hyper-parameters, as given."""

    targets: Any
    rank: int
    alpha: float
    dropout: float
    init: str
    trainable: tuple[str, ...] = ()
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


@dataclass
class Adapter:
    name: str
    config: LoraConfig
    ranks: dict[str, int]  # site (weight name) -> rank
    alphas: dict[str, float]  # site -> alpha
    # site -> (A, B) per block; None while active (the slots hold them: read with adapter_weights)
    weights: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None

    def scaling(self, param: str) -> float:
        return self.alphas[param] / self.ranks[param]


@dataclass
class LoraState:
    """LoRA's bookkeeping on an injected graph module (shared with its variants)."""

    slot: str  # the name the graph's LoRA modules carry (the first adapter's)
    sites: dict[str, Site]  # weight name -> site, over all adapters
    adapters: dict[str, Adapter]
    active: list[str]
    trainable_modules: list[str]
    exclude: str | None = None  # output layer left out of "all-linear"
    report: Any = None
    folded: bool = False
    near_misses: list[NearMiss] = field(default_factory=list)


def pattern_value(pattern: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path ending in it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def resolve_ranks(sites: list[Site], config: LoraConfig) -> tuple[dict[str, int], dict[str, float]]:
    ranks, alphas = {}, {}
    for site in sites:
        r = pattern_value(config.rank_pattern, site.owner, config.rank)
        a = pattern_value(config.alpha_pattern, site.owner, config.alpha)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ConfigError(f"rank for {site.owner} must be a positive int, got {r!r}")
        if r > site.max_rank():
            rows = min(b.stop - b.start for b in site.blocks)
            raise ConfigError(
                f"rank {r} is larger than min(in={site.in_features}, out={rows}) = {site.max_rank()} of "
                f"{site.param}; choose rank <= {site.max_rank()}"
            )
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not a > 0:
            raise ConfigError(f"alpha for {site.owner} must be a positive number, got {a!r}")
        ranks[site.param], alphas[site.param] = r, float(a)
    return ranks, alphas


def _state(gm):
    state = getattr(gm, "_lora", None)
    if state is None or state.folded:
        raise TargetError("this module has no LoRA adapters: use the module inject_lora or load_adapter returned")
    return state


def _offsets(state: LoraState, site: str, names: list[str]) -> list[tuple[Adapter, int]]:
    """Where each adapter in `names` sits in a site's slot rows."""
    out, offset = [], 0
    for name in names:
        adapter = state.adapters[name]
        if site in adapter.ranks:
            out.append((adapter, offset))
            offset += adapter.ranks[site]
    return out


def adapter_weights(gm, name: str) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """An adapter's (A, B) per block for every weight it adapts (read from the slots when active)."""
    state = _state(gm)
    if name not in state.adapters:
        raise TargetError(f"no adapter named {name!r}; adapters: {sorted(state.adapters)}")
    adapter = state.adapters[name]
    if name not in state.active:
        return adapter.weights
    out = {}
    for param, site in state.sites.items():
        for owner, offset in _offsets(state, param, state.active):
            if owner is adapter:
                r = adapter.ranks[param]
                out[param] = [
                    (gm.get_parameter(lora_path(site, "lora_A", state.slot, b.index))[offset:offset + r].detach().clone(),
                     gm.get_parameter(lora_path(site, "lora_B", state.slot, b.index))[:, offset:offset + r].detach().clone())
                    for b in site.blocks
                ]
    return out


def _write_back(gm) -> None:
    state = gm._lora
    for name in state.active:
        state.adapters[name].weights = adapter_weights(gm, name)


def _fill(gm) -> None:
    """Move the active adapters into the slots (in place) and drop their own copies, so an adapter's
    weights exist once; `_write_back` moves them out again before the slots change."""
    state = gm._lora
    with torch.no_grad():
        for param, site in state.sites.items():
            scale = gm.get_buffer(scale_path(site, state.slot))
            scale.zero_()
            slots = [(gm.get_parameter(lora_path(site, "lora_A", state.slot, b.index)),
                      gm.get_parameter(lora_path(site, "lora_B", state.slot, b.index))) for b in site.blocks]
            for a_slot, b_slot in slots:
                a_slot.zero_()
                b_slot.zero_()
            placed = _offsets(state, param, state.active)
            for adapter, offset in placed:
                r = adapter.ranks[param]
                for (a_slot, b_slot), (a, b) in zip(slots, adapter.weights[param]):
                    a_slot[offset:offset + r].copy_(a)
                    b_slot[:, offset:offset + r].copy_(b)
                scale[offset:offset + r] = adapter.scaling(param)
            drop = resolve(gm, f"{site.holder}.lora_dropout.{state.slot}")
            if drop is not None and placed:
                drop.p = placed[0][0].config.dropout
    for name in state.active:
        state.adapters[name].weights = None


def needed_rank(state: LoraState, param: str) -> int:
    """Slot rows a site needs: the largest adapter on it, or the active ones side by side."""
    ranks = [a.ranks[param] for a in state.adapters.values() if param in a.ranks]
    active = sum(state.adapters[n].ranks.get(param, 0) for n in state.active)
    return max(ranks + [active, 1])


def relayout(gm) -> dict:
    """(Re)build the LoRA subgraph for every site of every adapter, resizing slots where needed.
    Changes the graph (and so recompiles): only adding or deleting adapters calls it."""
    state = gm._lora
    strip_lora(gm.graph)
    sites = list(state.sites.values())
    dropout = {p for p in state.sites if any(a.config.dropout > 0 and p in a.ranks for a in state.adapters.values())}
    for site in sites:
        r = needed_rank(state, site.param)
        has_drop = resolve(gm, f"{site.holder}.lora_dropout.{state.slot}") is not None
        if slot_rank(gm, site, state.slot) != r or has_drop != (site.param in dropout):
            p = max((a.config.dropout for a in state.adapters.values() if site.param in a.ranks), default=0.0)
            install_slot(gm, site, state.slot, r, p, gm.get_parameter(site.param))
    counts = insert_lora(gm, rematch(gm, sites), state.slot, dropout)
    gm._variants.clear()  # captures for other inputs are rebuilt on their next call
    _fill(gm)
    return dict(counts)


def set_adapter(gm, names) -> None:
    """Make `names` (one name, or a list whose updates are summed) the active adapters."""
    state = _state(gm)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.adapters]
    if unknown or not names or len(set(names)) != len(names):
        raise TargetError(f"cannot activate {names}: adapters are {sorted(state.adapters)} (each at most once)")
    _write_back(gm)
    state.active = names
    if any(needed_rank(state, p) > slot_rank(gm, s, state.slot) for p, s in state.sites.items()):
        relayout(gm)  # the sum of these ranks does not fit the slots: grow them
    else:
        _fill(gm)


def active_adapters(gm) -> list[str]:
    return list(_state(gm).active)


def add_adapter(gm, name: str, targets=None, *, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                init: str = "gaussian", rank_pattern=None, alpha_pattern=None, weights=None) -> None:
    """Add a new adapter (not active until set_adapter). `targets` defaults to the first adapter's.
    Weights it adapts that no adapter adapted before get LoRA nodes (a graph change, once)."""
    from .inject import check_hparams
    from .match import match_weights, parse_targets

    state = _state(gm)
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if name in state.adapters:
        raise ConfigError(f"adapter {name!r} exists; delete_adapter it first or choose another name")
    check_hparams(rank, alpha, dropout, init)
    first = next(iter(state.adapters.values()))
    config = LoraConfig(first.config.targets if targets is None else targets, rank, alpha, dropout, init,
                        (), dict(rank_pattern or {}), dict(alpha_pattern or {}))
    spec = parse_targets(config.targets)
    base = base_copy(gm)
    matches, _ = match_weights(base, spec, exclude=state.exclude)
    sites = [state.sites.get(m.site.param, m.site) for m in matches]
    for site, m in zip(sites, matches):
        if site.blocks != m.site.blocks:
            raise ConfigError(f"{site.param} is adapted with other row blocks by another adapter; use the same blocks")
    ranks, alphas = resolve_ranks(sites, config)
    if weights is not None:
        from .inject import check_weights

        check_weights(weights, sites, ranks)
    if weights is None:
        weights = {s.param: init_weights(s, ranks[s.param], init, gm.get_parameter(s.param)) for s in sites}
    _write_back(gm)
    state.adapters[name] = Adapter(name, config, ranks, alphas, weights)
    new_sites = [s for s in sites if s.param not in state.sites]
    state.sites.update({s.param: s for s in new_sites})
    no_dropout = dropout > 0 and any(resolve(gm, f"{s.holder}.lora_dropout.{state.slot}") is None for s in sites)
    if new_sites or no_dropout or any(needed_rank(state, s.param) > slot_rank(gm, s, state.slot) for s in sites):
        relayout(gm)


def delete_adapter(gm, name: str) -> None:
    state = _state(gm)
    if name not in state.adapters:
        raise TargetError(f"no adapter named {name!r}; adapters: {sorted(state.adapters)}")
    if len(state.adapters) == 1:
        raise TargetError(f"{name!r} is the only adapter; fold it (merge_lora) or keep it")
    _write_back(gm)
    del state.adapters[name]
    state.active = [n for n in state.active if n != name]
    used = {p for a in state.adapters.values() for p in a.ranks}
    if set(state.sites) - used:
        state.sites = {p: s for p, s in state.sites.items() if p in used}
    relayout(gm)


@contextlib.contextmanager
def disable_adapters(gm):
    """Within the block, the graph computes the base model (every scale is 0); restored after."""
    state = _state(gm)
    saved = [(gm.get_buffer(scale_path(s, state.slot)), gm.get_buffer(scale_path(s, state.slot)).clone())
             for s in state.sites.values()]
    try:
        for buf, _ in saved:
            buf.zero_()
        yield gm
    finally:
        for buf, value in saved:
            buf.copy_(value)


def lora_state_dict(gm, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """One adapter's weights (default: the first active), keyed as in the module:
    `<holder>.lora_A.<adapter>.weight`, plus the trainable (copied) modules' weights."""
    state = _state(gm)
    name = adapter or (state.active[0] if state.active else next(iter(state.adapters)))
    weights = adapter_weights(gm, name)
    out = {}
    for param, pairs in weights.items():
        site = state.sites[param]
        for block, (a, b) in zip(site.blocks, pairs):
            out[lora_path(site, "lora_A", name, block.index)] = a
            out[lora_path(site, "lora_B", name, block.index)] = b
    for path in state.trainable_modules:
        for pname, p in gm.named_parameters():
            if pname.startswith(path + "."):
                out[pname] = p.detach()
    return out


def base_copy(gm):
    """A graph module over gm's weights with the LoRA nodes stripped from a copy of its graph: what
    matching sees, and what fold and mixed batches start from."""
    from ._modules import copy_graph
    from .graph_module import LoraGraphModule

    graph = copy_graph(gm.graph)
    strip_lora(graph)
    return LoraGraphModule(gm, graph)


def size_report(gm, adapter_dir=None, name: str | None = None) -> dict:
    """Bytes of one adapter (on disk when `adapter_dir` is given, else in memory) against the base
    model's frozen weights."""
    state = _state(gm)
    frozen = {id(p): p for p in gm.parameters() if not p.requires_grad}
    base = sum(p.numel() * p.element_size() for p in frozen.values())
    if adapter_dir is not None:
        from pathlib import Path

        adapter = sum(f.stat().st_size for f in Path(adapter_dir).iterdir() if f.is_file())
    else:
        adapter = sum(t.numel() * t.element_size() for t in lora_state_dict(gm, name).values())
    return {"adapter_bytes": adapter, "base_bytes": base, "adapter_share": adapter / max(base, 1),
            "adapters": sorted(state.adapters)}
