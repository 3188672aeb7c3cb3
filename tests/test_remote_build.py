"""The remote store in a build: a step built and pushed by one workspace is pulled, not
rebuilt, by another (file:// and s3:// on a moto server); a no-op build never contacts the
remote; push and pull by hand; and the faults: a remote that cannot be used at all, a damaged
remote entry, a push or pull cut off midway, two processes pushing one key at once.

The whole recipe is built once per backend (module-scoped); the fault tests build only the
data steps, which take a fraction of a second."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from workspace import ROOT, Workspace, executed, tiny_recipe

from tasks import runner
from tasks.keys import key_of
from tasks.remote import RemoteStore
from tasks.store import Store, read_manifest

STEPS = ("model", "data/prose", "capture/fp32", "quantize/int8", "evaluate/fp32",
         "evaluate/int8", "report")  # fmt: skip
SKIPPED = "the remote is skipped for this run"
REMOTE_ONLY = "with remote_only nothing is built here"
# A second data set: `doit data` then builds two steps in one process, in well under a second.
MORE_DATA = '\n[data.more]\npath = "{prose}"\nformat = "text"\nheldout_fraction = 0.5\n'


def workspace(root, tiny_model, prose_file, store_table: str, extra: str = "") -> Workspace:
    ws = Workspace(root)
    root.mkdir()
    ws.write(tiny_recipe(tiny_model, prose_file, extra=extra + store_table))
    return ws


def data_workspace(root, tiny_model, prose_file, store_table: str) -> Workspace:
    """A workspace whose `doit data` builds two cheap steps (data:prose, data:more)."""
    return workspace(root, tiny_model, prose_file, store_table, MORE_DATA.format(prose=prose_file))


def digests(ws: Workspace, step: str) -> dict[str, str]:
    return {f["path"]: f["xxh3"] for f in read_manifest(ws.artifacts / "recipe" / step)["files"]}


def output(run: subprocess.CompletedProcess) -> str:
    return run.stdout + run.stderr


@dataclass
class Pushed:
    """A workspace that built the whole tiny recipe and pushed every step."""

    root: Path
    table: str  # the recipe's [store] table, push on
    first: Workspace
    env: dict[str, str]  # what a doit run needs to reach the remote


def build_and_push(root: Path, table: str, env: dict, tiny_model, prose_file) -> Pushed:
    first = workspace(root / "first", tiny_model, prose_file, table)
    run = first.doit(env=env)
    assert "pulled from" not in run.stderr and run.stderr.count("built in") == len(STEPS)
    return Pushed(root, table, first, env)


@pytest.fixture(scope="module")
def pushed_file(tmp_path_factory, tiny_model, prose_file) -> Pushed:
    root = tmp_path_factory.mktemp("remote")
    (root / "shared").mkdir()
    table = f'\n[store]\nremote = "file://{root / "shared"}"\npush = true\n'
    return build_and_push(root, table, {}, tiny_model, prose_file)


@pytest.fixture(scope="module")
def pushed_s3(tmp_path_factory, tiny_model, prose_file, s3_server) -> Pushed:
    root = tmp_path_factory.mktemp("remote-s3")
    table = (
        f'\n[store]\nremote = "s3://{s3_server.bucket()}/team/models"\n'
        f'endpoint_url = "{s3_server.endpoint}"\npush = true\n'
    )
    return build_and_push(root, table, s3_server.env, tiny_model, prose_file)


@pytest.fixture(params=["file", "s3"])
def remote_settings(request, tmp_path) -> tuple[dict, dict]:
    """(RemoteStore settings, environment for a doit run) of an empty remote."""
    if request.param == "file":
        (tmp_path / "shared").mkdir()
        return {"remote": f"file://{tmp_path}/shared"}, {}
    s3 = request.getfixturevalue("s3_remote")
    return s3.settings("models"), s3.env


def store_table(settings: dict, **more) -> str:
    items = {**settings, **more}
    return "\n[store]\n" + "".join(
        f"{k} = {str(v).lower() if isinstance(v, bool) else json.dumps(v)}\n"
        for k, v in items.items()
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- a second machine pulls what the first pushed ----------------------------------------


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_a_second_workspace_pulls_every_step_and_builds_none(
    backend, request, tiny_model, prose_file
):
    pushed = request.getfixturevalue(f"pushed_{backend}")
    second = workspace(pushed.root / "second", tiny_model, prose_file, pushed.table)
    run = second.doit(env=pushed.env)
    assert "built in" not in run.stderr, run.stderr
    assert run.stderr.count("pulled from") == len(STEPS), run.stderr
    for step in STEPS:
        assert digests(second, step) == digests(pushed.first, step), step
        assert read_manifest(second.artifacts / "recipe" / step)["pulled_from"].startswith(
            f"{backend}://"
        )
    assert second.doit("verify").returncode == 0
    checked = second.doit("verify", "--remote", env=pushed.env).stdout
    assert f"all {len(STEPS)} remote entries match their manifests" in checked
    assert executed(second.doit(env=pushed.env).stdout) == []  # and then it is up to date


def test_pull_and_push_by_hand(pushed_file, tiny_model, prose_file):
    root, table = pushed_file.root, pushed_file.table
    third = workspace(root / "third", tiny_model, prose_file, table.replace("true", "false"))
    out = third.doit("pull", "capture:fp32").stdout
    # The named step and the step it is built from (a pulled step's inputs come with it),
    # and no other step (the data set, the evaluation).
    assert out.count(": pulled") == 2 and "pull: 2 pulled" in out
    assert "capture:fp32: pulled" in out and "model: pulled" in out
    assert (third.artifacts / "recipe" / "capture" / "fp32" / "model.onnx").is_file()
    out = third.doit("push").stdout
    assert "capture:fp32: present" in out and "data:prose: not built here" in out


def test_the_run_overrides_the_recipe(pushed_file, tiny_model, prose_file):
    ws = workspace(pushed_file.root / "override", tiny_model, prose_file, pushed_file.table)
    run = ws.doit("model", "remote=")  # an empty remote: this run builds everything itself
    assert "pulled" not in run.stderr and "built in" in run.stderr
    bad = ws.doit("model", "push=maybe", check=False)
    assert bad.returncode != 0 and "push=true or push=false" in bad.stderr


def test_a_secret_in_the_recipe_is_refused(tmp_path, tiny_model, prose_file):
    table = '\n[store]\nremote = "s3://bucket/x"\naws_secret_access_key = "abc"\n'
    ws = workspace(tmp_path / "ws", tiny_model, prose_file, table)
    run = ws.doit("list", check=False)
    assert run.returncode != 0 and "[store]" in run.stderr and "AWS_ACCESS_KEY_ID" in run.stderr


# ---- a no-op build asks the remote nothing ------------------------------------------------


class CountingServer:
    """A TCP server on 127.0.0.1 that counts the connections made to it (and drops each)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stopped = True
        self.thread.join()
        self.sock.close()


