"""Write-back started while a download is under way (tasks/writeback.py)."""

import os
import sys

import pytest
from test_remote import build, remote, remote_url  # noqa: F401 (fixtures)

from tasks import writeback
from tasks.store import Store
from tasks.writeback import STEP, WriteBack


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, fd, offset, length, flags):
        self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, flags))
        return 0


def test_ranges_are_queued_as_the_file_grows_and_the_rest_at_the_end(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"")
    wb, seen = WriteBack(path), Recorder()
    wb.call = seen
    for size in (1, STEP - 1, STEP, STEP + 5, 2 * STEP + 7, 2 * STEP + 9):
        wb.written(size)
    wb.finish()
    ranges = [(offset, length) for _, offset, length, _ in seen.calls]
    assert ranges == [(0, STEP), (STEP, STEP + 7), (2 * STEP + 7, 0)]  # 0: to the end
    assert {(p, f) for p, _, _, f in seen.calls} == {(str(path), writeback.SYNC_FILE_RANGE_WRITE)}
    assert wb.fd == -1  # its descriptor is closed


def test_a_file_that_is_not_there_is_left_to_the_fsync(tmp_path):
    wb = WriteBack(tmp_path / "never-made")
    wb.written(3 * STEP)
    wb.finish()  # no error: the publish's fsync (and its check of the files) is what counts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_real_call_is_found_and_accepted_on_linux(tmp_path):
    call = writeback._sync_file_range()
    assert call is not None
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * (STEP + 1))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert call(fd, 0, 0, writeback.SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)


def test_a_pull_starts_each_files_write_back(remote, tmp_path, monkeypatch):  # noqa: F811
    seen = Recorder()
    monkeypatch.setattr(writeback, "_sync_file_range", lambda: seen)
    here, there = Store(tmp_path / "here"), Store(tmp_path / "there")
    key = build(here, payload=b"weights" * 1000)
    remote.push(here, key)
    assert seen.calls == []  # an upload writes nothing here
    assert remote.pull(there, key) == there.entry(key)
    queued = {os.path.basename(p) for p, *_ in seen.calls}
    assert queued == {os.path.basename(f["path"]) for f in there.manifest(key)["files"]}


def test_a_call_back_after_finish_opens_nothing(tmp_path):
    """A download the caller gave up on (Ctrl-C) may still call back from fsspec's thread."""
    path = tmp_path / "w.bin"
    path.write_bytes(b"x")
    wb, seen = WriteBack(path), Recorder()
    wb.call = seen
    wb.finish()
    wb.written(3 * STEP)
    assert wb.fd == -1 and len(seen.calls) == 1  # finish's own, nothing after it
