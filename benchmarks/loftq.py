"""LoftQ on SmolLM2-135M-Instruct's NF4 base (issue 26): the weight error LoftQ leaves per layer, the
held-out perplexity before training and after the 60-step run of benchmarks/quantized.py, against LoRA on
the float base and plain LoRA on the same NF4 base; q/v and all-linear, 1 and 5 iterations.

    python benchmarks/loftq.py [--steps 60] [--iterations 1 5] [--targets qv all-linear]

Every case trains in the same interleaved rounds (one step each, in a new order each round), so machine
noise hits all alike. Writes benchmarks/results/loftq.{md,json}; about 40 minutes on 2 CPU cores.
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
from quantized import logits_of, quantize, smollm2_job, step_fn, training_rounds  # noqa: E402
from smollm2_lora import add_run_args, perplexity  # noqa: E402

TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}


def cases(args) -> list[tuple[str, str, int]]:
    """(targets, base, LoftQ iterations; 0 = plain init) per case."""
    out = []
    for targets in args.targets:
        out += [(targets, "float32", 0), (targets, "nf4", 0)]
        out += [(targets, "nf4", n) for n in args.iterations]
    return out


def name(case) -> str:
    targets, base, n = case
    return f"{targets} {base}" + (f" LoftQ x{n}" if n else "")


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    tok, float_model, train_texts, test_texts, example = smollm2_job(args)
    nf4 = quantize(copy.deepcopy(float_model), "nf4").eval()

    graphs, rows, layers = {}, {}, []
    for case in cases(args):
        targets, base, n = case
        torch.manual_seed(0)
        kw = dict(init="loftq", loftq=lora_fx.LoftQConfig(float_model, iterations=n)) if n else dict(init="kaiming")
        t = time.perf_counter()
        gm = lora_fx.inject_lora(float_model if base == "float32" else nf4, TARGETS[targets], rank=8, alpha=16,
                                 example_inputs=example, **kw)
        seconds = time.perf_counter() - t
        graphs[name(case)] = gm
        loftq = gm.lora_report.loftq
        row = {"case": name(case), "targets": targets, "base": base, "iterations": n, "inject_s": seconds,
               "weights": len(gm.lora_state.sites), "before": perplexity(logits_of(gm), tok, test_texts, args.max_length,
                                                                       desc=f"{name(case)} before")}
        if loftq:
            row["error_before"] = statistics.mean(r.error_before for r in loftq)
            row["error_after"] = statistics.mean(r.error_after for r in loftq)
            row["reduction_min"] = min(r.reduction for r in loftq)
            row["reduction_max"] = max(r.reduction for r in loftq)
            layers += [{"case": name(case), "param": r.param, "error_before": r.error_before,
                        "error_after": r.error_after} for r in loftq]
        rows[name(case)] = row
        print(row, flush=True)

    steps = {k: step_fn(gm.train(), tok, train_texts, args) for k, gm in graphs.items()}
    times = training_rounds(steps, args.steps)
    for k, gm in graphs.items():
        gm.eval()
        rows[k]["step_ms"] = 1000 * times[k]
        rows[k]["after"] = perplexity(logits_of(gm), tok, test_texts, args.max_length, desc=f"{k} after")
    for row in rows.values():
        ref = rows[f"{row['targets']} float32"]
        row["after_vs_float"] = row["after"] / ref["after"]
        row["before_vs_float"] = row["before"] / ref["before"]
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return {"args": vars(args), "rows": list(rows.values()), "layers": layers}


def table(summary: dict) -> str:
    a = summary["args"]
    rows = [{k: (f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else f"{v:.2f}" if isinstance(v, float) else v)
             for k, v in r.items()} for r in summary["rows"]]
    head = (f"SmolLM2-135M-Instruct, LoRA r=8 alpha=16, {a['steps']} steps x {a['batch']} movie-review sentences "
            f"(max {a['max_length']} tokens, lr {a['lr']}), {a['threads']} threads; held-out perplexity on "
            f"{a['held_out']} sentences. NF4: the decoder layers' linear weights (blocks of 64); the tied "
            "embedding stays float32. Weight error: ||W - W'|| / ||W|| (Frobenius), mean over the adapted weights; "
            "W' = deq(NF4(W)) for the plain base, deq(Q_T) + scaling * B @ A after LoftQ.")
    return "\n".join([head, "", markdown(rows, [
        ("case", "case"), ("weights", "weights"), ("inject s", "inject_s"), ("weight error NF4", "error_before"),
        ("weight error LoftQ", "error_after"), ("error removed min", "reduction_min"), ("max", "reduction_max"),
        ("ppl before", "before"), ("/ float", "before_vs_float"), ("ppl after", "after"),
        ("/ float LoRA", "after_vs_float"), ("step ms", "step_ms")])]) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    ap.add_argument("--out", default=str(RESULTS / "loftq"))
    args = ap.parse_args(argv)
    summary = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    out.with_suffix(".md").write_text(table(summary))
    print(table(summary))


if __name__ == "__main__":
    main()
