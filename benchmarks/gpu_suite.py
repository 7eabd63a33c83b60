"""GPU benchmark suite (one NVIDIA GPU; sized for under 6 minutes on an H200).

    python benchmarks/gpu_suite.py            # Llama-shaped ~1B (hidden 2048, 16 layers), bf16 autocast, 8 x 512
    python benchmarks/gpu_suite.py --tiny     # a dry run on CPU at toy size

Training: tokens/s and peak memory of lora-fx, PEFT and full fine-tuning (AdamW), eager and under
torch.compile (the injected graph with fullgraph=True); inference latency at (1, 1), (1, 128), (8, 512)
of the untouched, unfolded and folded model; ONNX Runtime CUDA folded vs untouched. Prints JSON lines
and writes results/benchmarks_gpu.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "v_proj"]


def emit(rows, **kw):
    rows.append(kw)
    print(json.dumps(kw), flush=True)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup=3, runs=10):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-generate", action="store_true")
    args = ap.parse_args(argv)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_fx

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: list[dict] = []
    emit(rows, step="env", torch=torch.__version__, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    if device != "cuda" and not args.tiny:
        emit(rows, step="abort", reason="no CUDA device; --tiny runs a CPU dry run")
        return 2
    size = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000)
    batch, seq, steps = 8, 512, 5
    if args.tiny:
        size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=256)
        batch, seq, steps = 2, 32, 2
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**size)).to(device)
    emit(rows, step="model", params=sum(p.numel() for p in base.parameters()))
    ids = torch.randint(0, size["vocab_size"], (batch, seq), device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def make(kind):
        model = copy.deepcopy(base).train()
        if kind == "lorafx":
            net = lora_fx.inject_lora(model, TARGETS, rank=16, alpha=32, example_inputs={"input_ids": ids[:2, :16]})
            net.train()
        elif kind == "peft":
            net = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        else:
            net = model
        return net

    for compiled in ([False] if args.no_compile else [False, True]):
        for kind in ("lorafx", "peft", "full"):
            net = make(kind)
            opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
            run = torch.compile(net, fullgraph=(kind == "lorafx")) if compiled else net

            def step():
                with autocast:
                    loss = loss_of(run(input_ids=ids).logits)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            step()  # includes compilation
            first = time.perf_counter() - t
            sec = timed(step, device, warmup=1, runs=steps)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            emit(rows, step="train", case=kind, compiled=compiled, tokens_per_s=batch * seq / sec, step_ms=1e3 * sec,
                 first_step_s=first, peak_gib=peak)
            net = opt = run = None  # free this case before the next
            if device == "cuda":
                torch.cuda.empty_cache()

    model = copy.deepcopy(base).eval()
    gm = lora_fx.inject_lora(model, TARGETS, rank=16, alpha=32, example_inputs={"input_ids": ids[:2, :16]}).eval()
    with torch.no_grad():
        for p in lora_fx.lora_parameters(gm, lora_fx.LORA_B).values():
            p.normal_(std=0.01)
    folded = lora_fx.merge_lora(gm).eval()
    shapes = [(1, 1), (1, 128), (batch, seq)] if not args.tiny else [(1, 1), (1, 8), (batch, seq)]
    for b, s in shapes:
        x = torch.randint(0, size["vocab_size"], (b, s), device=device)
        with torch.no_grad(), autocast:
            lat = {name: timed(lambda m=m: m(input_ids=x), device) for name, m in
                   (("untouched", model), ("lorafx_unfolded", gm), ("lorafx_folded", folded), ("untouched_again", model))}
        emit(rows, step="infer", shape=[b, s], **{k: 1e3 * v for k, v in lat.items()},
             folded_over_untouched=lat["lorafx_folded"] / statistics.mean([lat["untouched"], lat["untouched_again"]]))

    if not args.no_onnx:
        import export

        out = ROOT / "results" / "gpu_onnx"
        out.mkdir(parents=True, exist_ok=True)
        cpu_model, cpu_folded = copy.deepcopy(model).cpu(), lora_fx.merge_lora(gm)  # export from CPU copies
        example = {"input_ids": ids[:2, :16].cpu()}
        paths = {"untouched": export.export_onnx(cpu_model, out / "untouched.onnx", example)}
        paths["folded"] = export.export_onnx(cpu_folded.cpu(), out / "folded.onnx")
        sessions = {k: export.ort_session(p) for k, p in paths.items()}
        x = {"input_ids": ids}
        lat = {k: timed(lambda s=s: export.ort_run(s, x), device) for k, s in sessions.items()}
        emit(rows, step="onnx", provider=sessions["folded"].provider, untouched_ms=1e3 * lat["untouched"],
             folded_ms=1e3 * lat["folded"], ratio=lat["folded"] / lat["untouched"])
    if not args.no_generate:
        generation(rows, model, gm, size, device, args.tiny)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / ("benchmarks_gpu_tiny.json" if args.tiny else "benchmarks_gpu.json")).write_text(json.dumps(rows, indent=1))
    return 0


def generation(rows, model, gm, size, device, tiny: bool) -> None:
    """Tokens/s of generate: HF on the untouched model, gm.generate (unfolded LoRA, KV cache),
    merge_and_unload, and ONNX Runtime on the folded kv-cache export (CUDA EP, the cache kept on the
    device between steps); prompt 32, 64 new tokens, greedy, batch 1 and 8."""
    import export
    import lora_fx

    new = 8 if tiny else 64
    out = ROOT / "results" / "gpu_generate"
    out.mkdir(parents=True, exist_ok=True)
    merged = lora_fx.merge_and_unload(gm)
    path = export.export_onnx(lora_fx.merge_lora(gm), out / "model.onnx", kv_cache=True)
    session = export.ort_session(path)
    for b in (1, 8):
        ids = torch.randint(0, size["vocab_size"], (b, 32), device=device)
        hf = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            cases = {
                "hf_untouched": lambda: model.generate(input_ids=ids, **hf),
                "lorafx_gm_generate": lambda: gm.generate(ids, new, eos_token_id=None),
                "merge_and_unload": lambda: merged.generate(input_ids=ids, **hf),
                "ort_folded_kv": lambda: export.generate(session, ids, new),
            }
            sec = {k: timed(fn, device, warmup=1, runs=3) for k, fn in cases.items()}
        emit(rows, step="generate", batch=b, new_tokens=new, provider=session.provider,
             **{f"{k}_tok_s": b * new / v for k, v in sec.items()})


if __name__ == "__main__":
    sys.exit(main())
