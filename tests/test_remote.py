"""The remote store: push, pull, races between pushers, gc and verify, on S3 (a moto server on
127.0.0.1) and on a shared disk (file://), through the same code."""

import errno
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_store import build as build_entry

from tasks import remote as remote_module
from tasks.errors import KilnError, StoreError
from tasks.keys import key_of
from tasks.remote import RemoteStore, check_remote_settings
from tasks.runs import BadCommand
from tasks.store import DIGEST_FIELD, Store, manifest_digest

IDENTITY = {"stage": "quantize", "params": {"bits": 4}}
KEY = key_of(IDENTITY)


class Killed(BaseException):
    """A kill in the middle of a push: nothing after it runs, not even cleanup."""


@pytest.fixture(params=["s3", "file"])
def remote_url(request, tmp_path):
    """(url, settings) of an empty remote; a fresh bucket per test on the session's moto
    server (tests/conftest.py)."""
    if request.param == "file":
        (tmp_path / "remote").mkdir()  # a shared folder is made by its owner, never by a push
        return {"remote": f"file://{tmp_path}/remote"}
    return request.getfixturevalue("s3_remote").settings("team/models")


@pytest.fixture
def remote(remote_url):
    return RemoteStore.from_settings({**remote_url, "push": True})


def another(remote):
    """A second machine's view of the same remote."""
    return RemoteStore(remote.url, endpoint_url=remote.endpoint_url)


def build(store, identity=None, payload=b"weights"):
    """A published local entry (tests/test_store.py's), by its key."""
    return build_entry(store, identity or IDENTITY, payload).name


def digests(store, key):
    return [(f["path"], f["size"], f["xxh3"]) for f in store.manifest(key)["files"]]


def uploads(remote, key):
    """The upload folders of key on the remote."""
    files = remote._find(f"{remote.root}/uploads/{key}")
    return sorted({path.split(f"/uploads/{key}/")[1].split("/")[0] for path in files})


def manifests(remote):
    return remote._find(f"{remote.root}/entries")


def no_leftovers(store):
    tmp = store.store_dir / ".tmp"
    return not tmp.exists() or not list(tmp.iterdir())


def rewrite_manifest(remote, key, edit, keep_digest=False):
    manifest = remote.manifest(key)
    edit(manifest)
    if not keep_digest:
        manifest[DIGEST_FIELD] = manifest_digest(manifest)
    remote.fs.pipe_file(remote.manifest_path(key), json.dumps(manifest).encode())


def test_a_protocol_nothing_installed_speaks_makes_the_remote_unusable_with_a_fix():
    """Unusable, so a build skips it once and goes on (not a traceback, nor one failure a
    step); the fix names what to install, which for gs:// is not modelkiln's extra."""
    with pytest.raises(remote_module.RemoteUnavailable) as unknown:
        RemoteStore("kiln-nowhere://bucket/m").is_complete("0" * 64)  # a build asks this first
    assert "no installed file system speaks kiln-nowhere://" in str(unknown.value)
    assert "fix: write s3://bucket/prefix" in str(unknown.value)
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(remote_module.RemoteUnavailable) as missing:
            RemoteStore("gs://bucket/m").is_complete("0" * 64)
        problem, fix = str(missing.value).split("\n  fix: ")
        assert "gcsfs" in problem and fix.startswith("pip install gcsfs ")


def test_push_then_pull_gives_the_same_entry(remote, tmp_path):
    here, there = Store(tmp_path / "here"), Store(tmp_path / "there")
    key = build(here, payload=b"weights" * 1000)
    seen = []
    assert (
        remote.push(here, key, progress=lambda done, total: seen.append((done, total))) == "pushed"
    )
    assert seen[-1] == (7002, 7002) and seen == sorted(seen)
    assert remote.is_complete(key) and remote.built_keys() == [key] and remote.verify(key) == []
    assert another(remote).push(here, key) == "present"  # nothing uploaded twice
    assert len(uploads(remote, key)) == 1

    assert another(remote).pull(there, key) == there.entry(key)
    assert there.verify(key) == [] and digests(there, key) == digests(here, key)
    pulled = there.manifest(key)
    assert pulled["pulled_from"] == remote.url and pulled["metrics"] == {"ppl": 9.5}
    assert not {"upload", "pushed_at", "pushed_from"} & set(pulled) and no_leftovers(there)
    assert remote.pull(there, key) == there.entry(key)  # complete here: nothing downloaded


