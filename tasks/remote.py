"""A remote store shared by machines: a step built on one is downloaded, not rebuilt, on another.

A remote is an fsspec URL: `s3://bucket/prefix` (s3fs; credentials from the standard AWS chain,
an optional `endpoint_url` for S3-compatible servers) or `file:///path` (a shared disk), through
the same code. Layout under the URL:

    entries/<key[:2]>/<key>.json          the manifest: the pointer that makes an entry complete
    uploads/<key>/<upload-id>/<relpath>   the files of one upload; the manifest names its id

Push uploads the files first, under an upload id of its own, then writes the manifest last with
a conditional put (S3 `If-None-Match: *`, an exclusive create on a disk), so the remote never
shows an incomplete entry and the first pusher of a key wins. Builds are not bit-reproducible
across machines, so two pushers of one key may hold different bytes: their files never mix,
because each upload has its own folder. Correctness does not rest on the server honouring the
condition: after the put the pusher reads the manifest back, and if it names another upload the
push lost and removes its own folder. A pull reads the manifest once and checks every file's
size and xxh3 against it, so a mix of two uploads (or any damage) is refused, never published.

Files shared by entries (a tokenizer, a config) are stored once per entry, not once per
content. Content-addressed blobs would need `gc` to know that no pusher is about to name a blob
it found already there and so did not upload: an object store has no transaction that ties "the
blob is unreferenced" to "delete it", so a gc racing a push could leave a complete entry whose
file is gone. Per-upload folders keep both sides simple (a lost race or an orphan is one folder
to delete), and the bytes saved would be small: the shared files are kilobytes to a few MB next
to weights of hundreds of MB, which differ per key by construction. The local store does not
deduplicate either.

Nothing here contacts the remote, or imports fsspec or s3fs, until a method needs it: a no-op
`doit` asks the remote nothing (only keys missing locally are looked up).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlsplit, urlunsplit

from tasks.digest import hash_file
from tasks.errors import KilnError, StoreError, did_you_mean, problem_of
from tasks.staging import KEY
from tasks.store import DIGEST_FIELD, Build, Store, manifest_digest, manifest_problems
from tasks.writeback import WriteBack

# Fields only a remote manifest has: a pulled entry's local manifest leaves them out.
REMOTE_FIELDS = ("files", DIGEST_FIELD, "upload", "pushed_at", "pushed_from")
SETTINGS = {"remote": str, "push": bool, "remote_only": bool, "endpoint_url": str,
            "profile": str, "region": str}  # fmt: skip
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "session")
CREDENTIALS_GO = (
    "credentials never go in a recipe: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
    "environment, or name a profile of ~/.aws/credentials with `profile = ...`, or use the "
    "machine's instance role"
)
REPAIR = (
    "`doit verify --remote` names every damaged remote file and `--remove-damaged` removes "
    "the entry; a `doit push` where it is built uploads it again"
)
WHERE_SET = "[store] remote in the recipe, remote= or MODELKILN_REMOTE"
ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
CHUNK = 8 << 20
FILES_AT_ONCE = 8  # downloads of one entry in flight together (each holds a file open)
DEFAULT_GRACE_SECONDS = 24 * 3600
LOCAL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

# progress(bytes done so far, bytes in the whole transfer): for a progress bar.
Progress = Callable[[int, int], None]


class RemoteUnavailable(StoreError):
    """The remote cannot be used at all (unreachable, refused credentials, no bucket), as
    opposed to one entry on it that does not check out: a build skips it for the run."""


class RemoteSettingsError(KilnError):
    """A recipe's remote settings that cannot be used (a secret in them, an unknown key)."""


def check_remote_settings(settings: dict[str, Any]) -> None:
    """Refuse a secret, an unknown key or a wrong type in a recipe's remote settings."""
    for name, value in settings.items():
        if name not in SETTINGS:
            if any(word in name.lower() for word in SECRET_WORDS):
                raise RemoteSettingsError(
                    f"remote setting {name!r} looks like a secret", CREDENTIALS_GO
                )
            raise RemoteSettingsError(
                f"unknown remote setting {name!r}{did_you_mean(name, SETTINGS)}",
                f"the settings are {', '.join(SETTINGS)}",
            )
        if isinstance(value, str) and ACCESS_KEY_ID.search(value):
            raise RemoteSettingsError(
                f"remote setting {name} holds an AWS access key id", CREDENTIALS_GO
            )
        if not isinstance(value, SETTINGS[name]):
            raise RemoteSettingsError(
                f"remote setting {name} = {value!r} is not a {SETTINGS[name].__name__}",
                f"write {name} = true or {name} = false, without quotes"
                if SETTINGS[name] is bool
                else f'write {name} = "..." in quotes',
            )
    if "remote" not in settings:
        raise RemoteSettingsError(
            "remote settings without `remote`", "add remote = 's3://bucket/prefix'"
        )
    check_url(settings["remote"], "remote")
    if "endpoint_url" in settings:
        check_url(settings["endpoint_url"], "endpoint_url")


