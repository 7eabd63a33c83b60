"""The architecture table, built once per test session and shared by every battery."""
from __future__ import annotations

import torch

import lora_fx
from helpers import randomize_lora, snapshot

B1, S1, B2, S2 = 2, 7, 3, 11


class Built:
    """One row, built once per session: the model, its untouched capture, and injected graphs."""

    def __init__(self, case):
        torch.manual_seed(0)
        self.case = case
        self.model = case.build().eval()
        self.batch = case.batch(self.model, B1, S1)
        self.snap = snapshot(self.model)
        self.base = lora_fx.capture(self.model, self.batch)
        # from the model itself once; later injections reuse the capture (same graph, no re-trace)
        self.gm = lora_fx.inject_lora(self.model, case.targets, rank=4, alpha=8, trainable=case.trainable,
                                      example_inputs=self.batch)  # at init: B = 0
        self.gm.eval()

    def inject(self, **kw):
        return lora_fx.inject_lora(self.base, self.case.targets, rank=4, alpha=8, trainable=self.case.trainable, **kw)

    def random_b(self):
        """An injected graph with random A and B (built once; tests must not change it)."""
        if not hasattr(self, "_random_b"):
            self._random_b = self.inject()
            randomize_lora(self._random_b)
            self._random_b.eval()
        return self._random_b

    def folded(self):
        """merge_lora of random_b() (built once)."""
        if not hasattr(self, "_folded"):
            self._folded = lora_fx.merge_lora(self.random_b())
        return self._folded

