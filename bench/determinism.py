"""One key, one set of bytes: the default recipe's quantize steps built three ways on SmolLM2.

    python bench/determinism.py [--tasks quantize] [--work /tmp/benchdet] [--keep] [--resume]

Builds the steps named by --tasks (doit targets) in three fresh workspaces that each start
from a copy of one build of what they read (the model, the data, the fp32 capture):

- `OMP_NUM_THREADS=1 doit <tasks>`: every step on one thread;
- `OMP_NUM_THREADS=2 doit <tasks>`: every step on two threads;
- `doit -n 2 <tasks>`: two steps at a time, each with its share of the cores.

Then prints, per step, its key in each workspace and the sha256 of every weight file
(*.safetensors, *.onnx, *.onnx.data, *.bin, *.pt), and whether all three agree, with each
step's build time per workspace. Exits 1 when a key or a digest differs. Takes about an hour
on 2 cores for the whole quantize stage. --resume keeps what an interrupted run left in --work:
each workspace's `doit` then builds only the steps it lacks (their times are the earlier run's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from workspace import Workspace  # noqa: E402

RECIPE = "default"
WEIGHTS = (".safetensors", ".onnx", ".onnx.data", ".data", ".bin", ".pt")
RUNS = {  # name -> (doit arguments, environment)
    "1 thread": ([], {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
    "2 threads": ([], {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}),
    "doit -n 2": (["-n", "2"], {}),
}


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def doit(ws: Workspace, args: list[str], env: dict[str, str]) -> float:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONDONTWRITEBYTECODE")}  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(ws.argv(*args), env={**environ, **env}, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(
            f"doit {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return time.perf_counter() - started


def steps_of(ws: Workspace, stage: str) -> dict[str, Path]:
    folder = ws.artifacts / RECIPE / stage
    return {f"{stage}:{p.name}": p.resolve() for p in sorted(folder.iterdir()) if p.is_symlink()}


def weights(entry: Path) -> dict[str, str]:
    return {str(p.relative_to(entry)): sha256(p) for p in sorted(entry.rglob("*"))
            if p.is_file() and p.name.endswith(WEIGHTS)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="quantize", help="doit targets, comma separated")
    parser.add_argument("--work", type=Path, default=Path("/tmp/benchdet"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--resume", action="store_true", help="reuse the workspaces in --work")
    args = parser.parse_args()
    targets = args.tasks.split(",")
    stage = targets[0].split(":")[0]
    if not args.resume:
        shutil.rmtree(args.work, ignore_errors=True)
    base = Workspace(args.work / "base", RECIPE)
    base.root.mkdir(parents=True, exist_ok=True)
    base.write((ROOT / "recipes" / "default.toml").read_text())
    print("building the inputs once (model, data, capture:fp32) ...", file=sys.stderr, flush=True)
    doit(base, ["model", "data", "capture:fp32"], {})
    found: dict[str, dict[str, tuple[str, dict[str, str], float]]] = {}
    walls = {}
    for name, (extra, env) in RUNS.items():
        ws = Workspace(args.work / name.replace(" ", "-"), RECIPE)
        if not ws.artifacts.is_dir():
            ws.root.mkdir(exist_ok=True)
            ws.write(base.recipe.read_text())
            # A copy, not hard links: onnx refuses external data with several links to it.
            subprocess.run(["cp", "-a", str(base.artifacts), str(ws.artifacts)], check=True)
        print(f"{name}: doit {' '.join(extra + targets)} ...", file=sys.stderr, flush=True)
        walls[name] = doit(ws, extra + targets, env)
        for task, entry in steps_of(ws, stage).items():
            seconds = json.loads(entry.with_name(entry.name + ".json").read_text())["timings"][
                "seconds"
            ]
            found.setdefault(task, {})[name] = (entry.name, weights(entry), seconds)
    same_all = True
    print(f"\n| step | weight files | sha256 (first 16) | same key and bytes in all {len(RUNS)} | "
          + " | ".join(f"s, {n}" for n in RUNS) + " |")  # fmt: skip
    print("|---|---:|---|---|" + "---:|" * len(RUNS))
    for task, runs in found.items():
        keys = {key for key, _, _ in runs.values()}
        digests = [files for _, files, _ in runs.values()]
        same = len(runs) == len(RUNS) and len(keys) == 1 and all(d == digests[0] for d in digests)
        same_all &= same
        first = "; ".join(f"{f}: {h[:16]}" for f, h in digests[0].items())
        times = " | ".join(f"{runs[n][2]:.0f}" if n in runs else "-" for n in RUNS)
        print(f"| {task} | {len(digests[0])} | {first} | {'yes' if same else 'NO'} | {times} |")
    print("\nwall time of each doit: " + ", ".join(f"{n} {s:.0f} s" for n, s in walls.items()))
    print("all equal" if same_all else "DIFFERENCES FOUND")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    sys.exit(0 if same_all else 1)


if __name__ == "__main__":
    main()
