import os

from tasks.digest import DigestCache, hash_file


def test_file_digest_is_cached_by_stat(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    cache = DigestCache(tmp_path / "cache.sqlite")
    first = cache.file_digest(f)
    assert first == hash_file(f)

    calls = []
    monkeypatch.setattr("tasks.digest.hash_file", lambda p: calls.append(p) or "never")
    assert cache.file_digest(f) == first  # served from the cache: the file is not read
    assert calls == []

    f.write_bytes(b"y" * 1000)  # same size, new mtime: re-hashed
    os.utime(f, ns=(1, 1))
    assert cache.file_digest(f) == "never"
    assert calls == [f]


def test_tree_digest_sees_content_names_and_new_files(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    (root / "a.txt").write_text("a")
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text("b")
    cache = DigestCache(tmp_path / "cache.sqlite")
    base = cache.tree_digest(root)
    assert cache.tree_digest(root) == base

    (root / "sub" / "b.txt").rename(root / "sub" / "c.txt")
    renamed = cache.tree_digest(root)
    assert renamed != base
    (root / "d.txt").write_text("")
    assert cache.tree_digest(root) not in (base, renamed)


def test_cache_survives_a_new_process_handle(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(4096))
    DigestCache(tmp_path / "c.sqlite").file_digest(f)
    again = DigestCache(tmp_path / "c.sqlite")
    row = again._conn().execute("SELECT COUNT(*) FROM digests").fetchone()
    assert row == (1,)


def _hash_sources(db):
    from pathlib import Path

    cache = DigestCache(Path(db))
    for path in sorted(Path(__file__).parent.glob("*.py")):
        cache.file_digest(path)
    cache.close()


def test_many_processes_share_a_fresh_cache(tmp_path):
    """Two doit processes start together: the cache's first open must not fail as 'locked'."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hash_sources, args=(tmp_path / "d.sqlite",)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8


def test_a_damaged_cache_file_is_replaced_once_and_digests_stay_right(tmp_path, capsys):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 100)
    db = tmp_path / "c.sqlite"
    db.write_bytes(b"not a database" * 300)  # a cache file that was overwritten or cut
    assert DigestCache(db).file_digest(f) == hash_file(f)
    err = capsys.readouterr().err
    assert "was damaged (file is not a database)" in err and "cannot be used" not in err
    again = DigestCache(db)
    assert again.file_digest(f) == hash_file(f)
    assert again._conn().execute("SELECT COUNT(*) FROM digests").fetchone() == (1,)
    assert capsys.readouterr().err == ""  # the new file serves the next run without a word
