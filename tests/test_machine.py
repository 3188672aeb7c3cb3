"""Failures of the machine itself: each is one clear message, no traceback, and nothing that is
already built is lost or looks complete when it is not. A full disk and a read-only store are
real (a small tmpfs, a read-only bind mount: this needs root, as CI has)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from test_store import build as build_entry
from workspace import Workspace, executed, tiny_recipe

from tasks.staging import os_problem
from tasks.store import Store, manifest_file


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()}): needs root")


@contextlib.contextmanager
def read_only(path: Path):
    """path, read-only for everyone (root too) until the block ends."""
    _mount("--bind", str(path), str(path))
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def one_message(proc: subprocess.CompletedProcess, *words: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    for word in words:
        assert word in out, out
    return out


def entries(ws: Workspace) -> set[str]:
    """The store's complete entries, by manifest."""
    return {p.name for p in (ws.artifacts / "store").glob("??/*.json")}


def complete_entries_verify(ws: Workspace) -> None:
    """Every entry that looks complete is whole."""
    proc = ws.doit("verify", check=False)
    assert "damaged" not in proc.stdout, proc.stdout


@pytest.fixture
def ws(tmp_path, tiny_model, prose_file) -> Workspace:
    ws = Workspace(tmp_path)
    ws.write(tiny_recipe(tiny_model, prose_file))
    return ws


@pytest.mark.parametrize("under", [False, True], ids=["is a file", "under a file"])
def test_an_artifacts_path_that_is_a_file(ws, under):
    ws.artifacts.write_text("not a directory")
    argv = ws.argv("list")
    if under:
        argv[-1] = f"artifacts={ws.artifacts / 'sub'}"
    proc = subprocess.run(argv, capture_output=True, text=True)
    one_message(proc, "a part of the path is a file" if under else "is a file, not a directory")


def test_a_read_only_store_still_lists_explains_and_verifies(ws, tiny_built):
    ws.seed(tiny_built, "model", "data:prose")
    ws.doit("model", "data")
    stray = build_entry(Store(ws.artifacts), {"stage": "other"})  # what a gc would remove
    with read_only(ws.artifacts):
        # gc --dry-run lists it (it takes no lock, which a read-only store cannot give)
        for command in (["list"], ["explain"], ["verify"], ["info", "model"], ["gc", "--dry-run"]):
            proc = ws.doit(*command, check=False)
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert f"would remove {stray.name[:16]}..." in proc.stdout
        assert "capture:fp32: will run: never built" in ws.doit("explain").stdout
        one_message(ws.doit("capture:fp32", check=False), "the file system is read-only")
    assert executed(ws.doit("model").stdout) == []  # nothing built was lost


def test_a_read_only_store_folder_alone(ws, tiny_built):
    ws.seed(tiny_built, "model")
    ws.doit("model")
    with read_only(ws.artifacts / "store"):
        one_message(ws.doit("data", check=False), "cannot lock", "read-only")
    assert executed(ws.doit("data").stdout) == ["data:prose"]


def test_removing_damage_from_a_read_only_store_is_one_message(ws):
    ws.doit("data")
    (ws.artifacts / "recipe" / "data" / "prose" / "stray.txt").write_text("?")
    with read_only(ws.artifacts):
        one_message(ws.doit("verify", "--remove-damaged", check=False), "read-only")
    assert ws.doit("verify", "--remove-damaged").returncode == 0  # writable again: removed


# Room for the build on a 6 MB disk, counted from an empty workspace: none (the digest cache
# and doit cannot write), then points in the model, capture and quantize steps (the whole build
# needs about 1.5 MB).
ROOM_KB = [0, 96, 700, 1500]