def test_a_pull_downloads_an_entrys_files_at_once_where_the_remote_is_async(
    remote, tmp_path, monkeypatch
):
    """On S3 every file of the entry is in flight at once (a small file does not wait for a
    big one's round trips), each in one GET; on a shared disk one by one. The progress climbs
    to the total."""
    here, there = Store(tmp_path / "here"), Store(tmp_path / "there")
    key = build(here, payload=b"weights" * 100_000)
    remote.push(here, key)
    puller = another(remote)
    fs, flight = puller.fs, {"now": 0, "most": 0}
    if fs.async_impl:
        real = fs._get_file

        async def counted(*args, **kwargs):
            flight["now"] += 1
            flight["most"] = max(flight["most"], flight["now"])
            try:
                return await real(*args, **kwargs)
            finally:
                flight["now"] -= 1

        monkeypatch.setattr(fs, "_get_file", counted)
    seen = []
    assert puller.pull(there, key, lambda done, total: seen.append((done, total)))
    assert flight["most"] == (2 if fs.async_impl else 0)  # w.bin and sub/config.json
    assert seen[-1] == (700_002, 700_002) and seen == sorted(seen)
    assert there.verify(key) == [] and digests(there, key) == digests(here, key)

    monkeypatch.setattr(remote_module, "FILES_AT_ONCE", 1)  # a bound on files held open
    flight["most"], elsewhere = 0, Store(tmp_path / "elsewhere")
    assert puller.pull(elsewhere, key) and elsewhere.verify(key) == []
    assert flight["most"] == (1 if fs.async_impl else 0)

    # every file over s3fs's block size, which s3fs would read as ranges held in memory and
    # write after: each is one GET written as it arrives, all of them still at once
    monkeypatch.setattr(remote_module, "FILES_AT_ONCE", 8)
    if fs.async_impl:
        monkeypatch.setattr(fs, "default_block_size", 1)

        async def no_ranges(*args, **kwargs):
            raise AssertionError("a file was read as ranges held in memory")

        monkeypatch.setattr(fs, "_download_file_part_concurrent", no_ranges, raising=False)
    flight["most"], third = 0, Store(tmp_path / "third")
    assert puller.pull(third, key) and third.verify(key) == []
    assert flight["most"] == (2 if fs.async_impl else 0)


def test_pull_into_a_build_the_runner_holds(remote, tmp_path):
    here, there = Store(tmp_path / "here"), Store(tmp_path / "there")
    key = build(here)
    remote.push(here, key)
    path = f"{remote.upload_path(key, remote.manifest(key)['upload'])}/sub/config.json"
    good = remote.fs.cat_file(path)
    remote.fs.pipe_file(path, b"[]")  # same size, other bytes
    with there.build(key) as held:
        with pytest.raises(StoreError, match="config.json: content differs"):
            remote.pull_into(held, key)
        assert held.folder.is_dir() and not list(held.folder.iterdir())  # emptied, still its
    remote.fs.pipe_file(path, good)
    with there.build(key) as held:
        assert remote.pull_into(held, key) == there.entry(key)
    assert there.verify(key) == [] and digests(there, key) == digests(here, key)


def test_a_key_the_remote_lacks_is_not_pulled(remote, tmp_path):
    store = Store(tmp_path / "here")
    assert remote.pull(store, KEY) is None
    assert not store.is_complete(KEY) and no_leftovers(store)


def test_a_tampered_remote_file_is_refused(remote, tmp_path):
    here, there = Store(tmp_path / "here"), Store(tmp_path / "there")
    key = build(here)
    remote.push(here, key)
    path = f"{remote.upload_path(key, remote.manifest(key)['upload'])}/w.bin"
    data = bytearray(remote.fs.cat_file(path))
    data[0] ^= 1  # one byte, same size
    remote.fs.pipe_file(path, bytes(data))
    with pytest.raises(StoreError, match="w.bin: content differs from the manifest"):
        remote.pull(there, key)
    assert not there.is_complete(key) and no_leftovers(there)
    assert [line for line in remote.verify(key) if "content changed" in line]


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda m: m["identity"].update(params={"bits": 8}), "does not hash to the entry's key"),
        (lambda m: m["files"][0].update(path="../../escaped.bin"), "cannot be used"),
        (lambda m: m.update(upload="../other"), "names no valid upload"),
    ],
    ids=["identity", "path-outside", "upload-id"],
)
def test_a_manifest_that_does_not_match_its_key_is_refused(remote, tmp_path, edit, problem):
    here, there = Store(tmp_path / "here"), Store(tmp_path / "there")
    key = build(here)
    remote.push(here, key)
    rewrite_manifest(remote, key, edit)
    with pytest.raises(StoreError, match=problem):
        remote.pull(there, key)
    assert not there.is_complete(key) and no_leftovers(there)
    assert not (tmp_path / "escaped.bin").exists()