def check_url(url: str, name: str = "remote") -> None:
    """A URL with a protocol and no credentials in it (user:secret@ or a secret query field)."""
    parts = urlsplit(url)
    if not parts.scheme or "://" not in url:
        raise RemoteSettingsError(
            f"{name} = {url!r} is not a URL",
            "write s3://bucket/prefix, or file:///path for a shared disk"
            + ("; to build without a remote, leave remote out" if not url else ""),
        )
    if "@" in parts.netloc:
        raise RemoteSettingsError(
            f"{name} has credentials in its URL (...@{parts.hostname})", _credentials_go(parts)
        )
    for field_name, _ in parse_qsl(parts.query):
        if any(word in field_name.lower() for word in SECRET_WORDS):
            raise RemoteSettingsError(
                f"{name} has a secret in its URL ({field_name}=...)", _credentials_go(parts)
            )
    # After the secrets: these messages quote the URL.
    if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
        raise RemoteSettingsError(
            f"{name} = {url!r} names a host {parts.netloc!r}, not a folder",
            f"a path needs three slashes: file:///{parts.netloc}{parts.path}",
        )
    if "//" in parts.path:
        raise RemoteSettingsError(
            f"{name} = {url!r} has an empty folder name (//) in its path: on an object store "
            "that is another place than the path without it",
            f"write {urlunsplit(parts._replace(path=re.sub('/{2,}', '/', parts.path)))}",
        )


def _credentials_go(parts: SplitResult) -> str:
    if parts.scheme in ("s3", "s3a", "http", "https"):  # https: an S3 endpoint_url
        return CREDENTIALS_GO
    return (
        "credentials never go in a recipe: give them to the file system's own configuration "
        "(for sftp://, ~/.ssh/config and a key; for gs:// or az://, their login tools)"
    )


# Libraries whose exceptions mean "the remote failed" (botocore's EndpointConnectionError and
# ClientError are not OSErrors); anything else raised under a remote call is a bug and keeps its
# traceback.
STORAGE_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3", "gcsfs",
                     "adlfs", "azure", "paramiko", "sshfs")  # fmt: skip


def _storage_failure(err: BaseException) -> bool:
    if isinstance(err, FileNotFoundError | FileExistsError):
        return False  # answers, not failures: callers handle them
    if isinstance(err, OSError) and err.errno in LOCAL_DISK_ERRORS:
        return False  # this machine's disk: the runner reports it as the machine's
    library = type(err).__module__.split(".")[0]
    return isinstance(err, OSError | TimeoutError) or library in STORAGE_LIBRARIES


_QUERY = re.compile(r"""(https?://[^\s"'?]*)\?[^\s"']*""")


def _said(err: BaseException) -> str:
    """A library's error text without the query strings of the URLs it quotes (a multipart
    upload's ?uploadId=... says nothing to a person)."""
    return _QUERY.sub(r"\1", str(err))


