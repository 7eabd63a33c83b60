"""PEFT's targeting rules, as data and small pure functions: which modules PEFT's LoRA wraps, and how
PEFT renames targets on the MoE models whose experts transformers 5 fused.

`targets` mean in lora-fx what they mean in PEFT (0.21): for the same `targets`, both adapt the same
weights. These are PEFT's rules as it applies them, quirks included, so that a config moves between
the two unchanged.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .errors import ConfigError

# PEFT's `_MOE_TARGET_MODULE_MAPPING` / `_MOE_FUSED_TARGETS` (peft/utils/transformers_weight_conversion.py):
# on models transformers converts from v4 checkpoints, a target named like a v4 expert projection or
# router becomes a parameter target of the v5 fused experts
MOE_RENAMES = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"},
}
MOE_FUSED = {"mixtral": {"gate_up_proj": ("w1", "w3")}, "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}


def is_gpt2_conv1d(module: nn.Module | None) -> bool:
    """transformers' `Conv1D` (GPT-2's [in, out] linear), known by class as PEFT knows it (without
    importing transformers, an optional package)."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def peft_module(module: nn.Module | None) -> str | None:
    """What PEFT's LoRA wraps `module` as: "linear" (nn.Linear and its subclasses, transformers'
    Conv1D), "embedding", "conv", "attention" (nn.MultiheadAttention); None where PEFT refuses the
    module as a target ("Target module ... is not supported": a custom module that calls F.linear
    on its own weight, a router, I-BERT's QuantLinear). PEFT reaches such weights by parameter
    (`target_parameters`)."""
    if isinstance(module, nn.Linear) or is_gpt2_conv1d(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return None


def moe_family(model: nn.Module | None) -> str | None:
    """The MoE family ("qwen2_moe", "mixtral") whose renames PEFT applies to `model`'s targets, or
    None. PEFT applies them where transformers has a checkpoint conversion for the model type and its
    conversion pattern is one of the families (it reads the same transformers table)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    try:  # optional package; the table is the one PEFT reads
        from transformers import conversion_mapping
    except ImportError:
        return None
    if conversion_mapping.get_checkpoint_conversion_mapping(model_type) is None:
        return None
    patterns = {**getattr(conversion_mapping, "_MODEL_TO_CONVERSION_PATTERN", {}), "mixtral": "mixtral"}
    family = patterns.get(model_type)
    return family if family in MOE_RENAMES else None


@dataclass
class MoeTargets:
    """Targets after PEFT's MoE renames: module names left, parameter targets added, and the rank /
    alpha patterns PEFT adds for fused projections (a fused pair trains at 2r, scaling unchanged)."""

    names: list[str]
    parameters: list[str]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)  # target -> the parameter target it became


def moe_targets(family: str, names: list[str], parameters: list[str], rank: int, alpha: float) -> MoeTargets:
    """PEFT's `_convert_peft_config_moe` on a list of module names (a string target is first resolved
    to leaf names by the caller): names equal to or ending in a v4 expert or router name become the
    fused experts' parameter targets; a fused pair must be named whole (PEFT's ValueError)."""
    renames, fused = MOE_RENAMES[family], MOE_FUSED[family]
    out = MoeTargets([], list(parameters))
    present: dict[str, set[str]] = {new: set() for new in fused}
    for target in names:
        old = next((o for o in renames if target == o or target.endswith("." + o)), None)
        if old is None:
            out.names.append(target)
            continue
        new = renames[old]
        out.renamed[target] = new
        if new not in out.parameters:
            out.parameters.append(new)
        if new in fused:
            present[new].add(old)
    for new, olds in fused.items():
        have = present[new]
        if have and len(have) < len(olds):
            missing = sorted(set(olds) - have)
            raise ConfigError(f"targets {sorted(have)} on this {family}-family model are renamed, as PEFT does, to the fused "
                              f"experts' {new!r}, which also holds {missing}: name {missing} too, or name the dense "
                              f"layers by parameter (target_parameters=['mlp.{sorted(have)[0]}.weight'])")
        if len(have) == len(olds) > 1:
            out.rank_pattern[rf".*\.{re.escape(new)}"] = rank * len(olds)
            out.alpha_pattern[rf".*\.{re.escape(new)}"] = alpha * len(olds)
    return out


def leaf_names(paths) -> list[str]:
    """The last component of each dotted path, sorted, without repeats."""
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


# ------------------------------------------------------------------------------- layer selection
@dataclass(frozen=True)
class Selection:
    """PEFT's `exclude_modules`, `layers_to_transform` and `layers_pattern` (check_target_module_exists),
    applied to module paths a target names: an excluded path is never adapted (even when named
    exactly); a path a list target names by "."-suffix is kept only in the chosen layers (a path
    named exactly, or by a regex target, is not filtered)."""

    exclude: tuple[str, ...] | str | None = None  # names (== or "."-suffix) or one regex (full match)
    layers: tuple[int, ...] | None = None
    patterns: tuple[str, ...] | None = None  # where the layer index is: "<pattern>.<index>." in the path

    def excludes(self, path: str) -> bool:
        if not self.exclude:
            return False
        if isinstance(self.exclude, str):
            return re.fullmatch(self.exclude, path) is not None
        return any(path == e or path.endswith("." + e) for e in self.exclude)

    def layer_index(self, path: str) -> int | None:
        """The layer index PEFT reads from `path`: the first numbered component after a named one, or
        the number after one of `patterns` (the first index, not an expert's: "layers.1.experts.0")."""
        if not self.patterns:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        else:
            found = next((m for p in self.patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path))), None)
        return int(found["idx"]) if found else None

    def keeps_layer(self, path: str) -> bool:
        return self.layers is None or self.layer_index(path) in self.layers

    def as_peft(self) -> dict:
        """The three fields as PEFT's LoraConfig spells them."""
        exclude = sorted(self.exclude) if isinstance(self.exclude, tuple) else self.exclude
        return {"exclude_modules": exclude or None, "layers_to_transform": list(self.layers) if self.layers is not None else None,
                "layers_pattern": list(self.patterns) if self.patterns else None}


