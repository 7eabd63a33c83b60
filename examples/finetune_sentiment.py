"""The main job: LoRA on a real pretrained model and real data, against a linear probe and full
fine-tuning, then fold, export to ONNX and check ONNX Runtime gives the same accuracy.

all-MiniLM-L6-v2 (22.7M parameters) + mean pooling + a new Linear(384, 2) head, on Rotten Tomatoes
movie-review sentences; all offline (see examples/sentiment_data.py). Default: 1,000 train /
1,000 test sentences, one seed, under 5 minutes on 2 CPU cores. --seeds 0 1 2 and --full for more.
Writes results/sentiment/{results.md,results.json,curves.png} and the LoRA adapter.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export  # noqa: E402
import lora_fx  # noqa: E402
from sentiment_data import minilm_path, movie_reviews, split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class SentenceClassifier(nn.Module):
    """Encoder + mean pooling over real tokens + a linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))


def batches(tok, rows, batch_size, max_length, shuffle_seed=None):
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    for i in range(0, len(order), batch_size):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor([y for _, y in chunk])


def schedule(opt, total, warmup_share=0.1):
    warm = max(1, int(total * warmup_share))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))


def train(net, tok, rows, args, lr, seed, desc):
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(rows) / args.batch)
    sched = schedule(opt, steps_per_epoch * args.epochs)
    losses = []
    net.train()
    with tqdm(total=steps_per_epoch * args.epochs, desc=desc, leave=False, disable=args.quiet) as bar:
        for epoch in range(args.epochs):
            for inputs, labels in batches(tok, rows, args.batch, args.max_length, shuffle_seed=seed * 100 + epoch):
                loss = nn.functional.cross_entropy(net(**inputs), labels)
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    net.eval()
    return losses


@torch.no_grad()
def predict(net, tok, rows, args):
    net.eval()
    return torch.cat([net(**inputs).argmax(-1) for inputs, _ in batches(tok, rows, 64, args.max_length)])


def accuracy(pred, rows):
    return (pred == torch.tensor([y for _, y in rows])).float().mean().item()


def linear_probe(encoder, tok, train_rows, test_rows, args, seed):
    """Frozen encoder features + logistic regression (LBFGS, small L2)."""
    probe = SentenceClassifier(encoder).eval()

    @torch.no_grad()
    def features(rows):
        out = []
        for inputs, _ in tqdm(list(batches(tok, rows, 64, args.max_length)), desc="probe features", leave=False, disable=args.quiet):
            h = encoder(**inputs).last_hidden_state
            m = inputs["attention_mask"].unsqueeze(-1).float()
            out.append((h * m).sum(1) / m.sum(1))
        return torch.cat(out)

    x, y = features(train_rows), torch.tensor([lab for _, lab in train_rows])
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], 2)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")
    losses = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + 1e-3 * head.weight.square().sum()
        loss.backward()
        losses.append(loss.item())
        return loss

    opt.step(closure)
    probe.head.load_state_dict(head.state_dict())
    pred = head(features(test_rows)).argmax(-1)
    return probe, losses, accuracy(pred, test_rows)


def run(args) -> dict:
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    pretrained = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    rows = movie_reviews()
    train_rows, test_rows = split(rows, None if args.full else args.train, None if args.full else args.test)
    model_bytes = sum(p.numel() * p.element_size() for p in pretrained.parameters())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(rows)} labelled sentences; train {len(train_rows)}, test {len(test_rows)}; MiniLM-L6 "
          f"{sum(p.numel() for p in pretrained.parameters()):,} parameters")
    results = {m: [] for m in args.methods}
    curves = {}
    deploy = None
    for seed in args.seeds:
        if "probe" in args.methods:
            t = time.perf_counter()
            _, losses, acc = linear_probe(pretrained, tok, train_rows, test_rows, args, seed)
            results["probe"].append({"seed": seed, "accuracy": acc, "seconds": time.perf_counter() - t,
                                     "trainable": 384 * 2 + 2, "bytes": (384 * 2 + 2) * 4})
            curves.setdefault("probe", losses)
            print(f"seed {seed} probe: accuracy {acc:.3f}")
        if "lora" in args.methods:
            t = time.perf_counter()
            torch.manual_seed(seed)
            net = SentenceClassifier(pretrained)
            example = next(batches(tok, train_rows[:2], 2, args.max_length))[0]
            gm = lora_fx.inject_lora(net, ["query", "value"], rank=8, alpha=16, init=args.init, trainable=["head"],
                                     example_inputs=example)
            losses = train(gm, tok, train_rows, args, args.lora_lr, seed, f"LoRA seed {seed}")
            acc = accuracy(predict(gm, tok, test_rows, args), test_rows)
            seconds = time.perf_counter() - t
            adapter_dir = lora_fx.save_adapter(gm, out / f"adapter_seed{seed}")
            disk = sum(f.stat().st_size for f in adapter_dir.iterdir())
            report = gm.lora_report
            results["lora"].append({"seed": seed, "accuracy": acc, "seconds": seconds, "trainable": report.trainable_params,
                                    "bytes": disk})
            curves.setdefault("lora", losses)
            print(f"seed {seed} LoRA: accuracy {acc:.3f}, {report.trainable_params:,} trainable "
                  f"({100 * report.trainable_params / report.total_params:.2f}%), {seconds:.0f} s")
            if deploy is None:
                deploy = (net, gm, example)
        if "full" in args.methods:
            t = time.perf_counter()
            torch.manual_seed(seed)
            net = SentenceClassifier(copy.deepcopy(pretrained))
            losses = train(net, tok, train_rows, args, args.full_lr, seed, f"full seed {seed}")
            acc = accuracy(predict(net, tok, test_rows, args), test_rows)
            n = sum(p.numel() for p in net.parameters())
            results["full"].append({"seed": seed, "accuracy": acc, "seconds": time.perf_counter() - t, "trainable": n,
                                    "bytes": n * 4})
            curves.setdefault("full", losses)
            print(f"seed {seed} full fine-tuning: accuracy {acc:.3f}")
    summary = {"train": len(train_rows), "test": len(test_rows), "model_bytes": model_bytes,
               "total_params": sum(p.numel() for p in pretrained.parameters()) + 770, "results": results}
    if deploy is not None and not args.no_onnx:
        summary["onnx"] = deploy_check(*deploy, tok, test_rows, args, out)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    text = table(summary)
    (out / "results.md").write_text(text + "\n")
    plot(curves, results, out / "curves.png")
    print("\n" + text)
    return summary


