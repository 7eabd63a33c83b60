"""Regional capture: a model torch.export cannot capture whole, adapted region by region.

One untraceable line (a branch on tensor values, a `.to()` inside forward) stops torch.export for
the whole model, while the layers LoRA adapts trace fine. Regional capture runs the model once,
recording a call of every module that holds a targeted weight (the nearest module the model calls,
below the model itself: the nn.Linear, the attention that reads its out_proj), captures each of them
on that call, and puts LoRA into each graph with the same passes as a whole graph. A copy of the model
(sharing its tensors, frozen) runs the model's own code with each region's graph installed at its
path; the user's model is left as it was.

Everything per graph works per region: adapters switch in every region, folding gives each region
its untouched graph back, PEFT's files hold every region's LoRA under its path, and the model's own
`generate` runs (the regions are below any KV cache).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .attach import inject_matched, new_adapter, pattern_value
from .capture import bind_example_inputs, capture_call, capture_state
from .errors import CaptureError, TargetError
from .graph_module import LoraGraphModule, Regions, regions_of
from .match import TargetSpec, match_weights, named_weights
from .paths import frozen_copy, set_module
from .peft_rules import is_gpt2_conv1d, peft_module
from .report import InjectReport, NearMiss
from .state import LoraConfig, Site


def join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def global_site(site: Site, region: str) -> Site:
    """A region's site with the model's paths (the region's graph sees paths relative to itself)."""
    # a weight of the region's own module: its forward read it, so PEFT reaches it by parameter if not by module
    target = "parameter" if site.peft_target == "none" and not site.owner else site.peft_target
    return replace(site, param=join(region, site.param), owner=join(region, site.owner), holder=join(region, site.holder),
                   file_holder=join(region, site.file_holder) if site.file_holder else "",
                   bias=join(region, site.bias) if site.bias else None, peft_target=target)


def record_calls(model: nn.Module, example_inputs, paths) -> dict[str, tuple[tuple, dict]]:
    """One call of each module at `paths` (its args and kwargs, tensors cloned), from one eval-mode
    forward of `model` on `example_inputs` (as capture runs it: no KV cache)."""
    _, inputs, positional = bind_example_inputs(model, example_inputs)
    calls: dict[str, tuple[tuple, dict]] = {}
    clone = lambda t: t.detach().clone()  # noqa: E731

    def recorder(path):
        def hook(module, args, kwargs):
            if path not in calls:
                calls[path] = (pytree.tree_map_only(torch.Tensor, clone, tuple(args)),
                               pytree.tree_map_only(torch.Tensor, clone, dict(kwargs)))
        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(recorder(p), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad(), capture_state(model, training=False):
            model(*inputs) if positional else model(**inputs)
    except Exception as e:  # the eager forward itself fails: nothing to capture by regions either
        raise CaptureError(f"the model's own forward fails on the example inputs ({type(e).__name__}: {e}); "
                           "regional capture runs it once to record each region's inputs") from e
    finally:
        for h in handles:
            h.remove()
    return calls


def region_paths(model: nn.Module, weights: dict[str, str], calls: dict[str, tuple]) -> dict[str, list[str]]:
    """The region of each named weight: its module, or the nearest ancestor the model calls (an
    nn.MultiheadAttention for its out_proj), never the model itself; regions inside other regions
    are folded into the outer one. Region path -> the weights in it."""
    regions: dict[str, list[str]] = {}
    for name in weights:
        owner = name.rpartition(".")[0]
        path = owner
        while path and path not in calls:
            path = path.rpartition(".")[0]
        if not path:
            raise TargetError(f"regional capture cannot isolate {name}: its module {owner or '(the model)'} is never "
                              "called as a unit by the model's forward (a parent reads the weight itself), so no "
                              "region holds it. Leave it out of targets, or make the whole model traceable")
        regions.setdefault(path, []).append(name)
    outer = sorted(regions, key=len)
    for path in outer:
        parent = next((p for p in outer if p != path and path.startswith(p + ".")), None)
        if parent is not None and path in regions:
            regions[parent] += regions.pop(path)
    return regions


def local_spec(spec: TargetSpec, region: str, names: list[str]) -> TargetSpec:
    """What to match inside a region's graph: the named weights, by their paths in the region (module
    names, or parameter paths for parameter targets; a fused-block spec keeps its blocks)."""
    out = TargetSpec(own_calls=spec.own_calls)
    for name in names:
        local = name[len(region) + 1:] if region else name
        owner, _, leaf = local.rpartition(".")
        if spec.parameter(name) is not None:
            out.parameters.append(local)
            continue
        key = spec.which(name.rpartition(".")[0])
        if key is not None and key in spec.blocks:
            out.blocks[owner] = spec.blocks[key]
        elif leaf == "weight" or owner:
            out.names.append(owner if leaf == "weight" else local)
        else:  # a parameter of the region's own module other than `.weight` (in_proj_weight)
            out.names.append(local)
    return out


def inject_regions(model: nn.Module, spec: TargetSpec, config: LoraConfig, adapter: str, trainable: list[str],
                   example_inputs, reason: str, exclude: str | None, weights=None) -> nn.Module:
    """`model` adapted by regions (see the module's docstring): a copy of it that runs its own code,
    each region's graph with LoRA installed at its path. `reason`: why not the whole model.
    `weights`: the adapter's weights by the model's weight names ({name: [(A, B) per block]}), or a
    function of the matched sites (model paths) giving (weights, DoRA magnitudes, lora_B biases), as
    a file provides them; None initialises them."""
    named = named_weights(model, spec, exclude)
    if not named:
        raise TargetError(f"targets {spec.keys() or ['all-linear']} name no weight of this model (by module path; "
                          f"regional capture: {reason[:200]})")
    tree = frozen_copy(model)
    calls = record_calls(tree, example_inputs, _ancestors(named))
    graphs: dict[str, LoraGraphModule] = {}
    rows, near, counters, notes = [], [], {}, [f"captured by regions: {reason}"]
    stand_ins = _stand_in_calls(tree, named, calls, spec.all_linear)
    if stand_ins:
        notes.append(f"{len(stand_ins)} linear modules the forward does not call on these inputs (e.g. {stand_ins[0]}) "
                     "were captured on a stand-in input, as PEFT wraps them: their LoRA is in the files and trains "
                     "where they run")
    regions, traced = _capture_regions(tree, named, calls, near)
    captured = [(path, traced[path], *match_weights(traced[path], local_spec(spec, path, names)))
                for path, names in sorted(regions.items())]
    magnitudes = biases = None
    if callable(weights):
        weights, magnitudes, biases = weights([global_site(m.site, p) for p, _, ms, _ in captured for m in ms])
    for path, graph, matches, misses in captured:
        sites = [m.site for m in matches]
        keys = {s.param: join(path, s.param) if s.by_parameter else join(path, s.owner) for s in sites}
        ranks = {s.param: pattern_value(config.rank_pattern, keys[s.param], config.rank) for s in sites}
        alphas = {s.param: pattern_value(config.alpha_pattern, keys[s.param], config.alpha) for s in sites}
        new = new_adapter(graph, adapter, config, sites, weights=_under_path(weights, path), ranks=ranks, alphas=alphas,
                          magnitudes=_under_path(magnitudes, path), biases=_under_path(biases, path))
        graph = inject_matched(graph, matches, misses, new, [], None)
        graph.eval()
        graphs[path] = graph
        set_module(tree, path, graph)
        report = graph.lora_report
        rows += [replace(r, param=join(path, r.param), owner=join(path, r.owner)) for r in report.sites]
        near += [replace(n, path=join(path, n.path) if n.path else None) for n in report.near_misses]
        for k, v in report.counters.items():
            counters[k] = counters.get(k, 0) + v
    trained = _make_trainable(tree, trainable, regions)
    notes.append(f"{len(graphs)} regions: {', '.join(list(graphs)[:6])}{' ...' if len(graphs) > 6 else ''}")
    unique = {id(p): p for p in tree.parameters()}
    lora = sum(p.numel() for g in graphs.values() for n, p in g.named_parameters() if ".lora_" in f".{n}")
    report = InjectReport(adapter=adapter, rank=config.rank, alpha=config.alpha, dropout=config.dropout, init=config.init,
                          sites=rows, counters=counters,
                          trainable_params=sum(p.numel() for p in unique.values() if p.requires_grad),
                          total_params=sum(p.numel() for p in unique.values()), lora_params=lora,
                          trainable_modules=trained, near_misses=near, notes=notes)
    tree.lora_regions = Regions(graphs=graphs, reason=reason, report=report, source=model, trainable=trained)
    tree.lora_report = report  # as on a graph: what inject_lora did
    tree.train(model.training)
    return tree


def _stand_in_calls(tree: nn.Module, named: dict[str, str], calls: dict, all_linear: bool) -> list[str]:
    """A stand-in call (a zero batch of its input size) for each named linear module the forward did
    not call, so it is a region of its own as PEFT wraps it; an nn.MultiheadAttention's out_proj,
    named through its attention, is left to the attention (which reads it). Returns their paths."""
    attention = {p for p, m in tree.named_modules() if isinstance(m, nn.MultiheadAttention)}
    added = []
    for name in named:
        owner = name.rpartition(".")[0]
        module = tree.get_submodule(owner) if owner else None
        if owner in calls or peft_module(module) != "linear" or (owner.rpartition(".")[0] in attention and not all_linear):
            continue
        w = module.weight
        features = w.shape[0] if is_gpt2_conv1d(module) else w.shape[1]
        calls[owner] = ((torch.zeros(2, 3, features, dtype=w.dtype, device=w.device),), {})
        added.append(owner)
    return added


def _capture_regions(tree: nn.Module, named: dict[str, str], calls: dict, near: list) -> tuple[dict, dict]:
    """Each region captured on its recorded call: (region path -> weights, region path -> graph). A
    weight whose own module the forward does not call is looked for in the module around it (an
    attention reading its out_proj); where that module does not trace, the weight is left out with a
    near miss (Longformer's global-attention projections, unused on these inputs) and its neighbours
    are captured on their own."""
    named, traced = dict(named), {}
    while True:
        regions = region_paths(tree, named, calls)
        failed = None
        for path in sorted(regions):
            if path in traced:
                continue
            module = tree.get_submodule(path)
            try:
                traced[path] = capture_call(module, *calls[path])
            except CaptureError as e:
                failed = (path, module, e)
                break
        if failed is None:
            return regions, traced
        path, module, error = failed
        uncalled = [n for n in regions[path] if n.rpartition(".")[0] not in calls]
        if not uncalled:
            raise CaptureError(f"regional capture: {path} ({type(module).__name__}) does not trace either: {error}") from error
        for name in uncalled:
            near.append(NearMiss(named.pop(name), name, f"its module is not called by the forward on these inputs, and "
                                 f"{path}, the module around it, does not trace: not adapted"))
        if not named:
            raise TargetError(f"regional capture: every named weight's region fails to trace ({path}: {error})")


def _under_path(by_name: dict | None, path: str) -> dict | None:
    """The entries of `by_name` (model weight names) inside region `path`, by their names in it."""
    return None if by_name is None else {k[len(path) + 1:]: v for k, v in by_name.items() if k.startswith(path + ".")}


def _ancestors(named: dict[str, str]) -> list[str]:
    """Every module path on the way to each named weight's module (the model itself excluded)."""
    paths = set()
    for name in named:
        parts = name.split(".")[:-1]
        paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(paths)


def _make_trainable(tree: nn.Module, names: list[str], regions: dict[str, list[str]]) -> list[str]:
    """Modules trained in full (PEFT's modules_to_save): copies with their own trainable weights."""
    paths = []
    for name in names:
        found = [p for p, _ in tree.named_modules() if p and (p == name or p.endswith("." + name))]
        if not found:
            raise TargetError(f"trainable module {name!r} matches no module of the model")
        clash = [r for r in regions for p in found if r == p or r.startswith(p + ".") or p.startswith(r + ".")]
        if clash:
            raise TargetError(f"{clash[:2]} are both LoRA regions and fully trainable; name each module in one of the two")
        paths += [p for p in found if p not in paths]
    for path in paths:
        module = tree.get_submodule(path)
        memo = {id(p): nn.Parameter(p.detach().clone(), requires_grad=True) for p in module.parameters()}
        memo.update({id(b): b.clone() for b in module.buffers()})
        set_module(tree, path, copy.deepcopy(module, memo))
    return paths


def each_region(model: nn.Module):
    """(path, graph) of every region of a regionally captured model, in path order."""
    return sorted(regions_of(model).graphs.items())


def with_regions(model: nn.Module, graphs: dict[str, nn.Module], **changes) -> nn.Module:
    """A copy of a regionally captured model (tensors shared) with each region replaced by `graphs`'."""
    regions = regions_of(model)
    memo: dict[int, object] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    memo.update({id(regions.graphs[p]): g for p, g in graphs.items()})
    memo[id(regions.source)] = regions.source
    new = copy.deepcopy(model, memo)
    new.lora_regions = replace(regions, graphs=dict(graphs), **changes)
    return new


def region_specs(model: nn.Module, spec: TargetSpec, exclude: str | None) -> dict[str, TargetSpec]:
    """What `spec` names in each region of a regionally captured model (an empty spec where it names
    nothing); a named weight outside every region is an error (regions are fixed at inject)."""
    regions = regions_of(model)
    named = named_weights(regions.source, spec, exclude)
    by_region: dict[str, list[str]] = {p: [] for p in regions.graphs}
    for name in named:
        owner = name.rpartition(".")[0]
        path = next((p for p in regions.graphs if owner == p or owner.startswith(p + ".")), None)
        if path is None:
            raise TargetError(f"{name} is in none of this model's regions ({', '.join(list(regions.graphs)[:4])} ...): "
                              "a regionally captured model adapts the weights its regions hold; inject again with "
                              "targets that name it")
        by_region[path].append(name)
    if not named:
        raise TargetError(f"targets {spec.keys() or ['all-linear']} name no weight of this model")
    return {p: local_spec(spec, p, names) if names else TargetSpec() for p, names in by_region.items()}


def untouched(model: nn.Module) -> nn.Module:
    """A regionally captured model with each region captured afresh from its module on its recorded
    inputs, without LoRA: what the folded model's regions must equal (`graph_diff`)."""
    graphs = {}
    for path, graph in each_region(model):
        cap = graph.capture_info
        args, kwargs = (tuple(cap.example_inputs), {}) if cap.positional else ((), dict(cap.example_inputs))
        graphs[path] = capture_call(cap.source, args, kwargs)
    return with_regions(model, graphs, folded=True)


def model_sites(model: nn.Module) -> dict[str, Site]:
    """Every adapted weight's site with the model's paths, of a graph or a regionally captured model."""
    if regions_of(model) is None:
        return dict(model.lora_state.sites)
    return {s.param: s for path, g in each_region(model) for s in (global_site(x, path) for x in g.lora_state.sites.values())}
