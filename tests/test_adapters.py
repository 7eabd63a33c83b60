"""Adapters as files (PEFT's format, both ways) and several adapters in one graph."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lora_fx
from helpers import assert_close, first_tensor, max_abs, peft_forward, randomize_lora, rel_diff, tiny_llama, token_ids, train


# ------------------------------------------------------------------------ PEFT round trips (table)
def test_ours_to_peft_and_back(built, tmp_path):
    """inject (gaussian and kaiming, with and without rank_pattern) -> save -> PEFT loads -> same outputs."""
    if built.case.peft is None:
        pytest.skip("PEFT does not support these targets")
    from peft import PeftModel

    modules = built.case.peft["target_modules"]
    runs = [dict(init="gaussian"), dict(init="kaiming", use_rslora=True)]
    if modules:  # PEFT's patterns name modules
        runs[1].update(rank_pattern={modules[0]: 2}, alpha_pattern={modules[0]: 3})
    for i, kw in enumerate(runs):
        gm = built.inject(**kw)
        randomize_lora(gm, seed=i)
        gm.eval()
        d = lora_fx.save_adapter(gm, tmp_path / f"ours{i}")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(built.model), d).eval()
        again = lora_fx.load_adapter(built.base, d).eval()
        with torch.no_grad():
            ours = gm(**built.batch)
            assert_close(ours, peft_forward(peft_model, built.batch))
            assert max_abs(ours, again(**built.batch)) == 0
        if i == 1:  # rsLoRA and, where modules are named, other ranks / alphas on one of them
            _check_portable(built, gm, ours, tmp_path / "portable")


def _check_portable(built, gm, ours, d):
    """save_adapter(portable=True): one rank, alpha = rank, no rsLoRA, no patterns (what vLLM reads),
    and PEFT and lora-fx give the adapter's outputs from it."""
    import json

    from peft import PeftModel

    lora_fx.save_adapter(gm, d, portable=True)
    config = json.loads((d / "adapter_config.json").read_text())
    assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]
    assert config["lora_alpha"] == config["r"] == max(gm.lora_state.adapter(None).ranks.values())
    peft_model = PeftModel.from_pretrained(copy.deepcopy(built.model), d).eval()
    with torch.no_grad():
        assert_close(peft_forward(peft_model, built.batch), ours)
        assert_close(lora_fx.load_adapter(built.base, d).eval()(**built.batch), ours)


@pytest.mark.parametrize("init", [False, "gaussian", True])
def test_peft_to_ours(built, tmp_path, init):
    """PEFT save_pretrained (init_lora_weights varied; rank_pattern when init is False) -> load_adapter."""
    if built.case.peft is None:
        pytest.skip("PEFT does not support these targets")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    kw = dict(built.case.peft)
    if kw.get("lora_bias") and init == "gaussian":
        init = True  # PEFT's lora_bias takes init_lora_weights True or False only
    if init is False and kw["target_modules"]:
        kw["rank_pattern"] = {kw["target_modules"][0]: 2}
    if init == "gaussian":
        kw["use_rslora"] = True
    peft_model = get_peft_model(copy.deepcopy(built.model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, **kw))
    with torch.no_grad():  # True and "gaussian" start with B = 0 (an embedding's A = 0): make the adapter do something
        for name, p in peft_model.named_parameters():
            if ("lora_B" in name or "lora_embedding_A" in name) and init is not False:
                p.normal_(std=0.1)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    gm = lora_fx.load_adapter(built.base, tmp_path / "peft").eval()
    with torch.no_grad():
        ref = peft_forward(peft_model, built.batch)
        assert_close(gm(**built.batch), ref)
        assert rel_diff(ref, built.model(**built.batch)) > 1e-6  # the adapter is not a no-op


