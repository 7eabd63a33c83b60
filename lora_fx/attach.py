"""Attach: the one place an adapter enters a graph module.

`inject_lora`, `add_adapter` and `load_adapter` each match their targets once, resolve every site's
rank, alpha and weights into an `Adapter` (`new_adapter`), and hand it to `attach_adapter`, which adds
it to the graph's LoRA state, sizes the slots and, where a site is new or a slot too small, rebuilds
the LoRA subgraph (`relayout`: the only graph change; switching adapters later only copies weights).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import replace

import torch
from torch import nn

from .capture import capture, recapture
from .errors import ConfigError, TargetError
from .graph_module import LoraGraphModule, copy_of, derived
from .inits import is_residual, orthogonal_weights
from .match import Match, rematch
from .paths import copy_graph, lora_like, set_parameter
from .report import InjectReport, NearMiss, SiteRow
from .recompute import frozen_products
from .rewrite import insert_lora, strip_lora, weight_form_sites
from . import slot
from .state import Adapter, LoraConfig, LoraState, Site, Weights

INITS = ("gaussian", "kaiming", "loftq", "orthogonal")  # and PiSSA / OLoRA (`inits.is_residual`)


# ---------------------------------------------------------------------------------- checks
def check_adapter_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without dots, got {name!r}")


def check_hparams(rank, alpha, dropout, init) -> None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ConfigError(f"rank must be a positive int (the paper uses 1-64), got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ConfigError(f"alpha must be a positive number (scaling = alpha / rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if init not in INITS and not is_residual(init):
        raise ConfigError(f"init must be 'gaussian' (the paper's), 'kaiming' (PEFT's default), 'loftq' (a quantized "
                          f"base), or PEFT's 'pissa', 'pissa_niter_<n>', 'olora', 'orthogonal'; got {init!r}")


def pattern_value(pattern: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path ending in it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def pattern_key(site: Site) -> str:
    """What PEFT's rank_pattern / alpha_pattern keys are matched against: the module path, or for a
    parameter target the parameter's path."""
    return site.param if site.by_parameter else site.owner


def _check_rank(site: Site, r) -> None:
    # a rank above min(in, out) adds parameters but no expressiveness; PEFT accepts it, and so do
    # adapter files from the hub, so it is accepted here too
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"rank for {site.owner} must be a positive int, got {r!r}")


def _check_alpha(site: Site, a) -> None:
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a) or not a > 0:
        raise ConfigError(f"alpha for {site.owner} must be a positive number, got {a!r}")


def check_weights(weights: Weights, sites: list[Site], ranks: dict[str, int]) -> None:
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
            want_a, want_b = site.a_shape(r), site.b_shape(block.stop - block.start, r)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                grouped = (f"; {param} is a conv with groups={site.groups}: PEFT's grouped-conv LoRA (lora_A over all "
                           "input channels) is another function than an update of the grouped weight, which is what "
                           "lora-fx trains and loads" if site.groups > 1 else "")
                raise TargetError(
                    f"{param}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit this model, which "
                    f"needs {want_a} / {want_b} (wrong base model, or wrong rank?){grouped}"
                )


def check_active(state: LoraState, names: list[str]) -> None:
    """DoRA rescales the whole weight, and a lora_bias adapter owns the slot's one bias: either is
    active alone (its update is not a sum)."""
    dora = [n for n in names if state.adapters[n].config.use_dora]
    if dora and len(names) > 1:
        raise ConfigError(f"cannot activate {names} together: {dora[0]} is a DoRA adapter, whose magnitude rescales "
                          "the whole weight, so it does not sum with others; activate it alone")
    biased = [n for n in names if state.adapters[n].config.lora_bias]
    if biased and len(names) > 1:
        raise ConfigError(f"cannot activate {names} together: {biased[0]} has a lora_B bias (lora_bias), which is "
                          "not summed with other adapters; activate it alone")


