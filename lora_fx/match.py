"""Match: which weights of a captured graph a `targets` spec adapts, and how each is consumed.

Matching is on the graph, not on module types: a weight is adaptable when it is 2-D and the ops that
consume it multiply an activation by it (`aten.linear`, GPT-2 Conv1D's `addmm`, Falcon's
`matmul(x, W.T)`, ...). Everything that is refused is kept as a `NearMiss` saying why.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, TargetError
from .report import NearMiss
from .state import Block, Site

aten = torch.ops.aten

# ops that compute x @ W.T with W stored [out, in], W at args[1]
LINEAR_OPS = {aten.linear.default}
# ops that compute x @ W with W stored [in, out] as the right operand
MATMUL_OPS = {aten.mm.default: 1, aten.matmul.default: 1, aten.addmm.default: 2}
# ops that turn an [out, in] weight into [in, out] before a matmul
TRANSPOSE_OPS = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}
# ops that read a 2-D weight as a table, not as a linear map
TABLE_OPS = {aten.embedding.default, aten._embedding_bag.default, aten.embedding_bag.padding_idx}


@dataclass
class Use:
    """One place where a matched weight meets an activation."""

    node: torch.fx.Node  # the node computing the product (for "weight", the consumer of W)
    kind: str  # "linear" | "addmm" | "matmul" | "weight"
    x: torch.fx.Node | None = None  # the activation (None for "weight")
    weight: torch.fx.Node | None = None  # the get_attr node of W (for "weight")
    layout: str | None = None  # how this use reads W: "out_in", "in_out", or None (any)


@dataclass
class Match:
    site: Site
    uses: list[Use]
    left_alone: list[str] = field(default_factory=list)  # consumers not adapted, and why


@dataclass
class TargetSpec:
    """A parsed `targets` argument (PEFT's semantics)."""

    names: list[str] = field(default_factory=list)  # equal to the path or a "."-suffix of it
    regex: str | None = None  # full-matched against the path
    all_linear: bool = False
    blocks: dict[str, Any] = field(default_factory=dict)  # name -> fused-block spec

    def keys(self) -> list[str]:
        return list(self.names) + ([self.regex] if self.regex else []) + list(self.blocks)

    def which(self, path: str) -> str | None:
        """The entry of the spec that matches `path`, or None."""
        for name in list(self.names) + list(self.blocks):
            if path == name or path.endswith("." + name):
                return name
        if self.regex is not None and re.fullmatch(self.regex, path):
            return self.regex
        return None


def parse_targets(targets) -> TargetSpec:
    if isinstance(targets, str):
        if targets == "all-linear":
            return TargetSpec(all_linear=True)
        try:
            re.compile(targets)
        except re.error as e:
            raise ConfigError(f"targets {targets!r} is not a valid regular expression: {e}") from None
        return TargetSpec(regex=targets)
    if isinstance(targets, dict):
        spec = TargetSpec()
        for name, blocks in targets.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"targets dict keys must be module names, got {name!r}")
            spec.blocks[name] = blocks
        if not spec.blocks:
            raise ConfigError("targets is an empty dict: name at least one module, e.g. {'c_attn': [True, False, True]}")
        return spec
    if isinstance(targets, (list, tuple, set, frozenset)):
        names = list(targets)
        bad = [t for t in names if not isinstance(t, str) or not t]
        if bad or not names:
            raise ConfigError(
                f"targets must name modules, e.g. ['q_proj', 'v_proj'], got {list(targets)!r}"
            )
        return TargetSpec(names=names)
    raise ConfigError(
        f"targets must be a list of module names, a regex string, 'all-linear' or a dict of fused "
        f"blocks, got {type(targets).__name__}"
    )


