"""Property-based tests of the fold and the file round trip over random shapes, ranks, alphas, dtypes,
adapter mixes and weight kinds (linear, conv, embedding, an expert stack): the unfolded graph is the
definition (the model with W0 + sum of scaling * B @ A), the fold equals the unfolded graph and is
the untouched graph again, and save -> load gives the same adapter. `LORA_FX_FUZZ_EXAMPLES` sets the
number of examples (CI replays a fixed set, as tests/test_fuzz.py)."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lora_fx
from helpers import assert_close, randomize_lora

EXAMPLES = int(os.environ.get("LORA_FX_FUZZ_EXAMPLES", "12"))
CAMPAIGN = "LORA_FX_FUZZ_EXAMPLES" in os.environ


class Experts(nn.Module):
    """A stack of expert matrices [E, in, out], applied expert by expert (as GPT-OSS's)."""

    def __init__(self, experts: int, d_in: int, d_out: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, d_in, d_out) / d_in ** 0.5)

    def forward(self, x):  # x [E, tokens, in]
        return torch.bmm(x, self.gate_up_proj)


class One(nn.Module):
    """One weight of the kind, with a layer after it (LoRA's output flows on)."""

    def __init__(self, kind: str, d_in: int, d_out: int, k: int, experts: int):
        super().__init__()
        self.w = {"linear": lambda: nn.Linear(d_in, d_out), "conv": lambda: nn.Conv2d(d_in, d_out, k, padding=k // 2),
                  "embedding": lambda: nn.Embedding(d_in, d_out), "experts": lambda: Experts(experts, d_in, d_out)}[kind]()
        self.kind = kind

    def forward(self, x):
        y = self.w(x)
        return torch.tanh(y) * 2


def _example(kind: str, d_in: int, k: int, experts: int, dtype) -> tuple:
    g = torch.Generator().manual_seed(d_in * 7 + k)
    if kind == "embedding":
        return (torch.randint(0, d_in, (2, 5), generator=g),)
    shape = {"linear": (2, 3, d_in), "conv": (1, d_in, 5, 5), "experts": (experts, 3, d_in)}[kind]
    return (torch.randn(shape, generator=g).to(dtype),)


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["linear", "conv", "embedding", "experts"]))
    d_in, d_out = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    k, experts = draw(st.sampled_from([1, 3])), draw(st.integers(1, 3))
    ranks = draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))  # one adapter, or two
    alphas = draw(st.lists(st.sampled_from([0.5, 1.0, 8.0, 16.0]), min_size=len(ranks), max_size=len(ranks)))
    both = len(ranks) == 2 and kind != "experts" and draw(st.booleans())  # two adapters active together
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return kind, d_in, d_out, k, experts, ranks, alphas, both, dtype


def _delta(kind: str, a: torch.Tensor, b: torch.Tensor, scaling: float, shape) -> torch.Tensor:
    """ΔW of one adapter by the definition, in the weight's own layout."""
    if kind == "linear":
        delta = b @ a
    elif kind == "conv":  # lora_A a conv like W, lora_B a 1x1 conv
        delta = (b.flatten(1) @ a.flatten(1)).view(shape)
    elif kind == "embedding":  # PEFT's lora_embedding_A [r, vocab], lora_embedding_B [dim, r]
        delta = (b @ a).T
    else:  # an expert stack: one rank-r pair per expert
        delta = b @ a
    assert tuple(delta.shape) == tuple(shape)
    return scaling * delta


def _by_definition(model: One, gm, kind: str, names: list[str], param: str) -> One:
    reference = copy.deepcopy(model)
    w = reference.get_parameter(param)
    with torch.no_grad():
        for name in names:
            adapter = gm.lora_state.adapters[name]
            (a, b), = lora_fx.adapter_weights(gm, name)[param]
            w += _delta(kind, a.double(), b.double(), adapter.scaling(param), w.shape).to(w.dtype)
    return reference


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not CAMPAIGN, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cases())
def test_unfolded_is_the_definition_fold_is_unfolded_and_files_round_trip(tmp_path_factory, case):
    kind, d_in, d_out, k, experts, ranks, alphas, both, dtype = case
    torch.manual_seed(d_in + 10 * d_out)
    model = One(kind, d_in, d_out, k, experts).to(dtype).eval()
    x = _example(kind, d_in, k, experts, dtype)
    where = dict(targets=None, target_parameters=["w.gate_up_proj"]) if kind == "experts" else dict(targets=["w"])
    param = "w.gate_up_proj" if kind == "experts" else "w.weight"
    gm = lora_fx.inject_lora(model, **where, rank=ranks[0], alpha=alphas[0], adapter="a", example_inputs=x)
    randomize_lora(gm, std=0.3, seed=1)
    names = ["a"]
    if len(ranks) == 2:
        lora_fx.add_adapter(gm, "b", **where, rank=ranks[1], alpha=alphas[1])
        lora_fx.set_adapter(gm, "b")
        randomize_lora(gm, std=0.3, seed=2)
        names = ["a", "b"] if both else ["b"]
        lora_fx.set_adapter(gm, names if both else "b")
    ulps = 1000 if dtype == torch.float32 else 1e6  # float64: far tighter in absolute terms
    with torch.no_grad():
        out = gm(*x)
        assert_close(out, _by_definition(model, gm, kind, names, param)(*x), ulps=ulps, what="unfolded vs definition")
        folded = lora_fx.merge_lora(gm, names if both else names[0])
        assert_close(folded(*x), out, ulps=ulps, what="folded vs unfolded")
    assert lora_fx.graph_diff(lora_fx.capture(model, x), folded).identical
    folder = tmp_path_factory.mktemp("adapter")
    for name in names:
        lora_fx.save_adapter(gm, folder / name, name)
    loaded = lora_fx.load_adapter(model, folder / names[0], name=names[0], example_inputs=x)
    for name in names[1:]:
        lora_fx.load_adapter(loaded, folder / name, name=name)
    for name in names:
        ours, theirs = lora_fx.adapter_weights(gm, name), lora_fx.adapter_weights(loaded, name)
        assert ours.keys() == theirs.keys()
        for p in ours:
            for (a1, b1), (a2, b2) in zip(ours[p], theirs[p]):
                assert torch.equal(a1, a2) and torch.equal(b1, b2), (name, p)
    lora_fx.set_adapter(loaded, names if both else names[0])
    with torch.no_grad():
        assert_close(loaded(*x), out, ulps=10, what="loaded vs saved")
