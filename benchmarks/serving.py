"""Serving many adapters: one ONNX Runtime session + N adapters against one folded session per adapter.

    python benchmarks/serving.py [--gpu]

Switching cost per request, memory of one session + N adapters vs N folded sessions (N = 1, 4, 16;
fresh processes), and mixed-batch throughput against running each adapter's rows as its own batch.
CPU sizes by default (a few minutes); --gpu uses a bigger model and CUDA (run where there is one).
Writes results/serving.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, PeakRSS, interleaved  # noqa: E402

SIZES = {"cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=4000),
         "gpu": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=32000)}


def prepare(d: Path, n: int, size: dict) -> dict:
    """A model, n adapters (random, rank 8 on q/v), the multi-adapter export, n .onnx_adapter files and
    n folded exports."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import export
    import lora_fx

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**size)).eval()
    ids = {"input_ids": torch.randint(0, size["vocab_size"], (2, 16))}
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16, adapter="a0", example_inputs=ids)
    for i in range(1, n):
        lora_fx.add_adapter(gm, f"a{i}", rank=8, alpha=16)
    for i in range(n):
        lora_fx.set_adapter(gm, f"a{i}")
        with torch.no_grad():
            for p in lora_fx.lora_parameters(gm, lora_fx.LORA_B).values():
                p.normal_(std=0.02)
    multi = export.export_multi_adapter(gm, d / "multi.onnx")
    paths = {"multi": str(multi), "adapters": [], "folded": []}
    for i in range(n):
        paths["adapters"].append(str(export.export_adapter(gm, d / f"a{i}.onnx_adapter", multi, name=f"a{i}")))
        paths["folded"].append(str(export.export_onnx(lora_fx.merge_lora(gm, adapters=f"a{i}"), d / f"a{i}.onnx")))
    paths["gm"] = gm
    return paths


