"""Start the disk's write-back of a file while it is still being downloaded, so that the fsync
which publishes it later waits for little.

Linux's sync_file_range(SYNC_FILE_RANGE_WRITE) queues a range's dirty pages for writing and
returns: it promises nothing about durability (no metadata, no wait), the publish's fsync still
does that. The pages stay cached, so the digest check that follows reads memory, not the disk.
Where the call does not exist (not Linux, no such libc symbol) nothing starts early and the
fsync pays it all, as before.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

SYNC_FILE_RANGE_WRITE = 2
STEP = 8 << 20  # bytes between queued ranges: big enough that the calls cost nothing


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # here: a run that downloads nothing does not load it

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


class WriteBack:
    """One file that another party (s3fs, fsspec) writes: `written(n)` as its size grows queues
    every STEP bytes, `finish()` queues the rest. Failures are ignored: this only hurries what
    the fsync does anyway."""

    def __init__(self, path: Path) -> None:
        self.path, self.queued, self.fd, self.closed = path, 0, -1, False
        self.call = _sync_file_range()
        # written() runs in fsspec's IO thread, finish() in the caller's: a download the caller
        # gave up on (Ctrl-C, a timeout) may still call back after finish(), and must not
        # reopen the file.
        self.lock = threading.Lock()

    def written(self, size: int) -> None:
        if self.call is not None and size - self.queued >= STEP:
            with self.lock:
                if not self.closed:
                    self._queue(self.queued, size - self.queued)
                    self.queued = size

    def finish(self) -> None:
        with self.lock:
            if self.call is not None and not self.closed:
                self._queue(self.queued, 0)  # 0: to the end of the file
            self.closed = True
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def _queue(self, offset: int, length: int) -> None:
        if self.fd < 0:
            try:  # a descriptor of our own: the page cache is the file's, whoever writes it
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return
        self.call(self.fd, offset, length, SYNC_FILE_RANGE_WRITE)