# ------------------------------------------------------------------------ several adapters
@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """One graph, adapters 'a' (rank 4) and 'b' (rank 2, other targets) trained on different targets."""
    d = tmp_path_factory.mktemp("adapters")
    model = tiny_llama()
    IDS = token_ids()
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    base = lora_fx.capture(model, IDS)
    gm = lora_fx.inject_lora(base, ["q_proj", "v_proj"], rank=4, alpha=8, adapter="a")
    with torch.no_grad():
        out = first_tensor(gm(**IDS))
    targets = {"a": torch.randn_like(out), "b": torch.randn_like(out)}
    train(gm, IDS, targets["a"])
    lora_fx.add_adapter(gm, "b", ["v_proj", "o_proj"], rank=2, alpha=4)
    lora_fx.set_adapter(gm, "b")
    train(gm, IDS, targets["b"])
    for name in ("a", "b"):
        lora_fx.save_adapter(gm, d / name, name)
    return model, gm, d, pointers, IDS, base


def test_switching_equals_each_adapter_alone(two_tasks):
    model, gm, d, pointers, IDS, base = two_tasks
    alone = {n: lora_fx.load_adapter(base, d / n).eval() for n in ("a", "b")}
    with torch.no_grad():
        expected = {n: alone[n](**IDS).logits for n in alone}
        assert rel_diff(expected["a"], expected["b"]) > 1e-3
        for _ in range(5):
            for n in ("a", "b"):
                lora_fx.set_adapter(gm, n)
                assert_close(gm(**IDS), expected[n], ulps=10)
    for name, p in model.named_parameters():
        assert gm.get_parameter(name).data_ptr() == pointers[name] == p.data_ptr()
    assert lora_fx.active_adapters(gm) == ["b"]


def test_an_adapters_weights_exist_once(two_tasks):
    """The active adapter lives only in the slots (what trains); an inactive one only in its own copy."""
    _, gm, *_ = two_tasks
    lora_fx.set_adapter(gm, "a")
    stored = {n: [t for pairs in (a.weights or {}).values() for pair in pairs for t in pair]
              for n, a in gm.lora_state.adapters.items()}
    b_numel = sum(t.numel() for pairs in lora_fx.adapter_weights(gm, "b").values() for pair in pairs for t in pair)
    assert stored["a"] == [] and sum(t.numel() for t in stored["b"]) == b_numel > 0
    a_before = {k: v.clone() for k, v in lora_fx.lora_state_dict(gm, "a").items()}
    lora_fx.set_adapter(gm, "b")  # "a" moves out of the slots, "b" in
    assert gm.lora_state.adapters["b"].weights is None
    assert all(torch.equal(v, lora_fx.lora_state_dict(gm, "a")[k]) for k, v in a_before.items())


def test_summed_adapters_and_weighted_fold(two_tasks):
    model, gm, _, _, IDS, _ = two_tasks
    lora_fx.set_adapter(gm, ["a", "b"])
    with torch.no_grad():
        both = gm(**IDS).logits
        folded = lora_fx.merge_lora(gm)  # what the graph computes now: a + b
        assert_close(folded(**IDS), both)
        ref = copy.deepcopy(model)
        for site in gm.lora_state.sites.values():
            ref.get_parameter(site.param).add_(lora_fx.delta_weight(gm, site, {"a": 1.0, "b": 1.0}))
        assert_close(ref(**IDS), both)
        half = lora_fx.merge_lora(gm, adapters={"a": 0.5, "b": 0.5})
        ref = copy.deepcopy(model)
        for site in gm.lora_state.sites.values():
            ref.get_parameter(site.param).add_(lora_fx.delta_weight(gm, site, {"a": 0.5, "b": 0.5}))
        assert_close(half(**IDS), ref(**IDS))
        only_a = lora_fx.merge_lora(gm, adapters="a")
        lora_fx.set_adapter(gm, "a")
        assert_close(only_a(**IDS), gm(**IDS))
    with pytest.raises(lora_fx.AdapterNameError, match="cannot fold adapters .*no adapter named 'c'"):
        lora_fx.merge_lora(gm, adapters="c")


