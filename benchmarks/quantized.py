"""LoRA on a quantized base, measured on SmolLM2-135M-Instruct (issue 15): base memory per format, step
time against PEFT on the same quantized base (one interleaved run), held-out perplexity after the same
training, what requantizing keeps of each adapter, and the ONNX deployments (size, ONNX Runtime latency
and perplexity) of the quantized unfolded export against the float folded export.

    python benchmarks/quantized.py [--steps 60] [--formats float32 bfloat16 int8 intx nf4]
    python benchmarks/quantized.py --memory-only     # peak RSS, one fresh process per format

Formats: float32, bfloat16 (the whole model cast), int8 (torchao int8 weight-only, per row), intx
(torchao int4 weight-only, groups of 32) and nf4 (torchao NF4, blocks of 64, scalers in blocks of 256 or the largest power of 2 that divides): the linear layers of the
decoder layers are quantized; the tied embedding / lm_head stays float32 (a third of the model).
Training: LoRA r=8 on q_proj + v_proj, the same short run as examples/smollm2_lora.py (60 steps x 8
movie-review sentences, lr 1e-3), every format (and PEFT's) stepping in turn, so machine noise hits
all alike. Writes results/quantized.{md,json}; about 25 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import export  # noqa: E402
import lora_fx  # noqa: E402
from common import RESULTS, PeakRSS, in_subprocess, markdown, rss_bytes  # noqa: E402
from smollm2_lora import add_run_args, encode, lm_loss, load, perplexity  # noqa: E402
from sentiment_data import movie_reviews, split  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def quantize(model: nn.Module, fmt: str) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    layers = model.model.layers
    if fmt == "bfloat16":
        return model.to(torch.bfloat16)
    if fmt == "int8":
        quantize_(layers, Int8WeightOnlyConfig())
    elif fmt == "intx":
        quantize_(layers, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    elif fmt == "nf4":
        for module in layers.modules():
            if isinstance(module, nn.Linear):
                blocks = module.weight.numel() // 64  # QLoRA's 64-value blocks; scalers in 256s where they divide
                scaler = next(n for n in (256, 128, 64, 32, 16, 8) if blocks % n == 0)
                module.weight = nn.Parameter(to_nf4(module.weight.detach(), 64, scaler), requires_grad=False)
    return model


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor holds: its inner tensors for a subclass."""
    if lora_fx.quantized.is_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def base_bytes(model: nn.Module) -> tuple[int, int]:
    """(all parameters, the decoder layers' linear weights) in bytes, each tensor once."""
    seen, total, linear = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = tensor_bytes(p.data if not lora_fx.quantized.is_subclass(p) else p)
        total += n
        if ".layers." in name and name.endswith("proj.weight"):
            linear += n
    return total, linear