def memory(kind: str, n: int, paths_file: str, device: str) -> dict:
    """RSS of one session + n adapters, or of n folded sessions, in this (fresh) process."""
    import export

    paths = json.loads(Path(paths_file).read_text())
    x = {"input_ids": torch.randint(0, 100, (1, 32))}
    with PeakRSS() as mem:
        if kind == "server":
            server = export.AdapterServer(paths["multi"], device)
            for i in range(n):
                server.load(f"a{i}", paths["adapters"][i])
            for i in range(n):
                server.run(x, adapter=f"a{i}")
        else:
            sessions = [export.ort_session(p, device) for p in paths["folded"][:n]]
            for s in sessions:
                export.ort_run(s, x)
    return {"kind": kind, "n": n, "rss_mb": (mem.peak - mem.start) / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--memory", nargs=4, metavar=("KIND", "N", "PATHS", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory:
        kind, n, paths_file, device = args.memory
        print(json.dumps(memory(kind, int(n), paths_file, device)))
        return 0
    import export
    import lora_fx

    torch.set_num_threads(2)
    device = "cuda" if args.gpu else "cpu"
    size = SIZES["gpu" if args.gpu else "cpu"]
    d = Path(tempfile.mkdtemp(prefix="lorafx-serving-"))
    t = time.perf_counter()
    paths = prepare(d, 16, size)
    gm = paths.pop("gm")
    (d / "paths.json").write_text(json.dumps(paths))
    results = {"config": size, "device": device, "prepare_s": time.perf_counter() - t}
    x = {"input_ids": torch.randint(0, size["vocab_size"], (1, 32))}
    if device == "cuda":
        x = {k: v.cuda() for k, v in x.items()}

    # switching: a request on adapter i of 4, round robin, vs building that adapter's folded session
    server = export.AdapterServer(paths["multi"], device)
    for i in range(4):
        server.load(f"a{i}", paths["adapters"][i])
    counter = {"i": 0}

    def switched():
        counter["i"] += 1
        server.run(x, adapter=f"a{counter['i'] % 4}")

    def cold():
        counter["i"] += 1
        export.ort_run(export.ort_session(paths["folded"][counter["i"] % 4], device), x)

    folded = export.ort_session(paths["folded"][0], device)
    lat = interleaved({"server_switching": switched, "same_adapter_folded_session": lambda: export.ort_run(folded, x),
                       "new_folded_session_per_request": cold}, rounds=5, per_round=4)
    results["latency_ms"] = {k: 1e3 * v for k, v in lat.items()}

    # memory, fresh processes
    mem = []
    for n in (1, 4, 16):
        for kind in ("server", "folded"):
            r = subprocess.run([sys.executable, __file__, "--memory", kind, str(n), str(d / "paths.json"), device],
                               capture_output=True, text=True, cwd=ROOT, timeout=600)
            if r.returncode:
                raise RuntimeError(r.stderr[-2000:])
            mem.append(json.loads(r.stdout.strip().splitlines()[-1]))
    results["memory"] = mem

    # mixed batches: 16 rows over 4 adapters in one forward, vs one batch per adapter
    names = [f"a{i}" for i in range(4)]
    mixed = lora_fx.mixed_adapters(gm, names)
    rows = torch.randint(0, size["vocab_size"], (16, 32))
    index = torch.arange(16) % 4
    mixed_path = export.export_onnx(mixed, d / "mixed.onnx")
    mixed_session = export.ort_session(mixed_path, device)
    groups = [(names[k], rows[index == k]) for k in range(4)]
    to = (lambda t: t.cuda()) if device == "cuda" else (lambda t: t)
    thr = interleaved({
        "ort_mixed_one_batch": lambda: export.ort_run(mixed_session, {"input_ids": to(rows), "adapter_index": to(index)}),
        "ort_batch_per_adapter": lambda: [server.run({"input_ids": to(r)}, adapter=n) for n, r in groups],
    }, rounds=5, per_round=3)
    with torch.no_grad():
        def per_adapter_torch():
            for n, r in groups:
                lora_fx.set_adapter(gm, n)
                gm(input_ids=r)
        thr.update(interleaved({
            "torch_mixed_one_batch": lambda: mixed(input_ids=rows, adapter_index=index),
            "torch_batch_per_adapter": per_adapter_torch,
        }, rounds=5, per_round=3))
    results["mixed_ms"] = {k: 1e3 * v for k, v in thr.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"serving_{device}.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (RESULTS / f"serving_{device}.md").write_text(text + "\n")
    print(text)
    return 0


def report(r: dict) -> str:
    lat, mixed = r["latency_ms"], r["mixed_ms"]
    c = r["config"]
    lines = [f"Serving on {r['device']}: Llama-shaped hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
             f"LoRA r=8 on q/v; requests of 1 x 32 tokens", "",
             "| per request | ms | / same-adapter folded session |", "|---|---|---|"]
    for k, label in (("server_switching", "one session, adapter switched every request (4 adapters)"),
                     ("same_adapter_folded_session", "a folded session for that adapter, already open"),
                     ("new_folded_session_per_request", "building the adapter's folded session per request")):
        lines.append(f"| {label} | {lat[k]:.2f} | {lat[k] / lat['same_adapter_folded_session']:.2f} |")
    lines += ["", "| adapters N | one session + N adapters (MB) | N folded sessions (MB) | ratio |", "|---|---|---|---|"]
    by = {(m["kind"], m["n"]): m["rss_mb"] for m in r["memory"]}
    for n in (1, 4, 16):
        lines.append(f"| {n} | {by[('server', n)]:.1f} | {by[('folded', n)]:.1f} | {by[('folded', n)] / max(by[('server', n)], 1e-9):.1f}x |")
    lines += ["", "| 16 rows over 4 adapters | ms | mixed / per-adapter |", "|---|---|---|"]
    for eng in ("ort", "torch"):
        one, per = mixed[f"{eng}_mixed_one_batch"], mixed[f"{eng}_batch_per_adapter"]
        lines.append(f"| {eng}: one mixed batch / one batch per adapter | {one:.1f} / {per:.1f} | {one / per:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