def test_a_full_disk_is_one_message_and_nothing_incomplete_looks_complete(ws):
    """One workspace meets each point in turn, every run going on from what the one before
    left, as builds on a filling disk do: each failure is one message, no entry that looks
    complete is damaged, nothing built before is lost, and with room again the build ends."""
    with small_disk(ws.artifacts, "6m"):
        ballast = ws.artifacts / "ballast"
        empty = shutil.disk_usage(ws.artifacts).free
        failed = 0
        for room_kb in ROOM_KB:
            free = shutil.disk_usage(ws.artifacts).free
            used = empty - free  # what the runs so far left
            with contextlib.suppress(OSError), open(ballast, "wb") as fh:
                fh.write(b"\0" * max(free - room_kb * 1024 + used, 0))
            before = entries(ws)
            proc = ws.doit(check=False)
            if proc.returncode != 0:
                out = one_message(proc)
                assert "no space left" in out.lower() or "ran out of space" in out, out
                assert "None" not in out, out  # a path the error did not name
                assert not re.search(r"cannot write \S*/store/[0-9a-f]{2}/", out), out  # an input
                failed += 1
            ballast.unlink()
            complete_entries_verify(ws)
            assert before <= entries(ws), f"an entry was lost at {room_kb} kB"
        assert failed >= 3  # the build needs more than 700 kB: these points are really full
        ws.doit()  # with room again, the build finishes
        complete_entries_verify(ws)
        assert executed(ws.doit().stdout) == []


def test_a_disk_error_names_its_file_else_the_place_given_else_none():
    full = OSError(errno.ENOSPC, "No space left on device")  # as sqlite's and some C writers'
    assert os_problem(full).startswith("cannot write: no space left on the device\n  fix: ")
    assert os_problem(full, "/a/store").startswith("cannot write /a/store: no space left")
    named = OSError(errno.ENOSPC, "No space left on device", "/a/store/x/model.onnx")
    assert os_problem(named, "/a/store").startswith("cannot write /a/store/x/model.onnx: ")
    copy = OSError(
        errno.ENOSPC, "No space left on device", "/a/input/m.data", None, "/a/tmp/m.data"
    )
    assert os_problem(copy).startswith("cannot write /a/tmp/m.data: ")  # not the file read
    denied = OSError(errno.EACCES, "Permission denied", "/models/x/model.safetensors")
    assert os_problem(denied, doing="read").endswith("fix: make it readable for this user")


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_is_one_line_and_leaves_nothing_complete(ws, tiny_built, signum, status):
    ws.seed(tiny_built, "model", "data:prose")
    ws.doit("model", "data")
    proc = ws.building("capture:fp32")
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # as Ctrl-C does: the whole foreground group
    else:
        os.kill(proc.pid, signum)  # as a scheduler does: the doit process alone
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, out + err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], err
    assert "capture:fp32 left" in lines[0] and "doit gc" in lines[0]
    left = {p.name for p in (ws.artifacts / "store" / ".tmp").iterdir()}
    assert all(name in lines[0] for name in left), (left, lines[0])  # the scratch folder too
    assert not (ws.artifacts / "recipe" / "capture" / "fp32").exists()
    assert "removing unfinished build store/.tmp/" in ws.doit("gc").stdout  # where it is
    assert not list((ws.artifacts / "store" / ".tmp").iterdir())
    assert executed(ws.doit("capture:fp32").stdout) == ["capture:fp32"]
    assert manifest_file(ws.artifacts / "recipe" / "capture" / "fp32").is_file()


@pytest.mark.parametrize("occupant", ["directory", "file"])
def test_a_link_path_taken_by_the_user_is_left_alone(ws, occupant):
    link = ws.artifacts / "recipe" / "data" / "prose"
    link.parent.mkdir(parents=True)
    if occupant == "directory":
        link.mkdir()
        (link / "mine.txt").write_text("mine")
    else:
        link.write_text("mine")
    one_message(ws.doit("data", check=False), f"{link} is a {occupant}", "move it away")
    assert sorted(p.name for p in link.parent.iterdir()) == ["prose"]  # no stray .prose.<pid>
    assert (link / "mine.txt" if occupant == "directory" else link).read_text() == "mine"