def parse_blocks(spec, out_features: int, path: str) -> tuple[tuple[Block, ...], bool]:
    """Rows to adapt from a fused-block spec: True, [bool, ...] (equal blocks) or [(rows, bool), ...]."""
    if spec is True or spec is None:
        return (Block(0, 0, out_features),), False
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ConfigError(
            f"block spec for {path} must be True, a list of bools or a list of (rows, bool), got {spec!r}"
        )
    if all(isinstance(b, bool) for b in spec):
        if out_features % len(spec):
            raise ConfigError(
                f"{path} has {out_features} output rows, which do not split into {len(spec)} equal "
                f"blocks; give sizes instead, e.g. [(rows, True), ...] summing to {out_features}"
            )
        size = out_features // len(spec)
        sized = [(size, b) for b in spec]
    elif all(isinstance(b, (list, tuple)) and len(b) == 2 for b in spec):
        sized = [(int(n), bool(on)) for n, on in spec]
        if any(n <= 0 for n, _ in sized) or sum(n for n, _ in sized) != out_features:
            raise ConfigError(
                f"block sizes {[n for n, _ in sized]} for {path} add up to {sum(n for n, _ in sized)}, "
                f"but the weight has {out_features} output rows; make them sum to {out_features}"
            )
    else:
        raise ConfigError(f"block spec for {path} mixes forms: {spec!r}; use all bools or all (rows, bool)")
    blocks, start = [], 0
    for i, (n, on) in enumerate(sized):
        if on:
            blocks.append(Block(i, start, start + n))
        start += n
    if not blocks:
        raise ConfigError(f"block spec for {path} enables no block: {spec!r}")
    return tuple(blocks), True


def _owner(name: str) -> tuple[str, str]:
    owner, _, leaf = name.rpartition(".")
    return owner, leaf


def _is_transpose(node: torch.fx.Node) -> bool:
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    if node.target is aten.permute.default:
        return list(node.args[1]) in ([1, 0], [-1, -2])
    return False


def _right_operand_use(user: torch.fx.Node, w: torch.fx.Node, layout: str) -> Use | None:
    """A Use when `user` computes x @ w with w as its right operand (and nothing else of w)."""
    pos = MATMUL_OPS.get(user.target)
    if pos is None or len(user.args) <= pos or user.args[pos] is not w or w in user.args[:pos]:
        return None
    if user.target is aten.addmm.default and (user.kwargs.get("beta", 1) != 1 or user.kwargs.get("alpha", 1) != 1):
        return None
    kind = "addmm" if user.target is aten.addmm.default else "matmul"
    return Use(user, kind, x=user.args[pos - 1], layout=layout)


def classify(weight_nodes: list[torch.fx.Node]):
    """Sort the consumers of a weight's get_attr nodes.

    Returns (uses, tables): products to rewrite, and the consumers that read the weight as a
    table (embedding).
    """
    uses, tables = [], []
    for w in weight_nodes:
        for user in list(w.users):
            if user.target in LINEAR_OPS and len(user.args) > 1 and user.args[1] is w and user.args[0] is not w:
                uses.append(Use(user, "linear", x=user.args[0], layout="out_in"))
                continue
            use = _right_operand_use(user, w, "in_out")
            if use is not None:
                uses.append(use)
                continue
            if user.target in TRANSPOSE_OPS and _is_transpose(user) and user.users:
                inner = [_right_operand_use(u, user, "out_in") for u in user.users]
                if all(inner):
                    uses.extend(inner)
                    continue
            if user.target in TABLE_OPS:
                tables.append(user)
                continue
            # Any other consumer (split, chunk, a custom op, ...): adapt the weight itself,
            # W + scaling * B @ A, which is exact for whatever the consumer computes with it.
            uses.append(Use(user, "weight", weight=w))
    return uses, tables


