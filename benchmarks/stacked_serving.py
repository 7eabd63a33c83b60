"""One ONNX Runtime session serving N adapters from a stacked export (`export_multi_adapter(...,
stacked=True)`), any mix per batch.

    python benchmarks/stacked_serving.py [--model llama256|smollm2] [--ns 1 10 100 1000]

Per N, in a fresh process: a server with one adapter and a server with N adapters (16 distinct
random .onnx_adapter files, r = 8 on q/v, loaded in turn under N names: every load is a row of its
own), then, interleaved in that process:
  - a 16-row batch over 16 different adapters, and the same batch on one adapter, on both servers;
  - generation, 8 rows x 16 new tokens, over 8 adapters vs one (kv-cache stacked export).
Load time per adapter, resident memory per adapter (RSS after the N loads minus before, / N)
against the file size. Writes benchmarks/results/stacked_serving_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from common import RESULTS, in_subprocess, interleaved, rss_bytes  # noqa: E402

LLAMA256 = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=4000)
FILES = 16  # distinct adapter files, loaded in turn


def build(model_name: str):
    if model_name == "smollm2":
        from smollm2_lora import load

        return load()[1].eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA256)).eval()


def prepare(d: Path, model_name: str) -> dict:
    """The stacked forward and kv exports of q/v r = 8 LoRA, and FILES random adapters for each."""
    import export
    import lora_fx

    model = build(model_name)
    ids = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 16))}
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16, example_inputs=ids)
    (d / "kv").mkdir()  # a kv export's folder holds its configs too
    paths = {"forward": str(export.export_multi_adapter(gm, d / "forward.onnx", stacked=True)),
             "kv": str(export.export_multi_adapter(gm, d / "kv" / "model.onnx", kv_cache=True, stacked=True)),
             "vocab": model.config.vocab_size}
    for kind in ("forward", "kv"):
        files = []
        for i in range(FILES):
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in lora_fx.lora_parameters(gm).values():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            files.append(str(export.export_adapter(gm, d / f"{kind}{i}.onnx_adapter", paths[kind])))
        paths[f"{kind}_files"] = files
    return paths


def one_n(paths_file: str, n: int) -> dict:
    """This process: servers with 1 and with n adapters; load, memory, batch and generation times."""
    import export

    torch.set_num_threads(2)
    paths = json.loads(Path(paths_file).read_text())
    files = paths["forward_files"]
    single = export.AdapterServer(paths["forward"], "cpu")
    single.load("a0", files[0])
    server = export.AdapterServer(paths["forward"], "cpu")
    before = rss_bytes()
    t = time.perf_counter()
    for i in range(n):
        server.load(f"a{i}", files[i % FILES])
    load_s = (time.perf_counter() - t) / n
    held = rss_bytes() - before
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(0, paths["vocab"], (16, 32), generator=g)}
    mix = [f"a{(i * 7919) % n}" for i in range(16)]  # 16 rows over min(16, n) adapters spread over the stack
    lat = interleaved({
        "n_mixed16": lambda: server.run(x, adapter=mix),
        "n_one": lambda: server.run(x, adapter=f"a{n - 1}"),
        "single_one": lambda: single.run(x, adapter="a0"),
    }, rounds=5, per_round=3)
    kv_files = paths["kv_files"]
    kv = export.AdapterServer(paths["kv"], "cpu")
    for i in range(n):
        kv.load(f"a{i}", kv_files[i % FILES])
    prompt = torch.randint(0, paths["vocab"], (8, 16), generator=g)
    rows8 = [f"a{(i * 7919) % n}" for i in range(8)]
    gen = interleaved({
        "gen_mixed8": lambda: kv.generate(prompt, adapter=rows8, max_new_tokens=16),
        "gen_one": lambda: kv.generate(prompt, adapter=f"a{n - 1}", max_new_tokens=16),
    }, rounds=3, per_round=1, warmup=1)
    return {"n": n, "load_ms_per_adapter": 1e3 * load_s, "held_mb": held / 2**20, "stacked_mb": server.stacked_bytes / 2**20,
            "file_mb": Path(files[0]).stat().st_size / 2**20, "distinct_in_mixed16": len(set(mix)),
            "latency_ms": {k: 1e3 * v for k, v in lat.items()},
            "tokens_per_s": {k: 8 * 16 / v for k, v in gen.items()}}


def report(r: dict) -> str:
    lines = [f"Stacked serving on CPU (2 threads), {r['model']}, LoRA r=8 on q/v; one process per N; batch 16 x 32 tokens; "
             "generation 8 rows x 16 new tokens after 16", "",
             "| N loaded | load ms / adapter | RSS / adapter (MB) | file (MB) | RSS / file | 16 rows, 16 adapters (ms) | "
             "16 rows, 1 adapter (ms) | mixed / one | N=1 server, 1 adapter (ms) | N / N=1 | gen tok/s, 8 adapters | "
             "gen tok/s, 1 adapter | mixed / one |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        n, lat, tps = row["n"], row["latency_ms"], row["tokens_per_s"]
        per = row["held_mb"] / n
        lines.append(
            f"| {n} | {row['load_ms_per_adapter']:.2f} | {per:.3f} | {row['file_mb']:.3f} | {per / row['file_mb']:.2f} | "
            f"{lat['n_mixed16']:.1f} | {lat['n_one']:.1f} | {lat['n_mixed16'] / lat['n_one']:.2f} | {lat['single_one']:.1f} | "
            f"{lat['n_one'] / lat['single_one']:.2f} | {tps['gen_mixed8']:.0f} | {tps['gen_one']:.0f} | "
            f"{tps['gen_mixed8'] / tps['gen_one']:.2f} |")
    lines += ["", "mixed / one: latency ratio of the 16-adapter batch to the one-adapter batch (same server); N / N=1: the "
              "one-adapter batch on the N-adapter server over the same on a server holding one adapter (same process, "
              "interleaved). RSS / adapter: resident memory after the N loads minus before, over N (small N: page noise)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("llama256", "smollm2"), default="llama256")
    ap.add_argument("--ns", type=int, nargs="*", default=[1, 10, 100, 1000])
    ap.add_argument("--one", nargs=2, metavar=("PATHS", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_n(args.one[0], int(args.one[1]))))
        return 0
    d = Path(tempfile.mkdtemp(prefix="lorafx-stacked-"))
    paths = prepare(d, args.model)
    (d / "paths.json").write_text(json.dumps(paths))
    rows = []
    for n in args.ns:
        rows.append(in_subprocess("stacked_serving", "--one", str(d / "paths.json"), str(n), timeout=3600))
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"stacked_serving_{args.model}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = report(result)
    (RESULTS / f"stacked_serving_{args.model}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
