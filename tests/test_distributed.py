"""Training the injected graph with PyTorch's own distributed engines (gloo on CPU) and with
transformers.Trainer. Each rank captures the model itself: the graph does not depend on the rank."""
from __future__ import annotations

import datetime
import gc
import time
import traceback
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

import lora_fx
from helpers import assert_close, tiny_llama

STEPS, GLOBAL_BATCH = 3, 4


def _batch():
    return torch.randint(0, 64, (GLOBAL_BATCH, 7), generator=torch.Generator().manual_seed(0))


def _injected():
    torch.manual_seed(0)
    return lora_fx.inject_lora(tiny_llama(), ["q_proj", "v_proj"], rank=4, example_inputs={"input_ids": _batch()[:2]})


def _train(module, gm, ids, steps=STEPS):
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        module(input_ids=ids).logits.square().mean().backward()  # a mean: ranks' halves average to the whole
        opt.step()
        opt.zero_grad()


def _lora(gm) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in lora_fx.lora_parameters(gm).items():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards into DTensors
        out[name] = p.detach().clone().contiguous()
    return out


ENGINES = ["ddp", "fsdp2", "fsdp2-layers", "fsdp2-layers-bf16", "fsdp2-layers-offload"]


def _worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    """Every engine in turn, in one pair of processes (starting them costs more than a run); an
    engine's failure is written to <out>/<engine>.error.<rank> for its test to show."""
    torch.set_num_threads(1)
    # a file the test owns, not a TCP port: nothing to race another process for
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for engine in ENGINES:
            try:
                _run_engine(rank, world, engine, f"{out}/{engine}.safetensors")
            except Exception:
                with open(f"{out}/{engine}.error.{rank}", "w") as f:
                    f.write(traceback.format_exc())
            dist.barrier()
        try:
            _run_from_meta(rank, world, out)
        except Exception:
            with open(f"{out}/meta.error.{rank}", "w") as f:
                f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def _run_engine(rank: int, world: int, engine: str, out: str) -> None:
    gm = _injected()
    local = _batch().chunk(world)[rank]
    whole = [weakref.ref(p.untyped_storage()) for p in gm.parameters() if not p.requires_grad]
    if engine == "ddp":
        module = torch.nn.parallel.DistributedDataParallel(gm)
    elif engine.startswith("fsdp2-layers"):  # the standard recipe, on the module tree lora_fx.unflatten gives
        bf16 = engine.endswith("bf16")
        module = lora_fx.unflatten(gm, compute_dtype=torch.bfloat16 if bf16 else None)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if bf16 else MixedPrecisionPolicy()
        # on a GPU the offload keeps the frozen shards in host memory; here it runs the same copies
        offload = CPUOffloadPolicy(pin_memory=False) if engine.endswith("offload") else OffloadPolicy()
        for layer in module.model.layers.children():
            fully_shard(layer, mp_policy=policy, offload_policy=offload)
        fully_shard(module, mp_policy=policy, offload_policy=offload)
        for w in (module.model.layers.get_submodule("0.self_attn.q_proj").weight,
                  gm.get_submodule("model.layers.0.self_attn.q_proj").weight):  # the flat graph sees the shards
            assert w.to_local().shape[0] == w.shape[0] // world  # each rank holds its share of each layer
    else:
        # the root only: the captured graph is flat (no submodule forward runs), so per-layer
        # groups would never be gathered
        module = fully_shard(gm)
        gm.release_source()  # the capture lets go of the model: nothing else holds the whole weights
    if engine != "ddp":
        gc.collect()
        assert not [r for r in whole if r() is not None]  # nothing holds the whole base weights' memory any more
    _train(module, gm, local)
    if engine.startswith("fsdp2-layers"):  # every rank calls it; LoRA's shards are gathered, rank 0 writes
        lora_fx.save_adapter(gm, out + ".adapter")
    if engine == "fsdp2-layers":  # what needs whole weights says so
        with pytest.raises(lora_fx.FoldError, match="sharded across ranks"):
            lora_fx.merge_lora(gm)
        with pytest.raises(lora_fx.TargetError, match="call that tree"):
            gm(input_ids=local)
    weights = _lora(gm)
    if rank == 0:
        save_file(weights, out)
    dist.barrier()
    # the engine's state goes before its process group: freed afterwards, DDP's reducer could block
    # on a group that no longer exists (seen: a rank hung at exit)
    del module, gm
    gc.collect()


def _meta_injected():
    """_injected's graph, from a model built on the meta device: no weights yet, the same LoRA."""
    with torch.device("meta"):
        model = tiny_llama()
    tiny_llama()  # _injected's random stream: its LoRA draws come after the model's init
    return lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=4, example_inputs={"input_ids": _batch()[:2]})


