"""The architecture table for the notes: per row of tests/models.py, what the pass rewrote and which
battery checks passed (from a pytest run of tests/test_architectures.py and tests/test_onnx.py).

    python benchmarks/architecture_table.py        # writes results/architecture_table.md
"""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CHECKS = {
    "test_output_unchanged_at_init": "init",
    "test_only_lora_trains_and_loss_falls": "train",
    "test_folded_equals_unfolded": "fold",
    "test_folded_graph_is_the_original": "graph",
    "test_runs_at_other_shapes": "shapes",
    "test_eval_is_deterministic_and_train_is_the_models": "modes",
    "test_same_as_peft": "PEFT",
    "test_unfolded_equals_the_definition": "W+sBA",
    "test_folded_export_is_the_untouched_export": "ONNX same",
    "test_onnx_runtime_runs_what_torch_runs": "ORT=torch",
    "test_onnx_runtime_optimized_graphs_are_the_same": "ORT-opt same",
    "test_unfolded_lora_graph_exports_and_runs": "unfolded ONNX",
}


def main() -> int:
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    xml = out / "architecture_tests.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "auto", "--dist", "loadgroup", "-p", "no:logging",
                    f"--junitxml={xml}", "tests/test_architectures.py", "tests/test_onnx.py"], cwd=ROOT)
    status: dict[str, dict[str, str]] = defaultdict(dict)
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name")
        test, _, row = name.partition("[")
        row = row.split("]")[0]  # loadgroup may append "@<group>"
        verdict = "pass"
        if case.find("skipped") is not None:
            verdict = "n/a"
        elif case.find("failure") is not None or case.find("error") is not None:
            verdict = "FAIL"
        if test in CHECKS:
            status[row][CHECKS[test]] = verdict

    import torch

    import lora_fx
    from models import CASES

    lines = ["| model | targets | uses rewritten | trainable / total | " + " | ".join(CHECKS.values()) + " |",
             "|" + "---|" * (4 + len(CHECKS))]
    for case in CASES:
        torch.manual_seed(0)
        model = case.build().eval()
        gm = lora_fx.inject_lora(model, case.targets, rank=4, alpha=8, trainable=case.trainable,
                                 example_inputs=case.batch(model, 2, 7))
        r = gm.lora_report
        uses = ", ".join(f"{k} {v}" for k, v in sorted(r.counters.items()))
        cells = [status[case.name].get(c, "?") for c in CHECKS.values()]
        lines.append(f"| {case.name} | `{case.targets}` | {uses} ({len(r.sites)} weights) | "
                     f"{r.trainable_params:,} / {r.total_params:,} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    (out / "architecture_table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