def _in_stack(node: torch.fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(p == path for p, _ in stack.values())


def _get_attrs(graph: torch.fx.Graph) -> dict[str, list[torch.fx.Node]]:
    found: dict[str, list[torch.fx.Node]] = {}
    for node in graph.find_nodes(op="get_attr"):
        found.setdefault(node.target, []).append(node)
    return found


def _uses(get_attrs: dict, names: list[str], owner: str):
    """Uses of the weight known by `names` that belong to module `owner`: (uses, tables, left_alone)."""
    nodes = [n for alias in names for n in get_attrs.get(alias, [])]
    uses, tables = classify(nodes)
    left_alone = []
    if len(names) > 1:  # tied weight: adapt only the consumers traced inside the matched module
        mine = [u for u in uses if _in_stack(u.node, owner)]
        others = [u for u in uses if u not in mine]
        left_alone = [f"{u.node.name} ({u.node.target}) belongs to another module sharing this weight" for u in others]
        left_alone += [f"{t.name} ({t.target}) reads this tied weight as a table" for t in tables]
        if mine:
            uses, tables = mine, []
    return uses, tables, left_alone


def rematch(gm: nn.Module, sites: list[Site]) -> list[Match]:
    """The uses of already-chosen sites in a graph without LoRA nodes (a re-layout, or a capture of
    the same model for other inputs)."""
    names_by_param: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(p), []).append(name)
    get_attrs = _get_attrs(gm.graph)
    matches = []
    for site in sites:
        names = names_by_param.get(id(gm.get_parameter(site.param)), [site.param])
        uses, _, left_alone = _uses(get_attrs, names, site.owner)
        if uses:
            matches.append(Match(site, uses, left_alone))
    return matches


@dataclass(frozen=True)
class Refusal:
    """Why a weight a target names is not adapted."""

    reason: str
    quiet: bool = False  # not news: a bias of a named module, anything "all-linear" skips


def _key(spec: TargetSpec, name: str, exclude: str | None) -> str | None:
    """The entry of `spec` that names parameter `name` (by its module path, or by its own path for
    a parameter that is not a module's `.weight`), or None."""
    owner, leaf = _owner(name)
    if spec.all_linear:
        return "all-linear" if owner != exclude else None
    key = spec.which(owner)
    if key is None and leaf != "weight":
        key = spec.which(name)
    return key


def _refusal(spec: TargetSpec, name: str, p: torch.Tensor, uses: list[Use], tables: list) -> Refusal | None:
    """None when LoRA can adapt weight `name` as it is used; else why not."""
    leaf = _owner(name)[1]
    if p.dim() != 2:
        quiet = (p.dim() == 1 and spec.all_linear) or (leaf != "weight" and p.dim() < 2)
        return Refusal(f"is {p.dim()}-D {tuple(p.shape)}; LoRA adapts 2-D weights consumed by linear-like ops", quiet)
    if not uses and tables:
        return Refusal(f"is read as a table by {tables[0].target} (an embedding), not by a linear-like op; LoRA "
                       "here adapts linear layers only", spec.all_linear)
    if not uses:
        return Refusal("is not used by the captured forward", spec.all_linear)
    if spec.all_linear and all(u.kind == "weight" for u in uses):
        return Refusal("is not a linear layer (only split or reshaped)", quiet=True)
    if len({u.layout for u in uses if u.layout}) > 1:
        return Refusal("is used both as [out, in] and as [in, out]; cannot adapt it consistently")
    return None


def _site(gm: nn.Module, spec: TargetSpec, key: str, name: str, uses: list[Use], two_d_leaves: list[str]) -> Site:
    """The site for weight `name`: its layout, sizes, adapted row blocks, and where LoRA lives."""
    owner, leaf = _owner(name)
    p = gm.get_parameter(name)
    layout = next((u.layout for u in uses if u.layout), "out_in")  # weight-form uses only: PyTorch's [out, in]
    out_f, in_f = (p.shape[0], p.shape[1]) if layout == "out_in" else (p.shape[1], p.shape[0])
    blocks, fused = parse_blocks(spec.blocks.get(key), out_f, name)
    # LoRA lives on the module for its `.weight` (PEFT's place); a module's other 2-D parameters
    # (nn.MultiheadAttention's in_proj_weight next to out_proj) get a holder of their own
    holder = owner if (leaf == "weight" or two_d_leaves == [leaf]) else f"{owner}.{leaf}_lora".lstrip(".")
    return Site(name, owner, holder, layout, int(in_f), int(out_f), blocks, fused)


