"""The `lora-fx` command line: `lora-fx diff A B [--html OUT]` (ONNX files or saved fx graphs)."""
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lora-fx", description="LoRA as passes over torch.fx graphs")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("diff", help="compare two ONNX files or two saved graphs; exit 0 if the structure is the same, 1 if not")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--html", metavar="OUT", help="also write an HTML view with the changed nodes highlighted")
    d.add_argument("--context", type=int, default=2, help="hops of unchanged nodes drawn around each change (large graphs)")
    args = parser.parse_args(argv)
    try:
        return _diff(args)
    except RuntimeError as e:
        print(f"lora-fx diff: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
