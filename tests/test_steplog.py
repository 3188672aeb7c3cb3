"""Step logs: what a step writes to fds 1 and 2 reaches the terminal and its log; the store
keeps a log beside its entry, and gc removes old failed logs.

pytest's own capture replaces fds 1 and 2 too, so captures run in a child Python whose real
stdout and stderr are pipes the test reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from workspace import tiny_recipe

from tasks import steplog
from tasks.errors import RecipeError
from tasks.graph import load_graph
from tasks.keys import key_of
from tasks.store import Store

ROOT = Path(__file__).resolve().parents[1]
HEADER = re.compile(r"# (?P<title>.+), started \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n")


def run_script(
    body: str, *args: object, timeout: float = 60, **popen
) -> subprocess.CompletedProcess:
    """Run body in a child Python with steplog imported; its stdout and stderr as bytes."""
    script = (
        "import os, subprocess, sys, time\nfrom pathlib import Path\nfrom tasks import steplog\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in (steplog.INTERACTIVE_ENV, "PYTHONUNBUFFERED"):  # buffered, as a user's run is
        env.pop(name, None)
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(body), *map(str, args)],
        cwd=ROOT, env=env, timeout=timeout, **popen,
    )  # fmt: skip


def body_of(log: Path, title: str = "t") -> str:
    """The log's text after its header, which must name title."""
    text = log.read_text()
    header = HEADER.match(text)
    assert header and header["title"] == title, text[:200]
    return text[header.end() :]


