"""onnx_diff: compare two ONNX models by structure (canonical wiring), names, and weights."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def _load(m) -> onnx.ModelProto:
    if isinstance(m, onnx.ModelProto):
        return m
    return onnx.load(str(m), load_external_data=True)


def _value(attr: onnx.AttributeProto, names: dict):
    v = onnx.helper.get_attribute_value(attr)
    if isinstance(v, onnx.TensorProto):
        return ("tensor", tuple(v.dims), v.data_type, numpy_helper.to_array(v).tobytes())
    if isinstance(v, onnx.GraphProto):
        return ("graph", _canonical_graph(v, dict(names))[0])
    if isinstance(v, list) and v and isinstance(v[0], onnx.GraphProto):
        return ("graphs", tuple(_canonical_graph(g, dict(names))[0] for g in v))
    if isinstance(v, list):
        return tuple(v)
    return v


def _type(t: onnx.TypeProto):
    if t.HasField("tensor_type"):
        tt = t.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else "?" for d in tt.shape.dim) if tt.HasField("shape") else None
        return ("tensor", tt.elem_type, dims)
    return (t.WhichOneof("value"),)


def _canonical_graph(graph: onnx.GraphProto, names: dict):
    """Nodes as (op, domain, inputs, n_outputs, attributes) with tensors renamed canonically:
    graph inputs by position, initializers by name, node outputs by producer position."""
    names = dict(names)
    for i, inp in enumerate(graph.input):
        names[inp.name] = f"input{i}"
    for init in graph.initializer:
        names[init.name] = f"init:{init.name}"
    nodes = []
    for k, node in enumerate(graph.node):
        ins = tuple(names.get(x, f"outer:{x}") if x else "" for x in node.input)
        attrs = tuple(sorted((a.name, _value(a, names)) for a in node.attribute))
        for j, out in enumerate(node.output):
            if out:
                names[out] = f"n{k}.{j}"
        nodes.append((node.op_type, node.domain, ins, len(node.output), attrs))
    outputs = tuple(names.get(o.name, o.name) for o in graph.output)
    return tuple(nodes), outputs


def _describe(node) -> str:
    op, domain, ins, n_out, attrs = node
    return f"{(domain + '::') if domain else ''}{op}({', '.join(ins)})" + (f" {dict((k, v) for k, v in attrs if not isinstance(v, tuple) or v[:1] not in (('graph',), ('tensor',)))}" if attrs else "")


@dataclass
class OnnxDiff:
    same_structure: bool
    same_names: bool  # node names and tensor names equal too
    changed_initializers: dict[str, float] = field(default_factory=dict)  # name -> max abs change
    differences: list[str] = field(default_factory=list)  # structural differences, readable
    nodes: tuple[int, int] = (0, 0)

    def __str__(self) -> str:
        head = (f"ONNX graphs: {'same structure' if self.same_structure else 'DIFFERENT structure'}"
                f" ({self.nodes[0]} vs {self.nodes[1]} nodes), names {'equal' if self.same_names else 'differ'}, "
                f"{len(self.changed_initializers)} initializers changed")
        lines = [head]
        lines += [f"  {d}" for d in self.differences[:40]]
        if len(self.differences) > 40:
            lines.append(f"  ... {len(self.differences) - 40} more")
        for name, delta in sorted(self.changed_initializers.items()):
            lines.append(f"  changed initializer {name}: max abs change {delta:.3g}")
        return "\n".join(lines)


def onnx_diff(a, b) -> OnnxDiff:
    """Compare two ONNX models (paths or ModelProtos)."""
    ma, mb = _load(a), _load(b)
    ga, gb = ma.graph, mb.graph
    diffs: list[str] = []
    opset_a = sorted((o.domain, o.version) for o in ma.opset_import)
    opset_b = sorted((o.domain, o.version) for o in mb.opset_import)
    if opset_a != opset_b:
        diffs.append(f"opsets differ: {opset_a} vs {opset_b}")
    for kind, xa, xb in (("input", ga.input, gb.input), ("output", ga.output, gb.output)):
        sa = [(v.name, _type(v.type)) for v in xa]
        sb = [(v.name, _type(v.type)) for v in xb]
        if sa != sb:
            diffs.append(f"graph {kind}s differ: {sa} vs {sb}")
    ia = {t.name: (tuple(t.dims), t.data_type) for t in ga.initializer}
    ib = {t.name: (tuple(t.dims), t.data_type) for t in gb.initializer}
    for name in sorted(ia.keys() - ib.keys()):
        diffs.append(f"initializer only in a: {name} {ia[name][0]}")
    for name in sorted(ib.keys() - ia.keys()):
        diffs.append(f"initializer only in b: {name} {ib[name][0]}")
    for name in sorted(ia.keys() & ib.keys()):
        if ia[name] != ib[name]:
            diffs.append(f"initializer {name}: shape/type {ia[name]} vs {ib[name]}")
    na, outs_a = _canonical_graph(ga, {})
    nb, outs_b = _canonical_graph(gb, {})
    if len(na) != len(nb):
        diffs.append(f"node count differs: {len(na)} vs {len(nb)}")
    for k, (x, y) in enumerate(zip(na, nb)):
        if x != y:
            diffs.append(f"node {k}: {ga.node[k].name or '?'} {_describe(x)}  vs  {gb.node[k].name or '?'} {_describe(y)}")
    if outs_a != outs_b:
        diffs.append(f"graph outputs wired differently: {outs_a} vs {outs_b}")
    fa = {(f.domain, f.name): f for f in ma.functions}
    fb = {(f.domain, f.name): f for f in mb.functions}
    if fa.keys() != fb.keys():
        diffs.append(f"functions differ: {sorted(fa)} vs {sorted(fb)}")
    for key in fa.keys() & fb.keys():
        ca = _canonical_function(fa[key])
        if ca != _canonical_function(fb[key]):
            diffs.append(f"function {key[1]} differs")

    changed = {}
    tb = {t.name: t for t in gb.initializer}
    for t in ga.initializer:
        other = tb.get(t.name)
        if other is None or (tuple(t.dims), t.data_type) != (tuple(other.dims), other.data_type):
            continue
        x, y = numpy_helper.to_array(t), numpy_helper.to_array(other)
        if not np.array_equal(x, y):
            changed[t.name] = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0

    same_names = (
        not diffs
        and [n.name for n in ga.node] == [n.name for n in gb.node]
        and [list(n.input) + list(n.output) for n in ga.node] == [list(n.input) + list(n.output) for n in gb.node]
    )
    return OnnxDiff(not diffs, same_names, changed, diffs, (len(ga.node), len(gb.node)))


def _canonical_function(f: onnx.FunctionProto):
    names = {x: f"input{i}" for i, x in enumerate(f.input)}
    nodes = []
    for k, node in enumerate(f.node):
        ins = tuple(names.get(x, x) for x in node.input)
        attrs = tuple(sorted((a.name, _value(a, names)) for a in node.attribute))
        for j, out in enumerate(node.output):
            names[out] = f"n{k}.{j}"
        nodes.append((node.op_type, node.domain, ins, attrs))
    return tuple(nodes), tuple(names.get(o, o) for o in f.output)


def is_onnx(path) -> bool:
    return Path(path).suffix == ".onnx"
