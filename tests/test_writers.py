"""Killed writers lose nothing: an ONNX export (with external data), a multi-adapter export, an
.onnx_adapter and a kv export's genai_config.json, each interrupted at every rename it makes, killed
(SIGKILL) at several moments, or out of disk space, leave the previous file set whole and loadable,
or the new one whole: never a mix."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import export
import lora_fx
from helpers import assert_close, randomize_lora, rel_diff, tiny_llama, token_ids

IDS = token_ids(2, 6)


class Killed(BaseException):
    """Stands in for the process dying: nothing after it runs (no `except Exception` catches it)."""


@pytest.fixture(scope="module")
def graphs():
    """The untouched model's graph (the previous export) and an adapted one (the new export)."""
    model = tiny_llama()
    base = lora_fx.capture(model, IDS)
    gm = lora_fx.inject_lora(base, ["q_proj", "v_proj"], rank=4, adapter="a")
    randomize_lora(gm)
    lora_fx.add_adapter(gm, "b", rank=4)
    return base, gm


def _outputs(path: Path, inputs=IDS) -> torch.Tensor:
    return export.ort_run(export.ort_session(path), inputs)[0]


def _files(folder: Path) -> set[str]:
    return {f.name for f in folder.iterdir()}


def _interrupt_at(monkeypatch, k: int) -> list[str]:
    """Make the k-th os.replace of the writer the moment it dies (before that rename happens)."""
    calls, real = [], os.replace

    def replace(src, dst):
        calls.append(str(dst))
        if len(calls) > k:
            raise Killed
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize("writer", ["export_onnx", "export_multi_adapter"])
def test_an_interrupted_onnx_export_leaves_the_previous_set_or_the_new_one(graphs, tmp_path, monkeypatch, writer):
    base, gm = graphs
    path = tmp_path / "model.onnx"
    export.export_onnx(lora_fx.merge_lora(gm, adapters="a"), path, external_data=True)  # the previous export
    old, old_files = _outputs(path), _files(tmp_path)
    assert any(f.endswith(".data") for f in old_files)  # the graph's weights are in a file beside it
    # the new one: the untouched model, or the multi-adapter graph (no adapter fed: the base model's outputs)
    write = (lambda p: export.export_onnx(base, p, external_data=True)) if writer == "export_onnx" \
        else (lambda p: export.export_multi_adapter(gm, p))
    with torch.no_grad():
        new = base(**IDS).logits
    assert (new - old).abs().max() > 1e-3
    renames = None
    for k in range(8):
        with monkeypatch.context() as m:
            calls = _interrupt_at(m, k)
            try:
                write(path)
                renames = len(calls)
            except Killed:
                pass
        got = _outputs(path)  # whatever happened, what is at `path` loads and is one whole export
        committed = any(c == str(path) for c in calls[:k])
        assert_close(got, new if committed else old, ulps=1000, what=f"interrupted before rename {k}")
        if renames is not None:
            break
    assert renames is not None and renames >= 1
    names = _files(tmp_path)
    assert not [n for n in names if ".partial-" in n]  # interrupted staging folders were cleaned
    assert len([n for n in names if n.endswith(".data")]) <= 1  # the replaced graph's data went with it


def test_an_interrupted_onnx_adapter_keeps_the_previous_file(graphs, tmp_path, monkeypatch):
    _, gm = graphs
    multi = export.export_multi_adapter(gm, tmp_path / "multi.onnx")
    path = export.export_adapter(gm, tmp_path / "x.onnx_adapter", multi, name="a")
    before = path.read_bytes()
    with monkeypatch.context() as m:
        _interrupt_at(m, 0)
        with pytest.raises(Killed):
            export.export_adapter(gm, path, multi, name="b")
    assert path.read_bytes() == before
    server = export.AdapterServer(multi)
    server.load("x", path)  # still the whole previous adapter
    assert not [n for n in _files(tmp_path) if ".partial-" in n]


def test_an_interrupted_kv_export_keeps_graph_and_genai_config_together(graphs, tmp_path, monkeypatch):
    base, gm = graphs
    path = tmp_path / "model.onnx"
    export.export_onnx(base, path, kv_cache=True)
    old_config = (tmp_path / "genai_config.json").read_text()
    with monkeypatch.context() as m:
        calls = _interrupt_at(m, 1)  # the graph is in place, genai_config.json not yet
        with pytest.raises(Killed):
            export.export_onnx(lora_fx.merge_lora(gm, adapters="a"), path, kv_cache=True)
    assert calls[0] == str(path) and calls[1].endswith("genai_config.json")
    assert (tmp_path / "genai_config.json").read_text() == old_config  # the same model's config: it still fits
    export.ort_session(path)  # the new graph, whole
    assert not [n for n in _files(tmp_path) if ".partial-" in n]


def test_a_full_disk_is_a_clear_error_and_the_previous_export_stays(graphs, tmp_path, monkeypatch):
    base, gm = graphs
    path = export.export_onnx(base, tmp_path / "model.onnx")
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(torch.onnx.ONNXProgram, "save", full)
        with pytest.raises(export.ExportError, match=r"no space left to write .*model.onnx.*was not touched"):
            export.export_onnx(lora_fx.merge_lora(gm), path)
    assert path.read_bytes() == before and _files(tmp_path) == {"model.onnx"}


KILLED = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import export, lora_fx
    from helpers import randomize_lora, tiny_llama, token_ids
    gm = lora_fx.inject_lora(tiny_llama(), ["q_proj", "v_proj"], rank=4, example_inputs=token_ids(2, 6), adapter="a")
    randomize_lora(gm)
    folded = lora_fx.merge_lora(gm)
    print("ready", flush=True)
    while True:  # export again and again: the kill lands somewhere in one of them
        export.export_onnx(folded, {path!r}, external_data=True)
""")


def _staging(folder: Path) -> list[Path]:
    return [d for d in folder.glob(".model.onnx.partial-*") if d.is_dir()]


TRIGGERS = {  # when to kill the writer (process `pid`): the moments its files change
    "staging started": lambda folder, pid: bool(_staging(folder)),
    "graph written to staging": lambda folder, pid: any((d / "model.onnx").exists() for d in _staging(folder)),
    "just after its first commit": lambda folder, pid: any(folder.glob(f"model.onnx.{pid}-*.data")),
}  # the moment between its data moving in and its graph's rename: test_an_interrupted_onnx_export_...


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(TRIGGERS))
def test_a_writer_killed_at_any_moment_leaves_a_whole_export(graphs, tmp_path, moment):
    base, gm = graphs
    path = tmp_path / "model.onnx"
    export.export_onnx(base, path, external_data=True)
    old = _outputs(path)
    with torch.no_grad():
        new = lora_fx.merge_lora(gm, adapters="a")(**IDS).logits
    child = subprocess.Popen([sys.executable, "-c", KILLED.format(tests=os.path.dirname(__file__), path=str(path))],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        end = time.monotonic() + 120
        while not TRIGGERS[moment](tmp_path, child.pid) and time.monotonic() < end:
            time.sleep(0.0005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    got = _outputs(path)  # SIGKILL: no cleanup ran; what is at `path` is one whole export
    if rel_diff(got, new) > 1e-4:
        assert_close(got, old, ulps=1000, what=f"killed when {moment}")
    export.export_onnx(lora_fx.merge_lora(gm, adapters="a"), path, external_data=True)  # cleans up after the dead writer
    assert not [n for n in _files(tmp_path) if ".partial-" in n]
    assert len([n for n in _files(tmp_path) if n.endswith(".data")]) == 1
    assert_close(_outputs(path), new, ulps=1000)