def _sharded_from_meta(base: str):
    """The meta start: inject on meta, the tree, per-layer FSDP2, then each rank reads its shards."""
    gm = _meta_injected()
    tree = lora_fx.unflatten(gm)
    for layer in tree.model.layers.children():
        fully_shard(layer)
    fully_shard(tree)
    return gm, tree


def _steps(module, gm, opt, ids, steps=STEPS):
    for _ in range(steps):
        module(input_ids=ids).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()


def _run_from_meta(rank: int, world: int, out: str) -> None:
    """Start on meta and load each rank's shards; train 3 steps, checkpoint, 3 more; resume the
    checkpoint in a fresh start and train the same 3 again. Also: a rank given a bad checkpoint."""
    base, local = f"{out}/base", _batch().chunk(world)[rank]
    gm, tree = _sharded_from_meta(base)
    try:  # rank 1 was given a checkpoint that is not there: every rank must say so, none may train
        lora_fx.load_base(gm, base if rank == 0 else f"{out}/no-such-checkpoint")
        message = "no error"
    except lora_fx.CheckpointError as e:
        message = str(e)
    with open(f"{out}/meta-refused.{rank}", "w") as f:
        f.write(message)
    gm, tree = _sharded_from_meta(base)
    report = lora_fx.load_base(gm, base)
    with open(f"{out}/meta-read.{rank}", "w") as f:
        f.write(str(report.bytes_read))
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    _steps(tree, gm, opt, local)
    lora_fx.save_checkpoint(f"{out}/train3", gm, opt, module=tree, step=STEPS)
    after = {"meta3": _lora(gm)}
    _steps(tree, gm, opt, local)
    after["meta6"] = _lora(gm)
    del gm, tree, opt
    gm, tree = _sharded_from_meta(base)
    lora_fx.load_base(gm, base)
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    assert lora_fx.load_checkpoint(f"{out}/train3", gm, opt, module=tree) == STEPS
    _steps(tree, gm, opt, local)
    after["resumed6"] = _lora(gm)
    if rank == 0:
        for name, weights in after.items():
            save_file(weights, f"{out}/{name}.safetensors")
    dist.barrier()


