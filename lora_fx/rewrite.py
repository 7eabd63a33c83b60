"""Rewrite: turn each matched weight into the paper's parallel W0 / A / B subgraph.

For a product y = x @ W0.T (+ b), the graph becomes
    y = linear(x, W0, b) + linear(scale * linear(dropout(x), lora_A), lora_B)
which trains only A and B and never materializes a weight-sized tensor. A convolution gets PEFT's
conv_A / 1x1 conv_B branch, an embedding lookup a lookup in lora_A.T followed by lora_B. `scale` is a buffer holding
alpha / rank for each rank row: it makes switching adapters (of any rank, or several summed) an
in-place update with no change to the graph. Where W0 is consumed by an op that is not a product with
an activation (a split, a custom op), the weight itself is adapted: W0 + (B * scale) @ A, transposed
for [in, out] weights, reshaped for a grouped convolution's weight, batched (bmm) for a stack of
MoE experts: exact whatever the consumer computes with it. Every node added carries `meta["lora_fx"]`, which is how fold and re-layout
find them.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import torch

from .match import Match, bias_arg, x_position
from .slot import LORA_A, LORA_B, bias_path, dropout_path, magnitude_path, scale_path, weight_path
from .state import Site

aten = torch.ops.aten
LORA_META = "lora_fx"


class _Builder:
    """Appends nodes one after another, starting after `anchor`, tagging each as LoRA's."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node, tag: dict):
        self.graph, self.last, self.tag = graph, anchor, tag
        self.stack = anchor.meta.get("nn_module_stack")
        self.created: set[torch.fx.Node] = set()

    def _add(self, node: torch.fx.Node, role: str = "branch") -> torch.fx.Node:
        node.meta[LORA_META] = {**self.tag, "role": role}
        if self.stack is not None:
            node.meta["nn_module_stack"] = self.stack
        self.last = node
        self.created.add(node)
        return node

    def call(self, target, *args, role: str = "branch") -> torch.fx.Node:
        with self.graph.inserting_after(self.last):
            return self._add(self.graph.call_function(target, args), role)

    def get_attr(self, path: str) -> torch.fx.Node:
        with self.graph.inserting_after(self.last):
            return self._add(self.graph.get_attr(path))

    def module(self, path: str, *args) -> torch.fx.Node:
        with self.graph.inserting_after(self.last):
            return self._add(self.graph.call_module(path, args))


def _lora_bias(b: _Builder, site: Site, slot: str, scale: torch.fx.Node) -> torch.fx.Node:
    """scaling * lora_B's bias (PEFT's lora_bias: the branch is scaling * lora_B(lora_A(x)), bias
    included). A lora_bias adapter is active alone, so its scaling is rank row 0's."""
    return b.call(aten.mul.Tensor, b.get_attr(bias_path(site, slot)), b.call(aten.select.int, scale, 0, 0))


def _branch(b: _Builder, site: Site, slot: str, x: torch.fx.Node, dropout: bool, bias: bool = False) -> torch.fx.Node:
    """B @ (scale * A @ dropout(x)), zero-padded to the full output when only some rows adapt."""
    if dropout:
        x = b.module(dropout_path(site, slot), x)
    scale = b.get_attr(scale_path(site, slot))
    total = None
    for block in site.blocks:
        h = b.call(aten.linear.default, x, b.get_attr(weight_path(site, LORA_A, slot, block.index)))
        h = b.call(aten.mul.Tensor, h, scale)
        lora_b = b.get_attr(weight_path(site, LORA_B, slot, block.index))
        h = b.call(aten.linear.default, h, lora_b, *([_lora_bias(b, site, slot, scale)] if bias else []))
        if site.fused:
            h = b.call(aten.constant_pad_nd.default, h, [block.start, site.out_features - block.stop])
        total = h if total is None else b.call(aten.add.Tensor, total, h)
    return total


def _conv_branch(b: _Builder, site: Site, slot: str, use, dropout: bool, bias: bool = False) -> torch.fx.Node:
    """PEFT's conv branch: conv_B(scale * conv_A(dropout(x))), conv_A with the layer's kernel,
    stride, padding and dilation and `rank` output channels, conv_B a 1x1 conv."""
    x = use.x
    if dropout:
        x = b.module(dropout_path(site, slot), x)
    n = len(site.shape) - 2
    rows = b.get_attr(scale_path(site, slot))
    scale = b.call(aten.view.default, rows, [-1] + [1] * n)
    a = b.get_attr(weight_path(site, LORA_A, slot, 0))
    args = list(use.node.args[3:6])
    if isinstance(args[1] if len(args) > 1 else None, str):  # padding="same" / "valid": the layer's own op
        h = b.call(use.node.target, x, a, None, *args)
    else:  # aten.convolution with every argument spelled (torch's ONNX exporter mis-sizes an absent conv3d bias)
        stride, padding, dilation = (args + [None] * 3)[:3]
        h = b.call(aten.convolution.default, x, a, None, stride or [1] * n, padding or [0] * n, dilation or [1] * n,
                   False, [0] * n, 1)
    h = b.call(aten.mul.Tensor, h, scale)
    lora_b = b.get_attr(weight_path(site, LORA_B, slot, 0))
    bias_term = _lora_bias(b, site, slot, rows) if bias else None
    return b.call(aten.convolution.default, h, lora_b, bias_term, [1] * n, [0] * n, [1] * n, False, [0] * n, 1)


