"""GPU check: a Llama-shaped model (~270M parameters) exported untouched and folded, run on ONNX Runtime
CUDA, checked against torch on the GPU, and timed (median of 50 after warm-up).

    python -m export.gpu_check            # on a machine with an NVIDIA GPU and onnxruntime-gpu
    python -m export.gpu_check --tiny     # a seconds-long dry run on CPU

Prints one JSON object per line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import lora_fx

from .onnx_export import export_onnx
from .onnx_diff import onnx_diff
from .runtime import ort_run, ort_session


def emit(**kw):
    print(json.dumps(kw), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small model, CPU allowed (a dry run)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", default=None, help="folder for the .onnx files (default: a temp folder)")
    args = ap.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM  # optional dependency (the `hf` extra)

    cuda = torch.cuda.is_available()
    emit(step="env", torch=torch.__version__, cuda=cuda, ort=ort.__version__, ort_file=ort.__file__,
         providers=ort.get_available_providers(), gpu=torch.cuda.get_device_name() if cuda else None)
    if not cuda and not args.tiny:
        emit(step="abort", reason="no CUDA device; run with --tiny for a CPU dry run")
        return 2
    size = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=8, vocab_size=32000)
    if args.tiny:
        size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**size)).eval()
    emit(step="model", params=sum(p.numel() for p in model.parameters()))
    batch, seq = (8, 256) if not args.tiny else (2, 16)
    ids = torch.randint(0, size["vocab_size"], (batch, seq))
    example = {"input_ids": ids[:2, :16].clone(), "attention_mask": torch.ones(2, 16, dtype=torch.long)}

    t = time.perf_counter()
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=16, alpha=32, example_inputs=example)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(gm, lora_fx.LORA_B).values():
            p.normal_(std=0.02)  # as if trained
    folded = lora_fx.merge_lora(gm)
    emit(step="inject+fold", seconds=round(time.perf_counter() - t, 2))

    out = Path(args.out or tempfile.mkdtemp(prefix="lorafx-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    base_path = export_onnx(model, out / "base.onnx", example)
    folded_path = export_onnx(folded, out / "folded.onnx")
    diff = onnx_diff(base_path, folded_path)
    emit(step="export", seconds=round(time.perf_counter() - t, 1), same_structure=diff.same_structure,
         same_names=diff.same_names, changed=len(diff.changed_initializers))

    device = "cuda" if cuda else "cpu"
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}
    sessions = {}
    for name, path in (("base", base_path), ("folded", folded_path)):
        sessions[name] = ort_session(path, "cuda" if cuda else "cpu")
        emit(step="session", model=name, provider=sessions[name].provider)

    with torch.no_grad():
        ref = {"base": model.to(device)(**inputs).logits.float(), "folded": folded.to(device)(**inputs).logits.float()}
    for name, sess in sessions.items():
        got = ort_run(sess, inputs)[0].float()
        emit(step="check", model=name, max_abs_vs_torch=(got - ref[name]).abs().max().item(),
             ref_max=ref[name].abs().max().item())

    def timed(sess):
        for _ in range(5):
            ort_run(sess, inputs)
        times = []
        for _ in range(args.runs):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            ort_run(sess, inputs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return times

    results = {name: [] for name in sessions}
    for _ in range(3):  # interleaved rounds: drift hits both alike
        for name, sess in sessions.items():
            results[name] += timed(sess)
    med = {k: statistics.median(v) * 1e3 for k, v in results.items()}
    emit(step="latency", batch=batch, seq=seq, base_ms=round(med["base"], 3), folded_ms=round(med["folded"], 3),
         folded_over_base=round(med["folded"] / med["base"], 4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
