"""The LoRA slot: where one adapted weight's LoRA lives in the graph module, its names, and its contents.

Per adapted weight (a site) the graph holds one slot, named after the first adapter (PEFT's names):

    <holder>.lora_A.<slot>.weight        [R, in]    (.block<i>.weight per block of a fused projection)
    <holder>.lora_B.<slot>.weight        [rows, R]
    <holder>.lora_scaling.<slot>.scale   [R]        alpha / rank of the adapter owning each row; 0 if unused
    <holder>.lora_dropout.<slot>         nn.Dropout, when an adapter on the site has LoRA dropout
    <holder>.lora_magnitude_vector.<slot>.weight  [out]   DoRA's magnitude, when an adapter on the site is DoRA
    <holder>.lora_B.<slot>.bias          [out]      lora_B's bias, when an adapter on the site has lora_bias

R is the rank the active adapters need side by side (at least the largest adapter's). Activating
adapters copies their weights into the slot in place, zero-padded (which is exact), so switching needs
no new graph and no recompile. Inactive adapters live outside the graph (`Adapter.weights`); an active
adapter's weights exist only in the slot (that is what trains). This module is the only place that
spells these names, in the graph module and in PEFT's files.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .graph_module import LoraGraphModule
from .paths import is_shard, resolve, set_module
from .state import Adapter, LoraState, Site, Weights

LORA_A, LORA_B = "lora_A", "lora_B"
LORA_M = "lora_magnitude_vector"  # DoRA's magnitude (PEFT's name)
LORA_BIAS = "lora_bias"  # lora_B's bias (PEFT's lora_bias): `<holder>.lora_B.<slot>.bias`
EMBEDDING = {LORA_A: "lora_embedding_A", LORA_B: "lora_embedding_B"}  # PEFT's names on nn.Embedding
FILE_PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors

# the holder is "" in a region's or a layer's own graph (LoRA on the module itself)
_HOLDER = r"^(?:(?P<holder>.+)\.)?"
_MODULE_NAME = re.compile(_HOLDER + r"(?P<which>lora_[AB]|lora_magnitude_vector)\.(?P<slot>[^.]+)(?:\.block(?P<block>\d+))?\.weight$")
_FILE_KEY = re.compile(_HOLDER + r"(?P<which>lora_[AB])(?:\.block(?P<block>\d+))?\.weight$")
_BIAS_NAME = re.compile(_HOLDER + r"lora_B\.(?P<slot>[^.]+)\.bias$")
_BIAS_KEY = re.compile(_HOLDER + r"lora_B\.bias$")
_EMBEDDING_KEY = re.compile(_HOLDER + r"lora_embedding_(?P<which>[AB])$")
_MAGNITUDE_KEY = re.compile(_HOLDER + r"lora_magnitude_vector$")
_SCALE_NAME = re.compile(_HOLDER + r"lora_scaling\.(?P<slot>[^.]+)\.scale$")


class LoraWeight(nn.Module):
    """A LoRA factor that is not an nn.Linear's weight (conv, embedding, experts): one `weight`, and
    for a lora_B with lora_bias a `bias`."""

    def __init__(self, shape: tuple[int, ...], device=None, dtype=None, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(shape[0], device=device, dtype=dtype)) if bias else None


class LoraMagnitude(nn.Module):
    """DoRA's magnitude m ([out]) and a switch `on` (1 while a DoRA adapter is active, else 0: then the
    site computes plain LoRA)."""

    def __init__(self, out_features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        self.register_buffer("on", torch.zeros((), device=device, dtype=dtype), persistent=False)


class LoraScaling(nn.Module):
    """Per-rank-row scaling (alpha / rank of the adapter owning the row; 0 for unused rows)."""

    def __init__(self, rank: int, device=None, dtype=None):
        super().__init__()
        self.register_buffer("scale", torch.zeros(rank, device=device, dtype=dtype), persistent=False)


# ----------------------------------------------------------------------------------------- names
def _under(holder: str, rest: str) -> str:
    """`rest` under module path `holder` ("" is the module itself: a layer's own graph)."""
    return f"{holder}.{rest}" if holder else rest


def weight_path(site: Site, which: str, slot: str, block_index: int) -> str:
    """Where a LoRA weight lives: `<holder>.lora_A.<slot>.weight`, or `...<slot>.block<i>.weight`."""
    if site.fused:
        return _under(site.holder, f"{which}.{slot}.block{block_index}.weight")
    return _under(site.holder, f"{which}.{slot}.weight")


def scale_path(site: Site, slot: str) -> str:
    return _under(site.holder, f"lora_scaling.{slot}.scale")


def dropout_path(site: Site, slot: str) -> str:
    return _under(site.holder, f"lora_dropout.{slot}")


def bias_path(site: Site, slot: str) -> str:
    """lora_B's bias (lora_bias): `<holder>.lora_B.<slot>.bias`."""
    return _under(site.holder, f"{LORA_B}.{slot}.bias")


def magnitude_path(site: Site, slot: str) -> str:
    """DoRA's LoraMagnitude module of a site: `<holder>.lora_magnitude_vector.<slot>`."""
    return _under(site.holder, f"{LORA_M}.{slot}")


@dataclass(frozen=True)
class LoraName:
    """A LoRA weight's name taken apart."""

    holder: str  # module path the weight belongs to
    which: str  # LORA_A or LORA_B
    slot: str | None  # the adapter / slot name (None in PEFT's files, which hold one adapter)
    block: int | None  # block of a fused projection, None for a whole weight
    embedding: bool = False  # PEFT's embedding spelling: `<holder>.lora_embedding_A`, no `.weight`

    @property
    def slot_free(self) -> str:
        """The name without the slot: `<holder>.lora_A[.block<i>].weight`, or for an embedding in a
        file `<holder>.lora_embedding_A` (PEFT's file keys, unprefixed)."""
        if self.embedding:
            return _under(self.holder, EMBEDDING[self.which])
        if self.which == LORA_M:  # PEFT's files spell DoRA's magnitude without `.weight`
            return _under(self.holder, LORA_M)
        return self.module_name

    @property
    def module_name(self) -> str:
        """The slot-free name as a graph module spells it (`<holder>.lora_A[.block<i>].weight`, an
        embedding's too; `<holder>.lora_B.bias`): what a multi-adapter export calls the weight."""
        if self.which == LORA_BIAS:
            return _under(self.holder, f"{LORA_B}.bias")
        return _under(self.holder, f"{self.which}{'' if self.block is None else f'.block{self.block}'}.weight")

    def matches(self, site: Site, holder: str) -> bool:
        """Whether this file weight belongs to `site`, whose file holder is `holder` (fused or not,
        one of its blocks)."""
        if self.holder != holder or (self.block is None) == site.fused:
            return False
        return (self.block or 0) in {b.index for b in site.blocks}


def _name(m: re.Match | None, slot: bool) -> LoraName | None:
    if m is None:
        return None
    return LoraName((m["holder"] or ""), m["which"], m["slot"] if slot else None, None if m["block"] is None else int(m["block"]))


def parse_name(name: str) -> LoraName | None:
    """A graph module's LoRA weight name (`...q_proj.lora_A.default.weight`) taken apart, or None."""
    m = _BIAS_NAME.match(name)
    if m is not None:
        return LoraName((m["holder"] or ""), LORA_BIAS, m["slot"], None)
    return _name(_MODULE_NAME.match(name), slot=True)


def parse_slot_free(name: str) -> LoraName | None:
    """A slot-free LoRA weight name (`<holder>.lora_A[.block<i>].weight`) taken apart, or None."""
    return _name(_FILE_KEY.match(name), slot=False)


def parse_file_key(key: str) -> LoraName | None:
    """A PEFT file key (`base_model.model.<holder>.lora_A.weight`) taken apart, or None for a key
    that is not a LoRA weight (a modules_to_save weight)."""
    if not key.startswith(FILE_PREFIX):
        return None
    m = _EMBEDDING_KEY.match(key[len(FILE_PREFIX):])
    if m is not None:
        return LoraName((m["holder"] or ""), f"lora_{m['which']}", None, None, embedding=True)
    m = _MAGNITUDE_KEY.match(key[len(FILE_PREFIX):])
    if m is not None:
        return LoraName((m["holder"] or ""), LORA_M, None, None)
    m = _BIAS_KEY.match(key[len(FILE_PREFIX):])
    if m is not None:
        return LoraName((m["holder"] or ""), LORA_BIAS, None, None)
    return parse_slot_free(key[len(FILE_PREFIX):])


def file_holders(sites: list[Site]) -> dict[str, str]:
    """The holder PEFT's files spell for each site's LoRA (by weight name). PEFT wraps a module once
    per targeted parameter, the first registered innermost, so with k parameters of one module
    targeted the i-th one's LoRA sits under `base_layer` k-1-i times."""
    out = {s.param: s.file_path for s in sites}
    by_owner: dict[str, list[Site]] = {}
    for s in sites:
        if s.file_param:
            by_owner.setdefault(s.param.rpartition(".")[0], []).append(s)
    for owner, group in by_owner.items():
        for i, s in enumerate(group):  # sites come in the module's registration order
            out[s.param] = ".".join(filter(None, [owner] + ["base_layer"] * (len(group) - 1 - i)))  # owner "": a region's own module
    return out


def file_name(site: Site, holder: str, which: str, block_index: int) -> LoraName:
    """The name of one LoRA weight of `site` in PEFT's files (`holder` from `file_holders`)."""
    return LoraName(holder, which, None, block_index if site.fused else None, embedding=site.kind == "embedding")


def to_file(site: Site, which: str, t: torch.Tensor) -> torch.Tensor:
    """A LoRA factor in PEFT's file layout. Experts: lora_A [E*r, in] expert-major (row e*r + k),
    lora_B [out, r*E] expert-minor (column k*E + e), as PEFT's ParamWrapper stores them. A conv's
    DoRA magnitude: [1, out, 1, ...]."""
    if which == LORA_M:
        return t.reshape(1, -1, *(1,) * (len(site.shape) - 2)) if site.kind == "conv" else t
    if site.kind != "experts":
        return t
    if which == LORA_A:
        return t.reshape(-1, t.shape[-1])
    return t.permute(1, 2, 0).reshape(t.shape[1], -1)


def from_file(site: Site, which: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_file`: a factor from PEFT's file in the slot's layout."""
    if which == LORA_M:
        return t.reshape(-1)
    if site.kind != "experts" or t.dim() != 2:
        return t
    e = site.experts
    if which == LORA_A:
        return t.reshape(e, -1, t.shape[-1])
    return t.reshape(t.shape[0], -1, e).permute(2, 0, 1).contiguous()


def scale_slot_free(holder: str) -> str:
    """The slot-free name of a holder's scaling (`<holder>.lora_scaling`)."""
    return _under(holder, "lora_scaling")


def scale_holder(slot_free: str) -> str | None:
    """The holder of a slot-free scaling name (`<holder>.lora_scaling`), or None."""
    holder, _, leaf = slot_free.rpartition(".")
    return holder if leaf == "lora_scaling" and holder else None


def slot_free_name(name: str, slot: str) -> str | None:
    """The slot-independent name of a LoRA weight or scale of `slot` (`<holder>.lora_A.weight`,
    `<holder>.lora_scaling`), or None for any other name."""
    parsed = parse_name(name)
    if parsed is not None and parsed.slot == slot:
        return parsed.slot_free
    m = _SCALE_NAME.match(name)
    if m is not None and m["slot"] == slot:
        return scale_slot_free((m["holder"] or ""))
    return None


def lora_parameters(gm: nn.Module, which: str | None = None) -> dict[str, nn.Parameter]:
    """The LoRA weights in `gm` by name (all, or only LORA_A / LORA_B / LORA_M, DoRA's magnitudes):
    what trains, what to initialise or inspect. Empty for a module without LoRA."""
    out = {}
    for name, p in gm.named_parameters():
        parsed = parse_name(name)
        if parsed is not None and (which is None or parsed.which == which):
            out[name] = p
    return out


# ------------------------------------------------------------------------------------- shape
def rank_of(gm: nn.Module, site: Site, slot: str) -> int:
    """Rows the slot of `site` has now (0 if it has none yet)."""
    scaling = resolve(gm, scale_path(site, slot))
    return 0 if scaling is None else scaling.shape[0]


def needed_rank(state: LoraState, param: str) -> int:
    """Rows a site's slot needs: the largest adapter on it, or the active ones side by side."""
    ranks = [a.ranks[param] for a in state.adapters.values() if param in a.ranks]
    active = sum(state.adapters[n].ranks.get(param, 0) for n in state.active)
    return max(ranks + [active, 1])


def dropout_p(state: LoraState, param: str) -> float:
    """The LoRA dropout a site's slot applies: the largest of the adapters on it (0: no module)."""
    return max((a.config.dropout for a in state.adapters.values() if param in a.ranks), default=0.0)


def has_dropout(gm: nn.Module, site: Site, slot: str) -> bool:
    return resolve(gm, dropout_path(site, slot)) is not None


def magnitude(gm: nn.Module, site: Site, slot: str) -> LoraMagnitude | None:
    """A site's DoRA magnitude module, or None."""
    return resolve(gm, magnitude_path(site, slot))


def has_magnitude(gm: nn.Module, site: Site, slot: str) -> bool:
    return magnitude(gm, site, slot) is not None


def lora_bias(gm: nn.Module, site: Site, slot: str) -> nn.Parameter | None:
    """lora_B's bias of a site's slot, or None."""
    b = resolve(gm, weight_path(site, LORA_B, slot, 0).rpartition(".")[0])
    return getattr(b, "bias", None)


def fits(gm: nn.Module, state: LoraState, site: Site) -> bool:
    """Whether the slot of `site` has the rows, the dropout module and the DoRA magnitude the adapters need."""
    return (rank_of(gm, site, state.slot) >= needed_rank(state, site.param)
            and has_dropout(gm, site, state.slot) == (dropout_p(state, site.param) > 0)
            and has_magnitude(gm, site, state.slot) == (site.param in state.dora_sites())
            and (lora_bias(gm, site, state.slot) is not None) == (site.param in state.bias_sites()))


def install(gm: nn.Module, site: Site, slot: str, rank: int, dropout: float, like: torch.Tensor,
            dora: bool = False, bias: bool = False) -> None:
    """Create (or resize) a site's slot: zero lora_A / lora_B of `rank` rows, zero scaling, a
    dropout module when `dropout` > 0, DoRA's magnitude when `dora`, lora_B's bias when `bias`."""
    kw = dict(bias=False, device=like.device, dtype=like.dtype)

    def holder(which):
        found = resolve(gm, _under(site.holder, which))
        if found is None:
            found = nn.ModuleDict()
            set_module(gm, _under(site.holder, which), found)
        return found

    def zero_linear(n_in, n_out, bias=False):  # nn.Linear for PEFT's layout, without a random init to throw away
        m = nn.utils.skip_init(nn.Linear, n_in, n_out, **{**kw, "bias": bias})
        for p in m.parameters():
            nn.init.zeros_(p)
        return m

    if site.kind == "linear":  # PEFT's nn.Linear pair
        a_mods = {f"block{b.index}": zero_linear(site.in_features, rank) for b in site.blocks}
        b_mods = {f"block{b.index}": zero_linear(rank, b.stop - b.start, bias) for b in site.blocks}
    else:
        a_mods = {"block0": LoraWeight(site.a_shape(rank), like.device, like.dtype)}
        b_mods = {"block0": LoraWeight(site.b_shape(site.out_features, rank), like.device, like.dtype, bias)}
    holder(LORA_A)[slot] = nn.ModuleDict(a_mods) if site.fused else a_mods["block0"]
    holder(LORA_B)[slot] = nn.ModuleDict(b_mods) if site.fused else b_mods["block0"]
    holder("lora_scaling")[slot] = LoraScaling(rank, device=like.device, dtype=like.dtype)
    drops = holder("lora_dropout")
    if dropout > 0:
        drops[slot] = nn.Dropout(dropout).train(gm.training)  # a new module must not switch dropout on in eval
    elif slot in drops:
        del drops[slot]
    magnitudes = holder(LORA_M)
    if dora:
        magnitudes[slot] = LoraMagnitude(site.out_features, like.device, like.dtype)
    elif slot in magnitudes:
        del magnitudes[slot]


# ---------------------------------------------------------------------------------- contents
def tensors(gm: nn.Module, site: Site, slot: str) -> tuple[torch.Tensor, list[tuple[nn.Parameter, nn.Parameter]]]:
    """A site's slot as it is: the scale buffer and (lora_A, lora_B) per block."""
    pairs = [(gm.get_parameter(weight_path(site, LORA_A, slot, b.index)),
              gm.get_parameter(weight_path(site, LORA_B, slot, b.index))) for b in site.blocks]
    return gm.get_buffer(scale_path(site, slot)), pairs


def placement(state: LoraState, param: str, names: list[str]) -> list[tuple[Adapter, int]]:
    """Where each adapter in `names` sits in a site's slot rows: (adapter, first row)."""
    out, offset = [], 0
    for name in names:
        adapter = state.adapters[name]
        if param in adapter.ranks:
            out.append((adapter, offset))
            offset += adapter.ranks[param]
    return out


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A LoRA weight, detached and whole: a shard (an FSDP2 DTensor) is gathered from every rank first,
    so every rank must call what reads it."""
    t = t.detach()
    return t.full_tensor() if is_shard(t) else t


def read(gm: nn.Module, state: LoraState, name: str) -> Weights:
    """Adapter `name`'s weights: copies out of the slots when it is active, else its own."""
    adapter = state.adapter(name)
    if name not in state.active:
        return adapter.weights
    out = {}
    for param, site in state.sites.items():
        da, db = site.rank_dims
        for owner, offset in placement(state, param, state.active):
            if owner is adapter:
                r = adapter.ranks[param]
                out[param] = [(_whole(a).narrow(da, offset, r).clone(), _whole(b).narrow(db, offset, r).clone())
                              for a, b in tensors(gm, site, state.slot)[1]]
    return out


def read_magnitudes(gm: nn.Module, state: LoraState, name: str) -> dict[str, torch.Tensor] | None:
    """DoRA adapter `name`'s magnitudes (copies out of the slots when it is active), None without DoRA."""
    adapter = state.adapter(name)
    if not adapter.config.use_dora or name not in state.active:
        return adapter.magnitudes
    return {p: magnitude(gm, state.sites[p], state.slot).weight.detach().clone() for p in adapter.ranks}


def read_biases(gm: nn.Module, state: LoraState, name: str) -> dict[str, torch.Tensor] | None:
    """lora_bias adapter `name`'s lora_B biases (copies out of the slots when active), None without."""
    adapter = state.adapter(name)
    if not adapter.config.lora_bias or name not in state.active:
        return adapter.biases
    return {p: lora_bias(gm, state.sites[p], state.slot).detach().clone() for p in adapter.ranks}


def write_back(gm: nn.Module, state: LoraState) -> None:
    """Move the active adapters' weights out of the slots into their own copies (before the slots change)."""
    for name in state.active:
        state.adapters[name].biases = read_biases(gm, state, name)
        state.adapters[name].magnitudes = read_magnitudes(gm, state, name)
        state.adapters[name].weights = read(gm, state, name)


def fill(gm: nn.Module, state: LoraState) -> None:
    """Move the active adapters into the slots (in place) and drop their own copies, so an adapter's
    weights exist once; `write_back` moves them out again."""
    with torch.no_grad():
        for param, site in state.sites.items():
            scale, slots = tensors(gm, site, state.slot)
            scale.zero_()
            for a_slot, b_slot in slots:
                a_slot.zero_()
                b_slot.zero_()
            placed = placement(state, param, state.active)
            da, db = site.rank_dims
            for adapter, offset in placed:
                r = adapter.ranks[param]
                for (a_slot, b_slot), (a, b) in zip(slots, adapter.weights[param]):
                    a_slot.narrow(da, offset, r).copy_(a)
                    b_slot.narrow(db, offset, r).copy_(b)
                scale[offset:offset + r] = adapter.scaling(param)
            drop = resolve(gm, dropout_path(site, state.slot))
            if drop is not None and placed:
                drop.p = placed[0][0].config.dropout
            m = magnitude(gm, site, state.slot)
            if m is not None:
                dora = [a for a, _ in placed if a.config.use_dora]  # at most one: DoRA adapters are not summed
                m.on.fill_(1.0 if dora else 0.0)
                if dora:
                    m.weight.copy_(dora[0].magnitudes[param])
            bias = lora_bias(gm, site, state.slot)
            if bias is not None:
                bias.zero_()
                biased = [a for a, _ in placed if a.config.lora_bias]  # at most one, and alone (row 0 holds its scale)
                if biased:
                    bias.copy_(biased[0].biases[param])
    for name in state.active:
        state.adapters[name].weights = None
        state.adapters[name].magnitudes = None
        state.adapters[name].biases = None


def scales(gm: nn.Module, state: LoraState) -> list[torch.Tensor]:
    """Every site's scale buffer and DoRA switch (zeroing them turns LoRA off without touching its weights)."""
    out = [gm.get_buffer(scale_path(site, state.slot)) for site in state.sites.values()]
    return out + [magnitude(gm, s, state.slot).on for s in state.sites.values() if has_magnitude(gm, s, state.slot)]


def share(primary: LoraGraphModule, other: LoraGraphModule, state: LoraState) -> None:
    """Give `other` the very slot modules of `primary` (a graph of the same model for other inputs)."""
    for site in state.sites.values():
        for which in (LORA_A, LORA_B, "lora_scaling", "lora_dropout", LORA_M):
            module = resolve(primary, _under(site.holder, which))
            if module is not None:
                set_module(other, _under(site.holder, which), module)