def test_disable_adapters_gives_the_base_model(two_tasks):
    model, gm, _, _, IDS, _ = two_tasks
    lora_fx.set_adapter(gm, "a")
    with torch.no_grad():
        with lora_fx.disable_adapters(gm):
            assert max_abs(gm(**IDS), model(**IDS)) == 0
        assert rel_diff(gm(**IDS), model(**IDS)) > 1e-3


def test_switching_does_not_recompile(two_tasks):
    from torch._dynamo.testing import CompileCounter

    model, gm, _, _, IDS, _ = two_tasks
    # slots grow (once) to the largest combination used; activate it before compiling
    lora_fx.set_adapter(gm, ["a", "b"])
    lora_fx.set_adapter(gm, "a")
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            for n in ("a", "b", ["a", "b"]):
                lora_fx.set_adapter(gm, n)
                assert_close(compiled(**IDS), gm(**IDS), ulps=10)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compilations"


def test_delete_adapter_and_state_dict(two_tasks, tmp_path):
    model, gm, d, _, IDS, base = two_tasks
    gm2 = lora_fx.load_adapter(model, d / "a", name="a", example_inputs=IDS)
    lora_fx.load_adapter(gm2, d / "b", name="b")
    assert sorted(gm2.lora_state.adapters) == ["a", "b"] and lora_fx.active_adapters(gm2) == ["a"]
    sd = lora_fx.lora_state_dict(gm2, "b")
    assert all(lora_fx.parse_lora_name(k).slot == "b" for k in sd) and len(sd) == 2 * 2 * 2
    assert any("o_proj" in k for k in sd)
    lora_fx.delete_adapter(gm2, "b")
    assert not any("o_proj" in n for n in gm2.lora_state.sites)  # o_proj dropped with "b"
    with torch.no_grad():
        a_alone = lora_fx.load_adapter(base, d / "a")
        assert_close(gm2(**IDS), a_alone(**IDS), ulps=10)
    report = lora_fx.size_report(gm2, d / "a")
    assert 0 < report["adapter_bytes"] < report["base_bytes"]
    with pytest.raises(lora_fx.TargetError, match="only adapter"):
        lora_fx.delete_adapter(gm2, "a")


# ------------------------------------------------------------------------ bad files
@pytest.fixture(scope="module")
def llama_capture(llama):
    return lora_fx.capture(llama, token_ids())


@pytest.fixture()
def saved(llama, llama_capture, tmp_path):
    gm = lora_fx.inject_lora(llama_capture, ["q_proj", "v_proj"], rank=4)
    randomize_lora(gm)
    d = lora_fx.save_adapter(gm, tmp_path / "adapter")
    return llama, gm, d


def _graph_state(gm):
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}, sorted(gm.lora_state.adapters)


def _assert_same(gm, before):
    code, sd, adapters = before
    assert gm.code == code and sorted(gm.lora_state.adapters) == adapters
    now = gm.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], v) for k, v in sd.items())


