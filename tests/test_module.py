"""The graph module as users treat any module: deepcopy, pickle / torch.save, dtype and device moves;
and one error type for an adapter name that does not exist."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lora_fx
from helpers import assert_close, max_abs, randomize_lora, rel_diff, token_ids


@pytest.fixture(scope="module")
def base(llama):
    return lora_fx.capture(llama, token_ids())


@pytest.fixture()
def two_adapters(base):
    """Adapter "a" on q/v (active, dropout 0.1) and "b" on v/o (inactive), both random."""
    gm = lora_fx.inject_lora(base, ["q_proj", "v_proj"], rank=4, dropout=0.1, adapter="a")
    randomize_lora(gm, seed=1)
    lora_fx.add_adapter(gm, "b", ["v_proj", "o_proj"], rank=2)
    lora_fx.set_adapter(gm, "b")
    randomize_lora(gm, seed=2)
    lora_fx.set_adapter(gm, "a")
    return gm.eval()


def _outputs(gm, ids):
    """Logits with each adapter active, then with both: what a copy must reproduce."""
    out = {}
    with torch.no_grad():
        for names in ("a", "b", ["a", "b"]):
            lora_fx.set_adapter(gm, names)
            out[str(names)] = gm(**ids).logits
    lora_fx.set_adapter(gm, "a")
    return out


def _same_outputs(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert max_abs(a[k], b[k]) == 0, k


def test_deepcopy_is_a_working_independent_module(llama, base, two_adapters):
    gm, ids = two_adapters, token_ids(3, 9, seed=1)
    before = _outputs(gm, ids)
    clone = copy.deepcopy(gm)
    assert type(clone) is type(gm) or isinstance(clone, lora_fx.LoraGraphModule)
    _same_outputs(_outputs(clone, ids), before)
    assert clone.capture_info.source is llama  # the user's model is the recipe, shared, not copied
    assert lora_fx.active_adapters(clone) == ["a"] and sorted(clone.lora_state.adapters) == ["a", "b"]
    # training the copy leaves the original alone, and the other way round
    clone.train()
    opt = torch.optim.SGD([p for p in clone.parameters() if p.requires_grad], lr=0.5)
    clone(**ids).logits.square().mean().backward()
    opt.step()
    clone.eval()
    _same_outputs(_outputs(gm, ids), before)
    with torch.no_grad():
        assert rel_diff(clone(**ids), gm(**ids)) > 1e-4
    # the copy's LoRA is real LoRA: folding it gives the original graph back; new inputs re-capture
    assert lora_fx.graph_diff(base, lora_fx.merge_lora(clone)).identical
    assert clone(**ids, labels=ids["input_ids"]).loss.isfinite()


def test_torch_save_and_load_give_the_same_module(llama, base, two_adapters, tmp_path):
    gm, ids = two_adapters, token_ids(3, 9, seed=1)
    before = _outputs(gm, ids)
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    assert isinstance(loaded, lora_fx.LoraGraphModule)
    _same_outputs(_outputs(loaded, ids), before)
    assert lora_fx.active_adapters(loaded) == ["a"]
    assert str(loaded.lora_report) == str(gm.lora_report)
    # node metadata survived: fold finds the LoRA nodes, dropout follows train()/eval()
    assert lora_fx.graph_diff(base, lora_fx.merge_lora(loaded)).identical
    loaded.train()
    with torch.no_grad():
        assert max_abs(loaded(**ids), loaded(**ids)) > 0
    loaded.eval()
    with torch.no_grad():  # the source model came along: other inputs are captured again
        assert_close(loaded(**ids, labels=ids["input_ids"]).loss, gm(**ids, labels=ids["input_ids"]).loss)


@pytest.mark.parametrize("which", ["capture", "folded"])
def test_pickle_of_a_capture_and_of_a_folded_graph(base, two_adapters, which):
    module = base if which == "capture" else lora_fx.merge_lora(two_adapters)
    again = pickle.loads(pickle.dumps(module))
    ids = token_ids(2, 5, seed=3)
    with torch.no_grad():
        assert max_abs(again(**ids), module(**ids)) == 0
    assert lora_fx.graph_diff(module, again).identical


def test_to_float64_captures_again_at_the_new_dtype(llama, two_adapters):
    gm, ids = copy.deepcopy(two_adapters), token_ids(3, 9, seed=1)
    reference = copy.deepcopy(llama).double()
    with torch.no_grad():
        for site in gm.lora_state.sites.values():
            reference.get_parameter(site.param).add_(lora_fx.delta_weight(gm, site).double())
    assert gm.double() is gm
    assert all(p.dtype == torch.float64 for p in gm.parameters())
    assert all(t.dtype == torch.float64 for pairs in gm.lora_state.adapters["b"].weights.values()
               for pair in pairs for t in pair)  # the inactive adapter moved too
    with torch.no_grad():
        out = gm(**ids).logits
        assert out.dtype == torch.float64
        assert_close(out, reference(**ids), ulps=10, dtype=torch.float32)  # the reference adds an fp32 delta
    assert next(llama.parameters()).dtype == torch.float32  # the user's model stays as it was
    lora_fx.set_adapter(gm, "b")  # switching and folding still work at the new dtype
    folded = lora_fx.merge_lora(gm)
    with torch.no_grad():
        assert_close(folded(**ids), gm(**ids), dtype=torch.float32)  # the fold accumulates in fp32


def test_to_bfloat16_runs_like_the_model_in_bfloat16(llama, base):
    gm = lora_fx.inject_lora(base, ["q_proj", "v_proj"], rank=4)
    randomize_lora(gm)
    reference = copy.deepcopy(llama)
    with torch.no_grad():
        for site in gm.lora_state.sites.values():
            reference.get_parameter(site.param).add_(lora_fx.delta_weight(gm, site))
    ids = token_ids(2, 6, seed=4)
    gm.to(torch.bfloat16)
    with torch.no_grad():
        out, ref = gm(**ids).logits, reference.to(torch.bfloat16)(**ids).logits
    assert out.dtype == torch.bfloat16
    assert max_abs(out, ref) <= 0.05 * ref.float().abs().max().item()


def test_to_another_device_moves_the_devices_baked_in_the_graph(two_adapters):
    """A move to "meta" stands in for "cuda" on a machine without one: every device the graph
    names must follow, and it must run on inputs of the new device."""
    gm = copy.deepcopy(two_adapters).to("meta")
    cpu = torch.device("cpu")
    baked = [n for n in gm.graph.nodes for v in (*n.args, *n.kwargs.values()) if isinstance(v, torch.device) and v == cpu]
    assert not baked, baked
    out = gm(input_ids=token_ids(3, 9)["input_ids"].to("meta")).logits
    assert out.device.type == "meta" and out.shape == (3, 9, 64)


def test_a_graph_without_source_refuses_a_dtype_change_and_stays_as_it_was(two_adapters):
    mixed = lora_fx.mixed_adapters(two_adapters, ["a", "b"])
    before = {k: v.clone() for k, v in mixed.state_dict().items()}
    with pytest.raises(lora_fx.InputsError, match="float32 to torch.float64.*Convert the model first"):
        mixed.double()
    after = mixed.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


# --------------------------------------------------------------------- unknown adapter names
UNKNOWN = [
    ("set_adapter", lambda gm: lora_fx.set_adapter(gm, "zzz")),
    ("set_adapter (list)", lambda gm: lora_fx.set_adapter(gm, ["a", "zzz"])),
    ("delete_adapter", lambda gm: lora_fx.delete_adapter(gm, "zzz")),
    ("adapter_weights", lambda gm: lora_fx.adapter_weights(gm, "zzz")),
    ("lora_state_dict", lambda gm: lora_fx.lora_state_dict(gm, "zzz")),
    ("save_adapter", lambda gm: lora_fx.save_adapter(gm, "/nonexistent/x", "zzz")),
    ("merge_lora", lambda gm: lora_fx.merge_lora(gm, adapters={"a": 1.0, "zzz": 0.5})),
    ("mixed_adapters", lambda gm: lora_fx.mixed_adapters(gm, ["zzz"])),
]


@pytest.mark.parametrize("call", [c for _, c in UNKNOWN], ids=[n for n, _ in UNKNOWN])
def test_an_unknown_adapter_name_is_one_error_everywhere(two_adapters, call):
    gm = two_adapters
    code = gm.code
    with pytest.raises(lora_fx.AdapterNameError, match="no adapter named 'zzz'; this graph has \\['a', 'b'\\]") as e:
        call(gm)
    assert isinstance(e.value, KeyError) and isinstance(e.value, lora_fx.LoraFxError)
    assert "add_adapter" in str(e.value) and not str(e.value).startswith("'")  # says how to add one; not quoted
    assert gm.code == code and lora_fx.active_adapters(gm) == ["a"]
