"""What a pass did, as data with a readable str()."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NearMiss:
    """A target that matched something LoRA did not adapt, and why."""

    target: str
    path: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.target!r}" + (f" -> {self.path}" if self.path else "") + f": {self.reason}"


@dataclass
class SiteRow:
    param: str
    owner: str
    layout: str
    blocks: str
    uses: dict[str, int]
    left_alone: list[str]


@dataclass(frozen=True)
class LoftQRow:
    """What LoftQ did to one weight: relative errors ||W - W'|| / ||W|| (Frobenius) of the base the
    model had (W' = deq(Q(W))) and of the start LoftQ gives (W' = deq(Q_T) + scaling * B @ A)."""

    param: str
    format: str
    iterations: int
    error_before: float
    error_after: float

    @property
    def reduction(self) -> float:
        """The share of the quantization error LoftQ removes (0: none, 1: all)."""
        return 1 - self.error_after / self.error_before if self.error_before else 0.0


@dataclass
class InjectReport:
    adapter: str
    rank: int
    alpha: float
    dropout: float
    init: str
    sites: list[SiteRow]
    counters: dict[str, int]  # rewritten uses by kind: linear, addmm, matmul, weight
    trainable_params: int
    total_params: int
    lora_params: int
    trainable_modules: list[str]
    near_misses: list[NearMiss] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loftq: list[LoftQRow] = field(default_factory=list)  # init="loftq": per quantized weight

    @property
    def matched(self) -> list[str]:
        return [s.param for s in self.sites]

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        lines = [
            f"LoRA adapter {self.adapter!r}: rank {self.rank}, alpha {self.alpha:g}, dropout {self.dropout:g}, init {self.init}",
            f"adapted {len(self.sites)} weights; rewritten uses: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.counters.items())),
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_share:.4f}%; LoRA {self.lora_params:,})",
        ]
        if self.trainable_modules:
            lines.append(f"fully trained (copied) modules: {', '.join(self.trainable_modules)}")
        width = max((len(s.param) for s in self.sites), default=10)
        for s in self.sites:
            uses = ", ".join(f"{k} x{v}" for k, v in sorted(s.uses.items()))
            lines.append(f"  {s.param:<{width}}  {s.layout}  {s.blocks:<14} {uses}")
            lines.extend(f"    left alone: {why}" for why in s.left_alone)
        if self.loftq:
            before = sum(r.error_before for r in self.loftq) / len(self.loftq)
            after = sum(r.error_after for r in self.loftq) / len(self.loftq)
            lines.append(f"LoftQ ({self.loftq[0].iterations} iterations) on {len(self.loftq)} quantized weights: "
                         f"mean relative error {before:.4f} -> {after:.4f}")
        lines.extend(f"near miss: {n}" for n in self.near_misses)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)
