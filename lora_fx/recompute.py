"""Recompute: a frozen weight the graph computes (a quantized weight's dequantize chain) is computed
again in backward instead of being kept from forward.

Autograd keeps a product's weight operand for the activation's gradient. When the operand is a
parameter that is a reference; when the graph computes it (torch.export traces a torchao weight into
its dequantize chain: NF4 / int4 `linear(x, dequantize(Wq))`, int8 `mm(x, Wq.t().float())`), it is a
float copy of the whole weight, held from forward to backward for every quantized layer, LoRA's
target or not. `recompute_graph` turns each such product into `recomputed(...)`: the same op on the
same operand in forward (the same output, bit for bit), keeping only the frozen tensors the operand
is computed from; backward computes the operand again from them and returns the activation's
gradient (bitsandbytes' MatMul4Bit and torchao's linear_nf4 do the same).

The graph a user reads, diffs, folds and exports is not changed: `LoraGraphModule` runs the rewritten
copy (`training_runner`) when gradients are on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .paths import copy_graph, resolve

aten = torch.ops.aten
# the products whose weight operand (at 1; the activation at 0) is recomputed, by name
PRODUCTS = {"linear": aten.linear.default, "mm": aten.mm.default, "matmul": aten.matmul.default,
            "bmm": aten.bmm.default}
_NAMES = {op: name for name, op in PRODUCTS.items()}
# ops that give a view of their input (no new memory): a weight reached only through these is the
# parameter itself, which autograd keeps by reference
VIEWS = {aten.t.default, aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
         aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.slice.Tensor,
         aten.select.int, aten.alias.default, aten.detach.default, aten.unflatten.int,
         torch.ops.export.access_subclass_inner_tensor.default}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}


@dataclass
class Recomputed:
    """What `recompute_graph` rewrote: per product node, the weights its operand is computed from."""

    products: dict[str, list[str]] = field(default_factory=dict)  # product node -> frozen tensors (paths)

    def __len__(self) -> int:
        return len(self.products)


@torch.library.custom_op("lora_fx::after", mutates_args=())
def after(grad: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `leaves` that come after `grad`. Under torch.compile the weight recomputed in
    backward would otherwise depend on frozen tensors only, and AOTAutograd's partitioner would
    compute it in forward and save it, the very copy this module removes; the leaves are packed
    (quantized) tensors, so the copies are small."""
    return [t.clone() for t in leaves]


@after.register_fake
def _(grad, leaves):
    return [torch.empty_like(t) for t in leaves]


class _Recompute(torch.autograd.Function):
    """`product(x, w, *rest)` keeping `leaves` (what `w` is computed from) instead of `w`."""

    @staticmethod
    def forward(ctx, product, weight_fn, n_rest, x, w, *rest_and_leaves):
        rest, leaves = rest_and_leaves[:n_rest], rest_and_leaves[n_rest:]
        ctx.linear, ctx.weight_fn, ctx.n_rest, ctx.bias_shape = product == "linear", weight_fn, n_rest, None
        if rest and isinstance(rest[0], torch.Tensor):
            ctx.bias_shape = rest[0].shape
        ctx.save_for_backward(*leaves)
        return PRODUCTS[product](x, w, *rest)

    @staticmethod
    def backward(ctx, grad):
        leaves = ctx.saved_tensors
        w = ctx.weight_fn(*(after(grad, list(leaves)) if torch.compiler.is_compiling() else leaves))
        # linear: y = x @ w.T (+ b); mm / matmul / bmm: y = x @ w
        gx = grad.matmul(w) if ctx.linear else grad.matmul(w.transpose(-1, -2))
        gb = None
        if ctx.needs_input_grad[5] and ctx.bias_shape is not None:  # a trained bias beside a frozen weight
            gb = grad.reshape(-1, grad.shape[-1]).sum(0).reshape(ctx.bias_shape)
        return (None, None, None, gx if ctx.needs_input_grad[3] else None, None, gb,
                *[None] * (len(ctx.saved_tensors) + ctx.n_rest - 1))


def recomputed(product: str, weight_fn, n_rest: int, x, w, *rest_and_leaves):
    """What a rewritten product node calls: PRODUCTS[product](x, w, *rest) keeping `leaves` (what the
    frozen `w` is computed from by `weight_fn`) for backward instead of `w`."""
    return _Recompute.apply(product, weight_fn, n_rest, x, w, *rest_and_leaves)


