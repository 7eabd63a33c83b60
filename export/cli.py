"""The `lora-fx` command line: `lora-fx diff A B [--html OUT]` (ONNX files or saved fx graphs) and
`lora-fx analyze ADAPTER [OTHER] [--base MODEL_DIR] [--png OUT]` (what an adapter learned)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lora_fx

from .onnx_diff import onnx_diff
from .render import graph_diff_html, onnx_diff_html


def _diff(args) -> int:
    a, b = Path(args.a), Path(args.b)
    for p in (a, b):
        if not p.is_file():
            print(f"lora-fx diff: no such file: {p}", file=sys.stderr)
            return 2
    kinds = {a.suffix, b.suffix}
    if kinds == {".onnx"}:
        diff = onnx_diff(a, b)
        print(diff)
        if args.html:
            print(f"wrote {onnx_diff_html(a, b, args.html, context=args.context)}")
        return 0 if diff.same_structure else 1
    if kinds == {".pt2"}:
        ga, gb = lora_fx.load_graph(a), lora_fx.load_graph(b)
        diff = lora_fx.graph_diff(ga, gb)
        print(diff)
        if args.html:
            print(f"wrote {graph_diff_html(ga, gb, args.html, title=f'fx graph diff: {a} -> {b}', context=args.context)}")
        return 0 if diff.identical else 1
    print(f"lora-fx diff: compare two .onnx files or two .pt2 graphs (lora_fx.save_graph); got {a.suffix} and {b.suffix}",
          file=sys.stderr)
    return 2


def _base_weights(folder: str) -> dict:
    """Module path -> weight of a transformers model folder (the adapter's base), by the paths PEFT's
    files use (a task model's, e.g. `model.layers.0...`)."""
    import transformers  # optional: only `--base` needs it

    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, (config.architectures or ["AutoModel"])[0], transformers.AutoModel)
    return lora_fx.analysis.module_weights(cls.from_pretrained(folder))


def _analyze(args) -> int:
    analysis = lora_fx.analysis
    files = [lora_fx.read_adapter(d) for d in [args.adapter] + ([args.other] if args.other else [])]
    base = _base_weights(args.base) if args.base else None
    for d, file in zip([args.adapter, args.other], files):
        print(f"{d}:")
        print(analysis.format_table(analysis.file_table(file, base)))
    if len(files) == 2:
        first, second = (analysis.adapter_updates(f) for f in files)
        common = [(h, analysis.subspace_similarity(first[h][1], second[h][1])) for h in first if h in second]
        if not common:
            print("the two adapters share no adapted weight")
            return 1
        print(f"subspace similarity of {args.adapter} (i) and {args.other} (j), from lora_A's right-singular vectors:")
        for holder, phi in common:
            baseline = analysis.random_similarity(*phi.shape, features=first[holder][1].shape[1])
            print(f"  {holder}: phi(1, 1) = {phi[0, 0]:.3f}, mean = {phi.mean():.3f} (random: {baseline[0, 0]:.3f}, "
                  f"{baseline.mean():.3f})")
        if args.png:
            labels = [(".".join(h.rsplit(".", 2)[-2:]), phi) for h, phi in common[:4]]
            print(f"wrote {analysis.plot_similarity(labels, args.png, 'subspace similarity phi(i, j) (LoRA paper, Figure 3)')}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lora-fx", description="LoRA as passes over torch.fx graphs; exit codes: "
                                     "0 same (or done), 1 different, 2 any error")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("diff", help="compare two ONNX files or two saved graphs; exit 0 if the structure is the same, 1 if not")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--html", metavar="OUT", help="also write an HTML view with the changed nodes highlighted")
    d.add_argument("--context", type=int, default=2, help="hops of unchanged nodes drawn around each change (large graphs)")
    a = sub.add_parser("analyze", help="what an adapter learned: per-weight spectrum and amplification; with a second "
                                       "adapter of the same weights, the paper's subspace similarity")
    a.add_argument("adapter", help="an adapter folder (PEFT's or lora-fx's)")
    a.add_argument("other", nargs="?", help="a second adapter folder over the same weights")
    a.add_argument("--base", metavar="MODEL_DIR", help="the base model (a transformers folder) for ||dW||/||W0|| and amplification")
    a.add_argument("--png", metavar="OUT", help="write the subspace-similarity heatmaps (two adapters)")
    args = parser.parse_args(argv)
    try:
        return _diff(args) if args.command == "diff" else _analyze(args)
    except Exception as e:  # any failure is exit 2, never 1 ("the graphs differ"), in one line
        if args.debug:
            raise
        line = (str(e).strip().splitlines() or [""])[0]
        print(f"lora-fx {args.command}: error: {type(e).__name__}: {line} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
