"""Fold precision: lora-fx vs PEFT's merge, against an fp64 reference, on a real shape.

    python benchmarks/fold_numerics.py [--size 4096] [--rank 16]

Writes results/fold_numerics.md: for each dtype, the max abs error of lora-fx's fold, PEFT's
merge_and_unload, a fold done entirely in the low dtype, and one rounding of the exact result (the
best any fold can do).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch


def measure(size: int, rank: int, dtype: torch.dtype, seed: int = 0) -> dict:
    from peft import LoraConfig, get_peft_model

    import lora_fx

    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(size, size, bias=False)).to(dtype)
    x = torch.randn(2, 3, size, dtype=dtype)
    gm = lora_fx.inject_lora(base, ["0"], rank=rank, alpha=2 * rank, example_inputs=(x,))
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.02)
    ours = lora_fx.merge_lora(gm).get_parameter("0.weight").double()
    (a,) = [p.double() for p in lora_fx.lora_parameters(gm, lora_fx.LORA_A).values()]
    (b,) = [p.double() for p in lora_fx.lora_parameters(gm, lora_fx.LORA_B).values()]
    w0 = base[0].weight.double()
    exact = w0 + 2.0 * (b @ a)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]))
    with torch.no_grad():
        peft_model.base_model.model[0].lora_A["default"].weight.copy_(a.to(dtype))
        peft_model.base_model.model[0].lora_B["default"].weight.copy_(b.to(dtype))
    peft_w = peft_model.merge_and_unload()[0].weight.double()
    naive = (base[0].weight + 2.0 * (b.to(dtype) @ a.to(dtype))).double()
    err = lambda w: (w - exact).abs().max().item()  # noqa: E731
    return {"dtype": str(dtype).replace("torch.", ""), "size": size, "rank": rank, "lora_fx": err(ours),
            "peft": err(peft_w), "all_low_precision": err(naive), "one_rounding": err(exact.to(dtype).double())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    rows = [measure(args.size, args.rank, d) for d in (torch.bfloat16, torch.float16, torch.float32)]
    lines = ["| dtype | shape, r | lora-fx | PEFT merge_and_unload | fold entirely in dtype | one rounding of exact |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['size']}x{r['size']}, {r['rank']} | {r['lora_fx']:.3g} | {r['peft']:.3g} | "
                     f"{r['all_low_precision']:.3g} | {r['one_rounding']:.3g} |")
    text = "\n".join(lines)
    out = Path(__file__).resolve().parents[1] / "results"
    out.mkdir(exist_ok=True)
    (out / "fold_numerics.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