def match_weights(
    gm: nn.Module,
    spec: TargetSpec,
    *,
    exclude: str | None = None,
) -> tuple[list[Match], list[NearMiss]]:
    """Every weight of `gm` that `spec` adapts, with its uses; and the near misses.

    `exclude` is a module path never adapted by "all-linear" (the model's output layer, as PEFT).
    """
    names_by_param: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(p), []).append(name)
    get_attrs = _get_attrs(gm.graph)
    two_d: dict[str, list[str]] = {}  # owner path -> its 2-D parameter leaves
    for name, p in gm.named_parameters(remove_duplicate=False):
        if p.dim() == 2:
            two_d.setdefault(_owner(name)[0], []).append(_owner(name)[1])

    matches: list[Match] = []
    near: list[NearMiss] = []
    named: set[str] = set()  # spec entries that name some parameter
    adapted: set[str] = set()  # spec entries that adapt some weight
    for names in names_by_param.values():
        for name in names:
            key = _key(spec, name, exclude)
            if key is None:
                continue
            named.add(key)
            uses, tables, left_alone = _uses(get_attrs, names, _owner(name)[0])
            refusal = _refusal(spec, name, gm.get_parameter(name), uses, tables)
            if refusal is not None:
                if not refusal.quiet:
                    near.append(NearMiss(key, name, refusal.reason))
                continue
            if tables:
                near.append(NearMiss(key, name, f"is also read as a table by {tables[0].target}; that read is left unadapted"))
            matches.append(Match(_site(gm, spec, key, name, uses, two_d.get(_owner(name)[0], [])), uses, left_alone))
            adapted.add(key)
            break  # one site per parameter, under the first of its names that matched

    near += [NearMiss(key, None, "matches no module path") for key in spec.keys() if key not in named]
    if not matches:
        raise TargetError(no_match_message(gm, spec, near))
    refused = [k for k in named if k not in adapted and k in spec.names + list(spec.blocks)]
    if refused:
        why = "; ".join(str(n) for n in near if n.target in refused)
        raise TargetError(f"targets {refused} match only weights that LoRA cannot adapt: {why}. Remove them from targets.")
    return matches, near


def no_match_message(gm: nn.Module, spec: TargetSpec, near: list[NearMiss]) -> str:
    linear_like = []
    for name, p in gm.named_parameters():
        if p.dim() == 2:
            nodes = gm.graph.find_nodes(op="get_attr", target=name)
            uses, _ = classify(nodes)
            if any(u.kind != "weight" for u in uses):
                linear_like.append(_owner(name)[0])
    wanted = spec.keys() or ["all-linear"]
    hints = []
    for key in wanted:
        close = difflib.get_close_matches(key, linear_like, n=3, cutoff=0.3)
        tails = sorted({p.rsplit(".", 1)[-1] for p in linear_like})
        close += [t for t in difflib.get_close_matches(key, tails, n=3, cutoff=0.3) if t not in close]
        hints.append(f"{key!r}: closest {close[:4]}" if close else f"{key!r}: nothing close")
    reasons = "; ".join(str(n) for n in near[:8])
    names = sorted({p.rsplit(".", 1)[-1] for p in linear_like})
    return (
        f"targets {wanted} adapt no weight of this model ({reasons}). The graph has "
        f"{len(linear_like)} linear-like weights, in modules named {names[:12]}"
        f"{' ...' if len(names) > 12 else ''}. {'; '.join(hints)}. Pass names from that list, "
        f"e.g. targets={names[:2]}."
    )
