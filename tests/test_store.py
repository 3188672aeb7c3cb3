import json
import os

import pytest

from tasks.store import MANIFEST, Store

KEY = "ab" + "0" * 62


def build(store, key=KEY, payload=b"weights"):
    tmp = store.new_tmp(key)
    (tmp / "w.bin").write_bytes(payload)
    return store.publish(key, tmp, {"key": key, "metrics": {}})


def test_entry_is_complete_only_after_publish(tmp_path):
    store = Store(tmp_path)
    tmp = store.new_tmp(KEY)
    (tmp / "w.bin").write_bytes(b"x")
    assert not store.is_complete(KEY)
    entry = store.publish(KEY, tmp, {"key": KEY})
    assert store.is_complete(KEY) and not tmp.exists()
    files = json.loads((entry / MANIFEST).read_text())["files"]
    assert files == [{"path": "w.bin", "size": 1, "xxh3": files[0]["xxh3"]}]
    assert store.built_keys() == [KEY]


def test_verify_names_changed_missing_and_extra_files(tmp_path):
    store = Store(tmp_path)
    entry = build(store)
    assert store.verify(KEY) == []
    (entry / "w.bin").write_bytes(b"WEIGHTS")  # same size, other bytes
    (entry / "extra.txt").write_text("?")
    problems = store.verify(KEY)
    assert any("w.bin: content changed" in p for p in problems)
    assert any("extra.txt: not in the manifest" in p for p in problems)
    (entry / "w.bin").unlink()
    assert any("w.bin: missing" in p for p in store.verify(KEY))


def test_link_is_relative_and_moves_atomically(tmp_path):
    store = Store(tmp_path)
    build(store)
    other = "cd" + "1" * 62
    build(store, other)
    link = tmp_path / "default" / "quantize" / "int8"
    store.link(link, KEY)
    assert not os.path.isabs(os.readlink(link))
    assert (link / "w.bin").read_bytes() == b"weights"
    store.link(link, other)
    assert store.links() == {link: other}


def test_remove_and_stale_tmps(tmp_path):
    store = Store(tmp_path)
    build(store)
    store.remove(KEY)
    assert not store.is_complete(KEY) and store.built_keys() == []
    dead = store.store_dir / ".tmp" / f"{KEY}.999999999"
    dead.mkdir(parents=True)
    alive = store.new_tmp(KEY)
    assert store.stale_tmps() == [dead]
    assert alive.exists()


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
    import fcntl

    path = Store(root).store_dir / ".locks" / f"{KEY}.lock"
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os._exit(3)
    os._exit(0)


def test_unreadable_manifest_is_a_store_error(tmp_path):
    from tasks.errors import StoreError

    store = Store(tmp_path)
    entry = build(store)
    (entry / MANIFEST).write_text("{")
    with pytest.raises(StoreError, match="doit verify"):
        store.manifest(KEY)


def test_an_unreadable_manifest_is_reported_as_damage(tmp_path):
    store = Store(tmp_path)
    entry = build(store)
    (entry / MANIFEST).write_text("{")
    assert store.verify(KEY) == [f"{entry / MANIFEST}: unreadable (cannot read {entry / MANIFEST}: "
                                 "Expecting property name enclosed in double quotes: line 1 column 2 (char 1);"
                                 " run `doit verify --remove-damaged`, then `doit`)"]  # fmt: skip


def test_a_link_set_aside_while_rebuilding_is_still_a_link(tmp_path):
    store = Store(tmp_path)
    build(store)
    link = tmp_path / "r" / "quantize" / "x"
    store.link(link, KEY)
    store.set_aside(link)
    assert not link.exists() and store.links() == {store.previous(link): KEY}
    store.forget_previous(link)
    assert store.links() == {}
