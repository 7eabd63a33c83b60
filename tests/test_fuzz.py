"""Property-based fuzzing of the core invariants over random small models and random LoRA specs.

For any model and spec, inject_lora either raises one of lora-fx's own errors, or: the output is
unchanged at init, the folded output equals the unfolded one, and the folded graph is the untouched
graph. `LORA_FX_FUZZ_EXAMPLES` sets the number of examples (a longer campaign: 500).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lora_fx
from helpers import assert_close, randomize_lora

EXAMPLES = int(os.environ.get("LORA_FX_FUZZ_EXAMPLES", "40"))
CAMPAIGN = "LORA_FX_FUZZ_EXAMPLES" in os.environ  # a long run explores new examples; CI replays fixed ones


class Mlp(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class FusedAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))


class Mha(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class Plain(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x):
        return F.linear(x, self.w)


class Stack(nn.Module):
    def __init__(self, kinds, d, h, heads):
        super().__init__()
        make = {"mlp": lambda: Mlp(d, h), "attn": lambda: FusedAttention(d, heads), "mha": lambda: Mha(d, heads),
                "plain": lambda: Plain(d)}
        self.blocks = nn.ModuleList(make[k]() for k in kinds)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(self.norm(x))
        return x


NAMES = ["up", "down", "qkv", "out", "mha", "out_proj", "w", "norm", "blocks", "nothing_here"]


@st.composite
def cases(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    d = heads * draw(st.sampled_from([2, 3, 4]))
    h = draw(st.integers(2, 24))
    kinds = draw(st.lists(st.sampled_from(["mlp", "attn", "mha", "plain"]), min_size=1, max_size=3))
    form = draw(st.sampled_from(["list", "regex", "dict", "all"]))
    if form == "list":
        targets = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))
    elif form == "regex":
        targets = draw(st.sampled_from([r".*\.(up|down)", r"blocks\.0\..*", r".*qkv", r".*", r"(", r"blocks\.\d+\.mha"]))
    elif form == "dict":
        spec = draw(st.one_of(st.lists(st.booleans(), min_size=1, max_size=4),
                              st.lists(st.tuples(st.integers(0, 3 * d), st.booleans()), min_size=1, max_size=3)))
        targets = {draw(st.sampled_from(["qkv", "mha", "up"])): spec}
    else:
        targets = "all-linear"
    rank = draw(st.integers(-1, 2 * d))
    alpha = draw(st.sampled_from([0.5, 1, 8, 16, -1]))
    dropout = draw(st.sampled_from([0.0, 0.1]))
    return kinds, d, h, heads, targets, rank, alpha, dropout


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not CAMPAIGN, suppress_health_check=list(HealthCheck))
@given(cases())
def test_invariants_or_a_clear_error(case):
    kinds, d, h, heads, targets, rank, alpha, dropout = case
    torch.manual_seed(0)
    model = Stack(kinds, d, h, heads).eval()
    x = torch.randn(2, 5, d)
    try:
        gm = lora_fx.inject_lora(model, targets, rank=rank, alpha=alpha, dropout=dropout, example_inputs=(x,))
    except lora_fx.LoraFxError as e:
        assert str(e)  # a message, never an empty error
        return
    gm.eval()
    with torch.no_grad():
        assert_close(gm(x), model(x), ulps=10)
        randomize_lora(gm)
        folded = lora_fx.merge_lora(gm)
        x2 = torch.randn(3, 4, d)
        assert_close(folded(x2), gm(x2))
    assert lora_fx.graph_diff(lora_fx.capture(model, (x,)), folded).identical
