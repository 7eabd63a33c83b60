"""What an adapter learned, in the LoRA paper's terms (Section 7): the spectrum of each update
ΔW = scaling·B·A, the subspace similarity of two adapters of the same weight (Figure 3), and how much
ΔW amplifies directions the pretrained weight does not emphasise (Section 7.3).

Small pure functions over tensors, and `site_table` / `adapter_updates` to get the tensors from an
injected graph or an adapter file. Matrices are [out, in] (conv weights flattened to [out, in·k·k]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import slot
from .adapter_io import AdapterFile
from .fold import delta_weight
from .graph_module import LoraGraphModule, require_lora


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Singular values of a matrix, largest first (fp64)."""
    return torch.linalg.svdvals(delta.detach().double())


def effective_rank(values: torch.Tensor, energy: float = 0.9) -> int:
    """The fewest singular values that hold `energy` of the squared Frobenius norm (0 for a zero matrix)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = values.double() ** 2
    total = power.sum()
    if total == 0:
        return 0
    share = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype) - 1e-12).item()) + 1


def right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """The right-singular vectors of A [r, in] as columns [in, r], strongest first (the paper's U_A)."""
    return torch.linalg.svd(a.detach().double(), full_matrices=False).Vh.T


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """The paper's φ(A1, A2, i, j) = ||U1[:, :i]ᵀ U2[:, :j]||²_F / min(i, j) for i <= r1, j <= r2, from the
    right-singular vectors of two adapters' A [r, in] of the same weight: [r1, r2], 1 where the top-i
    directions of one lie in the top-j of the other, 0 where they are orthogonal."""
    if a1.shape[-1] != a2.shape[-1]:
        raise ValueError(f"A matrices of different inputs: {tuple(a1.shape)} and {tuple(a2.shape)}")
    u1, u2 = right_singular_vectors(a1), right_singular_vectors(a2)
    overlap = (u1.T @ u2) ** 2  # [r1, r2]: squared cosines between single directions
    cumulative = overlap.cumsum(0).cumsum(1)  # ||U1[:, :i]ᵀ U2[:, :j]||²_F at [i-1, j-1]
    i = torch.arange(1, u1.shape[1] + 1, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(1, u2.shape[1] + 1, dtype=torch.float64).unsqueeze(0)
    return cumulative / torch.minimum(i, j)


def random_similarity(r1: int, r2: int, features: int, seed: int = 0) -> torch.Tensor:
    """φ between two random Gaussian matrices [r1, features] and [r2, features]: the paper's baseline."""
    g = torch.Generator().manual_seed(seed)
    return subspace_similarity(torch.randn(r1, features, generator=g, dtype=torch.float64),
                               torch.randn(r2, features, generator=g, dtype=torch.float64))


def amplification(delta: torch.Tensor, w0: torch.Tensor, rank: int | None = None) -> float:
    """||ΔW||_F / ||Uᵀ W0 V||_F with U, V the top-`rank` left / right singular vectors of ΔW (the
    paper's Section 7.3): how much ΔW amplifies the directions it shares with W0. Large when ΔW
    points where W0 is weak."""
    d, w = delta.detach().double(), w0.detach().double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    if not s.numel() or s[0] == 0:
        return 0.0
    r = rank if rank is not None else int((s > s[0] * 1e-10).sum())
    projected = u[:, :r].T @ w @ vh[:r].T
    return float(torch.linalg.matrix_norm(d) / torch.linalg.matrix_norm(projected))


@dataclass(frozen=True)
class SiteRow:
    """One adapted weight in the table: its update's size and shape of spectrum."""

    weight: str
    rank: int
    relative_norm: float | None  # ||ΔW||_F / ||W0||_F (None without the base weight)
    effective_rank: int  # singular values holding 90% of ||ΔW||²
    amplification: float | None  # see `amplification` (None without the base weight)
    random_amplification: float | None  # the same for a random matrix of ΔW's norm and rank


def _row(weight: str, rank: int, delta: torch.Tensor, w0: torch.Tensor | None, seed: int) -> SiteRow:
    values = singular_values(delta)
    if w0 is None:
        return SiteRow(weight, rank, None, effective_rank(values), None, None)
    g = torch.Generator().manual_seed(seed)
    baseline = torch.randn(delta.shape[0], rank, generator=g, dtype=torch.float64) @ \
        torch.randn(rank, delta.shape[1], generator=g, dtype=torch.float64)
    baseline *= torch.linalg.matrix_norm(delta.double()) / torch.linalg.matrix_norm(baseline)  # ΔW's norm
    norm = float(torch.linalg.matrix_norm(w0.double()))
    return SiteRow(weight, rank, float(torch.linalg.matrix_norm(delta.double())) / norm if norm else math.inf,
                   effective_rank(values), amplification(delta, w0, rank), amplification(baseline, w0, rank))


def _matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def site_table(gm: LoraGraphModule, adapter: str | None = None, seed: int = 0) -> list[SiteRow]:
    """A row per weight adapter `adapter` (default: the active one) adapts, with its base weight."""
    state = require_lora(gm, "site_table")
    name = state.adapter(adapter).name
    rows = []
    for param, rank in state.adapters[name].ranks.items():
        site = state.sites[param]
        if site.kind == "experts":  # one row per expert would drown the table: skipped
            continue
        delta = delta_weight(gm, site, name)
        w0 = gm.get_parameter(param)
        if site.layout == "in_out":
            delta, w0 = delta.transpose(-1, -2), w0.transpose(-1, -2)
        rows.append(_row(param, rank, _matrix(delta), _matrix(w0), seed))
    return rows


def adapter_updates(file: AdapterFile) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(ΔW [out, in], A [r, in]) per module of an adapter file (a whole weight's LoRA; fused blocks,
    expert stacks and embeddings are left out), for comparing two adapters without the model."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in file.lora.items():
        if name.which in (slot.LORA_A, slot.LORA_B) and name.block is None and not name.embedding:
            pairs.setdefault(name.holder, {})[name.which] = t
    out = {}
    for holder, ab in sorted(pairs.items()):
        if len(ab) != 2 or ab[slot.LORA_B].shape[1] != ab[slot.LORA_A].shape[0]:
            continue  # an expert stack ([r*E, in] / [out, r*E] are not one product)
        a, b = _matrix(ab[slot.LORA_A]), _matrix(ab[slot.LORA_B])
        out[holder] = (file.scalings[holder] * (b.double() @ a.double()), a)
    return out


def file_table(file: AdapterFile, base: dict[str, torch.Tensor] | None = None, seed: int = 0) -> list[SiteRow]:
    """A row per module of an adapter file; `base` maps module paths to their weights ([out, in]) when
    the base model is at hand."""
    rows = []
    for holder, (delta, a) in adapter_updates(file).items():
        w0 = (base or {}).get(holder)
        rows.append(_row(holder, a.shape[0], delta, None if w0 is None else _matrix(w0), seed))
    return rows


def format_table(rows: list[SiteRow]) -> str:
    """The table as text, a line per weight."""
    width = max([len(r.weight) for r in rows] + [6])
    lines = [f"{'weight':<{width}}  rank  ||dW||/||W0||  eff.rank(90%)  amplification  (random)"]
    for r in rows:
        rel = "-" if r.relative_norm is None else f"{r.relative_norm:.4f}"
        amp = "-" if r.amplification is None else f"{r.amplification:.2f}"
        rnd = "-" if r.random_amplification is None else f"{r.random_amplification:.2f}"
        lines.append(f"{r.weight:<{width}}  {r.rank:>4}  {rel:>13}  {r.effective_rank:>13}  {amp:>13}  {rnd:>8}")
    return "\n".join(lines)


def module_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module path -> weight as [out, in] for a model's linear and conv layers (GPT-2's Conv1D
    [in, out] transposed), the base weights `file_table` compares with."""
    out = {}
    for path, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and not isinstance(module, nn.Embedding):
            out[path] = w.detach().T if type(module).__name__ == "Conv1D" else w.detach()
    return out


def plot_similarity(phis: list[tuple[str, torch.Tensor]], path, title: str, xlabel: str = "j (second adapter)",
                    ylabel: str = "i (first adapter)", columns: int | None = None):
    """Figure 3-style heatmaps of φ(i, j), one per (label, φ), side by side, written as a PNG at `path`
    (matplotlib, the `bench` extra); `columns` keeps the first j only."""
    import matplotlib  # optional: only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(phis), figsize=(4.5 * len(phis), 3.6), squeeze=False)
    for ax, (label, phi) in zip(axes[0], phis):
        image = ax.imshow(phi[:, :columns].numpy(), vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set(title=label, xlabel=xlabel, ylabel=ylabel)
        fig.colorbar(image, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
