"""onnx_diff: compare two ONNX models by structure (wiring after canonical renaming), by names, and by
weights.

Nodes are aligned on (domain, op type, attributes) with difflib, the way `lora_fx.graph_diff` aligns
fx nodes, so an inserted LoRA branch shows as added nodes plus the rewired consumers, not as every
later node being different. Tensors are compared through the alignment: a graph input by position,
an initializer by name, a node output by its (aligned) producer.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper


def load(m) -> onnx.ModelProto:
    if isinstance(m, onnx.ModelProto):
        return m
    try:
        return onnx.load(str(m), load_external_data=True)
    except DecodeError as e:  # protobuf's own message says nothing about the file
        raise ValueError(f"{m} is not an ONNX model (it does not parse as onnx.ModelProto); pass .onnx files that "
                         "export.export_onnx (or any ONNX exporter) wrote") from e


def _attr(attr: onnx.AttributeProto):
    v = onnx.helper.get_attribute_value(attr)
    if isinstance(v, onnx.TensorProto):
        return ("tensor", tuple(v.dims), v.data_type, numpy_helper.to_array(v).tobytes())
    if isinstance(v, onnx.GraphProto):
        return ("graph", _canonical_body(v))
    if isinstance(v, list) and v and isinstance(v[0], onnx.GraphProto):
        return ("graphs", tuple(_canonical_body(g) for g in v))
    if isinstance(v, list):
        return tuple(v)
    return v


def _canonical_body(graph) -> tuple:
    """A subgraph or function body with its tensors renamed by position (for attribute comparison)."""
    names = {}
    inputs = graph.input if isinstance(graph, onnx.FunctionProto) else [i.name for i in graph.input]
    for i, x in enumerate(inputs):
        names[x] = f"input{i}"
    for init in getattr(graph, "initializer", []):
        names[init.name] = f"init:{init.name}"
    nodes = []
    for k, node in enumerate(graph.node):
        ins = tuple(names.get(x, f"outer:{x}") if x else "" for x in node.input)
        nodes.append((node.domain, node.op_type, ins, _attrs(node)))
        names.update({out: f"n{k}.{j}" for j, out in enumerate(node.output) if out})
    outputs = graph.output if isinstance(graph, onnx.FunctionProto) else [o.name for o in graph.output]
    return tuple(nodes), tuple(names.get(o, o) for o in outputs)


def _attrs(node: onnx.NodeProto) -> tuple:
    return tuple(sorted((a.name, _attr(a)) for a in node.attribute))


def _type(t: onnx.TypeProto):
    if t.HasField("tensor_type"):
        tt = t.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else "?" for d in tt.shape.dim) if tt.HasField("shape") else None
        return ("tensor", tt.elem_type, dims)
    return (t.WhichOneof("value"),)


def _producers(graph: onnx.GraphProto) -> dict[str, tuple]:
    """tensor name -> where it comes from: ("input", i), ("init", name) or ("node", k, j)."""
    src = {i.name: ("input", n) for n, i in enumerate(graph.input)}
    src.update({t.name: ("init", t.name) for t in graph.initializer})
    for k, node in enumerate(graph.node):
        src.update({out: ("node", k, j) for j, out in enumerate(node.output) if out})
    return src


def node_text(node: onnx.NodeProto) -> str:
    return f"{node.name or '?'}: {node.domain + '::' if node.domain else ''}{node.op_type}({', '.join(node.input)})"


@dataclass
class OnnxDiff:
    same_structure: bool
    same_names: bool  # node and tensor names equal too (implies same_structure)
    changed_initializers: dict[str, float] = field(default_factory=dict)  # name -> max abs change
    added: list[int] = field(default_factory=list)  # node indices in b with no counterpart in a
    removed: list[int] = field(default_factory=list)  # node indices in a with no counterpart in b
    rewired: list[tuple[int, int]] = field(default_factory=list)  # aligned (a, b) nodes with other inputs
    differences: list[str] = field(default_factory=list)  # everything structural, readable
    nodes: tuple[int, int] = (0, 0)

    def __str__(self) -> str:
        lines = [
            f"ONNX graphs: {'same structure' if self.same_structure else 'DIFFERENT structure'} "
            f"({self.nodes[0]} vs {self.nodes[1]} nodes; {len(self.added)} added, {len(self.removed)} removed, "
            f"{len(self.rewired)} rewired), names {'equal' if self.same_names else 'differ'}, "
            f"{len(self.changed_initializers)} initializers changed"
        ]
        lines += [f"  {d}" for d in self.differences[:40]]
        if len(self.differences) > 40:
            lines.append(f"  ... {len(self.differences) - 40} more")
        for name, delta in sorted(self.changed_initializers.items()):
            lines.append(f"  changed initializer {name}: max abs change {delta:.3g}")
        return "\n".join(lines)


def onnx_diff(a, b) -> OnnxDiff:
    """Compare two ONNX models (paths or ModelProtos)."""
    ma, mb = load(a), load(b)
    ga, gb = ma.graph, mb.graph
    diffs: list[str] = []
    opsets = [sorted((o.domain, o.version) for o in m.opset_import) for m in (ma, mb)]
    if opsets[0] != opsets[1]:
        diffs.append(f"opsets differ: {opsets[0]} vs {opsets[1]}")
    for kind, xa, xb in (("inputs", ga.input, gb.input), ("outputs", ga.output, gb.output)):
        sa, sb = [(v.name, _type(v.type)) for v in xa], [(v.name, _type(v.type)) for v in xb]
        if sa != sb:
            diffs.append(f"graph {kind} differ: {sa} vs {sb}")
    ia = {t.name: (tuple(t.dims), t.data_type) for t in ga.initializer}
    ib = {t.name: (tuple(t.dims), t.data_type) for t in gb.initializer}
    diffs += [f"initializer only in a: {n} {ia[n][0]}" for n in sorted(ia.keys() - ib.keys())]
    diffs += [f"initializer only in b: {n} {ib[n][0]}" for n in sorted(ib.keys() - ia.keys())]
    diffs += [f"initializer {n}: {ia[n]} vs {ib[n]}" for n in sorted(ia.keys() & ib.keys()) if ia[n] != ib[n]]

    keys_a = [(n.domain, n.op_type, _attrs(n)) for n in ga.node]
    keys_b = [(n.domain, n.op_type, _attrs(n)) for n in gb.node]
    result = OnnxDiff(False, False, nodes=(len(ga.node), len(gb.node)))
    pair: dict[int, int] = {}
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=keys_a, b=keys_b, autojunk=False).get_opcodes():
        if tag == "equal":
            pair.update(zip(range(i1, i2), range(j1, j2)))
        else:
            result.removed += list(range(i1, i2))
            result.added += list(range(j1, j2))
    src_a, src_b = _producers(ga), _producers(gb)

    def through(src):  # a-side source expressed in b's terms
        if src is not None and src[0] == "node":
            return ("node", pair.get(src[1], f"a{src[1]}"), src[2])
        return src

    for i, j in pair.items():
        ins_a = [through(src_a.get(x, ("outer", x))) if x else None for x in ga.node[i].input]
        ins_b = [src_b.get(x, ("outer", x)) if x else None for x in gb.node[j].input]
        if ins_a != ins_b or len(ga.node[i].output) != len(gb.node[j].output):
            result.rewired.append((i, j))
    outs_a = [through(src_a.get(o.name)) for o in ga.output]
    outs_b = [src_b.get(o.name) for o in gb.output]
    if outs_a != outs_b:
        diffs.append("graph outputs are produced by different nodes")
    diffs += [f"- {node_text(ga.node[i])}" for i in result.removed]
    diffs += [f"+ {node_text(gb.node[j])}" for j in result.added]
    diffs += [f"~ {node_text(gb.node[j])}  (was {node_text(ga.node[i])})" for i, j in result.rewired]
    fa = {(f.domain, f.name): _canonical_body(f) for f in ma.functions}
    fb = {(f.domain, f.name): _canonical_body(f) for f in mb.functions}
    if fa.keys() != fb.keys():
        diffs.append(f"functions differ: {sorted(fa)} vs {sorted(fb)}")
    diffs += [f"function {k[1]} differs" for k in fa.keys() & fb.keys() if fa[k] != fb[k]]

    tb = {t.name: t for t in gb.initializer}
    for t in ga.initializer:
        other = tb.get(t.name)
        if other is None or ia[t.name] != ib[t.name]:
            continue
        x, y = numpy_helper.to_array(t), numpy_helper.to_array(other)
        if not np.array_equal(x, y):
            result.changed_initializers[t.name] = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0

    result.differences = diffs
    result.same_structure = not diffs
    result.same_names = result.same_structure and all(
        (x.name, list(x.input), list(x.output)) == (y.name, list(y.input), list(y.output)) for x, y in zip(ga.node, gb.node)
    )
    return result
