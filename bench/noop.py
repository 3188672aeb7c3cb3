"""No-op build time against model size, and the cost of hashing a cold model directory.

    python bench/noop.py [--sizes 0.3,3] [--runs 7] [--keep DIR]

For each size it builds a small recipe (model -> data -> capture -> quantize -> evaluate ->
report) on a local model directory padded with that many GB of extra weight files, then times
`doit` runs that find everything up to date. Peers measured in the same run on the same files:
raw read speed (the floor for any content hash), MD5 (what doit's file_dep and DVC use) and
xxh3-128 through modelkiln's digest cache with an empty cache (a cold model directory). The
warm no-op runs alternate with those of doit alone, a dodo.py of as many always-up-to-date tasks
with modelkiln's in-memory task database, in the same Python: about what no dodo.py can go
below (the interpreter, doit's import and its plug-in scans), so the difference is close to
modelkiln's own share. The first no-op after the peers' reads (which drop the page cache) is
reported apart, as the cold no-op; the medians are of warm runs after one warm-up of each.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import build_tiny_model, tiny_text  # noqa: E402
from workspace import Workspace, doit_alone, executed, interpreter, timed, tiny_recipe  # noqa: E402

from tasks.digest import DigestCache  # noqa: E402

BLOCK = os.urandom(64 << 20)


def pad(model: Path, gigabytes: float) -> None:
    """Extra weight files of the given total size, in 1 GB shards like a real checkpoint."""
    left = int(gigabytes * 1e9)
    shard = 0
    while left > 0:
        size = min(left, 1_000_000_000)
        with open(model / f"extra-{shard:05d}.safetensors.bin", "wb") as fh:
            for start in range(0, size, len(BLOCK)):
                fh.write(BLOCK[: min(len(BLOCK), size - start)])
        left -= size
        shard += 1


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so each peer reads from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def throughput(model: Path, read) -> float:
    """MB/s of read(path) over every file in the model directory, page cache dropped first."""
    files = [p for p in model.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    drop_page_cache()
    start = time.perf_counter()
    for path in files:
        read(path)
    return total / 1e6 / (time.perf_counter() - start)


def raw_read(path: Path) -> None:
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def md5(path: Path) -> None:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)


def measure(work: Path, gigabytes: float, runs: int, prose: Path, tiny: Path) -> dict:
    model = work / f"model-{gigabytes}GB"
    shutil.copytree(tiny, model)
    pad(model, gigabytes)
    ws = Workspace(work / f"ws-{gigabytes}GB")
    ws.root.mkdir()
    ws.write(tiny_recipe(model, prose))
    start = time.perf_counter()
    first = ws.doit()
    build_s = time.perf_counter() - start
    row = {"GB": gigabytes, "first build s": build_s, "steps": len(executed(first.stdout))}
    row["raw read MB/s"] = throughput(model, raw_read)
    row["md5 MB/s"] = throughput(model, md5)
    cold = DigestCache(work / f"cold-{gigabytes}.sqlite")
    row["xxh3 cold MB/s"] = throughput(model, cold.file_digest)
    alone = doit_alone(work / f"doit-alone-{gigabytes}GB", row["steps"])
    times, peer, ran = [], [], []
    # The reads above left the page cache cold (Python, doit, the libraries): modelkiln's first
    # no-op is reported apart, and each command runs untimed until it has had one warm run.
    row["cold no-op s"] = timed(lambda: ran.extend(executed(ws.doit().stdout)))
    for _ in range(2):
        subprocess.run(alone, capture_output=True, check=True)
    ran.extend(executed(ws.doit().stdout))
    for _ in range(runs):
        peer.append(timed(lambda: subprocess.run(alone, capture_output=True, check=True)))
        times.append(timed(lambda: ran.extend(executed(ws.doit().stdout))))
    row.update({"no-op median s": statistics.median(times), "no-op min s": min(times),
                "no-op max s": max(times), "doit alone median s": statistics.median(peer),
                "modelkiln's share s": statistics.median(times) - statistics.median(peer),
                "steps rerun": len(ran)})  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="0,0.3,3", help="GB of extra weights, comma separated")
    parser.add_argument("--runs", type=int, default=7, help="no-op runs per size")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temp dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="kiln-noop-"))
    work.mkdir(parents=True, exist_ok=True)
    tiny = build_tiny_model(work / "tiny")
    prose = work / "prose.txt"
    prose.write_text(tiny_text())
    rows = [measure(work, float(s), args.runs, prose, tiny) for s in args.sizes.split(",")]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---:|" * len(cols))
    for row in rows:
        print(
            "| "
            + " | ".join(
                f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols
            )
            + " |"
        )
    worst = max(r["no-op median s"] for r in rows)
    cache = (
        "dropped before each read"
        if drop_page_cache()
        else "NOT dropped (needs root): reads are warm"
    )
    print(
        f"\nworst no-op median: {worst:.3f} s (target <= 0.3 s); {os.cpu_count()} CPUs; "
        f"{interpreter()}; page cache {cache}"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
