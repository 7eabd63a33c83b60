import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py, the shared architecture table

torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*bos_token_id.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
