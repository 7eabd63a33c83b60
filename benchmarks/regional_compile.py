"""Regional compilation on the module tree (issue 16): compile each decoder layer of
`lora_fx.unflatten(gm)` on its own and time the first forward (compilation) of a 4-layer and a 16-layer
Llama shape, against compiling the flat graph whole; outputs checked against the uncompiled graph.

    python benchmarks/regional_compile.py [--hidden 256] [--backend inductor]

Each configuration runs in a fresh process with an empty inductor cache. Each layer's graph is its own
generated class, so dynamo traces every layer once; inductor's cache serves the identical layers after
the first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_fx  # noqa: E402
from common import RESULTS, markdown  # noqa: E402


def measure(layers: int, mode: str, args) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                         vocab_size=1024)).eval()
    ids = torch.randint(0, 1024, (2, 32))
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=8, example_inputs={"input_ids": ids})
    with torch.no_grad():
        expected = gm(input_ids=ids).logits
        if mode == "per-layer":
            module = lora_fx.unflatten(gm)
            for layer in module.model.layers.children():
                layer.compile(backend=args.backend)
        else:
            module = torch.compile(gm, backend=args.backend)
        t = time.perf_counter()
        out = module(input_ids=ids).logits
        seconds = time.perf_counter() - t
    return {"layers": layers, "mode": mode, "seconds": seconds, "max_error": float((out - expected).abs().max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        layers, mode = args.one.split(":")
        print(json.dumps(measure(int(layers), mode, args)))
        return
    rows = []
    for mode in ("per-layer", "whole"):
        for layers in (4, 16):
            with tempfile.TemporaryDirectory() as cache:  # a cold inductor cache for every run
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                r = subprocess.run([sys.executable, __file__, "--one", f"{layers}:{mode}", "--hidden", str(args.hidden),
                                    "--backend", args.backend, "--threads", str(args.threads)],
                                   capture_output=True, text=True, env=env, check=True)
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    for r in rows:
        four = next(x for x in rows if x["mode"] == r["mode"] and x["layers"] == 4)
        r["vs_4_layers"] = r["seconds"] / four["seconds"]
    fmt = [{k: f"{v:.3g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    text = (f"First forward (compilation) with torch.compile backend={args.backend}, a cold cache per run (fresh "
            f"process), Llama shape hidden {args.hidden}, LoRA r=8 on q/v, batch 2 x 32:\n\n" + markdown(fmt, [
                ("compiled", "mode"), ("layers", "layers"), ("first forward s", "seconds"),
                ("/ 4 layers", "vs_4_layers"), ("max error vs uncompiled", "max_error")]) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "regional_compile.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "regional_compile.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
