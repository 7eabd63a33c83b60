"""Match: which weights of a captured graph a `targets` spec adapts, and how each is consumed.

Matching is on the graph, not on module types. A weight's kind follows from its consumers:
    linear     2-D, multiplied with an activation (`aten.linear`, GPT-2 Conv1D's `addmm`, Falcon's
               `matmul(x, W.T)`, ...)
    conv       N-D, the weight of `aten.conv1d/2d/3d` (any stride, padding, dilation, groups)
    embedding  2-D, read as a table by `aten.embedding` (named explicitly; "all-linear" skips it)
    experts    3-D, a stack of matrices named by parameter path (`target_parameters`), whatever
               consumes it (a grouped-mm op, `index` + `bmm`, ...)
A quantized weight (torchao int8 / int4 / NF4) is linear: its use is its nn.Linear's whole traced
forward (the dequantize chain), from the activation in to the output out.
Everything that is refused is kept as a `NearMiss` saying why.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, TargetError
from .peft_rules import MOE_RENAMES, Selection, is_gpt2_conv1d, leaf_names, moe_family, moe_targets, peft_module, selection
from .quantized import format_name, is_subclass, refusal
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
# convolutions: (input, weight, bias, stride, padding, dilation, groups); `.padding` takes "same" / "valid"
CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
            aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}


@dataclass
class Use:
    """One place where a matched weight meets an activation."""

    node: torch.fx.Node  # the node computing the product (for "weight", the consumer of W)
    kind: str  # "linear" | "addmm" | "matmul" | "conv" | "embedding" | "weight"
    x: torch.fx.Node | None = None  # the activation, or the indices of an embedding (None for "weight")
    weight: torch.fx.Node | None = None  # the get_attr node of W (for "weight")
    layout: str | None = None  # how this use reads W: "out_in", "in_out", or None (any)
    reads: torch.fx.Node | None = None  # the node that reads x, when not `node` (a quantized layer's chain)


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
    parameters: list[str] = field(default_factory=list)  # PEFT's target_parameters: parameter paths or suffixes
    # LoRA acts only where the named module's own forward reads its weight, as PEFT's wrappers do
    # (always for "all-linear"; for PEFT's files, so they load to PEFT's numbers)
    own_calls: bool = False
    selection: Selection = field(default_factory=Selection)  # PEFT's exclude_modules / layers_to_transform

    def keys(self) -> list[str]:
        return list(self.names) + ([self.regex] if self.regex else []) + list(self.blocks) + list(self.parameters)

    def parameter(self, name: str) -> str | None:
        """The target_parameters entry naming parameter `name`, or None."""
        return next((t for t in self.parameters if name == t or name.endswith("." + t)), None)

    def which(self, path: str) -> str | None:
        """The entry of the spec that matches `path`, or None (PEFT's order: excluded first, then a
        name equal to the path, then a "."-suffix in the selected layers, or the regex)."""
        if self.selection.excludes(path):
            return None
        names = list(self.names) + list(self.blocks)
        exact = next((n for n in names if path == n), None)
        if exact is not None:
            return exact
        suffix = next((n for n in names if path.endswith("." + n)), None)
        if suffix is not None:
            return suffix if self.selection.keeps_layer(path) else None
        if self.regex is not None and re.fullmatch(self.regex, path):
            return self.regex
        return None

    def linear(self, path: str) -> bool:
        """"all-linear" keeps linear module `path`: PEFT expands it to the modules' leaf names, so a
        top-level module is named exactly (no layer filter) and any other by suffix."""
        return not self.selection.excludes(path) and ("." not in path or self.selection.keeps_layer(path))


def parse_targets(targets, parameters=None, *, exclude_modules=None, layers_to_transform=None,
                  layers_pattern=None) -> TargetSpec:
    """`targets` (module names, a regex, "all-linear" or fused-block specs) and `parameters`
    (PEFT's target_parameters: paths of weights that are not a module's `.weight`, e.g. MoE experts),
    with PEFT's layer selection (`peft_rules.Selection`; parameter targets are not filtered, as in PEFT)."""
    chosen = selection(exclude_modules, layers_to_transform, layers_pattern, isinstance(targets, str))
    spec = _parse_targets(targets, parameters)
    spec.selection = chosen
    return spec


