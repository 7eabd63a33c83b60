"""The LoRA paper's own questions on the main job's model and data (all-MiniLM-L6-v2, movie reviews):

- Table 5: which matrices, under one parameter budget: q only at rank 2r, v only at 2r, q+v at r,
  q+k+v+o at r/2 (r = 8);
- Table 6: which rank: r in 1, 2, 4, 8, 64 on q+v;
- Section 7: the subspace similarity of the r = 8 and r = 64 adapters (Figure 3) against random
  matrices, and the amplification of each update.

Each configuration trains as examples/finetune_sentiment.py trains LoRA (same head, lr, schedule,
alpha = 2 * rank: scaling 2 at every rank),
for --seeds seeds; accuracy mean and spread, trainable LoRA parameters. Default: 1,000 train / 1,000
test sentences, 3 epochs, 3 seeds: about 20 minutes on 2 CPU cores (the paper's models and data are
far larger: this is the same question at a small scale, and the README says where the answers agree).

    python examples/paper_ablations.py [--seeds 0 1 2] [--train 1000] [--test 1000] [--epochs 3]

Writes results/ablations/{results.md,results.json,phi.png}.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_fx  # noqa: E402
from finetune_sentiment import SentenceClassifier, accuracy, linear_probe, predict, train  # noqa: E402
from sentiment_data import minilm_path, movie_reviews, split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
Q, K, V, O = "query", "key", "value", "attention.output.dense"


def configurations(r: int) -> dict[str, tuple[list[str], int]]:
    """name -> (targets, rank): Table 5's (one budget) and Table 6's (ranks on q+v)."""
    table5 = {f"q (r={2 * r})": ([Q], 2 * r), f"v (r={2 * r})": ([V], 2 * r), f"q,v (r={r})": ([Q, V], r),
              f"q,k,v,o (r={r // 2})": ([Q, K, V, O], r // 2)}
    table6 = {f"q,v (r={rank})": ([Q, V], rank) for rank in (1, 2, 4, 8, 64)}
    return {**table5, **table6}


def run(args) -> dict:
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    train_rows, test_rows = split(movie_reviews(), args.train, args.test)
    example = {k: v[:2] for k, v in tok(["a fine film", "not good"], padding=True, return_tensors="pt").items()
               if k in ("input_ids", "attention_mask")}
    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    adapters: dict[tuple[str, int], lora_fx.LoraGraphModule] = {}
    _, _, probe = linear_probe(encoder, tok, train_rows, test_rows, args, seed=0)
    configs = configurations(args.r)
    for name, (targets, rank) in configs.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            torch.manual_seed(seed)
            net = SentenceClassifier(copy.deepcopy(encoder))
            gm = lora_fx.inject_lora(net, targets, rank=rank, alpha=2 * rank, init="kaiming", trainable=["head"],
                                     example_inputs=example)
            train(gm, tok, train_rows, args, args.lr, seed, name)
            acc = accuracy(predict(gm, tok, test_rows, args), test_rows)
            lora = sum(p.numel() for p in lora_fx.lora_parameters(gm).values())
            results.setdefault(name, []).append({"seed": seed, "accuracy": acc, "lora_params": lora})
            if targets == [Q, V] and rank in (8, 64) and seed == args.seeds[0]:
                adapters[(name, rank)] = gm
            if not args.quiet:
                print(f"{name:>18}  seed {seed}  accuracy {acc:.4f}  LoRA params {lora}", flush=True)
    summary = {"probe_accuracy": probe, "results": results, "seconds": time.perf_counter() - started,
               "train": len(train_rows), "test": len(test_rows), "epochs": args.epochs, "seeds": args.seeds}
    summary["similarity"], phis = similarity(adapters)
    summary["amplification"] = [row.__dict__ for row in lora_fx.analysis.site_table(adapters[(f"q,v (r={args.r})", 8)])] \
        if (f"q,v (r={args.r})", 8) in adapters else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(table(summary))
    if phis and not args.no_plot:
        plot(phis, out / "phi.png")
    if not args.quiet:
        print(table(summary))
    return summary


def similarity(adapters: dict) -> tuple[list[dict], list[tuple[str, torch.Tensor]]]:
    """φ(i, j) of the r = 8 and r = 64 adapters per weight, with the random baseline (Figure 3)."""
    small = next((gm for (_, r), gm in adapters.items() if r == 8), None)
    large = next((gm for (_, r), gm in adapters.items() if r == 64), None)
    if small is None or large is None:
        return [], []
    rows, phis = [], []
    a8, a64 = lora_fx.adapter_weights(small), lora_fx.adapter_weights(large)
    for param in a8:
        phi = lora_fx.analysis.subspace_similarity(a8[param][0][0], a64[param][0][0])
        baseline = lora_fx.analysis.random_similarity(*phi.shape, features=a8[param][0][0].shape[1])
        rows.append({"weight": param, "phi_1_1": float(phi[0, 0]), "phi_mean": float(phi.mean()),
                     "random_1_1": float(baseline[0, 0]), "random_mean": float(baseline.mean())})
        phis.append((param, phi))
    return rows, phis


def table(s: dict) -> str:
    lines = [f"LoRA paper ablations on all-MiniLM-L6-v2, movie reviews: {s['train']} train / {s['test']} test sentences, "
             f"{s['epochs']} epochs, seeds {s['seeds']}; {s['seconds'] / 60:.1f} min. Linear probe: {s['probe_accuracy']:.4f}.",
             "", "| targets (rank) | LoRA params | accuracy mean | spread (min-max) |", "|---|---|---|---|"]
    for name, runs in s["results"].items():
        accs = [r["accuracy"] for r in runs]
        lines.append(f"| {name} | {runs[0]['lora_params']:,} | {statistics.mean(accs):.4f} | "
                     f"{min(accs):.4f}-{max(accs):.4f} |")
    if s["similarity"]:
        lines += ["", "Subspace similarity of the r = 8 and r = 64 adapters (q+v, first seed), from lora_A:", "",
                  "| weight | φ(1, 1) | mean φ | random φ(1, 1) | random mean |", "|---|---|---|---|---|"]
        for r in s["similarity"]:
            lines.append(f"| {r['weight']} | {r['phi_1_1']:.3f} | {r['phi_mean']:.3f} | {r['random_1_1']:.3f} | "
                         f"{r['random_mean']:.3f} |")
    if s["amplification"]:
        lines += ["", "The r = 8 update per weight (q+v):", "",
                  "| weight | ||ΔW||/||W0|| | effective rank (90%) | amplification | random |", "|---|---|---|---|---|"]
        for r in s["amplification"]:
            lines.append(f"| {r['weight']} | {r['relative_norm']:.4f} | {r['effective_rank']} | {r['amplification']:.2f} | "
                         f"{r['random_amplification']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(phis: list[tuple[str, torch.Tensor]], path: Path) -> None:
    chosen = [p for p in phis if ".5." in p[0]] or phis[-2:]  # the last layer's q and v, as the paper's Figure 3
    labels = [(p.replace("encoder.encoder.layer.", "layer ").replace(".weight", ""), phi) for p, phi in chosen]
    lora_fx.analysis.plot_similarity(labels, path, "φ(A_r=8, A_r=64, i, j), j <= 8", xlabel="j (r = 64)",
                                     ylabel="i (r = 8)", columns=8)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--r", type=int, default=8, help="Table 5's budget: q and v alone at 2r, q+v at r, q+k+v+o at r/2")
    ap.add_argument("--only", nargs="+", help="run only these configurations (names as printed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results" / "ablations"))
    return ap.parse_args(argv)


if __name__ == "__main__":
    run(parse())