def _embedding_branch(b: _Builder, site: Site, slot: str, use) -> torch.fx.Node:
    """PEFT's embedding branch: B @ (scale * A.T[ids]), the lookup with the layer's padding_idx (no
    dropout, as PEFT)."""
    a_t = b.call(aten.t.default, b.get_attr(weight_path(site, LORA_A, slot, 0)))
    h = b.call(aten.embedding.default, a_t, use.x, *use.node.args[2:3])
    h = b.call(aten.mul.Tensor, h, b.get_attr(scale_path(site, slot)))
    return b.call(aten.linear.default, h, b.get_attr(weight_path(site, LORA_B, slot, 0)))


def _weight_delta(b: _Builder, site: Site, slot: str) -> torch.fx.Node:
    """(B * scale) @ A as a weight in W0's own layout and shape (one bmm for a stack of experts)."""
    scale = b.get_attr(scale_path(site, slot))
    total = None
    for block in site.blocks:
        a = b.get_attr(weight_path(site, LORA_A, slot, block.index))
        lora_b = b.get_attr(weight_path(site, LORA_B, slot, block.index))
        if site.kind == "conv":  # [r, in/groups, *k] and [out, r, 1, ...] as matrices
            a = b.call(aten.view.default, a, [-1, site.in_features])
            lora_b = b.call(aten.view.default, lora_b, [site.out_features, -1])
        bs = b.call(aten.mul.Tensor, lora_b, scale)
        h = b.call(aten.bmm.default if site.kind == "experts" else aten.mm.default, bs, a)
        if site.fused:
            h = b.call(aten.constant_pad_nd.default, h, [0, 0, block.start, site.out_features - block.stop])
        total = h if total is None else b.call(aten.add.Tensor, total, h)
    if site.layout == "in_out":
        total = b.call(aten.transpose.int, total, -2, -1)
    if site.kind == "conv":
        total = b.call(aten.view.default, total, list(site.shape))
    return total


def _magnitude(b: _Builder, site: Site, slot: str, adapted: torch.fx.Node) -> torch.fx.Node:
    """DoRA's per-output factor m / ||W0 + scaling * B @ A|| ([out]; `adapted` is that weight; the norm
    over its input dimensions, detached as in the DoRA paper and PEFT), or 1 while the slot's switch is off."""
    norm = b.call(aten.detach.default, b.call(aten.linalg_vector_norm.default, adapted, 2, site.in_dims))
    path = magnitude_path(site, slot)
    ratio = b.call(aten.sub.Tensor, b.call(aten.div.Tensor, b.get_attr(f"{path}.weight"), norm), 1)
    return b.call(aten.add.Tensor, b.call(aten.mul.Tensor, ratio, b.get_attr(f"{path}.on")), 1)


def _dora(b: _Builder, site: Site, slot: str, use, delta: torch.fx.Node) -> torch.fx.Node:
    """DoRA on an activation: y0 + (mag - 1) * (y0 - bias) + mag * delta, i.e. mag * (W0 x + delta) + bias."""
    mag = _magnitude(b, site, slot, b.call(aten.add.Tensor, b.get_attr(site.param), _weight_delta(b, site, slot)))
    if use.kind == "conv":  # channels are dim 1 of a conv's output
        mag = b.call(aten.view.default, mag, [-1] + [1] * (len(site.shape) - 2))
    base, bias = use.node, bias_arg(use)
    if bias is not None:
        if use.kind == "conv":
            bias = b.call(aten.view.default, bias, [-1] + [1] * (len(site.shape) - 2))
        base = b.call(aten.sub.Tensor, base, bias)
    scaled_base = b.call(aten.mul.Tensor, b.call(aten.sub.Tensor, mag, 1), base)
    return b.call(aten.add.Tensor, scaled_base, b.call(aten.mul.Tensor, mag, delta))


