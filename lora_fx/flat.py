"""A graph module to run, not to read: what generation's inner loop calls once per token.

The generated code of a captured graph reaches each weight through its module path
(`getattr(self.model.layers, "7").self_attn.q_proj.weight`: one `nn.Module.__getattr__` per part, for
every weight, every step) and keeps torch.export's runtime checks (`_assert_tensor_metadata`) and
casts to the dtype a tensor already has. `flat_runner` gives the same computation with every weight
and called module one attribute of the root, the checks and the no-op casts gone; it shares the
graph module's tensors and modules, so training, adapter switches and `disable_adapters` show.
"""
from __future__ import annotations

import torch
from torch import nn

from .paths import copy_graph, resolve

_CHECKS = {torch.ops.aten._assert_tensor_metadata.default}
_CASTS = {torch.ops.aten.to.dtype}


def _flat(path: str) -> str:
    return "f_" + path.replace(".", "__")


def _same_dtype_cast(node: torch.fx.Node) -> bool:
    """`aten.to.dtype(x, dtype)` where x already has `dtype` (and no copy, no memory format asked)."""
    if node.target not in _CASTS or node.kwargs or not 2 <= len(node.args) <= 4:
        return False
    source = getattr(node.args[0], "meta", {}).get("val")
    copies = len(node.args) > 3 and node.args[3]
    return isinstance(source, torch.Tensor) and source.dtype == node.args[1] and not copies


def flat_runner(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm`'s computation, faster to call (see the module doc); not for export or diffing."""
    graph = copy_graph(gm.graph)
    root = nn.Module()
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _CHECKS and not node.users:
            graph.erase_node(node)
        elif node.op == "call_function" and _same_dtype_cast(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op in ("get_attr", "call_module"):
            value = resolve(gm, node.target)
            name = _flat(node.target)
            if isinstance(value, nn.Parameter):
                root.register_parameter(name, value)
            elif isinstance(value, nn.Module):
                root.add_module(name, value)
            elif isinstance(value, torch.Tensor):
                root.register_buffer(name, value)
            else:
                setattr(root, name, value)
            node.target = name
    graph.lint()
    runner = torch.fx.GraphModule(root, graph)
    runner.train(gm.training)
    return runner
