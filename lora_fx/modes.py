"""Train/eval for captured graphs.

torch.export bakes the capture-time mode into the graph (`aten.dropout(x, p, False)`, and attention
dropout disappears from `scaled_dot_product_attention` in eval mode) and `ep.module()` refuses
`train()` / `eval()`. We capture in eval mode and turn every dropout site into a call to a small module
that reads `self.training`, so `gm.train()` / `gm.eval()` switch dropout exactly as they do on the
original model. Attention dropout is invisible in an eval capture, so its probability is read from a
train-mode capture when the model has any dropout at all.
"""
from __future__ import annotations

import torch
from torch import nn

from .paths import free_path, innermost_module_path, innermost_module_type, set_module

aten = torch.ops.aten
DROPOUT = aten.dropout.default
SDPA = aten.scaled_dot_product_attention.default


class ScaledDotProductAttention(nn.Module):
    """`aten.scaled_dot_product_attention` whose dropout follows train() / eval()."""

    def __init__(self, dropout_p: float):
        super().__init__()
        self.dropout_p = float(dropout_p)

    def forward(self, *args, **kwargs):
        p = self.dropout_p if self.training else 0.0
        if len(args) > 4:
            args = (*args[:4], p, *args[5:])
        else:
            kwargs = {**kwargs, "dropout_p": p}
        return SDPA(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}"


def dropout_sites(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Nodes whose behaviour depends on the mode, in graph order."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in (DROPOUT, SDPA)]


def dropout_p(node: torch.fx.Node) -> float:
    if node.target is DROPOUT:
        return float(node.args[1])
    if len(node.args) > 4:
        return float(node.args[4])
    return float(node.kwargs.get("dropout_p", 0.0))


def has_dropout(model: nn.Module) -> bool:
    """Whether any module of the model carries a non-zero dropout probability.

    Decides whether a second, train-mode capture is worth its cost: Llama-style models with all
    dropout at 0 skip it.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and value > 0:
                return True
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in vars(config).items():
            if "dropout" in name and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return True
    return False


def hidden_attention_dropout(model: nn.Module, graph: torch.fx.Graph) -> bool:
    """Whether an eval-mode capture may hide a dropout probability: some attention
    (`scaled_dot_product_attention`) runs in a module that carries a non-zero dropout value (its own,
    or its config's). Only then is a train-mode capture needed to read it; `aten.dropout` sites keep
    their probability in an eval capture."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not SDPA:
            continue
        try:
            owner = model.get_submodule(innermost_module_path(node))
        except AttributeError:
            return True
        if has_dropout(owner) or (innermost_module_path(node) == "" and has_dropout(model)):
            return True
    return False


def make_mode_aware(gm: torch.fx.GraphModule, train_probs: list[float] | None) -> int:
    """Replace each dropout site of an eval-mode capture by a module call that obeys `training`.

    `train_probs` are the probabilities the same sites have in a train-mode capture (same order),
    or None to use the eval capture's own. Sites with probability 0 stay as they are. Returns how
    many sites were replaced.
    """
    sites = dropout_sites(gm.graph)
    probs = train_probs if train_probs is not None else [dropout_p(n) for n in sites]
    replaced = 0
    placed: dict[tuple[str, str, float], str] = {}
    for node, p in zip(sites, probs):
        if p <= 0:
            continue
        owner = innermost_module_path(node)
        if node.target is DROPOUT:
            is_dropout_module = innermost_module_type(node).endswith(".Dropout")
            base = owner if is_dropout_module and owner else ".".join(filter(None, [owner, "dropout"]))
            make = lambda: nn.Dropout(p)  # noqa: E731
            args, kwargs = (node.args[0],), {}
        else:
            base = ".".join(filter(None, [owner, "attention"]))
            make = lambda: ScaledDotProductAttention(p)  # noqa: E731
            args, kwargs = node.args, dict(node.kwargs)
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            else:
                kwargs.pop("dropout_p", None)
        key = (base, str(node.target), p)
        if key not in placed:  # a dropout module called twice stays one module
            placed[key] = free_path(gm, base)
            set_module(gm, placed[key], make())
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(placed[key], args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced
