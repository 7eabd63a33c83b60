"""`lora-fx diff` and the HTML view; export errors."""
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import export
import lora_fx
from export import cli
from export.render import ADDED, CHANGED, WEIGHTS
from helpers import randomize_lora, token_ids

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (CI installs it)")


@pytest.fixture(scope="module")
def files(llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    base = lora_fx.capture(llama, token_ids())
    gm = lora_fx.inject_lora(base, ["q_proj"], rank=2)
    randomize_lora(gm)
    folded = lora_fx.merge_lora(gm)
    paths = {
        "base": export.export_onnx(base, d / "base.onnx"),
        "folded": export.export_onnx(folded, d / "folded.onnx"),
        "lora": export.export_onnx(gm, d / "lora.onnx"),
        "base_pt2": lora_fx.save_graph(base, d / "base.pt2"),
        "folded_pt2": lora_fx.save_graph(folded, d / "folded.pt2"),
        "lora_pt2": lora_fx.save_graph(gm, d / "lora.pt2"),
    }
    return d, paths


@pytest.fixture()
def run(capsys):
    """`lora-fx ARGS` in this process: (exit status, stdout, stderr)."""

    def call(*args):
        code = cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return call


def test_the_command_runs_as_a_program(files):
    """The installed entry point's module, in a process of its own (the other tests call main())."""
    _, p = files
    r = subprocess.run([sys.executable, "-m", "export.cli", "diff", str(p["base"]), str(p["folded"])],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "same structure" in r.stdout


def test_onnx_same_structure_exits_0(files, run):
    _, p = files
    r = run("diff", p["base"], p["folded"])
    assert r.returncode == 0, r.stderr
    assert "same structure" in r.stdout and "changed initializer model.layers.0.self_attn.q_proj.weight" in r.stdout


def test_onnx_different_structure_exits_1(files, run):
    _, p = files
    r = run("diff", p["base"], p["lora"])
    assert r.returncode == 1, r.stderr
    assert "DIFFERENT structure" in r.stdout and "+ " in r.stdout and "~ " in r.stdout


def test_saved_graphs(files, run):
    _, p = files
    assert run("diff", p["base_pt2"], p["folded_pt2"]).returncode == 0
    r = run("diff", p["base_pt2"], p["lora_pt2"])
    assert r.returncode == 1 and "graphs differ" in r.stdout


def test_bad_arguments_exit_2(files, run):
    d, p = files
    assert run("diff", p["base"], d / "missing.onnx").returncode == 2
    r = run("diff", p["base"], p["base_pt2"])
    assert r.returncode == 2 and "two .onnx files or two .pt2 graphs" in r.stderr
    # not ONNX at all (issue 27: was a protobuf traceback and exit 1, "the graphs differ")
    (d / "not_onnx.onnx").write_text("hello")
    r = run("diff", d / "not_onnx.onnx", d / "not_onnx.onnx")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    with pytest.raises(Exception):
        run("--debug", "diff", d / "not_onnx.onnx", d / "not_onnx.onnx")


@needs_dot
def test_html_view_highlights_changes(files, run):
    d, p = files
    out = d / "view.html"
    r = run("diff", p["base"], p["lora"], "--html", out)
    assert r.returncode == 1
    page = out.read_text()
    assert "<svg" in page and ADDED in page and CHANGED in page
    out2 = d / "view2.html"
    assert run("diff", p["base"], p["folded"], "--html", out2).returncode == 0
    assert WEIGHTS in out2.read_text()  # nodes reading the folded weights
    out3 = d / "view3.html"
    assert run("diff", p["base_pt2"], p["lora_pt2"], "--html", out3).returncode == 1
    assert ADDED in out3.read_text()


def test_html_without_dot_says_how_to_install(files, monkeypatch):
    from export import render

    _, p = files
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install graphviz"):
        render.onnx_diff_html(p["base"], p["folded"], p["base"].parent / "x.html")


def test_export_to_missing_or_readonly_directory(llama, tmp_path):
    model, IDS = llama, token_ids()
    with pytest.raises(export.ExportError, match="does not exist"):
        export.export_onnx(model, tmp_path / "nope" / "m.onnx", IDS)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root can write anyway
            with pytest.raises(export.ExportError, match="no write permission"):
                export.export_onnx(model, ro / "m.onnx", IDS)
    finally:
        ro.chmod(0o700)


def test_torch_export_failure_is_not_blamed_on_lora(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)  # Mixtral's experts go through an op torch.onnx has no translation for
    model = MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                             num_local_experts=4, num_experts_per_tok=2)).eval()
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=2, example_inputs=token_ids())
    with pytest.raises(export.ExportError, match="(?s)cannot export MixtralForCausalLM even without LoRA.*not caused by LoRA"):
        export.export_onnx(lora_fx.merge_lora(gm), tmp_path / "mixtral.onnx")
    with pytest.raises(export.ExportError, match="even without LoRA"):  # unfolded: the base is tried too
        export.export_onnx(gm, tmp_path / "mixtral_lora.onnx")