def _parse_targets(targets, parameters=None) -> TargetSpec:
    if parameters is not None:
        names = [parameters] if isinstance(parameters, str) else parameters
        if not isinstance(names, (list, tuple)) or not all(isinstance(t, str) and t for t in names):
            raise ConfigError(f"target_parameters must be a list of parameter names, e.g. ['experts.gate_up_proj'], "
                              f"got {parameters!r}")
        spec = _parse_targets(targets) if targets not in (None, [], ()) else TargetSpec()
        spec.parameters = list(names)
        return spec
    if targets is None or (isinstance(targets, (list, tuple)) and not targets):
        raise ConfigError("targets is empty: name modules, e.g. ['q_proj', 'v_proj'], or pass target_parameters")
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


@dataclass
class Resolved:
    """Targets as PEFT reads them on one model: the spec to match, the rank / alpha patterns PEFT adds,
    and what was renamed (for the report)."""

    spec: TargetSpec
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    note: str = ""


def resolve_targets(spec: TargetSpec, model: nn.Module | None, rank: int, alpha: float) -> Resolved:
    """`spec` as PEFT applies it to `model`: on the MoE families whose experts transformers 5 fused,
    PEFT renames targets named like v4 expert projections or routers (`gate_proj`, `up_proj`,
    `down_proj`, `gate`; Mixtral's `w1`/`w2`/`w3`) to the fused experts' parameters, after resolving a
    string target (a regex, "all-linear") to the leaf names it matches; everything else is unchanged."""
    family = moe_family(model)
    if family is None or spec.blocks:  # fused-block specs are lora-fx's own: nothing for PEFT to rename
        return Resolved(spec)
    if spec.all_linear:
        names = sorted(set(leaf_names(all_linear_paths(model, output_layer(model)))) | set(MOE_RENAMES[family]))
    elif spec.regex is not None:
        names = _regex_leaves(spec.regex, model, family)
    else:
        names = list(spec.names)
    moved = moe_targets(family, names, list(spec.parameters), rank, alpha)
    if not moved.renamed:
        return Resolved(spec)
    note = (f"as PEFT does on {family}-family models, targets {sorted(moved.renamed)} name the fused experts "
            f"{sorted(set(moved.renamed.values()))} (by parameter) instead of modules")
    return Resolved(TargetSpec(names=moved.names, parameters=moved.parameters, own_calls=spec.own_calls,
                               selection=spec.selection), moved.rank_pattern,
                    moved.alpha_pattern, note)


def _regex_leaves(regex: str, model: nn.Module, family: str) -> list[str]:
    """PEFT's resolution of a regex target on these models: the leaf names of the module and parameter
    paths it full-matches, plus each v4 name whose reconstructed path (the fused parameter's module
    + the v4 name) it matches."""
    keys = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    matched = set(leaf_names(k for k in keys if re.fullmatch(regex, k)))
    containers: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        owner, leaf = _owner(name)
        containers.setdefault(leaf, set()).add(owner)
    for old, new in MOE_RENAMES[family].items():
        if old not in matched and any(re.fullmatch(regex, f"{c}.{old}") for c in containers.get(new, ())):
            matched.add(old)
    return sorted(matched)


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
            if user.target in CONV_OPS and len(user.args) > 1 and user.args[1] is w and user.args[0] is not w:
                groups = user.args[6] if len(user.args) > 6 else user.kwargs.get("groups", 1)
                # a grouped conv's update is applied to its weight (exact; LoRA's own conv would mix groups)
                uses.append(Use(user, "conv", x=user.args[0]) if groups == 1 else Use(user, "weight", weight=w))
                continue
            # Any other consumer (split, chunk, a custom op, ...): adapt the weight itself,
            # W + scaling * B @ A, which is exact for whatever the consumer computes with it.
            uses.append(Use(user, "weight", weight=w))
    return uses, tables


