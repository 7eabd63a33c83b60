"""Generation: merge_and_unload gives the model's own class back; gm.generate runs a captured decoding
step with a KV cache and gives transformers' tokens. Over every architecture row (decoder rows for
generation)."""
from __future__ import annotations

import pytest
import torch

import lora_fx
from helpers import assert_close, assert_unchanged, randomize_lora, rel_diff, tiny_gpt2, tiny_llama, token_ids
from models import CASES


def _prompt(batch=3, seq=6, seed=1, pad_rows=1):
    """Token ids with the first `pad_rows` rows left-padded by 2, and their attention mask."""
    ids = torch.randint(3, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[:pad_rows, :2] = 0
    ids[:pad_rows, :2] = 0
    return ids, mask


# ---------------------------------------------------------------------------------- merge_and_unload
def test_merge_and_unload_is_the_model_class_with_the_fold(built, tmp_path):
    gm = built.random_b()
    merged = lora_fx.merge_and_unload(gm)
    assert type(merged) is type(built.model) and merged is not built.model
    folded = built.folded()
    with torch.no_grad():  # the same weights (eager nn.MultiheadAttention takes another kernel: 1e-6)
        assert_close(merged(**built.batch), folded(**built.batch))
    adapted = set(gm.lora_state.sites) | {s.bias for s in gm.lora_state.sites.values() if lora_fx.delta_bias(gm, s) is not None}
    for name, p in built.model.named_parameters():
        mine = merged.get_parameter(name)
        if name in adapted:
            assert mine.data_ptr() != p.data_ptr() and torch.equal(mine, folded.get_parameter(name))
        elif not gm.get_parameter(name).requires_grad:  # not a trained copy: the user's own tensor
            assert mine is p, name
    assert_unchanged(built.model, built.snap)
    if hasattr(merged, "save_pretrained"):
        merged.save_pretrained(tmp_path)
        again = type(merged).from_pretrained(tmp_path).eval()
        with torch.no_grad():  # the same weights; from_pretrained may pick another MoE experts kernel (2e-7)
            assert_close(again(**built.batch), merged(**built.batch), ulps=10)


def test_merge_and_unload_of_a_weight_adapted_as_a_weight():
    class SplitQKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv.weight.split(8)
            return torch.nn.functional.linear(x, q) * torch.nn.functional.linear(x, v)

    model = SplitQKV()
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    gm = lora_fx.inject_lora(model, ["qkv"], rank=2, example_inputs=(x,))
    randomize_lora(gm)
    merged = lora_fx.merge_and_unload(gm)
    assert type(merged) is SplitQKV and merged.qkv.bias is model.qkv.bias
    with torch.no_grad():
        assert_close(merged(x), gm(x), ulps=10)
        assert rel_diff(merged(x), model(x)) > 1e-4


def test_merge_and_unload_refuses_a_tied_weight(tmp_path):
    gm = lora_fx.inject_lora(tiny_gpt2(), ["lm_head"], rank=2, example_inputs=token_ids())
    randomize_lora(gm)
    with pytest.raises(lora_fx.FoldError, match="also read by .*embedding.*untie"):
        lora_fx.merge_and_unload(gm)


# ---------------------------------------------------------------------------------- generate
def test_generate_equals_merge_and_unload_token_for_token(decoder):
    gm = decoder.random_b()
    merged = lora_fx.merge_and_unload(gm)
    ids, mask = _prompt()
    with torch.no_grad():
        ref = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        base = decoder.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
    ours = gm.generate(ids, max_new_tokens=10, attention_mask=mask, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, ref), (ours, ref)
    assert not torch.equal(ref, base)  # the adapter changes what is generated
    # the model's own eos / pad, taken from its generation config as transformers does
    with torch.no_grad():
        ref_eos = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(gm.generate(ids, max_new_tokens=10, attention_mask=mask), ref_eos)


def test_generate_runs_one_new_token_per_step_through_one_capture(decoder):
    """The decoding step is captured once and, after the prompt, is fed one token per step with the
    cache of everything before: the cost of a token does not include re-reading the prefix."""
    gm = decoder.inject()
    ids, mask = _prompt(batch=2, seq=5, pad_rows=0)
    gm.generate(ids, max_new_tokens=1, attention_mask=mask)
    step, runner = gm.decode_step(), gm.variants["decoder-runner"]  # what runs per token
    fed = []
    real = runner.forward

    def spy(*args, **kwargs):
        fed.append((kwargs["input_ids"].shape[1], kwargs["past_key_values"][0][0].shape[2]))
        return real(*args, **kwargs)

    runner.forward = spy
    try:
        gm.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=None)
        gm.generate(ids, max_new_tokens=3, attention_mask=mask, eos_token_id=None)
    finally:
        del runner.forward
    assert fed[:6] == [(5, 0), (1, 5), (1, 6), (1, 7), (1, 8), (1, 9)]
    assert len(fed) == 9 and gm.decode_step() is step and gm.variants["decoder-runner"] is runner  # no new capture


