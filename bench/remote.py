"""The remote store against an S3 server on loopback: transfer speed, a second workspace, no-ops.

    python bench/remote.py [--tasks quantize:awq] [--entry quantize/awq] [--reps 3]
                           [--noop-runs 5] [--work /tmp/benchremote] [--keep]
                           [--built ARTIFACTS]

An S3 server (moto, in a child process of its own so that it does not share this process's
GIL with the client being measured) listens on 127.0.0.1. Then:

1. Workspace A builds the default recipe's steps named by --tasks (doit targets; `all` for the
   whole recipe, about 20+ minutes on 2 cores) with `remote=s3://... push=true`: its cold
   build, timed, uploads every step it builds. With --built, A is an artifacts folder where
   the default recipe is already built (a slow-suite workspace, say): A pushes it with
   `doit push` (timed), and the cold build's time is the sum of its steps' recorded seconds.
2. Workspace B, fresh, with the same recipe and remote, runs the same `doit`: every step must
   be pulled (`pulled from` in its log), none built. Its wall time is printed next to A's.
3. No-op `doit` in B, --noop-runs times (median), with the remote configured and, as the
   peer, with `remote=` (no remote); and doit alone, a dodo.py of as many up-to-date tasks
   as the recipe has (what no dodo.py goes below on this machine at this moment), all three in
   alternation. PYTHONDONTWRITEBYTECODE is removed from the children's environment. For
   these runs B's recipe points its endpoint at a counting TCP proxy in front
   of the server: the connections it accepted and the requests the server counted must be 0.
4. Throughput of one entry (--entry, a link under artifacts/default/; the AWQ checkpoint,
   about 175 MB, by default): RemoteStore.push from A's store and RemoteStore.pull into a fresh
   local Store, next to plain s3fs put_file/get_file of the same files against the same
   server, alternating, --reps times each (medians), each run started with nothing left to
   write back (`os.sync()`, untimed). RemoteStore.pull checks each file's xxh3 and the local
   publish fsyncs it: both are part of its cost (a plain get syncs nothing), so the time of one
   xxh3 pass over the entry is printed too, and a second peer, get_file with an fsync of each
   file, shows what the disk's write speed costs a download that must survive a power cut.
   A third reads as the pull does, one GET a file (s3fs's max_concurrency=1) then fsyncs: s3fs's
   default get_file reads a big file as 50 MiB ranges, and moto reads the whole object for
   each range request (a 1 MiB range of the 162 MB weights took 0.14 s), which a real S3 does
   not; against this peer the pull's own cost shows whatever the server does with ranges.
   Ratios are given three ways: of the medians, the median of each repetition's back-to-back
   pair, and of the best runs (timeit's rule: noise only ever adds time); each transfer's CPU
   steal (the share of the machine's time a shared VM's hypervisor gave elsewhere, from
   /proc/stat) is printed beside it.

The endpoint reaches doit through the recipe (`[store] endpoint_url`, only settable there): the
bench writes a copy of recipes/default.toml with a [store] table into its scratch folder.
Credentials are dummies in the environment. Scratch (several hundred MB) is removed at the end
unless --keep.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from workspace import Workspace, doit_alone, executed, interpreter, timed  # noqa: E402

from tasks.digest import hash_file  # noqa: E402
from tasks.recipe import load_recipe  # noqa: E402
from tasks.remote import RemoteStore  # noqa: E402
from tasks.store import Store  # noqa: E402

RECIPE = "default"  # the recipe file's name in both workspaces: links under artifacts/default/
REQUESTS_PATH = "/__bench_requests__"
# The pull's peers, by the name their times go under: what each does.
PULL_PEERS = {
    "get": "s3fs get_file, same objects",
    "get_fsync": "s3fs get_file + fsync of each file",
    "get_stream_fsync": "s3fs get_file, one GET a file (as the pull), + fsync",
}

# The S3 server: moto's ThreadedMotoServer, its WSGI app wrapped to count the requests it gets
# (REQUESTS_PATH answers the count and is not counted). Runs until its stdin closes.
SERVER = f"""
import logging, sys, threading
from moto.moto_server import threaded_moto_server as tms
from moto.server import ThreadedMotoServer

