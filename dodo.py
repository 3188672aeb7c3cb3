"""modelkiln's build graph: one doit task per step of a recipe.

    doit                          build everything in recipes/default.toml
    doit recipe=recipes/x.toml    another recipe
    doit quantize:int8            one step (and what it needs)
    doit finetune adapter         every fine-tune and ONNX adapter
    doit list                     every step, with what it does
    doit explain quantize:int8    why a step would run
    doit gc [--dry-run]           remove store entries no recipe points at
    doit verify                   re-hash the store against its manifests
    doit graph                    draw the steps, coloured by the last run
    doit ray=local -n 8           build on a Ray cluster (ray=<address> joins one)

Loading this file imports no torch, transformers or onnxruntime: stages import them when they run.
"""

import sys
from pathlib import Path

from doit import get_var

from tasks import interrupt
from tasks.errors import KilnError, check_variables
from tasks.glue import (
    GC_OPTIONS,
    VERIFY_OPTIONS,
    explain,
    gc,
    pull,
    push,
    report_task,
    run_on_ray,
    stage_tasks,
    step_task,
    verify,
)  # fmt: skip
from tasks.graph import load_graph
from tasks.jobs import (
    IN_FLIGHT,
    check_command,
    doit_jobs,
    ray_address,
    refuse_state_commands,
    share_cpus,
    watch_workers,
)
from tasks.runs import BAD_COMMAND, RunReporter, draw_graph
from tasks.stages import algorithms
from tasks.staging import os_problem

interrupt.install()  # Ctrl-C, SIGTERM: one line and exit 130/143, no traceback

# get_var gives None outside a doit run (a plain import of this file), hence the `or`.
RECIPE = Path(get_var("recipe") or "recipes/default.toml")
ARTIFACTS = Path(get_var("artifacts") or "artifacts")
# The shared remote store for this run (else MODELKILN_<NAME>, else the recipe's [store]).
OVERRIDES = {name: get_var(name) for name in ("remote", "push", "remote_only")}
# The Ray cluster that builds the steps (else MODELKILN_RAY; none: doit builds them itself).
# Its nodes share entries through the remote store, so with ray= every step built is pushed.
RAY = ray_address(get_var("ray"))
if RAY:
    OVERRIDES["push"] = "true"

try:
    check_variables(sys.argv[1:], ("recipe", "artifacts", "ray", *OVERRIDES))  # not `recipie=`
    refuse_state_commands(sys.argv[1:])  # `doit forget` and `-a` would change nothing
    if RAY:
        check_command(sys.argv[1:])
    GRAPH = load_graph(RECIPE, ARTIFACTS, OVERRIDES)
except KilnError as err:
    print(f"modelkiln: {err}", file=sys.stderr)
    sys.exit(BAD_COMMAND)
except OSError as err:  # the machine's: a full disk, a read-only or forbidden path
    print(f"modelkiln: {os_problem(err, doing='read')}", file=sys.stderr)
    sys.exit(BAD_COMMAND)

if RAY:
    # doit's threads hand steps to Ray (forked workers cannot use the parent's Ray client);
    # Ray gives each step its CPUs and GPUs.
    JOBS = doit_jobs(sys.argv[1:], default=IN_FLIGHT)
    run_on_ray(RAY)
else:
    JOBS = doit_jobs(sys.argv[1:])
    share_cpus(JOBS)  # `doit -n 2`: each step gets half the cores
    watch_workers()  # `doit -n 2`: a worker the kernel kills stops the run instead of hanging it

DOIT_CONFIG = {
    "default_tasks": [
        "model",
        "data",
        "capture",
        "quantize",
        "finetune",
        "adapter",
        "evaluate",
        "report",
    ],
    # The store is the build state, so doit's database records nothing worth keeping: in
    # memory it cannot fill a disk, fail on a read-only store or race another doit process.
    "dep_file": ":memory:",
    "backend": "sqlite3",
    # One failing variant does not stop the others (a nightly run builds what it can; the
    # steps below a failure are reported as not built). `doit --no-continue` stops at once.
    "continue": True,
    # doit's console output, then the gates, the release folder, the run summary and the
    # exit code (tasks/runs.py).
    "reporter": RunReporter.for_graph(GRAPH, sys.argv[1:], JOBS),
    "verbosity": 2,
    "subtasks": True,  # `doit list` shows every step, in recipe order
    "sort": "definition",
}
if RAY:
    DOIT_CONFIG |= {"par_type": "thread", "num_process": JOBS}


def task_model():
    """the base model, as a plain Hugging Face directory"""
    return step_task(GRAPH, GRAPH.step("model"))


def task_data():
    """named data sets: text records split into train and held-out parts"""
    yield from stage_tasks(GRAPH, "data", task_data.__doc__)


def task_capture():
    """Hugging Face model -> ONNX (with onnxruntime-genai's builder when ort_genai = true)"""
    yield from stage_tasks(GRAPH, "capture", task_capture.__doc__)


def task_quantize():
    """quantize a model with one algorithm per step"""
    doc = f"{task_quantize.__doc__}: {', '.join(algorithms('quantize'))} (docs/recipes.md)"
    yield from stage_tasks(GRAPH, "quantize", doc)


def task_finetune():
    """train a LoRA adapter (lora, qlora) on a float or quantized Hugging Face model"""
    yield from stage_tasks(GRAPH, "finetune", task_finetune.__doc__)


def task_adapter():
    """LoRA adapter -> onnxruntime adapter file for a shared ONNX base with LoRA inputs"""
    yield from stage_tasks(GRAPH, "adapter", task_adapter.__doc__)


def task_evaluate():
    """perplexity on held-out text, size on disk, load and generation latency"""
    yield from stage_tasks(GRAPH, "evaluate", task_evaluate.__doc__)


def task_report():
    """table, Markdown and HTML report of every evaluate step"""
    return report_task(GRAPH)


def task_graph():
    """draw the recipe's steps and their inputs, coloured by the last run (Graphviz, else Mermaid)"""
    return {"actions": [(draw_graph, [GRAPH])], "uptodate": [False], "verbosity": 2}


def task_explain():
    """say why each step (or the named ones) would run: never built, or what changed"""
    return {
        "actions": [(explain, [GRAPH])],
        "pos_arg": "names",
        "uptodate": [False],
        "verbosity": 2,
    }


def task_gc():
    """remove store entries no recipe points at (--dry-run: only list them with sizes)"""
    return {"actions": [(gc, [GRAPH])], "params": GC_OPTIONS, "pos_arg": "recipes",
            "uptodate": [False], "verbosity": 2}  # fmt: skip


def task_push():
    """upload the recipe's entries built here (or the named steps') to the remote store"""
    return {"actions": [(push, [GRAPH])], "pos_arg": "names", "uptodate": [False],
            "verbosity": 2}  # fmt: skip


def task_pull():
    """download the recipe's entries (or the named steps') from the remote store, build nothing"""
    return {"actions": [(pull, [GRAPH])], "pos_arg": "names", "uptodate": [False],
            "verbosity": 2}  # fmt: skip


def task_verify():
    """re-hash every store entry against its manifest; name each damaged entry and those built from it"""
    return {"actions": [(verify, [GRAPH])], "params": VERIFY_OPTIONS, "uptodate": [False],
            "verbosity": 2}  # fmt: skip