def test_an_edited_manifest_is_refused(remote, tmp_path):
    here, there = Store(tmp_path / "here"), Store(tmp_path / "there")
    key = build(here)
    remote.push(here, key)
    rewrite_manifest(remote, key, lambda m: m.update(metrics={"ppl": 1.0}), keep_digest=True)
    with pytest.raises(StoreError, match="edited"):
        remote.pull(there, key)
    assert not there.is_complete(key)
    assert any("edited" in line for line in remote.verify(key))


def test_a_manifest_naming_no_upload_is_refused(remote, tmp_path):
    here, there = Store(tmp_path / "here"), Store(tmp_path / "there")
    key = build(here)
    remote.push(here, key)
    rewrite_manifest(remote, key, lambda m: m.pop("upload"), keep_digest=False)
    with pytest.raises(StoreError, match="names no upload"):
        remote.pull(there, key)
    assert not there.is_complete(key)


def test_a_full_local_disk_is_not_the_remote_failing():
    from tasks.remote import _storage_failure

    assert not _storage_failure(OSError(errno.ENOSPC, "No space left on device"))
    assert _storage_failure(OSError(errno.ECONNREFUSED, "Connection refused"))


def test_two_pushers_of_one_key_leave_one_entry(remote, tmp_path, monkeypatch):
    first, second = Store(tmp_path / "a"), Store(tmp_path / "b")
    build(first, payload=b"bytes of machine a")
    build(second, payload=b"bytes of machine b, longer")
    late = another(remote)
    monkeypatch.setattr(late, "is_complete", lambda key: False)  # it looked before a published
    assert remote.push(first, KEY) == "pushed"
    assert late.push(second, KEY) == "lost"
    assert len(manifests(remote)) == 1
    assert uploads(remote, KEY) == [remote.manifest(KEY)["upload"]]  # the loser's files are gone
    there = Store(tmp_path / "there")
    remote.pull(there, KEY)
    assert digests(there, KEY) == digests(first, KEY) and remote.verify(KEY) == []


def test_a_server_that_ignores_the_condition_still_leaves_one_consistent_entry(
    remote, tmp_path, monkeypatch
):
    """a's manifest is overwritten by b's between a's put and its read-back: a sees that it
    lost and removes its files; the entry is b's, whole."""
    first, second = Store(tmp_path / "a"), Store(tmp_path / "b")
    build(first, payload=b"bytes of machine a")
    build(second, payload=b"bytes of machine b, longer")
    late = another(remote)

    def plain_put(self, path, data):  # the condition is not honoured: a plain overwrite
        if self._local_disk:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def put_then_b_overwrites(path, data):
        plain_put(remote, path, data)
        assert late.push(second, KEY) == "pushed"  # lands before a reads its manifest back

    monkeypatch.setattr(RemoteStore, "_create", plain_put)
    monkeypatch.setattr(late, "is_complete", lambda key: False)
    monkeypatch.setattr(remote, "_create", put_then_b_overwrites)
    assert remote.push(first, KEY) == "lost"
    assert len(manifests(remote)) == 1
    assert uploads(remote, KEY) == [remote.manifest(KEY)["upload"]]
    assert remote.verify(KEY) == []
    there = Store(tmp_path / "there")
    remote.pull(there, KEY)
    assert digests(there, KEY) == digests(second, KEY) and there.verify(KEY) == []