def test_prints_fd_writes_c_stdio_and_children_reach_the_terminal_and_the_log(tmp_path):
    log = tmp_path / "step.log"
    proc = run_script(
        """
        import ctypes
        print("before", flush=True)
        with steplog.capture(Path(sys.argv[1]), title="quantize:int8"):
            print("py-out", flush=True)
            print("py-err", file=sys.stderr)
            os.write(1, b"fd-out\\n")
            os.write(2, b"fd-err\\n")
            child = "import os, sys; print('child-out'); sys.stderr.write('child-err\\\\n'); os.write(2, b'child-fd\\\\n')"
            subprocess.run([sys.executable, "-c", child], check=True)
            ctypes.CDLL(None).printf(b"c-out\\n")  # held in libc's buffer: stdout is a pipe
        print("after", flush=True)
        os.write(2, b"after-err\\n")
        """,
        log,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    # Every byte passes through once, on the stream it was written to.
    assert proc.stdout == b"before\npy-out\nfd-out\nchild-out\nc-out\nafter\n"
    assert proc.stderr == b"py-err\nfd-err\nchild-err\nchild-fd\nafter-err\n"
    lines = body_of(log, "quantize:int8").splitlines()
    out = ["py-out", "fd-out", "child-out", "c-out"]
    err = ["py-err", "fd-err", "child-err", "child-fd"]
    assert sorted(lines) == sorted(out + err)  # nothing from before or after the block
    assert [line for line in lines if line in out] == out  # each stream in its own order
    assert [line for line in lines if line in err] == err


def test_a_progress_bar_keeps_its_last_frame_in_the_log_and_every_frame_on_the_terminal(tmp_path):
    log = tmp_path / "step.log"
    written = (
        b"\r 10%|#  |\r 50%|## |\r100%|###|\n"  # a bar that stays (tqdm leave=True)
        b"\rbar 1/2\rbar 2/2\r        \rdone\n"  # one that clears itself, text drawn over it
        b"plain\n\n"
        b"last without newline"
    )
    proc = run_script(
        """
        with steplog.capture(Path(sys.argv[1]), title="t"):
            for byte in bytes.fromhex(sys.argv[2]):  # a pipe read may split a frame anywhere
                os.write(2, bytes([byte]))
        """,
        log,
        written.hex(),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == written
    assert body_of(log) == "100%|###|\nbar 2/2\ndone\nplain\n\nlast without newline\n"


@pytest.mark.parametrize(
    ("data", "logged"),
    [
        (b"a\rb\rc\r\n", b"c\n"),  # \r\n: the line's last frame, not an empty one
        (b"x\r   \r\n", b"x\n"),  # a cleared bar at the end of a line: no blank line after it
        (b"one\ntwo\r\nthree\n", b"one\ntwo\nthree\n"),
        (b"bar\r" + b"x" * 70_000 + b"\n", b"bar\n" + b"x" * 70_000 + b"\n"),  # never held whole
    ],
)
def test_frames_are_the_same_whatever_the_chunks(data, logged):
    for size in (1, 7, len(data)):
        frames = steplog._Frames()
        out = b"".join(frames.feed(data[i : i + size]) for i in range(0, len(data), size))
        assert out + frames.end() == logged, size


@pytest.mark.parametrize("error", ["RuntimeError", "KeyboardInterrupt"])
def test_an_exception_in_the_block_restores_the_fds_and_the_log_is_whole(tmp_path, error):
    log = tmp_path / "step.log"
    proc = run_script(
        f"""
        before = [os.fstat(fd) for fd in (1, 2)]
        open_fds = len(os.listdir("/proc/self/fd"))
        try:
            with steplog.capture(Path(sys.argv[1]), title="t"):
                print("inside", flush=True)
                os.write(2, b"x" * 300_000 + b"\\n")  # more than a pipe holds
                raise {error}("boom")
        except {error}:
            pass
        after = [os.fstat(fd) for fd in (1, 2)]
        assert [(s.st_dev, s.st_ino) for s in before] == [(s.st_dev, s.st_ino) for s in after]
        assert len(os.listdir("/proc/self/fd")) == open_fds, "fds leaked"
        assert not steplog._active
        print("after", flush=True)
        """,
        log,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == b"inside\nafter\n"
    assert proc.stderr == b"x" * 300_000 + b"\n"
    assert sorted(body_of(log).splitlines()) == sorted(["inside", "x" * 300_000])


def test_a_log_that_cannot_be_written_costs_the_log_not_the_output(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    proc = run_script(
        """
        with steplog.capture(Path("/dev/full"), title="t"):
            for i in range(2000):
                print(f"line {i}", flush=True)
        """
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"".join(f"line {i}\n".encode() for i in range(2000))
    assert proc.stderr.count(b"is incomplete") == 1, proc.stderr.decode()


def test_a_reader_that_fails_still_passes_everything_on_and_nothing_hangs(tmp_path):
    log = tmp_path / "step.log"
    proc = run_script(
        """
        steplog._Frames.feed = lambda self, data: 1 / 0  # a bug in the log's code
        with steplog.capture(Path(sys.argv[1]), title="t"):
            # A child writing more than a pipe holds: it blocks if nobody reads the pipe.
            subprocess.run([sys.executable, "-c", "import os; os.write(1, b'y' * 1_000_000)"], check=True)
            print("py", flush=True)
        """,
        log,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"y" * 1_000_000 + b"py\n"
    assert proc.stderr.count(b"is incomplete") == 1, proc.stderr.decode()
    assert b"ZeroDivisionError" in proc.stderr


def test_interactive_is_the_users_stderr_inside_a_capture_and_its_children(tmp_path):
    check = """
        child = "from tasks import steplog; print(steplog.interactive(), flush=True)"
        results = [steplog.interactive()]
        with steplog.capture(Path(sys.argv[1]), title="t"):
            results += [steplog.interactive(), sys.stderr.isatty()]
            out = subprocess.run([sys.executable, "-c", child], stdout=subprocess.PIPE, check=True)
            results.append(out.stdout.decode().strip())
        results.append(steplog.interactive())
        os.write(int(sys.argv[2]), repr(results).encode())
    """

    def results(**popen) -> str:
        read, write = os.pipe()
        try:
            proc = run_script(check, tmp_path / "step.log", write, pass_fds=(write,), **popen)
        finally:
            os.close(write)
        with os.fdopen(read) as fh:
            text = fh.read()
        assert proc.returncode == 0, proc.stderr
        return text

    assert results() == "[False, False, False, 'False', False]"
    primary, secondary = os.openpty()  # a terminal for the child's stderr
    try:
        # fd 2 is a pipe inside the capture, yet progress bars see the user's terminal
        got = results(stderr=secondary)
    finally:
        os.close(primary)
        os.close(secondary)
    assert got == "[True, True, False, 'True', True]"


def test_each_doit_worker_captures_its_own_step(tmp_path):
    (tmp_path / "dodo.py").write_text(
        textwrap.dedent(
            """
            import os, subprocess, sys, time
            from pathlib import Path
            from tasks import steplog

            def act(name):
                with steplog.capture(Path(f"{name}.log"), title=name):
                    for i in range(5):
                        print(f"{name} out {i}", flush=True)
                        os.write(2, f"{name} err {i}\\n".encode())
                        time.sleep(0.05)
                    subprocess.run([sys.executable, "-c", f"print('{name} child')"], check=True)

            def task_a():
                return {"actions": [(act, ["a"])], "verbosity": 2}

            def task_b():
                return {"actions": [(act, ["b"])], "verbosity": 2}
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "doit", "-n", "2", "-f", "dodo.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ("a", "b"):
        want = [f"{name} out {i}" for i in range(5)] + [f"{name} err {i}" for i in range(5)]
        assert sorted(body_of(tmp_path / f"{name}.log", name).splitlines()) == sorted(
            [*want, f"{name} child"]
        )
        for line in want:
            assert line in (proc.stdout + proc.stderr)


def test_tail_gives_the_last_lines(tmp_path):
    log = tmp_path / "step.log"
    log.write_text("".join(f"line {i}\n" for i in range(2000)))  # several 8 KiB blocks
    assert steplog.tail(log, 3) == "line 1997\nline 1998\nline 1999"
    assert steplog.tail(log, 0) == ""
    short = tmp_path / "short.log"
    short.write_text("a\nb")
    assert steplog.tail(short, 20) == "a\nb"
    assert steplog.tail(tmp_path / "missing.log") == ""


def test_keep_failed_moves_the_log_under_logs_failed(tmp_path, monkeypatch):
    artifacts = tmp_path / "artifacts"
    first, second = tmp_path / "one.log", tmp_path / "two.log"
    first.write_text("first")
    second.write_text("second")
    kept = steplog.keep_failed(first, artifacts, "quantize:int8")
    assert kept.parent == artifacts / "logs" / "failed"
    assert re.fullmatch(r"quantize-int8\.\d{8}T\d{6}Z\.log", kept.name)
    assert kept.read_text() == "first" and not first.exists()
    monkeypatch.setattr(steplog.time, "strftime", lambda fmt, t=None: "20261201T094000Z")
    a = steplog.keep_failed(second, artifacts, "quantize:int8")
    third = tmp_path / "three.log"
    third.write_text("third")
    b = steplog.keep_failed(third, artifacts, "quantize:int8")  # the same second
    assert (a.name, b.name) == ("quantize-int8.20261201T094000Z.log",
                                "quantize-int8.20261201T094000Z-2.log")  # fmt: skip
    assert (a.read_text(), b.read_text()) == ("second", "third")


# ---- the store -------------------------------------------------------------------------------


def publish(store: Store, name: str) -> str:
    identity = {"stage": "quantize", "params": {"name": name}}
    key = key_of(identity)
    tmp = store.new_tmp(key)
    (tmp / "w.bin").write_bytes(b"weights")
    store.publish(key, tmp, {"key": key, "identity": identity})
    return key


def test_a_log_beside_an_entry_is_neither_an_entry_nor_damage(tmp_path):
    store = Store(tmp_path)
    key = publish(store, "a")
    log = store.log_path(key)
    assert log.parent == store.manifest_path(key).parent and log.name == f"{key}.log"
    log.write_text("# quantize:a, started ...\nhello\n")
    assert store.built_keys() == [key]
    assert store.unfinished() == []
    assert store.audit() == {}
    assert store.verify(key) == []
    assert sorted(os.listdir(store.entry(key))) == ["w.bin"]
    store.remove(key)
    assert not log.exists() and not store.entry(key).exists()
    assert os.listdir(log.parent) == []


def test_a_log_without_its_manifest_or_entry_is_unfinished(tmp_path):
    store = Store(tmp_path)
    half = publish(store, "half")
    store.manifest_path(half).unlink()  # stopped between the folder's rename and the manifest's
    store.log_path(half).write_text("log")
    lone = key_of({"stage": "quantize", "params": {"name": "lone"}})
    store.log_path(lone).parent.mkdir(parents=True, exist_ok=True)
    store.log_path(lone).write_text("log")  # its entry is gone
    assert store.built_keys() == []
    assert store.unfinished() == sorted([half, lone])
    assert "a log without its entry" in store.audit()[lone][0]
    for key in (half, lone):
        store.remove(key)
        assert not store.log_path(key).exists() and not store.entry(key).exists()
    assert store.unfinished() == [] and store.audit() == {}


def test_links_under_artifacts_logs_are_not_a_recipes(tmp_path):
    store = Store(tmp_path)
    key = publish(store, "a")
    link = tmp_path / "logs" / "failed" / "x"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(store.entry(key), link.parent))
    assert store.owns_link(link)  # it would count, were it in a recipe's folder
    assert store.links() == {}


def test_a_recipe_cannot_be_named_logs(tmp_path, tiny_model, prose_file):
    path = tmp_path / "logs.toml"
    path.write_text(tiny_recipe(tiny_model, prose_file))
    with pytest.raises(RecipeError, match="cannot be named"):
        load_graph(path, tmp_path / "artifacts")


def test_gc_removes_old_failed_logs_and_the_logs_of_what_it_removes(
    tmp_path, tiny_model, prose_file, capsys
):
    from tasks.glue import FAILED_LOG_DAYS, gc

    path = tmp_path / "recipe.toml"
    path.write_text(tiny_recipe(tiny_model, prose_file))
    graph = load_graph(path, tmp_path / "artifacts")
    store = graph.store
    failed = tmp_path / "artifacts" / "logs" / "failed"
    failed.mkdir(parents=True)
    old, fresh = failed / "quantize-int8.old.log", failed / "quantize-int8.fresh.log"
    old.write_bytes(b"o" * 5000)
    fresh.write_text("fresh")
    day = 86400
    os.utime(old, (time.time() - (FAILED_LOG_DAYS + 1) * day,) * 2)
    os.utime(fresh, (time.time() - (FAILED_LOG_DAYS - 1) * day,) * 2)
    unused, unfinished = publish(store, "unused"), publish(store, "unfinished")
    store.manifest_path(unfinished).unlink()
    for key in (unused, unfinished):
        store.log_path(key).write_text("log")

    gc(graph, dry_run=True)
    out = capsys.readouterr().out
    assert re.search(r"would remove failed log logs/failed/quantize-int8\.old\.log +5\.0 kB", out)
    assert "fresh" not in out and "1 failed logs" in out
    assert old.exists() and store.log_path(unused).exists()

    gc(graph, dry_run=False)
    out = capsys.readouterr().out
    assert "removing failed log logs/failed/quantize-int8.old.log" in out
    assert not old.exists() and fresh.exists()
    for key in (unused, unfinished):
        assert not store.log_path(key).exists() and not store.entry(key).exists()
    assert list(store.store_dir.glob("??/*.log")) == []


def test_a_process_forked_in_the_block_does_not_stop_the_parents_capture(tmp_path):
    log = tmp_path / "step.log"
    proc = run_script(
        """
        with steplog.capture(Path(sys.argv[1]), title="t"):
            pid = os.fork()
            if pid == 0:  # as a `doit -n` worker's interrupt handler would
                print("child", flush=True)
                steplog.restore()
                os._exit(0)
            os.waitpid(pid, 0)
            os.write(1, b"z" * 300_000 + b"\\n")  # more than a pipe holds: needs the reader
            print("parent", flush=True)
        """,
        log,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"child\n" + b"z" * 300_000 + b"\nparent\n"
    assert body_of(log).splitlines() == ["child", "z" * 300_000, "parent"]


def test_a_process_left_running_does_not_hold_up_the_end_of_the_block(tmp_path):
    log = tmp_path / "step.log"
    proc = run_script(
        """
        with steplog.capture(Path(sys.argv[1]), title="t"):
            lingering = subprocess.Popen(["sleep", "60"])  # it holds the pipes' write ends
            os.write(2, b"w" * 100_000 + b"\\n")
            print("inside", flush=True)
            ending = time.monotonic()
        print(f"{time.monotonic() - ending:.1f}", flush=True)
        lingering.kill()
        lingering.wait()
        """,
        log,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    inside, seconds = proc.stdout.decode().splitlines()
    assert inside == "inside" and float(seconds) < steplog.JOIN_SECONDS / 2
    assert proc.stderr == b"w" * 100_000 + b"\n"
    assert sorted(body_of(log).splitlines()) == ["inside", "w" * 100_000]


def test_a_reader_that_cannot_read_at_all_gives_the_fds_back_and_loses_nothing(tmp_path):
    log = tmp_path / "step.log"
    proc = run_script(
        """
        import selectors
        class Broken(selectors.DefaultSelector):
            def select(self, timeout=None):
                time.sleep(0.5)  # "early" is in the pipe by now
                raise RuntimeError("broken selector")
        steplog.selectors.DefaultSelector = Broken
        with steplog.capture(Path(sys.argv[1]), title="t"):
            os.write(1, b"early\\n")
            time.sleep(1.5)  # the reader has failed twice and given fd 1 back
            os.write(1, b"late\\n")
        """,
        log,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(proc.stdout.splitlines()) == [b"early", b"late"]
    assert proc.stderr.count(b"is incomplete") == 1, proc.stderr.decode()
