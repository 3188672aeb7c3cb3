"""The store: publish, link, remove, verify, and maintenance that never leaves the store."""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.errors import StoreError
from tasks.keys import key_of
from tasks.store import DIGEST_FIELD, OLD_MANIFEST, Store, manifest_digest, read_manifest

IDENTITY = {"stage": "quantize", "params": {"bits": 4}}
KEY = key_of(IDENTITY)


def build(store, identity=None, payload=b"weights"):
    identity = identity or IDENTITY
    key = key_of(identity)
    tmp = store.new_tmp(key)
    (tmp / "w.bin").write_bytes(payload)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "config.json").write_text("{}")
    return store.publish(key, tmp, {"key": key, "identity": identity, "metrics": {"ppl": 9.5}})


def test_entry_is_complete_only_after_publish(tmp_path):
    store = Store(tmp_path)
    tmp = store.new_tmp(KEY)
    (tmp / "w.bin").write_bytes(b"x")
    (tmp / "empty").mkdir()  # an empty folder holds nothing: it is not published
    assert not store.is_complete(KEY)
    entry = store.publish(KEY, tmp, {"key": KEY, "identity": IDENTITY})
    assert store.is_complete(KEY) and not tmp.exists()
    manifest = read_manifest(entry)
    assert sorted(os.listdir(entry)) == ["w.bin"]  # the step's files and nothing else
    assert manifest["files"] == [{"path": "w.bin", "size": 1, "xxh3": manifest["files"][0]["xxh3"],
                                  "mtime_ns": (entry / "w.bin").stat().st_mtime_ns}]  # fmt: skip
    assert manifest[DIGEST_FIELD] == manifest_digest(manifest)
    assert store.built_keys() == [KEY] and store.verify(KEY) == []


def test_a_link_in_a_steps_output_fails_the_publish(tmp_path):
    store = Store(tmp_path)
    tmp = store.new_tmp(KEY)
    (tmp / "w.bin").symlink_to("/etc/hostname")
    with pytest.raises(StoreError, match="outputs must be plain files"):
        store.publish(KEY, tmp, {"key": KEY, "identity": IDENTITY})


def _flip_byte(entry):
    data = bytearray((entry / "w.bin").read_bytes())
    data[0] ^= 1
    (entry / "w.bin").write_bytes(bytes(data))


def _edit_manifest(field, value):
    def edit(entry):
        manifest = read_manifest(entry)
        manifest[field] = value(manifest) if callable(value) else value
        _manifest_file(entry).write_text(json.dumps(manifest))

    return edit


def _manifest_file(entry):
    return entry.parent / f"{entry.name}.json"


def _replace_by_link(entry):
    outside = entry.parents[3] / "outside.bin"
    outside.write_bytes((entry / "w.bin").read_bytes())  # an identical copy outside the store
    (entry / "w.bin").unlink()
    (entry / "w.bin").symlink_to(outside)


