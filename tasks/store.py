"""The artifact store: one immutable directory per key, complete only once its manifest exists.

Layout under the artifacts root:
    store/<key[:2]>/<key>/      an entry: the step's files and nothing else
    store/<key[:2]>/<key>.json  its manifest, written last: the pointer that makes it complete
    store/<key[:2]>/<key>.log   what the step that built it printed (tasks/steplog.py), if kept
    store/.tmp/, store/.locks/  builds in progress and per-key locks (tasks/staging.py)
    <recipe>/<stage>/<name>     symlinks to the current entries, for people and scripts

The manifest sits beside the entry, not in it, so an entry holds exactly what the step made:
a stage reads its inputs, and a user copies a folder to ship it, with no bookkeeping to skip.
It records every file's size, mtime and xxh3, the step's identity (whose hash is the key) and a
SHA-256 of its own fields, so that an edit to any of them is seen by `verify`.

`EntryStore` is what the runner and the maintenance tasks need from a store; `Store` is the local
one. Entries of the earlier layout (MANIFEST.json inside the entry) are moved to the new one when
first looked up on a writable store.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from tasks.digest import DigestCache, hash_file
from tasks.errors import StoreError, problem_of
from tasks.keys import canonical_json, key_of
from tasks.record import Record, frozen
from tasks.staging import KEY, Staging, os_problem, real_dir, remove_path

OLD_MANIFEST = "MANIFEST.json"  # inside the entry, before the manifest moved beside it
PENDING = ".manifest-pending"  # in a build folder: the manifest on its way beside the entry
DIGEST_FIELD = "manifest_sha256"
# Folders of the artifacts root that are not a recipe's links.
RESERVED = ("store", "cache", "downloads", "envs", "logs")
SIDE_FILES = (".json", ".log")  # beside an entry: its manifest, its log


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of every field but the digest itself."""
    fields = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()


class EntryStore(Protocol):
    """A store of immutable entries by key, as `gc`, `verify` and the runner's lookups see it.
    The local Store and the remote one (tasks/remote.py) both implement it; the local one also
    has `entry` and `build`, the remote one `pull_into` and `push` in their place."""

    def is_complete(self, key: str) -> bool: ...
    def manifest(self, key: str) -> dict[str, Any]: ...
    def built_keys(self) -> list[str]: ...
    def remove(self, key: str) -> None: ...
    def verify(self, key: str) -> list[str]: ...


@frozen
class Build(Record):
    """A build of one key in progress, under its lock: fill `folder`, then `publish`."""

    store: Store
    key: str
    folder: Path

    def publish(
        self, manifest: dict[str, Any], checked: dict[str, tuple[int, str]] | None = None
    ) -> Path:
        return self.store.publish(self.key, self.folder, manifest, checked)


