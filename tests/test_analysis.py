"""lora_fx.analysis against cases computed by hand: the paper's subspace similarity, effective rank,
amplification, and the per-weight table from a graph and from its saved file."""
from __future__ import annotations

import pytest
import torch

import lora_fx
from export.cli import main as cli
from helpers import assert_close, randomize_lora, tiny_llama, token_ids

analysis = lora_fx.analysis


def _rows(*rows, features=8):
    """A [r, features] matrix whose row k is weight_k * e_index_k."""
    a = torch.zeros(len(rows), features, dtype=torch.float64)
    for k, (index, weight) in enumerate(rows):
        a[k, index] = weight
    return a


def test_subspace_similarity_of_nested_and_orthogonal_bases():
    a1 = _rows((0, 3.0), (1, 2.0), (2, 1.0))  # right-singular vectors e0, e1, e2, strongest first
    a2 = _rows((0, 5.0), (1, 4.0))  # e0, e1: inside a1's top 2
    phi = analysis.subspace_similarity(a1, a2)
    assert phi.shape == (3, 2)
    assert_close(phi, torch.ones(3, 2, dtype=torch.float64), ulps=1000)
    a3 = _rows((1, 5.0), (0, 4.0))  # the same two directions, in the other order
    phi = analysis.subspace_similarity(a1, a3)
    assert phi[0, 0] == pytest.approx(0.0, abs=1e-12)  # a1's top direction e0 is not a3's top (e1)
    assert phi[1, 1] == pytest.approx(1.0) and phi[0, 1] == pytest.approx(1.0)
    orthogonal = _rows((5, 2.0), (6, 1.0))
    assert analysis.subspace_similarity(a1, orthogonal).abs().max() < 1e-12
    with pytest.raises(ValueError, match="different inputs"):
        analysis.subspace_similarity(a1, torch.zeros(2, 9))


def test_random_baseline_is_low():
    phi = analysis.random_similarity(8, 64, features=512)
    assert phi.shape == (8, 64) and phi[0, 0] < 0.05  # E[phi(1, 1)] = 1/512


def test_effective_rank_and_singular_values():
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    delta = 3 * u[:, :1] @ v[:, :1].T + 1 * u[:, 1:2] @ v[:, 1:2].T  # singular values 3, 1: 90% / 10% of the energy
    values = analysis.singular_values(delta)
    assert values[:2].tolist() == pytest.approx([3.0, 1.0]) and values[2:].abs().max() < 1e-12
    assert analysis.effective_rank(values, 0.9) == 1
    assert analysis.effective_rank(values, 0.95) == 2
    assert analysis.effective_rank(torch.zeros(3)) == 0
    b, a = torch.randn(20, 3, dtype=torch.float64), torch.randn(3, 30, dtype=torch.float64)
    assert int((analysis.singular_values(b @ a) > 1e-9).sum()) == 3  # a rank-3 update has rank 3


def test_amplification_by_hand():
    w0 = torch.eye(4, dtype=torch.float64)
    delta = torch.zeros(4, 4, dtype=torch.float64)
    delta[0, 0] = 4.0  # U = V = e0: U^T W0 V = 1, ||dW|| = 4
    assert analysis.amplification(delta, w0, rank=1) == pytest.approx(4.0)
    assert analysis.amplification(2 * w0[:, :2] @ w0[:2], w0) == pytest.approx(2.0)  # rank 2 found from dW
    assert analysis.amplification(torch.zeros(3, 3), torch.eye(3)) == 0.0


def test_site_table_from_the_graph_and_from_its_file(tmp_path):
    model, ids = tiny_llama(), token_ids()
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=4, example_inputs=ids)
    at_init = analysis.site_table(gm)
    assert [r.effective_rank for r in at_init] == [0] * 4 and all(r.relative_norm == 0 for r in at_init)
    randomize_lora(gm)
    rows = analysis.site_table(gm)
    assert [r.weight for r in rows] == sorted(gm.lora_state.sites, key=list(gm.lora_state.sites).index)
    assert all(1 <= r.effective_rank <= 4 and r.relative_norm > 0 and r.amplification > 0 for r in rows)
    d = lora_fx.save_adapter(gm, tmp_path / "a")
    from_file = analysis.file_table(lora_fx.read_adapter(d), analysis.module_weights(model))
    for mine, theirs in zip(rows, from_file):
        assert theirs.weight == mine.weight.removesuffix(".weight")
        assert theirs.rank == mine.rank and theirs.effective_rank == mine.effective_rank
        assert theirs.relative_norm == pytest.approx(mine.relative_norm, rel=1e-5)
        assert theirs.amplification == pytest.approx(mine.amplification, rel=1e-5)
    text = analysis.format_table(rows)
    assert "model.layers.1.self_attn.v_proj.weight" in text and "amplification" in text


def test_analyze_command(tmp_path, capsys):
    model, ids = tiny_llama(), token_ids()
    dirs = []
    for rank, seed in ((2, 1), (8, 2)):
        gm = lora_fx.inject_lora(model, ["q_proj"], rank=rank, example_inputs=ids)
        randomize_lora(gm, seed=seed)
        dirs.append(str(lora_fx.save_adapter(gm, tmp_path / f"r{rank}")))
    model.save_pretrained(tmp_path / "base")
    png = tmp_path / "phi.png"
    assert cli(["analyze", dirs[0], dirs[1], "--base", str(tmp_path / "base"), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "phi(1, 1)" in out and "random" in out
    assert png.stat().st_size > 1000
    assert cli(["analyze", str(tmp_path / "nothing")]) == 2
