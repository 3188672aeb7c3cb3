"""Steps on a Ray cluster: `doit ray=local` (a cluster for this run) or `ray=<address>`.

The doit process stays the driver: it loads the graph, decides what is up to date, and keeps
the links, the run summary and the release folder. Each step that must run becomes one Ray
task with the step's resources, which loads the recipe again on its node and builds the step
there with the usual runner (the key's lock, the log, the publication). Only small values
travel through Ray: the recipe's path and text, the key, the step's values for the summary.
Model bytes go through the store: a node whose workers share the driver's artifacts folder
builds straight into it; a node with a folder of its own (MODELKILN_ARTIFACTS in its
environment) pulls the step's inputs from the remote store and pushes what it built, and the
driver then pulls it.

doit's worker processes are forked, and a forked child cannot use the Ray client of its
parent, so with Ray the steps run in doit's thread workers (`-P thread`): each thread waits
on one Ray task. Ray is imported, and a cluster started or joined, only when a step must run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from tasks import runner, slots
from tasks.errors import KilnError, PreflightError, StageError
from tasks.graph import Graph, load_graph
from tasks.keys import canonical_json, diff_identities
from tasks.report import REPORT_STEP

NODE_ARTIFACTS = "MODELKILN_ARTIFACTS"  # in a node's environment: its own artifacts folder
INSTALL = "pip install 'modelkiln[ray]'"


@dataclasses.dataclass(frozen=True)
class Request:
    """What a Ray task is given: enough to load the same graph on its node, and no more."""

    recipe: str  # the driver's recipe path (absolute)
    recipe_text: str  # what the driver read there: a node with another recipe refuses
    artifacts: str  # the driver's artifacts folder (absolute)
    cwd: str  # the driver's working directory: relative paths in the recipe mean the same
    overrides: dict[str, str]  # the driver's remote settings, as resolved for this run
    ref: str
    key: str
    identity: dict[str, Any]  # the step's identity on the driver: a node says what differs


def request_for(graph: Graph, ref: str) -> Request:
    remote = graph.remote
    overrides = {"remote": ""} if remote is None else {
        "remote": remote.url,
        "push": str(remote.push_enabled).lower(),
        "remote_only": str(remote.remote_only).lower(),
    }  # fmt: skip
    return Request(
        recipe=str(graph.recipe.path.resolve()),
        recipe_text=graph.recipe.path.read_text(),
        artifacts=str(graph.store.root.resolve()),
        cwd=os.getcwd(),
        overrides=overrides,
        ref=ref,
        key=graph.keys[ref],
        identity=graph.identities[ref],
    )


def asks(graph: Graph, ref: str) -> tuple[int, int]:
    """(CPUs, GPUs) a step asks Ray for: its `resources`, else 1 CPU, and 1 GPU when its
    device (as its key resolved it on the driver) is CUDA."""
    resources = graph.step(ref).resources
    cpus = resources.cpus if resources is not None and resources.cpus is not None else 1
    return cpus, slots.gpus_needed(resources, graph.identities[ref])


# ---- the driver -----------------------------------------------------------------------------


def ray_step(graph: Graph, ref: str, task: Any, address: str) -> TaskFailed | dict[str, Any]:
    """The doit action of a step with ray=: one Ray task, then the entry linked here."""
    if ref == REPORT_STEP:  # it reads the evaluations' manifests here: nothing to send away
        return runner.run_step(graph, ref, task)
    name = graph.task(ref)
    try:
        cluster = Cluster.get(address)
        cpus, gpus = asks(graph, ref)
        cluster.check_fits(name, cpus, gpus)
        if graph.remote is not None:  # a node with a workspace of its own pulls them
            for needed in graph.inputs(ref):
                runner.push_step(graph.remote, graph.store, graph.keys[needed], graph.task(needed))
        values = cluster.run(request_for(graph, ref), cpus, gpus)
    except KilnError as err:
        return TaskFailed(f"{name}: {err}")
    except Exception as err:  # Ray's own (a lost cluster, gRPC): one line, not a traceback
        return TaskFailed(f"{name}: Ray failed: {type(err).__name__}: {_first_line(err)}")
    task.values.update(values.get("values", {}))
    node = task.values.get("node")
    if "error" in values:
        return TaskFailed(f"{name}: {values['error']}")
    if "bug" in values:
        return TaskFailed(f"{name}: failed on {node}:\n{values['bug']}")
    try:
        if not graph.store.is_complete(graph.keys[ref]):  # built in a node's own workspace
            runner.pull_step(graph, ref, name)
        else:
            graph.store.link(graph.link(ref), graph.keys[ref])
    except KilnError as err:
        return TaskFailed(f"{name}: {task.values.get('status')} on {node}, but {err}")
    # The node's own lines come through Ray's log monitor, late or (from a worker that has
    # ended) not at all: this one is the driver's.
    print(f"  {name}: {task.values.get('status')} on {node} in "
          f"{task.values.get('seconds', 0):.1f} s", file=sys.stderr)  # fmt: skip
    return task.values


def _first_line(err: BaseException) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), "")[:300]


# A Ray worker that died, not a step that failed: retries are off, so Ray reports it here.
DEATHS = ("WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "LocalRayletDiedError",
          "ObjectLostError")  # fmt: skip


class Cluster:
    """This run's connection to Ray, made by the first step that must run (one per process)."""

    _lock = threading.Lock()
    _current: Cluster | PreflightError | None = None  # a failed start is not tried again

    @classmethod
    def get(cls, address: str) -> Cluster:
        with cls._lock:
            if cls._current is None:
                try:
                    cls._current = cls._start(address)
                except PreflightError as err:
                    cls._current = err
            if isinstance(cls._current, PreflightError):
                raise cls._current
            return cls._current

    @classmethod
    def _start(cls, address: str) -> Cluster:
        """Connect from a thread that lives as long as this process. Ray starts its local
        processes with PR_SET_PDEATHSIG, which Linux fires when the *thread* that started them
        ends; doit's worker threads end as soon as no step is left to hand out, while others
        still wait for theirs."""
        ready, outcome = threading.Event(), {}

        def keeper() -> None:
            try:
                outcome["cluster"] = cls(address)
            except BaseException as err:
                outcome["error"] = err
            ready.set()
            if "cluster" in outcome:
                threading.Event().wait()  # until the process ends (daemon thread)

        threading.Thread(target=keeper, name="ray-keeper", daemon=True).start()
        ready.wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["cluster"]

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise PreflightError("ray= needs Ray, which is not installed", fix=INSTALL) from None
        self.ray = ray
        self.address = address
        self._functions: dict[tuple[int, int], Any] = {}
        started = time.perf_counter()
        # No usage report leaves the machine: the tool builds offline, and a cluster for one
        # run has no one to report to.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not sys.stderr.isatty():
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in a log file
        # ray.init from a thread cannot set its SIGTERM handler, and says so each run: doit's
        # process keeps its own (tasks/interrupt.py).
        logging.getLogger("ray._private.worker").addFilter(
            lambda record: "SIGTERM handler" not in record.getMessage()
        )
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
        before = os.environ.get("PYTHONPATH")
        if address == "local":
            # address="local" always starts a new cluster (a stale /tmp/ray/ray_current_cluster
            # would otherwise make ray.init try to join a dead one).
            kwargs["num_gpus"] = len(slots.gpu_ids())
            # Its workers import this checkout's tasks/: they inherit the environment its
            # processes start with. A node of a cluster started elsewhere imports its own
            # modelkiln, and refuses a step whose key it computes differently.
            code = str(Path(runner.__file__).resolve().parents[1])
            os.environ["PYTHONPATH"] = code + (os.pathsep + before if before else "")
        try:
            ray.init(address=address, **kwargs)
        except Exception as err:  # ConnectionError, ValueError, RuntimeError: all say why
            with contextlib.suppress(Exception):
                ray.shutdown()  # whatever half started
            raise PreflightError(
                f"could not {'start' if address == 'local' else 'join'} the Ray cluster "
                f"{address!r}: {_first_line(err) or type(err).__name__}",
                fix="ray=local starts one for this run; `ray start --head` on a machine, then "
                "ray=<its address:6379> (or ray=auto on that machine); a cluster with token "
                "authentication also needs RAY_AUTH_MODE=token and its ~/.ray/auth_token",
            ) from None
        finally:
            if address == "local":
                _restore("PYTHONPATH", before)
        _keep_token_private()
        self.start_seconds = time.perf_counter() - started
        print(f"  ray: {'started' if address == 'local' else 'joined'} a cluster in "
              f"{self.start_seconds:.1f} s: {self._describe()}", file=sys.stderr)  # fmt: skip

    def _describe(self) -> str:
        total = self.ray.cluster_resources()
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        return (f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, "
                f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs")  # fmt: skip

    def check_fits(self, task: str, cpus: int, gpus: int) -> None:
        """A step no node can ever run fails now: Ray would keep it waiting forever."""
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
            return
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise PreflightError(
            f"it asks Ray for {cpus} CPU{'s' if cpus != 1 else ''} and {gpus} "
            f"GPU{'s' if gpus != 1 else ''} on one node, and no node of the cluster has them "
            f"(the largest: {biggest.get('CPU', 0):g} CPUs, {biggest.get('GPU', 0):g} GPUs)",
            fix="lower the step's resources (resources = { cpus = ..., gpus = ... }), or add "
            "a node that has them",
        )

    def run(self, request: Request, cpus: int, gpus: int) -> dict[str, Any]:
        """Run the step as a Ray task and wait for it: build_on_node's answer."""
        ray = self.ray
        try:
            return ray.get(self._function(cpus, gpus).remote(request))
        except ray.exceptions.RayError as err:
            kind = type(err).__name__
            if kind not in DEATHS:  # could not start it there: a missing module, a bad env
                raise StageError(
                    f"Ray could not run it on a node ({kind}: {_first_line(err)})",
                    fix="install the same modelkiln (`pip install -e '.[all]'` in the same "
                    "checkout) on every node",
                ) from None
            # Killed for memory, its node lost: nothing half-built looks complete, on the
            # node (its build folder has no manifest) or on the remote (no manifest there).
            raise StageError(
                f"the Ray worker building it died ({kind}: {_first_line(err)}); what it had "
                "written is not published",
                fix="see the node's memory (`ray status`; the step's peak memory in an "
                "earlier run summary), give it more room with resources.cpus, then run again",
            ) from None

    def _function(self, cpus: int, gpus: int) -> Any:
        """The Ray remote function for a resource shape. Retries off: a step killed for
        memory must fail once, not run four times. A GPU step's worker process ends with its
        task (max_calls=1): CUDA reads its visible devices once per process, and Ray frees a
        GPU worker's device only when num_gpus is given here, not in .options()."""
        if (cpus, gpus) not in self._functions:
            self._functions[(cpus, gpus)] = self.ray.remote(
                num_cpus=cpus, num_gpus=gpus, max_retries=0, max_calls=1 if gpus else 0
            )(build_on_node)
        return self._functions[(cpus, gpus)]


# ---- on a node ------------------------------------------------------------------------------


class _Task:
    """What runner.run_step needs of doit's Task: somewhere to put the step's values."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}


def build_on_node(request: Request) -> dict[str, Any]:
    """A Ray task: build one step in this node's workspace. Returns {"values": ...} with the
    step's values for the run summary, plus "error" (one message) or "bug" (a traceback)."""
    import traceback

    task = _Task()
    try:
        here = _node_context()
        node = task.values["node"] = (
            f"{socket.gethostname()} ({here.node[:8]})"  # two nodes on one host
        )
        graph = _node_graph(request)
        ref, name = request.ref, graph.task(request.ref)
        for needed in graph.inputs(ref):  # a node with its own workspace, or another machine
            if not graph.store.is_complete(graph.keys[needed]):
                runner.pull_step(graph, needed, graph.task(needed))
        result = runner.run_step(graph, ref, task, assigned=here)
        if not isinstance(result, TaskFailed) and graph.remote is not None:
            # Built here before (its status "up-to-date"), it may still be missing there.
            runner.push_step(graph.remote, graph.store, request.key, name)
    except KilnError as err:
        return {"values": task.values, "error": str(err)}
    except Exception:
        return {"values": task.values, "bug": traceback.format_exc()}
    if isinstance(result, TaskFailed):
        return {"values": task.values, "error": result.message.removeprefix(f"{name}: ")}
    return {"values": {**result, "node": node}}


def _node_context() -> slots.Assigned:
    """The CPUs and GPUs Ray gave this task (GPU ids as Ray names them: indices, or the
    UUIDs a node's CUDA_VISIBLE_DEVICES listed)."""
    import ray

    context = ray.get_runtime_context()
    cpus = max(1, int(context.get_assigned_resources().get("CPU", 1)))
    gpus = sorted(ray.get_gpu_ids(), key=str)
    return slots.Assigned(gpus=gpus, cpus=cpus, node=context.get_node_id())


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _keep_token_private() -> None:
    """Ray 2.60 writes its cluster token readable by every user of the machine: anyone who can
    read it can run code on the cluster."""
    token = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        if token.is_file() and token.stat().st_uid == os.getuid():
            token.chmod(0o600)


def _node_graph(request: Request) -> Graph:
    """The driver's graph, loaded on this node; refused when its key for the step differs (a
    node with other code, another recipe, another CPU level, a floating source that moved)."""
    if Path(request.cwd).is_dir():
        os.chdir(request.cwd)
    recipe = Path(request.recipe)
    try:
        text = recipe.read_text()
    except OSError:
        text = None
    if text != request.recipe_text:
        raise PreflightError(
            f"this node ({socket.gethostname()}) has {'another' if text else 'no'} {recipe}",
            fix="give every node the same checkout of the recipes at the same path",
        )
    artifacts = Path(os.environ.get(NODE_ARTIFACTS) or request.artifacts)
    overrides = dict(request.overrides)
    if overrides.get("remote"):
        # Whatever push says: a step may run on any node, and a node with a workspace of its
        # own gets its inputs (and the driver its outputs) from the remote. A remote this
        # node may not write to is skipped with a warning (runner.push_step).
        overrides["push"] = "true"
    # A worker runs steps of one doit run only (Ray ends a job's workers with it), whose
    # inputs do not change under it: the graph is loaded once per worker.
    cached = (request.recipe, request.recipe_text, str(artifacts), tuple(sorted(overrides.items())))
    if _graph_cache.get("for") != cached:
        _graph_cache.update({"for": cached, "graph": load_graph(recipe, artifacts, overrides)})
    graph = _graph_cache["graph"]
    key = graph.keys.get(request.ref)
    if key != request.key:
        raise PreflightError(
            f"this node ({socket.gethostname()}) computes another key for {request.ref} "
            f"({(key or '?')[:12]}... instead of the driver's {request.key[:12]}...): "
            f"{_difference(request.identity, graph.identities.get(request.ref, {}))}",
            fix="run the same modelkiln, libraries and recipe on every node (and nodes with "
            "the same CPU and GPU models for the calibrated quantizers: docs/design.md)",
        )
    if artifacts.resolve() != Path(request.artifacts) and graph.remote is None:
        raise PreflightError(
            f"this node's artifacts folder ({artifacts}, from {NODE_ARTIFACTS}) is not the "
            "driver's, and the run has no remote store to share entries through",
            fix="set [store] remote in the recipe (or remote=...), or let the node use the "
            f"driver's folder (unset {NODE_ARTIFACTS})",
        )
    return graph


_graph_cache: dict[str, Any] = {}


def _difference(driver: dict[str, Any], here: dict[str, Any]) -> str:
    changes = diff_identities(driver, here)
    return (
        "; ".join(
            f"{path}: {canonical_json(old)[:60]} on the driver, {canonical_json(new)[:60]} here"
            for path, old, new in changes[:3]
        )
        or "the same identity, another key (another modelkiln?)"
    )