def _computes(node: torch.fx.Node) -> bool:
    """The op allocates a new tensor: not a view, not a cast to the dtype its input has."""
    if node.op != "call_function" or node.target in VIEWS:
        return False
    if node.target in _CASTS:
        src, out = getattr(node.args[0], "meta", {}).get("val"), node.meta.get("val")
        return not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == out.dtype)
    return True


def frozen_chain(operand: torch.fx.Node, root: nn.Module) -> tuple[list[torch.fx.Node], list[torch.fx.Node]] | None:
    """(the nodes computing `operand`, the frozen tensors they read) when `operand` is computed from
    frozen tensors only, reads at least one parameter and allocates (else None: an input, a trained
    weight or a plain parameter, which autograd keeps by reference)."""
    chain, leaves, todo, seen, reads_parameter = [], [], [operand], set(), False
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "get_attr":
            value = resolve(root, node.target)
            if not isinstance(value, torch.Tensor) or value.requires_grad:
                return None
            leaves.append(node)
            reads_parameter |= isinstance(value, nn.Parameter)
        elif node.op == "call_function":
            chain.append(node)
            todo.extend(node.all_input_nodes)
        else:  # an input, a module call, ...
            return None
    if not reads_parameter or not any(_computes(n) for n in chain):
        return None
    order = {n: i for i, n in enumerate(operand.graph.nodes)}
    return sorted(chain, key=order.get), sorted(leaves, key=order.get)


def weight_function(chain: list[torch.fx.Node], leaves: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """A small graph module computing the operand (`chain[-1]`) from `leaves` (placeholders, in order)."""
    graph = torch.fx.Graph()
    env = {leaf: graph.placeholder(f"leaf_{i}") for i, leaf in enumerate(leaves)}
    for node in chain:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[chain[-1]])
    return torch.fx.GraphModule(nn.Module(), graph)


def _plain_shapes(product: str, x, w) -> bool:
    """Shapes whose activation gradient is grad @ w (linear) or grad @ w.T: a matrix weight, or a
    batch of them as large as the activation's (no broadcast to reduce)."""
    xv, wv = getattr(x, "meta", {}).get("val"), w.meta.get("val")
    if not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor) or wv.dim() < 2 or xv.dim() < 2:
        return False
    return wv.dim() == 2 or (product != "linear" and xv.shape[:-2] == wv.shape[:-2])


def _candidates(gm: nn.Module, graph: torch.fx.Graph):
    """(product node, its name in PRODUCTS, chain, leaves) for each product with a computed frozen weight."""
    for node in graph.nodes:
        product = _NAMES.get(node.target) if node.op == "call_function" else None
        if product is None or len(node.args) < 2 or not isinstance(node.args[1], torch.fx.Node) or node.kwargs:
            continue
        if not _plain_shapes(product, node.args[0], node.args[1]):
            continue
        found = frozen_chain(node.args[1], gm)
        if found is not None:
            yield node, product, *found


def frozen_products(gm: nn.Module, graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The products in `graph` whose weight is computed from frozen tensors (what `recompute_graph` rewrites)."""
    return [found[0] for found in _candidates(gm, graph)]


def recompute_graph(gm: nn.Module, graph: torch.fx.Graph) -> tuple[torch.fx.Graph, dict[str, nn.Module], Recomputed]:
    """A copy of `graph` (over `gm`'s tensors) whose products with a computed frozen weight recompute
    it in backward; the weight functions it calls (get_attr targets -> module); what was rewritten.
    Without such a product: `graph` itself, no functions, nothing rewritten."""
    found = list(_candidates(gm, graph))
    if not found:
        return graph, {}, Recomputed()
    graph = copy_graph(graph)  # a deep copy keeps node names: the nodes found are looked up by name
    copied = {n.name: n for n in graph.nodes}
    functions, done = {}, Recomputed()
    for node, product, chain, leaves in found:
        node, chain, leaves = copied[node.name], [copied[n.name] for n in chain], [copied[n.name] for n in leaves]
        name = f"lora_recompute_{len(functions)}"
        functions[name] = weight_function(chain, leaves)
        with graph.inserting_before(node):
            fn = graph.get_attr(name)
        x, w, *rest = node.args
        node.target = recomputed
        node.args = (product, fn, len(rest), x, w, *rest, *leaves)
        done.products[node.name] = [leaf.target for leaf in leaves]
    graph.lint()
    return graph, functions, done