def _in_stack(node: torch.fx.Node, path: str) -> bool:
    if not path:  # the graph's own module (a region captured at its weight's module)
        return True
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
        mine_tables = [t for t in tables if _in_stack(t, owner)]
        others = [u for u in uses if u not in mine]
        left_alone = [f"{u.node.name} ({u.node.target}) belongs to another module sharing this weight" for u in others]
        if mine:
            left_alone += [f"{t.name} ({t.target}) reads this tied weight as a table" for t in tables]
            uses, tables = mine, []
        elif mine_tables:  # a tied embedding named as the embedding: its products belong to the other module
            left_alone += [f"{t.name} ({t.target}) belongs to another module sharing this weight"
                           for t in tables if t not in mine_tables]
            uses, tables = [], mine_tables
    return uses, tables, left_alone


class LayerCalls:
    """The nodes each module's calls traced (innermost nn_module_stack entry), and the nodes computed
    from weights and constants alone (no model input reaches them): both indexed once per graph, in
    one pass in graph order, on first use."""

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self._index: dict[str, dict[str, list[torch.fx.Node]]] | None = None
        self._weight_side: set[torch.fx.Node] = set()

    def _build(self) -> None:
        self._index = {}
        for node in self.graph.nodes:
            if node.op == "get_attr" or (node.op != "placeholder" and
                                         all(i in self._weight_side for i in node.all_input_nodes)):
                self._weight_side.add(node)
            stack = node.meta.get("nn_module_stack")
            if node.op == "call_function" and stack:
                key, (owner, _) = list(stack.items())[-1]
                self._index.setdefault(owner, {}).setdefault(key, []).append(node)

    def of(self, path: str) -> dict[str, list[torch.fx.Node]]:
        """Call key -> nodes, for each call of the module at `path`."""
        if self._index is None:
            self._build()
        return self._index.get(path, {})

    def is_activation(self, node: torch.fx.Node) -> bool:
        """A float tensor some model input reaches (call `of` first)."""
        val = node.meta.get("val")
        return isinstance(val, torch.Tensor) and val.is_floating_point() and node not in self._weight_side


def quantized_uses(gm: nn.Module, owner: str, calls: LayerCalls) -> list[Use] | Refusal:
    """Each call of the quantized nn.Linear at `owner`, as a linear use: from the activation it reads
    to the output of its dequantize chain. The chain is everything traced inside the layer's
    forward (its nn_module_stack), whatever the format spells there."""
    cap = getattr(gm, "capture_info", None)
    module = cap.source.get_submodule(owner) if cap is not None and cap.source is not None else None
    if not isinstance(module, nn.Linear):
        return Refusal(f"is a quantized weight of a {type(module).__name__}; LoRA sits beside quantized nn.Linear "
                       "layers only (their forward is the product it adds to)")
    uses = []
    for key, region in calls.of(owner).items():
        inside = set(region)
        xs = {i for n in region for i in n.all_input_nodes if i not in inside and calls.is_activation(i)}
        outs = [n for n in region if any(u not in inside for u in n.users)]
        if len(xs) != 1 or len(outs) != 1:
            return Refusal(f"its layer's traced forward reads {len(xs)} activations and gives {len(outs)} outputs; "
                           "a quantized linear layer reads one and gives one")
        x = xs.pop()
        reads = next((n for n in region if x in n.args), None)
        if reads is None:
            return Refusal("its layer's traced forward reads the activation only as a keyword argument; "
                           "a quantized linear layer reads it as an argument")
        uses.append(Use(outs[0], "linear", x=x, layout="out_in", reads=reads))
    return uses or Refusal("is not used by the captured forward")


