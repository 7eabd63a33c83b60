"""Small helpers shared by the tests."""
from __future__ import annotations

import torch


def first_tensor(out) -> torch.Tensor:
    """The main output of a model: logits for transformers models, the tensor otherwise."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    return next(v for v in out if isinstance(v, torch.Tensor))


def max_abs(a, b) -> float:
    return (first_tensor(a).float() - first_tensor(b).float()).abs().max().item()


def randomize_lora(gm, std=0.2, seed=1):
    """Give every lora_B (and lora_A) random values so LoRA changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


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
