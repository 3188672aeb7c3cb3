"""One choice of calibration windows for every calibrating quantizer, Hugging Face or ONNX."""

from __future__ import annotations

import pytest

from tasks.errors import StageError
from tasks.stages.quantize.windows import calibration_windows


def test_windows_are_evenly_spread_from_the_start_to_the_end():
    ids = list(range(1000))
    windows = calibration_windows(ids, num_samples=4, seq_len=100)
    assert [w[0] for w in windows] == [0, 300, 600, 900]
    assert windows[-1][-1] == 999
    assert all(w == list(range(w[0], w[0] + 100)) for w in windows)


def test_one_window_starts_at_the_beginning():
    assert calibration_windows(list(range(50)), num_samples=1, seq_len=10) == [list(range(10))]


def test_too_short_a_split_is_an_error_never_fewer_windows():
    with pytest.raises(StageError) as err:
        calibration_windows(list(range(500)), num_samples=8, seq_len=64)
    assert "8 x 64 tokens" in str(err.value) and "has 500" in str(err.value)
    assert "lower num_samples or seq_len" in str(err.value)