def rematch(gm: nn.Module, sites: list[Site]) -> list[Match]:
    """The uses of already-chosen sites in a graph without LoRA nodes (a re-layout, or a capture of
    the same model for other inputs)."""
    names_by_param: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(p), []).append(name)
    get_attrs = _get_attrs(gm.graph)
    calls = LayerCalls(gm.graph)
    matches = []
    for site in sites:
        names = names_by_param.get(id(gm.get_parameter(site.param)), [site.param])
        if site.quantized:
            uses = quantized_uses(gm, site.owner, calls)
            if not isinstance(uses, Refusal):
                matches.append(Match(site, uses))
            continue
        uses, tables, left_alone = _uses(get_attrs, names, site.owner)
        nodes = [n for alias in names for n in get_attrs.get(alias, [])]
        uses = parameter_uses(nodes) if site.by_parameter else kind_uses(site.kind, uses, tables, nodes)
        if site.own_calls_only:
            uses = [u for u in uses if _in_stack(u.node, site.owner)]
        if uses:
            matches.append(Match(site, uses, left_alone))
    return matches


def kind_uses(kind: str, uses: list[Use], tables: list[torch.fx.Node], nodes: list[torch.fx.Node]) -> list[Use]:
    """The uses to rewrite for a weight of `kind` (read through get_attr `nodes`), from `classify`'s
    products and tables."""
    if kind == "embedding":
        looked_up = [Use(t, "embedding", x=t.args[1]) if t.target is aten.embedding.default
                     else Use(t, "weight", weight=t.args[0]) for t in tables]
        return looked_up + uses
    if kind == "experts":  # whatever reads the stack (a transpose into a grouped mm, index + bmm) gets W + update
        return [Use(user, "weight", weight=w) for w in nodes for user in list(w.users)]
    return uses


def parameter_uses(nodes: list[torch.fx.Node]) -> list[Use]:
    """Every reader of a weight named by parameter path gets W + update (PEFT's ParamWrapper), so the
    update is in the parameter's own layout whatever the product."""
    return [Use(user, "weight", weight=w) for w in nodes for user in list(w.users)]


def output_layer(model: nn.Module | None) -> str | None:
    """The path of a transformers model's output layer (PEFT leaves it out of "all-linear")."""
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        head = get()
    except Exception:  # some models raise instead of returning None
        return None
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


def all_linear_paths(model: nn.Module, exclude: str | None) -> set[str]:
    """PEFT's "all-linear": the paths of every nn.Linear / Conv1D module but the output layer (a
    weight tied to the output layer, like T5's `shared` embedding, is never a linear module)."""
    return {path for path, m in model.named_modules(remove_duplicate=False) if peft_module(m) == "linear" and path != exclude}


@dataclass(frozen=True)
class Refusal:
    """Why a weight a target names is not adapted."""

    reason: str
    quiet: bool = False  # not news: a bias of a named module, anything "all-linear" skips


def _key(spec: TargetSpec, name: str, exclude: str | None, attention: set[str], linear: set[str] | None) -> str | None:
    """The entry of `spec` that names parameter `name` (by its module path, or by its own path for
    a parameter that is not a module's `.weight`), or None. A target naming an
    nn.MultiheadAttention (a path in `attention`) names its out_proj too, as in PEFT (not a
    fused-block spec, which is about in_proj's rows). "all-linear" names the `.weight` of the
    modules in `linear` (PEFT's definition; None: a graph without its model, any linear product)."""
    owner, leaf = _owner(name)
    if spec.all_linear:
        if not spec.linear(owner):
            return None
        if linear is None:
            return "all-linear" if owner != exclude else None
        return "all-linear" if owner in linear and leaf == "weight" else None
    key = spec.which(owner)
    if key is None and leaf != "weight":
        key = spec.which(name)
    parent, child = _owner(owner)
    if key is None and child == "out_proj" and parent in attention:
        key = spec.which(parent)
        if key in spec.blocks:  # a fused-block spec names the rows of in_proj only
            key = None
    return key


