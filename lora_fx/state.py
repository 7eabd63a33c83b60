"""LoRA's state on an injected graph module, as plain data.

A *site* is one adapted weight (which rows, which layout); an *adapter* is one set of LoRA weights
over some sites with its hyper-parameters; the state says which adapters exist and which are active.
The graph's LoRA parameters (the *slots*) are owned by `lora_fx.slot`; this module only describes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import AdapterNameError
from .report import InjectReport

# an adapter's weights: weight name -> [(lora_A, lora_B) per row block]
Weights = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of a weight's output dimension that get their own LoRA update."""

    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class Site:
    """One adapted weight."""

    param: str  # the weight's name in the graph module (its get_attr target)
    owner: str  # the module path the target matched
    holder: str  # the module path where lora_A / lora_B live
    layout: str  # "out_in" (nn.Linear, F.linear) or "in_out" (GPT-2 Conv1D)
    in_features: int
    out_features: int
    blocks: tuple[Block, ...]  # rows that get an update
    fused: bool  # blocks come from a fused-projection spec (named per block)

    def max_rank(self) -> int:
        """The largest rank a LoRA update of this weight can have: min(in, rows) over blocks."""
        return min(min(self.in_features, b.stop - b.start) for b in self.blocks)


@dataclass(frozen=True)
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
    # None while the adapter is active: the slots hold its weights then (read them with slot.read)
    weights: Weights | None

    def scaling(self, param: str) -> float:
        """alpha / rank of this adapter on one site (the paper's scaling)."""
        return self.alphas[param] / self.ranks[param]


@dataclass
class LoraState:
    """LoRA's bookkeeping on an injected graph module (shared with the graphs it captures for other inputs)."""

    slot: str  # the name the graph's LoRA modules carry (the first adapter's)
    sites: dict[str, Site]  # weight name -> site, over all adapters
    adapters: dict[str, Adapter]
    active: list[str]
    trainable_modules: list[str]
    exclude: str | None = None  # output layer left out of "all-linear"
    report: InjectReport | None = None  # what inject_lora did
    folded: bool = False
    weight_form: set[str] = field(default_factory=set)  # sites whose uses are adapted as W + s*B@A

    def adapter(self, name: str | None) -> Adapter:
        """Adapter `name`; None means the default one: the first active, else the first added."""
        if name is None:
            if not self.adapters:
                raise AdapterNameError("this graph holds no adapter")
            name = self.active[0] if self.active else next(iter(self.adapters))
        found = self.adapters.get(name)
        if found is None:
            raise AdapterNameError(
                f"no adapter named {name!r}; this graph has {sorted(self.adapters)}. Add one with "
                "lora_fx.add_adapter or lora_fx.load_adapter(gm, folder, name=...)"
            )
        return found

    def check_names(self, names, doing: str = "") -> None:
        """Every name in `names` is an adapter of this graph (else AdapterNameError, prefixed by `doing`)."""
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            try:
                self.adapter(unknown[0])
            except AdapterNameError as e:
                raise AdapterNameError(f"{doing}: {e}" if doing else str(e)) from None

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply `fn` (a device or dtype move) to the weights of the inactive adapters."""
        for adapter in self.adapters.values():
            if adapter.weights is not None:
                adapter.weights = {p: [(fn(a), fn(b)) for a, b in pairs] for p, pairs in adapter.weights.items()}
