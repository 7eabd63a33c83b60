"""Several adapters in one graph: add, activate (one, or several summed), delete, disable, read.

Adapters live outside the graph as plain tensors; activating copies them into the graph's LoRA
slots in place (see `lora_fx.slot`), so switching needs no new capture and no recompile, and a
`torch.compile`d module keeps its code.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import slot
from .attach import attach_adapter, base_copy, check_active, check_adapter_name, check_hparams, new_adapter, pattern_value, relayout
from .errors import ConfigError, TargetError
from .graph_module import LoraGraphModule, regions_of, require_lora
from .inits import is_residual
from .match import match_weights, output_layer, parse_targets, resolve_targets
from .regions import each_region, join, region_specs
from .state import LoraConfig, Weights


def add_adapter(gm: LoraGraphModule, name: str, targets=None, *, rank: int = 8, alpha: float = 16,
                dropout: float = 0.0, init: str = "gaussian", rank_pattern=None, alpha_pattern=None,
                weights=None, target_parameters=None, use_rslora: bool = False, use_dora: bool = False,
                lora_bias: bool = False, exclude_modules=None, layers_to_transform=None, layers_pattern=None) -> None:
    """Add a new adapter (not active until set_adapter). `targets` (and `target_parameters`, and
    PEFT's layer selection: exclude_modules, layers_to_transform, layers_pattern) default to the
    first adapter's. Weights it adapts that no adapter adapted before get LoRA nodes (a graph
    change, once)."""
    regions = regions_of(gm)
    state = require_lora(each_region(gm)[0][1] if regions else gm, "add_adapter")
    check_adapter_name(name)
    if name in state.adapters:
        raise ConfigError(f"adapter {name!r} exists; delete_adapter it first or choose another name")
    check_hparams(rank, alpha, dropout, init)
    if init == "loftq" or is_residual(init):  # these replace the base, which the graph's adapters share
        raise ConfigError(f"init={init!r} replaces the base weights, which every adapter of a graph shares; "
                          "use it in inject_lora (the first adapter), not add_adapter")
    first = next(iter(state.adapters.values()))
    chosen = dict(exclude_modules=exclude_modules, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern)
    if targets is None and target_parameters is None:
        targets, target_parameters = first.config.targets, first.config.target_parameters
        if all(v is None for v in chosen.values()):
            chosen = dict(first.config.selection)
    spec = parse_targets(targets, target_parameters, **chosen)
    source = regions.source if regions else gm.capture_info.source if gm.capture_info else None
    resolved = resolve_targets(spec, source, rank, alpha)
    config = LoraConfig(targets, rank, alpha, dropout, init, (), {**(rank_pattern or {}), **resolved.rank_pattern},
                        {**(alpha_pattern or {}), **resolved.alpha_pattern},
                        None if target_parameters is None else tuple(spec.parameters), bool(use_rslora), bool(use_dora),
                        bool(lora_bias), selection=spec.selection.as_peft())
    if regions is None:
        matches, _ = match_weights(base_copy(gm), resolved.spec, exclude=state.exclude)
        sites = [state.sites.get(m.site.param, m.site) for m in matches]
        attach_adapter(gm, sites, new_adapter(gm, name, config, sites, weights=weights))
        return
    # every region gets the adapter (empty where it adapts nothing there), all checked before any is added
    specs, added = region_specs(gm, resolved.spec, output_layer(source)), []
    for path, graph in each_region(gm):
        local, here = specs[path], graph.lora_state
        matches = match_weights(base_copy(graph), local)[0] if local.keys() else []
        sites = [here.sites.get(m.site.param, m.site) for m in matches]
        keys = {s.param: join(path, s.param if s.by_parameter else s.owner) for s in sites}
        mine = None if weights is None else {k[len(path) + 1:]: v for k, v in weights.items() if k.startswith(path + ".")}
        added.append((graph, sites, new_adapter(
            graph, name, config, sites, weights=mine,
            ranks={s.param: pattern_value(config.rank_pattern, keys[s.param], rank) for s in sites},
            alphas={s.param: pattern_value(config.alpha_pattern, keys[s.param], alpha) for s in sites})))
    for graph, sites, adapter in added:
        attach_adapter(graph, sites, adapter)


def set_adapter(gm: LoraGraphModule, names) -> None:
    """Make `names` (one name, or a list whose updates are summed) the active adapters."""
    if regions_of(gm) is not None:
        graphs = [g for _, g in each_region(gm)]
        for graph in graphs:  # checked everywhere before anything changes
            require_lora(graph, "set_adapter").check_names([names] if isinstance(names, str) else list(names))
        for graph in graphs:
            set_adapter(graph, names)
        return
    state = require_lora(gm, "set_adapter")
    names = [names] if isinstance(names, str) else list(names)
    state.check_names(names)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"cannot activate {names}: name one adapter or several, each at most once")
    check_active(state, names)
    slot.write_back(gm, state)
    state.active = names
    if any(not slot.fits(gm, state, s) for s in state.sites.values()):
        relayout(gm)  # the sum of these ranks does not fit the slots: grow them
    else:
        slot.fill(gm, state)


def active_adapters(gm: LoraGraphModule) -> list[str]:
    if regions_of(gm) is not None:
        gm = each_region(gm)[0][1]
    return list(require_lora(gm, "active_adapters").active)


def delete_adapter(gm: LoraGraphModule, name: str) -> None:
    if regions_of(gm) is not None:
        graphs = [g for _, g in each_region(gm)]
        for graph in graphs:
            state = require_lora(graph, "delete_adapter")
            state.adapter(name)
            if len(state.adapters) == 1:
                raise TargetError(f"{name!r} is the only adapter; fold it (merge_lora) or keep it")
        for graph in graphs:
            delete_adapter(graph, name)
        return
    state = require_lora(gm, "delete_adapter")
    state.adapter(name)
    if len(state.adapters) == 1:
        raise TargetError(f"{name!r} is the only adapter; fold it (merge_lora) or keep it")
    slot.write_back(gm, state)
    del state.adapters[name]
    state.active = [n for n in state.active if n != name]
    used = {p for a in state.adapters.values() for p in a.ranks}
    state.sites = {p: s for p, s in state.sites.items() if p in used}
    relayout(gm)


@contextlib.contextmanager
def disable_adapters(gm: LoraGraphModule):
    """Within the block, the graph computes the base model (every scale is 0); restored after."""
    graphs = [g for _, g in each_region(gm)] if regions_of(gm) is not None else [gm]
    saved = [(buf, buf.clone()) for g in graphs for buf in slot.scales(g, require_lora(g, "disable_adapters"))]
    try:
        for buf, _ in saved:
            buf.zero_()
        yield gm
    finally:
        for buf, value in saved:
            buf.copy_(value)


def adapter_weights(gm: LoraGraphModule, name: str | None = None) -> Weights:
    """An adapter's (A, B) per block for every weight it adapts (default: the first active one)."""
    if regions_of(gm) is not None:
        return {join(path, k): v for path, g in each_region(gm) for k, v in adapter_weights(g, name).items()}
    state = require_lora(gm, "adapter_weights")
    return slot.read(gm, state, state.adapter(name).name)