def _flat_layers_worker(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=1)
    try:
        gm = _injected()
        fully_shard(gm.get_submodule("model.layers.0"))  # a layer of the flat graph: its forward never runs
        try:
            gm(input_ids=_batch())
            message = "no error"
        except lora_fx.TargetError as e:
            message = str(e)
        with open(out, "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_sharding_a_layer_of_the_flat_graph_says_so(tmp_path):
    out = tmp_path / "message.txt"
    _spawn(_flat_layers_worker, (str(tmp_path / "rendezvous"), str(out)), nprocs=1, deadline_s=120)
    assert "this graph is flat" in out.read_text() and "lora_fx.unflatten(gm)" in out.read_text()


def _mismatch_worker(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        targets = ["q_proj", "v_proj"] if rank == 0 else ["q_proj"]  # rank 1 was started with other targets
        gm = lora_fx.inject_lora(tiny_llama(), targets, rank=4, example_inputs={"input_ids": _batch()[:2]})
        messages = []
        for sharding in ("per layer", "at the root"):
            try:
                if sharding == "per layer":
                    lora_fx.unflatten(gm)
                else:  # the flat graph sharded at its root compares graphs at its first call
                    fully_shard(gm)
                    gm(input_ids=_batch()[:2])
                messages.append("no error")
            except lora_fx.TargetError as e:
                messages.append(str(e))
        with open(f"{out}.{rank}", "w") as f:
            f.write("\n".join(messages))
    finally:
        dist.destroy_process_group()


def test_a_rank_with_another_graph_is_an_error_not_a_hang(tmp_path):
    out = str(tmp_path / "message")
    _spawn(_mismatch_worker, (str(tmp_path / "rendezvous"), out), nprocs=2, deadline_s=120)
    for rank in (0, 1):
        messages = open(f"{out}.{rank}").read().splitlines()
        assert len(messages) == 2 and all("ranks [1] hold another graph than rank 0" in m for m in messages)


def _spawn(fn, args, nprocs: int, deadline_s: float) -> None:
    """mp.spawn with a deadline: a stuck rank fails the test instead of hanging CI."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    while not context.join(timeout=5):
        if time.monotonic() > end:
            for p in context.processes:
                p.kill()
            pytest.fail(f"distributed workers still running after {deadline_s} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The directory every engine's 2-rank run wrote into (one spawn for all)."""
    out = tmp_path_factory.mktemp("ranks")
    tiny_llama().save_pretrained(out / "base", max_shard_size="20KB")  # sharded, with an index, as big models are
    _spawn(_worker, (2, str(out / "rendezvous"), str(out)), nprocs=2, deadline_s=300)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """(LoRA weights before training, after training one process on the global batch, its saved adapter)."""
    gm = _injected()
    start = _lora(gm)
    _train(gm, gm, _batch())
    saved = tmp_path_factory.mktemp("single")
    lora_fx.save_adapter(gm, saved)
    return start, _lora(gm), saved


@pytest.mark.slow
@pytest.mark.xdist_group("two-ranks")  # one worker runs them all: the spawn (a module fixture) happens once
@pytest.mark.parametrize("engine", ENGINES)
def test_two_ranks_equal_one_process_on_the_global_batch(engine, runs, single):
    errors = sorted(runs.glob(f"{engine}.error.*"))
    assert not errors, errors[0].read_text()
    out = str(runs / f"{engine}.safetensors")
    start, reference, saved = single
    distributed = load_file(out)
    assert reference.keys() == distributed.keys() and reference
    assert max((v - start[k]).abs().max().item() for k, v in reference.items()) > 1e-3  # training moved them
    for k, v in reference.items():
        if engine.endswith("bf16"):  # layers compute in bfloat16: the same training direction, not the same bits
            ours, theirs = (distributed[k] - start[k]).flatten(), (v - start[k]).flatten()
            cosine = float(ours @ theirs / (ours.norm() * theirs.norm()))
            assert cosine > 0.8, (k, cosine)
            continue
        assert_close(distributed[k], v, ulps=1000, what=k)
    if engine.startswith("fsdp2-layers"):  # the adapter saved from the sharded model is the single process's file
        sharded = load_file(out + ".adapter/adapter_model.safetensors")
        one = load_file(saved / "adapter_model.safetensors")
        assert sharded.keys() == one.keys()
        if not engine.endswith("bf16"):
            for k in one:
                assert_close(sharded[k], one[k], ulps=1000, what=k)
        assert (saved / "adapter_config.json").read_text() == \
            (runs / f"{engine}.safetensors.adapter" / "adapter_config.json").read_text()


@pytest.mark.slow
@pytest.mark.xdist_group("two-ranks")
def test_two_ranks_start_on_meta_read_their_shards_and_train_as_one_process(runs, single):
    errors = sorted(runs.glob("meta.error.*"))
    assert not errors, errors[0].read_text()
    _, reference, _ = single
    distributed = load_file(runs / "meta3.safetensors")
    assert distributed.keys() == reference.keys()
    for k, v in reference.items():  # LoRA weights are O(1): 100 ulps of them is about the atol 1e-5
        assert_close(distributed[k], v, ulps=100, what=k)
    whole = sum(t.numel() * t.element_size() for t in tiny_llama().parameters())
    for rank in (0, 1):  # each rank read about half of the base (its rows of every weight), never all of it
        assert 0.4 * whole < int((runs / f"meta-read.{rank}").read_text()) < 0.6 * whole


@pytest.mark.slow
@pytest.mark.xdist_group("two-ranks")
def test_a_rank_given_a_bad_checkpoint_stops_every_rank(runs):
    messages = [(runs / f"meta-refused.{rank}").read_text() for rank in (0, 1)]
    assert all("no checkpoint at" in m and "no-such-checkpoint" in m for m in messages), messages
    assert messages[0].startswith("rank 1: ")  # rank 0's own checkpoint was fine: it names the rank that failed


@pytest.mark.slow
@pytest.mark.xdist_group("two-ranks")
def test_a_sharded_run_resumes_on_two_ranks_and_on_one_process(runs):
    assert not sorted(runs.glob("meta.error.*"))
    uninterrupted = load_file(runs / "meta6.safetensors")
    resumed = load_file(runs / "resumed6.safetensors")
    assert max((resumed[k] - v).abs().max().item() for k, v in uninterrupted.items()) <= 1e-6
    gm = _meta_injected()  # one process, no FSDP: the checkpoint of two ranks' shards reshards on load
    lora_fx.load_base(gm, runs / "base")
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    assert lora_fx.load_checkpoint(runs / "train3", gm, opt) == STEPS
    _steps(gm, gm, opt, _batch())
    one = _lora(gm)
    assert max((one[k] - v).abs().max().item() for k, v in uninterrupted.items()) <= 1e-6
    assert max((one[k] - v).abs().max().item() for k, v in load_file(runs / "meta3.safetensors").items()) > 1e-4


def test_trains_inside_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    gm = _injected()
    ids = torch.randint(0, 64, (16, 7), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    before = gm(input_ids=ids, labels=ids).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8, learning_rate=5e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=5, disable_tqdm=True)
    Trainer(model=gm, args=args, train_dataset=data).train()
    gm.eval()
    with torch.no_grad():
        after = gm(input_ids=ids, labels=ids).loss.item()
    assert after < before - 0.05, (before, after)
    lora = lora_fx.lora_parameters(gm)
    assert all(not p.requires_grad for n, p in gm.named_parameters() if n not in lora)
