"""Diff: what a pass changed in a graph, aligned by op and target rather than by node names.

Node names are auto-generated and shift when a node is added; instead the two node sequences are
aligned on (op, target) with difflib, and aligned nodes are compared on their arguments, each node
argument mapped through the alignment.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree


def _graph(g) -> torch.fx.Graph:
    if isinstance(g, torch.fx.GraphModule):
        return g.graph
    if isinstance(g, torch.fx.Graph):
        return g
    raise TypeError(f"graph_diff compares fx graphs or GraphModules, got {type(g).__name__}")


def _key(node: torch.fx.Node, owner) -> tuple:
    target = node.target if isinstance(node.target, str) else str(node.target)
    if node.op == "call_module" and owner is not None:
        module = owner.get_submodule(node.target)
        return (node.op, target, type(module).__name__, module.extra_repr())
    return (node.op, target)


def _describe(node: torch.fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else str(node.target)
    args = ", ".join([str(a) for a in node.args] + [f"{k}={v}" for k, v in node.kwargs.items()])
    return f"{node.name} = {node.op} {target}({args})"


@dataclass
class NodeChange:
    a: str
    b: str
    what: str


@dataclass
class GraphDiff:
    identical: bool
    nodes_a: int
    nodes_b: int
    added: list[str] = field(default_factory=list)  # nodes only in b
    removed: list[str] = field(default_factory=list)  # nodes only in a
    changed: list[NodeChange] = field(default_factory=list)  # aligned nodes whose inputs differ
    added_nodes: list[str] = field(default_factory=list)  # names in b (for drawing)
    changed_nodes: list[str] = field(default_factory=list)  # names in b

    def __str__(self) -> str:
        if self.identical:
            return f"graphs identical ({self.nodes_a} nodes)"
        lines = [
            f"graphs differ: {self.nodes_a} -> {self.nodes_b} nodes, {len(self.added)} added, "
            f"{len(self.removed)} removed, {len(self.changed)} changed"
        ]
        lines += [f"+ {s}" for s in self.added]
        lines += [f"- {s}" for s in self.removed]
        lines += [f"~ {c.b}\n    was {c.a}  ({c.what})" for c in self.changed]
        return "\n".join(lines)


def _region_graphs(module) -> dict | None:
    """The region graphs of a regionally captured model (`lora_regions.graphs`), or None."""
    regions = module.__dict__.get("lora_regions") if isinstance(module, torch.nn.Module) else None
    return getattr(regions, "graphs", None)


def _regional_diff(a: dict, b: dict) -> GraphDiff:
    """Two regionally captured models, region by region (node names prefixed with the region's path)."""
    if sorted(a) != sorted(b):
        only = sorted(set(a) ^ set(b))
        return GraphDiff(identical=False, nodes_a=0, nodes_b=0, added=[f"regions differ: {only[:4]}"])
    out = GraphDiff(identical=True, nodes_a=0, nodes_b=0)
    for path in sorted(a):
        d = graph_diff(a[path], b[path])
        out.identical &= d.identical
        out.nodes_a += d.nodes_a
        out.nodes_b += d.nodes_b
        out.added += [f"{path}: {x}" for x in d.added]
        out.removed += [f"{path}: {x}" for x in d.removed]
        out.changed += [NodeChange(f"{path}: {c.a}", f"{path}: {c.b}", c.what) for c in d.changed]
    return out


def graph_diff(a, b) -> GraphDiff:
    """Compare two fx graphs (or GraphModules, or regionally captured models, region by region).
    `.identical` is True when they have the same nodes in the same order with the same ops, targets,
    constants and wiring."""
    ra, rb = _region_graphs(a), _region_graphs(b)
    if ra is not None or rb is not None:
        if ra is None or rb is None:
            raise TypeError("graph_diff compares a regionally captured model with another one (lora_fx.regions.untouched "
                            "gives the untouched regions), not with a graph")
        return _regional_diff(ra, rb)
    ga, gb = _graph(a), _graph(b)
    owner_a = a if isinstance(a, torch.fx.GraphModule) else None
    owner_b = b if isinstance(b, torch.fx.GraphModule) else None
    na, nb = list(ga.nodes), list(gb.nodes)
    ka = [_key(n, owner_a) for n in na]
    kb = [_key(n, owner_b) for n in nb]
    matcher = difflib.SequenceMatcher(a=ka, b=kb, autojunk=False)
    pairs: dict[torch.fx.Node, torch.fx.Node] = {}
    diff = GraphDiff(identical=True, nodes_a=len(na), nodes_b=len(nb))
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pairs.update(zip(na[i1:i2], nb[j1:j2]))
            continue
        diff.removed += [_describe(n) for n in na[i1:i2]]
        diff.added += [_describe(n) for n in nb[j1:j2]]
        diff.added_nodes += [n.name for n in nb[j1:j2]]

    def mapped(x):
        if isinstance(x, torch.fx.Node):
            return ("node", pairs[x].name) if x in pairs else ("unmatched", x.name)
        return x

    for x, y in pairs.items():
        xa = pytree.tree_map(mapped, (x.args, x.kwargs), is_leaf=lambda v: isinstance(v, torch.fx.Node))
        ya = pytree.tree_map(
            lambda v: ("node", v.name) if isinstance(v, torch.fx.Node) else v,
            (y.args, y.kwargs),
            is_leaf=lambda v: isinstance(v, torch.fx.Node),
        )
        if not _same(xa, ya):
            diff.changed.append(NodeChange(_describe(x), _describe(y), "inputs differ"))
            diff.changed_nodes.append(y.name)
    spec = lambda m, k: str(getattr(m, k, None)) if m is not None else None  # noqa: E731
    for k in ("_in_spec", "_out_spec"):
        if spec(owner_a, k) != spec(owner_b, k):
            diff.changed.append(NodeChange(spec(owner_a, k), spec(owner_b, k), f"{k} differs"))
    diff.identical = not (diff.added or diff.removed or diff.changed)
    return diff


def _same(x, y) -> bool:
    if type(x) is not type(y) and not (isinstance(x, (int, float)) and isinstance(y, (int, float))):
        return False
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(i, j) for i, j in zip(x, y))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, torch.Tensor):
        return x.shape == y.shape and x.dtype == y.dtype and bool((x == y).all())
    return x == y
