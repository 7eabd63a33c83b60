"""Memory of per-layer FSDP2 on the injected model (issue 16), gloo on CPU: a Llama shape of about 300M
parameters, LoRA r=8 on q/v, trained one step by 1, 2 and 4 processes; activation checkpointing at a long
sequence; step time of per-layer sharding vs the flat graph sharded at its root, in one run.

    python benchmarks/fsdp_memory.py [--procs 1 2 4] [--layers 16] [--hidden 1024] [--ckpt-seq 1024]

Per rank, after the model is injected, the user's model deleted, the tree from `lora_fx.unflatten`
sharded (embeddings, each layer, the output layer, then the root; 1 process: the flat graph, unsharded)
and one AdamW step taken:
- params at rest: bytes of every parameter and buffer the rank holds (the tree's, the graph's and its capture's
  copy of the model; a shard's local piece), each storage once;
- params peak: the most parameter bytes seen at any module call in the step (forward, and backward through
  hooks on layer outputs): the shards plus the layers gathered then. FSDP2's prefetch of the next layer is
  not visible to a module before it runs, so up to one layer more may be held;
- RSS after the step, and the step's peak RSS (VmHWM, reset just before the step, after handing the memory
  glibc keeps free back with malloc_trim): all the process holds (Python and torch themselves, about
  400 MB, activations, gloo buffers).
The target (issue 16): params peak <= (model / N + 2 layers + LoRA) * 1.1, and peak RSS falling with N.

    python benchmarks/fsdp_memory.py --meta [--procs 1 2 4]      (issue 24, about 10 min)

The start on the meta device against today's build-then-shard, both per-layer FSDP2 from the same
sharded safetensors checkpoint of the model (written once; today's path builds the model and
discards the checkpoint's values: a random init costs what loading does), each run a fresh set of
processes: peak RSS per rank from process start to the end of the first step (VmHWM, never reset),
RSS at rest after loading (trimmed), load time, checkpoint save and resume time; the runtime's own
baseline is the RSS after importing torch, transformers and lora_fx. Target: peak <= model / N +
2 layers + LoRA + 10% + baseline. Also capture + inject time and RSS on meta for 7B and 70B Llama
configs (no weights at all).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_fx  # noqa: E402
from common import markdown  # noqa: E402

MB = 2 ** 20
RESULTS = Path(__file__).resolve().parent / "results"


def _config(args) -> LlamaConfig:
    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=16, num_key_value_heads=16, vocab_size=args.vocab,
                       tie_word_embeddings=False, attn_implementation="eager")


def _injected(args, seq: int):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(args))
    ids = torch.randint(0, args.vocab, (1, seq))
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16, example_inputs={"input_ids": ids})
    sizes = {"model": sum(p.numel() * p.element_size() for p in model.parameters()),
             "layer": sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()),
             "lora": sum(p.numel() * p.element_size() for p in lora_fx.lora_parameters(gm).values())}
    return gm, ids, sizes  # the caller's reference to the model ends here


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def _trim() -> None:
    """Hand memory the allocator keeps free back to the system (glibc keeps freed weights of a few MB
    in its heap, so RSS would not fall when the whole weights are freed; they would be reused)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _storage_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors`, each once (a shard: its local piece)."""
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if lora_fx.is_shard(t) else t
        if t.device.type == "meta":  # the weightless copy of the model a released capture keeps
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _param_bytes(modules) -> int:
    """Bytes of the parameters and buffers the modules reach now."""
    return _storage_bytes(t for m in modules for t in (*m.parameters(), *m.buffers()))


class PeakParams:
    """The most parameter bytes seen at any module call, forward and backward (see the docstring)."""

    def __init__(self, root, shards):
        self.root, self.shards, self.peak = root, shards, 0

    def sample(self, *_):  # the shards FSDP2 keeps while a module holds its gathered weights, and those
        self.peak = max(self.peak, _storage_bytes((*self.shards, *self.root.parameters(), *self.root.buffers())))

    def attach(self, module) -> None:
        def on_output(mod, args, kwargs, out):
            self.sample()
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda grad: self.sample())
        for m in module.modules():
            m.register_forward_pre_hook(self.sample)
            m.register_forward_hook(on_output, with_kwargs=True)


def _shard(tree) -> None:
    """The torchtitan recipe: embeddings, each layer, the output layer, then the root."""
    fully_shard(tree.model.embed_tokens)
    for layer in tree.model.layers.children():
        fully_shard(layer)
    fully_shard(tree.lm_head)
    fully_shard(tree)


def _step(module, gm, ids) -> None:
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-4)
    module(input_ids=ids).logits.float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _meta_rank(rank: int, world: int, rendezvous: str, mode: str, args, out: str) -> None:
    """One rank of the meta start ("meta") or of today's build-then-shard ("build"), per-layer FSDP2."""
    torch.set_num_threads(max(1, args.threads // world))
    baseline = _status("VmRSS")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    try:
        config = _config(args)
        ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
        t = time.perf_counter()
        if mode == "meta":
            with torch.device("meta"):
                model = LlamaForCausalLM(config)
        else:
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        torch.manual_seed(1)
        gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16, example_inputs={"input_ids": ids})
        del model
        tree = lora_fx.unflatten(gm)
        _shard(tree)
        inject_s = time.perf_counter() - t
        _trim()
        sharded = _status("VmRSS")
        t = time.perf_counter()
        read = lora_fx.load_base(gm, args.checkpoint_dir).bytes_read if mode == "meta" else 0
        load_s = time.perf_counter() - t
        _trim()
        rest, before_step = _status("VmRSS"), _status("VmHWM")
        opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-4)
        tree(input_ids=ids).logits.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        peak = _status("VmHWM")  # since the process started: build, capture, load and the first step
        t = time.perf_counter()
        lora_fx.save_checkpoint(f"{args.checkpoint_dir}.train.{mode}.{world}", gm, opt, module=tree, step=1)
        save_s = time.perf_counter() - t
        t = time.perf_counter()
        lora_fx.load_checkpoint(f"{args.checkpoint_dir}.train.{mode}.{world}", gm, opt, module=tree)
        resume_s = time.perf_counter() - t
        layer = sum(p.numel() * p.element_size() for n, p in gm.named_parameters() if n.startswith("model.layers.0.")
                    and "lora_" not in n)
        whole = sum(p.numel() * p.element_size() for n, p in gm.named_parameters() if "lora_" not in n)
        lora = sum(p.numel() * p.element_size() for p in lora_fx.lora_parameters(gm).values())
        row = {"mode": mode, "procs": world, "rank": rank, "baseline_mb": baseline / MB, "peak_mb": peak / MB,
               "rest_mb": rest / MB, "sharded_mb": sharded / MB,
               "peak_before_step_mb": before_step / MB, "read_mb": read / MB, "inject_s": inject_s, "load_s": load_s, "save_s": save_s,
               "resume_s": resume_s, "model_mb": whole / MB, "layer_mb": layer / MB, "lora_mb": lora / MB}
        Path(f"{out}.{rank}.json").write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def _meta_config_rank(_: int, name: str, config: dict, out: str) -> None:
    """Capture + inject of a Llama config built on the meta device: time and RSS, no weights."""
    before = _status("VmRSS")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    params = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=16, alpha=32,
                             example_inputs={"input_ids": torch.zeros(1, 128, dtype=torch.long)})
    Path(out).write_text(json.dumps({"config": name, "params_b": params / 1e9, "capture_inject_s": time.perf_counter() - t,
                                     "rss_rise_mb": (_status("VmRSS") - before) / MB, "peak_rss_mb": _status("VmHWM") / MB,
                                     "lora_mb": sum(p.numel() * p.element_size()
                                                    for p in lora_fx.lora_parameters(gm).values()) / MB}))


META_CONFIGS = {
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
}


def meta_start(args) -> None:
    """Issue 24's table: meta start vs build-then-shard per rank, and capture on meta for 7B / 70B."""
    with tempfile.TemporaryDirectory() as tmp:
        args.checkpoint_dir = f"{tmp}/base"
        torch.manual_seed(0)
        LlamaForCausalLM(_config(args)).save_pretrained(args.checkpoint_dir, max_shard_size="200MB")
        gc.collect()
        rows = []
        for world in args.procs:
            for mode in ("meta", "build"):
                out = f"{tmp}/row-{mode}-{world}"
                mp.start_processes(_meta_rank, args=(world, f"{tmp}/rdv-{mode}-{world}", mode, args, out),
                                   nprocs=world, start_method="spawn")
                rows += [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]
                print(rows[-1], flush=True)
        configs = []
        for name, config in META_CONFIGS.items():
            mp.start_processes(_meta_config_rank, args=(name, config, f"{tmp}/{name}.json"), nprocs=1,
                               start_method="spawn")
            configs.append(json.loads(Path(f"{tmp}/{name}.json").read_text()))
            print(configs[-1], flush=True)
    s = rows[0]
    lines = [f"# Start on meta vs build-then-shard, per-layer FSDP2 (issue 24), CPU, gloo, {args.threads} cores "
             "shared by all ranks", "",
             f"Llama: hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, vocab {args.vocab} "
             f"(untied), {s['model_mb']:.0f} MB fp32 (one layer {s['layer_mb']:.1f} MB); LoRA r=8 on q/v "
             f"({s['lora_mb']:.1f} MB); a sharded safetensors checkpoint (200 MB files); batch 1 x {args.seq}; "
             "one AdamW step. Every run a fresh set of processes; peak = VmHWM from process start to the end of "
             "the first step; baseline = RSS after imports.", ""]
    table = []
    for world, mode in dict.fromkeys((r["procs"], r["mode"]) for r in rows):
        mine = [r for r in rows if r["procs"] == world and r["mode"] == mode]
        worst = max(mine, key=lambda r: r["peak_mb"])
        target = (s["model_mb"] / world + 2 * s["layer_mb"] + s["lora_mb"]) * 1.1 + worst["baseline_mb"]
        table.append({"processes": world, "start": "meta + load_base" if mode == "meta" else "build, then shard",
                      "peak RSS / rank (MB)": f"{worst['peak_mb']:.0f}", "target (MB)": f"{target:.0f}",
                      "met": "yes" if worst["peak_mb"] <= target else "no",
                      "peak before the step (MB)": f"{max(r['peak_before_step_mb'] for r in mine):.0f}",
                      "RSS after inject + shard (MB)": f"{max(r['sharded_mb'] for r in mine):.0f}",
                      "RSS at rest after loading (MB)": f"{max(r['rest_mb'] for r in mine):.0f}",
                      "baseline (MB)": f"{worst['baseline_mb']:.0f}",
                      "read / rank (MB)": f"{max(r['read_mb'] for r in mine):.0f}" if mode == "meta" else "-",
                      "capture + inject + shard (s)": f"{max(r['inject_s'] for r in mine):.1f}",
                      "load (s)": f"{max(r['load_s'] for r in mine):.2f}" if mode == "meta" else "-",
                      "checkpoint save / resume (s)": f"{max(r['save_s'] for r in mine):.2f} / "
                                                      f"{max(r['resume_s'] for r in mine):.2f}"})
    lines += _table(table) + ["", "## Capture + inject on the meta device (no weights), q/v r=16", ""]
    lines += _table([{"config": c["config"], "parameters": f"{c['params_b']:.1f}B",
                      "capture + inject (s)": f"{c['capture_inject_s']:.1f}", "RSS rise (MB)": f"{c['rss_rise_mb']:.0f}",
                      "peak RSS (MB)": f"{c['peak_rss_mb']:.0f}", "LoRA (MB)": f"{c['lora_mb']:.0f}"} for c in configs])
    (RESULTS / "fsdp_meta.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "fsdp_meta.json").write_text(json.dumps({"rows": rows, "configs": configs}, indent=1))
    print("\n".join(lines))


def _rank(rank: int, world: int, rendezvous: str, mode: str, args, out: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    grouped = mode != "plain"
    if grouped:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    try:
        gm, ids, sizes = _injected(args, args.seq)
        gc.collect()
        if mode == "layers":
            module = lora_fx.unflatten(gm)
            _shard(module)
        elif mode == "root":
            module = fully_shard(gm)
            gm.release_source()  # else the capture keeps the model, and with it the whole weights
        else:
            module = gm
        gc.collect()
        shards = [p for p in module.parameters() if lora_fx.is_shard(p)]
        peak = PeakParams(module, shards)
        peak.attach(module)
        timings = []
        for i in range(1 + args.timed_steps):
            gc.collect()
            if i == 0:
                _trim()
                _reset_peak_rss()
            t = time.perf_counter()
            _step(module, gm, ids)
            timings.append(time.perf_counter() - t)
            if i == 0:
                step_peak = _status("VmHWM")
                _trim()
                first = {"params_rest_mb": _param_bytes([module, gm, gm.capture_info.source]) / MB, "params_peak_mb": peak.peak / MB,
                         "rss_after_mb": _status("VmRSS") / MB, "rss_peak_mb": step_peak / MB}
        row = {"mode": mode, "procs": world, "rank": rank, **first, **{k + "_mb": v / MB for k, v in sizes.items()},
               "step_s": timings[1:] or timings}
        Path(f"{out}.{rank}.json").write_text(json.dumps(row))
    finally:
        if grouped:
            dist.destroy_process_group()


def run(mode: str, world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/row"
        # fresh processes for every run, the single one included: nothing left over from another
        mp.start_processes(_rank, args=(world, f"{tmp}/rendezvous", mode, args, out), nprocs=world,
                           start_method="spawn")
        return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


def _checkpointing_rank(_: int, wrapped: bool, args, out: str) -> None:
    torch.set_num_threads(args.threads)
    gm, ids, _ = _injected(args, args.ckpt_seq)
    tree = lora_fx.unflatten(gm)
    if wrapped:
        for name, layer in list(tree.model.layers.named_children()):
            tree.model.layers.register_module(name, checkpoint_wrapper(layer))
    _trim()
    before = _status("VmRSS")
    _reset_peak_rss()
    t = time.perf_counter()
    _step(tree, gm, ids)
    Path(out).write_text(json.dumps({"checkpointing": wrapped, "seq": args.ckpt_seq, "step_s": time.perf_counter() - t,
                                     "activation_peak_mb": (_status("VmHWM") - before) / MB}))


def checkpointing(args) -> list[dict]:
    """Peak RSS of one training step at a long sequence, the tree with and without checkpoint_wrapper per
    layer, each in a fresh process (memory a process freed is not always returned to the system): the
    step's growth over the RSS before it is activations (LoRA's grads and AdamW state are a few MB)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, wrapped in enumerate((False, True, False, True)):  # interleaved: the second pair shows the noise
            mp.start_processes(_checkpointing_rank, args=(wrapped, args, f"{tmp}/{i}.json"), nprocs=1,
                               start_method="spawn")
            rows.append(json.loads(Path(f"{tmp}/{i}.json").read_text()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--ckpt-seq", type=int, default=1024, help="0: no checkpointing run")
    ap.add_argument("--ckpt-layers", type=int, help="layers for the checkpointing run (default: --layers)")
    ap.add_argument("--timed-steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="per-layer vs root-only at 2 processes, alternated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="fsdp_memory")
    ap.add_argument("--meta", action="store_true", help="issue 24: start on meta vs build-then-shard (fsdp_meta.md)")
    args = ap.parse_args(argv)
    if args.meta:
        return meta_start(args)

    rows = []
    for world in args.procs:
        for mode in ("plain", "layers") if world == 1 else ("layers",):  # 1 process: also FSDP2's own cost
            rows += run(mode, world, args)
            print(rows[-1], flush=True)
    speed = []
    for _ in range(args.rounds):
        for mode in ("layers", "root"):
            speed += run(mode, 2, args)
            print(speed[-1], flush=True)
    args.ckpt_layers = args.ckpt_layers or args.layers
    ckpt = checkpointing(argparse.Namespace(**{**vars(args), "layers": args.ckpt_layers})) if args.ckpt_seq else []
    print(ckpt, flush=True)
    _report(rows, speed, ckpt, args)


def _table(rows: list[dict]) -> list[str]:
    return [markdown(rows, [(k, k) for k in rows[0]])]


def _report(rows, speed, ckpt, args) -> None:
    s = rows[0]
    model, layer, lora = s["model_mb"], s["layer_mb"], s["lora_mb"]
    lines = [f"# Per-layer FSDP2 memory (issue 16), CPU, gloo, {args.threads} cores shared by all ranks", "",
             f"Llama: hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, vocab {args.vocab} "
             f"(untied), {model / 4:.0f}M parameters ({model:.0f} MB fp32, one layer {layer:.1f} MB); LoRA r=8 "
             f"on q/v ({lora:.1f} MB); batch 1 x {args.seq} tokens per rank; one AdamW step.", "",
             "Sharding none: the flat graph, one process. Per layer: `lora_fx.unflatten`, the user's model deleted, "
             "`fully_shard` on the embeddings, each layer, the output layer, then the root (at 1 process: what "
             "FSDP2 itself costs).", ""]
    table = []
    for world, mode in dict.fromkeys((r["procs"], r["mode"]) for r in rows):
        mine = [r for r in rows if r["procs"] == world and r["mode"] == mode]
        target = (model / world + 2 * layer + lora) * 1.1
        worst = max(mine, key=lambda r: r["params_peak_mb"])
        table.append({"processes": world, "sharding": "none" if mode == "plain" else "per layer",
                      "params at rest / rank (MB)": f"{max(r['params_rest_mb'] for r in mine):.0f}",
                      "params peak / rank (MB)": f"{worst['params_peak_mb']:.0f}",
                      "target (MB)": f"{target:.0f}" if mode == "layers" else "-",
                      "met": ("yes" if worst["params_peak_mb"] <= target else "no") if mode == "layers" else "-",
                      "RSS after the step, trimmed / rank (MB)": f"{max(r['rss_after_mb'] for r in mine):.0f}",
                      "peak RSS in step / rank (MB)": f"{max(r['rss_peak_mb'] for r in mine):.0f}"})
    lines += _table(table) + [""]
    per = {m: [t for r in speed if r["mode"] == m for t in r["step_s"]] for m in ("layers", "root")}
    lines += ["## Step time at 2 processes, per-layer vs the flat graph sharded at its root (alternated runs)", ""]
    lines += [] if not speed else _table([{"sharding": m, "step times (s, every rank and round)": ", ".join(f"{t:.2f}" for t in ts),
                        "median (s)": f"{sorted(ts)[len(ts) // 2]:.2f}",
                        "params peak / rank (MB)": f"{max(r['params_peak_mb'] for r in speed if r['mode'] == m):.0f}"}
                       for m, ts in per.items()]) + [""]
    lines += [f"## Activation checkpointing per layer, seq {args.ckpt_seq}, {args.ckpt_layers} layers, one process", ""]
    lines += [] if not ckpt else _table([{"checkpoint_wrapper": r["checkpointing"], "step (s)": f"{r['step_s']:.1f}",
                        "peak RSS growth in the step (MB)": f"{r['activation_peak_mb']:.0f}"} for r in ckpt]) + [""]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines))
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"rows": rows, "speed": speed, "checkpointing": ckpt},
                                                          indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