@frozen
class Store(Record):
    root: Path  # the artifacts directory

    @functools.cached_property
    def store_dir(self) -> Path:
        return self.root / "store"

    @functools.cached_property
    def _prefix(self) -> str:
        """store_dir as a string ending in a separator (see _entry_str)."""
        return os.path.join(self.store_dir, "")

    def _entry_str(self, key: str) -> str:
        """The entry's path as a string, the manifest's and log's without their suffix: a
        no-op asks for every step's entry and manifest, and one Path of a string costs less
        than two joins."""
        return f"{self._prefix}{key[:2]}/{key}"

    @property
    def staging(self) -> Staging:
        return Staging(self.store_dir)

    def entry(self, key: str) -> Path:
        return Path(self._entry_str(key))

    def manifest_path(self, key: str) -> Path:
        return Path(f"{self._entry_str(key)}.json")

    def log_path(self, key: str) -> Path:
        """Where the log of the step that built key is kept: beside the manifest, so the entry
        holds only the step's files. Not in the manifest, nor hashed: removed with the entry."""
        return Path(f"{self._entry_str(key)}.log")

    def is_complete(self, key: str, locked: bool = False) -> bool:
        """The manifest is a file and the entry a folder; a link in either place is damage,
        never a complete entry. Two stats: this runs for every step of a no-op `doit`.
        locked: the caller holds the key's lock (an earlier layout is converted under it)."""
        entry = self._entry_str(key)
        if _is(f"{entry}.json", stat.S_ISREG):
            return _is(entry, stat.S_ISDIR)
        return self._upgrade(key, locked)

    def complete_entry(self, key: str) -> Path:
        """The entry of a key that must be complete (one named by another entry's files)."""
        if not self.is_complete(key):
            raise StoreError(
                f"store entry {key[:16]}... is missing", fix="run `doit` to rebuild it"
            )
        return self.entry(key)

    def manifest(self, key: str) -> dict[str, Any]:
        path = self.manifest_path(key)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(
                f"cannot read {path}: {err}; run `doit verify --remove-damaged`, then `doit`"
            ) from None
        if not isinstance(manifest, dict):
            raise StoreError(f"{path} is not a JSON object; run `doit verify --remove-damaged`")
        return manifest

    def _upgrade(self, key: str, locked: bool = False) -> bool:
        """Move the manifest of an entry of the earlier layout beside it (one rename, under
        the key's lock); whether the entry is complete now. A read-only store stays as it is."""
        entry = self.entry(key)
        if not (_is(entry, stat.S_ISDIR) and _is(entry / OLD_MANIFEST, stat.S_ISREG)):
            return False
        try:
            lock = contextlib.nullcontext(True) if locked else self.lock(key, wait=False)
            with lock as held:
                if held and not self.manifest_path(key).exists():
                    os.rename(entry / OLD_MANIFEST, self.manifest_path(key))
                    _fsync_dir(entry.parent)
        except (OSError, StoreError):
            _warn_old_layout(self.store_dir)
            return False
        return _is(self.manifest_path(key), stat.S_ISREG)

    def built_keys(self) -> list[str]:
        """Every complete entry in the store (links and strays are left to `verify`)."""
        return [k for k, _ in self._entries() if KEY.match(k) and self.is_complete(k)]

    def unfinished(self) -> list[str]:
        """Keys with an entry folder but no manifest, or a manifest or log but no folder: a
        build that stopped between its two renames, or a removal between its steps."""
        names = {_key_of(name) for name, _ in self._entries()}
        return [k for k in sorted(names) if KEY.match(k) and not self.is_complete(k)]

    def _entries(self) -> Iterator[tuple[str, Path]]:
        """(name, path) of everything in the shard folders, in order."""
        for shard in self._shards():
            if shard.is_dir() and not shard.is_symlink():
                for path in sorted(shard.iterdir()):
                    yield path.name, path

    def _shards(self) -> list[Path]:
        if not self.store_dir.is_dir():
            return []
        return sorted(p for p in self.store_dir.iterdir() if p.name not in (".tmp", ".locks"))

    def lock(
        self,
        key: str,
        on_wait: Callable[[], None] | None = None,
        wait: bool = True,
        probe: bool = False,
    ) -> contextlib.AbstractContextManager[bool]:
        return self.staging.lock(key, on_wait, wait, probe)

    def new_tmp(self, key: str, kind: str = "") -> Path:
        return self.staging.new_tmp(key, kind)

    @contextlib.contextmanager
    def build(self, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[Build | None]:
        """Hold key's lock for a build: None when the entry is complete (another process built
        it while this one waited), else a Build with a fresh temporary folder."""
        with self.lock(key, on_wait):
            done = self.is_complete(key, locked=True)
            yield None if done else Build(self, key, self.new_tmp(key))

    def publish(
        self, key: str, tmp: Path, manifest: dict[str, Any],
        checked: dict[str, tuple[int, str]] | None = None,
    ) -> Path:  # fmt: skip
        """Hash and sync tmp's files, rename tmp into place, then its manifest beside it: the
        entry is complete at that last rename, and a crash before it leaves an incomplete one.
        checked: (size, xxh3) of files the caller has just hashed (a pull), not read again."""
        manifest = {**manifest, "files": describe_files(tmp, checked or {})}
        manifest[DIGEST_FIELD] = manifest_digest(manifest)
        with open(tmp / PENDING, "w") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        entry, path = self.entry(key), self.manifest_path(key)
        real_dir(entry.parent)
        remove_path(path)  # a manifest without its entry, or a link: never complete
        remove_path(entry)  # an entry without its manifest (or a link)
        os.rename(tmp, entry)
        os.rename(entry / PENDING, path)
        _fsync_dir(entry.parent)
        return entry

    def remove(self, key: str) -> None:
        """Remove an entry and its log (hold its key's lock). A link in either place is
        removed, not followed."""
        remove_path(self.manifest_path(key))  # first: from here on the entry is incomplete
        remove_path(self.log_path(key))  # before the entry: a stop here leaves it unfinished
        entry = self.entry(key)
        if entry.is_symlink() or not entry.is_dir():
            remove_path(entry)
            return
        doomed = self.new_tmp(key, "deleting")  # one rename, then the slow part out of sight
        os.replace(entry, doomed)
        shutil.rmtree(doomed)

    def link(self, link: Path, key: str) -> None:
        """Point link at the entry for key, atomically (a relative symlink). Only a link this
        tool made is ever replaced."""
        target = self._link_target(link, key)
        with contextlib.suppress(OSError):  # not there, or not a link: the checks below say
            if os.readlink(link) == target:
                return
        if link.is_symlink() and not self.owns_link(link):
            raise StoreError(
                f"{link} is a link to {os.readlink(link)}, which is not a store entry: modelkiln "
                "only replaces links it made",
                fix="move it away, then run `doit` again",
            )
        if link.exists() and not link.is_symlink():
            what = "directory" if link.is_dir() else "file"
            raise StoreError(
                f"{link} is a {what}, not a link made by modelkiln, so it is left as it is",
                fix=f"move it away (the link to {self.entry(key).name[:16]}... goes there)",
            )
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(f".{link.name}.{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(target)
            try:
                os.replace(tmp, link)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        except OSError as err:
            raise StoreError(os_problem(err, link, "link")) from None

    def _link_target(self, link: Path, key: str) -> str:
        """The entry's path relative to link's folder: os.path.relpath's answer, which reads
        the working folder twice; a link inside the artifacts folder (every one a recipe
        makes) needs only to climb out of its folders."""
        try:
            up = link.parent.relative_to(self.root).parts
        except ValueError:
            up = ("..",)
        if ".." in up or up[:1] == ("store",):  # outside, or inside the store itself
            return os.path.relpath(self.entry(key), link.parent)
        return os.path.join(*[os.pardir] * len(up), "store", key[:2], key)

    def owns_link(self, link: Path) -> bool:
        """Whether link points at a store entry, as the links this tool makes do."""
        target = Path(os.path.normpath(link.parent / os.readlink(link)))
        return bool(KEY.match(target.name)) and target == Path(
            os.path.normpath(self.entry(target.name))
        )

    @staticmethod
    def previous(link: Path) -> Path:
        return link.with_name(f".{link.name}.previous")

    def set_aside(self, link: Path) -> None:
        """Move a link to its hidden `.previous` name while its step rebuilds."""
        if link.is_symlink() and self.owns_link(link):
            os.replace(link, self.previous(link))

    def forget_previous(self, link: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.previous(link).unlink()

    def links(self) -> dict[Path, str]:
        """Every link into the store under the artifacts root and the key it points at."""
        out = {}
        if not self.root.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(self.root):  # links are not followed
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d not in RESERVED]
            for name in [*dirnames, *filenames]:
                path = Path(dirpath, name)
                if path.is_symlink() and self.owns_link(path):
                    out[path] = Path(os.readlink(path)).name
        return out

    # ---- checks ----------------------------------------------------------------------------

    def changes(self, key: str) -> tuple[list[str], list[str]]:
        """(recorded files whose size or mtime differ or that are gone, files not recorded):
        a stat per file and no reads, cheap enough before and after every step."""
        entry, files = self.entry(key), self.manifest(key).get("files", [])
        changed = []
        for record in files:
            try:
                st = os.lstat(entry / record["path"])
            except OSError:
                changed.append(record["path"])
                continue
            mtime = record.get("mtime_ns", st.st_mtime_ns)  # older manifests: size only
            if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (
                record["size"],
                mtime,
            ):
                changed.append(record["path"])
        recorded = {r["path"] for r in files}
        present = {rel for rel, _ in walk_entry(entry)}
        return changed, sorted(present - recorded)

    def content_changes(self, key: str) -> tuple[list[str], list[str]]:
        """changes(), less the files whose bytes still match the manifest: a file copied
        without its times (`cp -r`), touched, or rewritten with the same bytes is intact, and
        refusing it would leave nothing to fix (verify finds no damage). Only files whose stat
        differs are read, through the digest cache, so each is read once."""
        changed, added = self.changes(key)
        if changed:
            records = {r["path"]: r for r in self.manifest(key)["files"]}
            entry, cache = self.entry(key), self.digest_cache()
            try:
                changed = [rel for rel in changed if not _holds(cache, entry / rel, records[rel])]
            finally:
                cache.close()
        return changed, added

    def digest_cache(self) -> DigestCache:
        """The stat-keyed digest cache beside the store; the caller closes it."""
        return DigestCache(self.root / "cache" / "digests.sqlite")

    def verify(self, key: str) -> list[str]:
        """Re-hash an entry from disk (bypassing every cache); one line per problem."""
        entry, path = self.entry(key), self.manifest_path(key)
        for where in (entry, path):
            if where.is_symlink():
                return [f"{where}: a symbolic link (to {os.readlink(where)}), not an entry"]
        if not self.is_complete(key):
            if not entry.is_dir() and not path.exists():
                return [f"{self.log_path(key)}: a log without its entry (a removal left "
                        "unfinished)"]  # fmt: skip
            if not entry.is_dir():
                return [f"{path}: a manifest without its entry {entry} (deleted, or a removal "
                        "left unfinished)"]  # fmt: skip
            if (entry / OLD_MANIFEST).is_file():
                return [f"{entry}: in the layout of an earlier modelkiln ({OLD_MANIFEST} inside); "
                        "it is converted on the next `doit` with write access to the store"]  # fmt: skip
            return [f"{entry}: no manifest {path.name} beside it (a build left unfinished)"]
        try:
            manifest = self.manifest(key)
            recorded = {f["path"]: f for f in manifest["files"]}
        except (StoreError, KeyError, TypeError) as err:
            return [f"{path}: unreadable ({problem_of(err)})"]
        problems = manifest_problems(path, key, manifest)
        present = dict(walk_entry(entry))
        problems += [f"{entry / p}: missing" for p in sorted(set(recorded) - set(present))]
        for rel in sorted(set(present) - set(recorded)):
            problems.append(f"{entry / rel}: {present[rel] or 'not in the manifest'}")
        for rel in sorted(set(recorded) & set(present)):
            path, want = entry / rel, recorded[rel]
            if present[rel]:
                problems.append(f"{path}: {present[rel]}")
            elif (size := path.stat().st_size) != want["size"]:
                problems.append(f"{path}: size {size} != {want['size']} in the manifest")
            elif hash_file(path) != want["xxh3"]:
                problems.append(f"{path}: content changed (xxh3 differs from the manifest)")
        return problems

    def audit(self) -> dict[str, list[str]]:
        """Every problem in the store, by key (or by path for what is not an entry)."""
        found: dict[str, list[str]] = {}
        for shard in self._shards():
            if shard.is_symlink() or not shard.is_dir() or len(shard.name) != 2:
                found[str(shard)] = [f"{shard}: unexpected in the store"]
        seen = set()
        for name, path in self._entries():
            key = _key_of(name)
            if not (KEY.match(key) and key.startswith(path.parent.name)):
                found[str(path)] = [f"{path}: unexpected in the store (not an entry's name)"]
            elif key not in seen:  # an entry, its manifest and its log: checked once
                seen.add(key)
                if problems := self.verify(key):
                    found[key] = problems
        return found

    def dependents(self, keys: set[str]) -> set[str]:
        """Entries built, directly or through others, from any of keys (read from identities)."""
        uses: dict[str, set[str]] = {}
        for key in self.built_keys():
            with contextlib.suppress(StoreError, KeyError):
                for used in _keys_in(self.manifest(key)["identity"]):
                    uses.setdefault(used, set()).add(key)
        found: set[str] = set()
        todo = list(keys)
        while todo:
            for user in uses.get(todo.pop(), set()) - found - keys:
                found.add(user)
                todo.append(user)
        return found

    def remove_damaged(self, key: str, built_from_damage: bool = False) -> None:
        """Remove a damaged entry, or a stray that is not one, without following links."""
        if KEY.match(key):
            with self.lock(key):
                # Still damaged? A publish between its two renames looks unfinished to audit.
                if built_from_damage or self.verify(key):
                    self.remove(key)
        else:
            remove_path(Path(key))


def manifest_problems(path: Path | str, key: str, manifest: dict[str, Any]) -> list[str]:
    """What makes a manifest (local or remote, at path) untrustworthy: its own digest, its
    identity's hash, the key it names."""
    problems = []
    if DIGEST_FIELD not in manifest:
        problems.append(
            f"{path}: has no {DIGEST_FIELD} (edited, or written before manifests had one)"
        )
    elif manifest[DIGEST_FIELD] != manifest_digest(manifest):
        problems.append(f"{path}: edited (its fields no longer match {DIGEST_FIELD})")
    identity = manifest.get("identity")
    if not isinstance(identity, dict) or key_of(identity) != key:
        problems.append(f"{path}: its identity does not hash to the entry's key {key[:16]}...")
    if manifest.get("key") != key:
        problems.append(f"{path}: names key {str(manifest.get('key'))[:16]}..., not {key[:16]}...")
    return problems


def walk_entry(entry: Path) -> Iterator[tuple[str, str]]:
    """(relative path, problem or '') for everything in an entry, links never followed: a
    regular file has no problem; a link, a special file or an empty directory has one."""
    for dirpath, dirnames, filenames in os.walk(entry):
        base = Path(dirpath)
        for name in sorted(dirnames):
            path = base / name
            if path.is_symlink():
                yield (
                    path.relative_to(entry).as_posix(),
                    f"a symbolic link (to {os.readlink(path)})",
                )
            elif not any(path.iterdir()):
                yield path.relative_to(entry).as_posix(), "an unexpected empty directory"
        for name in sorted(filenames):
            path = base / name
            mode = os.lstat(path).st_mode
            problem = (
                "" if stat.S_ISREG(mode)
                else f"a symbolic link (to {os.readlink(path)})" if stat.S_ISLNK(mode)
                else "not a regular file"
            )  # fmt: skip
            yield path.relative_to(entry).as_posix(), problem


def _keys_in(value: Any) -> Iterator[str]:
    """Every key an identity names (inputs, data sets, steps, report rows)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _keys_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys_in(item)
    elif isinstance(value, str) and KEY.match(value):
        yield value


def describe_files(
    root: Path, checked: dict[str, tuple[int, str]] | None = None
) -> list[dict[str, Any]]:
    """Relative path, size, mtime and xxh3-128 of every file, each synced to disk (a file in
    checked with that size keeps its digest) and readable by whoever the umask lets read a new
    file. A step's output is plain files: a link or a special file in it fails the step."""
    checked = checked or {}
    for dirpath, _, _ in os.walk(root, topdown=False):  # empty folders hold nothing to record
        if dirpath != str(root) and not os.listdir(dirpath):
            os.rmdir(dirpath)
        elif dirpath != str(root):
            _readable(Path(dirpath), 0o555)  # a library's mkdtemp folder (0700) moved into place
    files = []
    for rel, problem in walk_entry(root):
        path = root / rel
        if problem:
            raise StoreError(f"the step's output {path} is {problem}: outputs must be plain files")
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        _readable(path, 0o444)  # a library's temporary file (mkstemp: 0600) renamed into place
        st = path.stat()
        size, digest = checked.get(rel, (None, ""))
        digest = digest if size == st.st_size else hash_file(path)
        files.append({"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "xxh3": digest})
    return files


def _key_of(name: str) -> str:
    """The key a name in a shard folder belongs to: an entry's, its manifest's or its log's."""
    for suffix in SIDE_FILES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def _holds(cache: DigestCache, path: Path, record: dict[str, Any]) -> bool:
    """Whether path is a regular file with the record's size and xxh3."""
    try:
        st = os.lstat(path)
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_size == record["size"]
            and cache.file_digest(path) == record["xxh3"]
        )
    except OSError:
        return False


def _is(path: str | Path, kind: Callable[[int], bool]) -> bool:
    """Whether path is there and of kind (stat.S_ISDIR, ...), links not followed."""
    try:
        return kind(os.lstat(path).st_mode)
    except OSError:
        return False


def manifest_file(entry: Path) -> Path:
    """Where the manifest of the entry a path leads to (an entry, or a link to one) lies: for
    scripts and tests that start from `artifacts/<recipe>/<stage>/<name>`."""
    entry = entry.resolve()
    return entry.parent / f"{entry.name}.json"


def read_manifest(entry: Path) -> dict[str, Any]:
    return json.loads(manifest_file(entry).read_text())


_warned: set[Path] = set()


def _warn_old_layout(store_dir: Path) -> None:
    if store_dir not in _warned:
        _warned.add(store_dir)
        print(
            f"warning: {store_dir} holds entries of an earlier modelkiln's layout and cannot be "
            "converted here (read-only?): they count as not built until `doit` runs once with "
            "write access to it",
            file=sys.stderr,
        )


def _readable(path: Path, bits: int) -> None:
    """Add the read (and, for folders, search) bits the umask gives anything new; take none
    away. Best effort: where the umask cannot be read, or the file system refuses, nothing."""
    umask = _umask()
    if umask is None:
        return
    try:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        wanted = mode | (bits & ~umask)
        if wanted != mode:
            os.chmod(path, wanted)
    except OSError:
        pass


@functools.cache
def _umask() -> int | None:
    """The process's umask, read without setting it (os.umask sets it, for every thread);
    None where /proc does not say it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