def step_fn(model, tok, texts, args):
    """One training step on the next batch of `texts` (cycling), returning nothing."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    state = {"i": 0}

    def step():
        i = state["i"] % args.steps
        state["i"] += 1
        lm_loss(model, tok, texts[i * args.batch:(i + 1) * args.batch], args.max_length).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def smollm2_job(args):
    """The short fine-tune's pieces: (tokenizer, float model in eval mode, train texts, held-out texts,
    example inputs for the capture)."""
    tok, float_model = load()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    float_model.eval()
    train_rows, test_rows = split(movie_reviews(), args.steps * args.batch, args.held_out)
    train_texts, test_texts = [t for t, _ in train_rows], [t for t, _ in test_rows]
    example, _ = encode(tok, train_texts[:2], args.max_length)
    return tok, float_model, train_texts, test_texts, example


def logits_of(model):
    return lambda inputs: model(**inputs).logits


def training_rounds(steps: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each case's training step: every case steps once per round, in a new order
    each round (machine noise hits all alike); round 0 is warm-up, not timed."""
    times = {name: [] for name in steps}
    order = list(steps)
    rng = random.Random(0)
    for r in range(rounds + 1):
        rng.shuffle(order)
        for name in order:
            t = time.perf_counter()
            steps[name]()
            if r:
                times[name].append(time.perf_counter() - t)
        if r % 10 == 0:
            print(f"round {r}/{rounds}", flush=True)
    return {name: statistics.median(v) for name, v in times.items()}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok, float_model, train_texts, test_texts, example = smollm2_job(args)

    bases, graphs, rows = {}, {}, {}
    for fmt in args.formats:
        base = quantize(copy.deepcopy(float_model), fmt).eval()
        bases[fmt] = base
        total, linear = base_bytes(base)
        torch.manual_seed(0)
        graphs[fmt] = lora_fx.inject_lora(base, TARGETS, rank=8, alpha=16, init="kaiming", example_inputs=example)
        rows[fmt] = {"format": fmt, "base_mb": total / 2**20, "linear_mb": linear / 2**20,
                     "before": perplexity(logits_of(graphs[fmt]), tok, test_texts, args.max_length, desc=f"{fmt} before")}
        print(f"{fmt}: base {total / 2**20:.1f} MB (layers' linear weights {linear / 2**20:.1f} MB), "
              f"perplexity before {rows[fmt]['before']:.2f}", flush=True)

    steps = {fmt: step_fn(graphs[fmt].train(), tok, train_texts, args) for fmt in args.formats}
    peft_models = {}
    if not args.no_peft:
        from peft import LoraConfig, get_peft_model

        for fmt in args.formats:
            torch.manual_seed(0)
            config = LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16)
            peft_models[fmt] = get_peft_model(quantize(copy.deepcopy(float_model), fmt), config).train()
            steps[f"peft {fmt}"] = step_fn(peft_models[fmt], tok, train_texts, args)
    times = training_rounds(steps, args.steps)
    for fmt in args.formats:
        gm = graphs[fmt].eval()
        row = rows[fmt]
        row["step_ms"] = 1000 * times[fmt]
        if fmt in peft_models:
            row["peft_step_ms"] = 1000 * times[f"peft {fmt}"]
            row["vs_peft"] = row["step_ms"] / row["peft_step_ms"]
            peft_models[fmt].eval()
            row["peft_after"] = perplexity(logits_of(peft_models[fmt]), tok, test_texts, args.max_length,
                                           desc=f"peft {fmt} after")
        row["after"] = perplexity(logits_of(gm), tok, test_texts, args.max_length, desc=f"{fmt} after")
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    # what requantizing keeps of each adapter, on a held-out probe batch
    probe, _ = encode(tok, test_texts[:16], args.max_length)
    fold_rows = []
    for fmt in args.formats:
        if fmt in ("float32", "bfloat16"):
            continue
        losses = lora_fx.requantize_loss(graphs[fmt], probe=probe)
        folded = lora_fx.merge_lora(graphs[fmt], quantized="requantize", max_loss=None)
        exact = lora_fx.merge_lora(graphs[fmt], quantized="dequantize")
        fold_rows.append({
            "format": fmt,
            "kept_mean": statistics.mean(r.kept for r in losses),
            "kept_min": min(r.kept for r in losses),
            "kept_max": max(r.kept for r in losses),
            "subspace_error_mean": statistics.mean(r.subspace_error for r in losses),
            "subspace_error_max": max(r.subspace_error for r in losses),
            "output_error_mean": statistics.mean(r.output_error for r in losses),
            "output_error_max": max(r.output_error for r in losses),
            "refused": sum(r.loss > lora_fx.MAX_REQUANTIZE_LOSS for r in losses),
            "weights": len(losses),
            "ppl_requantized": perplexity(logits_of(folded), tok, test_texts, args.max_length, desc=f"{fmt} requantized"),
            "ppl_dequantized": perplexity(logits_of(exact), tok, test_texts, args.max_length, desc=f"{fmt} dequantized"),
        })
        print(fold_rows[-1], flush=True)

    onnx_rows = onnx_deployments(graphs, tok, test_texts, args) if not args.no_onnx else []
    return {"rows": list(rows.values()), "fold": fold_rows, "onnx": onnx_rows, "args": vars(args)}


