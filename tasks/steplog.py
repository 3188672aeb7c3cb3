"""A step's log: all a step writes to file descriptors 1 and 2 (its prints, warnings, progress
bars, and what C libraries and child processes write) reaches the terminal as before and a log
file too. The runner wraps each step:

    with steplog.capture(tmp_log, title=task):
        metrics = _run(...)
    # built: move tmp_log to store.log_path(key), beside the entry's manifest
    # failed: steplog.keep_failed(tmp_log, artifacts, task), name it in the summary, and
    #         quote steplog.tail(kept) in the error message

The redirect is of the file descriptors, not of sys.stdout, so nothing the step starts writes
around it; it is per process, so each `doit -n` worker captures its own step. stdout and stderr
go through a pipe each and come out on the stream they were written to (a report printed to
stdout can still be piped); one pipe for both would keep their order in the log exactly but
send everything to one stream. In the log they are interleaved in the order they are read, which
for writes made within a millisecond of each other may differ from the order they were made.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import selectors
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.staging import real_dir

FAILED_LOGS = Path("logs", "failed")  # under the artifacts root: the logs of failed steps
CHUNK = 1 << 16
LONG_FRAME = 1 << 16  # bytes without \r or \n: written to the log as they are, not held
JOIN_SECONDS = 10.0  # for the reader to pass on what is left in the pipes
# Set during a capture for the step's child processes (a stage environment's `tasks.envrun`),
# whose fd 2 is the pipe too: "1" when the user's stderr is a terminal, else "0".
INTERACTIVE_ENV = "MODELKILN_INTERACTIVE"
_SPLIT = re.compile(rb"(\r|\n)")

_active: list[_Capture] = []  # this process's captures in progress, innermost last


def interactive() -> bool:
    """Whether the user's stderr is a terminal: during a capture fd 2 is a pipe, and this is
    what it was before (in this process or the one that started this), so progress bars keep
    a terminal's refresh rate. Use it, not sys.stderr.isatty(), in anything a step runs."""
    if _active:
        return _active[0].interactive
    if (inherited := os.environ.get(INTERACTIVE_ENV)) in ("0", "1"):
        return inherited == "1"
    return _isatty(sys.stderr)


@contextlib.contextmanager
def capture(path: Path, title: str) -> Iterator[Path]:
    """Send fds 1 and 2 to where they went before and to a new log at path, for the block;
    child processes inherit the redirect. The log starts with a header line (title, UTC start
    time); a progress bar redrawn with \\r keeps only its last frame there. A log that cannot be
    written (a full disk) is said once on stderr and the step goes on. Yields path."""
    cap = _Capture(path, title)
    _active.append(cap)
    try:
        cap.start()
        yield path
    finally:
        try:
            cap.close()
        finally:
            _active.remove(cap)


