"""inject_lora: capture -> match -> attach, as one call."""
from __future__ import annotations

from torch import nn

from .attach import attach_adapter, check_adapter_name, check_hparams, new_adapter, start_lora
from .capture import capture
from .errors import ConfigError, TargetError
from .graph_module import LoraGraphModule, copy_of
from .match import Match, match_weights, output_layer, parse_targets, resolve_targets
from .paths import set_parameter
from .report import InjectReport, NearMiss, SiteRow
from .slot import lora_parameters
from .state import Adapter, LoraConfig


def inject_lora(
    model: nn.Module,
    targets=None,
    *,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    init: str = "gaussian",
    trainable=(),
    example_inputs=None,
    adapter: str = "default",
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    weights: dict | None = None,
    target_parameters=None,
    use_rslora: bool = False,
    use_dora: bool = False,
    lora_bias: bool = False,
) -> LoraGraphModule:
    """Capture `model` and add LoRA beside every weight `targets` names.

    targets: a list of module names (a path matches when equal or ending with "." + name), a regex
    full-matched against module paths, "all-linear", or a dict {name: blocks} that adapts only some
    row blocks of a fused projection ([True, False, True] or [(rows, True), ...]).
    target_parameters: PEFT's parameter targets, paths (or "."-suffixes) of weights that are not a
    module's `.weight`, e.g. MoE expert stacks ["experts.gate_up_proj", "experts.down_proj"]: each
    expert gets its own rank-r pair. `targets` may then be None.
    rank_pattern / alpha_pattern: PEFT's per-module overrides ({"v_proj": 16}).
    use_rslora: scaling = alpha / sqrt(rank) (rsLoRA), as PEFT's use_rslora.
    use_dora: DoRA (Liu et al., 2024), as PEFT's use_dora: a trained magnitude per output,
    W' = m * (W0 + scaling * B @ A) / ||W0 + scaling * B @ A||; folding gives the original graph again.
    lora_bias: PEFT's lora_bias, a trained bias on lora_B (linear and conv layers that have a bias;
    folding adds scaling * that bias to the layer's bias).
    Only LoRA weights (and the modules named in `trainable`, which are copied) require grad; base
    weights are shared with `model`, never copied; `model` itself is left as it was.
    The report of what was done is `gm.lora_report`.
    """
    check_hparams(rank, alpha, dropout, init)
    check_adapter_name(adapter)
    spec = parse_targets(targets, target_parameters)
    trainable = _as_names(trainable)
    gm = graph_to_adapt(model, example_inputs)
    source = gm.capture_info.source
    exclude = output_layer(source)
    resolved = resolve_targets(spec, source, rank, alpha)
    config = LoraConfig(targets, rank, alpha, dropout, init, tuple(trainable),
                        {**(rank_pattern or {}), **resolved.rank_pattern}, {**(alpha_pattern or {}), **resolved.alpha_pattern},
                        None if target_parameters is None else tuple(spec.parameters),
                        bool(use_rslora), bool(use_dora), bool(lora_bias))
    matches, near = match_weights(gm, resolved.spec, exclude=exclude)
    new = new_adapter(gm, adapter, config, [m.site for m in matches], weights=weights)
    gm = inject_matched(gm, matches, near, new, trainable, exclude)
    if resolved.note:
        gm.lora_state.report.notes.append(resolved.note)
    return gm


def graph_to_adapt(model: nn.Module, example_inputs=None) -> LoraGraphModule:
    """A fresh graph to inject into: `model` captured, or a copy of a capture lora-fx returned (the
    capture itself stays as it was)."""
    if not isinstance(model, LoraGraphModule):
        return capture(model, example_inputs)
    if model.lora_state is not None:
        state = model.lora_state
        raise TargetError(
            "this graph already has LoRA" + (" (folded)" if state.folded else f" on {len(state.sites)} weights")
            + "; inject into the original model, add another adapter with add_adapter, or fold first"
        )
    return copy_of(model)