def lora_state_dict(gm: LoraGraphModule, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """One adapter's weights (default: the first active), keyed as in the module:
    `<holder>.lora_A.<adapter>.weight`, plus the trainable (copied) modules' weights."""
    if regions_of(gm) is not None:
        out = {join(path, k): v for path, g in each_region(gm) for k, v in lora_state_dict(g, adapter).items()}
        out.update(trainable_weights(gm))
        return out
    state = require_lora(gm, "lora_state_dict")
    name = state.adapter(adapter).name
    out = {}
    for param, pairs in slot.read(gm, state, name).items():
        site = state.sites[param]
        for block, (a, b) in zip(site.blocks, pairs):
            out[slot.weight_path(site, slot.LORA_A, name, block.index)] = a
            out[slot.weight_path(site, slot.LORA_B, name, block.index)] = b
    out.update(trainable_weights(gm))
    return out


def trainable_weights(gm: LoraGraphModule) -> dict[str, torch.Tensor]:
    """The weights of the fully trained (copied) modules, by name (PEFT's modules_to_save)."""
    regions = regions_of(gm)
    paths = regions.trainable if regions is not None else require_lora(gm, "trainable_weights").trainable_modules
    return {n: p.detach() for n, p in gm.named_parameters() if any(n.startswith(t + ".") for t in paths)}


def size_report(gm: LoraGraphModule, adapter_dir=None, name: str | None = None) -> dict:
    """Bytes of one adapter (on disk when `adapter_dir` is given, else in memory) against the base
    model's frozen weights."""
    state = require_lora(each_region(gm)[0][1] if regions_of(gm) is not None else gm, "size_report")
    frozen = {id(p): p for p in gm.parameters() if not p.requires_grad}
    base = sum(p.numel() * p.element_size() for p in frozen.values())
    if adapter_dir is not None:
        adapter = sum(f.stat().st_size for f in Path(adapter_dir).iterdir() if f.is_file())
    else:
        adapter = sum(t.numel() * t.element_size() for t in lora_state_dict(gm, name).values())
    return {"adapter_bytes": adapter, "base_bytes": base, "adapter_share": adapter / max(base, 1),
            "adapters": sorted(state.adapters)}