# ---------------------------------------------------------------------------------- adapters
def init_weights(site: Site, rank: int, init: str, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fresh adapter's (A, B) for every block of a site: A random, B zero (an embedding, as PEFT:
    A zero, B ~ N(0, 1)). Either way B @ A = 0: training starts at the pretrained model. PEFT's
    "orthogonal": A and B both random, with B @ A = 0."""
    if init == "orthogonal":
        return orthogonal_weights(site, rank, like)
    out = []
    for block in site.blocks:
        a = torch.empty(site.a_shape(rank), device=like.device, dtype=like.dtype)
        b = torch.zeros(site.b_shape(block.stop - block.start, rank), device=like.device, dtype=like.dtype)
        if site.kind == "embedding":
            nn.init.zeros_(a)
            nn.init.normal_(b)
        elif init == "gaussian":  # the paper's A ~ N(0, sigma^2); sigma = 1/r as PEFT's "gaussian"
            nn.init.normal_(a, std=1 / rank)
        elif site.kind == "experts":  # PEFT's ParamWrapper: nn.Linear(in, r * E)'s init, per expert
            nn.init.kaiming_uniform_(a.view(-1, site.in_features), a=math.sqrt(5))
        else:  # "kaiming": loralib's and PEFT's default (nn.Linear's / nn.ConvNd's own init)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        out.append((a, b))
    return out


def _check_meta(gm: nn.Module, config: LoraConfig, sites: list[Site]) -> None:
    """A base on the meta device has no values yet: what is computed from them cannot start there."""
    meta = [s.param for s in sites if gm.get_parameter(s.param).is_meta]
    computed = ("DoRA's magnitude" if config.use_dora else f"init={config.init!r}"
                if is_residual(config.init) or config.init == "loftq" else None)
    if meta and computed:
        raise ConfigError(f"{meta[0]} is on the meta device (no values yet), and {computed} is computed from the base "
                          "weights. Inject with init='kaiming' or 'gaussian' on the meta model, or load the model's "
                          "weights first (lora_fx.load_base) and inject on the loaded graph")


def _check_dora(config: LoraConfig, sites: list[Site]) -> None:
    refused = [s for s in sites if s.kind == "experts" or s.fused or s.by_parameter]
    if config.use_dora and refused:
        what = ("an expert stack" if refused[0].kind == "experts" else "a fused-block spec" if refused[0].fused
                else "named by parameter (PEFT's target_parameters take no DoRA)")
        raise ConfigError(f"DoRA needs one magnitude per output of a whole weight; {refused[0].param} is {what}. "
                          "Leave it out of this adapter's targets, or use plain LoRA (use_dora=False)")
    quantized = [s for s in sites if s.quantized]
    if quantized and (config.use_dora or config.lora_bias):
        raise ConfigError(f"{'DoRA' if config.use_dora else 'lora_bias'} changes the base weight's own terms; "
                          f"{quantized[0].param} is quantized ({quantized[0].quantized}), and lora-fx trains plain LoRA "
                          "beside quantized layers. Use plain LoRA, or a float base")
    if config.lora_bias:
        for s in sites:
            if s.kind not in ("linear", "conv") or s.fused:
                raise ConfigError(f"lora_bias adds a bias to lora_B of whole linear and conv layers (as PEFT); {s.param} "
                                  f"is {'a fused-block spec' if s.fused else f'a {s.kind} weight'}: leave it out, or use "
                                  "lora_bias=False")
            if s.bias is None:
                raise ConfigError(f"lora_bias folds lora_B's bias into the layer's bias, and {s.param}'s layer adds "
                                  "none (or is read as a weight): leave it out, or use lora_bias=False")


def init_magnitudes(sites: list[Site], gm: nn.Module) -> dict[str, torch.Tensor]:
    """DoRA's magnitude at init: ||W0|| per output (B = 0), so training starts at the pretrained model."""
    out = {}
    for s in sites:
        w = gm.get_parameter(s.param)
        out[s.param] = torch.linalg.vector_norm(w.detach().float(), 2, s.in_dims).to(w.dtype)
    return out


