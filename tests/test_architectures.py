"""The core battery: every architecture in tests/models.py through the same eight checks."""
from __future__ import annotations

import copy

import pytest
import torch

import lora_fx
from helpers import B2, S2, assert_close, assert_unchanged, first_tensor, max_abs, peft_forward, rel_diff


def _loss(out, target):
    return torch.nn.functional.mse_loss(first_tensor(out).float(), target)


def test_output_unchanged_at_init(built):
    with torch.no_grad():
        assert_close(built.gm(**built.batch), built.model(**built.batch), ulps=10)
    report = built.gm.lora_report
    assert report.counters == built.case.expect, str(report)
    assert_unchanged(built.model, built.snap)


def test_only_lora_trains_and_loss_falls(built):
    gm = built.inject()
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    lora = set(lora_fx.lora_parameters(gm))
    copied = {n for n in trainable if n not in lora}
    assert lora and all(any(n.startswith(t + ".") or f".{t}." in n for t in built.case.trainable) for n in copied)
    assert gm.lora_report.trainable_params == sum(p.numel() for n, p in gm.named_parameters() if n in trainable)

    gm.eval()
    with torch.no_grad():
        target = torch.randn_like(first_tensor(gm(**built.batch)).float())
        before = _loss(gm(**built.batch), target).item()
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(10):
        loss = _loss(gm(**built.batch), target)
        loss.backward()
        if step == 1:  # after one step both factors are nonzero (at init one of them is zero)
            lora = lora_fx.lora_parameters(gm)
            for name, p in gm.named_parameters():
                if name in lora:
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
                elif not p.requires_grad:
                    assert p.grad is None, f"base weight {name} got a gradient"
        opt.step()
        opt.zero_grad()
    gm.eval()
    with torch.no_grad():
        after = _loss(gm(**built.batch), target).item()
    assert after < before, f"loss did not fall: {before} -> {after}"
    for name, p in built.model.named_parameters():  # the user's model kept its weights and flags
        assert p.grad is None, name
    assert_unchanged(built.model, built.snap)


def test_folded_equals_unfolded(built):
    gm = built.random_b()
    folded = built.folded()
    with torch.no_grad():
        unfolded_out = gm(**built.batch)
        assert rel_diff(unfolded_out, built.model(**built.batch)) > 1e-6  # LoRA does change the output
        assert_close(folded(**built.batch), unfolded_out)
    assert_unchanged(built.model, built.snap)


def test_folded_graph_is_the_original(built):
    gm = built.random_b()
    folded = built.folded()
    diff = lora_fx.graph_diff(built.base, folded)
    assert diff.identical, str(diff)
    assert not lora_fx.graph_diff(built.base, gm).identical
    again = lora_fx.merge_lora(folded)  # folding a folded graph is a no-op
    assert lora_fx.graph_diff(folded, again).identical
    with torch.no_grad():
        assert max_abs(again(**built.batch), folded(**built.batch)) == 0


def test_runs_at_other_shapes(built):
    gm = built.random_b()
    folded = built.folded()
    other = built.case.batch(built.model, B2, S2, seed=3)
    with torch.no_grad():
        assert_close(built.gm(**other), built.model(**other), ulps=10)
        assert_close(folded(**other), gm(**other))


def test_eval_is_deterministic_and_train_is_the_models(built):
    gm = built.gm
    with torch.no_grad():
        gm.eval()
        a, b = gm(**built.batch), gm(**built.batch)
        assert max_abs(a, b) == 0
        assert_close(a, built.model(**built.batch), ulps=10)
        if not built.case.has_dropout:
            return
        gm.train()
        built.model.train()
        try:
            torch.manual_seed(5)
            t1 = gm(**built.batch)
            t2 = gm(**built.batch)
            torch.manual_seed(5)
            ref = built.model(**built.batch)
        finally:
            gm.eval()
            built.model.eval()
        assert max_abs(t1, t2) > 0, "train() did not turn dropout on"
        assert_close(t1, ref, ulps=10, what="train-mode graph differs from the model in train mode")


def test_unfolded_equals_the_definition(built):
    """Unfolded output = the untouched model with W0 + scaling * B @ A written into its weights."""
    gm = built.random_b()
    reference = copy.deepcopy(built.model)
    lora = lora_fx.lora_parameters(gm)
    with torch.no_grad():
        for site in gm.lora_state.sites.values():
            reference.get_parameter(site.param).add_(lora_fx.delta_weight(gm, site))
            bias = lora_fx.delta_bias(gm, site)  # lora_bias: scaling * lora_B's bias, on the layer's bias
            if bias is not None:
                reference.get_parameter(site.bias).add_(bias)
        for name, p in gm.named_parameters():
            if p.requires_grad and name not in lora:
                reference.get_parameter(name).copy_(p)
        assert_close(gm(**built.batch), reference(**built.batch))


def test_same_as_peft(built):
    if built.case.peft is None:
        pytest.skip("PEFT does not support these targets (fused blocks / parameters)")
    from peft import LoraConfig, get_peft_model

    from peft import set_peft_model_state_dict

    gm = built.random_b()
    peft_model = get_peft_model(copy.deepcopy(built.model), LoraConfig(r=4, lora_alpha=8, **built.case.peft)).eval()
    # our weights in PEFT's layout and keys (what save_adapter writes), into PEFT's own model
    result = set_peft_model_state_dict(peft_model, lora_fx.adapter_file(gm).tensors())
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys, result
    with torch.no_grad():
        assert_close(gm(**built.batch), peft_forward(peft_model, built.batch))