def test_sampling_is_seeded_and_filters_like_transformers(decoder):
    gm = decoder.random_b()
    ids, mask = _prompt(pad_rows=0)
    kw = dict(max_new_tokens=8, attention_mask=mask, eos_token_id=None, do_sample=True)
    a = gm.generate(ids, seed=3, temperature=1.5, **kw)
    assert torch.equal(a, gm.generate(ids, seed=3, temperature=1.5, **kw))
    assert not torch.equal(a, gm.generate(ids, seed=4, temperature=1.5, **kw))
    # top_k=1 and a tiny top_p leave one token: sampling is then greedy
    greedy = gm.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=None)
    assert torch.equal(gm.generate(ids, seed=5, top_k=1, **kw), greedy)
    assert torch.equal(gm.generate(ids, seed=5, top_p=1e-6, **kw), greedy)


def test_generate_follows_the_active_adapter(decoder):
    gm = decoder.inject(adapter="a")
    randomize_lora(gm, seed=2)
    lora_fx.add_adapter(gm, "b", rank=2, alpha=8)
    lora_fx.set_adapter(gm, "b")
    randomize_lora(gm, seed=3)
    ids, mask = _prompt()
    out = {}
    for name in ("a", "b"):
        lora_fx.set_adapter(gm, name)
        out[name] = gm.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=None)
        with torch.no_grad():
            ref = lora_fx.merge_and_unload(gm).generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                                         do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(out[name], ref), name
    assert not torch.equal(out["a"], out["b"])
    with lora_fx.disable_adapters(gm):
        with torch.no_grad():
            base = decoder.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
        assert torch.equal(gm.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=None), base)


def test_eos_pads_finished_rows_and_stops_when_all_are_done():
    gm = lora_fx.inject_lora(tiny_llama(), ["q_proj", "v_proj"], rank=2, example_inputs={"input_ids": _prompt(2, 4)[0]})
    ids, mask = _prompt(batch=2, seq=4, pad_rows=0)
    free = gm.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=None)
    eos = int(free[0, 5])  # row 0's second new token: row 0 must stop there
    out = gm.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=eos, pad_token_id=1)
    row0 = free[0, 4:].tolist()
    first = 4 + row0.index(eos)
    assert out[0, first] == eos and (out[0, first + 1:] == 1).all()
    if eos not in free[1, 4:].tolist():  # row 1 never emits it: runs the full length
        assert out.shape[1] == free.shape[1] and torch.equal(out[1], free[1])


@pytest.mark.parametrize("bad, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(max_new_tokens=100), r"more than the model's 32 positions; lower max_new_tokens to at most 28"),
    (dict(temperature=0.0, do_sample=True), "temperature must be a positive number"),
    (dict(top_p=1.5, do_sample=True), r"top_p must be in \(0, 1\]"),
])
def test_bad_generation_requests_fail_before_any_work(bad, message):
    gm = lora_fx.inject_lora(tiny_gpt2(), ["c_attn"], rank=2, example_inputs={"input_ids": _prompt(2, 4)[0]})
    kw = dict(max_new_tokens=4)
    kw.update(bad)
    with pytest.raises(lora_fx.LoraFxError, match=message):
        gm.generate(_prompt(2, 4)[0], **kw)
    with pytest.raises(lora_fx.InputsError, match="the prompt has 70 tokens but the model has 32 positions"):
        gm.generate(torch.zeros(1, 70, dtype=torch.long), max_new_tokens=1)


def test_a_model_without_a_cache_is_refused_clearly():
    bert = next(c for c in CASES if c.name == "bert").build()
    with pytest.raises(lora_fx.InputsError, match="BertForSequenceClassification has no KV cache"):
        lora_fx.capture_decoder(bert)