def _rewrite_config(d, **changes):
    import json

    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("breakage, message", [
    ("truncate", "not a readable safetensors file"),
    ("garbage", "not a readable safetensors file"),
    ("pickle", "pickle file, which lora-fx never loads"),
    ("no_config", "has no adapter_config.json"),
    ("bad_json", "not valid JSON"),
    ("hostile", "cannot tell are harmless"),
    ("dora", r"use_dora: true, but it holds no DoRA magnitude"),
    ("lora_bias", r"lora_bias: true, but it holds no lora_B bias"),
    ("kasa", r"kasa_config=.* \(KaSA, a PEFT variant"),
    ("velora", r"velora_config=.* \(VeLoRA, a PEFT variant"),
    ("monteclora", r"monteclora_config=.* \(MonteCLoRA, a PEFT variant"),
    ("bdlora", r"use_bdlora=.* \(BD-LoRA, a PEFT variant"),
    ("trainable_tokens", r"trainable_token_indices=.* \(trainable tokens, a PEFT variant"),
    ("mica", r"init_lora_weights='mica' makes MiCA"),
    ("magnitude_key", r"holds DoRA magnitudes .* but its config says use_dora: false"),
    ("bias_key", r"holds lora_B biases .* but its config says lora_bias: false"),
    ("rank", "r must be a positive int"),
    ("missing_key", "missing LoRA weights"),
    ("extra_key", "unexpected keys"),
    ("wrong_rank", "does not match .* written by different saves"),
    ("foreign_wrong_rank", "rank 4 in the weights but 3 in the config"),
])
def test_bad_adapter_files_leave_the_graph_alone(saved, breakage, message):
    from safetensors.torch import load_file, save_file

    model, gm, d = saved
    lora_fx.add_adapter(gm, "other", rank=2)
    before = _graph_state(gm)
    weights = d / "adapter_model.safetensors"
    if breakage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif breakage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif breakage == "pickle":
        weights.unlink()
        torch.save({"x": torch.ones(1)}, d / "adapter_model.bin")
    elif breakage == "no_config":
        (d / "adapter_config.json").unlink()
    elif breakage == "bad_json":
        (d / "adapter_config.json").write_text("{not json")
    elif breakage == "hostile":
        _rewrite_config(d, __class__="os.system", eval_code="rm -rf /")
    elif breakage == "dora":  # a PEFT-written (no fingerprint) plain adapter whose config says DoRA
        save_file(load_file(weights), weights)
        _rewrite_config(d, use_dora=True)
    elif breakage in ("kasa", "velora", "monteclora"):  # what PEFT writes for these variants
        _rewrite_config(d, **{f"{breakage}_config": {"r": 4}})
    elif breakage == "bdlora":
        _rewrite_config(d, use_bdlora={"target_modules_bd_a": ["q_proj"]})
    elif breakage == "trainable_tokens":
        _rewrite_config(d, trainable_token_indices=[1, 2])
    elif breakage == "lora_bias":  # a PEFT-written (no fingerprint) plain adapter whose config says lora_bias
        save_file(load_file(weights), weights)
        _rewrite_config(d, lora_bias=True)
    elif breakage == "bias_key":  # a lora_bias file whose config lost lora_bias
        t = load_file(weights)
        holder = next(k for k in t if ".lora_B." in k).rsplit(".lora_B.", 1)[0]
        t[holder + ".lora_B.bias"] = torch.zeros(32)
        save_file(t, weights)
    elif breakage == "mica":
        _rewrite_config(d, init_lora_weights="mica")
    elif breakage == "magnitude_key":  # a DoRA file whose config lost use_dora
        t = load_file(weights)
        holder = next(k for k in t if ".lora_A." in k).rsplit(".lora_A.", 1)[0]
        t[holder + ".lora_magnitude_vector"] = torch.ones(32)
        save_file(t, weights)
    elif breakage == "rank":
        _rewrite_config(d, r="4; import os")
    elif breakage in ("missing_key", "extra_key"):
        t = load_file(weights)
        key = next(iter(t))
        if breakage == "missing_key":
            del t[key]
        else:
            t[key.replace("q_proj", "k_proj")] = t[key].clone()
        save_file(t, weights)  # no checksum metadata: a foreign file
    elif breakage == "wrong_rank":
        _rewrite_config(d, r=3)
    elif breakage == "foreign_wrong_rank":  # a PEFT-written pair carries no fingerprint
        save_file(load_file(weights), weights)
        _rewrite_config(d, r=3)
    with pytest.raises(lora_fx.AdapterFileError, match=message):
        lora_fx.load_adapter(gm, d, name="new")
    _assert_same(gm, before)
    with pytest.raises(lora_fx.AdapterFileError, match=message):
        lora_fx.load_adapter(model, d, example_inputs=token_ids())


def test_wrong_base_model_is_refused(saved):
    _, _, d = saved
    other = lora_fx.capture(tiny_llama(hidden_size=48, intermediate_size=64), token_ids())
    with pytest.raises(lora_fx.LoraFxError, match="do not fit this model"):
        lora_fx.load_adapter(other, d)
    gm = lora_fx.inject_lora(other, ["q_proj"], rank=2)
    before = _graph_state(gm)
    with pytest.raises(lora_fx.LoraFxError, match="do not fit this model"):
        lora_fx.load_adapter(gm, d, name="x")
    _assert_same(gm, before)


