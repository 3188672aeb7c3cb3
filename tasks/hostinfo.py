"""What a step's bytes can depend on besides its inputs, read without importing torch: the
CPU's vector instruction level and whether this machine has an NVIDIA GPU.

Loading the graph (every `doit`) must stay fast, so these read /proc and /dev, not torch. They
stand for what torch and MKL will pick when the step runs (docs/design.md, "Reproducible
bytes"): the kernels by instruction set, the device by `device = "auto"`.
"""

from __future__ import annotations

import functools
import glob
import os
import sys
from pathlib import Path

# What torch (OpenMP), MKL and the processes a step starts read their thread count from.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

# torch's CPU capability levels (torch.backends.cpu.get_cpu_capability()) by the /proc/cpuinfo
# flags each needs; MKL's code paths split at the same points.
LEVELS = (
    ("avx512", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    ("avx2", {"avx2", "fma"}),
)


def python_version() -> str:
    """platform.python_version() ("3.11.7", "3.13.0rc1"): the first word of sys.version, which
    is what it parses, without importing platform on every run."""
    return sys.version.split()[0]


@functools.cache
def cpu_level() -> str:
    """avx512, avx2 or baseline on x86 (ATEN_CPU_CAPABILITY, which lowers torch's choice,
    wins); the architecture elsewhere."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if forced:
        return "baseline" if forced == "default" else forced
    return level_of(_cpuinfo())


def _cpuinfo() -> str:
    """/proc/cpuinfo's text; '' where there is none (then no flags: the architecture counts)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def flags_of(cpuinfo: str) -> set[str]:
    """The first "flags" line of /proc/cpuinfo's text, as a set (empty off x86)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def saturates_int8(cpuinfo: str | None = None) -> bool:
    """x86 with AVX2 but no VNNI: onnxruntime's u8s8 int8 kernels sum in 16 bits there and
    saturate; 7-bit weights (reduce_range) are onnxruntime's advice."""
    flags = flags_of(_cpuinfo() if cpuinfo is None else cpuinfo)
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni"}


def level_of(cpuinfo: str) -> str:
    flags = flags_of(cpuinfo)
    if not flags:
        return os.uname().machine.lower() or "unknown"
    return next((name for name, needs in LEVELS if needs <= flags), "baseline")


def gpu_models() -> list[str]:
    """The NVIDIA GPUs a step started now may use (none when CUDA_VISIBLE_DEVICES hides them):
    their model names when the driver says them, else "gpu" per device node."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    return list(_installed_gpus())


@functools.cache
def _installed_gpus() -> tuple[str, ...]:
    """The machine's NVIDIA GPUs, read once a process: a no-op asks for each CUDA step, and
    the device-node glob lists all of /dev."""
    models = []
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        try:
            line = next(ln for ln in Path(info).read_text().splitlines() if ln.startswith("Model:"))
            models.append(line.split(":", 1)[1].strip())
        except (OSError, StopIteration):
            models.append("gpu")
    if not models:
        models = ["gpu" for _ in glob.glob("/dev/nvidia[0-9]*")]
    return tuple(models)


def resolve_device(choice: str) -> str:
    """cpu or cuda: what `device = choice` will run on here ("auto": cuda when a GPU is)."""
    if choice == "auto":
        return "cuda" if gpu_models() else "cpu"
    return choice
