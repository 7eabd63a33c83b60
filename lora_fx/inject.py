"""inject_lora: capture -> match -> rewrite, as one call."""
from __future__ import annotations

import numbers

from torch import nn

from ._modules import copy_graph, own_stateless_modules, resolve, set_module, set_parameter
from .adapters import Adapter, LoraConfig, LoraState, relayout, resolve_ranks
from .capture import capture
from .errors import ConfigError, TargetError
from .graph_module import LoraGraphModule
from .match import Match, NearMiss, match_weights, parse_targets, rematch
from .report import InjectReport, SiteRow
from .rewrite import init_weights, insert_lora

INITS = ("gaussian", "kaiming")


def check_hparams(rank, alpha, dropout, init) -> None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ConfigError(f"rank must be a positive int (the paper uses 1-64), got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ConfigError(f"alpha must be a positive number (scaling = alpha / rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ConfigError(f"init must be one of {INITS} (paper: 'gaussian'; PEFT default: 'kaiming'), got {init!r}")


def inject_lora(
    model: nn.Module,
    targets,
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
) -> LoraGraphModule:
    """Capture `model` and add LoRA beside every weight `targets` names.

    targets: a list of module names (a path matches when equal or ending with "." + name), a regex
    full-matched against module paths, "all-linear", or a dict {name: blocks} that adapts only some
    row blocks of a fused projection ([True, False, True] or [(rows, True), ...]).
    rank_pattern / alpha_pattern: PEFT's per-module overrides ({"v_proj": 16}).
    Only LoRA weights (and the modules named in `trainable`, which are copied) require grad; base
    weights are shared with `model`, never copied; `model` itself is left as it was.
    The report of what was done is `gm.lora_report`.
    """
    check_hparams(rank, alpha, dropout, init)
    spec = parse_targets(targets)
    trainable = _as_names(trainable)
    if not isinstance(adapter, str) or not adapter or "." in adapter:
        raise ConfigError(f"adapter name must be a non-empty string without dots, got {adapter!r}")
    config = LoraConfig(targets, rank, alpha, dropout, init, tuple(trainable), dict(rank_pattern or {}),
                        dict(alpha_pattern or {}))
    if isinstance(model, LoraGraphModule):
        if model._lora is not None:
            raise TargetError(
                "this graph already has LoRA"
                + (" (folded)" if model._lora.folded else f" on {len(model._lora.sites)} weights")
                + "; inject into the original model, add another adapter with add_adapter, or fold first"
            )
        gm = copy_graph_module(model)
        source = model._capture.source if model._capture else None
    else:
        source = model
        gm = capture(model, example_inputs)
    exclude = output_layer(source)
    matches, near = match_weights(gm, spec, exclude=exclude)
    sites = [m.site for m in matches]
    ranks, alphas = resolve_ranks(sites, config)
    trainable_paths = _trainable_paths(gm, trainable, {s.owner for s in sites})
    if weights is not None:
        check_weights(weights, sites, ranks)

    # Everything is validated: from here on only the new graph module changes.
    _freeze(gm, trainable_paths)
    if weights is None:
        weights = {s.param: init_weights(s, ranks[s.param], init, gm.get_parameter(s.param)) for s in sites}
    gm._lora = LoraState(
        slot=adapter, sites={s.param: s for s in sites},
        adapters={adapter: Adapter(adapter, config, ranks, alphas, weights)}, active=[adapter],
        trainable_modules=trainable_paths, exclude=exclude, near_misses=near,
    )
    counts = relayout(gm)
    gm._lora.report = _report(gm, matches, near, counts)
    gm.train(source.training if source is not None else False)
    return gm


def check_weights(weights: dict, sites, ranks) -> None:
    """Given adapter weights ({weight name: [(A, B) per block]}) fit the sites exactly."""
    by_param = {s.param: s for s in sites}
    missing = sorted(set(by_param) - set(weights))
    extra = sorted(set(weights) - set(by_param))
    if missing or extra:
        raise TargetError(f"adapter weights do not fit the model: missing for {missing[:5]}, unexpected for {extra[:5]}")
    for param, pairs in weights.items():
        site = by_param[param]
        if len(pairs) != len(site.blocks):
            raise TargetError(f"{param}: {len(pairs)} weight blocks given, {len(site.blocks)} expected")
        r = ranks[param]
        for block, (a, b) in zip(site.blocks, pairs):
            want_a, want_b = (r, site.in_features), (block.stop - block.start, r)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise TargetError(
                    f"{param}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit this model, which "
                    f"needs {want_a} / {want_b} (wrong base model, or wrong rank?)"
                )


def copy_graph_module(gm: LoraGraphModule) -> LoraGraphModule:
    """A new graph module over a copy of `gm`'s graph, sharing its weights."""
    new = LoraGraphModule(gm, copy_graph(gm.graph))
    own_stateless_modules(new)
    new.train(gm.training)
    return new


def output_layer(model: nn.Module | None) -> str | None:
    """The path of a transformers model's output layer (PEFT leaves it out of "all-linear")."""
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        head = get()
    except Exception:  # some models raise instead of returning None
        return None
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


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


def _report(gm, matches: list[Match], near: list[NearMiss], counts) -> InjectReport:
    state: LoraState = gm._lora
    adapter = state.adapters[state.slot]
    cfg = adapter.config
    unique = {id(p): p for p in gm.parameters()}
    lora = sum(p.numel() for n, p in gm.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    rows = []
    for m in matches:
        s = m.site
        uses: dict[str, int] = {}
        for u in m.uses:
            uses[u.kind] = uses.get(u.kind, 0) + 1
        blocks = "all rows" if not s.fused else "rows " + ",".join(f"{b.start}:{b.stop}" for b in s.blocks)
        rows.append(SiteRow(s.param, s.owner, s.layout, blocks, uses, m.left_alone))
    notes = list(gm._capture.notes) if gm._capture else []
    if counts.get("weight"):
        notes.append(f"{counts['weight']} uses adapted as W + scaling*B@A (their op is not a product with an activation); LoRA dropout does not apply to them")
    return InjectReport(
        adapter=state.slot, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, init=cfg.init,
        sites=rows, counters=dict(counts),
        trainable_params=sum(p.numel() for p in unique.values() if p.requires_grad),
        total_params=sum(p.numel() for p in unique.values()),
        lora_params=lora, trainable_modules=list(state.trainable_modules), near_misses=near, notes=notes,
    )


def build_variant(primary: LoraGraphModule, inputs: dict) -> LoraGraphModule:
    """Capture the primary's source model for another set of inputs and give the new graph the
    primary's weights, LoRA's included, so both train one set of parameters."""
    cap = primary._capture
    variant = capture(cap.source, example_inputs=inputs)
    state: LoraState | None = primary._lora
    shared = dict(primary.named_parameters(remove_duplicate=False))
    for name, _ in list(variant.named_parameters(remove_duplicate=False)):
        if name in shared:
            set_parameter(variant, name, shared[name])
        else:  # a weight only these inputs use: freeze it like the primary's
            set_parameter(variant, name, nn.Parameter(variant.get_parameter(name).detach(), requires_grad=False))
    for name, buf in primary.named_buffers():
        if resolve(variant, name) is not None:
            parent, _, leaf = name.rpartition(".")
            variant.get_submodule(parent)._buffers[leaf] = buf
    if state is not None and not state.folded:
        sites = list(state.sites.values())
        for site in sites:
            for which in ("lora_A", "lora_B", "lora_scaling", "lora_dropout"):
                module = resolve(primary, f"{site.holder}.{which}")
                if module is not None:
                    set_module(variant, f"{site.holder}.{which}", module)
        dropout = {s.param for s in sites if resolve(primary, f"{s.holder}.lora_dropout.{state.slot}") is not None}
        insert_lora(variant, rematch(variant, sites), state.slot, dropout)
    variant._lora = state
    variant._capture.source = cap.source
    return variant