DAMAGE = {
    "one byte changed": (_flip_byte, "w.bin: content changed"),
    "truncated": (lambda e: (e / "w.bin").write_bytes(b"wei"), "w.bin: size 3 != 7"),
    "deleted": (lambda e: (e / "w.bin").unlink(), "w.bin: missing"),
    "file added": (lambda e: (e / "extra.txt").write_text("?"), "extra.txt: not in the manifest"),
    "directory added": (lambda e: (e / "newdir").mkdir(), "newdir: an unexpected empty directory"),
    "file in an added directory": (
        lambda e: ((e / "d").mkdir(), (e / "d" / "x").write_text("1")),
        "d/x: not in the manifest",
    ),
    "symlink to an identical copy": (_replace_by_link, "w.bin: a symbolic link"),
    "fifo": (lambda e: os.mkfifo(e / "pipe"), "pipe: not a regular file"),
    "metrics edited": (_edit_manifest("metrics", {"ppl": 1.0}), "edited (its fields no longer"),
    "identity edited": (
        _edit_manifest("identity", {"stage": "quantize", "params": {"bits": 3}}),
        "its identity does not hash to the entry's key",
    ),
    "file and its record deleted": (
        lambda e: (
            (e / "w.bin").unlink(),
            _edit_manifest("files", lambda m: [f for f in m["files"] if f["path"] != "w.bin"])(e),
        ),
        "edited (its fields no longer",
    ),
    "manifest digest removed": (
        _edit_manifest(DIGEST_FIELD, None),
        "edited (its fields no longer match",
    ),
    "manifest deleted": (lambda e: _manifest_file(e).unlink(), "no manifest"),
    "entry deleted": (lambda e: shutil.rmtree(e), "a manifest without its entry"),
    "manifest replaced by a link": (
        lambda e: (
            _manifest_file(e).rename(e.parents[3] / "elsewhere.json"),
            _manifest_file(e).symlink_to(e.parents[3] / "elsewhere.json"),
        ),
        "a symbolic link",
    ),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_verify_names_each_kind_of_damage(tmp_path, case):
    store = Store(tmp_path)
    entry = build(store)
    assert store.audit() == {}
    damage, message = DAMAGE[case]
    damage(entry)
    problems = store.audit()
    assert list(problems) == [KEY], problems
    assert any(message in p for p in problems[KEY]), problems[KEY]


def test_verify_names_strays_in_the_store(tmp_path):
    store = Store(tmp_path)
    build(store)
    (store.store_dir / "zz").mkdir()
    (store.store_dir / KEY[:2] / "notakey").mkdir()
    (store.store_dir / "loose.txt").write_text("?")
    problems = store.audit()  # an empty shard "zz" is harmless
    assert sorted(problems) == sorted(
        [str(store.store_dir / "loose.txt"), str(store.store_dir / KEY[:2] / "notakey")]
    )
    assert all("unexpected in the store" in v[0] for v in problems.values())
    for path in list(problems):
        store.remove_damaged(path)
    assert store.audit() == {}


def test_an_entry_replaced_by_a_link_is_damage_and_removing_it_removes_the_link(tmp_path):
    store = Store(tmp_path)
    entry = build(store)
    outside = tmp_path / "copy"
    entry.rename(outside)
    entry.symlink_to(outside, target_is_directory=True)
    assert not store.is_complete(KEY) and store.built_keys() == []
    assert "a symbolic link" in store.audit()[KEY][0]
    store.remove_damaged(KEY)
    assert not entry.is_symlink() and not entry.exists()
    assert (outside / "w.bin").read_bytes() == b"weights"  # what it pointed at is untouched
    assert store.audit() == {}
    build(store)  # and the key builds again in its place
    assert store.is_complete(KEY)


def test_dependents_follow_the_keys_in_identities(tmp_path):
    store = Store(tmp_path)
    build(store)
    child = {"stage": "evaluate", "inputs": {"from": KEY}}
    grandchild = {"stage": "report", "rows": {"evaluate:x": {"key": key_of(child)}}}
    other = {"stage": "evaluate", "inputs": {"from": "f" * 64}}
    for identity in (child, grandchild, other):
        build(store, identity)
    assert store.dependents({KEY}) == {key_of(child), key_of(grandchild)}


def test_changes_sees_a_write_without_reading(tmp_path):
    store = Store(tmp_path)
    entry = build(store)
    assert store.changes(KEY) == ([], [])
    with open(entry / "w.bin", "r+b") as fh:  # same size, new mtime
        fh.write(b"W")
    (entry / "new.onnx").write_text("x")
    assert store.changes(KEY) == (["w.bin"], ["new.onnx"])


def test_content_changes_reads_only_what_a_stat_flags_and_keeps_same_bytes(tmp_path):
    """A touched file, or one copied without its times, is intact: refusing it would leave the
    user nothing to fix (verify finds no damage). Other bytes, or a link, are a change."""
    store = Store(tmp_path)
    entry = build(store)
    weights, config = entry / "w.bin", entry / "sub" / "config.json"
    os.utime(weights, ns=(1, 1))  # `cp -r`, a restore without times
    config.chmod(0o644)
    config.write_text("{}")  # the same bytes written again
    assert store.changes(KEY) == (["w.bin", "sub/config.json"], [])
    assert store.content_changes(KEY) == ([], [])
    with open(weights, "r+b") as fh:  # same size, other bytes
        fh.write(b"W")
    config.unlink()
    config.symlink_to(weights)
    assert store.content_changes(KEY) == (["w.bin", "sub/config.json"], [])


def test_link_is_relative_and_moves_atomically(tmp_path):
    store = Store(tmp_path)
    build(store)
    other = {"stage": "other"}
    build(store, other)
    link = tmp_path / "default" / "quantize" / "int8"
    store.link(link, KEY)
    assert not os.path.isabs(os.readlink(link))
    assert (link / "w.bin").read_bytes() == b"weights"
    store.link(link, key_of(other))
    assert store.links() == {link: key_of(other)}


@pytest.mark.parametrize(
    ("root", "link"),
    [
        ("artifacts", "artifacts/default/quantize/int8"),
        ("artifacts", "artifacts/default/model"),
        ("{tmp}/artifacts", "{tmp}/artifacts/default/quantize/int8"),
        ("artifacts", "{tmp}/artifacts/default/model"),  # relative root, absolute link
        ("artifacts", "elsewhere/model"),  # outside the artifacts folder
        ("artifacts", "artifacts/../up/model"),
        ("a/../artifacts", "a/../artifacts/default/model"),
        ("artifacts", "artifacts/store/ab/link"),  # inside the store: relpath's short form
        ("artifacts", "artifacts/model"),
    ],
)
def test_a_links_target_is_what_relpath_says(tmp_path, monkeypatch, root, link):
    """Store.link climbs out of the link's folders instead of asking os.path.relpath (which
    reads the working folder twice): the same target for every link, inside or not."""
    monkeypatch.chdir(tmp_path)
    store = Store(Path(root.format(tmp=tmp_path)))
    link_path = Path(link.format(tmp=tmp_path))
    expected = os.path.relpath(store.entry(KEY), link_path.parent)
    assert store._link_target(link_path, KEY) == expected


@pytest.mark.parametrize("occupant", ["directory", "file", "foreign link"])
def test_a_link_never_replaces_what_the_tool_did_not_make(tmp_path, occupant):
    store = Store(tmp_path)
    build(store)
    link = tmp_path / "default" / "quantize" / "int8"
    link.parent.mkdir(parents=True)
    if occupant == "directory":
        link.mkdir()
        (link / "notes.txt").write_text("mine")
    elif occupant == "file":
        link.write_text("mine")
    else:
        link.symlink_to(tmp_path)
    with pytest.raises(StoreError, match="fix: move it away"):
        store.link(link, KEY)
    assert sorted(p.name for p in link.parent.iterdir()) == ["int8"]  # no stray .int8.<pid>
    if occupant == "file":
        assert link.read_text() == "mine"
    elif occupant == "directory":
        assert (link / "notes.txt").read_text() == "mine"


def test_remove_and_sweep(tmp_path):
    store = Store(tmp_path)
    build(store)
    store.remove(KEY)
    assert not store.is_complete(KEY) and store.built_keys() == []
    left = [store.store_dir / ".tmp" / f"{KEY}.{kind}999999999"
            for kind in ("", "deleting-", "scratch-")]  # fmt: skip
    for path in left:
        path.mkdir(parents=True)
    assert store.staging.sweep(dry_run=True) == [(p, 0) for p in sorted(left)]
    assert all(p.exists() for p in left)
    assert store.staging.sweep() == [(p, 0) for p in sorted(left)]
    assert not any(p.exists() for p in left)


def test_a_new_build_removes_what_earlier_builds_of_its_key_left(tmp_path):
    store = Store(tmp_path)
    failed = store.store_dir / ".tmp" / f"{KEY}.12345"
    other_key = store.store_dir / ".tmp" / f"{'c' * 64}.12345"
    for path in (failed, other_key):
        path.mkdir(parents=True)
    with store.lock(KEY):
        tmp = store.new_tmp(KEY)
    assert tmp.is_dir() and not failed.exists() and other_key.exists()


def test_sweep_removes_only_its_own_names_and_never_follows_a_link(tmp_path):
    store = Store(tmp_path)
    build(store)
    victim = tmp_path / "victim"
    (victim / f"{KEY}.1").mkdir(parents=True)  # named like a build, but outside the store
    (victim / "precious").mkdir()
    tmp_root = store.store_dir / ".tmp"
    for name in ("notes", f"{KEY}.abc", f"{KEY}.1.bak"):  # not names the tool makes
        (tmp_root / name).mkdir(parents=True)
    (tmp_root / f"{KEY}.2").symlink_to(victim, target_is_directory=True)
    assert store.staging.sweep() == []
    assert sorted(p.name for p in tmp_root.iterdir()) == sorted(
        ["notes", f"{KEY}.abc", f"{KEY}.1.bak", f"{KEY}.2"]
    )
    for path in tmp_root.iterdir():
        path.unlink() if path.is_symlink() else path.rmdir()
    tmp_root.rmdir()
    tmp_root.symlink_to(victim, target_is_directory=True)  # .tmp itself a link
    with pytest.raises(StoreError, match="is a symbolic link"):
        store.staging.sweep()
    assert sorted(p.name for p in victim.iterdir()) == [f"{KEY}.1", "precious"]


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tasks.store import Store
    with Store(Path(sys.argv[1])).lock(sys.argv[2]):
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_a_build_of_another_pid_namespace_is_not_stale_while_its_lock_is_held(tmp_path):
    """The pid in a temporary directory's name means nothing in another container sharing the
    volume: staleness is judged by the key's lock."""
    store = Store(tmp_path)
    running = store.store_dir / ".tmp" / f"{KEY}.1"  # pid 1 is alive here; 999999999 is not
    dead_pid_but_locked = store.store_dir / ".tmp" / f"{KEY}.999999999"
    for path in (running, dead_pid_but_locked):
        path.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path), KEY],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert store.staging.sweep() == []
        assert running.exists() and dead_pid_but_locked.exists()
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p for p, _ in store.staging.sweep()) == [running, dead_pid_but_locked]