def test_a_push_killed_midway_shows_no_entry_and_gc_removes_it_after_the_grace(
    remote, tmp_path, monkeypatch
):
    here = Store(tmp_path / "here")
    key = build(here)
    real_put, calls = remote.fs.put_file, []

    def put_then_die(*args, **kwargs):
        if calls:
            raise Killed
        calls.append(args)
        return real_put(*args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(remote.fs, "put_file", put_then_die)
        remote.push(here, key)
    assert not remote.is_complete(key) and remote.built_keys() == []
    assert remote.pull(Store(tmp_path / "there"), key) is None
    assert len(uploads(remote, key)) == 1  # the orphan: one file of two
    assert remote.gc(keep=set(), grace_seconds=3600) == []  # a pusher may still be uploading
    [(folder, size)] = remote.gc(keep=set(), grace_seconds=0, dry_run=True)
    assert f"/uploads/{key}/" in folder and size > 0 and len(uploads(remote, key)) == 1
    assert remote.gc(keep=set(), grace_seconds=0) == [(folder, size)]
    assert uploads(remote, key) == []


@pytest.mark.parametrize("hours", [-1.0, float("nan")])
def test_a_grace_below_zero_is_refused_before_the_remote_is_touched(hours):
    """Either would remove the files of a push still uploading (graph=None: nothing is read)."""
    from tasks import glue

    failed = glue.gc(None, dry_run=False, remote=True, grace_hours=hours)  # type: ignore[arg-type]
    assert failed is not None and "--grace-hours" in str(failed) and "fix: " in str(failed)
    assert isinstance(failed, BadCommand)  # exit 3, as for a wrong command line


def test_a_failed_push_removes_its_own_files(remote, tmp_path, monkeypatch):
    here = Store(tmp_path / "here")
    key = build(here)

    def refuse(*args, **kwargs):
        raise PermissionError("access denied")

    with monkeypatch.context() as patch, pytest.raises(StoreError, match="cannot upload to"):
        patch.setattr(remote.fs, "put_file", refuse)
        remote.push(here, key)
    assert not remote.is_complete(key) and uploads(remote, key) == []


def test_gc_keeps_the_entries_in_keep(remote, tmp_path):
    here = Store(tmp_path / "here")
    kept = build(here)
    dropped = build(here, {"stage": "quantize", "params": {"bits": 8}}, b"other weights")
    remote.push(here, kept)
    remote.push(here, dropped)
    listed = remote.gc(keep={kept}, grace_seconds=0, dry_run=True)
    assert listed == [(remote.where(remote.manifest_path(dropped)), len(b"other weights") + 2)]
    assert remote.built_keys() == sorted([kept, dropped])  # a dry run removes nothing
    assert remote.gc(keep={kept}, grace_seconds=0) == listed
    assert remote.built_keys() == [kept] and remote.verify(kept) == []
    assert uploads(remote, dropped) == [] and len(uploads(remote, kept)) == 1


def test_verify_names_damage(remote, tmp_path):
    here = Store(tmp_path / "here")
    key = build(here)
    remote.push(here, key)
    folder = remote.upload_path(key, remote.manifest(key)["upload"])
    remote.fs.pipe_file(f"{folder}/w.bin", b"truncated")
    remote.fs.rm(f"{folder}/sub/config.json")
    remote.fs.pipe_file(f"{folder}/stray.txt", b"?")
    problems = remote.verify(key)
    assert any("w.bin: size 9 != 7" in p for p in problems)
    assert any("config.json: missing" in p for p in problems)
    assert any("stray.txt: not in the manifest" in p for p in problems)
    remote.remove(key)
    assert not remote.is_complete(key) and uploads(remote, key) == []
    assert remote.verify(key) == [f"{remote.where(remote.manifest_path(key))}: missing"]


def test_a_damaged_local_entry_is_not_pushed(remote, tmp_path):
    here = Store(tmp_path / "here")
    key = build(here)
    (here.entry(key) / "w.bin").write_bytes(b"changed")
    with pytest.raises(StoreError, match="changed since it was built"):
        remote.push(here, key)
    assert not remote.is_complete(key)


@pytest.mark.parametrize("damage", [b"{not json", b'{"key": "edited"}'])
def test_a_damaged_remote_entry_is_not_called_present(remote, tmp_path, damage):
    """Before, a push said "present" for it, and every pull of the key failed."""
    here = Store(tmp_path / "here")
    key = build(here)
    assert remote.push(here, key) == "pushed"
    remote.fs.pipe_file(remote.manifest_path(key), damage)
    with pytest.raises(StoreError, match="doit verify --remote"):
        remote.push(here, key)


def test_an_entry_copied_without_its_times_is_pushed(remote, tmp_path):
    here = Store(tmp_path / "here")
    key = build(here)
    os.utime(here.entry(key) / "w.bin", ns=(1, 1))
    assert remote.push(here, key) == "pushed" and remote.verify(key) == []


@pytest.mark.parametrize(
    "settings",
    [
        {"key": "AKIAIOSFODNN7EXAMPLE"},
        {"secret": "s3cr3t"},
        {"aws_access_key_id": "x"},
        {"aws_secret_access_key": "x"},
        {"token": "x"},
        {"password": "x"},
        {"remote": "s3://AKIAIOSFODNN7EXAMPLE:s3cr3t@bucket/models"},
        {"remote": "s3://AKIAIOSFODNN7EXAMPLE:s3cr3t@bucket//models"},  # not quoted by //
        {"endpoint_url": "https://user:s3cr3t@minio.example:9000"},
        {"profile": "AKIAIOSFODNN7EXAMPLE"},
    ],
)
def test_a_secret_in_the_settings_is_refused(settings):
    with pytest.raises(KilnError, match="AWS_ACCESS_KEY_ID") as err:
        check_remote_settings({"remote": "s3://bucket/models", **settings})
    assert "s3cr3t" not in str(err.value)  # the message never repeats the secret


def test_a_password_in_another_protocols_url_is_refused_with_its_own_advice():
    with pytest.raises(KilnError, match="ssh") as err:
        check_remote_settings({"remote": "sftp://ci:s3cr3t@host/srv/kiln"})
    assert "s3cr3t" not in str(err.value) and "AWS" not in str(err.value)


def test_settings_are_checked():
    check_remote_settings(
        {"remote": "s3://b/p", "push": True, "endpoint_url": "http://127.0.0.1:9000",
         "profile": "ci", "region": "eu-west-1"}
    )  # fmt: skip
    with pytest.raises(KilnError, match="did you mean push"):
        check_remote_settings({"remote": "s3://b/p", "pusj": True})
    with pytest.raises(KilnError, match="(?s)is not a bool.*push = true or push = false"):
        check_remote_settings({"remote": "s3://b/p", "push": "yes"})
    with pytest.raises(KilnError, match="not a URL"):
        check_remote_settings({"remote": "bucket/models"})
    with pytest.raises(KilnError, match="without a remote, leave remote out"):
        check_remote_settings({"remote": ""})


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("file://mnt/share/kiln", "file:///mnt/share/kiln"),  # a host 'mnt', not /mnt
        ("s3://bucket//models", "s3://bucket/models"),  # another prefix on S3
        ("file:////mnt/share", "file:///mnt/share"),
    ],
)
def test_a_url_that_means_another_place_than_it_seems_is_refused(url, fix):
    with pytest.raises(KilnError) as err:
        check_remote_settings({"remote": url})
    assert str(err.value).endswith(fix)


