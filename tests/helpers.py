"""What the tests share: small models, inputs, LoRA helpers, snapshots, and the architecture rows
built once per session (`Built`)."""
from __future__ import annotations

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import export
import lora_fx

# second shape every row also runs at (the capture is at 2 x 7)
B1, S1, B2, S2 = 2, 7, 3, 11
VOCAB = 64


def token_ids(batch: int = B1, seq: int = S1, seed: int = 0, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """{"input_ids": ...} drawn from a generator of its own (the global RNG stream is left alone)."""
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))}


def tiny_llama(**kw):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=32,
                                      bos_token_id=1, eos_token_id=2)).eval()


def first_tensor(out) -> torch.Tensor:
    """The main output of a model: logits for transformers models, the tensor otherwise."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    return next(v for v in out if isinstance(v, torch.Tensor))


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return first_tensor(x)


def max_abs(a, b) -> float:
    """The largest elementwise difference; the suite uses it only for exact checks (== 0, > 0)."""
    return (_as_tensor(a).double() - _as_tensor(b).double()).abs().max().item()


def rel_diff(a, b) -> float:
    """max |a - b| over the largest magnitude of either (0 when both are all zeros): a difference
    that means the same at any output scale."""
    a, b = _as_tensor(a).double(), _as_tensor(b).double()
    scale = max(a.abs().max().item(), b.abs().max().item())
    return 0.0 if scale == 0 else (a - b).abs().max().item() / scale


def tolerance(a, b, ulps: float, dtype: torch.dtype | None = None) -> float:
    """`ulps` units of epsilon of `dtype` (default: the coarser of the two compared), relative to the
    largest magnitude compared."""
    if dtype is None:
        a, b = _as_tensor(a), _as_tensor(b)
        floats = [t.dtype for t in (a, b) if t.is_floating_point()] or [torch.float32]
        return ulps * max(torch.finfo(d).eps for d in floats)
    return ulps * torch.finfo(dtype).eps


def assert_close(actual, expected, ulps: float = 100, what: str = "", dtype: torch.dtype | None = None):
    """The one numeric comparison of the suite: |actual - expected| <= ulps * eps(dtype) * the largest
    magnitude of either. float32's eps is 1.19e-7, so the default 100 allows 1.2e-5 of the output's
    scale: float32 rounding along a few reductions, whatever the CPU's kernels, never a real error.
    `dtype` names the precision that bounds the error when it is not the tensors' own (a float64
    result built from float32 parts)."""
    got, allowed = rel_diff(actual, expected), tolerance(actual, expected, ulps, dtype)
    assert got <= allowed, f"{what + ': ' if what else ''}relative difference {got:.3g} > {allowed:.3g} ({ulps} ulps)"


def randomize_lora(gm, std=0.2, seed=1):
    """Give every lora_A and lora_B random values so LoRA changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(gm).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def train(gm, batch, target, steps=15, lr=2e-2):
    """A few AdamW steps of MSE towards `target` on one batch; leaves `gm` in eval mode."""
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(first_tensor(gm(**batch)), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
    gm.eval()


def snapshot(model):
    """Every parameter's value and requires_grad, and every buffer, to check nothing changed."""
    return (
        {k: (v.detach().clone(), v.requires_grad) for k, v in model.named_parameters()},
        {k: v.detach().clone() for k, v in model.named_buffers()},
        {k: m.training for k, m in model.named_modules()},
    )


def assert_unchanged(model, snap):
    params, buffers, modes = snapshot(model)
    before_p, before_b, before_m = snap
    assert params.keys() == before_p.keys()
    for k, (v, rg) in before_p.items():
        assert torch.equal(params[k][0], v), f"parameter {k} changed"
        assert params[k][1] == rg, f"requires_grad of {k} changed"
    for k, v in before_b.items():
        assert torch.equal(buffers[k], v), f"buffer {k} changed"
    assert modes == before_m, "module train/eval modes changed"


def peft_forward(peft_model, batch):
    """PEFT's output on the regular MHA path: nn.TransformerEncoder's eval fast path reads
    in_proj_weight directly and skips PEFT's wrapper (its LoRA then has no effect)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return peft_model(**batch)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class Built:
    """One architecture row (tests/models.py), built once per session and shared by every battery:
    the model, its one capture, graphs injected from that capture, and their ONNX exports."""

    def __init__(self, case):
        torch.manual_seed(0)
        self.case = case
        self.model = case.build().eval()
        self.batch = case.batch(self.model, B1, S1)
        self.snap = snapshot(self.model)
        self.base = lora_fx.capture(self.model, self.batch)  # the row's only trace of the model
        self.gm = self.inject()  # at init: B = 0
        self.gm.eval()
        self._cache: dict = {}

    def inject(self, **kw):
        return lora_fx.inject_lora(self.base, self.case.targets, rank=4, alpha=8, trainable=self.case.trainable,
                                   target_parameters=self.case.parameters, use_dora=self.case.dora,
                                   lora_bias=self.case.lora_bias, **kw)

    def random_b(self):
        """An injected graph with random A and B (built once; tests must not change it)."""
        if "random_b" not in self._cache:
            gm = self.inject()
            randomize_lora(gm)
            self._cache["random_b"] = gm.eval()
        return self._cache["random_b"]

    def folded(self):
        """merge_lora of random_b() (built once)."""
        if "folded" not in self._cache:
            self._cache["folded"] = lora_fx.merge_lora(self.random_b())
        return self._cache["folded"]

    def onnx(self, which: str, directory):
        """The row's ONNX export of "base" (the capture), "folded" or "lora" (random_b unfolded), made
        once into `directory`."""
        key = ("onnx", which)
        if key not in self._cache:
            module = {"base": self.base, "folded": self.folded(), "lora": self.random_b()}[which]
            self._cache[key] = export.export_onnx(module, directory / f"{self.case.name}-{which}.onnx")
        return self._cache[key]

    def two_adapters(self):
        """An injected graph with adapters "a" (rank 4, active) and "b" (rank 2), both random (built once)."""
        if "two" not in self._cache:
            gm = self.inject(adapter="a")
            randomize_lora(gm, std=0.3, seed=1)
            lora_fx.add_adapter(gm, "b", rank=2, alpha=4)
            lora_fx.set_adapter(gm, "b")
            randomize_lora(gm, std=0.3, seed=2)
            lora_fx.set_adapter(gm, "a")
            self._cache["two"] = gm.eval()
        return self._cache["two"]

    def kv_onnx(self, which: str, directory):
        """The row's kv-cache export, each in a folder of its own (with its genai_config.json):
        "base" (the model), "folded" (random_b folded), "multi" (two_adapters, one adapter per run,
        with a.onnx_adapter / b.onnx_adapter beside it), "mixed" (two banks) or "stacked" (banks of any
        length)."""
        key = ("kv", which)
        if key not in self._cache:
            folder = directory / f"{self.case.name}-kv-{which}"
            folder.mkdir()
            path = folder / "model.onnx"
            if which == "base":
                export.export_onnx(self.model, path, kv_cache=True)
            elif which == "folded":
                export.export_onnx(self.folded(), path, kv_cache=True)
            else:
                gm = self.two_adapters()
                export.export_multi_adapter(gm, path, kv_cache=True, mixed=2 if which == "mixed" else 0,
                                            stacked=which == "stacked")
                for name in ("a", "b"):
                    export.export_adapter(gm, folder / f"{name}.onnx_adapter", path, name=name)
            self._cache[key] = path
        return self._cache[key]