def test_lock_is_exclusive_across_processes(tmp_path):
    import multiprocessing as mp

    store = Store(tmp_path)
    with store.lock(KEY):
        ctx = mp.get_context("fork")
        p = ctx.Process(target=_try_lock, args=(tmp_path,))
        p.start()
        p.join(10)
        assert p.exitcode == 3  # the child found the lock held


def _try_lock(root):
    with Store(root).lock(KEY, wait=False) as held:
        os._exit(0 if held else 3)


def test_unreadable_manifest_is_a_store_error(tmp_path):
    store = Store(tmp_path)
    entry = build(store)
    _manifest_file(entry).write_text("{")
    with pytest.raises(StoreError, match="doit verify"):
        store.manifest(KEY)
    assert "unreadable" in store.verify(KEY)[0]


def test_a_link_set_aside_while_rebuilding_is_still_a_link(tmp_path):
    store = Store(tmp_path)
    build(store)
    link = tmp_path / "r" / "quantize" / "x"
    store.link(link, KEY)
    store.set_aside(link)
    assert not link.exists() and store.links() == {store.previous(link): KEY}
    store.forget_previous(link)
    assert store.links() == {}


def test_links_skip_the_reserved_folders(tmp_path):
    store = Store(tmp_path)
    build(store)
    (tmp_path / "envs" / "e" / "bin").mkdir(parents=True)
    (tmp_path / "envs" / "e" / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mine").symlink_to("/etc")  # a link the user made: not the store's
    assert store.links() == {}


def test_a_build_stopped_between_its_two_renames_is_unfinished_and_rebuilt(tmp_path):
    store = Store(tmp_path)
    entry = build(store)
    _manifest_file(entry).unlink()  # as if killed after the folder's rename, before the manifest's
    assert not store.is_complete(KEY) and store.unfinished() == [KEY]
    assert store.built_keys() == []
    with store.build(KEY) as again:
        assert again is not None
        (again.folder / "w.bin").write_bytes(b"weights")
        again.publish({"key": KEY, "identity": IDENTITY})
    assert store.is_complete(KEY) and store.verify(KEY) == [] and store.unfinished() == []


def test_build_yields_none_when_the_key_is_complete(tmp_path):
    store = Store(tmp_path)
    build(store)
    with store.build(KEY) as again:
        assert again is None


def test_an_entry_of_the_earlier_layout_is_converted_when_looked_up(tmp_path):
    store = Store(tmp_path)
    entry = build(store)
    manifest = read_manifest(entry)
    _manifest_file(entry).rename(entry / OLD_MANIFEST)  # MANIFEST.json inside, as before
    with store.lock(KEY):  # busy (or read-only): left as it is, and said so
        assert not store.is_complete(KEY)
        assert "earlier modelkiln" in store.verify(KEY)[0]
    assert store.is_complete(KEY)
    assert not (entry / OLD_MANIFEST).exists() and read_manifest(entry) == manifest
    assert store.verify(KEY) == []


def test_removal_takes_the_manifest_first(tmp_path):
    store = Store(tmp_path)
    entry = build(store)
    with store.lock(KEY):
        store.remove(KEY)
    assert not entry.exists() and not _manifest_file(entry).exists()


def test_an_entry_of_the_earlier_layout_is_converted_under_a_held_lock(tmp_path):
    store = Store(tmp_path)
    entry = build(store)
    _manifest_file(entry).rename(entry / OLD_MANIFEST)
    with store.build(KEY) as again:  # holds the lock: converted, not rebuilt over
        assert again is None
    assert store.verify(KEY) == [] and (entry / "w.bin").read_bytes() == b"weights"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_published_files_are_as_readable_as_the_umask_makes_new_files(tmp_path, monkeypatch,
                                                                      umask, mode):  # fmt: skip
    """Libraries write through temporary files (mkstemp: 0600) and rename them into place:
    such a file is published with the read bits a plain write would have had."""
    monkeypatch.setattr("tasks.store._umask", lambda: umask)
    store = Store(tmp_path)
    tmp = store.new_tmp(KEY)
    (tmp / "w.bin").write_bytes(b"x")
    os.chmod(tmp / "w.bin", 0o600)
    (tmp / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(tmp / "run.sh", 0o700)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "c.json").write_text("{}")
    os.chmod(tmp / "sub", 0o700)  # a library's mkdtemp folder
    entry = store.publish(KEY, tmp, {"key": KEY, "identity": IDENTITY})
    assert stat.S_IMODE((entry / "w.bin").stat().st_mode) == mode
    assert stat.S_IMODE((entry / "run.sh").stat().st_mode) == mode | 0o100  # no bit taken away
    searchable = mode | (mode & 0o444) >> 2  # x wherever r
    assert stat.S_IMODE((entry / "sub").stat().st_mode) == searchable | 0o700


def test_modes_are_left_alone_where_the_umask_cannot_be_read(tmp_path, monkeypatch):
    monkeypatch.setattr("tasks.store._umask", lambda: None)
    store = Store(tmp_path)
    tmp = store.new_tmp(KEY)
    (tmp / "w.bin").write_bytes(b"x")
    os.chmod(tmp / "w.bin", 0o600)
    entry = store.publish(KEY, tmp, {"key": KEY, "identity": IDENTITY})
    assert stat.S_IMODE((entry / "w.bin").stat().st_mode) == 0o600


def test_the_umask_is_read_without_changing_it():
    from tasks.store import _umask

    old = os.umask(0o022)
    os.umask(old)
    _umask.cache_clear()
    assert _umask() == old and os.umask(old) == old


def test_a_probe_sees_a_held_lock_and_locks_nothing(tmp_path):
    """gc --dry-run asks through a read-only descriptor: a read-only store gives no lock."""
    store = Store(tmp_path)
    with store.lock(KEY, probe=True) as free:
        assert free  # never locked: no lock file, nothing made
    assert not (store.store_dir / ".locks" / f"{KEY}.lock").exists()
    with store.lock(KEY), store.lock(KEY, probe=True) as free:
        assert not free
    with store.lock(KEY, probe=True) as free:
        assert free