def test_a_no_op_build_makes_no_request(pushed_file, tiny_model, prose_file, s3_server):
    """The built workspace, its remote pointed at a server that counts connections: a no-op
    `doit` makes none; `doit push` (which asks the remote about every key) does."""
    ws, server = pushed_file.first, CountingServer()
    before = ws.recipe.read_text()
    table = (
        f'\n[store]\nremote = "s3://bucket/models"\nendpoint_url = '
        f'"http://127.0.0.1:{server.port}"\n'
    )
    try:
        ws.write(tiny_recipe(tiny_model, prose_file, extra=table))
        run = ws.doit(env=s3_server.env)
        assert executed(run.stdout) == [] and "pulled" not in run.stderr
        assert server.connections == 0
        ws.doit("pull", env=s3_server.env)  # every step is here already: nothing to ask
        assert server.connections == 0
        failed = ws.doit("push", "model", check=False, env=s3_server.env)
        assert server.connections > 0  # the counter counts
        assert failed.returncode != 0 and "Traceback" not in output(failed)
        assert "s3://bucket/models" in output(failed)
    finally:
        ws.write(before)
        server.close()


# ---- a remote that cannot be used at all -------------------------------------------------


@pytest.fixture(
    params=[
        "unreachable",
        "missing-bucket",
        "wrong-credentials",
        "missing-folder",
        "unknown-protocol",
        "library-not-installed",
    ]
)
def unusable(request, s3_remote, s3_server, tmp_path):
    """(a [store] table of a remote that cannot be used, a context to run doit in)."""
    if request.param == "unknown-protocol":  # fsspec knows no such file system
        return store_table({"remote": "kiln-nowhere://bucket/m"}), contextlib.nullcontext()
    if request.param == "library-not-installed":  # fsspec knows gs://, from gcsfs
        if importlib.util.find_spec("gcsfs") is not None:
            pytest.skip("gcsfs is installed here")
        return store_table({"remote": "gs://bucket/m"}), contextlib.nullcontext()
    if request.param == "unreachable":
        table = store_table(
            {"remote": "s3://bucket/models", "endpoint_url": f"http://127.0.0.1:{closed_port()}"}
        )
        return table, contextlib.nullcontext()
    if request.param == "missing-folder":  # a share that is not mounted, or a typo
        return store_table({"remote": f"file://{tmp_path}/not-mounted"}), contextlib.nullcontext()
    if request.param == "missing-bucket":
        missing = {**s3_remote.settings(), "remote": f"s3://kiln-missing-{uuid.uuid4().hex[:8]}/m"}
        return store_table(missing), contextlib.nullcontext()
    return store_table(s3_remote.settings("models")), s3_server.refusing_credentials()