def _remote_call(method: Callable[..., Any]) -> Callable[..., Any]:
    """One StoreError, with the fix, for a remote that cannot be reached or refuses."""

    @functools.wraps(method)
    def call(self: RemoteStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as err:
            if not _storage_failure(err):
                raise
            raise RemoteUnavailable(
                f"the remote {self.url} failed: {type(err).__name__}: {_said(err)}",
                _network_fix(self),
            ) from None

    return call


class RemoteStore:
    """The remote store at url. Constructing one contacts nothing and imports nothing.

    A plain class, not a dataclass: every run with a remote makes one, and @dataclass compiles
    its methods at import (about 1 ms a class here)."""

    def __init__(
        self, url: str, push_enabled: bool = False, remote_only: bool = False,
        endpoint_url: str | None = None, profile: str | None = None, region: str | None = None,
    ) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.push_enabled = push_enabled  # the recipe's `push`: the runner uploads what it built
        self.remote_only = remote_only  # a step the remote cannot give fails, not built here
        self.endpoint_url = endpoint_url
        self.profile = profile
        self.region = region
        self._fs_and_root: tuple[Any, str] | None = None  # opened on first use
        self._root_seen = False  # its bucket (or folder) exists
        check_url(self.url)
        if endpoint_url:
            check_url(endpoint_url, "endpoint_url")

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r}, push_enabled={self.push_enabled})"

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> RemoteStore:
        check_remote_settings(settings)
        return cls(
            settings["remote"],
            push_enabled=settings.get("push", False),
            remote_only=settings.get("remote_only", False),
            endpoint_url=settings.get("endpoint_url"),
            profile=settings.get("profile"),
            region=settings.get("region"),
        )

    # ---- the file system, opened on first use --------------------------------------------

    @property
    def fs(self) -> Any:
        return self._open()[0]

    @property
    def root(self) -> str:
        return self._open()[1]

    def _open(self) -> tuple[Any, str]:
        """The file system and the root path; RemoteUnavailable (the run skips the remote)
        when no installed library speaks the URL's protocol."""
        if self._fs_and_root is None:
            options: dict[str, Any] = {}
            scheme = urlsplit(self.url).scheme
            if scheme in ("s3", "s3a"):
                # Listings are never cached: another machine pushes while this one runs.
                options = {"use_listings_cache": False, "skip_instance_cache": True}
                if self.endpoint_url:
                    options["endpoint_url"] = self.endpoint_url
                if self.profile:
                    options["profile"] = self.profile
                if self.region:
                    options["client_kwargs"] = {"region_name": self.region}
            try:
                import fsspec  # here, not at the top: a no-op build never needs it

                fs, root = fsspec.core.url_to_fs(self.url, **options)
            except ImportError as err:  # fsspec's, or the one it names for this protocol
                ours = scheme in ("s3", "s3a", "file") or err.name == "fsspec"
                missing = err.name or getattr(err.__cause__, "name", None)  # gcsfs, paramiko
                fix = (
                    f"pip install {missing} (fsspec's {scheme}:// needs it)"
                    if missing
                    else f"pip install the package named above, which fsspec uses for {scheme}://"
                )
                raise RemoteUnavailable(
                    f"the remote {self.url} needs a library that is not installed ({err})",
                    "pip install 'modelkiln[remote]'" if ours else fix,
                ) from None
            except ValueError as err:
                if not str(err).startswith("Protocol not known"):
                    raise RemoteUnavailable(
                        f"the remote {self.url} cannot be opened: {err}", _network_fix(self)
                    ) from None
                raise RemoteUnavailable(
                    f"the remote {self.url}: no installed file system speaks {scheme}://",
                    "write s3://bucket/prefix or file:///path (fsspec's other protocols, such "
                    "as gs://, az:// or sftp://, work with their package installed)",
                ) from None
            self._fs_and_root = (fs, root.rstrip("/"))
        return self._fs_and_root

    @property
    def _local_disk(self) -> bool:
        return "file" in _protocols(self.fs)

    def manifest_path(self, key: str) -> str:
        return f"{self.root}/entries/{key[:2]}/{key}.json"

    def upload_path(self, key: str, upload: str) -> str:
        return f"{self.root}/uploads/{key}/{upload}"

    def where(self, path: str) -> str:
        """A remote path as the user wrote the URL, for messages."""
        return self.url + path[len(self.root) :] if path.startswith(self.root) else path

    # ---- the EntryStore calls that make sense remotely -----------------------------------

    @_remote_call
    def is_complete(self, key: str) -> bool:
        if self._try(lambda: self.fs.exists(self.manifest_path(key)), "look up"):
            return True
        self._require_root()
        return False

    @_remote_call
    def manifest(self, key: str) -> dict[str, Any]:
        manifest = self._read_manifest(key)
        if manifest is None:
            raise StoreError(f"the remote has no entry {key[:16]}... ({self.url})")
        return manifest

    @_remote_call
    def built_keys(self) -> list[str]:
        """Every complete entry on the remote (a manifest at its place)."""
        keys = []
        for path in self._find(f"{self.root}/entries"):
            shard, name = PurePosixPath(path).parts[-2:]
            key = name.removesuffix(".json")
            if name.endswith(".json") and KEY.match(key) and key.startswith(shard):
                keys.append(key)
        return sorted(keys)

    @_remote_call
    def remove(self, key: str) -> None:
        """The manifest first (from then on the entry is incomplete), then its upload's files.
        Other uploads of the key are left to `gc`: one may be a push in progress."""
        manifest = self._read_manifest_quietly(key)
        self._rm(self.manifest_path(key))
        if isinstance(manifest, dict) and _is_upload_id(manifest.get("upload")):
            self._rm(self.upload_path(key, manifest["upload"]), recursive=True)

    @_remote_call
    def verify(self, key: str) -> list[str]:
        """Re-check a remote entry, reading every file: one line per problem."""
        path = self.where(self.manifest_path(key))
        try:
            manifest = self._read_manifest(key)
        except StoreError as err:  # the message names the file
            return [f"{problem_of(err)}: unreadable"]
        if manifest is None:
            return [f"{path}: missing"]
        problems = _manifest_problems(path, key, manifest)
        if problems:
            return problems
        folder = self.upload_path(key, manifest["upload"])
        present = {
            _relative(p, folder): info for p, info in self._find(folder, detail=True).items()
        }
        for record in manifest["files"]:
            rel, where = record["path"], self.where(f"{folder}/{record['path']}")
            if rel not in present:
                problems.append(f"{where}: missing")
            elif (size := present[rel].get("size")) != record["size"]:
                problems.append(f"{where}: size {size} != {record['size']} in the manifest")
            elif self._remote_xxh3(f"{folder}/{rel}") != record["xxh3"]:
                problems.append(f"{where}: content changed (xxh3 differs from the manifest)")
        recorded = {r["path"] for r in manifest["files"]}
        problems += [
            f"{self.where(f'{folder}/{rel}')}: not in the manifest"
            for rel in sorted(set(present) - recorded)
        ]
        return problems

    # ---- pull ------------------------------------------------------------------------------

    @_remote_call
    def pull(self, local: Store, key: str, progress: Progress | None = None) -> Path | None:
        """Download key's entry into the local store, under its lock: the local entry, or None
        when the remote has none. A download that does not match its manifest publishes
        nothing, leaves no temporary folder and raises one StoreError."""
        with local.build(key) as build:
            if build is None:  # another process completed it while this one waited
                return local.entry(key)
            try:
                return self.pull_into(build, key, progress)
            finally:
                shutil.rmtree(build.folder, ignore_errors=True)  # gone after a publish anyway

    @_remote_call
    def pull_into(self, build: Build, key: str, progress: Progress | None = None) -> Path | None:
        """pull, into a build the caller holds (its lock, its empty folder). On a mismatch the
        folder is emptied, not removed: the caller may build the step there instead."""
        manifest = self._read_manifest(key)
        if manifest is None:
            return None
        where = self.where(self.manifest_path(key))
        problems = _manifest_problems(where, key, manifest)
        if not _is_upload_id(manifest.get("upload")):
            problems.append(f"{where}: names no upload")
        if problems:
            raise StoreError(
                "the remote entry cannot be used:\n  " + "\n  ".join(problems),
                f"remove it (`RemoteStore.remove`, or delete {where}); the next push replaces it",
            )
        try:
            checked = self._download(key, manifest, build.folder, progress)
        except BaseException:
            _empty(build.folder)
            raise
        kept = {k: v for k, v in manifest.items() if k not in REMOTE_FIELDS}
        return build.publish({**kept, "pulled_from": self.url}, checked)

    def _download(
        self, key: str, manifest: dict[str, Any], folder: Path, progress: Progress | None
    ) -> dict[str, tuple[int, str]]:
        """Each file into folder, checked against the manifest: their (size, xxh3) by path."""
        source = self.upload_path(key, manifest["upload"])
        meter = _Meter(progress, sum(r["size"] for r in manifest["files"]))
        with contextlib.ExitStack() as stack:
            downloads = []
            for record in manifest["files"]:
                target = folder / record["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                callback = stack.enter_context(meter.file(record["size"], download=target))
                downloads.append((f"{source}/{record['path']}", target, callback))
            self._get_files(downloads)
        checked = {}
        for (remote, target, _), record in zip(downloads, manifest["files"], strict=True):
            size = target.stat().st_size
            if size != record["size"]:
                problem = f"size {size} != {record['size']} in the manifest"
            elif hash_file(target) != record["xxh3"]:
                problem = "content differs from the manifest (xxh3)"
            else:
                checked[record["path"]] = (size, record["xxh3"])
                continue
            raise StoreError(
                f"{self.where(remote)}: {problem}; nothing was pulled",
                REPAIR,
            )
        return checked

    def _get_files(self, downloads: list[tuple[str, Path, Any]]) -> None:
        """Download each (remote path, local file, fsspec callback): at once where the file
        system is asynchronous (s3fs), so an entry's small files do not each wait for a round
        trip; one by one elsewhere. The first failure cancels the others."""
        fs = self.fs
        if getattr(fs, "async_impl", False):
            import asyncio

            async def get(remote: str, target: Path, callback: Any, slots: Any) -> None:
                async with slots:
                    with self._download_errors(remote):
                        # One GET a file, written as it arrives: its write-back starts at
                        # once and memory holds a chunk. s3fs's default reads a file over its
                        # block size as 50 MiB ranges, 10 at a time, held in memory and
                        # written after. A file is one stream; the entry's files go together.
                        await fs._get_file(
                            remote, str(target), callback=callback, max_concurrency=1
                        )
                    _finished(callback)

            async def get_all() -> None:
                slots = asyncio.Semaphore(FILES_AT_ONCE)  # made in the loop that uses it
                await _all([get(*download, slots) for download in downloads])

            _run_in_loop(fs.loop, get_all)
            return
        for remote, target, callback in downloads:
            with self._download_errors(remote):
                fs.get_file(remote, str(target), callback=callback)
            _finished(callback)

    @contextlib.contextmanager
    def _download_errors(self, remote: str) -> Iterator[None]:
        """One download's failure as this module says it: a file the manifest names is
        missing, the remote is unreachable, or this machine's disk failed (the runner says)."""
        try:
            yield
        except FileNotFoundError:
            raise StoreError(
                f"{self.where(remote)}: missing, though the remote manifest names it "
                "(a push that lost a race, or a removal, while this pull read it)",
                "run `doit` again: it pulls the entry the manifest names now, or builds it",
            ) from None
        except OSError as err:
            if err.errno in LOCAL_DISK_ERRORS:
                raise  # this machine's disk, not the remote: the runner says so
            raise RemoteUnavailable(
                f"cannot download {self.where(remote)}: {err}", _network_fix(self)
            ) from None

    # ---- push ------------------------------------------------------------------------------

    @_remote_call
    def push(self, local: Store, key: str, progress: Progress | None = None) -> str:
        """Upload a complete local entry: "pushed", "present" (the remote had it) or "lost"
        (another machine published the key meanwhile; this upload's files are removed)."""
        if not local.is_complete(key):
            raise StoreError(
                f"no complete local entry {key[:16]}... to push", "run `doit` to build it"
            )
        self._require_root()
        if self.is_complete(key):
            there = self._read_manifest(key)  # an unreadable one: a StoreError with the fix
            where = self.where(self.manifest_path(key))
            if there is not None and (problems := _manifest_problems(where, key, there)):
                raise StoreError(  # "present" would leave every pull of the key failing
                    "the remote entry is damaged; not pushed:\n  " + "\n  ".join(problems), REPAIR
                )
            return "present"
        manifest = local.manifest(key)
        if problems := _manifest_problems(str(local.manifest_path(key)), key, manifest):
            raise StoreError(
                "the local entry is damaged; not pushed:\n  " + "\n  ".join(problems),
                "run `doit verify --remove-damaged`, then `doit`",
            )
        changed, extra = local.content_changes(key)
        if changed or extra:
            raise StoreError(
                f"the local entry {key[:16]}... changed since it was built ({', '.join(changed + extra)}); not pushed",
                "run `doit verify --remove-damaged`, then `doit`",
            )
        upload = _new_upload_id()
        folder = self.upload_path(key, upload)
        try:
            self._upload_files(local.entry(key), folder, manifest["files"], progress)
            won = self._publish(key, upload, manifest)
        except Exception:
            # A failure (not a kill) cleans up after itself; a kill's leftovers are gc's.
            with contextlib.suppress(Exception):
                if self._named_upload(key) != upload:
                    self._rm(folder, recursive=True)
            raise
        if not won:
            self._rm(folder, recursive=True)
            return "lost"
        return "pushed"

    def _upload_files(
        self, entry: Path, folder: str, files: list[dict[str, Any]], progress: Progress | None
    ) -> None:
        meter = _Meter(progress, sum(r["size"] for r in files))
        for record in files:
            target = f"{folder}/{record['path']}"
            if self._local_disk:
                self.fs.makedirs(self.fs._parent(target), exist_ok=True)
            with meter.file(record["size"]) as callback:
                self._try(
                    lambda t=target, r=record, c=callback: self.fs.put_file(
                        str(entry / r["path"]), t, callback=c
                    ),
                    "upload to",
                )

    def _publish(self, key: str, upload: str, manifest: dict[str, Any]) -> bool:
        """Write the manifest naming upload, unless one is there: whether this push won. The
        read-back decides, so a server that ignores the condition cannot mix two uploads."""
        import socket

        pushed = {k: v for k, v in manifest.items() if k not in (DIGEST_FIELD, "pulled_from")}
        pushed.update(
            upload=upload,
            pushed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            pushed_from=socket.gethostname(),
        )
        pushed[DIGEST_FIELD] = manifest_digest(pushed)
        data = json.dumps(pushed, indent=1, sort_keys=True).encode()
        failure: Exception | None = None
        try:
            self._create(self.manifest_path(key), data)
        except FileExistsError:
            pass  # another pusher was first: the read-back says so
        except Exception as err:  # a timeout may hide a write that happened
            failure = err  # the read-back says whether it was written all the same
        named = self._named_upload(key)
        if named is None:
            raise RemoteUnavailable(
                f"cannot write the manifest {self.where(self.manifest_path(key))}: "
                f"{failure or 'it cannot be read back'}",
                _network_fix(self),
            )
        return named == upload

    def _create(self, path: str, data: bytes) -> None:
        """Write path only if nothing is there (FileExistsError if something is)."""
        if self._local_disk:
            _create_local(Path(path), data)
            return
        try:
            self.fs.pipe_file(path, data, mode="create")  # S3: If-None-Match: *
        except TypeError:  # an fsspec file system without mode=: the read-back still decides
            if self.fs.exists(path):
                raise FileExistsError(path) from None
            self.fs.pipe_file(path, data)

    def _named_upload(self, key: str) -> str | None:
        manifest = self._read_manifest_quietly(key)
        return manifest.get("upload") if isinstance(manifest, dict) else None

    # ---- gc --------------------------------------------------------------------------------

    @_remote_call
    def gc(
        self, keep: set[str], grace_seconds: float = DEFAULT_GRACE_SECONDS, dry_run: bool = False
    ) -> list[tuple[str, int]]:
        """Remove entries whose key is not in keep, and upload folders no manifest names whose
        newest file is older than grace_seconds (a pusher may still be uploading into a young
        one). Returns (URL, bytes) of what was (dry_run: would be) removed."""
        # Manifests are listed before uploads: an upload whose manifest appears in between
        # has just been written to, so it is young and stays.
        named: dict[str, str | None] = {}
        for key in self.built_keys():
            manifest = self._read_manifest_quietly(key)
            upload = manifest.get("upload") if isinstance(manifest, dict) else None
            named[key] = upload if _is_upload_id(upload) else None
        uploads: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for path, info in self._find(f"{self.root}/uploads", detail=True).items():
            parts = _relative(path, f"{self.root}/uploads").split("/")
            if len(parts) >= 3:
                uploads.setdefault((parts[0], parts[1]), []).append(info)
        now = time.time()
        removed = []
        for key in sorted(named):
            if key not in keep:
                size = (
                    sum(i.get("size") or 0 for i in uploads.pop((key, named[key]), []))
                    if named[key]
                    else 0
                )
                removed.append((self.where(self.manifest_path(key)), size))
                if not dry_run:
                    self.remove(key)
        for (key, upload), infos in sorted(uploads.items()):
            if key in keep and named.get(key, "") in (upload, None):
                continue  # a kept entry's files (all its uploads, if its manifest is unreadable)
            if now - _newest(infos) < grace_seconds:
                continue  # maybe a push still uploading
            folder = self.upload_path(key, upload)
            removed.append((self.where(folder), sum(i.get("size") or 0 for i in infos)))
            if not dry_run:
                self._rm(folder, recursive=True)
        return removed

    # ---- helpers ---------------------------------------------------------------------------

    def _read_manifest(self, key: str) -> dict[str, Any] | None:
        """The remote manifest, read once; None if there is none."""
        path = self.manifest_path(key)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            self._require_root()
            return None
        except OSError as err:
            raise RemoteUnavailable(
                f"cannot read {self.where(path)}: {_said(err)}", _network_fix(self)
            ) from None
        try:
            manifest = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"{self.where(path)} is not JSON ({err})", REPAIR) from None
        if not isinstance(manifest, dict):
            raise StoreError(f"{self.where(path)} is not a JSON object", REPAIR)
        return manifest

    def _read_manifest_quietly(self, key: str) -> dict[str, Any] | None:
        try:
            return self._read_manifest(key)
        except StoreError:
            return None

    def _find(self, path: str, detail: bool = False) -> Any:
        try:
            return self.fs.find(path, detail=detail)
        except FileNotFoundError:
            self._require_root()
            return {} if detail else []

    def _require_root(self) -> None:
        """A missing bucket, or a missing shared folder, is the remote failing, not an empty
        remote (s3fs reports both as FileNotFoundError), so look once. Neither is ever made
        here: a typo in remote = ..., or a share that is not mounted, must not quietly start
        a new remote on the local disk."""
        if self._root_seen:
            return
        top = self.root if self._local_disk else self.root.split("/", 1)[0]
        if not self._try(lambda: _top_exists(self.fs, top, self._local_disk), "look up"):
            what = "folder (is the shared disk mounted?)" if self._local_disk else "bucket"
            raise RemoteUnavailable(
                f"the remote {self.url} cannot be used: no such {what} {top}",
                f"create it (`mkdir -p {top}`), or fix the URL ({WHERE_SET})"
                if self._local_disk
                else f"create the bucket {top!r}, or fix the URL ({WHERE_SET})",
            )
        self._root_seen = True

    def _rm(self, path: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._try(lambda: self.fs.rm(path, recursive=recursive), "remove")
        if self._local_disk:  # a disk keeps empty folders; an object store has none
            with contextlib.suppress(OSError):
                os.rmdir(Path(path).parent)

    def _remote_xxh3(self, path: str) -> str:
        import xxhash

        digest = xxhash.xxh3_128()
        with self.fs.open(path, "rb", block_size=CHUNK) as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _try(self, call: Callable[[], Any], doing: str) -> Any:
        try:
            return call()
        except Exception as err:
            if not _storage_failure(err):
                raise
            raise RemoteUnavailable(
                f"cannot {doing} the remote {self.url}: {_said(err)}", _network_fix(self)
            ) from None


class _Meter:
    """Bytes done across a transfer of several files, for one progress callback. File systems
    that report no progress (a local disk) are counted whole as each file finishes. A download
    also starts each file's write-back as it arrives (tasks.writeback): the publish's fsync
    then finds most of it on disk already."""

    STEP = 8 << 20  # bytes between reports: s3fs calls back every 64 KiB, a bar needs far fewer

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total = progress, total
        self.done = 0  # bytes of the files finished
        self.reported = 0
        self.live: dict[int, int] = {}  # bytes so far of each file in flight, by callback id
        self.in_flight = 0  # their sum

    @contextlib.contextmanager
    def file(self, size: int, download: Path | None = None) -> Iterator[Any]:
        """The fsspec callback of one file's transfer; several may run at once (their
        callbacks all come from fsspec's one event-loop thread)."""
        from fsspec.callbacks import Callback, NoOpCallback

        writeback = WriteBack(download) if download is not None else None
        if self.progress is None and writeback is None:
            yield NoOpCallback()
            self.done += size
            return
        meter = self

        class Report(Callback):
            def call(self, *args: Any, **kwargs: Any) -> None:
                if writeback is not None:
                    writeback.written(self.value)
                if meter.progress is None:
                    return
                now = min(self.value, size)
                meter.in_flight += now - meter.live.get(id(self), 0)
                meter.live[id(self)] = now
                done = meter.done + meter.in_flight
                if done - meter.reported >= meter.STEP:
                    meter.reported = done
                    meter.progress(done, meter.total)

        report = Report()
        report.finished = writeback.finish if writeback is not None else None
        try:
            yield report
        finally:
            if writeback is not None:
                writeback.finish()
        self.in_flight -= self.live.pop(id(report), 0)
        self.done += size
        if self.progress is not None:
            self.progress(self.done + self.in_flight, self.total)


def _finished(callback: Any) -> None:
    """A file's download is done: its write-back queues the rest now and closes its file
    (again at the end of the transfer: a no-op then)."""
    finished = getattr(callback, "finished", None)
    if finished is not None:
        finished()


def _run_in_loop(loop: Any, main: Callable[[], Any], stop_seconds: float = 60.0) -> None:
    """Run main() in fsspec's event loop (another thread) and wait for it. If this thread is
    interrupted (Ctrl-C) while it waits, the coroutine is cancelled and waited for, so that no
    download goes on writing into a folder the caller then empties."""
    import asyncio
    import concurrent.futures

    holder: dict[str, Any] = {}

    async def run() -> None:
        if holder.get("stop"):
            return  # interrupted before it began
        holder["task"] = asyncio.current_task()
        await main()

    def stop() -> None:  # in the loop's thread, so it and run() never interleave
        holder["stop"] = True
        if "task" in holder:
            holder["task"].cancel()

    future = asyncio.run_coroutine_threadsafe(run(), loop)
    try:
        future.result()
    except BaseException:
        if not future.done():
            loop.call_soon_threadsafe(stop)
            concurrent.futures.wait([future], timeout=stop_seconds)
        raise


async def _all(coroutines: list[Any]) -> None:
    """Run the coroutines at once; the first failure cancels the others, waits for them to
    stop (none may still write into a folder its caller empties) and is raised."""
    import asyncio

    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _manifest_problems(where: str, key: str, manifest: dict[str, Any]) -> list[str]:
    """What makes a manifest unusable: its digest, its identity's hash, its files' records."""
    problems = manifest_problems(where, key, manifest)
    if "upload" in manifest and not _is_upload_id(manifest["upload"]):
        problems.append(f"{where}: names no valid upload ({manifest['upload']!r})")
    files = manifest.get("files")
    if not isinstance(files, list):
        return [*problems, f"{where}: has no list of files"]
    for record in files:
        if not (
            isinstance(record, dict)
            and _safe_relpath(record.get("path"))
            and isinstance(record.get("size"), int)
            and isinstance(record.get("xxh3"), str)
        ):
            problems.append(f"{where}: a file record that cannot be used ({record!r})")
    return problems


def _safe_relpath(path: Any) -> bool:
    """A relative path that stays inside its folder: a manifest never writes outside it."""
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path:
        return False
    parts = PurePosixPath(path).parts
    return not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _is_upload_id(value: Any) -> bool:
    return isinstance(value, str) and _safe_relpath(value) and "/" not in value


def _new_upload_id() -> str:
    """Sortable by time, unique across machines."""
    import uuid  # only a push needs it (it imports platform: ms on every no-op otherwise)

    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:16]}"