def restore() -> None:
    """End every capture of this process now: for a signal handler that ends the process with
    os._exit, which skips the `with` blocks' exits and would lose what the pipes still hold
    (call it before the handler writes its own message)."""
    for cap in reversed(_active):
        cap.close()


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, for an error message ('' when there is none)."""
    data = b""
    try:
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            while end > 0 and data.count(b"\n") <= lines and len(data) < 1 << 20:
                step = min(8192, end)
                end -= step
                fh.seek(end)
                data = fh.read(step) + data
    except OSError:
        return ""
    kept = data.splitlines()[-lines:] if lines > 0 else []
    return b"\n".join(kept).decode(errors="replace")


def keep_failed(log: Path, artifacts: Path, task: str) -> Path:
    """Move a failed step's log to artifacts/logs/failed/<task>.<UTC yyyymmddThhmmssZ>.log (':'
    and anything else unsafe in a file name become '-'; '-2', '-3' ... if two fail within a
    second) and return where it went. `doit gc` removes these after glue.FAILED_LOG_DAYS."""
    folder = real_dir(real_dir(artifacts / FAILED_LOGS.parent) / FAILED_LOGS.name)
    name = re.sub(r"[^A-Za-z0-9._-]", "-", task)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 1
    while True:
        target = folder / f"{name}.{stamp}{f'-{n}' if n > 1 else ''}.log"
        try:
            open(target, "x").close()  # the name is this process's now: the move replaces it
            break
        except FileExistsError:
            n += 1
    try:
        shutil.move(log, target)
    except OSError:
        target.unlink()
        raise
    return target


class _Capture:
    """One capture: the saved fds, a pipe per stream and a thread that reads both."""

    def __init__(self, path: Path, title: str) -> None:
        self.interactive = interactive()  # before this capture changes fd 2
        self.saved: dict[int, int] = {}  # 1, 2 -> a duplicate of what it was
        self.readers: dict[int, int] = {}  # a pipe's read end -> the fd (1, 2) it stands for
        self.writers: list[int] = []
        self.wake: tuple[int, int] | None = None
        self.thread: threading.Thread | None = None
        self.deaf: set[int] = set()  # streams whose destination is gone (`doit | head`)
        self.environ: tuple[str | None] | None = None  # INTERACTIVE_ENV before, while set
        self.pid = os.getpid()  # a process forked in the block shares the pipes, not the reader
        self.log = _Log(path, title, self.warn)

    def start(self) -> None:
        _flush_streams()  # what was printed before goes where it went before
        for fd in (1, 2):
            self.saved[fd] = os.dup(fd)
            read, write = os.pipe()
            self.readers[read] = fd
            self.writers.append(write)
        self.wake = os.pipe()
        self.environ = (os.environ.get(INTERACTIVE_ENV),)
        os.environ[INTERACTIVE_ENV] = "1" if self.interactive else "0"
        self.thread = threading.Thread(target=self.pump, name="steplog", daemon=True)
        self.thread.start()
        for write, fd in zip(self.writers, (1, 2), strict=True):
            os.dup2(write, fd)

    def close(self) -> None:
        """Flush, restore fds 1 and 2, let the reader pass on what the pipes hold, close all.
        Each part is done once, so a signal handler may call it while the `with` exit runs."""
        _flush_streams()
        for fd, saved in list(self.saved.items()):
            os.dup2(saved, fd)
        if os.getpid() != self.pid:  # waking the reader would stop it for the parent too
            return
        if self.environ is not None:
            (before,), self.environ = self.environ, None
            if before is None:
                os.environ.pop(INTERACTIVE_ENV, None)
            else:
                os.environ[INTERACTIVE_ENV] = before
        while self.writers:
            os.close(self.writers.pop())
        if self.wake is not None:
            with contextlib.suppress(OSError):
                os.write(self.wake[1], b"x")
        if (thread := self.thread) is not None:
            thread.join(JOIN_SECONDS)
            if thread.is_alive():  # stuck writing (a stopped terminal): leave it its fds
                self.warn(f"modelkiln: the log {self.log.path} may be incomplete (its reader "
                          "did not finish)\n")  # fmt: skip
                return
            self.thread = None
            self.drain()  # if the reader died, what it left
        self.log.close()
        while self.readers:
            os.close(self.readers.popitem()[0])  # a pipe's read end
        while self.saved:
            os.close(self.saved.popitem()[1])  # the duplicate of fd 1 or 2
        if self.wake is not None:
            wake, self.wake = self.wake, None
            os.close(wake[0])
            os.close(wake[1])

    def pump(self) -> None:
        """The reader thread. If reading into the log fails it goes on passing the bytes on
        (children blocked on a full pipe that nobody reads would hang the step); if even that
        fails, fds 1 and 2 go back to the saved ones."""
        try:
            self.read_until_woken()
        except Exception as err:  # a bug here must cost the log, never the step
            self.log.lose(f"its reader failed: {err!r}")
            try:
                self.read_until_woken()  # the log is closed: passing on only
            except Exception:
                for fd, saved in list(self.saved.items()):
                    os.dup2(saved, fd)
                raise

    def read_until_woken(self) -> None:
        """Pass each stream's bytes on and into the log until both pipes end or close() wakes
        it, then take what is left."""
        assert self.wake is not None
        with selectors.DefaultSelector() as sel:
            open_ = set(self.readers)
            for fd in [*open_, self.wake[0]]:
                sel.register(fd, selectors.EVENT_READ)
            while open_:
                ready = [key.fd for key, _ in sel.select()]
                for reader in open_.intersection(ready):
                    if data := os.read(reader, CHUNK):
                        self.forward(reader, data)
                    else:
                        sel.unregister(reader)
                        open_.discard(reader)
                if self.wake[0] in ready:
                    self.drain()
                    return

    def drain(self) -> None:
        """Pass on what the pipes hold now, without waiting for more: a process the step left
        running may hold their write ends open forever."""
        for fd in list(self.readers):
            os.set_blocking(fd, False)
            with contextlib.suppress(BlockingIOError):
                while data := os.read(fd, CHUNK):
                    self.forward(fd, data)

    def forward(self, reader: int, data: bytes) -> None:
        fd = self.readers[reader]
        if fd not in self.deaf:
            try:
                _write_all(self.saved[fd], data)
            except OSError:  # the terminal or pipe is gone; the log still gets everything
                self.deaf.add(fd)
        self.log.feed(fd, data)

    def warn(self, text: str) -> None:
        """To the user's stderr, around the capture (in the log, it would loop back)."""
        with contextlib.suppress(OSError):
            _write_all(self.saved.get(2, 2), text.encode(errors="replace"))