logging.getLogger("werkzeug").setLevel(logging.ERROR)
count, lock = 0, threading.Lock()

class Counted(tms.DomainDispatcherApplication):
    def __call__(self, environ, start_response):
        global count
        if environ.get("PATH_INFO") == {REQUESTS_PATH!r}:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(count).encode()]
        with lock:
            count += 1
        return super().__call__(environ, start_response)

tms.DomainDispatcherApplication = Counted
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


class S3Server:
    """The moto server in a child process, and the number of requests it has answered."""

    def __init__(self, log: Path) -> None:
        with open(log, "w") as stderr:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=stderr, text=True,
            )  # fmt: skip
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            raise SystemExit(f"the moto server did not start; see {log}")
        self.port = int(line)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def requests(self) -> int:
        with urllib.request.urlopen(self.endpoint + REQUESTS_PATH, timeout=10) as answer:
            return int(answer.read())

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class CountingProxy:
    """A TCP forwarder on 127.0.0.1 in front of the server that counts the connections it
    accepts: a no-op `doit` whose endpoint is this proxy must open none."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.connections = target_port, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def child_env(fake: Path) -> dict[str, str]:
    """The environment of the doit children: dummy credentials, no stray remote settings, and
    no PYTHONDONTWRITEBYTECODE (`env -u`: with it set, every import compiles from source)."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONDONTWRITEBYTECODE" and not k.startswith(("MODELKILN_", "AWS_"))}  # fmt: skip
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", AWS_SHARED_CREDENTIALS_FILE=str(fake / "credentials"),
               AWS_CONFIG_FILE=str(fake / "config"))  # fmt: skip
    return env


def recipe_text(remote: str, endpoint: str) -> str:
    base = (ROOT / "recipes" / "default.toml").read_text()
    return f'{base}\n[store]\nremote = "{remote}"\nendpoint_url = "{endpoint}"\n'


def doit(ws: Workspace, targets: list[str], env: dict, *variables: str) -> tuple[float, object]:
    """Wall time and the finished process of `doit targets variables` in ws."""
    start = time.perf_counter()
    proc = subprocess.run(ws.argv(*targets, *variables), capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"doit {' '.join(targets)} in {ws.root} failed:\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-5000:]}")  # fmt: skip
    return seconds, proc


def steps_saying(stderr: str, what: str) -> list[str]:
    """The steps whose log line says what ("built in", "pulled from")."""
    return re.findall(rf"^  (\S+): {what} ", stderr, flags=re.M)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- 1. transfer throughput ----------------------------------------------------------------


