"""LoRA's state on an injected graph module, as plain data.

A *site* is one adapted weight (which rows, which layout); an *adapter* is one set of LoRA weights
over some sites with its hyper-parameters; the state says which adapters exist and which are active.
The graph's LoRA parameters (the *slots*) are owned by `lora_fx.slot`; this module only describes.
"""
from __future__ import annotations

import math
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
    """One adapted weight.

    Every kind of weight is adapted as a matrix W0 [out, in] (batched over experts) plus
    scaling * B @ A; `kind` says how that matrix sits in the weight and how LoRA's factors are
    stored (PEFT's layouts):
        linear     W [out, in] or [in, out] (layout)     A [r, in]           B [out, r]
        conv       W [out, in/groups, *kernel]           A [r, in/groups, *kernel]  B [out, r, 1, ...]
        embedding  W [num, dim]: in = num, out = dim     A [r, num]          B [dim, r]
        experts    W [E, out, in] or [E, in, out]        A [E, r, in]        B [E, out, r]
    """

    param: str  # the weight's name in the graph module (its get_attr target)
    owner: str  # the module path the target matched
    holder: str  # the module path where lora_A / lora_B live
    layout: str  # "out_in" (nn.Linear, F.linear) or "in_out" (GPT-2 Conv1D, an embedding, gpt-oss experts)
    in_features: int
    out_features: int
    blocks: tuple[Block, ...]  # rows that get an update
    fused: bool  # blocks come from a fused-projection spec (named per block)
    file_holder: str = ""  # the holder as PEFT's files spell it, when not `holder` (nn.MultiheadAttention's out_proj)
    kind: str = "linear"  # "linear" | "conv" | "embedding" | "experts"
    shape: tuple[int, ...] = ()  # the weight's shape
    by_parameter: bool = False  # named by parameter path (PEFT's target_parameters), not by module
    bias: str | None = None  # the bias parameter every product of this weight adds (where lora_bias folds)
    groups: int = 1  # a grouped convolution's groups
    quantized: str = ""  # the base weight's quantization format ("int8", "intx", "nf4"), "" for a float weight
    # how PEFT's files reach it: "module" (target_modules), "parameter" (target_parameters: named so, or
    # its module is not one PEFT wraps but reads it in its own forward, as a router calling F.linear),
    # "none" (read outside its module's forward: PEFT cannot wrap it at all)
    peft_target: str = "module"
    # only the uses inside the module's own forward are adapted ("all-linear": where PEFT's wrapper acts)
    own_calls_only: bool = False

    @property
    def file_param(self) -> bool:
        """PEFT's files name this weight by parameter path (target_parameters)."""
        return self.by_parameter or self.peft_target == "parameter"

    @property
    def file_path(self) -> str:
        return self.file_holder or self.holder

    @property
    def experts(self) -> int:
        """Experts stacked in the weight (0 for one matrix)."""
        return self.shape[0] if self.kind == "experts" else 0

    @property
    def rank_dims(self) -> tuple[int, int]:
        """The dimension of A and of B that holds the rank."""
        return (1, 2) if self.kind == "experts" else (0, 1)

    def a_shape(self, rank: int) -> tuple[int, ...]:
        if self.kind == "conv":
            return (rank, *self.shape[1:])
        if self.kind == "experts":
            return (self.experts, rank, self.in_features)
        return (rank, self.in_features)

    def b_shape(self, rows: int, rank: int) -> tuple[int, ...]:
        if self.kind == "conv":
            return (rows, rank, *(1,) * (len(self.shape) - 2))
        if self.kind == "experts":
            return (self.experts, rows, rank)
        return (rows, rank)

    def as_matrix(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B as matrices (batched over experts): [.., r, in] and [.., out, r]."""
        if self.kind == "conv":
            return a.flatten(1), b.flatten(1)
        return a, b

    @property
    def in_dims(self) -> list[int]:
        """The weight's dimensions that are inputs (DoRA's norm runs over them, one value per output)."""
        return [0] if self.layout == "in_out" else list(range(1, len(self.shape)))

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """A linear weight as LoRA's [out, in] matrix (GPT-2's Conv1D stores [in, out])."""
        return weight.transpose(-1, -2) if self.layout == "in_out" else weight

    def as_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """A matrix update [.., out, in] in the weight's own shape."""
        if self.layout == "in_out":
            delta = delta.transpose(-1, -2)
        return delta.reshape(self.shape) if self.kind == "conv" else delta


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
    target_parameters: tuple[str, ...] | None = None  # PEFT's target_parameters (MoE expert stacks, ...)
    use_rslora: bool = False  # scaling = alpha / sqrt(rank) (rsLoRA) instead of alpha / rank
    use_dora: bool = False  # DoRA: W' = m * (W0 + scaling * B @ A) / ||W0 + scaling * B @ A|| (per output)
    lora_bias: bool = False  # PEFT's lora_bias: lora_B has a bias too, folded into the layer's bias
    loftq_iterations: int = 0  # init="loftq": PEFT's loftq_iter (the base in the graph is LoftQ's, not the model's)
    # PEFT's exclude_modules / layers_to_transform / layers_pattern, as PEFT's config spells them (None: unused)
    selection: dict = field(default_factory=dict)


@dataclass
class Adapter:
    name: str
    config: LoraConfig
    ranks: dict[str, int]  # site (weight name) -> rank
    alphas: dict[str, float]  # site -> alpha
    # None while the adapter is active: the slots hold its weights then (read them with slot.read)
    weights: Weights | None
    # DoRA's magnitude per site ([out]), None while active (in the slots) or without DoRA
    magnitudes: dict[str, torch.Tensor] | None = None
    # lora_B's bias per site ([out]), None while active (in the slots) or without lora_bias
    biases: dict[str, torch.Tensor] | None = None
    # PiSSA / OLoRA: the factors at init (the base in the graph is W0 - scaling * B0 @ A0), for saving
    # as a plain LoRA on W0; None for the other inits
    initial: Weights | None = None

    def scaling(self, param: str) -> float:
        """alpha / rank of this adapter on one site (the paper's scaling; alpha / sqrt(rank) with rsLoRA)."""
        r = self.ranks[param]
        return self.alphas[param] / (math.sqrt(r) if self.config.use_rslora else r)


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
            if adapter.magnitudes is not None:
                adapter.magnitudes = {p: fn(m) for p, m in adapter.magnitudes.items()}
            if adapter.biases is not None:
                adapter.biases = {p: fn(b) for p, b in adapter.biases.items()}
            if adapter.initial is not None:
                adapter.initial = {p: [(fn(a), fn(b)) for a, b in pairs] for p, pairs in adapter.initial.items()}

    def dora_sites(self) -> set[str]:
        """Sites (weight names) some DoRA adapter adapts: their graph carries DoRA's magnitude."""
        return {p for a in self.adapters.values() if a.config.use_dora for p in a.ranks}

    def bias_sites(self) -> set[str]:
        """Sites some lora_bias adapter adapts: their lora_B has a bias."""
        return {p for a in self.adapters.values() if a.config.lora_bias for p in a.ranks}