def onnx_deployments(graphs, tok, texts, args) -> list[dict]:
    """Each format's deployment: unfolded LoRA beside the int8 / int4 base (its integers in the file),
    and the float folded export, as is and through ONNX Runtime's 4-bit MatMulNBits."""
    out = Path(tempfile.mkdtemp())
    files = {}
    for fmt in ("int8", "intx"):
        if fmt in graphs:
            files[f"{fmt} base + unfolded LoRA"] = export.export_onnx(graphs[fmt], out / f"{fmt}.onnx")
    if "float32" in graphs:
        folded = lora_fx.merge_lora(graphs["float32"])
        files["float32 folded"] = export.export_onnx(folded, out / "float.onnx", optimize=True)
        export.quantize_onnx(files["float32 folded"], out / "float_int4.onnx", bits=4, block_size=32)
        files["float32 folded -> MatMulNBits 4-bit"] = out / "float_int4.onnx"
    batch, _ = encode(tok, texts[:8], args.max_length)
    rows = []
    sessions = {name: export.ort_session(path, device="cpu") for name, path in files.items()}
    times = {name: [] for name in files}
    for _ in range(args.latency_rounds):  # interleaved
        for name, session in sessions.items():
            t = time.perf_counter()
            export.ort_run(session, batch)
            times[name].append(time.perf_counter() - t)
    for name, path in files.items():
        size = sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*"))
        session = sessions[name]
        ppl = perplexity(lambda inputs, s=session: export.ort_run(s, inputs)[0], tok, texts, args.max_length, desc=name)
        rows.append({"export": name, "size_mb": size / 2**20, "latency_ms": 1000 * statistics.median(times[name]),
                     "ort_perplexity": ppl})
        print(rows[-1], flush=True)
    return rows