def inject_matched(gm: LoraGraphModule, matches: list[Match], near: list[NearMiss], adapter: Adapter,
                   trainable: list[str], exclude: str | None) -> LoraGraphModule:
    """Make `gm` (a fresh graph without LoRA) train `adapter` over the matched weights: base weights
    frozen, `trainable` modules copied and trained, LoRA in. Returns `gm`."""
    sites = [m.site for m in matches]
    trainable_paths = _trainable_paths(gm, trainable, {s.owner for s in sites})
    # everything is validated: from here on only the new graph module changes
    _freeze(gm, trainable_paths)
    start_lora(gm, adapter.name, trainable_paths, exclude)
    counts = attach_adapter(gm, sites, adapter, activate=True)
    gm.lora_state.report = _report(gm, adapter, matches, near, counts)
    source = gm.capture_info.source
    gm.train(source.training if source is not None else False)
    return gm


def _as_names(trainable) -> list[str]:
    if isinstance(trainable, str):
        trainable = [trainable]
    names = list(trainable or ())
    if any(not isinstance(n, str) or not n for n in names):
        raise ConfigError(f"trainable must be a list of module names, e.g. ['classifier'], got {trainable!r}")
    return names


def _trainable_paths(gm: nn.Module, names: list[str], adapted_owners: set[str]) -> list[str]:
    """Module paths (with weights in the graph) named by `trainable`."""
    owners = set()
    for n, _ in gm.named_parameters(remove_duplicate=False):
        parts = n.split(".")[:-1]
        owners.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    owners = sorted(owners)
    paths = []
    for name in names:
        found = [o for o in owners if o == name or o.endswith("." + name)]
        if not found:
            raise TargetError(
                f"trainable module {name!r} matches no module with weights in the graph; modules are "
                f"named like {sorted({o.rsplit('.', 1)[-1] for o in owners})[:12]}"
            )
        paths.extend(p for p in found if p not in paths)
    clash = sorted(o for o in adapted_owners if any(o == p or o.startswith(p + ".") for p in paths))
    if clash:
        raise TargetError(f"{clash} are both LoRA targets and fully trainable; name each module in one of the two")
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]


def _freeze(gm: nn.Module, trainable_paths: list[str]) -> None:
    """Base weights become frozen aliases (same storage, requires_grad=False) so the user's own
    parameters keep their flags; weights of trainable modules become trainable copies."""
    new: dict[int, nn.Parameter] = {}
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        if id(p) not in new:
            if any(name.startswith(t + ".") for t in trainable_paths):
                new[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=True)
            else:
                new[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
        set_parameter(gm, name, new[id(p)])
    for name, buf in list(gm.named_buffers()):
        if any(name.startswith(t + ".") for t in trainable_paths):
            parent, _, leaf = name.rpartition(".")
            gm.get_submodule(parent)._buffers[leaf] = buf.clone()


def _report(gm: LoraGraphModule, adapter: Adapter, matches: list[Match], near: list[NearMiss], counts) -> InjectReport:
    cfg = adapter.config
    unique = {id(p): p for p in gm.parameters()}
    rows = []
    for m in matches:
        s = m.site
        uses: dict[str, int] = {}
        for u in m.uses:
            uses[u.kind] = uses.get(u.kind, 0) + 1
        blocks = "all rows" if not s.fused else "rows " + ",".join(f"{b.start}:{b.stop}" for b in s.blocks)
        rows.append(SiteRow(s.param, s.owner, s.layout, blocks, uses, m.left_alone))
    notes = list(gm.capture_info.notes) if gm.capture_info else []
    unused = [m.site.param for m in matches if not m.uses]
    if unused:
        notes.append(f"{len(unused)} adapted weights are not used by this capture's forward (e.g. {unused[0]}): their LoRA "
                     "is in the files and trains where a capture for other inputs uses them (as PEFT wraps them)")
    if counts.get("weight"):
        notes.append(f"{counts['weight']} uses adapted as W + scaling*B@A (their op is not a product with an activation); LoRA dropout does not apply to them")
    return InjectReport(
        adapter=adapter.name, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, init=cfg.init,
        sites=rows, counters=dict(counts),
        trainable_params=sum(p.numel() for p in unique.values() if p.requires_grad),
        total_params=sum(p.numel() for p in unique.values()),
        lora_params=sum(p.numel() for p in lora_parameters(gm).values()),
        trainable_modules=list(gm.lora_state.trainable_modules), near_misses=near, notes=notes,
    )