def test_a_remote_store_imports_nothing_until_used(tmp_path):
    code = textwrap.dedent("""
        import sys
        from tasks.remote import RemoteStore
        remote = RemoteStore.from_settings(
            {"remote": "s3://bucket/models", "endpoint_url": "http://127.0.0.1:1"})
        print(remote.url)
        print(sorted(m for m in ("fsspec", "s3fs", "botocore", "aiobotocore") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["s3://bucket/models", "[]"]


def test_both_stores_implement_the_entry_store_calls():
    from tasks.store import EntryStore, Store

    calls = [name for name in vars(EntryStore) if not name.startswith("_")]
    assert sorted(calls) == ["built_keys", "is_complete", "manifest", "remove", "verify"]
    for cls in (Store, RemoteStore):
        assert all(callable(getattr(cls, name, None)) for name in calls), cls


def test_a_failed_file_cancels_the_others_before_the_pull_gives_up(
    s3_remote, tmp_path, monkeypatch
):
    """One file of the entry is missing: the download still running is cancelled and waited
    for before the build folder is emptied, so nothing is written there afterwards."""
    import asyncio

    remote = RemoteStore.from_settings({**s3_remote.settings("cancel"), "push": True})
    here, there = Store(tmp_path / "here"), Store(tmp_path / "there")
    key = build(here)
    remote.push(here, key)
    puller, seen = another(remote), {"cancelled": 0, "late": 0}

    async def one_missing(rpath, lpath, callback=None, **kwargs):
        if rpath.endswith("config.json"):
            raise FileNotFoundError(rpath)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["cancelled"] += 1
            raise
        seen["late"] += 1

    monkeypatch.setattr(puller.fs, "_get_file", one_missing)
    with pytest.raises(StoreError, match="missing, though the remote manifest names it"):
        puller.pull(there, key)
    assert seen == {"cancelled": 1, "late": 0}
    assert not there.is_complete(key) and no_leftovers(there)


def test_an_interrupted_wait_stops_the_downloads_before_it_returns(s3_remote):
    """Ctrl-C while the caller waits for the event loop: the coroutine is cancelled and has
    stopped by the time the interrupt reaches the caller's cleanup."""
    import asyncio
    import signal
    import threading

    from tasks.remote import _run_in_loop

    class Interrupted(BaseException):
        pass

    fs = RemoteStore.from_settings(s3_remote.settings("interrupt")).fs
    state = {"running": False}

    async def long_download():
        state["running"] = True
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.2)  # a download winding down
            state["running"] = False

    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(
        0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1)
    )
    try:
        timer.start()
        with pytest.raises(Interrupted):
            _run_in_loop(fs.loop, long_download)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert state["running"] is False


def test_a_library_error_is_quoted_without_its_urls_query_strings():
    err = OSError('Could not connect to "http://127.0.0.1:1/b/k?uploadId=2~abc&partNumber=3"')
    assert remote_module._said(err) == 'Could not connect to "http://127.0.0.1:1/b/k"'