def test_an_unusable_remote_is_skipped_once_and_the_build_completes_here(
    unusable, tmp_path, tiny_model, prose_file, s3_server
):
    table, running = unusable
    ws = data_workspace(tmp_path / "ws", tiny_model, prose_file, table)
    store = Store(ws.artifacts)
    with running:
        strict = ws.doit("data", "remote_only=true", check=False, env=s3_server.env)
        assert store.built_keys() == []  # nothing built with remote_only
        run = ws.doit("data", check=False, env=s3_server.env)
    assert strict.returncode != 0, output(strict)
    assert REMOTE_ONLY in output(strict) and "fix: " in output(strict)
    assert "Traceback" not in output(strict) and "built in" not in output(strict)
    assert run.returncode == 0, output(run)
    assert run.stderr.count(SKIPPED) == 1, run.stderr  # once per process, not per step
    assert run.stderr.count("built in") == 2 and "Traceback" not in output(run)
    assert len(store.built_keys()) == 2 and ws.doit("verify").returncode == 0
    # The run summary, and its last lines, say the remote was skipped and why.
    summary = json.loads((ws.artifacts / ws.name / "runs" / "latest.json").read_text())
    assert summary["run"]["outcome"] == "ok" and summary["run"]["remote"]["skipped"]
    assert "remote skipped: " in run.stderr


@pytest.mark.parametrize("case", ["unreachable", "missing-bucket", "wrong-credentials"])
def test_a_push_to_an_unusable_remote_is_skipped_and_the_build_goes_on(
    case, s3_remote, s3_server, tmp_path, tiny_model, prose_file
):
    settings = s3_remote.settings("models")
    running = contextlib.nullcontext()
    if case == "unreachable":
        settings["endpoint_url"] = f"http://127.0.0.1:{closed_port()}"
    elif case == "missing-bucket":
        settings["remote"] = f"s3://kiln-missing-{uuid.uuid4().hex[:8]}/m"
    else:
        running = s3_server.refusing_credentials()
    ws = data_workspace(tmp_path / "ws", tiny_model, prose_file, store_table(settings))
    with running:
        run = ws.doit("data", check=False, env={**s3_remote.env, "MODELKILN_PUSH": "true"})
        failed = ws.doit("push", check=False, env=s3_remote.env)
    assert run.returncode == 0 and "Traceback" not in output(run), output(run)
    assert run.stderr.count("the remote is skipped for this run") == 1, run.stderr
    assert run.stderr.count("built in") == 2  # both steps, the second without asking again
    assert len(Store(ws.artifacts).built_keys()) == 2 and ws.doit("verify").returncode == 0
    assert failed.returncode != 0 and "Traceback" not in output(failed), output(failed)
    # Only a bucket that is not there is called missing: refused credentials or no
    # connection once read as "no such bucket", with a fix to create it.
    assert ("no such bucket" in output(failed)) == (case == "missing-bucket"), output(failed)
    assert ("create the bucket" in output(failed)) == (case == "missing-bucket")


