"""Damage never spreads: a step refuses an input whose files changed since it was built, and
`verify --remove-damaged` removes a damaged entry together with everything built from it."""

from __future__ import annotations

import os
import signal

from workspace import Workspace, executed, tiny_recipe

from tasks.store import read_manifest

INT4 = '\n[capture.int4]\nprecision = "int4"\n'


def flip_byte(path, keep_mtime: bool) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    if keep_mtime:  # damage no stat can see (bit rot, a careful tamperer)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def keys(ws: Workspace) -> dict[str, str]:
    """Task -> key of every complete entry."""
    out = {}
    for entry in (ws.artifacts / "store").glob("??/*.json"):
        out[read_manifest(entry.with_suffix(""))["built_as"]["task"]] = entry.stem
    return out


def test_a_damaged_input_is_refused_and_removed_with_what_was_built_from_it(
    tmp_path, tiny_model, prose_file, tiny_built
):
    ws = Workspace(tmp_path)
    ws.write(tiny_recipe(tiny_model, prose_file, extra=INT4))
    ws.seed(tiny_built, "model", "data:prose", "capture:fp32")
    assert executed(ws.doit("model", "data", "capture:fp32").stdout) == []
    before = keys(ws)
    weights = ws.artifacts / "recipe" / "model" / "model.safetensors"

    # A change a stat sees: the next step that reads the model refuses it, building nothing.
    flip_byte(weights, keep_mtime=False)
    proc = ws.doit("capture:int4", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert "its input model" in out and "model.safetensors" in out and "verify" in out
    assert "capture:int4" not in keys(ws)

    # verify names the damage and what was built from it; --dry-run removes nothing.
    proc = ws.doit("verify", check=False)
    assert proc.returncode != 0
    assert "model.safetensors: content changed" in proc.stdout
    assert "built from a damaged entry (capture:fp32)" in proc.stdout
    dry = ws.doit("verify", "--remove-damaged", "--dry-run", check=False)
    assert "would remove 1 damaged entry and 1 built from them" in dry.stdout
    assert keys(ws) == before
    ws.doit("verify", "--remove-damaged")
    assert set(keys(ws)) == {"data:prose"}
    assert set(executed(ws.doit("model", "capture:fp32").stdout)) == {"model", "capture:fp32"}
    assert keys(ws) == before  # the same keys, rebuilt whole
    assert ws.doit("verify").returncode == 0

    # A file touched, or copied without its times, is no damage: it is built on. Damage no
    # stat sees is built on too, and verify still removes both.
    os.utime(weights.parent / "config.json")
    flip_byte(weights.resolve(), keep_mtime=True)
    assert executed(ws.doit("capture:int4").stdout) == ["capture:int4"]
    proc = ws.doit("verify", "--remove-damaged")
    assert "removed 1 damaged entry and 2 built from them" in proc.stdout
    assert set(keys(ws)) == {"data:prose"}


def test_gc_removes_what_a_killed_step_left(tmp_path, tiny_model, prose_file):
    """A kill -9 mid-step leaves its temporary and scratch folders; gc removes both, and
    nothing else is left beside the store's entries."""
    ws = Workspace(tmp_path)
    ws.write(tiny_recipe(tiny_model, prose_file))
    proc = ws.building("model", folders=2)
    tmp_root = ws.artifacts / "store" / ".tmp"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = sorted(p.name.split(".")[1].rstrip("0123456789") for p in tmp_root.iterdir())
    assert left == ["", "scratch-"], left
    gc = ws.doit("gc")
    assert "2 unfinished builds" in gc.stdout
    assert list(tmp_root.iterdir()) == []
    assert executed(ws.doit("model").stdout) == ["model"]

    # A .tmp that is a link is refused, not entered: what it points at stays as it was.
    victim = tmp_path / "victim"
    (victim / f"{'a' * 64}.1").mkdir(parents=True)
    tmp_root.rmdir()
    tmp_root.symlink_to(victim, target_is_directory=True)
    proc = ws.doit("gc", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert "is a symbolic link" in proc.stdout + proc.stderr
    assert (victim / f"{'a' * 64}.1").is_dir()
