"""A model built on the meta device, its base read from a Hugging Face checkpoint (`load_base`), and
training checkpoints that resume (`save_checkpoint` / `load_checkpoint`), on one process. The same
on two gloo ranks with per-layer FSDP2 is in test_distributed.py."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

import lora_fx
from helpers import assert_close, tiny_gpt2, tiny_llama, token_ids

STEPS = 3


def meta_llama(**kw):
    with torch.device("meta"):
        return tiny_llama(**kw)


def injected(model, **kw):
    """inject_lora after the random stream tiny_llama() leaves (its LoRA draws come after the model's
    init), so a meta-built model gets the A of the real model's injection."""
    tiny_llama()
    return lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=4, example_inputs=token_ids(2, 7), **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny_llama written as transformers writes a big model: sharded safetensors and an index."""
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture(scope="module")
def real():
    return injected(tiny_llama())


def test_a_meta_model_loaded_from_its_checkpoint_is_the_real_models_graph(checkpoint, real):
    model = meta_llama()
    gm = injected(model)
    with pytest.raises(lora_fx.TargetError, match=r"on the meta device.*lora_fx.load_base"):
        gm(**token_ids(2, 7))
    report = lora_fx.load_base(gm, checkpoint)
    assert report.tensors == len(dict(tiny_llama().named_parameters()))
    assert report.computed == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    assert len(report.files) == len(list(checkpoint.glob("*.safetensors")))
    assert all(p.is_meta for p in model.parameters())  # the user's model is left as it was
    ours, theirs = lora_fx.lora_parameters(gm), lora_fx.lora_parameters(real)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for k, b in real.named_buffers():
        assert torch.equal(dict(gm.named_buffers())[k], b), k
    lora_fx.set_adapter(gm, "default")
    with torch.no_grad():
        ids = token_ids(3, 9)  # other sizes: the capture for them is made from the loaded weights
        assert torch.equal(gm(**ids).logits, real(**ids).logits)
    assert lora_fx.graph_diff(lora_fx.capture(tiny_llama(), token_ids(2, 7)), lora_fx.merge_lora(gm)).identical


def test_tied_output_weights_come_from_the_embedding(tmp_path):
    """GPT-2's checkpoint holds its tied lm_head once, under the embedding's name."""
    tiny_gpt2().save_pretrained(tmp_path)
    with torch.device("meta"):
        model = tiny_gpt2()
    gm = lora_fx.inject_lora(model, ["c_attn"], rank=4, example_inputs=token_ids(2, 7))
    lora_fx.load_base(gm, tmp_path)
    assert gm.get_parameter("lm_head.weight") is gm.get_parameter("transformer.wte.weight")
    reference = lora_fx.inject_lora(tiny_gpt2(), ["c_attn"], rank=4, example_inputs=token_ids(2, 7))
    with torch.no_grad():
        assert_close(gm(**token_ids(2, 7)).logits, reference(**token_ids(2, 7)).logits, what="logits at init")


def _still_meta(gm):
    return all(p.is_meta for n, p in gm.named_parameters() if "lora_" not in n)


def test_a_checkpoint_of_another_model_is_refused_before_anything_is_read(tmp_path, checkpoint):
    tiny_llama(hidden_size=48).save_pretrained(tmp_path / "other")
    gm = injected(meta_llama())
    with pytest.raises(lora_fx.CheckpointError, match=r"model.embed_tokens.weight in .* has shape \(64, 48\), this "
                                                      r"model's model.embed_tokens.weight \(64, 32\)"):
        lora_fx.load_base(gm, tmp_path / "other")
    assert _still_meta(gm)
    with pytest.raises(lora_fx.CheckpointError, match="no checkpoint at"):
        lora_fx.load_base(gm, tmp_path / "nothing")
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in checkpoint.iterdir():
        if f.name != "model-00002-of-00005.safetensors" and f.suffix in (".json", ".safetensors"):
            (partial / f.name).write_bytes(f.read_bytes())
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (partial / shard).unlink(missing_ok=True)
    with pytest.raises(lora_fx.CheckpointError, match=rf"{shard} is missing"):
        lora_fx.load_base(gm, partial)
    renamed = tmp_path / "renamed.safetensors"
    from safetensors.torch import save_file

    save_file({f"base.{k}": v.contiguous() for k, v in tiny_llama().state_dict().items()}, renamed)
    with pytest.raises(lora_fx.CheckpointError, match=r"model.embed_tokens.weight \(\(64, 32\)\) is not in the "
                                                      r"checkpoint .*nearest names: \['base.model.embed_tokens"):
        lora_fx.load_base(gm, renamed)
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(lora_fx.CheckpointError, match="garbage.safetensors is not a readable safetensors file"):
        lora_fx.load_base(gm, tmp_path / "garbage.safetensors")
    save_file({k: v.contiguous() for k, v in tiny_llama().state_dict().items()}, tmp_path / "whole.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:-100])
    with pytest.raises(lora_fx.CheckpointError, match="cut.safetensors ends before its tensors do"):
        lora_fx.load_base(gm, tmp_path / "cut.safetensors")
    assert _still_meta(gm)
    lora_fx.load_base(gm, checkpoint)  # the refusals changed nothing: the right checkpoint still loads
    with pytest.raises(lora_fx.CheckpointError, match="nothing to load"):
        lora_fx.load_base(gm, checkpoint)


def test_inits_computed_from_the_base_are_refused_on_meta():
    for kw, what in ((dict(init="pissa"), "init='pissa'"), (dict(use_dora=True), "DoRA's magnitude")):
        with pytest.raises(lora_fx.ConfigError, match=rf"on the meta device .*{what} is computed from the base"):
            lora_fx.inject_lora(meta_llama(), ["q_proj"], rank=4, example_inputs=token_ids(2, 7), **kw)


def _train(gm, opt, scheduler, steps=STEPS):
    ids = token_ids(4, 7)["input_ids"]
    for _ in range(steps):
        gm(input_ids=ids).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()


def _loaded(checkpoint, **kw):
    gm = injected(meta_llama(), **kw)
    lora_fx.load_base(gm, checkpoint)
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    return gm, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def _lora(gm):
    return {k: v.detach().clone() for k, v in lora_fx.lora_parameters(gm).items()}


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, checkpoint):
    gm, opt, scheduler = _loaded(checkpoint)
    _train(gm, opt, scheduler)
    lora_fx.save_checkpoint(tmp_path / "step3", gm, opt, scheduler=scheduler, step=STEPS)
    drawn = torch.rand(3)  # the random state as saved
    _train(gm, opt, scheduler)
    uninterrupted = _lora(gm)

    gm, opt, scheduler = _loaded(checkpoint)
    torch.manual_seed(999)
    assert lora_fx.load_checkpoint(tmp_path / "step3", gm, opt, scheduler=scheduler) == STEPS
    assert torch.equal(torch.rand(3), drawn)
    assert scheduler.last_epoch == STEPS and opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)
    _train(gm, opt, scheduler)
    resumed = _lora(gm)
    assert max((resumed[k] - v).abs().max().item() for k, v in uninterrupted.items()) <= 1e-6
    start = _lora(_loaded(checkpoint)[0])
    assert max((uninterrupted[k] - v).abs().max().item() for k, v in start.items()) > 1e-3  # training moved them
    saved = dcp.FileSystemReader(str(tmp_path / "step3")).read_metadata().state_dict_metadata
    weights = {k for k in saved if k.startswith("lora.")}
    assert weights == {f"lora.{k}" for k in uninterrupted}  # LoRA only: no base weight is ever written


def test_resume_refuses_another_adapter_config_and_an_unfinished_save(tmp_path, checkpoint):
    gm, opt, scheduler = _loaded(checkpoint)
    lora_fx.save_checkpoint(tmp_path / "run", gm, opt, scheduler=scheduler, step=1)
    other, other_opt, _ = _loaded(checkpoint, rank_pattern={"v_proj": 8})
    before = _lora(other)
    with pytest.raises(lora_fx.CheckpointError, match=r"rank of model.layers.0.self_attn.v_proj.weight is 4 in the "
                                                      r"checkpoint, 8 in this graph"):
        lora_fx.load_checkpoint(tmp_path / "run", other, other_opt)
    fewer = lora_fx.inject_lora(meta_llama(), ["q_proj"], rank=4, example_inputs=token_ids(2, 7))
    with pytest.raises(lora_fx.CheckpointError, match=r"adapts model.layers.0.self_attn.v_proj.weight, which this "
                                                      r"graph does not \(other targets\)"):
        lora_fx.load_checkpoint(tmp_path / "run", fewer, torch.optim.AdamW(fewer.parameters()))
    (tmp_path / "run" / "lora_fx_checkpoint.json").unlink()  # as a save killed before its end leaves it
    with pytest.raises(lora_fx.CheckpointError, match="not a whole lora-fx training checkpoint"):
        lora_fx.load_checkpoint(tmp_path / "run", gm, opt)
    assert all(torch.equal(before[k], v) for k, v in _lora(other).items())
