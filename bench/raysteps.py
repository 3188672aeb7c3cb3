"""The Ray runner's cost next to doit's own, in one run of this script.

    python bench/raysteps.py [--steps 24] [--jobs 2] [--runs 5]

A recipe of many tiny steps (data steps over a 200-row file: about 0.1 s of work each) is
built from scratch in fresh workspaces:

- `doit -n J`: doit's own process workers;
- `doit ray=<address> -n J`: the steps as Ray tasks on a cluster this script started before
  (the cost per step: a Ray task, the recipe loaded on the worker, the entry linked back);
- `doit ray=local -n J`: the same with a cluster started for the run (adds the start-up).

Then a no-op `doit` with and without ray= (median of --runs: Ray is never started), and the
keys of the three builds compared. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from workspace import Workspace, slow_data_recipe, write_rows  # noqa: E402


def timed(ws: Workspace, *args: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run(ws.argv(*args), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(
            f"doit {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    return seconds


def keys(ws: Workspace) -> dict[str, str]:
    return {p.name: p.resolve().name for p in (ws.artifacts / "recipe" / "data").iterdir()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="no-op runs per runner")
    args = parser.parse_args()
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    work = Path(tempfile.mkdtemp(prefix="benchray-"))
    rows = write_rows(work, rows=200)
    recipe = slow_data_recipe(rows, [(f"s{i:02d}", 0.05 + i / (4 * args.steps), "")
                                     for i in range(args.steps)])  # fmt: skip
    spaces = {}
    for name in ("plain", "ray", "ray-local"):
        spaces[name] = Workspace(work / name)
        spaces[name].root.mkdir()
        spaces[name].write(recipe)
    jobs = ("-n", str(args.jobs))
    started = time.perf_counter()
    ray.init(address="local", num_cpus=args.jobs, include_dashboard=False,
             logging_level="WARNING")  # fmt: skip
    start_up = time.perf_counter() - started
    address = ray.get_runtime_context().gcs_address
    walls = {
        "plain": timed(spaces["plain"], *jobs, "data"),
        "ray": timed(spaces["ray"], f"ray={address}", *jobs, "data"),
    }
    ray.shutdown()
    walls["ray-local"] = timed(spaces["ray-local"], "ray=local", *jobs, "data")
    noop = {}
    for name, extra in (("plain", ()), ("ray", ("ray=local",))):
        noop[name] = statistics.median(
            timed(spaces[name], *extra, *jobs, "data") for _ in range(args.runs)
        )
    same = keys(spaces["plain"]) == keys(spaces["ray"]) == keys(spaces["ray-local"])
    n = args.steps
    print(f"\n{n} data steps, -n {args.jobs}, {os.cpu_count()} CPUs; Ray {ray.__version__}\n")
    print("| runner | cold build, s | per step, s | vs doit -n, per step, s | no-op, s |")
    print("|---|---:|---:|---:|---:|")
    rows_out = [
        ("doit -n", walls["plain"], noop["plain"]),
        ("ray=<running cluster>", walls["ray"], noop["ray"]),
        ("ray=local (starts one)", walls["ray-local"], noop["ray"]),
    ]
    for label, wall, idle in rows_out:
        extra = (wall - walls["plain"]) / n
        print(f"| {label} | {wall:.2f} | {wall / n:.3f} | {extra:+.3f} | {idle:.3f} |")
    print(f"\nray.init(address='local') in this process: {start_up:.2f} s")
    print(f"same keys in all three workspaces: {'yes' if same else 'NO'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