def check_magnitudes(magnitudes: dict[str, torch.Tensor], sites: list[Site]) -> None:
    for s in sites:
        m = magnitudes.get(s.param)
        if m is None or tuple(m.shape) != (s.out_features,):
            raise TargetError(f"{s.param}: DoRA magnitude {None if m is None else tuple(m.shape)} does not fit this "
                              f"model, which needs ({s.out_features},)")


def new_adapter(gm: nn.Module, name: str, config: LoraConfig, sites: list[Site], weights: Weights | None = None,
                ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None,
                magnitudes: dict[str, torch.Tensor] | None = None,
                biases: dict[str, torch.Tensor] | None = None) -> Adapter:
    """An adapter over `sites`: ranks and alphas from `config` (its patterns) unless given per site,
    weights checked against them, or initialised as the paper does (A random, B zero); DoRA's
    magnitudes likewise."""
    if ranks is None:
        ranks = {s.param: pattern_value(config.rank_pattern, pattern_key(s), config.rank) for s in sites}
    if alphas is None:
        alphas = {s.param: pattern_value(config.alpha_pattern, pattern_key(s), config.alpha) for s in sites}
    for site in sites:
        _check_rank(site, ranks[site.param])
        _check_alpha(site, alphas[site.param])
    experts = [s.param for s in sites if s.kind == "experts"]
    if experts and config.dropout > 0:
        raise ConfigError(f"LoRA dropout cannot apply to expert stacks ({experts[0]}): their update is added to the "
                          "weight, not to an activation (PEFT refuses it too); use dropout=0")
    _check_meta(gm, config, sites)
    if weights is None:
        weights = {s.param: init_weights(s, ranks[s.param], config.init, lora_like(gm.get_parameter(s.param)))
                   for s in sites}
    else:
        check_weights(weights, sites, ranks)
    _check_dora(config, sites)
    if config.use_dora:
        magnitudes = init_magnitudes(sites, gm) if magnitudes is None else magnitudes
        check_magnitudes(magnitudes, sites)
    if config.lora_bias:  # zero at init, as PEFT's
        like = {s.param: lora_like(gm.get_parameter(s.param)) for s in sites}
        biases = {s.param: like[s.param].new_zeros(s.out_features) for s in sites} if biases is None else biases
        bad = [s.param for s in sites if s.param not in biases or tuple(biases[s.param].shape) != (s.out_features,)]
        if bad:
            raise TargetError(f"{bad[0]}: lora_B bias does not fit this model (wrong base model?)")
    return Adapter(name, config, {s.param: ranks[s.param] for s in sites},
                   {s.param: float(alphas[s.param]) for s in sites}, weights, magnitudes if config.use_dora else None,
                   biases if config.lora_bias else None)


# ---------------------------------------------------------------------------------- the core
def start_lora(gm: LoraGraphModule, slot_name: str, trainable_modules: list[str], exclude: str | None) -> LoraState:
    """Give a graph without LoRA an empty LoRA state, whose slots will carry `slot_name`."""
    gm.lora_state = LoraState(slot=slot_name, sites={}, adapters={}, active=[], trainable_modules=trainable_modules,
                              exclude=exclude)
    if gm.capture_info is not None:  # graphs for other inputs get the LoRA subgraph too
        gm.capture_info = replace(gm.capture_info, recapture=recapture_with_lora)
    return gm.lora_state


