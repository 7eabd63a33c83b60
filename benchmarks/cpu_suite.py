"""CPU benchmark suite: lora-fx against PEFT, full fine-tuning and the frozen floor, in one run.

    python benchmarks/cpu_suite.py [--quick]

Llama-shaped, hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000, random weights; LoRA r=8,
alpha 16 on q_proj and v_proj; training batch 4 x 128, inference 1 x 128; 2 threads. Cases are timed
interleaved, round by round, after warm-up; medians. Memory figures come from fresh processes
(benchmarks/measure.py). Writes results/benchmarks_cpu.{json,md,png}.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, in_subprocess, interleaved  # noqa: E402
from measure import CPU_CONFIG, TARGETS, build, trainer  # noqa: E402


def training(rounds: int) -> dict:
    ids = torch.randint(0, CPU_CONFIG["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(1))
    base = build()
    steps = {kind: trainer(kind, copy.deepcopy(base), ids) for kind in ("lorafx", "peft", "full", "floor")}
    # the floor twice, as two cases: how far apart two identical cases land is the noise of this run
    steps["floor_again"] = trainer("floor", copy.deepcopy(base), ids)
    return interleaved(steps, rounds=rounds, per_round=2, warmup=2)


def random_lora(gm, peft_model):
    """The same random A and B in both, so unmerged outputs are comparable."""
    import lora_fx

    g = torch.Generator().manual_seed(2)
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, p in lora_fx.lora_parameters(gm).items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            peft_params["base_model.model." + name].copy_(p)


def inference(rounds: int) -> tuple[dict, float]:
    from peft import LoraConfig, get_peft_model

    import lora_fx

    ids = torch.randint(0, CPU_CONFIG["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(3))
    model = build().eval()
    captured = lora_fx.capture(model, {"input_ids": ids})
    gm = lora_fx.inject_lora(captured, TARGETS, rank=8, alpha=16).eval()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).eval()
    random_lora(gm, peft_model)
    folded = lora_fx.merge_lora(gm).eval()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    with torch.no_grad():
        err = (gm(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()
        cases = {
            "untouched": lambda: model(input_ids=ids),
            "untouched_again": lambda: model(input_ids=ids),  # the noise of this run
            "untouched_graph": lambda: captured(input_ids=ids),
            "lorafx_unfolded": lambda: gm(input_ids=ids),
            "peft_unmerged": lambda: peft_model(input_ids=ids),
            "lorafx_folded": lambda: folded(input_ids=ids),
            "peft_merged": lambda: merged(input_ids=ids),
        }
        return interleaved(cases, rounds=rounds, per_round=6, warmup=3), err


def fold_times(rounds: int) -> dict:
    from peft import LoraConfig, get_peft_model

    import lora_fx

    model = build().eval()
    ids = torch.randint(0, CPU_CONFIG["vocab_size"], (2, 16))
    gm = lora_fx.inject_lora(model, TARGETS, rank=8, alpha=16, example_inputs={"input_ids": ids})
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    random_lora(gm, peft_model)
    times = {"lorafx_fold": [], "peft_merge_and_unload": []}
    for _ in range(rounds):
        t = time.perf_counter()
        lora_fx.merge_lora(gm)
        times["lorafx_fold"].append(time.perf_counter() - t)
        fresh = copy.deepcopy(peft_model)
        t = time.perf_counter()
        fresh.merge_and_unload()
        times["peft_merge_and_unload"].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def onnx_runtime(rounds: int) -> dict:
    import export
    import lora_fx

    model = build().eval()
    ids = torch.randint(0, CPU_CONFIG["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(4))
    gm = lora_fx.inject_lora(model, TARGETS, rank=8, alpha=16, example_inputs={"input_ids": ids[:, :16]})
    with torch.no_grad():
        for p in lora_fx.lora_parameters(gm, lora_fx.LORA_B).values():
            p.normal_(std=0.02)
    folded = lora_fx.merge_lora(gm)
    d = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    base_path = export.export_onnx(model, d / "base.onnx", {"input_ids": ids[:, :16]})
    base_s = time.perf_counter() - t
    t = time.perf_counter()
    folded_path = export.export_onnx(folded, d / "folded.onnx")
    folded_s = time.perf_counter() - t
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    sessions = {k: export.ort_session(p, options=options) for k, p in (("ort_untouched", base_path), ("ort_folded", folded_path))}
    feeds = {"input_ids": ids.numpy()}
    lat = interleaved({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, rounds=rounds, per_round=10)
    same = export.onnx_diff(base_path, folded_path)
    return {**lat, "export_untouched_s": base_s, "export_folded_s": folded_s, "same_structure": same.same_structure,
            "same_names": same.same_names}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, inf, o = results["training_s"], results["inference_s"], results["onnx"]
    bars = {
        "train: lora-fx / PEFT": t["lorafx"] / t["peft"],
        "train: lora-fx / floor": t["lorafx"] / t["floor"],
        "train: PEFT / floor": t["peft"] / t["floor"],
        "train: lora-fx / full FT": t["lorafx"] / t["full"],
        "infer: lora-fx unfolded / untouched": inf["lorafx_unfolded"] / inf["untouched"],
        "infer: PEFT unmerged / untouched": inf["peft_unmerged"] / inf["untouched"],
        "infer: lora-fx folded / untouched": inf["lorafx_folded"] / inf["untouched"],
        "infer: folded / untouched graph": inf["lorafx_folded"] / inf["untouched_graph"],
        "ORT: folded / untouched": o["ort_folded"] / o["ort_untouched"],
    }
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(list(bars), list(bars.values()), color=["#4c72b0" if "lora-fx" in k or "folded" in k else "#999999" for k in bars])
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, v in enumerate(bars.values()):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time ratio (lower is faster)")
    ax.set_title(f"lora-fx CPU suite, {results['date']} ({results['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rounds = 2 if args.quick else 15
    started = time.perf_counter()
    results = {"date": datetime.date.today().isoformat(),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "config": CPU_CONFIG}
    print("training ...", flush=True)
    results["training_s"] = training(rounds)
    print("training memory (fresh processes) ...", flush=True)
    results["training_peak_rss_mb"] = {k: in_subprocess("measure", "train", k)["peak_rss_rise_mb"]
                                       for k in ("lorafx", "peft", "full", "floor")}
    print("inference ...", flush=True)
    results["inference_s"], results["lorafx_vs_peft_max_abs"] = inference(rounds)
    print("fold ...", flush=True)
    results["fold_s"] = fold_times(3 if args.quick else 7)
    print("capture + inject (fresh processes) ...", flush=True)
    results["inject"] = {k: in_subprocess("measure", "inject", k) for k in ("lorafx", "peft")}
    # the same at 4x the weights: a rise that does not grow with the model is no weight copy
    results["inject_x4"] = {k: in_subprocess("measure", "inject", k, "1024") for k in ("lorafx", "peft")}
    # ... and at 4x the layers: the rise is torch.export's working set, which grows with the graph
    results["inject_deep"] = {k: in_subprocess("measure", "inject", k, "512", "16") for k in ("lorafx", "peft")}
    print("7B on the meta device ...", flush=True)
    results["meta7b"] = in_subprocess("measure", "meta7b")
    print("ONNX ...", flush=True)
    results["onnx"] = onnx_runtime(rounds)
    results["wall_s"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "benchmarks_cpu.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (RESULTS / "benchmarks_cpu.md").write_text(text + "\n")
    plot(results, RESULTS / "benchmarks_cpu.png")
    print(text)
    return 0


def inject_row(label: str, pair: dict) -> str:
    """Peak RSS rise of capture + inject vs get_peft_model, and the new tensor bytes behind it."""
    def cell(x):
        new = f"; new tensors {x['new_tensor_mb']:.2f} MB, LoRA {x['lora_mb']:.2f} MB" if "new_tensor_mb" in x else ""
        return f"{x['peak_rss_rise_mb']:.1f} MB ({100 * x['rise_over_model']:.1f}%){new}"
    x = pair["lorafx"]
    size = f"{x.get('layers', 4)} layers x {x.get('hidden', 512)}, model {x['model_mb']:.0f} MB"
    return f"| peak RSS rise of that: {label} ({size}) | {cell(x)} | {cell(pair['peft'])} |"


def report(r: dict) -> str:
    t, m, inf, o, f = r["training_s"], r["training_peak_rss_mb"], r["inference_s"], r["onnx"], r["fold_s"]
    ms = lambda s: f"{1e3 * s:.1f} ms"  # noqa: E731
    lines = [
        f"CPU suite, {r['date']}, {r['machine']}; wall {r['wall_s']:.0f} s",
        "",
        "| training step (4 x 128, fwd + bwd + AdamW) | median | / PEFT | / frozen floor | / full FT | peak RSS rise |",
        "|---|---|---|---|---|---|",
    ]
    for k, label in (("lorafx", "lora-fx"), ("peft", "PEFT"), ("full", "full fine-tuning"), ("floor", "frozen floor (fwd + bwd to embeddings)"),
                     ("floor_again", "frozen floor again (noise check)")):
        if k not in m:
            lines.append(f"| {label} | {ms(t[k])} | {t[k] / t['peft']:.3f} | {t[k] / t['floor']:.3f} | {t[k] / t['full']:.3f} | - |")
            continue
        lines.append(f"| {label} | {ms(t[k])} | {t[k] / t['peft']:.3f} | {t[k] / t['floor']:.3f} | {t[k] / t['full']:.3f} | {m[k]:.0f} MB |")
    lines += ["", "| inference (1 x 128) | median | / untouched | / untouched graph |", "|---|---|---|---|"]
    for k, label in (("untouched", "untouched model (eager)"), ("untouched_again", "untouched again (noise check)"),
                     ("untouched_graph", "untouched, captured graph"),
                     ("lorafx_unfolded", "lora-fx unfolded"), ("peft_unmerged", "PEFT unmerged"),
                     ("lorafx_folded", "lora-fx folded"), ("peft_merged", "PEFT merged")):
        lines.append(f"| {label} | {ms(inf[k])} | {inf[k] / inf['untouched']:.3f} | {inf[k] / inf['untouched_graph']:.3f} |")
    li, pi = r["inject"]["lorafx"], r["inject"]["peft"]
    lines += [
        "",
        "| one-off | lora-fx | PEFT |",
        "|---|---|---|",
        f"| fold / merge_and_unload | {ms(f['lorafx_fold'])} | {ms(f['peft_merge_and_unload'])} |",
        f"| capture + inject / get_peft_model | {li['seconds']:.2f} s | {pi['seconds']:.2f} s |",
        *[inject_row(label, r[key]) for key, label in (("inject", "the suite's model"), ("inject_x4", "hidden 1024"),
                                                        ("inject_deep", "16 layers")) if key in r],
        f"| ONNX export, untouched / folded | {o['export_untouched_s']:.1f} s / {o['export_folded_s']:.1f} s | - |",
        f"| ONNX Runtime 1 x 128, folded / untouched | {ms(o['ort_folded'])} / {ms(o['ort_untouched'])} = "
        f"{o['ort_folded'] / o['ort_untouched']:.3f} (same structure: {o['same_structure']}, same names: {o['same_names']}) | - |",
        f"| 7B Llama shape on meta: capture + inject / fold | {r['meta7b']['capture_inject_s']:.1f} s / {r['meta7b']['fold_s']:.2f} s "
        f"({r['meta7b']['params'] / 1e9:.2f}B params, {r['meta7b']['nodes']} nodes) | - |",
        "",
        f"lora-fx unfolded vs PEFT unmerged, same A and B: max abs {r['lorafx_vs_peft_max_abs']:.2e}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