def deploy_check(net, gm, example, tok, test_rows, args, out: Path) -> dict:
    """Fold, export, run in ONNX Runtime: its test accuracy must equal torch's."""
    folded = lora_fx.merge_lora(gm)
    untouched = SentenceClassifier(net.encoder)  # the pretrained model with an untrained head
    base_path = export.export_onnx(untouched, out / "untouched.onnx", example)
    path = export.export_onnx(folded, out / "folded.onnx")
    diff = export.onnx_diff(base_path, path)
    print("\nONNX diff, untouched vs folded:\n" + "\n".join(str(diff).splitlines()[:6]) + "\n")
    session = export.ort_session(path)
    preds = []
    for inputs, _ in tqdm(list(batches(tok, test_rows, 64, args.max_length)), desc=f"ONNX Runtime ({session.provider})",
                          leave=False, disable=args.quiet):
        preds.append(export.ort_run(session, inputs)[0].argmax(-1).cpu())
    ort_pred = torch.cat(preds)
    torch_pred = predict(folded, tok, test_rows, args)
    return {"provider": session.provider, "same_structure": diff.same_structure, "same_names": diff.same_names,
            "changed_initializers": len(diff.changed_initializers), "ort_accuracy": accuracy(ort_pred, test_rows),
            "torch_accuracy": accuracy(torch_pred, test_rows), "predictions_differ": int((ort_pred != torch_pred).sum())}


def table(s: dict) -> str:
    names = {"probe": "linear probe (frozen encoder + logistic regression)", "lora": "LoRA r=8 on query+value, head trained",
             "full": "full fine-tuning"}
    lines = [f"train {s['train']} / test {s['test']} sentences; model {s['model_bytes'] / 2**20:.1f} MB",
             "", "| method | trainable params (share) | test accuracy (mean ± spread over seeds) | seconds | bytes on disk (vs model) |",
             "|---|---|---|---|---|"]
    for method, runs in s["results"].items():
        if not runs:
            continue
        accs = [r["accuracy"] for r in runs]
        spread = f" ± {statistics.pstdev(accs):.3f} (n={len(accs)}: {', '.join(f'{a:.3f}' for a in accs)})" if len(accs) > 1 else ""
        t = runs[0]["trainable"]
        lines.append(f"| {names[method]} | {t:,} ({100 * t / s['total_params']:.3f}%) | {statistics.mean(accs):.3f}{spread} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.0f} | {runs[0]['bytes']:,} ({100 * runs[0]['bytes'] / s['model_bytes']:.2f}%) |")
    if "onnx" in s:
        o = s["onnx"]
        lines += ["", f"ONNX Runtime ({o['provider']}), folded LoRA model: accuracy {o['ort_accuracy']:.3f} vs torch "
                  f"{o['torch_accuracy']:.3f} ({o['predictions_differ']} predictions differ); graph vs untouched export: "
                  f"same structure {o['same_structure']}, same names {o['same_names']}, {o['changed_initializers']} initializers changed"]
    return "\n".join(lines)


def plot(curves, results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, losses in curves.items():
        if name == "probe":
            continue
        k = max(1, len(losses) // 50)
        smooth = [statistics.mean(losses[i:i + k]) for i in range(0, len(losses), k)]
        a.plot([i * k for i in range(len(smooth))], smooth, label=name)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.legend()
    names = [m for m in results if results[m]]
    means = [statistics.mean(r["accuracy"] for r in results[m]) for m in names]
    errs = [statistics.pstdev([r["accuracy"] for r in results[m]]) for m in names]
    b.bar(names, means, yerr=errs, color=["#999999", "#4c72b0", "#dd8452"][: len(names)])
    for i, v in enumerate(means):
        b.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    b.set_ylim(0.5, 1.0)
    b.set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--full", action="store_true", help="all 10,043 sentences, 80/20 split")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=["probe", "lora", "full"], choices=["probe", "lora", "full"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--init", default="kaiming", choices=["kaiming", "gaussian"], help="LoRA A init (PEFT's default: kaiming)")
    ap.add_argument("--full-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--out", default=str(ROOT / "results" / "sentiment"))
    return ap.parse_args(argv)


if __name__ == "__main__":
    run(parse())
