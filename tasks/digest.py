"""Content digests of files and directories, with a stat cache so big files are hashed once.

A file's digest is xxh3-128 of its bytes (several times faster than SHA-256 on model weights).
The cache maps (device, inode, size, mtime_ns) to a digest, as DVC does: a file that has not
been touched is never read again. A directory's digest is the digest of its sorted listing of
(relative path, size, file digest), so renaming, adding or changing any file changes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import sys
import time
from pathlib import Path


def hash_file(path: Path) -> str:
    """xxh3-128 hex digest of a file's contents (hashlib.file_digest: reads in 256 KiB chunks
    into one buffer, 30% faster than 8 MiB reads on a 600 MB file, cache warm)."""
    import xxhash  # here: a no-op run hashes nothing

    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, xxhash.xxh3_128).hexdigest()


def list_files(root: Path, hidden: bool = True) -> list[Path]:
    """Every regular file under root, as sorted relative paths (symlinks followed).

    hidden=False skips dot-files and dot-folders (.git, .cache/huggingface): tool metadata that
    changes without the content changing."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if not hidden:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            filenames = [f for f in filenames if not f.startswith(".")]
        for name in filenames:
            out.append(Path(dirpath, name).relative_to(root))
    return sorted(out)


def dir_size(root: Path) -> int:
    """Total bytes of the files under root."""
    return sum((root / rel).stat().st_size for rel in list_files(root))


def _enable_wal(db: sqlite3.Connection) -> None:
    """WAL lets readers and a writer overlap. Switching to it ignores the busy timeout when
    another process holds the file, so retry briefly; WAL is sticky, one success is enough."""
    for _ in range(100):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            time.sleep(0.02)


# sqlite's result codes for a file that is not, or no longer, a sound database.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def _damaged(err: Exception) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    return isinstance(err, sqlite3.DatabaseError) and code in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


class DigestCache:
    """SQLite map from a file's stat signature to its digest; safe across processes.

    A cache that cannot be opened or written (a read-only store, a full disk) only costs
    speed: digests are then computed and kept in memory for this run, with one warning."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._db: sqlite3.Connection | None = None
        self._memory: dict[tuple[int, ...], str] | None = None  # set once the file fails
        self._renewed = False  # a damaged file was replaced in this process

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            _enable_wal(self._db)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS digests (dev INTEGER, ino INTEGER, size INTEGER,"
                " mtime_ns INTEGER, digest TEXT, PRIMARY KEY (dev, ino, size, mtime_ns))"
            )
        return self._db

    def file_digest(self, path: Path) -> str:
        st = os.stat(path)
        sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self._memory is not None:
            if sig not in self._memory:
                self._memory[sig] = hash_file(path)
            return self._memory[sig]
        query = "SELECT digest FROM digests WHERE dev=? AND ino=? AND size=? AND mtime_ns=?"
        try:
            row = self._conn().execute(query, sig).fetchone()
        except (sqlite3.Error, OSError) as err:
            return self._without_file(err, path)
        if row:
            return row[0]
        digest = hash_file(path)
        try:
            self._conn().execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)",
                                 (*sig, digest))  # fmt: skip
        except (sqlite3.Error, OSError) as err:
            self._without_file(err, path)
        return digest

    def _without_file(self, err: Exception, path: Path) -> str:
        self.close()
        if _damaged(err) and self._start_afresh(err):
            return self.file_digest(path)
        print(f"modelkiln: the digest cache {self.db_path} cannot be used ({err}); hashing "
              "without it", file=sys.stderr)  # fmt: skip
        self._memory = {}
        return self.file_digest(path)

    def _start_afresh(self, err: Exception) -> bool:
        """A damaged cache file (not a database, a malformed image) would cost every later run
        a warning and a re-hash of every local input; it holds nothing that cannot be hashed
        again, so it is removed, once per process, and a new one started."""
        if self._renewed:
            return False
        self._renewed = True
        try:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.db_path}{suffix}").unlink(missing_ok=True)
        except OSError:
            return False
        print(f"modelkiln: the digest cache {self.db_path} was damaged ({err}); it is "
              "replaced by a new one, and local inputs are hashed again", file=sys.stderr)  # fmt: skip
        return True

    def tree_digest(self, root: Path) -> str:
        """Digest of a directory (or a single file) from its files' cached digests; dot-files
        are left out, so a git checkout or a hub download cache does not change it."""
        if root.is_file():
            return self.file_digest(root)
        import xxhash

        h = xxhash.xxh3_128()
        for rel in list_files(root, hidden=False):
            path = root / rel
            h.update(
                f"{rel.as_posix()}\0{path.stat().st_size}\0{self.file_digest(path)}\n".encode()
            )
        return h.hexdigest()

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
