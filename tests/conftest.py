import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py, the shared architecture table

from battery import Built  # noqa: E402
from models import CASES  # noqa: E402

# one thread per xdist worker: the workers already fill the cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*bos_token_id.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# each row's tests run on one xdist worker (--dist loadgroup), so a row is built once
@pytest.fixture(scope="session", params=[pytest.param(c, marks=pytest.mark.xdist_group(c.name)) for c in CASES],
                ids=[c.name for c in CASES])
def built(request):
    """One architecture row (tests/models.py), built once per session."""
    return Built(request.param)