def selection(exclude_modules=None, layers_to_transform=None, layers_pattern=None, string_targets: bool = False
              ) -> Selection:
    """A checked Selection from PEFT's three fields (PEFT's LoraConfig rules, as ConfigError)."""
    if exclude_modules is not None and not isinstance(exclude_modules, str):
        if not isinstance(exclude_modules, (list, tuple, set, frozenset)) or not all(
                isinstance(e, str) and e for e in exclude_modules):
            raise ConfigError(f"exclude_modules must be a list of module names or a regex string, got {exclude_modules!r}")
        exclude_modules = tuple(sorted(exclude_modules))
    elif isinstance(exclude_modules, str):
        try:
            re.compile(exclude_modules)
        except re.error as e:
            raise ConfigError(f"exclude_modules {exclude_modules!r} is not a valid regular expression: {e}") from None
    layers = layers_to_transform
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    elif layers is not None:
        if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ConfigError(f"layers_to_transform must be a layer index or a list of them, got {layers_to_transform!r}")
        layers = tuple(layers) or None  # PEFT: an empty list selects every layer
    if layers is not None and any(i < 0 for i in layers):
        raise ConfigError(f"layers_to_transform must be layer indices (>= 0), got {layers_to_transform!r}")
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if patterns is not None and (not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns)):
        raise ConfigError(f"layers_pattern must be a name or a list of names (e.g. 'layers', 'h'), got {layers_pattern!r}")
    patterns = tuple(p for p in patterns or () if p) or None
    if patterns and layers_to_transform is None:
        raise ConfigError("layers_pattern is given without layers_to_transform (PEFT's rule): pass the layer indices too")
    if string_targets and (layers_to_transform is not None or layers_pattern is not None):
        raise ConfigError("layers_to_transform / layers_pattern cannot be used with a string target (a regex or "
                          "'all-linear'), as in PEFT: pass the module names as a list, e.g. ['q_proj', 'v_proj']")
    return Selection(exclude_modules or None, layers, patterns)