def throughput(store: Store, key: str, server: S3Server, bucket: str, work: Path, reps: int):
    """Seconds per repetition of RemoteStore.push/pull and of s3fs put_file/get_file, and of
    get_file followed by an fsync of each file: the least a download that survives a power
    cut costs, which a pull is (on this VM the disk's write speed moves from 90 MB/s to over
    1 GB/s between minutes, and a plain get never waits for it)."""
    import s3fs

    def progress(done: int, total: int) -> None:  # what the runner's progress bar costs, less
        pass

    # One client each, opened and warmed (a first request) outside the timings: a doit process
    # opens its client once, and botocore's setup is not what is measured here.
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True,
                           use_listings_cache=False)  # fmt: skip
    fs.ls(bucket)
    pusher = RemoteStore(f"s3://{bucket}/pushed", endpoint_url=server.endpoint)
    puller = RemoteStore(f"s3://{bucket}/shared", endpoint_url=server.endpoint)
    assert not pusher.is_complete(key) and puller.is_complete(key)
    entry, files = store.entry(key), store.manifest(key)["files"]
    source = puller.upload_path(key, puller.manifest(key)["upload"])  # what A's doit pushed
    times: dict[str, list[float]] = {name: [] for name in ("push", "put", "pull", *PULL_PEERS)}
    steal: dict[str, list[float]] = {name: [] for name in times}

    def push(i: int) -> None:
        times["push"].append(timed(lambda: pusher.push(store, key, progress)))
        assert pusher.is_complete(key)
        pusher.remove(key)  # the next push uploads it again

    def put(i: int) -> None:
        def upload() -> None:
            for r in files:
                fs.put_file(str(entry / r["path"]), f"{bucket}/put/{r['path']}")

        times["put"].append(timed(upload))
        fs.rm(f"{bucket}/put", recursive=True)

    def pull(i: int) -> None:
        local = Store(work / f"pull-{i}" / "artifacts")
        times["pull"].append(timed(lambda: puller.pull(local, key, progress)))
        assert local.is_complete(key) and local.changes(key) == ([], [])
        shutil.rmtree(work / f"pull-{i}")

    def download(target: Path, sync: bool, stream: bool = False) -> None:
        for r in files:
            (target / r["path"]).parent.mkdir(parents=True, exist_ok=True)
            one_get = {"max_concurrency": 1} if stream else {}  # as RemoteStore.pull reads
            fs.get_file(f"{source}/{r['path']}", str(target / r["path"]), **one_get)
            if sync:
                with open(target / r["path"], "rb") as fh:
                    os.fsync(fh.fileno())

    def peer(name: str, sync: bool, stream: bool = False) -> Callable[[int], None]:
        """One of PULL_PEERS: download into a folder of its own, timed, then remove it."""

        def run(i: int) -> None:
            target = work / f"get-{i}"
            times[name].append(timed(lambda: download(target, sync, stream)))
            shutil.rmtree(target)

        run.__name__ = name  # the log's and the steal's name for it
        return run

    pull_peers = (peer("get", False), peer("get_fsync", True), peer("get_stream_fsync", True, True))
    for ours, *peers in ((push, put), (pull, *pull_peers)):
        for i in range(reps):  # alternating, ours first every other time
            # Reversed every other time, so that ours and its first peer always run back to back.
            for run in (ours, *peers) if i % 2 == 0 else (*reversed(peers), ours):
                # Untimed: the disk's writeback of the run before (a plain get leaves its files
                # unsynced) would otherwise be paid by the next run's fsync, a pull's publish.
                os.sync()
                before = cpu_ticks()
                run(i)
                steal[run.__name__].append(steal_share(before, cpu_ticks()))
                log(f"  {run.__name__} {i + 1}/{reps}: {times[run.__name__][-1]:.2f} s, "
                    f"steal {steal[run.__name__][-1]:.0%}")  # fmt: skip
    hashes = [timed(lambda: [hash_file(entry / r["path"]) for r in files]) for _ in range(reps)]
    return times, hashes, steal