def saved_bytes(step) -> int:
    """Bytes autograd keeps for backward in one step: each saved tensor's storage once, parameters'
    own storages left out (they are held anyway)."""
    seen: dict[int, int] = {}

    def pack(t):
        if lora_fx.quantized.is_subclass(t):
            names, _ = t.__tensor_flatten__()
            inner = [getattr(t, n) for n in names if getattr(t, n) is not None]
        else:
            inner = [t]
        for x in inner:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def peak_memory(fmt: str, args) -> dict:
    """In this (fresh) process: resident memory above the level after imports while loading the
    model, quantizing it, injecting LoRA (or PEFT's, or full fine-tuning) and training; the rise over
    warm steps (after a first step has faulted the weights in and made the optimizer's state), the
    bytes saved for backward per step, and the warm step time."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    after_imports = rss_bytes()
    with PeakRSS() as setup:
        tok, model = load()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        base = quantize(model.eval(), fmt)
        texts = [t for t, _ in split(movie_reviews(), 64 * args.batch, args.held_out)[0]]
        enc = tok([t + tok.eos_token for t in texts], padding="max_length", truncation=True,
                  max_length=args.rss_length, return_tensors="pt")
        batches = [{k: v[i:i + args.batch] for k, v in enc.items()} for i in range(0, len(texts), args.batch)]
        if args.rss_mode == "peft":
            from peft import LoraConfig, get_peft_model

            gm = get_peft_model(base, LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16)).train()
        elif args.rss_mode == "full":
            gm = base.train()
            gm.requires_grad_(True)
        else:
            gm = lora_fx.inject_lora(base, TARGETS, rank=8, alpha=16, init="kaiming",
                                     example_inputs=dict(batches[0])).train()
        held = rss_bytes()
    # "as-is": lora-fx's graph run as it is, without the training runner (lora_fx.recompute): what
    # the recompute saves; the batches have the captured inputs, so the graph itself runs them
    run = (lambda **kw: torch.fx.GraphModule.__call__(gm, **kw)) if args.rss_mode == "as-is" else gm
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    state = {"i": 0}

    def step():
        inputs = batches[state["i"] % len(batches)]
        state["i"] += 1
        logits = run(**inputs).logits[:, :-1]
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)[:, 1:]
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                          ignore_index=-100).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with PeakRSS() as first:
        step()
    times = []
    with PeakRSS() as warm:
        for _ in range(args.rss_steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    saved = saved_bytes(step)
    mb = 2 ** 20
    return {"base": fmt, "run": {"lora-fx": "lora-fx", "peft": "PEFT", "full": "full fine-tuning",
                                 "as-is": "lora-fx without recompute"}[args.rss_mode],
            "peak_mb": (max(setup.peak, first.peak, warm.peak) - after_imports) / mb,
            "setup_peak_mb": (setup.peak - after_imports) / mb, "held_after_setup_mb": (held - after_imports) / mb,
            "warm_rise_mb": (warm.peak - warm.start) / mb, "saved_mb": saved / mb,
            "step_ms": 1000 * statistics.median(times)}


def write_memory(rows: list[dict], text: str) -> None:
    here = Path(__file__).resolve().parent / "results"
    (here / "quantized_memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    (here / "quantized_memory.md").write_text(text)


def memory_table(rows: list[dict], args) -> str:
    """Per (base, run): the mean of the runs (and their spread), ratios to lora-fx float32 and to PEFT."""
    keys = ("peak_mb", "setup_peak_mb", "held_after_setup_mb", "warm_rise_mb", "saved_mb", "step_ms")
    cases = {}
    for r in rows:
        cases.setdefault((r["base"], r["run"]), []).append(r)
    mean = {c: {k: statistics.mean(r[k] for r in rs) for k in keys} for c, rs in cases.items()}
    out = []
    for (base, run), m in mean.items():
        spread = max(max(r["peak_mb"] for r in cases[(base, run)]) - min(r["peak_mb"] for r in cases[(base, run)]), 0)
        peft = mean.get((base, "PEFT"))
        f32 = mean.get(("float32", run))
        as_is, full = mean.get((base, "lora-fx without recompute")), mean.get(("float32", "full fine-tuning"))
        out.append({"base": base, "run": run, **{k: f"{m[k]:.0f}" for k in keys},
                    "peak spread": f"{spread:.0f}",
                    "peak / float32": f"{m['peak_mb'] / f32['peak_mb']:.2f}" if f32 else "",
                    "peak / PEFT": f"{m['peak_mb'] / peft['peak_mb']:.2f}" if peft and run == "lora-fx" else "",
                    "step / PEFT": f"{m['step_ms'] / peft['step_ms']:.2f}" if peft and run == "lora-fx" else "",
                    "step / without recompute": f"{m['step_ms'] / as_is['step_ms']:.2f}" if as_is and run == "lora-fx" else "",
                    "peak / full fine-tuning": f"{m['peak_mb'] / full['peak_mb']:.2f}" if full and run != "full fine-tuning" else ""})
    head = (f"SmolLM2-135M-Instruct, LoRA r=8 on q_proj + v_proj (full fine-tuning: every weight), AdamW, batch "
            f"{args.batch} x {args.rss_length} tokens, {args.threads} threads; one fresh process per case, the cases "
            f"interleaved, {args.rss_runs} runs (MB above the process after imports; means of the runs):\n"
            "peak = the whole run's peak (load + quantize + inject + training); setup = during load, quantize and "
            "inject; held = resident after them; warm rise = the peak over warm steps above their start (a first step "
            "has faulted in the weights and made the optimizer's state); saved = bytes kept for backward per step.\n\n")
    return head + markdown(out, [("base", "base"), ("run", "run"), ("peak MB", "peak_mb"), ("spread", "peak spread"),
                                 ("setup peak MB", "setup_peak_mb"), ("held MB", "held_after_setup_mb"),
                                 ("warm rise MB", "warm_rise_mb"), ("saved MB", "saved_mb"), ("step ms", "step_ms"),
                                 ("peak / float32", "peak / float32"), ("peak / PEFT", "peak / PEFT"),
                                 ("step / PEFT", "step / PEFT"), ("step / without recompute", "step / without recompute"),
                                 ("peak / full FT", "peak / full fine-tuning")]) + "\n"


def table(s: dict) -> str:
    a = s["args"]
    f32 = next((r for r in s["rows"] if r["format"] == "float32"), None)
    for r in s["rows"]:
        if f32:
            r["base_vs_f32"] = r["base_mb"] / f32["base_mb"]
            r["linear_vs_f32"] = r["linear_mb"] / f32["linear_mb"]
            r["ppl_vs_f32"] = r["after"] / f32["after"]
    fmt = lambda rows: [{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]  # noqa: E731
    lines = [f"SmolLM2-135M-Instruct, LoRA r=8 on q_proj + v_proj, {a['steps']} steps x {a['batch']} movie-review sentences "
             f"(max {a['max_length']} tokens), {a['threads']} threads; held-out perplexity on {a['held_out']} sentences.", "",
             markdown(fmt(s["rows"]), [("base", "format"), ("base MB", "base_mb"), ("/ fp32", "base_vs_f32"),
                                       ("layers' linear MB", "linear_mb"), ("/ fp32", "linear_vs_f32"),
                                       ("step ms", "step_ms"), ("PEFT step ms", "peft_step_ms"), ("/ PEFT", "vs_peft"),
                                       ("ppl before", "before"), ("ppl after", "after"), ("/ fp32 LoRA", "ppl_vs_f32"),
                                       ("PEFT ppl after", "peft_after")])]
    if s["fold"]:
        lines += ["", "Requantizing W0 + scaling·B·A in the base's format (probe: 16 held-out sentences):", "",
                  markdown(fmt(s["fold"]), [("base", "format"), ("share of ΔW kept (mean)", "kept_mean"),
                                            ("min", "kept_min"), ("max", "kept_max"),
                                            ("error in ΔW's subspace (mean)", "subspace_error_mean"),
                                            ("max", "subspace_error_max"),
                                            ("output error / ΔW·x (mean)", "output_error_mean"),
                                            ("max", "output_error_max"), ("refused (max_loss 0.5)", "refused"),
                                            ("weights", "weights"), ("ppl requantized", "ppl_requantized"),
                                            ("ppl dequantized (exact)", "ppl_dequantized")])]
    if s["onnx"]:
        lines += ["", "ONNX deployments (ONNX Runtime CPU, 8 sentences per run):", "",
                  markdown(fmt(s["onnx"]), [("export", "export"), ("file MB", "size_mb"), ("latency ms", "latency_ms"),
                                            ("ORT perplexity", "ort_perplexity")])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=["float32", "bfloat16", "int8", "intx", "nf4"])
    add_run_args(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-rounds", type=int, default=10)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "quantized"))
    ap.add_argument("--rss", metavar="FORMAT", help="only: peak RSS of one format in this process (prints JSON)")
    ap.add_argument("--rss-steps", type=int, default=3, help="warm steps measured")
    ap.add_argument("--rss-length", type=int, default=64, help="tokens per sentence (padded)")
    ap.add_argument("--rss-runs", type=int, default=2, help="interleaved runs of every case")
    ap.add_argument("--rss-mode", choices=("lora-fx", "peft", "full", "as-is"), default="lora-fx",
                    help="with --rss: lora-fx's LoRA, PEFT's, full fine-tuning, or lora-fx's graph run as it is "
                         "(no recompute of quantized weights in backward)")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-RSS table, one process per format")
    args = ap.parse_args(argv)
    if args.rss:
        print(json.dumps(peak_memory(args.rss, args)))
        return
    if args.memory_only:
        cases = [(fmt, mode) for fmt in args.formats for mode in ("lora-fx", "peft")] + [("float32", "full")]
        cases += [(fmt, "as-is") for fmt in args.formats if fmt in ("int8", "nf4")]
        rows = []
        for run_no in range(args.rss_runs):
            for fmt, mode in cases:
                rows.append(in_subprocess("quantized", "--rss", fmt, "--rss-mode", mode, "--threads", str(args.threads),
                                          "--rss-steps", str(args.rss_steps), "--rss-length", str(args.rss_length),
                                          "--batch", str(args.batch), timeout=1800))
                print(rows[-1], flush=True)
        text = memory_table(rows, args)
        write_memory(rows, text)
        print(text)
        return
    summary = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "results.md").write_text(table(summary))
    print(table(summary))


if __name__ == "__main__":
    main()