def test_a_remote_command_line_that_cannot_be_is_refused_with_exit_3(
    tmp_path, tiny_model, prose_file, s3_remote
):
    """Nothing runs, and the exit code says the command line is wrong (README: 3)."""
    ws = data_workspace(tmp_path / "ws", tiny_model, prose_file, "")
    for args in (("push",), ("pull", "data:prose"), ("verify", "--remote"), ("gc", "--remote")):
        run = ws.doit(*args, check=False)
        assert run.returncode == 3 and "no remote store is set" in output(run), output(run)
    # remote_only and no remote: before, it built here, the one thing it forbids
    for args, env in ((("remote_only=true",), None), ((), {"MODELKILN_REMOTE_ONLY": "yes"})):
        run = ws.doit("data", *args, check=False, env=env)
        assert run.returncode == 3 and "remote_only is on (" in output(run), output(run)
        assert "but no remote is set" in output(run) and "fix: " in output(run)
    run = ws.doit("data", check=False, env={"MODELKILN_PUSH": "maybe"})
    assert run.returncode == 3 and "MODELKILN_PUSH='maybe' is not a yes or no" in output(run)
    assert Store(ws.artifacts).built_keys() == []
    ws.write(ws.recipe.read_text() + store_table(s3_remote.settings("models")))
    run = ws.doit("push", "data:pros", check=False, env=s3_remote.env)
    assert run.returncode == 3 and "no step data:pros (did you mean data:prose?)" in output(run)


# ---- a remote entry that does not check out ----------------------------------------------
# (A manifest whose identity does not hash to its key, an edited manifest, a file outside its
# folder: tests/test_remote.py::test_a_manifest_that_does_not_match_its_key_is_refused and
# test_an_edited_manifest_is_refused, through the same pull_into the runner calls.)


