"""PEFT's initialisations on the main job (issue 25): MiniLM-L6 sentiment, LoRA r=8 on query/value,
plain (kaiming) vs PiSSA vs OLoRA (vs orthogonal), each for lora-fx and PEFT with the same init and
seed; what each init costs (inject time on MiniLM and on SmolLM2-135M, q/v and all-linear); and
combine_adapters' time on SmolLM2.

    python benchmarks/inits.py [--seeds 0 1 2] [--inits kaiming pissa olora]

Runs in turn per seed (lora-fx then PEFT for each init). Writes benchmarks/results/inits.{md,json};
about 25 minutes on 2 CPU cores with three seeds.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import lora_fx  # noqa: E402
from common import RESULTS, markdown  # noqa: E402
from finetune_sentiment import SentenceClassifier, accuracy, batches, predict, train  # noqa: E402
from sentiment_data import minilm_path, movie_reviews, split  # noqa: E402

TARGETS = ["query", "value"]


def sentiment(args) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    pretrained = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    train_rows, test_rows = split(movie_reviews(), args.train, args.test)
    rows = []
    for seed in args.seeds:
        for init in args.inits:
            for who in ("lora-fx", "PEFT"):
                torch.manual_seed(seed)
                net = SentenceClassifier(pretrained)
                example = next(batches(tok, train_rows[:2], 2, args.max_length))[0]
                t = time.perf_counter()
                if who == "lora-fx":
                    model = lora_fx.inject_lora(net, TARGETS, rank=8, alpha=16, init=init, trainable=["head"],
                                                example_inputs=example)
                else:
                    config = LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16, modules_to_save=["head"],
                                        init_lora_weights=True if init == "kaiming" else init)
                    model = get_peft_model(copy.deepcopy(net), config)
                setup = time.perf_counter() - t
                train(model, tok, train_rows, args, args.lr, seed, f"{who} {init} seed {seed}")
                acc = accuracy(predict(model, tok, test_rows, args), test_rows)
                rows.append({"seed": seed, "init": init, "who": who, "accuracy": acc, "setup_s": setup})
                print(rows[-1], flush=True)
    return rows


def init_costs(args) -> tuple[list[dict], list[dict]]:
    from smollm2_lora import load

    _, model = load()
    model.eval()
    example = {"input_ids": torch.randint(0, 1000, (1, 16))}
    capture = lora_fx.capture(model, example)  # the capture's own cost is not the init's
    costs = []
    for targets in (["q_proj", "v_proj"], "all-linear"):
        for init in ("kaiming", "pissa", "pissa_niter_4", "olora"):
            t = time.perf_counter()
            gm = lora_fx.inject_lora(capture, targets, rank=8, alpha=16, init=init)
            costs.append({"model": "SmolLM2-135M", "targets": "q, v" if isinstance(targets, list) else targets,
                          "init": init, "weights": len(gm.lora_state.sites), "inject_s": time.perf_counter() - t})
            print(costs[-1], flush=True)
    gm = lora_fx.inject_lora(capture, "all-linear", rank=8, alpha=16, adapter="a")
    lora_fx.add_adapter(gm, "b", rank=8, alpha=16)
    combos = []
    for method, kw in (("linear", {}), ("cat", {}), ("svd", {}), ("ties", {"density": 0.5}),
                       ("dare_linear", {"density": 0.5}), ("ties_svd", {"density": 0.5})):
        t = time.perf_counter()
        lora_fx.combine_adapters(gm, {"a": 0.5, "b": 0.5}, f"ab_{method}", method, seed=0, **kw)
        combos.append({"method": method, "weights": len(gm.lora_state.sites), "seconds": time.perf_counter() - t})
        print(combos[-1], flush=True)
    return costs, combos


def table(summary: dict) -> str:
    a = summary["args"]
    rows = summary["sentiment"]
    quality = []
    for init in a["inits"]:
        for who in ("lora-fx", "PEFT"):
            accs = [r["accuracy"] for r in rows if r["init"] == init and r["who"] == who]
            quality.append({"init": init, "who": who, "mean": f"{statistics.mean(accs):.4f}",
                            "sd": f"{statistics.stdev(accs):.4f}" if len(accs) > 1 else "",
                            "seeds": " ".join(f"{x:.3f}" for x in accs),
                            "setup": f"{statistics.median(r['setup_s'] for r in rows if r['init'] == init and r['who'] == who):.2f}"})
    fmt = lambda rs: [{k: f"{v:.2f}" if isinstance(v, float) else v for k, v in r.items()} for r in rs]  # noqa: E731
    return "\n".join([
        f"MiniLM-L6 sentiment: {a['train']} train / {a['test']} test movie-review sentences, LoRA r=8 alpha=16 on "
        f"query + value, head trained, {a['epochs']} epochs, lr {a['lr']}, seeds {a['seeds']}; setup = inject_lora "
        "(capture + init) for lora-fx, get_peft_model for PEFT, median seconds.", "",
        markdown(quality, [("init", "init"), ("library", "who"), ("accuracy (mean)", "mean"), ("sd", "sd"),
                           ("per seed", "seeds"), ("setup s", "setup")]), "",
        "What an init costs on SmolLM2-135M (inject into one capture, so the capture is not counted):", "",
        markdown(fmt(summary["costs"]), [("targets", "targets"), ("init", "init"), ("weights", "weights"),
                                         ("inject s", "inject_s")]), "",
        "combine_adapters on SmolLM2-135M (two all-linear r=8 adapters):", "",
        markdown(fmt(summary["combine"]), [("method", "method"), ("weights", "weights"), ("seconds", "seconds")]),
    ]) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--inits", nargs="+", default=["kaiming", "pissa", "olora"])
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "inits"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    costs, combos = init_costs(args)
    summary = {"args": vars(args), "costs": costs, "combine": combos, "sentiment": sentiment(args)}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    out.with_suffix(".md").write_text(table(summary))
    print(table(summary))


if __name__ == "__main__":
    main()
