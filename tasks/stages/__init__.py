"""The stage contract and the explicit registry of stages and algorithms.

Every stage module defines a config (a `tasks.config.StageConfig` with `@stage_config`: a frozen
dataclass whose methods are written once), a `SPEC` and a `run(config, ctx)`, and
imports its heavy libraries (torch, onnxruntime, ...) inside `run` only, so that loading the
registry, which `doit list` does, stays light.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks import steplog
from tasks.errors import PreflightError, StageError
from tasks.record import Record, frozen
from tasks.slots import Resources

if TYPE_CHECKING:
    from tasks.envs import Environment

# Formats a step's output can have; a stage lists which ones it accepts as input.
HF, ONNX, DATA, METRICS = "hf", "onnx", "data", "metrics"
PEFT, ONNX_ADAPTER = "peft", "onnx-adapter"
FORMAT_NAMES = {
    HF: "a Hugging Face model",
    ONNX: "an ONNX model",
    DATA: "a data set",
    PEFT: "a LoRA adapter (a finetune step)",
    ONNX_ADAPTER: "an ONNX adapter (an adapter step)",
}

# (stage, algorithm) -> module. Algorithm None: the stage has one implementation.
REGISTRY: dict[str, dict[str | None, str]] = {
    "model": {None: "tasks.stages.model"},
    "data": {None: "tasks.stages.data"},
    "capture": {None: "tasks.stages.capture"},
    "quantize": {
        "ort-dynamic": "tasks.stages.quantize.ort_dynamic",
        "bnb4": "tasks.stages.quantize.bnb4",
        "rtn": "tasks.stages.quantize.rtn",
        "gptq": "tasks.stages.quantize.gptq",
        "awq": "tasks.stages.quantize.awq",
        "quarot": "tasks.stages.quantize.quarot",
        "inc-dynamic": "tasks.stages.quantize.inc_dynamic",
        "inc-weight-only": "tasks.stages.quantize.inc_weight_only",
        "nvmo": "tasks.stages.quantize.nvmo",
    },
    "finetune": {None: "tasks.stages.finetune"},
    "adapter": {None: "tasks.stages.adapter"},
    "evaluate": {None: "tasks.stages.evaluate"},
}

# Stages whose recipe tables are build steps `[<stage>.<name>]`, in the order tasks are listed.
STEP_STAGES = ("capture", "quantize", "finetune", "adapter", "evaluate")


@frozen
class StageSpec(Record):
    stage: str
    algorithm: str | None
    version: str  # bump when the stage's output changes for the same inputs
    config: type
    run: Callable[[Any, StepContext], dict[str, Any] | None]
    doc: str  # one line for `doit list`
    output: str
    inputs: tuple[str, ...] = ()  # formats accepted from `from`
    libraries: tuple[str, ...] = ()  # distributions whose versions enter the key
    needs: dict[str, str] = field(default_factory=dict)  # import name -> pip install fix
    data_fields: tuple[str, ...] = ()  # config fields that name a [data.<name>] table
    # Config fields that name another step ("capture.awq-lora") -> the formats they accept.
    step_fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Steps the recipe implies for one of this stage's steps: (the step, as completed, and the
    # steps to add). Called with the step, every step parsed so far and the recipe file.
    implies: Callable[[Step, dict[str, Step], str], tuple[Step, list[Step]]] | None = None
    # Refuses, when the recipe loads, a step whose `from` step will give what it cannot take
    # (a 3-bit checkpoint to capture): called with the step, that step and the recipe file.
    check_source: Callable[[Step, Step, str], None] | None = None
    # Packages that clash with the main environment: the step runs (partly) in its own
    # virtual environment, whose key enters the step's key (tasks/envs.py). An Environment,
    # or a function of the step's config returning one (a GPU build needs other packages).
    environment: Environment | Callable[[Any], Environment] | None = None
    # Config fields naming local files or directories -> their paths. In the key, each such
    # field holds the content digest instead of the path (cached by stat, so unchanged big files
    # are never re-read, and moving a file does not rebuild). A missing one fails at load.
    local_inputs: Callable[[Any], dict[str, str]] = lambda config: {}
    # Whether the output can differ between platforms (OS, architecture, Python): numeric code
    # can. Such a step's identity records the platform, so a shared store never serves an
    # entry built on one platform to another. Only pure-Python text handling can say False.
    platform_dependent: bool = True
    # Whether the output's bits depend on the CPU's float kernels (sums over calibration tokens
    # that MKL and torch order by instruction set): the key then holds the CPU's level, so a
    # store shared by an AVX-512 and an AVX2 machine keeps both (tasks/hostinfo.py).
    isa_dependent: bool = False

    def environment_of(self, config: Any) -> Environment | None:
        """The Environment a step with this config runs in, or None."""
        env = self.environment
        return env(config) if callable(env) else env

    def preflight(self) -> None:
        """Fail before any model is loaded when a needed package is missing."""
        for module, fix in self.needs.items():
            if importlib.util.find_spec(module) is None:
                raise PreflightError(f"{self.stage} needs the Python package '{module}': {fix}")


@frozen
class Step(Record):
    """One parsed recipe table: `[<stage>.<name>]`, `[model]` or `[data.<name>]`."""

    stage: str
    name: str  # "" for the base model
    spec: StageSpec
    config: Any
    source: str | None  # ref of the input step ("model", "capture.fp32"), None for model/data
    data: tuple[str, ...]  # refs of the data sets it reads ("data.botchan")
    extra: tuple[tuple[str, str], ...] = ()  # (config field, ref) of other steps it reads
    gates: tuple[tuple[str, float], ...] = ()  # evaluate: (gate, limit), never in the key
    resources: Resources = Resources()  # GPUs and threads to run on, never in the key

    @property
    def ref(self) -> str:
        return f"{self.stage}.{self.name}" if self.name else self.stage

    @property
    def task(self) -> str:
        return f"{self.stage}:{self.name}" if self.name else self.stage


@dataclass
class StepContext:
    """What a stage's run() gets besides its config."""

    task: str  # "quantize:int8", for messages
    out: Path  # the (temporary) directory to write the output into
    artifacts: Path  # the artifacts root, for download caches
    input: Path | None = None  # the upstream step's store entry
    data: dict[str, Path] = field(default_factory=dict)  # data set name -> store entry
    steps: dict[str, Path] = field(default_factory=dict)  # step field -> that step's entry
    # Room for files the output does not keep (an unpacked download), on the store's disk;
    # removed after the step, and by `doit gc` after a killed one. None outside a build.
    scratch: Path | None = None
    # The store's lookup of a complete entry by key (None outside a build); see entry().
    find_entry: Callable[[str], Path] | None = None

    def entry(self, key: str) -> Path:
        """The output of another step, by the key an input recorded (a fine-tune's base model):
        the store finds it, so no stage knows how the store is laid out."""
        if self.find_entry is None:
            raise StageError(f"{self.task}: no store to find entry {key[:16]}... in")
        return self.find_entry(key)

    def log(self, message: str) -> None:
        print(f"  {self.task}: {message}", file=sys.stderr, flush=True)

    def progress(self, items: Iterable[Any], desc: str, total: int | None = None) -> Iterable[Any]:
        from tqdm import tqdm

        # Into a log file or CI (not a terminal) a redraw is a line of its own, every 30 s.
        terminal = steplog.interactive()  # fd 2 is a pipe while the step is logged
        return tqdm(
            items, desc=f"  {self.task}: {desc}", total=total, leave=not terminal,
            file=sys.stderr if terminal else _LogLines(sys.stderr),
            mininterval=0.1 if terminal else 30.0,
        )  # fmt: skip


class _LogLines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines, so a log
    gets one readable line per update instead of one endless line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:  # tqdm's clearing writes are blank
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def algorithms(stage: str) -> list[str]:
    return [a for a in REGISTRY.get(stage, {}) if a is not None]


def spec_for(stage: str, algorithm: str | None) -> StageSpec:
    return importlib.import_module(REGISTRY[stage][algorithm]).SPEC