def test_a_tampered_remote_file_is_named_and_the_step_is_built_here(
    remote_settings, tmp_path, tiny_model, prose_file
):
    settings, env = remote_settings
    first = data_workspace(tmp_path / "first", tiny_model, prose_file, store_table(settings))
    assert "built in" in first.doit("data:prose", "push=true", env=env).stderr
    remote = RemoteStore.from_settings(settings)
    [key] = remote.built_keys()
    path = f"{remote.upload_path(key, remote.manifest(key)['upload'])}/train.jsonl"
    data = bytearray(remote.fs.cat_file(path))
    data[len(data) // 2] ^= 1  # one byte, same size
    remote.fs.pipe_file(path, bytes(data))

    second = data_workspace(tmp_path / "second", tiny_model, prose_file, store_table(settings))
    run = second.doit("data:prose", env=env)
    assert run.stderr.count("not pulled, building it here:") == 1, run.stderr
    assert f"{remote.where(path)}: content differs from the manifest" in run.stderr
    assert "pulled from" not in run.stderr and "built in" in run.stderr
    assert second.doit("verify").returncode == 0
    assert digests(second, "data/prose") == digests(first, "data/prose")
    # remote_only refuses instead, naming the same problem (set through the environment)
    third = data_workspace(tmp_path / "third", tiny_model, prose_file, store_table(settings))
    strict = third.doit("data:prose", check=False, env={**env, "MODELKILN_REMOTE_ONLY": "yes"})
    assert strict.returncode != 0 and REMOTE_ONLY in output(strict), output(strict)
    assert "train.jsonl: content differs" in output(strict) and "Traceback" not in output(strict)
    assert Store(third.artifacts).built_keys() == []


# ---- a transfer cut off midway -------------------------------------------------------------

IDENTITY = {"stage": "quantize", "params": {"bits": 4, "test": "remote_build"}}
KEY = key_of(IDENTITY)


def publish(store: Store, files: dict[str, bytes], identity: dict = IDENTITY) -> str:
    key = key_of(identity)
    tmp = store.new_tmp(key)
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    store.publish(key, tmp, {"key": key, "identity": identity})
    return key


def three_files(seed: bytes = b"") -> dict[str, bytes]:
    return {
        "a.bin": seed + os.urandom(4096),
        "sub/b.bin": seed + os.urandom(4096),
        "c.json": b"{}",
    }


def file_digests(store: Store, key: str) -> list[tuple[str, int, str]]:
    return [(f["path"], f["size"], f["xxh3"]) for f in store.manifest(key)["files"]]


def uploads(remote: RemoteStore, key: str) -> list[str]:
    files = remote._find(f"{remote.root}/uploads/{key}")
    return sorted({path.split(f"/uploads/{key}/")[1].split("/")[0] for path in files})


class CutOff:
    """A remote's file system that goes away after `after` successful calls of `method`: every
    call from then on raises what a lost connection raises (and is counted). Its coroutine
    (`_get_file` for `get_file`: a pull downloads an entry's files at once) fails also when
    it ends after the server went away, as a transfer cut off midway does."""

    def __init__(self, fs, method: str, after: int, error: Exception) -> None:
        self._fs, self._method, self._left, self._error = fs, method, after, error
        self.calls_after = 0

    def _gone(self):
        self.calls_after += 1
        return self._error

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr
        if inspect.iscoroutinefunction(attr):

            async def acall(*args, **kwargs):
                if self._left <= 0:
                    raise self._gone()
                result = await attr(*args, **kwargs)
                if name == f"_{self._method}":
                    if self._left <= 0:
                        raise self._gone()
                    self._left -= 1
                return result

            return acall

        def call(*args, **kwargs):
            if self._left <= 0:
                raise self._gone()
            result = attr(*args, **kwargs)
            if name == self._method:
                self._left -= 1
            return result

        return call


def cut_off(remote: RemoteStore, method: str, after: int = 1) -> CutOff:
    if remote.url.startswith("s3://"):
        from botocore.exceptions import EndpointConnectionError

        error: Exception = EndpointConnectionError(endpoint_url=remote.endpoint_url)
    else:  # a shared disk whose mount went away
        error = OSError(errno.EIO, "Input/output error")
    fs = CutOff(remote.fs, method, after, error)
    remote._fs_and_root = (fs, remote.root)
    return fs


def test_a_push_cut_off_midway_publishes_nothing_and_the_next_push_completes_it(
    remote_settings, tmp_path, monkeypatch, capsys
):
    settings, _ = remote_settings
    here = Store(tmp_path / "here")
    key = publish(here, three_files())
    remote = RemoteStore.from_settings({**settings, "push": True})
    cut_off(remote, "put_file", after=1)  # the server goes away after the first file
    monkeypatch.setattr(runner, "_skipped", {})  # a new process
    runner.push_step(remote, here, key, "quantize:int8")
    assert "not pushed, and the remote is skipped for this run" in capsys.readouterr().err
    assert remote.url in runner._skipped
    assert here.is_complete(key) and here.verify(key) == []  # the local entry stays built

    back = RemoteStore.from_settings(settings)  # the server is back
    assert back.built_keys() == [] and not back.is_complete(key)  # no manifest
    [orphan] = uploads(back, key)  # the cut-off push could not clean up either: gc's
    assert back.pull(Store(tmp_path / "nothing"), key) is None

    assert back.push(here, key) == "pushed"  # `doit push` completes it
    there = Store(tmp_path / "there")
    assert back.pull(there, key) == there.entry(key)
    assert there.verify(key) == [] and file_digests(there, key) == file_digests(here, key)
    assert back.verify(key) == []
    [(removed, _)] = back.gc(keep={key}, grace_seconds=0)
    assert f"/uploads/{key}/{orphan}" in removed
    assert uploads(back, key) == [back.manifest(key)["upload"]]


def test_a_pull_cut_off_midway_publishes_nothing_and_the_step_is_built_here(
    remote_settings, tmp_path, monkeypatch, capsys
):
    settings, _ = remote_settings
    here, there = Store(tmp_path / "here"), Store(tmp_path / "there")
    key = publish(here, three_files())
    RemoteStore.from_settings(settings).push(here, key)
    monkeypatch.setattr(runner, "_skipped", {})  # a new process
    remote = RemoteStore.from_settings(settings)
    fs = cut_off(remote, "get_file", after=1)

    with there.build(key) as build:
        assert runner._pulled(remote, "quantize:int8", build) is False
        assert build.folder.is_dir() and list(build.folder.iterdir()) == []  # emptied
        assert not there.manifest_path(key).exists() and not there.entry(key).exists()
        assert there.unfinished() == []
        (build.folder / "w.bin").write_bytes(b"built here")  # the runner builds it instead
        build.publish({"key": key, "identity": IDENTITY})
    err = capsys.readouterr().err
    assert err.count(SKIPPED) == 1, err
    assert there.is_complete(key) and there.verify(key) == [] and there.unfinished() == []
    assert not any((there.store_dir / ".tmp").glob(f"{key}*"))

    # a later step of the same process does not ask the remote again
    calls = fs.calls_after
    elsewhere = Store(tmp_path / "elsewhere")
    with elsewhere.build(key) as build:
        assert runner._pulled(remote, "quantize:int8", build) is False
    assert fs.calls_after == calls and SKIPPED not in capsys.readouterr().err

    # the next run (a new process, the remote back) pulls it
    monkeypatch.setattr(runner, "_skipped", {})
    later = Store(tmp_path / "later")
    with later.build(key) as build:
        assert runner._pulled(RemoteStore.from_settings(settings), "quantize:int8", build)
    assert later.verify(key) == [] and file_digests(later, key) == file_digests(here, key)


# ---- two processes push one key at once --------------------------------------------------

RACER = """
import sys, time
from pathlib import Path
from tasks.remote import RemoteStore
from tasks.store import Store
import json
settings, store, key, ready, go = json.loads(sys.argv[1])
remote = RemoteStore.from_settings(settings)
remote.fs  # the file system (and its client) opened before the start line
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.0005)
print(remote.push(Store(Path(store)), key))
"""


def test_two_processes_pushing_one_key_at_once_leave_one_entry(remote_settings, tmp_path):
    settings, _ = remote_settings
    stores = [Store(tmp_path / name) for name in ("a", "b")]
    files = [three_files(b"machine a"), three_files(b"machine b, other bytes")]
    for store, made in zip(stores, files, strict=True):
        assert publish(store, made) == KEY
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                RACER,
                json.dumps([settings, str(store.root), KEY, str(tmp_path / f"ready{i}"), str(go)]),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i, store in enumerate(stores)
    ]
    deadline = time.time() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(r.poll() is None for r in racers), [
            r.communicate() for r in racers
        ]
        time.sleep(0.01)
    go.touch()  # both at once
    results = [r.communicate(timeout=120) for r in racers]
    assert all(r.returncode == 0 for r in racers), results
    statuses = [out.strip() for out, _ in results]
    # Both saw no entry and uploaded ("lost" for the second to publish), or one was so fast
    # that the other found its entry ("present"): either way one entry, one upload folder.
    assert sorted(statuses) in (["lost", "pushed"], ["present", "pushed"]), statuses
    remote = RemoteStore.from_settings(settings)
    assert remote.built_keys() == [KEY]
    assert uploads(remote, KEY) == [remote.manifest(KEY)["upload"]]
    assert remote.verify(KEY) == []
    there = Store(tmp_path / "there")
    assert remote.pull(there, KEY) == there.entry(KEY) and there.verify(KEY) == []
    winner = stores[statuses.index("pushed")]
    assert file_digests(there, KEY) == file_digests(winner, KEY)
