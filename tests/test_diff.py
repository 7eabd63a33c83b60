"""graph_diff(): alignment by op and target, and a readable listing."""
import copy

import pytest
import torch

import lora_fx
from helpers import token_ids


@pytest.fixture(scope="module")
def two_captures(llama):
    """Two captures of one model: identical graphs, each free to be edited by one test."""
    return lora_fx.capture(llama, token_ids()), lora_fx.capture(llama, token_ids())


def test_identical_graphs_of_two_captures(two_captures):
    d = lora_fx.graph_diff(*two_captures)
    assert d.identical and not d.added and not d.removed and not d.changed
    assert str(d).startswith("graphs identical (")


def test_injection_shows_added_nodes_and_rewired_consumers(two_captures):
    base = two_captures[0]
    gm = lora_fx.inject_lora(base, ["q_proj"], rank=2)
    d = lora_fx.graph_diff(base, gm)
    assert not d.identical and not d.removed
    # per adapted use: get_attr scale, get_attr A, linear, mul, get_attr B, linear, add
    assert len(d.added) == 2 * 7
    assert sum("get_attr model.layers" in a and "lora_A.default.weight" in a for a in d.added) == 2
    assert len(d.changed) == 2  # the consumer of each q_proj output now reads the LoRA sum
    text = str(d)
    assert "+ " in text and "~ " in text and "was " in text


def test_changed_constant_is_reported(two_captures):
    a, b = two_captures[0], copy.deepcopy(two_captures[1])
    node = next(n for n in b.graph.nodes if n.target == torch.ops.aten.mul.Tensor and not isinstance(n.args[1], torch.fx.Node))
    node.args = (node.args[0], node.args[1] * 2)
    d = lora_fx.graph_diff(a, b)
    assert not d.identical and len(d.changed) == 1 and not d.added
    assert node.name in str(d)


def test_node_removal_is_reported(two_captures):
    a, b = two_captures[0], copy.deepcopy(two_captures[1])
    node = next(n for n in b.graph.nodes if n.target == torch.ops.aten.silu.default)
    node.replace_all_uses_with(node.args[0])
    b.graph.erase_node(node)
    d = lora_fx.graph_diff(a, b)
    assert len(d.removed) == 1 and "silu" in d.removed[0] and not d.added