def test_save_into_missing_or_readonly_directory(saved, tmp_path):
    _, gm, _ = saved
    with pytest.raises(lora_fx.AdapterFileError, match="does not exist; create it first"):
        lora_fx.save_adapter(gm, tmp_path / "no" / "such" / "dir")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root writes anywhere: nothing to test then
            with pytest.raises(lora_fx.AdapterFileError, match="choose a writable directory"):
                lora_fx.save_adapter(gm, ro)
    finally:
        ro.chmod(0o700)


CRASH = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    import lora_fx, lora_fx.adapter_io as io
    from helpers import randomize_lora, tiny_llama
    gm = lora_fx.inject_lora(tiny_llama(), ["q_proj", "v_proj"], rank={rank},
                             example_inputs={{"input_ids": torch.zeros(2, 5, dtype=torch.long)}})
    randomize_lora(gm, seed=99)
    calls = []
    real = os.replace
    def crash(src, dst):
        calls.append(dst)
        if len(calls) > {after}:
            os._exit(9)  # the process dies here, mid-save
        real(src, dst)
    io.os.replace = crash
    lora_fx.save_adapter(gm, {path!r})
""")


@pytest.mark.slow
@pytest.mark.parametrize("after, rank", [(0, 2), (1, 2), (1, 4)])
def test_interrupted_save_keeps_or_flags_the_previous_adapter(saved, llama_capture, after, rank):
    """A writer killed mid-save: before any rename the previous adapter is intact; between the
    renames (weights new, config old) a config that no longer fits is caught, one that fits loads."""
    _, gm, d = saved
    model, IDS = llama_capture, token_ids()
    before = (d / "adapter_model.safetensors").read_bytes(), (d / "adapter_config.json").read_bytes()
    script = CRASH.format(tests=os.path.dirname(__file__), after=after, path=str(d), rank=rank)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    if after == 0:
        assert (d / "adapter_model.safetensors").read_bytes() == before[0]
        assert (d / "adapter_config.json").read_bytes() == before[1]
        again = lora_fx.load_adapter(model, d)
        with torch.no_grad():
            assert max_abs(again(**IDS), gm(**IDS)) == 0
    elif rank != 4:
        with pytest.raises(lora_fx.AdapterFileError, match="save interrupted"):
            lora_fx.load_adapter(model, d)
    else:  # same config: the new weights are a complete adapter of their own
        assert (d / "adapter_config.json").read_bytes() == before[1]
        assert lora_fx.load_adapter(model, d).lora_state.adapters["default"].ranks
    lora_fx.save_adapter(gm, d)  # the next save cleans up and works
    assert not list(d.glob(".lora-fx-tmp-*"))
    lora_fx.load_adapter(model, d)


def test_a_portable_pissa_adapter_is_relative_to_the_untouched_model(tmp_path):
    """portable=True on a PiSSA adapter with another rank and alpha on v_proj: written relative to the
    untouched W0 (as as_lora does), one rank 2r: PEFT on the untouched model gives the graph's
    outputs. (lora_bias and DoRA rows: test_ours_to_peft_and_back.)"""
    import json

    from peft import PeftModel

    model, x = tiny_llama(), token_ids()
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8, rank_pattern={"v_proj": 2},
                             alpha_pattern={"v_proj": 6}, example_inputs=x, init="pissa")
    randomize_lora(gm, seed=3)
    with torch.no_grad():
        ours = gm(**x).logits
    d = lora_fx.save_adapter(gm, tmp_path / "portable", portable=True)
    config = json.loads((d / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (8, 8, {}, {})
    assert config["init_lora_weights"] is True  # not "pissa": PEFT must not rebuild a residual
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), d).eval()
    with torch.no_grad():
        assert_close(peft_model(**x).logits, ours)