def attach_adapter(gm: LoraGraphModule, sites: list[Site], adapter: Adapter, activate: bool = False) -> dict[str, int]:
    """Add `adapter` (over `sites`, already matched and checked) to `gm`; activate it alone when asked.
    Returns the rewritten uses by kind when the LoRA subgraph was rebuilt, else {}."""
    state = gm.lora_state
    if adapter.name in state.adapters:
        raise ConfigError(f"adapter {adapter.name!r} exists; delete_adapter it first or choose another name")
    for site in sites:
        known = state.sites.get(site.param)
        if known is not None and known.blocks != site.blocks:
            raise ConfigError(f"{site.param} is adapted with other row blocks by another adapter; use the same blocks")
    slot.write_back(gm, state)
    state.adapters[adapter.name] = adapter
    state.sites.update({s.param: s for s in sites if s.param not in state.sites})
    if activate:
        state.active = [adapter.name]
    if any(not slot.fits(gm, state, s) for s in state.sites.values()):  # a new site, or too few rows
        return relayout(gm)
    slot.fill(gm, state)
    return {}


def relayout(gm: LoraGraphModule) -> dict[str, int]:
    """(Re)build the LoRA subgraph for every site, each slot sized to what its adapters need, and
    put the active adapters in. Changes the graph (and so recompiles): only adding or deleting
    adapters, or activating a set that does not fit, calls it."""
    state = gm.lora_state
    strip_lora(gm.graph)
    dora, bias = state.dora_sites(), state.bias_sites()
    for site in state.sites.values():
        r, p = slot.needed_rank(state, site.param), slot.dropout_p(state, site.param)
        if not slot.fits(gm, state, site) or slot.rank_of(gm, site, state.slot) != r:
            slot.install(gm, site, state.slot, r, p, lora_like(gm.get_parameter(site.param)), site.param in dora, site.param in bias)
    dropout = {param for param in state.sites if slot.dropout_p(state, param) > 0}
    counts = insert_lora(gm, rematch(gm, list(state.sites.values())), state.slot, dropout, dora, bias)
    state.weight_form = weight_form_sites(gm.graph)
    gm.forget_variants()  # captures for other inputs are rebuilt on their next call
    slot.fill(gm, state)
    return dict(counts)


def base_copy(gm: LoraGraphModule) -> LoraGraphModule:
    """A graph module over `gm`'s weights running `gm`'s graph without the LoRA nodes: what matching
    sees, and what fold and mixed batches start from."""
    graph = copy_graph(gm.graph)
    strip_lora(graph)
    return derived(gm, graph)


def recapture_with_lora(primary: LoraGraphModule, inputs, kind: str | None = None) -> LoraGraphModule:
    """`capture.recapture`, plus the primary's LoRA slots and subgraph (the very same parameters),
    so a graph for other inputs (or the decoding step) trains and switches adapters with the primary."""
    new = recapture(primary, inputs, kind)
    state = primary.lora_state
    if state is not None and not state.folded:
        slot.share(primary, new, state)
        dropout = {p for p, s in state.sites.items() if slot.has_dropout(primary, s, state.slot)}
        dora = {p for p, s in state.sites.items() if slot.has_magnitude(primary, s, state.slot)}
        bias = {p for p, s in state.sites.items() if slot.lora_bias(primary, s, state.slot) is not None}
        insert_lora(new, rematch(new, list(state.sites.values())), state.slot, dropout, dora, bias)
    new.lora_state = state
    return new


# ---------------------------------------------------------------------------------- a fresh graph
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
    recomputed = len(frozen_products(gm, gm.graph))
    if recomputed:
        notes.append(f"{recomputed} products use a weight the graph computes from frozen tensors (a quantized layer's "
                     "dequantize chain): training recomputes it in backward instead of keeping a float copy (lora_fx.recompute)")
    if counts.get("weight"):
        notes.append(f"{counts['weight']} uses adapted as W + scaling*B@A (their op is not a product with an activation); LoRA dropout does not apply to them")
    return InjectReport(
        adapter=adapter.name, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, init=cfg.init,
        sites=rows, counters=dict(counts),
        trainable_params=sum(p.numel() for p in unique.values() if p.requires_grad),
        total_params=sum(p.numel() for p in unique.values()),
        lora_params=sum(p.numel() for p in slot.lora_parameters(gm).values()),
        trainable_modules=list(gm.lora_state.trainable_modules), near_misses=near, notes=notes,
    )
