"""inject_lora: capture -> match -> attach, as one call."""
from __future__ import annotations

from torch import nn

from .attach import check_adapter_name, check_hparams, graph_to_adapt, inject_matched, new_adapter
from .errors import CaptureError, ConfigError, TargetError
from .graph_module import LoraGraphModule
from .inits import apply_residual_init, is_residual
from .loftq import LoftQConfig, apply_loftq, check_loftq
from .match import match_weights, output_layer, parse_targets, resolve_targets
from .quantized import untraceable_weight
from .regions import inject_regions
from .state import LoraConfig

CAPTURES = ("auto", "whole", "regions")


def inject_lora(
    model: nn.Module,
    targets=None,
    *,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    init: str = "gaussian",
    trainable=(),
    example_inputs=None,
    adapter: str = "default",
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    weights: dict | None = None,
    target_parameters=None,
    use_rslora: bool = False,
    use_dora: bool = False,
    lora_bias: bool = False,
    capture: str = "auto",
    loftq: LoftQConfig | None = None,
    exclude_modules=None,
    layers_to_transform=None,
    layers_pattern=None,
) -> nn.Module:
    """Capture `model` and add LoRA beside every weight `targets` names.

    targets: a list of module names (a path matches when equal or ending with "." + name), a regex
    full-matched against module paths, "all-linear", or a dict {name: blocks} that adapts only some
    row blocks of a fused projection ([True, False, True] or [(rows, True), ...]).
    target_parameters: PEFT's parameter targets, paths (or "."-suffixes) of weights that are not a
    module's `.weight`, e.g. MoE expert stacks ["experts.gate_up_proj", "experts.down_proj"]: each
    expert gets its own rank-r pair. `targets` may then be None.
    rank_pattern / alpha_pattern: PEFT's per-module overrides ({"v_proj": 16}).
    use_rslora: scaling = alpha / sqrt(rank) (rsLoRA), as PEFT's use_rslora.
    use_dora: DoRA (Liu et al., 2024), as PEFT's use_dora: a trained magnitude per output,
    W' = m * (W0 + scaling * B @ A) / ||W0 + scaling * B @ A||; folding gives the original graph again.
    lora_bias: PEFT's lora_bias, a trained bias on lora_B (linear and conv layers that have a bias;
    folding adds scaling * that bias to the layer's bias).
    Only LoRA weights (and the modules named in `trainable`, which are copied) require grad; base
    weights are shared with `model`, never copied; `model` itself is left as it was.
    The report of what was done is `gm.lora_report`.
    capture: "auto" (the whole model with torch.export; where it cannot, by regions), "whole", or
    "regions": each module holding a targeted weight captured on its own, the rest of the model
    running its own code (`lora_fx.regions`); the result is then a copy of the model with the
    regions' graphs in it, and `model.lora_regions` says which and why.
    exclude_modules / layers_to_transform / layers_pattern: PEFT's layer selection, with PEFT's
    semantics (`peft_rules.Selection`): modules never adapted (names or a regex); the layer indices
    to adapt (read from each path as PEFT reads it, or after `layers_pattern`, e.g. "layers").
    init: "gaussian" (the paper's: A ~ N(0, 1/r^2)), "kaiming" (PEFT's default), or "loftq" for a
    quantized base (PEFT's init_lora_weights="loftq"): with loftq=LoftQConfig(original=<the float
    model, its state dict or a safetensors path>, iterations=1), A and B start from the base's
    quantization error and the graph holds LoftQ's re-quantized base (`lora_fx.loftq`); the model
    keeps its own. `gm.lora_report.loftq` has the error per weight before and after. PEFT's
    "pissa" / "pissa_niter_<n>" / "olora" start from W0's principal part and train beside the
    residual, which lives in the graph (`lora_fx.inits`; the model keeps W0); "orthogonal" is PEFT's.
    """
    if capture not in CAPTURES:
        raise ConfigError(f"capture must be one of {CAPTURES}, got {capture!r}")
    check_hparams(rank, alpha, dropout, init)
    check_adapter_name(adapter)
    loftq = check_loftq(init, loftq)
    spec = parse_targets(targets, target_parameters, exclude_modules=exclude_modules,
                         layers_to_transform=layers_to_transform, layers_pattern=layers_pattern)
    trainable = _as_names(trainable)
    why = untraceable_weight(model)
    if why is not None:  # before any capture: by regions it would fail the same way, less clearly
        raise TargetError(why)
    gm, reason = None, "asked for (capture='regions')"
    if capture != "regions":
        try:
            gm = graph_to_adapt(model, example_inputs)
        except CaptureError as e:
            if capture == "whole" or isinstance(model, LoraGraphModule):
                raise
            reason = str(e).strip().splitlines()[0]
    source = gm.capture_info.source if gm is not None else model
    exclude = output_layer(source)
    resolved = resolve_targets(spec, source, rank, alpha)
    config = LoraConfig(targets, rank, alpha, dropout, init, tuple(trainable),
                        {**(rank_pattern or {}), **resolved.rank_pattern}, {**(alpha_pattern or {}), **resolved.alpha_pattern},
                        None if target_parameters is None else tuple(spec.parameters),
                        bool(use_rslora), bool(use_dora), bool(lora_bias), loftq.iterations if loftq else 0,
                        spec.selection.as_peft())
    if gm is None:
        if loftq is not None or is_residual(init):
            raise ConfigError(f"init={init!r} puts a new base weight into the captured graph, and this model is captured "
                              f"by regions ({reason}); it needs the whole-model capture")
        if isinstance(model, LoraGraphModule):
            raise ConfigError("capture='regions' captures a model's modules one by one: pass the model, not a graph")
        return inject_regions(model, resolved.spec, config, adapter, trainable, example_inputs, reason, exclude, weights)
    matches, near = match_weights(gm, resolved.spec, exclude=exclude)
    sites = [m.site for m in matches]
    new = new_adapter(gm, adapter, config, sites, weights=weights)
    rows = apply_loftq(gm, new, sites, loftq) if loftq is not None else []
    if is_residual(init):
        apply_residual_init(gm, new, sites, init)
    gm = inject_matched(gm, matches, near, new, trainable, exclude)
    gm.lora_state.report.loftq.extend(rows)
    if resolved.note:
        gm.lora_state.report.notes.append(resolved.note)
    return gm


def _as_names(trainable) -> list[str]:
    if isinstance(trainable, str):
        trainable = [trainable]
    names = list(trainable or ())
    if any(not isinstance(n, str) or not n for n in names):
        raise ConfigError(f"trainable must be a list of module names, e.g. ['classifier'], got {trainable!r}")
    return names
