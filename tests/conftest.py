import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py, the shared architecture table

from battery import Built  # noqa: E402
from models import CASES  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*bos_token_id.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", params=CASES, ids=[c.name for c in CASES])
def built(request):
    """One architecture row (tests/models.py), built once per session."""
    return Built(request.param)
