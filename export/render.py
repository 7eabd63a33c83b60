"""An HTML view of a graph diff: graph b drawn with Graphviz, added and changed nodes highlighted.

Large graphs are cut down to the nodes within `context` hops of a change, so the picture shows what a
pass did rather than the whole model.
"""
from __future__ import annotations

import html
import shutil
from pathlib import Path

import graphviz
import torch

import lora_fx

from .onnx_diff import load, node_text, onnx_diff

ADDED, CHANGED, WEIGHTS, REMOVED, PLAIN = "#b7eb8f", "#ffd591", "#91caff", "#ffa39e", "#f5f5f5"


def _require_dot() -> None:
    if shutil.which("dot") is None:
        raise RuntimeError(
            "the HTML diff view renders with Graphviz's `dot` program, which is not installed: "
            "apt-get install graphviz (Debian/Ubuntu), brew install graphviz (macOS), or conda install graphviz"
        )


def _neighbourhood(edges: list[tuple[str, str]], seeds: set[str], hops: int) -> set[str]:
    adjacent: dict[str, set[str]] = {}
    for u, v in edges:
        adjacent.setdefault(u, set()).add(v)
        adjacent.setdefault(v, set()).add(u)
    keep, frontier = set(seeds), set(seeds)
    for _ in range(hops):
        frontier = {w for n in frontier for w in adjacent.get(n, ())} - keep
        keep |= frontier
    return keep


def _draw(nodes: dict[str, str], edges: list[tuple[str, str]], colors: dict[str, str], context: int,
          max_full: int = 150) -> tuple[str, int]:
    """SVG of the graph, reduced to the neighbourhood of coloured nodes when it is large."""
    seeds = set(colors)
    keep = set(nodes) if len(nodes) <= max_full or not seeds else _neighbourhood(edges, seeds, context)
    dot = graphviz.Digraph(graph_attr={"rankdir": "TB", "fontsize": "10"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "9"})
    for name in nodes:
        if name in keep:
            dot.node(name, nodes[name], fillcolor=colors.get(name, PLAIN))
    for u, v in edges:
        if u in keep and v in keep:
            dot.edge(u, v)
    return dot.pipe(format="svg").decode(), len(keep)


def _page(title: str, summary: str, svg: str, shown: int, total: int, removed: list[str]) -> str:
    legend = "".join(
        f'<span style="background:{c};padding:2px 8px;margin-right:6px;border-radius:4px">{label}</span>'
        for label, c in (("added", ADDED), ("changed wiring", CHANGED), ("reads changed weights", WEIGHTS),
                         ("unchanged", PLAIN))
    )
    removed_html = ""
    if removed:
        items = "".join(f"<li><code>{html.escape(r)}</code></li>" for r in removed)
        removed_html = f'<h3 style="background:{REMOVED}">removed (only in the first graph)</h3><ul>{items}</ul>'
    scope = f"{shown} of {total} nodes shown" + (" (the neighbourhood of the changes)" if shown < total else "")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:Helvetica,Arial,sans-serif'><h2>{html.escape(title)}</h2>"
        f"<pre>{html.escape(summary)}</pre><p>{legend}</p><p>{scope}</p>{removed_html}"
        f"<div style='overflow:auto;border:1px solid #ddd'>{svg}</div></body></html>"
    )


def onnx_diff_html(a, b, out_path, context: int = 2) -> Path:
    """Write an HTML page showing ONNX model b with what differs from a highlighted."""
    _require_dot()
    ma, mb = load(a), load(b)
    diff = onnx_diff(ma, mb)
    gb = mb.graph
    names = [n.name or f"node{k}" for k, n in enumerate(gb.node)]
    nodes = {names[k]: f"{n.op_type}\n{names[k]}" for k, n in enumerate(gb.node)}
    producer = {out: names[k] for k, n in enumerate(gb.node) for out in n.output}
    edges = [(producer[x], names[k]) for k, n in enumerate(gb.node) for x in n.input if x in producer]
    colors = {names[k]: WEIGHTS for k, n in enumerate(gb.node) if set(n.input) & set(diff.changed_initializers)}
    colors.update({names[j]: CHANGED for _, j in diff.rewired})
    colors.update({names[j]: ADDED for j in diff.added})
    svg, shown = _draw(nodes, edges, colors, context)
    removed = [node_text(ma.graph.node[i]) for i in diff.removed]
    Path(out_path).write_text(_page(f"ONNX diff: {a} -> {b}", str(diff), svg, shown, len(nodes), removed))
    return Path(out_path)


def graph_diff_html(a, b, out_path, title: str = "fx graph diff", context: int = 2) -> Path:
    """Write an HTML page showing fx graph b with what differs from a highlighted."""
    _require_dot()
    diff = lora_fx.graph_diff(a, b)
    gb = b.graph if isinstance(b, torch.fx.GraphModule) else b
    nodes = {n.name: f"{n.op} {n.target if isinstance(n.target, str) else getattr(n.target, '__name__', n.target)}\n{n.name}"
             for n in gb.nodes}
    edges = [(i.name, n.name) for n in gb.nodes for i in n.all_input_nodes]
    colors = {name: CHANGED for name in diff.changed_nodes}
    colors.update({name: ADDED for name in diff.added_nodes})
    svg, shown = _draw(nodes, edges, colors, context)
    Path(out_path).write_text(_page(title, str(diff), svg, shown, len(nodes), diff.removed))
    return Path(out_path)
