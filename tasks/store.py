"""The artifact store: one immutable directory per key, complete only once MANIFEST.json exists.

Layout under the artifacts root:
    store/<key[:2]>/<key>/      a finished entry: the step's files and MANIFEST.json
    store/.tmp/<key>.<pid>/     an entry being built (or a failed build left to inspect)
    store/.locks/<key>.lock     one flock per key, so two processes never build one key at once
    <recipe>/<stage>/<name>     symlinks to the current entries, for people and scripts
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.digest import hash_file, list_files
from tasks.errors import StoreError

MANIFEST = "MANIFEST.json"


@dataclass(frozen=True)
class Store:
    root: Path  # the artifacts directory

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    def entry(self, key: str) -> Path:
        return self.store_dir / key[:2] / key

    def is_complete(self, key: str) -> bool:
        return (self.entry(key) / MANIFEST).is_file()

    def manifest(self, key: str) -> dict[str, Any]:
        path = self.entry(key) / MANIFEST
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(
                f"cannot read {path}: {err}; run `doit verify --remove-damaged`, then `doit`"
            ) from None

    def built_keys(self) -> list[str]:
        """Every complete entry in the store."""
        if not self.store_dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.store_dir.glob(f"??/*/{MANIFEST}") if p.is_file())

    @contextlib.contextmanager
    def lock(self, key: str, on_wait: Any = None, wait: bool = True) -> Iterator[bool]:
        """Exclusive per-key lock (flock), released by the kernel if the holder dies.
        Yields True once held; with wait=False, yields False at once if another holds it."""
        path = self.store_dir / ".locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                if on_wait:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def new_tmp(self, key: str) -> Path:
        tmp = self.store_dir / ".tmp" / f"{key}.{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def publish(self, key: str, tmp: Path, manifest: dict[str, Any]) -> Path:
        """Hash and sync tmp's files, write the manifest last, then rename tmp into place."""
        manifest = {**manifest, "files": describe_files(tmp)}
        path = tmp / MANIFEST
        with open(path, "w") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        entry = self.entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        if entry.exists():  # a directory without a manifest: never complete, safe to replace
            shutil.rmtree(entry)
        os.rename(tmp, entry)
        _fsync_dir(entry.parent)
        return entry

    def remove(self, key: str) -> None:
        entry = self.entry(key)
        # Move aside first, so a crash mid-delete never leaves a manifest over missing files.
        doomed = self.store_dir / ".tmp" / f"{key}.deleting-{os.getpid()}"
        doomed.parent.mkdir(parents=True, exist_ok=True)
        os.rename(entry, doomed)
        shutil.rmtree(doomed)

    def stale_tmps(self) -> list[Path]:
        """Temporary build directories whose process is gone."""
        tmp_root = self.store_dir / ".tmp"
        if not tmp_root.is_dir():
            return []
        # Names end in the builder's pid: "<key>.<pid>" or "<key>.deleting-<pid>".
        owners = {p: re.search(r"[.-](\d+)$", p.name) for p in tmp_root.iterdir()}
        return [p for p, m in owners.items() if not (m and _pid_alive(m.group(1)))]

    def link(self, link: Path, key: str) -> None:
        """Point link at the entry for key, atomically (a relative symlink)."""
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(self.entry(key), link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            return
        tmp = link.with_name(f".{link.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(target)
        os.replace(tmp, link)

    @staticmethod
    def previous(link: Path) -> Path:
        return link.with_name(f".{link.name}.previous")

    def set_aside(self, link: Path) -> None:
        """Move a link to its hidden `.previous` name while its step rebuilds."""
        if link.is_symlink():
            os.replace(link, self.previous(link))

    def forget_previous(self, link: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.previous(link).unlink()

    def links(self) -> dict[Path, str]:
        """Every link under the artifacts root and the key it points at."""
        out = {}
        if not self.root.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d not in ("store", "cache", "downloads")]
            for name in [*dirnames, *filenames]:
                path = Path(dirpath, name)
                if path.is_symlink():
                    out[path] = Path(os.readlink(path)).name
        return out

    def verify(self, key: str) -> list[str]:
        """Re-hash an entry's files (bypassing every cache); one line per problem."""
        entry = self.entry(key)
        try:
            recorded = {f["path"]: f for f in self.manifest(key)["files"]}
        except (StoreError, KeyError, TypeError) as err:
            return [f"{entry / MANIFEST}: unreadable ({err})"]
        present = {p.as_posix() for p in list_files(entry)} - {MANIFEST}
        problems = [f"{entry / p}: missing" for p in sorted(set(recorded) - present)]
        problems += [f"{entry / p}: not in the manifest" for p in sorted(present - set(recorded))]
        for rel in sorted(set(recorded) & present):
            path, want = entry / rel, recorded[rel]
            size = path.stat().st_size
            if size != want["size"]:
                problems.append(f"{path}: size {size} != {want['size']} in the manifest")
            elif hash_file(path) != want["xxh3"]:
                problems.append(f"{path}: content changed (xxh3 differs from the manifest)")
        return problems


def describe_files(root: Path) -> list[dict[str, Any]]:
    """Relative path, size and xxh3-128 of every file, each synced to disk."""
    files = []
    for rel in list_files(root):
        path = root / rel
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        files.append({"path": rel.as_posix(), "size": path.stat().st_size, "xxh3": hash_file(path)})
    return files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
