"""Fold: constant-fold scaling * B @ A into each W0 and drop the LoRA subgraph.

The result's graph is the captured model's graph again (node for node), with new tensors for the
adapted weights; the injected graph module and the user's model are left as they were.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import slot
from .attach import base_copy
from .capture import recapture
from .errors import FoldError
from .graph_module import LoraGraphModule, regions_of, require_lora
from .paths import is_shard, set_parameter
from .quantized import FOLD_CHOICES, dequantize, is_subclass, requantize
from .regions import each_region, join, with_regions
from .rewrite import LORA_META, combine_inputs
from .state import LoraState, Site


def _accumulator(w0: torch.Tensor) -> torch.dtype:
    """The dtype a fold computes in: fp32, or fp64 for an fp64 weight (never less precise than W0)."""
    return torch.float64 if w0.dtype == torch.float64 else torch.float32


def _factors(gm: nn.Module, site: Site, adapters=None) -> list[tuple]:
    """The update of one weight as (block, B * scaling, A) pairs in the fold's dtype (`_accumulator`):
    the update is sum over pairs of pad(B' @ A) (rows of the block), in W0's [out, in] orientation."""
    state = gm.lora_state
    acc = _accumulator(gm.get_parameter(site.param))
    out = []
    if adapters is None:  # what the graph computes now: the slots, with their per-row scale
        scale, pairs = slot.tensors(gm, site, state.slot)
        for block, (a, b) in zip(site.blocks, pairs):
            a, b = site.as_matrix(a.detach().to(acc), b.detach().to(acc))
            out.append((block, b * scale.to(acc), a))
        return out
    for name, weight in adapter_mix(state, adapters).items():
        adapter = state.adapters[name]
        if site.param not in adapter.ranks:
            continue
        for block, (a, b) in zip(site.blocks, slot.read(gm, state, name)[site.param]):
            a, b = site.as_matrix(a.to(acc), b.to(acc))
            out.append((block, b * (weight * adapter.scaling(site.param)), a))
    return out


def _lora_delta(site: Site, factors: list[tuple], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scaling * B @ A of one weight from its `_factors`, in `dtype`, in W0's layout and shape."""
    batch = (site.experts,) if site.experts else ()
    delta = torch.zeros(*batch, site.out_features, site.in_features, dtype=dtype, device=device)
    for block, b, a in factors:
        delta[..., block.start:block.stop, :] += b @ a
    return site.as_weight(delta)


def _magnitude(gm: nn.Module, site: Site, adapters=None) -> torch.Tensor | None:
    """DoRA's magnitude of one weight in what is folded, or None when no DoRA adapter is."""
    state = gm.lora_state
    if adapters is None:
        module = slot.magnitude(gm, site, state.slot)
        return module.weight.detach().float() if module is not None and module.on.item() else None
    mix = adapter_mix(state, adapters)
    dora = [n for n in mix if state.adapters[n].config.use_dora and site.param in state.adapters[n].ranks]
    if not dora:
        return None
    if len(mix) > 1 or mix[dora[0]] != 1.0:
        raise FoldError(f"cannot fold {list(mix)} as a weighted sum: {dora[0]} is a DoRA adapter, whose magnitude "
                        "rescales the whole weight; fold it alone")
    return slot.read_magnitudes(gm, state, dora[0])[site.param].float()


def _dora(w: torch.Tensor, site: Site, magnitude: torch.Tensor) -> torch.Tensor:
    """m * W / ||W|| per output (W = W0 + scaling * B @ A, fp32)."""
    norm = torch.linalg.vector_norm(w, 2, site.in_dims, keepdim=True)
    shape = [1, -1] if site.layout == "in_out" else [-1] + [1] * (w.dim() - 1)
    return w * (magnitude.view(shape) / norm)


def delta_bias(gm: nn.Module, site: Site, adapters=None) -> torch.Tensor | None:
    """What lora_bias adds to the layer's bias (scaling * lora_B's bias, fp32), or None when no
    adapter folded has lora_bias. `adapters` as in `delta_weight`."""
    state = gm.lora_state
    if adapters is None:
        bias = slot.lora_bias(gm, site, state.slot)
        if bias is None:
            return None
        return bias.detach().float() * slot.tensors(gm, site, state.slot)[0][0].float()
    total = None
    for name, weight in adapter_mix(state, adapters).items():
        adapter = state.adapters[name]
        if adapter.config.lora_bias and site.param in adapter.ranks:
            b = slot.read_biases(gm, state, name)[site.param].float() * (weight * adapter.scaling(site.param))
            total = b if total is None else total + b
    return total


def delta_weight(gm: nn.Module, site: Site, adapters=None) -> torch.Tensor:
    """The LoRA update of one weight, in fp32, in W0's layout and full shape: W' - W0, with
    W' = W0 + scaling * B @ A (DoRA: rescaled per output by its magnitude).

    adapters: None for what the graph computes now (the active adapters), or a name, a list of
    names, or {name: weight} for a weighted sum of stored adapters.
    """
    w0 = gm.get_parameter(site.param)
    delta = _lora_delta(site, _factors(gm, site, adapters), w0.device, _accumulator(w0))
    magnitude = _magnitude(gm, site, adapters)
    if magnitude is None:
        return delta
    w0 = w0.detach().to(delta.dtype)
    return _dora(w0 + delta, site, magnitude) - w0


def _finite_factors(gm: nn.Module, site: Site, adapters=None) -> list[tuple]:
    """`_factors`, refused when they hold NaN or inf (a fold would corrupt the weight)."""
    factors = _factors(gm, site, adapters)
    if gm.get_parameter(site.param).device.type != "meta" and \
            not all(torch.isfinite(t).all() for _, b, a in factors for t in (b, a)):
        raise FoldError(
            f"LoRA weights of {site.param} hold NaN or inf; folding would corrupt the weight. "
            "Check the training run (learning rate, loss scaling) or reload the adapter."
        )
    return factors


def folded_weight(gm: nn.Module, site: Site, adapters=None) -> torch.Tensor:
    """W0 + update, accumulated in fp32 (fp64 for an fp64 weight; one addmm per block, no
    weight-sized temporaries beyond that copy) and cast once to W0's dtype."""
    w0 = gm.get_parameter(site.param)
    factors = _finite_factors(gm, site, adapters)
    w = dequantize(w0).float() if site.quantized else w0.detach().to(_accumulator(w0), copy=True)
    if site.kind != "linear":  # conv, embedding, experts: one delta in the weight's shape
        w += _lora_delta(site, factors, w.device, w.dtype)
    for block, b, a in factors if site.kind == "linear" else ():
        if site.layout == "in_out":  # W0 is [in, out]: the block is a column range
            w[:, block.start:block.stop].addmm_(a.t(), b.t())
        else:
            w[block.start:block.stop].addmm_(b, a)
    magnitude = _magnitude(gm, site, adapters)
    if magnitude is not None:
        w = _dora(w, site, magnitude)
    out = w.to(w0.dtype)
    if w0.dtype == torch.float16 and w0.device.type != "meta" and not torch.isfinite(out).all():
        raise FoldError(f"folding {site.param} overflows float16; fold into a float32 or bfloat16 copy instead")
    return out


def adapter_mix(state: LoraState, adapters) -> dict[str, float]:
    """{name: weight} from a name, a list of names (weight 1 each) or a dict."""
    mix = {adapters: 1.0} if isinstance(adapters, str) else (
        dict(adapters) if isinstance(adapters, dict) else {n: 1.0 for n in adapters})
    if not mix:
        raise FoldError(f"cannot fold an empty set of adapters; this graph has {sorted(state.adapters)}")
    state.check_names(mix, f"cannot fold adapters {list(mix)}")
    return {n: float(w) for n, w in mix.items()}


def _check_not_shared(graph: torch.fx.Graph, feeds: set[torch.fx.Node], site: Site, names: set[str]) -> None:
    """Folding rewrites W0 for every reader: refuse when a reader outside the LoRA match shares it
    (a tied embedding), since the fold would change that reader too. `feeds` is `combine_inputs(graph)`."""

    def inside(user: torch.fx.Node) -> bool:
        if user in feeds or LORA_META in user.meta:
            return True
        return bool(user.users) and all(u in feeds for u in user.users)  # W.T feeding a product

    for node in graph.find_nodes(op="get_attr"):
        if node.target in names:
            outside = [u for u in node.users if not inside(u)]
            if outside:
                raise FoldError(
                    f"{site.param} is also read by {outside[0].name} ({outside[0].target}), outside the "
                    "LoRA match (tied weights?): folding would change that reader too. Keep the model "
                    "unfolded, or untie the weight before inject_lora."
                )


def _inert(graph: torch.fx.Graph, site: Site, names: set[str]) -> bool:
    """A site adapted only inside its module's own forward whose weight this graph reads, but never
    there (nn.MultiheadAttention's out_proj under "all-linear"): no LoRA node uses it, and folding
    its update in would change outputs the unfolded graph computes without it."""
    read = any(node.users for node in graph.find_nodes(op="get_attr") if node.target in names)
    tagged = any(n.meta.get(LORA_META, {}).get("param") == site.param for n in graph.nodes)
    return site.own_calls_only and read and not tagged


def _names_by_param(gm: nn.Module) -> dict[int, set[str]]:
    names: dict[int, set[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), set()).add(name)
    return names


@dataclass(frozen=True)
class RequantizeLoss:
    """What requantizing W0 + scaling * B @ A in the base's format keeps of one adapter's update
    (ΔW), with ΔW' the update the requantized weight actually carries (deq(Q(W0 + ΔW)) - W0)."""

    param: str
    format: str
    kept: float  # <ΔW', ΔW> / ||ΔW||²: the share of ΔW that survives (1 = all; 0 = erased)
    subspace_error: float  # ||Uᵀ(ΔW' - ΔW)V|| / ||ΔW||, U and V spanning ΔW's columns and rows
    weight_error: float  # ||ΔW' - ΔW|| / ||ΔW||
    output_error: float | None  # ||(ΔW' - ΔW) x|| / ||ΔW x|| over a probe batch's activations (None: no probe)

    @property
    def loss(self) -> float:
        """The figure merge_lora's max_loss bounds: the error of the update inside the adapter's own
        rank-r subspace. Requantizing also re-rounds W0 everywhere; that noise is spread over the
        whole matrix and the model shrugs it off (see MAX_REQUANTIZE_LOSS), so the full weight error
        overstates the loss and `kept` alone is noise-dominated when ΔW is tiny."""
        return self.subspace_error


# Requantizing may get at most half of an adapter's update wrong (in any weight, inside the update's
# own subspace) by default. Measured on SmolLM2-135M after a 60-step LoRA run (benchmarks/quantized.py):
# int8 kept 61-100% of ΔW per weight and held-out perplexity moved 81.98 -> 82.04; int4 (groups of 32)
# kept 18-24% on average: 97.4 -> 162; NF4 kept 1-3%: 96.0 -> 207. An update below half a
# quantization step is erased outright (loss about 1).
MAX_REQUANTIZE_LOSS = 0.5


def _site_inputs(gm: LoraGraphModule, probe: dict, sites: list[Site]) -> dict[str, torch.Tensor]:
    """Each site's LoRA input (the activation lora_A reads) on `probe`, flattened to [N, in]."""
    cap = gm.capture_info
    missing = [k for k in cap.input_names if k not in probe]
    if missing:
        raise FoldError(f"the probe batch lacks inputs {missing}; give the inputs the model was captured with "
                        f"({list(cap.input_names)})")
    wanted: dict[torch.fx.Node, list[str]] = {}  # the x of lora_A's product -> its sites
    params = {s.param for s in sites}
    for node in gm.graph.nodes:
        tag = node.meta.get(LORA_META, {})
        if tag.get("param") in params and node.target is torch.ops.aten.linear.default and \
                node.args[1].op == "get_attr" and slot.LORA_A in node.args[1].target.split("."):
            wanted.setdefault(node.args[0], []).append(tag["param"])  # q and v may read one x
    seen: dict[str, list[torch.Tensor]] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            for param in wanted.get(n, ()):
                seen.setdefault(param, []).append(out.detach().reshape(-1, out.shape[-1]).float())
            return out

    flat = pytree.tree_leaves(((), {k: probe[k] for k in cap.input_names}))
    with torch.no_grad():
        Recorder(gm).run(*flat)
    return {p: torch.cat(xs) for p, xs in seen.items()}


def _spans(site: Site, factors: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the column and row spaces of a linear weight's update, from its factors
    (every block's B, zero-padded to the full rows, and A): [out, R] and [in, R]."""
    bs, as_ = [], []
    for block, b, a in factors:
        full = b.new_zeros(site.out_features, b.shape[1])
        full[block.start:block.stop] = b
        bs.append(full)
        as_.append(a)
    return torch.linalg.qr(torch.cat(bs, 1)).Q, torch.linalg.qr(torch.cat(as_, 0).T).Q


def _requantized(gm: LoraGraphModule, site: Site, factors: list[tuple], x: torch.Tensor | None
                 ) -> tuple[RequantizeLoss, torch.Tensor]:
    """W0 + update quantized again in W0's format, and what that keeps of the update (`x`: the site's
    probe activations, or None)."""
    w = gm.get_parameter(site.param)
    w0 = dequantize(w).float()
    delta = _lora_delta(site, factors, w0.device)  # a quantized site is linear: no DoRA, no layout change
    weight = requantize(w0 + delta, w)
    kept_delta = dequantize(weight).float() - w0
    norm = float(delta.norm()) or 1.0
    kept = float((kept_delta * delta).sum()) / norm ** 2
    error = float((kept_delta - delta).norm()) / norm
    u, v = _spans(site, factors)
    inside = float((u.T @ (kept_delta - delta) @ v).norm()) / norm
    out = None
    if x is not None:
        out = float((x @ (kept_delta - delta).T).norm()) / (float((x @ delta.T).norm()) or 1.0)
    return RequantizeLoss(site.param, site.quantized, kept, inside, error, out), weight


def _requantize_all(gm: LoraGraphModule, adapters, probe: dict | None, finite: bool = False
                    ) -> dict[str, tuple[RequantizeLoss, torch.Tensor]]:
    """`_requantized` for every quantized site (refusing NaN / inf factors when `finite`: a fold)."""
    sites = [s for s in gm.lora_state.sites.values() if s.quantized]
    xs = _site_inputs(gm, probe, sites) if probe is not None and sites else {}
    factors = _finite_factors if finite else _factors
    return {s.param: _requantized(gm, s, factors(gm, s, adapters), xs.get(s.param)) for s in sites}


def requantize_loss(gm: LoraGraphModule, adapters=None, probe: dict | None = None) -> list[RequantizeLoss]:
    """What requantizing would keep of the update of every quantized weight (merge_lora's
    quantized="requantize"), measured: on the weights, and on `probe` (the model's inputs) when given."""
    require_lora(gm, "requantize_loss")
    return [row for row, _ in _requantize_all(gm, adapters, probe).values()]


def _folded_weights(gm: LoraGraphModule, state: LoraState, adapters, names_by_param, quantized: str = "refuse",
                    max_loss: float | None = MAX_REQUANTIZE_LOSS, probe: dict | None = None) -> dict[str, torch.Tensor]:
    """W0 + update for every site, after the checks: known adapters, no reader outside the match,
    and a choice for quantized weights."""
    sharded = [n for n, p in gm.named_parameters() if is_shard(p) and not p.requires_grad]
    if sharded:
        raise FoldError(f"{sharded[0]} is sharded across ranks (FSDP2): folding needs whole weights. Save the adapter "
                        "(lora_fx.save_adapter, called on every rank: rank 0 writes), load it into the model on one "
                        "process and fold there")
    if adapters is not None:
        adapter_mix(state, adapters)  # unknown names fail before any work
    requantized = _check_quantized(gm, state, adapters, quantized, max_loss, probe)
    feeds = combine_inputs(gm.graph)
    folded = {}
    for site in state.sites.values():
        names = names_by_param[id(gm.get_parameter(site.param))]
        if _inert(gm.graph, site, names):
            continue  # its LoRA acts nowhere here (PEFT's all-linear on a weight its parent reads): W0 stays
        if site.quantized:  # its readers are its layer's dequantize chain; another name is another reader
            _check_not_shared(gm.graph, feeds, site, names - {site.param})
        else:
            _check_not_shared(gm.graph, feeds, site, names)
        folded[site.param] = requantized[site.param] if site.param in requantized else folded_weight(gm, site, adapters)
        extra = delta_bias(gm, site, adapters)
        if extra is not None:  # lora_bias: into the layer's own bias, in fp32, rounded once
            b0 = gm.get_parameter(site.bias)
            folded[site.bias] = (b0.detach().float() + extra).to(b0.dtype)
    return folded


def _check_quantized(gm: LoraGraphModule, state: LoraState, adapters, quantized: str, max_loss,
                     probe) -> dict[str, torch.Tensor]:
    """Folding into quantized weights is a choice the caller makes, and requantizing one that would
    lose more than `max_loss` of the adapter's effect is refused with the measured figures. Returns
    the requantized weights (quantized="requantize"), measured once for the check and the fold."""
    if quantized not in FOLD_CHOICES:
        raise FoldError(f"quantized={quantized!r}: choose one of {list(FOLD_CHOICES)}")
    sites = [s for s in state.sites.values() if s.quantized]
    if not sites or quantized == "dequantize":
        return {}
    if quantized == "refuse":
        raise FoldError(
            f"{len(sites)} adapted weights are quantized ({sites[0].param}: {sites[0].quantized}); folding into them is a "
            "choice: merge_lora(gm, quantized='dequantize') folds into float copies (exact; the graph becomes the float "
            "model's and the weights take float memory), quantized='requantize' quantizes W0 + scaling*B@A again in "
            "the base's format (same memory; loses what the format cannot hold: see lora_fx.requantize_loss(gm, "
            "probe=inputs)). Or keep LoRA unfolded beside the quantized base")
    measured = _requantize_all(gm, adapters, probe, finite=True)
    lost = [r for r, _ in measured.values() if max_loss is not None and r.loss > max_loss]
    if lost:
        rows = "; ".join(f"{r.param}: {r.kept:.0%} of ΔW kept" + (f", output error {r.output_error:.0%} of ΔW·x"
                         if r.output_error is not None else "") for r in lost[:4])
        raise FoldError(
            f"requantizing in the base's format would lose more than {max_loss:.0%} of the adapter's update on "
            f"{len(lost)} weights: {rows}. Fold with quantized='dequantize' (exact), keep LoRA unfolded, or accept "
            "the loss with max_loss=None")
    return {param: weight for param, (_, weight) in measured.items()}


def _float_capture(gm: LoraGraphModule, folded: dict[str, torch.Tensor]) -> LoraGraphModule:
    """The model captured again over float weights: the folded ones, and every other quantized
    weight dequantized, so the graph is the float model's (quantized='dequantize')."""
    weights = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        if name in folded or is_subclass(p):
            value = folded[name] if name in folded else dequantize(p)
            weights[name] = nn.Parameter(value, requires_grad=False)
    return recapture(gm, None, overrides=weights)


def merge_lora(gm: LoraGraphModule, adapters=None, *, quantized: str = "refuse",
               max_loss: float | None = MAX_REQUANTIZE_LOSS, probe: dict | None = None) -> LoraGraphModule:
    """Fold the LoRA update into each base weight; return a new graph module equal to the capture.

    adapters: None folds what the graph computes now (the active adapters); a name, a list of names
    or {name: weight} folds that (weighted) sum of adapters instead.
    scaling * B @ A is accumulated in fp32 and cast once to W0's dtype. The adapted weights are new
    tensors; other weights are shared with `gm`, except trainable copies, which are cloned, so `gm`
    can keep training without changing the folded module. Folding a folded module returns an equal
    one.

    quantized: what to do with quantized base weights (LoRA trained beside them). "refuse" (the
    default) says what each choice costs; "dequantize" folds into float copies (exact) and every
    quantized weight is dequantized, so the graph is the float model's; "requantize" quantizes
    W0 + scaling * B @ A again in the base's format (graph and memory as the quantized capture) and
    refuses where a weight would keep less than 1 - `max_loss` of its update (None accepts any loss;
    `probe`, the model's inputs, adds the output error to the message; see `requantize_loss`).
    """
    if regions_of(gm) is not None:  # each region folded: each is its untouched graph again
        graphs = {path: merge_lora(g, adapters, quantized=quantized, max_loss=max_loss, probe=None)
                  for path, g in each_region(gm)}
        return with_regions(gm, graphs, folded=True)
    state = gm.lora_state if isinstance(gm, LoraGraphModule) else None
    if state is None:  # a folded graph has a (folded) state: folding it again returns an equal one
        raise FoldError(
            "this module has no LoRA to fold: merge_lora takes the graph module inject_lora (or "
            "load_adapter) returned"
        )
    names_by_param = _names_by_param(gm)
    folded = _folded_weights(gm, state, adapters, names_by_param, quantized, max_loss, probe) if not state.folded else {}
    dequantized = quantized == "dequantize" and any(s.quantized for s in state.sites.values())
    new = _float_capture(gm, folded) if dequantized else base_copy(gm)
    replaced: dict[int, nn.Parameter] = {}
    for name, p in list(new.named_parameters(remove_duplicate=False)):
        if id(p) in replaced:
            set_parameter(new, name, replaced[id(p)])
            continue
        site_name = next((n for n in names_by_param.get(id(p), ()) if n in folded), None)
        if site_name is not None:
            replaced[id(p)] = nn.Parameter(folded[site_name], requires_grad=False)
        elif p.requires_grad:  # trainable copies (a new head): snapshot them
            replaced[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
        else:
            continue
        set_parameter(new, name, replaced[id(p)])
    # the folded graph keeps what was adapted and the report, not the adapters (they are in its weights)
    new.lora_state = replace(state, sites=dict(state.sites), adapters={}, active=[], folded=True, weight_form=set())
    return new


def merge_and_unload(gm: LoraGraphModule, adapters=None, *, quantized: str = "refuse",
                     max_loss: float | None = MAX_REQUANTIZE_LOSS, probe: dict | None = None) -> nn.Module:
    """The user's model class again (e.g. `LlamaForCausalLM`), with the LoRA update folded into the
    adapted weights as `merge_lora` folds it (fp32 accumulation, one rounding); `generate()`,
    `save_pretrained()` and everything else of the class work on it.

    Every other parameter and buffer is the user's model's own tensor, shared (or the graph's, where
    the graph was moved to another dtype or device, and the trained copies of `trainable` modules);
    the user's model and `gm` are left as they were. `adapters`, `quantized`, `max_loss` and `probe` as
    in `merge_lora` (quantized="dequantize": every quantized weight of the model becomes a float one).
    """
    regions = regions_of(gm)
    if regions is not None:  # the model's own weights, each region's folded in under its path
        folded = {}
        for path, g in each_region(gm):
            state = require_lora(g, "merge_and_unload")
            local = _folded_weights(g, state, adapters, _names_by_param(g), quantized, max_loss, None)
            folded.update({join(path, n): w for n, w in local.items()})
        own = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
        return _merged(regions.source, folded, own, gm.training)
    state = require_lora(gm, "merge_and_unload")
    source = gm.capture_info.source if gm.capture_info is not None else None
    if source is None:
        raise FoldError("merge_and_unload needs the model this graph was captured from; use merge_lora for a graph module")
    folded = _folded_weights(gm, state, adapters, _names_by_param(gm), quantized, max_loss, probe)
    if quantized == "dequantize":
        folded.update({n: dequantize(p) for n, p in gm.named_parameters() if is_subclass(p) and n not in folded})
    own = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    return _merged(source, folded, own, gm.training)


def _merged(source: nn.Module, folded: dict[str, torch.Tensor], own: dict[str, torch.Tensor], training: bool) -> nn.Module:
    """A copy of `source` whose weights are `folded`'s where given, else its own, shared (or `own`'s, the
    graph's, where it moved to another dtype or device or trained a copy)."""
    memo: dict[int, object] = {}
    for name, t in (*source.named_parameters(remove_duplicate=False), *source.named_buffers(remove_duplicate=False)):
        if id(t) in memo:
            continue
        mine = own.get(name, t)
        if name in folded:
            memo[id(t)] = nn.Parameter(folded[name], requires_grad=t.requires_grad)
        elif isinstance(t, nn.Parameter) and mine.requires_grad:  # a trained copy (a new head): snapshot it
            memo[id(t)] = nn.Parameter(mine.detach().clone(), requires_grad=t.requires_grad)
        elif _same_tensor(mine, t):
            memo[id(t)] = t
        else:  # the graph moved to another dtype or device: the merged model follows the graph
            memo[id(t)] = nn.Parameter(mine.detach(), requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else mine
    merged = copy.deepcopy(source, memo)  # module objects and configs copied, tensors as chosen above
    merged.train(training)
    return merged


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            and (a.device.type == "meta" or a.data_ptr() == b.data_ptr()))