def _create_local(path: Path, data: bytes) -> None:
    """Exclusive create of a whole file on a disk: written aside, then hard-linked into place
    (a link never replaces a file), so a reader never sees half a manifest."""
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # FileExistsError when another pusher was first
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _relative(path: str, folder: str) -> str:
    return path[len(folder.rstrip("/")) + 1 :]


def _newest(infos: list[dict[str, Any]]) -> float:
    """Newest modification time of a folder's files; now when a file system tells none (so
    an upload of unknown age is never taken for an abandoned one)."""
    times = []
    for info in infos:
        stamp = (
            info.get("mtime")
            or info.get("LastModified")
            or info.get("last_modified")
            or info.get("updated")
        )
        if hasattr(stamp, "timestamp"):
            stamp = stamp.timestamp()
        if not isinstance(stamp, int | float):
            return time.time()
        times.append(float(stamp))
    return max(times, default=time.time())


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _top_exists(fs: Any, top: str, local_disk: bool) -> bool:
    """Whether the folder or bucket is there. s3fs's exists() says False for a bucket on any
    error, so refused credentials or no connection read as "no such bucket" and the fix said
    to create it: ask HeadBucket, where only a 404 means absent. A 403 is not an answer (a
    role may write a prefix without the right to list the bucket): the real requests tell."""
    if local_disk or not hasattr(fs, "call_s3"):
        return bool(fs.exists(top))
    try:
        fs.call_s3("head_bucket", Bucket=top)
    except FileNotFoundError:
        return False
    except PermissionError:
        pass
    return True


def _network_fix(remote: RemoteStore) -> str:
    if urlsplit(remote.url).scheme in ("s3", "s3a"):
        return (
            "check the bucket name, the network and the credentials (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, a ~/.aws/credentials profile, or an instance role)"
            + (f"; endpoint_url is {remote.endpoint_url}" if remote.endpoint_url else "")
        )
    if urlsplit(remote.url).scheme == "file":
        return "check that the shared folder is mounted and writable"
    return "check the address, the network and the credentials"
