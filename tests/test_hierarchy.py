"""lora_fx.unflatten: the injected model as a module tree again, for the per-layer recipes
(activation checkpointing, regional compilation; per-layer FSDP2 is in test_distributed.py)."""
from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import lora_fx
from helpers import assert_close, assert_unchanged, max_abs, randomize_lora, snapshot, tiny_llama, token_ids

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def pair():
    """(flat graph with two adapters, its module tree); tests leave both as they are."""
    gm = lora_fx.inject_lora(tiny_llama(), TARGETS, rank=4, alpha=8, example_inputs=token_ids())
    lora_fx.add_adapter(gm, "other", TARGETS, rank=2, alpha=4)
    randomize_lora(gm)
    lora_fx.set_adapter(gm, "default")
    return gm, lora_fx.unflatten(gm)


def _grads(module, gm, batch):
    for p in gm.parameters():
        p.grad = None
    module(**batch).logits.square().mean().backward()
    return {n: p.grad.clone() for n, p in lora_fx.lora_parameters(gm).items() if p.grad is not None}


def test_same_outputs_gradients_and_adapters_as_the_flat_graph(pair):
    gm, tree = pair
    batch = token_ids()
    assert type(tree.model.layers.get_submodule("0")).__name__ == "InterpreterModule"  # each layer runs its forward
    shared = dict(gm.named_parameters())
    assert all(p is shared[n] for n, p in tree.named_parameters() if n in shared)  # the same tensors
    assert max_abs(tree(**batch), gm(**batch)) == 0
    flat, layered = _grads(gm, gm, batch), _grads(tree, gm, batch)
    assert flat.keys() == layered.keys() and len(flat) == 8
    assert all(torch.equal(flat[n], layered[n]) for n in flat)
    lora_fx.set_adapter(gm, "other")  # switching the flat graph's adapter switches the tree's
    try:
        assert max_abs(tree(**batch), gm(**batch)) == 0
        with lora_fx.disable_adapters(gm):
            assert max_abs(tree(**batch), gm(**batch)) == 0
    finally:
        lora_fx.set_adapter(gm, "default")


def test_activation_checkpointing_per_layer(pair):
    gm, _ = pair
    batch = token_ids()
    tree = lora_fx.unflatten(gm)
    reference = _grads(tree, gm, batch)
    for name, layer in list(tree.model.layers.named_children()):
        tree.model.layers.register_module(name, checkpoint_wrapper(layer))
    checkpointed = _grads(tree, gm, batch)
    assert reference.keys() == checkpointed.keys()
    for n in reference:
        assert_close(reference[n], checkpointed[n], ulps=1, what=n)


def test_regional_compile(pair):
    """torch.compile one layer at a time (dynamo runs each layer's graph as generated code)."""
    gm, _ = pair
    batch = token_ids()
    tree = lora_fx.unflatten(gm)
    expected = gm(**batch).logits
    for layer in tree.model.layers.children():
        layer.compile(backend="aot_eager", dynamic=False)
    assert_close(tree(**batch), expected, ulps=10)


def test_fold_after_training_the_tree(pair):
    gm, _ = pair
    model = tiny_llama()
    before = snapshot(model)
    gm = lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8, example_inputs=token_ids())
    tree = lora_fx.unflatten(gm)
    # gm lets go of the model (a storage-free copy of its structure remains) and shares the tree's modules
    assert {p.device.type for p in gm.capture_info.source.parameters()} == {"meta"}
    assert gm.get_submodule("model.layers.1.self_attn.q_proj") is tree.get_submodule("model.layers.1.self_attn.q_proj")
    batch = token_ids()
    opt = torch.optim.AdamW(lora_fx.lora_parameters(gm).values(), lr=2e-2)
    for _ in range(3):  # the tree takes the inputs it was captured with: the loss is computed here
        tree(**batch).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    folded = lora_fx.merge_lora(gm)  # fold, diff and export stay on the flat graph, trained through the tree
    assert_close(folded(**batch), tree(**batch))
    assert lora_fx.graph_diff(lora_fx.capture(model, token_ids()), folded).identical
    merged = lora_fx.merge_and_unload(gm)  # built from the structure copy, with gm's weights
    assert_close(merged(**batch), tree(**batch))
    mask = torch.ones_like(batch["input_ids"])  # other inputs: captured again from the structure, gm's weights
    assert_close(gm(**batch, attention_mask=mask), tree(**batch))
    assert_unchanged(model, before)


class Split(torch.nn.Module):
    """A weight read through a split: LoRA goes on the weight (W + scaling·B·A), not beside a product."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        a, b = self.w.split(4)
        return torch.nn.functional.linear(x, a) * torch.nn.functional.linear(x, b)


def test_refused_where_lora_is_on_the_weight():
    gm = lora_fx.inject_lora(torch.nn.Sequential(Split()), ["0"], rank=2, example_inputs=(torch.randn(3, 4),))
    assert gm.lora_state.weight_form
    with pytest.raises(lora_fx.TargetError, match="adapted as a weight"):
        lora_fx.unflatten(gm)
