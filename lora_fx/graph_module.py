"""The module capture, inject and merge return: an fx GraphModule that behaves like the model.

Its public state is typed: `capture_info` (how it was captured, so calls with other inputs, dtype and
device moves can capture the model again) and `lora_state` (the adapters, see `lora_fx.state`).
It survives what users do to modules: `copy.deepcopy`, `pickle` / `torch.save`, `.to(dtype)`,
`.to(device)`, `train()` / `eval()`.
"""
from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.fx.node import map_aggregate, map_arg
from torch.utils import _pytree as pytree

from . import generation
from .errors import InputsError, TargetError
from .flat import flat_runner
from .paths import copy_graph, copy_non_persistent, is_shard, own_stateless_modules, resolve, set_module, structure_copy
from .ranks import check_ranks
from .recompute import recompute_graph
from .report import InjectReport
from .state import LoraState

# how to build a graph of the same model for other inputs (or after a dtype / device move), sharing
# the primary graph's weights: capture.recapture, or its LoRA-aware version in lora_fx.attach
Recapture = Callable[..., "LoraGraphModule"]  # (primary, inputs, kind=None) -> new graph
RUNNER = "training-runner"  # where a graph keeps its training runner, beside its variants (dropped with them)


@dataclass
class CaptureInfo:
    """How a graph was captured, kept so calls can be checked and other inputs re-captured."""

    source: nn.Module | None  # the model captured; lets calls with other inputs re-capture it
    signature: inspect.Signature | None  # the model's forward signature
    input_names: tuple[str, ...]  # keyword inputs the graph was captured with
    positional: bool = False  # captured positionally (a forward that takes *args)
    example_inputs: Any = None  # the (cloned) inputs captured with: a dict, or a tuple if positional
    notes: list[str] = field(default_factory=list)
    recapture: Recapture | None = None  # None: this graph cannot be captured again (no source)
    kind: str = "forward"  # "forward": the model's forward; "decoder": one decoding step with a KV cache
    fixed_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # image inputs' sizes (all but batch)
    # checks a call's named inputs' values before it runs (a mixed batch's adapter_index); real tensors only
    check_inputs: Callable[[dict[str, Any]], None] | None = None

    def other_size(self, inputs) -> tuple | None:
        """The sizes of the fixed-size inputs in a call when they are not the captured ones, else None."""
        if not self.fixed_shapes:
            return None
        items = dict(enumerate(inputs)) if isinstance(inputs, (tuple, list)) else inputs
        sizes = tuple((k, tuple(v.shape[1:])) for k, v in ((k, items.get(int(k) if self.positional else k))
                                                             for k in self.fixed_shapes) if isinstance(v, torch.Tensor))
        return sizes if any(s != self.fixed_shapes[k] for k, s in sizes) else None

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Name every call input as the forward does; drop inputs left at a default of None."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InputsError(f"call does not fit {self.signature}: {e}") from None
        params = self.signature.parameters
        named = {}
        for name, value in bound.arguments.items():
            kind = params[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                unknown = sorted(value)
                raise InputsError(
                    f"inputs {unknown} are not declared by the model's forward; it declares "
                    f"{[n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]}"
                )
            if value is None and params[name].default is None:
                continue
            named[name] = value
        return named

    def can_recapture(self) -> bool:
        return self.source is not None and self.recapture is not None and self.example_inputs is not None


class LoraGraphModule(torch.fx.GraphModule):
    """A captured model as an fx graph.

    It keeps the model's call signature and output type (a `ModelOutput` stays one), switches
    dropout with `train()` / `eval()` (see `lora_fx.modes`), and when called with a different set of
    inputs than it was captured with, captures the source model again for those inputs, sharing
    every parameter (LoRA's included), so training and evaluation see one set of weights.
    """

    capture_info: CaptureInfo | None
    lora_state: LoraState | None
    # Names of methods and properties here win over submodules of the same name (T5 has a `decoder`):
    # keep them specific to lora-fx.

    def __init__(self, root: nn.Module, graph: torch.fx.Graph, class_name: str = "LoraGraphModule"):
        super().__init__(root, graph, class_name)
        copy_non_persistent(root, self)
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(root, attr):
                setattr(self, attr, getattr(root, attr))
        self.meta = dict(getattr(root, "meta", {}))
        self.capture_info = getattr(root, "capture_info", None)
        self.lora_state = getattr(root, "lora_state", None)
        object.__setattr__(self, "_variants", {})

    # -- signature: what tools that inspect forward (transformers.Trainer) see -------------------
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "capture_info":
            self._apply_signature()

    def recompile(self):
        out = super().recompile()
        self._apply_signature()
        variants = self.__dict__.get("_variants")
        if variants:  # the training runner is this graph rewritten: rebuilt on use
            variants.pop(RUNNER, None)
        return out

    def _apply_signature(self) -> None:
        """Give forward the model's own signature, so e.g. Trainer keeps the `labels` column; calls with
        inputs the graph was not captured with are routed to a re-capture by __call__."""
        cap = self.__dict__.get("capture_info")
        if cap is None or cap.signature is None or cap.positional:
            return
        me = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        # declared names only: a **kwargs catch-all is not offered (undeclared inputs are refused)
        named = [p for p in cap.signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        type(self).forward.__signature__ = cap.signature.replace(parameters=[me, *named])

    # -- calls ---------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if not self.__dict__.get("_loaded"):
            self._check_loaded(args, kwargs)
        if (not self.__dict__.get("_ranks_checked") and torch.distributed.is_available()
                and torch.distributed.is_initialized() and any(is_shard(p) for p in self.parameters())):
            check_ranks(self)  # sharded: every rank runs this call together, so it can compare graphs once
            object.__setattr__(self, "_ranks_checked", True)
        try:
            return self._dispatch(*args, **kwargs)
        except RuntimeError as e:
            sharded = [n for n, p in self.named_parameters() if is_shard(p)]
            if sharded and "DTensor" in str(e):
                raise TargetError(
                    f"{sharded[0]} is sharded (fully_shard), but this graph is flat: no submodule's forward "
                    "runs, so its shards are never gathered. Shard the flat graph at the root only "
                    "(fully_shard(gm)), or shard layer by layer on lora_fx.unflatten(gm) and call that tree (the flat "
                    "graph shares its layers, so it sees their shards too)") from e
            raise

    def _check_loaded(self, args, kwargs) -> None:
        """A graph captured from a model built on the meta device has no weights until
        `lora_fx.load_base` reads them; say so rather than fail inside an operator."""
        meta = next((n for n, t in (*self.named_parameters(), *self.named_buffers()) if t.is_meta), None)
        if meta is None:
            object.__setattr__(self, "_loaded", True)
            return
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if inputs and all(t.is_meta for t in inputs):  # moved to meta on purpose, called on meta inputs
            return
        raise TargetError(f"{meta} is on the meta device: this graph was captured from a model built without its "
                          "weights. Load them first: lora_fx.load_base(gm, checkpoint_folder)")

    def _dispatch(self, *args, **kwargs):
        cap = self.capture_info
        if cap is None or cap.signature is None or torch.compiler.is_compiling():
            return self._run(*args, **kwargs)
        if cap.check_inputs is not None and not cap.positional:
            cap.check_inputs(cap.bind(args, kwargs))
        if cap.positional:
            sizes = cap.other_size(args) if not kwargs else None
            if sizes is None or not cap.can_recapture():
                return self._run(*args, **kwargs)
            return self.variant(tuple(args), sizes)(*args)
        if not args and len(kwargs) == len(cap.input_names) and all(k in kwargs for k in cap.input_names):
            sizes = cap.other_size(kwargs)
            return self._run(**kwargs) if sizes is None else self.variant(kwargs, sizes)(**kwargs)
        inputs = cap.bind(args, kwargs)
        sizes = cap.other_size(inputs)
        if set(inputs) == set(cap.input_names) and sizes is None:
            return self._run(**inputs)
        return self.variant(inputs, sizes)(**inputs)

    def _run(self, *args, **kwargs):
        runner = self.training_runner() if torch.is_grad_enabled() else None
        return super().__call__(*args, **kwargs) if runner is None else runner(*args, **kwargs)

    @torch.compiler.disable  # built once, outside any trace; the runner it returns is traced
    def training_runner(self) -> torch.fx.GraphModule | None:
        """What runs this graph when gradients are on: the same graph over the same tensors, with each
        product whose frozen weight the graph computes (a quantized weight's dequantize chain)
        recomputing that weight in backward instead of keeping it (`lora_fx.recompute`); None when
        there is none (a float base: the weights are parameters, kept by reference)."""
        if RUNNER not in self._variants:
            graph, functions, done = recompute_graph(self, self.graph)
            runner = None
            if done:
                root = {n.target: resolve(self, n.target) for n in graph.nodes
                        if n.op in ("get_attr", "call_module") and n.target not in functions}
                runner = torch.fx.GraphModule({**root, **functions}, graph)
                for attr in ("_in_spec", "_out_spec"):
                    if hasattr(self, attr):
                        setattr(runner, attr, getattr(self, attr))
            self._variants[RUNNER] = runner
        return self._variants[RUNNER]

    def variant(self, inputs, sizes: tuple | None = None) -> LoraGraphModule:
        """The graph for another set of inputs (or image sizes, `sizes`), captured on first use and cached."""
        key = frozenset(inputs) if sizes is None else (frozenset(inputs) if isinstance(inputs, dict) else "positional", sizes)
        found = self._variants.get(key)
        if found is None:
            cap = self.capture_info
            if not cap.can_recapture():
                raise InputsError(
                    f"this graph was captured with inputs {list(cap.input_names)} and was called with "
                    f"{sorted(inputs)}; its source model is not available to capture again. Capture "
                    f"with those inputs: pass example_inputs={{{', '.join(repr(k) for k in sorted(inputs))}: ...}}"
                )
            found = cap.recapture(self, inputs)
            self._variants[key] = found
        if found.training != self.training:
            found.train(self.training)
        return found

    @property
    def variants(self) -> dict:
        """The graphs captured so far from this one's model (a copy of the cache): by the set of input
        names for other inputs; "decoder" for `decode_step()` and "decoder-runner" for the flat copy
        `generate` runs (not the training runner: it is this graph, rewritten)."""
        return {k: v for k, v in self._variants.items() if k != RUNNER}

    def forget_variants(self) -> None:
        """Drop the graphs captured for other inputs; they are captured again on their next call
        (after the LoRA subgraph changed, or weights were replaced)."""
        self._variants.clear()

    def release_source(self) -> None:
        """Stop keeping the user's model alive: the capture keeps a storage-free copy of its modules
        (`lora_fx.paths.structure_copy`), enough to capture it again with this graph's weights, and
        the graphs captured for other inputs are dropped (captured again on use). Afterwards this
        graph (and modules sharing its tensors) holds the only reference to the weights once the user
        deletes the model; `merge_and_unload` shares this graph's tensors instead of the model's."""
        cap = self.capture_info
        if cap is not None and cap.source is not None:
            try:
                self.capture_info = replace(cap, source=structure_copy(cap.source))
            except Exception as e:  # a model copy.deepcopy cannot copy: keep it (and its weights) alive
                cap.notes.append(f"the model could not be copied without its weights ({type(e).__name__}: {e}); "
                                 "this graph keeps it alive")
        self.forget_variants()

    # -- generation ------------------------------------------------------------------------------
    def decode_step(self) -> LoraGraphModule:
        """This graph's model as one decoding step with a KV cache (see `lora_fx.capture_decoder`),
        captured on first use and sharing every weight, LoRA's included: adapter switches apply."""
        cap = self.capture_info
        if cap is not None and cap.kind == "decoder":
            return self
        found = self._variants.get("decoder")
        if found is None:
            if cap is None or cap.source is None or cap.recapture is None:
                raise InputsError("this graph's source model is not available to capture its decoding step; "
                                  "capture the model itself (lora_fx.capture / inject_lora)")
            found = cap.recapture(self, None, kind="decoder")
            self._variants["decoder"] = found
        return found

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, *, attention_mask=None,
                 eos_token_id=generation.MODEL_DEFAULT, pad_token_id=generation.MODEL_DEFAULT,
                 do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> torch.Tensor:
        """Token ids, prompt then new tokens, as transformers' `generate` returns them (greedy by
        default; sampling with `do_sample`, `temperature`, `top_k`, `top_p`, `seed`; left padding via
        `attention_mask`; `eos_token_id` / `pad_token_id` default to the model's generation config, an
        explicit None means none: no early stop).
        Runs the captured decoding step with a KV cache, in eval mode, without gradients."""
        sampling = generation.Sampling(do_sample, temperature, top_k, top_p, seed)
        decoder = self.decode_step()
        runner = self._variants.get("decoder-runner")
        if runner is None:  # what runs per token: the decoding step, flat (see lora_fx.flat)
            runner = self._variants["decoder-runner"] = flat_runner(decoder)
        source = self.capture_info.source
        eos_token_id, pad_token_id = generation.special_tokens(source, eos_token_id, pad_token_id)
        takes_positions = "position_ids" in decoder.capture_info.input_names
        empty = tuple(tuple(t.new_empty(input_ids.shape[0], t.shape[1], 0, t.shape[3]) for t in pair)
                      for pair in decoder.capture_info.example_inputs["past_key_values"])

        def step(ids, mask, pos, past):
            kwargs = {"position_ids": pos} if takes_positions else {}
            return runner(input_ids=ids, attention_mask=mask, past_key_values=past, **kwargs)

        was_training = decoder.training
        decoder.eval()
        try:
            with torch.no_grad():
                return generation.generate_with(
                    step, input_ids, empty, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                    eos_token_id=eos_token_id, pad_token_id=pad_token_id, sampling=sampling,
                    max_positions=generation.max_positions(getattr(source, "config", None)))
        finally:
            decoder.train(was_training)

    @property
    def lora_report(self) -> InjectReport | None:
        """What inject_lora did (see `lora_fx.report.InjectReport`); None on a plain capture."""
        return self.lora_state.report if self.lora_state is not None else None

    # -- the module tree unflatten made ------------------------------------------------------------
    @property
    def tree(self) -> nn.Module | None:
        """The module tree `lora_fx.unflatten(self)` made, while it is alive: it shares this graph's
        tensors, and what replaces them (`lora_fx.load_base`) updates its graphs too."""
        ref = self.__dict__.get("_tree")
        return None if ref is None else ref()

    def remember_tree(self, tree: nn.Module) -> None:
        object.__setattr__(self, "_tree", weakref.ref(tree))  # weak: the user owns the tree

    # -- copies, pickles, dtype and device moves --------------------------------------------------
    def _deepcopy_init(self):
        return LoraGraphModule.__init__

    def __deepcopy__(self, memo):
        # the user's model is the capture's recipe, not part of the copy: share it; the graphs for
        # other inputs are captured again by the copy when needed
        if self.capture_info is not None and self.capture_info.source is not None:
            memo.setdefault(id(self.capture_info.source), self.capture_info.source)
        memo.setdefault(id(self._variants), {})
        res = super().__deepcopy__(memo)
        res.__dict__.pop("_tree", None)  # the tree shares this graph's tensors, not the copy's
        res.train(self.training)
        return res

    def __copy__(self):
        res = LoraGraphModule(self, self.graph)
        res.train(self.training)
        return res

    def __reduce__(self):
        # torch pickles a GraphModule as its code and traces it again on load, which loses the node
        # metadata LoRA lives by (which nodes are LoRA's, module paths) and fails on export's tracer;
        # pickle the graph's nodes instead
        body = {k: v for k, v in self.__dict__.items() if k not in ("_graph", "_variants", "_code", "_lineno_map", "_tree")}
        return (_unpickle, (body, encode_graph(self.graph)))

    def _apply(self, fn, recurse=True):
        """`.to()`, `.double()`, `.cuda()` ...: the weights move as in any module; the graph, whose
        dtypes and devices torch.export baked in, is captured again at the new ones."""
        probe = next((t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()), None)
        before = None if probe is None else (probe.dtype, probe.device)
        after = None if probe is None else _probe_move(fn, probe)
        cap = self.capture_info
        moved = before != after
        if moved and before[0] != after[0] and (cap is None or not cap.can_recapture()):
            raise InputsError(
                f"cannot convert this graph from {before[0]} to {after[0]}: torch.export fixed the dtypes "
                "in it and its source model is not available to capture it again. Convert the model "
                "first, then capture / inject it."
            )
        super()._apply(fn, recurse)
        if self.lora_state is not None:
            self.lora_state.map_tensors(fn)
        if cap is not None and cap.example_inputs is not None:
            self.capture_info = replace(cap, example_inputs=pytree.tree_map_only(torch.Tensor, fn, cap.example_inputs))
        self._variants.clear()
        if moved:
            if self.capture_info is not None and self.capture_info.can_recapture():
                self._adopt(self.capture_info.recapture(self, self.capture_info.example_inputs))
            else:
                move_devices(self.graph, before[1], after[1])
                self.recompile()
        return self

    def capture_again(self) -> bool:
        """Capture the source model again with this graph's weights (LoRA included) and take that
        graph, as a dtype or device move does: after the weights changed in kind (a model captured on
        the meta device, then loaded), the graph is the one a capture of the loaded model gives.
        False, and nothing changes, where it cannot (no source, or weights sharded across ranks)."""
        cap = self.capture_info
        if cap is None or not cap.can_recapture() or any(is_shard(p) for p in self.parameters()):
            return False
        self._variants.clear()
        self._adopt(cap.recapture(self, cap.example_inputs))
        return True

    def _adopt(self, other: LoraGraphModule) -> None:
        """Take `other`'s graph (built over this module's weights) and the stateless modules it calls."""
        for node in other.graph.find_nodes(op="call_module"):
            set_module(self, node.target, other.get_submodule(node.target))
        for node in other.graph.find_nodes(op="get_attr"):
            if resolve(self, node.target) is None:  # recapture shares every weight it reads: a bug if not
                raise RuntimeError(f"lora-fx: the re-captured graph reads {node.target}, which this module lacks")
        self.graph = other.graph
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(other, attr):
                setattr(self, attr, getattr(other, attr))
        self.train(self.training)


# ------------------------------------------------------------------------------------------ regions
@dataclass
class Regions:
    """A model captured by regions (`lora_fx.regions`): its own code runs, and each module holding
    targeted weights runs its captured graph, installed at its path. Kept on the model copy
    inject_lora returns, as `model.lora_regions`."""

    graphs: dict[str, LoraGraphModule]  # module path -> that region's graph
    reason: str  # why the whole model was not captured (the first failing line), or "asked for"
    report: InjectReport | None = None
    source: nn.Module | None = None  # the user's model (shared by copies, like a graph's capture source)
    trainable: list[str] = field(default_factory=list)  # modules trained in full (copied), by path
    folded: bool = False

    def __deepcopy__(self, memo):
        if self.source is not None:
            memo.setdefault(id(self.source), self.source)  # the model is the recipe, not part of the copy
        new = Regions.__new__(Regions)
        memo[id(self)] = new
        for f in ("graphs", "reason", "report", "source", "trainable", "folded"):
            setattr(new, f, copy.deepcopy(getattr(self, f), memo))
        return new


def regions_of(module) -> Regions | None:
    """The regions of a regionally captured model, or None."""
    found = module.__dict__.get("lora_regions") if isinstance(module, nn.Module) else None
    return found if isinstance(found, Regions) else None


# ------------------------------------------------------------------------------------------- guards
def unfolded_lora(module) -> LoraState | None:
    """The LoRA state of `module` when it holds LoRA that is not folded; None for anything else
    (a plain capture, a folded graph, a module lora-fx did not return)."""
    state = module.lora_state if isinstance(module, LoraGraphModule) else None
    return state if state is not None and not state.folded else None


def require_lora(module, doing: str) -> LoraState:
    """`unfolded_lora(module)`, or a TargetError saying that `doing` needs a graph with LoRA."""
    state = unfolded_lora(module)
    if state is None:
        if regions_of(module) is not None:
            raise TargetError(f"{doing} works on one captured graph; this model was captured by regions "
                              f"({regions_of(module).reason[:120]}): fold it with merge_and_unload first, or use a model "
                              "torch.export can capture whole")
        what = ("a folded graph" if isinstance(module, LoraGraphModule) and module.lora_state is not None
                else "a graph without LoRA" if isinstance(module, LoraGraphModule) else f"a {type(module).__name__}")
        raise TargetError(
            f"{doing} needs a graph with unfolded LoRA (what inject_lora or load_adapter returns); got {what}"
        )
    return state


def derived(gm: LoraGraphModule, graph: torch.fx.Graph) -> LoraGraphModule:
    """A new graph module running `graph` over `gm`'s weights, with its own stateless modules (so it
    switches train / eval on its own), in `gm`'s mode."""
    new = LoraGraphModule(gm, graph)
    own_stateless_modules(new)
    new.train(gm.training)
    return new


def copy_of(gm: LoraGraphModule) -> LoraGraphModule:
    """`derived` over a copy of `gm`'s own graph."""
    return derived(gm, copy_graph(gm.graph))


# ------------------------------------------------------------------------------- device moves
def _probe_move(fn, probe: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    """Where `fn` sends a tensor like `probe`, found on an empty one (no copy of the weights)."""
    moved = fn(torch.empty(0, dtype=probe.dtype, device=probe.device))
    return moved.dtype, moved.device


def move_devices(graph: torch.fx.Graph, old: torch.device, new: torch.device) -> None:
    """Re-point devices baked into node arguments from `old` to `new` (as torch.export's
    move_to_device_pass does), for graphs that cannot be captured again."""
    def swap(v):
        return new if isinstance(v, torch.device) and v == old else v

    for node in graph.nodes:
        node.args = map_aggregate(node.args, swap)
        node.kwargs = map_aggregate(node.kwargs, swap)


# ------------------------------------------------------------------------------------- pickling
@dataclass(frozen=True)
class _NodeRef:  # not a tuple: fx's map_aggregate would walk into it
    name: str


class _OpRef(NamedTuple):
    """An operator overload by name (OpOverload objects do not pickle)."""

    namespace: str
    op: str
    overload: str

    def resolve(self):
        return getattr(getattr(getattr(torch.ops, self.namespace), self.op), self.overload)


_KEPT_META = ("nn_module_stack", "lora_fx", "stack_trace")


def _encode_target(target):
    if isinstance(target, torch._ops.OpOverload):
        return _OpRef(target.namespace, target._schema.name.split("::", 1)[1], target._overloadname)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _OpRef("higher_order", target.name(), "")
    return target


def _decode_target(target):
    if isinstance(target, _OpRef):
        op = getattr(getattr(torch.ops, target.namespace), target.op)
        return getattr(op, target.overload) if target.overload else op
    return target


def _encode_meta(meta: dict) -> dict:
    out = {k: meta[k] for k in _KEPT_META if k in meta}
    if "nn_module_stack" in out:  # module classes as names: a class defined in a function does not pickle
        out["nn_module_stack"] = {
            k: (path, typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}")
            for k, (path, typ) in out["nn_module_stack"].items()
        }
    return out


def encode_graph(graph: torch.fx.Graph) -> tuple[list, Any]:
    """A picklable description of `graph`: its nodes in order (with the metadata lora-fx reads) and
    its code generator (the pytree input / output specs)."""
    nodes = []
    for n in graph.nodes:
        args, kwargs = map_arg((n.args, n.kwargs), lambda a: _NodeRef(a.name))
        nodes.append((n.name, n.op, _encode_target(n.target), args, kwargs, _encode_meta(n.meta)))
    return nodes, graph._codegen


def decode_graph(data: tuple[list, Any]) -> torch.fx.Graph:
    nodes, codegen = data
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for name, op, target, args, kwargs, meta in nodes:
        args, kwargs = map_aggregate((args, kwargs), lambda a: env[a.name] if isinstance(a, _NodeRef) else a)
        node = graph.create_node(op, _decode_target(target), tuple(args), dict(kwargs), name=name)
        node.meta = dict(meta)
        env[name] = node
    graph._codegen = codegen
    return graph


def _unpickle(body: dict, graph_data) -> LoraGraphModule:
    root = nn.Module()
    root.__dict__.update(body)
    gm = LoraGraphModule(root, decode_graph(graph_data))
    gm.train(body.get("training", False))
    return gm

