"""One protocol for a folder of keyed builds that several processes share: the store's entries,
the stage environments and the download cache all build this way.

    <root>/.locks/<key>.lock            one flock per key, released by the kernel when its holder dies
    <root>/.tmp/<key>.<pid>             a build in progress, or a failed one left to inspect
    <root>/.tmp/<key>.deleting-<pid>    an entry moved aside to be removed
    <root>/.tmp/<key>.scratch-<pid>     a step's scratch space (unpacked downloads, ...)

A temporary directory is stale when nobody holds its key's lock: the builder holds it for as long
as it builds, so this holds across PID namespaces (two containers sharing a volume), where asking
whether the pid in the name is alive would not. Maintenance removes only names of these forms and
never follows a symbolic link: a `.tmp` or `.locks` that is a link is refused, not entered.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import StoreError
from tasks.record import Record, frozen

if TYPE_CHECKING:
    import filelock

KEY = re.compile(r"^[0-9a-f]{64}$")
TMP_NAME = re.compile(r"^(?P<key>[0-9a-f]{64})\.(?:deleting-|scratch-)?\d+$")
KINDS = ("", "deleting", "scratch")


@frozen
class Staging(Record):
    root: Path

    @property
    def tmp_dir(self) -> Path:
        return self.root / ".tmp"

    @property
    def locks_dir(self) -> Path:
        return self.root / ".locks"

    @contextlib.contextmanager
    def lock(
        self,
        key: str,
        on_wait: Callable[[], None] | None = None,
        wait: bool = True,
        probe: bool = False,
    ) -> Iterator[bool]:
        """Exclusive per-key lock. Yields True once held; with wait=False, False at once if
        another process holds it. A kernel lock (flock through filelock) and never filelock's
        soft fallback: staleness is "nobody holds the lock", which only a lock the kernel
        releases when its holder dies can tell. probe: only whether nobody holds it, lock
        nothing (a dry run, which must work on a read-only store too)."""
        if probe:
            yield not self._held(key)
            return
        import filelock  # only where a lock is taken: a no-op `doit` takes none (24 ms)

        path = real_dir(self.locks_dir) / f"{key}.lock"
        lock = filelock.UnixFileLock(
            path, thread_local=False, fallback_to_soft=False, preserve_lock_file=True
        )
        if not _acquire(lock, blocking=False):
            if not wait:
                yield False
                return
            if on_wait:
                on_wait()
            _acquire(lock, blocking=True)
        try:
            yield True
        finally:
            lock.release()

    def _held(self, key: str) -> bool:
        """Whether a process holds key's lock, asked through a read-only descriptor (flock
        does not need write access) and let go at once."""
        import fcntl

        try:
            fd = os.open(self.locks_dir / f"{key}.lock", os.O_RDONLY)
        except OSError:
            return False  # never locked here (or not readable: a dry run only lists)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing lets the probe's own lock go
        return False

    def new_tmp(self, key: str, kind: str = "") -> Path:
        """A fresh temporary directory for key; hold the key's lock while it is in use. A new
        build ("" kind) first removes what earlier builds of the key left: holding the lock,
        this process knows that none of them is running."""
        assert kind in KINDS and KEY.match(key), (key, kind)
        name = f"{key}.{kind + '-' if kind else ''}{os.getpid()}"
        tmp = real_dir(self.tmp_dir) / name
        if not kind:
            for old in self._tmps():
                if old.name.startswith(f"{key}."):
                    shutil.rmtree(old, ignore_errors=True)
        remove_path(tmp)
        try:
            tmp.mkdir()
        except OSError as err:
            raise StoreError(os_problem(err, tmp, "create")) from None
        return tmp

    def sweep(self, dry_run: bool = False) -> list[tuple[Path, int]]:
        """Remove (dry_run: only list) every temporary directory whose key's lock nobody holds:
        a dead or failed build. Each is removed under that lock. Returns (path, bytes)."""
        found = []
        for path in self._tmps():
            with self.lock(TMP_NAME.match(path.name)["key"], wait=False, probe=dry_run) as held:
                if held:
                    found.append((path, disk_usage(path)))
                    if not dry_run:
                        shutil.rmtree(path, ignore_errors=True)
        return found

    def _tmps(self) -> list[Path]:
        """Directories in .tmp named as this protocol names them; anything else is left alone."""
        if not self.tmp_dir.exists() and not self.tmp_dir.is_symlink():
            return []
        tmp_root = real_dir(self.tmp_dir, create=False)
        return sorted(
            p for p in tmp_root.iterdir()
            if TMP_NAME.match(p.name) and p.is_dir() and not p.is_symlink()
        )  # fmt: skip


def _acquire(lock: filelock.UnixFileLock, blocking: bool) -> bool:
    import filelock

    try:
        lock.acquire(blocking=blocking)
    except filelock.Timeout:
        return False
    except OSError as err:
        raise StoreError(os_problem(err, lock.lock_file, "lock")) from None
    return True


def disk_usage(folder: Path) -> int:
    """Bytes under a folder, each file once, links not followed (a venv's lib64 links to lib)."""
    seen, total = set(), 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            stat = os.lstat(os.path.join(dirpath, name))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total


def remove_path(path: Path) -> None:
    """Remove whatever is at path; a link is removed itself, never what it points at."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def real_dir(path: Path, create: bool = True) -> Path:
    """path as a real directory (made if missing); a symbolic link there is refused, so no
    build or maintenance ever writes or deletes through one."""
    if path.is_symlink():
        raise StoreError(
            f"{path} is a symbolic link (to {os.readlink(path)}): modelkiln never follows links "
            "inside its folders",
            fix=f"remove the link (`rm {path}`); the next run recreates it",
        )
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(os_problem(err, path, "create")) from None
    elif not path.is_dir():
        raise StoreError(f"{path} is not a directory", fix="move it away")
    return path


# errno -> (what it means, the fix)
FILESYSTEM_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free space there, then run `doit` again"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there, then run `doit` again"),
    errno.EROFS: (
        "the file system is read-only",
        "point artifacts= at a writable directory; `doit list`, `explain` and `verify` still "
        "work on a read-only store",
    ),
    errno.EACCES: (
        "permission denied",
        "make it writable for this user, or use another artifacts=",
    ),
    errno.EPERM: ("permission denied", "make it writable for this user, or use another artifacts="),
    errno.ENOTDIR: ("a part of the path is a file", "point artifacts= at a directory"),
    errno.EEXIST: ("something else is already there", "move it away"),
}


def os_problem(err: OSError, path: Path | str | None = None, doing: str = "write") -> str:
    """One line (and a fix) for a failure of the machine itself; the path is the error's own
    where it names one (some writers, such as sqlite's, name none). Of two (a copy's or a
    rename's), the second is the one written: shutil.copyfile's full disk names its source
    first, which is a store entry when a step copies its input."""
    where = err.filename2 or err.filename or path
    what, fix = FILESYSTEM_ERRORS.get(err.errno or 0, (err.strerror or str(err), ""))
    if doing == "read" and err.errno in (errno.EACCES, errno.EPERM):
        fix = "make it readable for this user"  # an input: writing it is not the point
    text = f"cannot {doing} {where}: {what}" if where else f"cannot {doing}: {what}"
    return f"{text}\n  fix: {fix}" if fix else text
