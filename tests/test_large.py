"""A model over ONNX's 2 GB protobuf limit exports with its weights as external data."""
import os

import onnx
import pytest
import torch
from torch import nn

import export


@pytest.mark.slow
def test_export_over_2gb_goes_to_external_data(tmp_path):
    n = 23_200  # one n x n fp32 weight: 2.15 GB, past protobuf's 2 GB limit
    model = nn.Sequential(nn.Linear(n, n, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, :3] = torch.tensor([1.0, 2.0, 3.0])
    path = export.export_onnx(model, tmp_path / "big.onnx", (torch.ones(2, n),))
    assert os.path.getsize(path) < 10_000_000  # the graph alone
    data = [p for p in tmp_path.iterdir() if p != path]
    assert data and sum(os.path.getsize(p) for p in data) >= 4 * n * n
    proto = onnx.load(str(path), load_external_data=False)
    init = proto.graph.initializer[0]
    assert init.data_location == onnx.TensorProto.EXTERNAL and tuple(init.dims) == (n, n)
    session = export.ort_session(path)
    out = export.ort_run(session, {session.get_inputs()[0].name: torch.ones(2, n)})[0]
    assert out.shape == (2, n) and out[0, 0].item() == 6.0 and out[0, 1:].abs().max().item() == 0