class _Log:
    """The log file: the header, then each stream's lines. A write that fails (a full disk)
    ends the log, never the step: one warning says that it is incomplete."""

    def __init__(self, path: Path, title: str, warn: Any) -> None:
        self.path, self.warn = path, warn
        self.lines = {1: _Frames(), 2: _Frames()}
        self.fd: int | None = None
        self.lost = False
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as err:
            self.lose(err.strerror or str(err))
        self.write(f"# {title}, started {stamp}\n".encode())

    def feed(self, fd: int, data: bytes) -> None:
        if self.fd is not None:
            self.write(self.lines[fd].feed(data))

    def close(self) -> None:
        for frames in self.lines.values():
            self.write(frames.end())
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def write(self, data: bytes) -> None:
        if self.fd is None or not data:
            return
        try:
            _write_all(self.fd, data)  # unbuffered: `tail -f` shows a long step as it runs
        except OSError as err:
            self.lose(err.strerror or str(err))

    def lose(self, why: str) -> None:
        if self.lost:
            return
        self.lost = True
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        self.warn(f"modelkiln: the log {self.path} is incomplete from here on ({why}); "
                  "the step goes on\n")  # fmt: skip


class _Frames:
    """One stream's bytes as log lines. Of a line redrawn with \\r (a progress bar) the log
    keeps the last frame; a blank frame (a bar clearing itself) ends the bar, so both its last
    frame and the text drawn over it stay."""

    def __init__(self) -> None:
        self.frame = b""  # the frame being written
        self.last = b""  # the last non-blank frame of the bar being drawn
        self.kept = False  # part of this line is in the log already
        self.raw = False  # a long frame is being written as it comes

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for piece in _SPLIT.split(data):
            if piece == b"\r":
                self.end_frame(out)
            elif piece == b"\n":
                self.end_line(out)
            elif piece:
                self.frame += piece
                if len(self.frame) > LONG_FRAME:
                    if self.last:  # a bar, then a frame too long to hold
                        out.append(self.last + b"\n")
                    out.append(self.frame)
                    self.frame, self.last, self.raw = b"", b"", True
        return b"".join(out)

    def end(self) -> bytes:
        """What is pending when the stream ends: a last line without its newline."""
        out: list[bytes] = []
        if self.frame or self.last or self.raw:
            self.end_line(out)
        return b"".join(out)

    def end_frame(self, out: list[bytes]) -> None:
        if self.raw:
            out.append(self.frame + b"\n")
            self.raw, self.kept = False, True
        elif self.frame.strip():
            self.last = self.frame
        elif self.last:
            out.append(self.last + b"\n")
            self.last, self.kept = b"", True
        self.frame = b""

    def end_line(self, out: list[bytes]) -> None:
        if self.raw or self.frame.strip():
            out.append(self.frame + b"\n")
        elif self.last:
            out.append(self.last + b"\n")
        elif not self.kept:  # an empty line of its own
            out.append(self.frame + b"\n")
        self.frame, self.last, self.kept, self.raw = b"", b"", False, False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # a destination someone set non-blocking: wait until it drains
            select.select([], [fd], [])


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no stream, or a closed one
        return False


def _flush_streams() -> None:
    """Python's buffers and libc's: C libraries' stdout into a pipe is fully buffered, and
    what they printed last would otherwise reach the terminal after the capture, not the log."""
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    for stream in {id(s): s for s in streams if s is not None}.values():
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    if (libc := _libc()) is not None:
        libc.fflush(None)


@functools.cache
def _libc() -> Any:
    import ctypes  # here: only a capture needs it

    try:
        return ctypes.CDLL(None)
    except OSError:
        return None
