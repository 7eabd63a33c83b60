"""What `export.fusable` (RMSNorm written as ONNX Runtime's SimplifiedLayerNormalization fusion
matches it) buys in ONNX Runtime, CPU: a Llama shape exported with and without the rewrite, the
forward (batch 1 x 128) and one kv-cache decoding step (past 128), timed interleaved in one run.

    python benchmarks/fusion.py [--hidden 512] [--layers 4] [--rounds 10]   # results/fusion.{md,json}
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import onnx
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export  # noqa: E402
import export.onnx_export as onnx_export  # noqa: E402
from common import RESULTS, interleaved, markdown  # noqa: E402


def _exports(model, folder: Path, fused: bool) -> dict[str, Path]:
    """The forward and the kv-cache step, exported with (or without) the RMSNorm rewrite."""
    real = onnx_export.fusable
    if not fused:
        onnx_export.fusable = lambda model: 0  # what torch's exporter writes, untouched
    try:
        ids = {"input_ids": torch.randint(0, model.config.vocab_size, (1, 128))}
        (folder / "kv").mkdir()
        return {"forward": export.export_onnx(model, folder / "forward.onnx", ids),
                "kv step": export.export_onnx(model, folder / "kv" / "model.onnx", kv_cache=True)}
    finally:
        onnx_export.fusable = real


def _fused_ops(path: Path, out: Path) -> dict[str, int]:
    ops = collections.Counter(n.op_type for n in onnx.load(str(export.optimized_model(path, out))).graph.node)
    return {k: ops[k] for k in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Reciprocal")}


def _feeds(session, config, past: int) -> dict[str, torch.Tensor]:
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    feeds = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = torch.randint(0, config.vocab_size, (1, 1 if past else 128))
        elif i.name == "attention_mask":
            feeds[i.name] = torch.ones(1, past + (1 if past else 128), dtype=torch.long)
        elif i.name == "position_ids":
            feeds[i.name] = torch.tensor([[past]])
        elif i.name.startswith("past_key_values"):
            feeds[i.name] = torch.randn(1, heads, past, dim)
    return feeds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=8000)
    model = LlamaForCausalLM(config).eval()
    rows, cases = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for fused in (False, True):
            folder = Path(tmp) / ("fused" if fused else "plain")
            folder.mkdir()
            paths[fused] = _exports(model, folder, fused)
        for fused, by_kind in paths.items():
            for kind, path in by_kind.items():
                session = export.ort_session(path, "cpu")
                feeds = _feeds(session, config, past=128 if kind == "kv step" else 0)
                cases[(kind, fused)] = lambda s=session, f=feeds: export.ort_run(s, f)
                rows.append({"graph": kind, "RMSNorm rewrite": "yes" if fused else "no",
                             **_fused_ops(path, Path(tmp) / f"{kind}-{fused}.opt.onnx".replace(" ", "_"))})
        times = interleaved(cases, rounds=args.rounds, per_round=5)
    for row in rows:
        key = (row["graph"], row["RMSNorm rewrite"] == "yes")
        row["median (ms)"] = f"{times[key] * 1e3:.2f}"
        row["/ without"] = f"{times[key] / times[(row['graph'], False)]:.3f}"
    columns = [(k, k) for k in rows[0]]
    lines = [f"# RMSNorm rewrite for ONNX Runtime's fusion (CPU, {torch.get_num_threads()} threads)", "",
             f"Llama: hidden {args.hidden}, {args.layers} layers, GQA 8/4 heads, vocab 8000, random weights; "
             f"forward batch 1 x 128, kv step 1 token after 128; {args.rounds} interleaved rounds x 5 calls, medians. "
             "Fused op counts from ONNX Runtime's own optimized graph.", "", markdown(rows, columns), ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fusion.md").write_text("\n".join(lines))
    (RESULTS / "fusion.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
