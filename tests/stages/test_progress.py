"""Progress bars: a redraw on a terminal, a line of its own in a log."""

from __future__ import annotations

from tasks.stages import StepContext


def test_into_a_log_each_update_is_a_whole_line_ending_at_the_total(capsys, tmp_path):
    ctx = StepContext(task="quantize:x", out=tmp_path, artifacts=tmp_path)
    assert list(ctx.progress(range(3), "layers", 3)) == [0, 1, 2]
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("  quantize:x: layers:   0%")
    assert lines[-1].startswith("  quantize:x: layers: 100%") and "3/3" in lines[-1]
    assert all(line.strip() for line in lines)