def cpu_ticks() -> list[int]:
    """The machine's CPU time counters (/proc/stat's first line; [] where there is none)."""
    try:
        with open("/proc/stat") as fh:
            return [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return []


def steal_share(before: list[int], after: list[int]) -> float:
    """The share of CPU time the hypervisor gave to other guests between two readings: on a
    shared VM, runs with steal are the slow ones, whatever is being measured."""
    if len(before) < 8 or len(after) < 8:
        return 0.0
    total = sum(after[:8]) - sum(before[:8])  # guest time is counted in user time already
    return (after[7] - before[7]) / total if total else 0.0


# ---- the whole bench -------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="quantize:awq",
                        help="doit targets to build, comma separated; `all`: the whole recipe")  # fmt: skip
    parser.add_argument("--entry", default="quantize/awq",
                        help="the step whose entry the throughput is measured on")  # fmt: skip
    parser.add_argument("--reps", type=int, default=11, help="repetitions of each transfer")
    parser.add_argument("--noop-runs", type=int, default=5, help="timed no-op runs of each kind")
    parser.add_argument("--work", type=Path, default=Path("/tmp/benchremote"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--built", type=Path, help="artifacts where the recipe is built already")
    args = parser.parse_args()
    targets = [] if args.tasks == "all" else args.tasks.split(",")
    started = time.perf_counter()

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "aws").mkdir(parents=True)
    env = child_env(work / "aws")
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    os.environ.pop("AWS_PROFILE", None)
    server = S3Server(work / "moto.log")
    proxy = None
    try:
        import s3fs

        bucket = f"kiln-bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True).mkdir(bucket)
        remote = f"s3://{bucket}/shared"
        variables = (f"remote={remote}", "push=true")

        # ---- 2. cold build with push in A; B pulls every step ---------------------------------
        a, b = Workspace(work / "a", RECIPE), Workspace(work / "b", RECIPE)
        for ws in (a, b):
            ws.root.mkdir()
            ws.write(recipe_text(remote, server.endpoint))
        if args.built:
            a.artifacts.symlink_to(args.built.resolve())
            doit(a, targets, env, "remote=")  # up to date: only makes this recipe's links
            push_s, a_run = doit(a, ["push", *targets], env, *variables)
            built = re.findall(r"^(\S+): pushed$", a_run.stdout, flags=re.M)
            store = Store(a.artifacts)
            a_s = sum(store.manifest(k)["timings"]["seconds"] for k in store.built_keys()
                      if store.manifest(k).get("built_as", {}).get("task") in built)  # fmt: skip
            log(f"A: pushed {len(built)} steps in {push_s:.1f} s; their builds took {a_s:.1f} s")
        else:
            log(f"A: cold build of {args.tasks} with push on (minutes) ...")
            a_s, a_run = doit(a, targets, env, *variables)
            built = steps_saying(a_run.stderr, "built in")
            log(f"A: built {', '.join(built)} in {a_s:.1f} s")
        before = server.requests()
        log("B: the same doit in a fresh workspace ...")
        b_s, b_run = doit(b, targets, env, *variables)
        b_requests = server.requests() - before
        pulled = steps_saying(b_run.stderr, "pulled from")
        b_built = steps_saying(b_run.stderr, "built in")
        pull_ok = not b_built and "built in" not in b_run.stderr and sorted(pulled) == sorted(built)
        log(f"B: pulled {', '.join(pulled)}, built {b_built or 'nothing'} in {b_s:.1f} s")

        # ---- 3. no-op in B: with the remote (its endpoint a counting proxy) and without ---------
        proxy = CountingProxy(server.port)
        b.write(recipe_text(remote, proxy.endpoint))
        os.sync()  # untimed: the server's copy of A's push is still being written back
        before = server.requests()
        noop: dict[str, list[float]] = {"remote": [], "none": [], "doit alone": []}
        rerun = []
        kinds = {"remote": variables, "none": ("remote=",)}
        alone_tasks = len(load_recipe(b.recipe).steps) + 1  # and the report: as many as doit loads
        alone = doit_alone(work / "doit-alone", alone_tasks)
        if targets:  # doit then checks only the targets and their inputs: as many of its own
            alone += [f"step:{n}" for n in range(len(built))]
        for i in range(args.noop_runs + 1):  # the first of each kind: a warm-up, not timed
            for kind in (
                ("remote", "none", "doit alone") if i % 2 == 0 else ("doit alone", "none", "remote")
            ):
                if kind == "doit alone":
                    seconds = timed(lambda: subprocess.run(alone, capture_output=True, check=True,
                                                           env=env))  # fmt: skip
                else:
                    seconds, proc = doit(b, targets, env, *kinds[kind])
                    rerun += executed(proc.stdout)
                if i:
                    noop[kind].append(seconds)
        noop_requests = server.requests() - before
        log(f"no-op: {noop}; proxy connections {proxy.connections}, requests {noop_requests}")

        # ---- 1. throughput of one entry ---------------------------------------------------------
        store = Store(a.artifacts)
        link = a.artifacts / RECIPE / args.entry
        if not link.is_symlink():
            raise SystemExit(f"{link} was not built: pick --entry among {built}")
        key = link.resolve().name
        files = store.manifest(key)["files"]
        size = sum(r["size"] for r in files)
        log(f"throughput of {args.entry}: {len(files)} files, {size / 1e6:.1f} MB ...")
        times, hashes, steal = throughput(store, key, server, bucket, work, args.reps)
    finally:
        if proxy:
            proxy.close()
        server.stop()

    med = {name: statistics.median(values) for name, values in times.items()}
    mbs = {name: size / 1e6 / seconds for name, seconds in med.items()}
    xxh3 = size / 1e6 / statistics.median(hashes)
    # Each repetition runs ours and the peer back to back: the median of their ratios pairs
    # runs made within seconds of each other, so a minute of steal moves both sides.
    paired = {ours: statistics.median(p / o for o, p in zip(times[ours], times[peer], strict=True))
              for ours, peer in (("push", "put"), ("pull", "get"))}  # fmt: skip
    best = {
        ours: min(times[peer]) / min(times[ours])
        for ours, peer in (("push", "put"), ("pull", "get"))
    }
    noop_med = {kind: statistics.median(values) for kind, values in noop.items()}
    steps = ", ".join(built)
    rows = [
        (f"push {args.entry} ({size / 1e6:.0f} MB), MB/s", f"{mbs['push']:.0f}",
         "s3fs put_file, same files", f"{mbs['put']:.0f}", f"{mbs['push'] / mbs['put']:.2f}x"),
        *((f"pull {args.entry} into a fresh Store, MB/s", f"{mbs['pull']:.0f}", what,
           f"{mbs[name]:.0f}", f"{mbs['pull'] / mbs[name]:.2f}x")
          for name, what in PULL_PEERS.items()),
        ("(xxh3-128, one pass over the entry, warm), MB/s", f"{xxh3:.0f}", "", "", ""),
        (f"B: `doit {args.tasks}` pulls {len(pulled)} steps, s", f"{b_s:.1f}",
         f"A: {'builds (recorded) of' if args.built else 'cold build + push of'} {len(built)} "
         "steps", f"{a_s:.1f}", f"{b_s / a_s:.3f}x"),
        (f"B: no-op `doit {args.tasks}`, remote on, median s", f"{noop_med['remote']:.3f}",
         "same, `remote=` (no remote)", f"{noop_med['none']:.3f}",
         f"{noop_med['remote'] / noop_med['none']:.2f}x"),
        (f"B: no-op `doit {args.tasks}`, remote on, median s", f"{noop_med['remote']:.3f}",
         f"doit alone, {alone_tasks} tasks, {len(built) if targets else alone_tasks} checked", f"{noop_med['doit alone']:.3f}",
         f"+{noop_med['remote'] - noop_med['doit alone']:.3f} s"),
        (f"requests to the server in {2 * (args.noop_runs + 1)} no-op runs", str(noop_requests),
         "connections to the proxy", str(proxy.connections), ""),
    ]  # fmt: skip
    print(f"\nmoto {_version('moto')}, s3fs {_version('s3fs')} on 127.0.0.1; {os.cpu_count()} CPUs;"
          f" {interpreter()}; medians of {args.reps} alternating runs (transfers),"
          f" {args.noop_runs} (no-ops)\n")  # fmt: skip
    print("| measurement | modelkiln | peer | peer's | modelkiln / peer |")
    print("|---|---:|---|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nsteps built in A and pulled in B: {steps} "
          f"(B: {'every step pulled, none built' if pull_ok else 'CHECK FAILED: built ' + str(b_built)};"
          f" {b_requests} requests)")  # fmt: skip
    print(f"transfer ratios: target >= 0.8x of plain s3fs (medians: push {mbs['push'] / mbs['put']:.2f}x, "
          f"pull {mbs['pull'] / mbs['get']:.2f}x; median of the {args.reps} back-to-back pairs: push "
          f"{paired['push']:.2f}x, pull {paired['pull']:.2f}x; best runs: push {best['push']:.2f}x, "
          f"pull {best['pull']:.2f}x); no-op steps rerun: {len(rerun)}; "
          f"no-op requests: {noop_requests} (target 0)")  # fmt: skip
    runs = {**times, **{f"no-op {kind}": values for kind, values in noop.items()}}
    print("seconds per run (CPU steal, where any; measured for transfers only): " + "; ".join(
        f"{name} {', '.join(_run(s, t) for s, t in zip(values, steal.get(name, [None] * len(values)), strict=True))}"
        for name, values in runs.items()))  # fmt: skip
    print(f"whole bench: {time.perf_counter() - started:.0f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _run(seconds: float, steal: float | None) -> str:
    """A run's seconds, with its steal where it was measured and there was any."""
    return f"{seconds:.2f}" + (f" ({steal:.0%})" if steal and steal >= 0.005 else "")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
