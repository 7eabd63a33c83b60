"""The suite's one numeric comparison scales with the values compared and their dtype."""
import pytest
import torch

from helpers import assert_close, rel_diff


def test_float32_rounding_passes_at_any_scale_and_a_real_error_does_not():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    for scale in (1e-3, 1.0, 39.0, 1e4):
        y = x * scale
        assert_close(y * (1 + 3e-7), y)  # issue 27: 1.05e-5 at magnitude 39 is float32 rounding
        with pytest.raises(AssertionError, match="relative difference"):
            assert_close(y + 1e-3 * scale, y)


def test_the_tolerance_follows_the_dtype():
    x = torch.linspace(-2, 2, 50)
    assert_close(x.bfloat16(), x, ulps=1)  # one bfloat16 rounding
    with pytest.raises(AssertionError):
        assert_close(x.bfloat16().float(), x)  # stored as float32: float32's tolerance
    assert_close(x.bfloat16().float(), x, dtype=torch.bfloat16, ulps=1)
    assert rel_diff(torch.zeros(3), torch.zeros(3)) == 0
