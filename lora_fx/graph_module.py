"""The module capture, inject and merge return: an fx GraphModule that behaves like the model."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._modules import copy_non_persistent
from .errors import InputsError


@dataclass
class CaptureInfo:
    """How a graph was captured, kept so calls can be checked and other inputs re-captured."""

    source: nn.Module | None  # the model captured; lets calls with other inputs re-capture it
    signature: inspect.Signature | None  # the model's forward signature
    input_names: tuple[str, ...]  # keyword inputs the graph was captured with
    positional: bool = False  # captured positionally (a forward that takes *args)
    example_inputs: Any = None  # the (cloned) inputs captured with: a dict, or a tuple if positional
    notes: list[str] = field(default_factory=list)

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


class LoraGraphModule(torch.fx.GraphModule):
    """A captured model as an fx graph.

    It keeps the model's call signature and output type (a `ModelOutput` stays one), switches
    dropout with `train()` / `eval()` (see `lora_fx.modes`), and when called with a different set of
    inputs than it was captured with, captures the source model again for those inputs, sharing
    every parameter (LoRA's included), so training and evaluation see one set of weights.
    """

    def __init__(self, root: nn.Module, graph: torch.fx.Graph, class_name: str = "LoraGraphModule"):
        super().__init__(root, graph, class_name)
        copy_non_persistent(root, self)
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(root, attr):
                setattr(self, attr, getattr(root, attr))
        self.meta = dict(getattr(root, "meta", {}))
        self._capture: CaptureInfo | None = getattr(root, "_capture", None)
        self._lora = getattr(root, "_lora", None)  # LoraState, set by inject_lora
        object.__setattr__(self, "_variants", {})

    # -- signature: what tools that inspect forward (transformers.Trainer) see -------------------
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "_capture":
            self._apply_signature()

    def recompile(self):
        out = super().recompile()
        self._apply_signature()
        return out

    def _apply_signature(self) -> None:
        """Give forward the model's own signature, so e.g. Trainer keeps the `labels` column; calls with
        inputs the graph was not captured with are routed to a re-capture by __call__."""
        cap = self.__dict__.get("_capture")
        if cap is None or cap.signature is None or cap.positional:
            return
        me = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        # declared names only: a **kwargs catch-all is not offered (undeclared inputs are refused)
        named = [p for p in cap.signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        type(self).forward.__signature__ = cap.signature.replace(parameters=[me, *named])

    # -- calls ---------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        cap = self._capture
        if cap is None or cap.positional or cap.signature is None or torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        if not args and len(kwargs) == len(cap.input_names) and all(k in kwargs for k in cap.input_names):
            return super().__call__(**kwargs)
        inputs = cap.bind(args, kwargs)
        if set(inputs) == set(cap.input_names):
            return super().__call__(**inputs)
        return self.variant(inputs)(**inputs)

    def variant(self, inputs: dict[str, Any]) -> "LoraGraphModule":
        """The graph for another set of inputs, captured on first use and cached."""
        key = frozenset(inputs)
        found = self._variants.get(key)
        if found is None:
            cap = self._capture
            if cap.source is None:
                raise InputsError(
                    f"this graph was captured with inputs {list(cap.input_names)} and was called with "
                    f"{sorted(inputs)}; its source model is not available to capture again. Capture "
                    f"with those inputs: pass example_inputs={{{', '.join(repr(k) for k in sorted(inputs))}: ...}}"
                )
            from .inject import build_variant  # inject builds graphs; this module only routes calls

            found = build_variant(self, inputs)
            self._variants[key] = found
        if found.training != self.training:
            found.train(self.training)
        return found

    @property
    def lora_report(self):
        """What inject_lora did (see `lora_fx.report.InjectReport`); None on a plain capture."""
        return self._lora.report if self._lora is not None else None
