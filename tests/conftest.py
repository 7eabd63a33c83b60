import functools
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py, tests/models.py

from helpers import Built, tiny_llama  # noqa: E402
from models import CASES  # noqa: E402

# one thread per xdist worker: the workers already fill the cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*bos_token_id.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@functools.cache
def _built(name: str) -> Built:
    # pytest keeps one instance of a parametrized session fixture at a time and builds a row again
    # when tests of other rows ran in between; this cache builds each row once per process
    return Built(next(c for c in CASES if c.name == name))


def pytest_itemcollected(item):
    """Every test of one architecture row goes to one xdist worker (--dist loadgroup), so each row
    is built, captured and exported once. (Marked here, as each test is collected: xdist reads the
    marks before any later hook could add them, and a mark on the fixture's params does not reach it.)"""
    params = getattr(getattr(item, "callspec", None), "params", {})
    case = params.get("built", params.get("decoder"))
    if case is not None:
        item.add_marker(pytest.mark.xdist_group(case.name))


@pytest.fixture(scope="session", params=CASES, ids=[c.name for c in CASES])
def built(request):
    """One architecture row (tests/models.py): the model, its one capture, injected graphs, exports."""
    return _built(request.param.name)


@pytest.fixture(scope="session", params=[c for c in CASES if c.causal], ids=[c.name for c in CASES if c.causal])
def decoder(request):
    """One causal-LM row of the table (it generates), as `built` builds it."""
    return _built(request.param.name)


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory):
    """Where the rows' ONNX exports go (made once per row, see Built.onnx)."""
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama, shared by a module's tests (which must not change it)."""
    return tiny_llama()