def _dora_weight(b: _Builder, site: Site, slot: str, w: torch.fx.Node) -> torch.fx.Node:
    """DoRA on a weight read as a weight: mag * (W0 + scaling * B @ A) - W0."""
    adapted = b.call(aten.add.Tensor, w, _weight_delta(b, site, slot))
    shape = [1, -1] if site.layout == "in_out" else [-1] + [1] * (len(site.shape) - 1)
    mag = b.call(aten.view.default, _magnitude(b, site, slot, adapted), shape)
    return b.call(aten.sub.Tensor, b.call(aten.mul.Tensor, mag, adapted), w)


# A small conv trains faster with its update on the weight, conv(x, W0 + s*B@A), than with PEFT's
# branch conv_B(conv_A(x)): narrow r-channel convs run slowly, and a small weight's gradient is cheap.
# Measured (CPU, 2 threads; Conv2d, Cin = Cout in 16..512, k in 1, 3, H in 8..64, batch 1 and 8,
# r 8 and 32, fwd + bwd): "weight iff Cout * Cin/groups * k*k <= 65536" picks the faster form in 113
# of 128 cases (worst miss 1.51x); always-branch (PEFT's) picks it in 55 (worst 4.15x).
CONV_WEIGHT_FORM_MAX = 65536


def conv_on_weight(site: Site, needs_branch: bool) -> bool:
    """Whether a (dense) conv's update goes on its weight rather than on a branch. LoRA dropout and
    lora_bias act on the branch, so they keep it."""
    return not needs_branch and math.prod(site.shape) <= CONV_WEIGHT_FORM_MAX


def insert_lora(gm: torch.fx.GraphModule, matches: list[Match], slot: str, dropout: set[str],
                dora: set[str] = frozenset(), bias: set[str] = frozenset()) -> Counter:
    """Rewrite every use of every matched weight to read the LoRA slot named `slot`; returns how many
    uses of each kind were rewritten. `dropout` names the sites (by weight) whose LoRA input goes
    through the slot's dropout module, `dora` those with DoRA's magnitude, `bias` those whose lora_B
    has a bias."""
    counts: Counter = Counter()
    graph = gm.graph
    x_at = {id(u): x_position(u) for m in matches for u in m.uses if u.x is not None}
    for match in matches:
        site = match.site
        tag = {"param": site.param}
        by_weight: dict[torch.fx.Node, list] = {}
        for use in match.uses:
            if use.kind == "weight":
                by_weight.setdefault(use.weight, []).append(use.node)
                counts["weight"] += 1
                continue
            if use.kind == "conv" and conv_on_weight(site, site.param in dropout or site.param in bias):
                by_weight.setdefault(use.node.args[1], []).append(use.node)
                counts["conv"] += 1
                continue
            b = _Builder(graph, use.node, tag)
            reads, at = x_at[id(use)]
            use = replace(use, x=reads.args[at])
            if use.kind == "conv":
                delta = _conv_branch(b, site, slot, use, site.param in dropout, site.param in bias)
            elif use.kind == "embedding":
                delta = _embedding_branch(b, site, slot, use)
            else:
                delta = _branch(b, site, slot, use.x, site.param in dropout, site.param in bias)
            if site.param in dora:
                delta = _dora(b, site, slot, use, delta)
            out = b.call(aten.add.Tensor, use.node, delta, role="combine")
            use.node.replace_all_uses_with(out, delete_user_cb=lambda user, mine=b.created: user not in mine)
            counts[use.kind] += 1
        for w, consumers in by_weight.items():
            b = _Builder(graph, w, tag)
            delta = _dora_weight(b, site, slot, w) if site.param in dora else _weight_delta(b, site, slot)
            adapted = b.call(aten.add.Tensor, w, delta, role="combine")
            for consumer in consumers:
                consumer.replace_input_with(w, adapted)
    graph.lint()
    gm.recompile()
    return counts


def lora_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if LORA_META in n.meta]


def combine_inputs(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The base values LoRA combines with: the first input of every "combine" node."""
    return {n.args[0] for n in graph.nodes if n.meta.get(LORA_META, {}).get("role") == "combine"}


def weight_form_sites(graph: torch.fx.Graph) -> set[str]:
    """Sites (weight names) whose weight itself is adapted (W + s*B@A) somewhere in the graph."""
    return {n.meta[LORA_META]["param"] for n in graph.nodes
            if n.meta.get(LORA_META, {}).get("role") == "combine" and n.args[0].op == "get_attr"}


def strip_lora(graph: torch.fx.Graph) -> None:
    """Remove every LoRA node, wiring each consumer back to the base value (in place)."""
    for node in graph.nodes:
        if node.meta.get(LORA_META, {}).get("role") == "combine":
            node.replace_all_uses_with(node.args[0])
    for node in reversed(lora_nodes(graph)):
        graph.erase_node(node)
    graph.lint()