def _module_at(model: nn.Module | None, path: str) -> nn.Module | None:
    if model is None:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def attention_paths(model: nn.Module | None) -> set[str]:
    """Paths of the nn.MultiheadAttention modules of the captured model."""
    if model is None:
        return set()
    return {path for path, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def _is_bias(leaf: str) -> bool:
    return leaf == "bias" or leaf.endswith("_bias") or leaf.startswith("bias_")


def _kind(spec: TargetSpec, name: str, p: torch.Tensor, uses: list[Use], tables: list,
          by_parameter: bool, module_kind: str | None = None) -> str | Refusal:
    """The kind of weight `name` ("linear", "conv", "embedding", "experts") as it is used, or why
    LoRA does not adapt it. The `.weight` of a module PEFT wraps (`module_kind`) that the captured
    forward does not use is still adapted, as PEFT wraps it: its LoRA trains in the captures that
    use it (other inputs), and files keep it."""
    leaf = _owner(name)[1]
    unused = not uses and not tables and not is_subclass(p) and leaf == "weight" and not by_parameter
    if unused and module_kind in ("linear", "embedding", "conv") and (module_kind == "conv" or p.dim() == 2):
        if not spec.all_linear or module_kind == "linear":
            return module_kind
    if is_subclass(p):
        why = refusal(p)
        if why is not None:
            return Refusal(why, spec.all_linear)
        if by_parameter:
            return Refusal(f"is a quantized weight ({format_name(p)}); LoRA sits beside quantized nn.Linear layers, "
                           "named as modules in targets")
        return uses if isinstance(uses, Refusal) else "linear"
    if _is_bias(leaf):  # a bias stack is 2-D in MoE experts (gpt-oss): still one value per output
        return Refusal(f"is a bias {tuple(p.shape)} (one value per output), not a matrix LoRA can factor; "
                       "LoRA adapts weights", quiet=not by_parameter)
    if p.dim() >= 3 and uses and all(u.kind == "conv" or u.node.target in CONV_OPS for u in uses):
        if spec.all_linear:  # PEFT's "all-linear" is linear layers only
            return Refusal("is a convolution weight", quiet=True)
        return "conv"
    if p.dim() == 3 and by_parameter:
        return "experts" if uses or tables else Refusal("is not used by the captured forward")
    if p.dim() != 2:
        quiet = spec.all_linear or (leaf != "weight" and p.dim() < 2)
        what = ("a vector (a norm's scale?)" if p.dim() < 2 else
                "not a convolution's weight; name a stack of expert matrices in target_parameters" if p.dim() == 3 else
                "not a convolution's weight")
        return Refusal(f"is {p.dim()}-D {tuple(p.shape)}, {what}; LoRA adapts matrices: linear, conv and embedding "
                       "weights and expert stacks", quiet)
    if not uses and tables:
        if spec.all_linear:  # as PEFT: "all-linear" leaves embeddings alone
            return Refusal(f"is read as a table by {tables[0].target} (an embedding)", quiet=True)
        return "embedding"
    if not uses:
        return Refusal("is not used by the captured forward", spec.all_linear)
    if spec.all_linear and all(u.kind == "weight" for u in uses):
        return Refusal("is not a linear layer (only split or reshaped)", quiet=True)
    if len({u.layout for u in uses if u.layout}) > 1:
        return Refusal("is used both as [out, in] and as [in, out]; cannot adapt it consistently")
    return "linear"


def _layout(kind: str, p: torch.Tensor, uses: list[Use], module: nn.Module | None,
            by_parameter: bool = False) -> tuple[str, int, int]:
    """(layout, in_features, out_features) of a weight of `kind`, read as the matrix LoRA factors."""
    if kind == "conv":  # [out, in/groups, *kernel]
        return "out_in", int(math.prod(p.shape[1:])), int(p.shape[0])
    if kind == "embedding":  # [num, dim]: a lookup is x_onehot @ W, so W is [in, out]
        return "in_out", int(p.shape[0]), int(p.shape[1])
    if kind == "experts" or by_parameter:
        # PEFT's ParamWrapper reads a targeted parameter as [.., out, in] unless its module says
        # is_transposed (transformers' [E, in, out] expert storage, gpt-oss), however it is used
        transposed = bool(getattr(module, "is_transposed", False))
        d0, d1 = int(p.shape[-2]), int(p.shape[-1])
        return ("in_out", d0, d1) if transposed else ("out_in", d1, d0)
    # weight-form uses only (or none): PyTorch's [out, in], GPT-2 Conv1D's [in, out]
    layout = next((u.layout for u in uses if u.layout), "in_out" if is_gpt2_conv1d(module) else "out_in")
    out_f, in_f = (p.shape[0], p.shape[1]) if layout == "out_in" else (p.shape[1], p.shape[0])
    return layout, int(in_f), int(out_f)


def x_position(use: Use) -> tuple[torch.fx.Node, int]:
    """Where a use reads its activation: (node, argument index). Rewriting one use rewires the next
    one's input (a linear feeding a linear), so a rewrite reads x from here when its turn comes."""
    reads = use.reads or use.node
    return reads, reads.args.index(use.x)


def bias_arg(use: Use) -> torch.fx.Node | None:
    """The bias node a product adds (its output minus the bias is W0 x), or None."""
    args = use.node.args
    if use.kind in ("linear", "conv"):
        return args[2] if len(args) > 2 and isinstance(args[2], torch.fx.Node) else None
    if use.kind == "addmm":
        return args[0]
    return None


def _common_bias(uses: list[Use]) -> str | None:
    """The parameter every use adds as its bias, or None (no bias, a weight-form use, or several)."""
    targets = {b.target if (b := bias_arg(u)) is not None and b.op == "get_attr" else None for u in uses}
    return targets.pop() if len(targets) == 1 else None


def _peft_target(cap, name: str, owner: str, uses: list[Use], by_parameter: bool) -> str:
    """How PEFT's files reach weight `name` of the module at `owner` (see `Site.peft_target`): PEFT's
    wrappers act while the module's own forward runs, so a weight read elsewhere (by its parent) is
    out of PEFT's reach, by module or by parameter."""
    source = cap.source if cap is not None else None
    if by_parameter or source is None:
        return "parameter" if by_parameter else "module"
    inside = all(_in_stack(u.node, owner) for u in uses)
    if peft_module(_module_at(source, owner)) is not None:
        return "module" if inside else "none"
    return "parameter" if owner and inside else "none"


def _site(gm: nn.Module, spec: TargetSpec, key: str, name: str, kind: str, uses: list[Use], two_d_leaves: list[str],
          attention: set[str], by_parameter: bool) -> Site:
    """The site for weight `name`: its kind, layout, sizes, adapted row blocks, and where LoRA lives."""
    owner, leaf = _owner(name)
    p = gm.get_parameter(name)
    cap = getattr(gm, "capture_info", None)
    module = cap.source.get_submodule(owner) if cap is not None and cap.source is not None and owner else None
    layout, in_f, out_f = _layout(kind, p, uses, module, by_parameter)
    if kind != "linear" and key in spec.blocks and spec.blocks[key] is not True:
        raise ConfigError(f"fused-block specs split the rows of linear weights; {name} is a {kind} weight: "
                          f"target it by name instead")
    blocks, fused = parse_blocks(spec.blocks.get(key), out_f, name)
    # LoRA lives on the module for its `.weight` (PEFT's place); a module's other 2-D parameters
    # (nn.MultiheadAttention's in_proj_weight next to out_proj) get a holder of their own
    holder = owner if (leaf == "weight" or two_d_leaves == [leaf]) else f"{owner}.{leaf}_lora".lstrip(".")
    file_holder = ""
    if (reach := _reach(spec, name, attention)) != owner:
        # PEFT adapts an nn.MultiheadAttention as a whole: out_proj belongs to the attention's
        # target, and PEFT's files spell its LoRA under base_layer
        owner, file_holder = reach, f"{reach}.base_layer.out_proj"
    groups = max((u.node.args[6] for u in uses if u.node.target in CONV_OPS and len(u.node.args) > 6), default=1)
    quantized = format_name(p)
    return Site(name, owner, holder, layout, in_f, out_f, blocks, fused, file_holder=file_holder, kind=kind,
                shape=tuple(p.shape), by_parameter=by_parameter, bias=None if quantized else _common_bias(uses),
                groups=int(groups), quantized=quantized, peft_target=_peft_target(cap, name, owner, uses, by_parameter),
                own_calls_only=spec.all_linear or spec.own_calls)


def _reach(spec: TargetSpec, name: str, attention: set[str]) -> str:
    """The module whose forward PEFT's wrapper for weight `name` runs in: its own module, or the
    nn.MultiheadAttention a target names when the weight is that attention's out_proj (PEFT wraps
    the attention as a whole; naming out_proj itself wraps out_proj, which the attention never calls)."""
    owner = _owner(name)[0]
    parent, child = _owner(owner)
    if child == "out_proj" and parent in attention and not spec.all_linear and spec.which(owner) is None:
        return parent
    return owner


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
    two_d: dict[str, list[str]] = {}  # owner path -> its matrix-like (2-D and up) parameter leaves
    for name, p in gm.named_parameters(remove_duplicate=False):
        if p.dim() >= 2 and not _is_bias(_owner(name)[1]):
            two_d.setdefault(_owner(name)[0], []).append(_owner(name)[1])

    cap = getattr(gm, "capture_info", None)
    source = cap.source if cap is not None else None
    attention = attention_paths(source)
    linear = all_linear_paths(source, exclude) if source is not None and spec.all_linear else None
    calls = LayerCalls(gm.graph)
    matches: list[Match] = []
    near: list[NearMiss] = []
    named: set[str] = set()  # spec entries that name some parameter
    adapted: set[str] = set()  # spec entries that adapt some weight
    for names in names_by_param.values():
        for name in names:
            by_parameter = spec.parameter(name)
            key = by_parameter or _key(spec, name, exclude, attention, linear)
            if key is None:
                continue
            named.add(key)
            p = gm.get_parameter(name)
            if is_subclass(p) and refusal(p) is None:  # a quantized weight: its layer's calls
                uses, tables, left_alone = quantized_uses(gm, _owner(name)[0], calls), [], []
            else:
                uses, tables, left_alone = _uses(get_attrs, names, _owner(name)[0])
            if (linear is not None or spec.own_calls) and by_parameter is None:
                # PEFT's wrapper acts only where the wrapped module's own forward runs
                reach = _reach(spec, name, attention)
                inside = [u for u in uses if _in_stack(u.node, reach)]
                if len(inside) < len(uses):
                    near.append(NearMiss(key, name, "is read outside its module's own forward (a parent reads the weight, "
                                         "as nn.MultiheadAttention reads its out_proj): PEFT's wrapper has no effect "
                                         "there, and so has lora-fx's" + ("; name it in targets to adapt that read"
                                                                          if spec.all_linear else "")))
                uses = inside
            owner_module = _module_at(source, _owner(name)[0])
            kind = _kind(spec, name, p, uses, tables, by_parameter is not None, peft_module(owner_module))
            if isinstance(kind, Refusal):
                if not kind.quiet:
                    near.append(NearMiss(key, name, kind.reason))
                continue
            if tables and kind == "linear":
                near.append(NearMiss(key, name, f"is also read as a table by {tables[0].target}; that read is left unadapted"))
            nodes = [n for alias in names for n in get_attrs.get(alias, [])]
            uses = parameter_uses(nodes) if by_parameter else kind_uses(kind, uses, tables, nodes)
            site = _site(gm, spec, key, name, kind, uses, two_d.get(_owner(name)[0], []), attention, by_parameter is not None)
            matches.append(Match(site, uses, left_alone))
            adapted.add(key)
            break  # one site per parameter, under the first of its names that matched

    near += [NearMiss(key, None, "matches no module path") for key in spec.keys() if key not in named]
    check_layers(spec, [n for names in names_by_param.values() for n in names])
    near += unused_exclusions(spec, [n for names in names_by_param.values() for n in names])
    if not matches:
        raise TargetError(no_match_message(gm, spec, near))
    if not any(m.uses for m in matches):
        unused = [m.site.param for m in matches]
        raise TargetError(f"targets {spec.keys() or ['all-linear']} match only weights this capture does not use "
                          f"({unused[:3]}{' ...' if len(unused) > 3 else ''}): capture with the inputs that reach them "
                          "(example_inputs), or name other modules")
    refused = [k for k in named if k not in adapted and k in spec.names + list(spec.blocks) + spec.parameters]
    if refused:
        why = "; ".join(str(n) for n in near if n.target in refused)
        raise TargetError(f"targets {refused} match only weights that LoRA cannot adapt: {why}. Remove them from targets.")
    return matches, near


def check_layers(spec: TargetSpec, names: list[str]) -> None:
    """layers_to_transform indices no layer of the model has (`names`: its parameter paths): a
    TargetError naming the model's layers."""
    chosen = spec.selection
    if chosen.layers is None:
        return
    found = {i for n in names if (i := chosen.layer_index(_owner(n)[0])) is not None}  # module paths, as PEFT
    missing = sorted(set(chosen.layers) - found)
    if missing:
        where = f"'{chosen.patterns[0]}.<index>.'" if chosen.patterns else "the first numbered path component"
        have = f"layers {min(found)}..{max(found)}" if found else "no numbered layers"
        raise TargetError(f"layers_to_transform {missing}: this model has {have} (the index read from {where}, "
                          f"as PEFT reads it{', layers_pattern ' + str(list(chosen.patterns)) if chosen.patterns else ''}); "
                          "pass indices in that range" + ("" if found else ", or set layers_pattern to the name before "
                                                                             "the layer index (e.g. 'layers', 'h')"))


def unused_exclusions(spec: TargetSpec, names: list[str]) -> list[NearMiss]:
    """exclude_modules entries that exclude no module path (PEFT warns)."""
    exclude = spec.selection.exclude
    if not exclude:
        return []
    owners = {_owner(n)[0] for n in names}
    entries = [exclude] if isinstance(exclude, str) else list(exclude)
    return [NearMiss(f"exclude_modules {e!r}", None, "excludes no module path") for e in entries
            if not any(Selection(e if isinstance(exclude, str) else (e,)).excludes(o) for o in owners)]


def named_weights(model: nn.Module, spec: TargetSpec, exclude: str | None) -> dict[str, str]:
    """The weights of `model` that `spec` names, by path alone (no graph: what regional capture
    starts from): parameter path -> the spec entry naming it. Every name of a tied weight is its own
    entry (each module adapts its own use, as PEFT wraps each module)."""
    attention = attention_paths(model)
    linear = all_linear_paths(model, exclude) if spec.all_linear else None
    check_layers(spec, [n for n, _ in model.named_parameters(remove_duplicate=False)])
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = spec.parameter(name) or _key(spec, name, exclude, attention, linear)
        if key is not None and p.dim() >= 2 and not _is_bias(_owner(name)[1]):
            out[name] = key
    return out


def no_match_message(gm: nn.Module, spec: TargetSpec, near: list[NearMiss]) -> str:
    linear_like = []  # weights used as linear, conv or embedding weights
    for name, p in gm.named_parameters():
        if p.dim() >= 2:
            nodes = gm.graph.find_nodes(op="get_attr", target=name)
            uses, tables = classify(nodes)
            if any(u.kind != "weight" for u in uses) or (tables and not spec.all_linear):
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
        f"{len(linear_like)} adaptable weights (linear, conv, embedding), in modules named {names[:12]}"
        f"{' ...' if len(names) > 12 else ''}. {'; '.join(hints)}. Pass names from that list, "
        f"e.g. targets={names[:2]}."
    )
