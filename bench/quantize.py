"""RTN, GPTQ, AWQ and QuaRot on SmolLM2-135M: held-out perplexity, time and peak memory.

    python bench/quantize.py [--artifacts artifacts] [--bits 4,3] [--group-size 64]
                             [--samples 16] [--seq-len 512] [--only gptq,awq]

Needs the default recipe's model and data steps built (`doit model data`). Calibration is
the Botchan train split, perplexity the held-out split (4,096 tokens, windows of 512), the same
text for every row. Each run is a child process, so its peak RSS is its own. Prints a
Markdown table and, per bit width, how much of RTN's perplexity increase over the float model
GPTQ, AWQ and QuaRot recover.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tasks.config import parse_config
from tasks.stages import StepContext, spec_for
alg, table, model, data, out = json.loads(sys.argv[1])
spec = spec_for("quantize", alg)
config = parse_config(spec.config, table, "bench", alg)
ctx = StepContext(task=f"bench:{{alg}}", out=Path(out), artifacts=Path(out).parent, input=Path(model),
                  data={{"botchan": Path(data)}})
started = time.perf_counter()
metrics = spec.run(config, ctx)
metrics["seconds"] = time.perf_counter() - started
print("RESULT " + json.dumps(metrics))
"""


def run_child(alg: str, table: dict, model: Path, data: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    args = json.dumps([alg, table, str(model), str(data), str(out)])
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), args],
                          capture_output=True, text=True)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{alg} {table} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def float_perplexity(model: Path, data: Path) -> float:
    sys.path.insert(0, str(ROOT))
    from tasks.runtimes.perplexity import heldout_perplexity
    from tasks.stages import StepContext

    ctx = StepContext(task="bench:fp", out=Path(tempfile.mkdtemp()), artifacts=Path("."))
    return heldout_perplexity(model, data, ctx)["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--only", default="rtn,gptq,awq,quarot")
    args = parser.parse_args()
    model = (args.artifacts / "default" / "model").resolve()
    data = (args.artifacts / "default" / "data" / "botchan").resolve()
    if not all(p.with_name(f"{p.name}.json").is_file() for p in (model, data)):  # manifests
        raise SystemExit("build the default recipe's model and data first: doit model data")
    work = Path(tempfile.mkdtemp(prefix="kiln-quant-"))
    started = time.perf_counter()
    fp = float_perplexity(model, data)
    rows = [("FP", "-", fp, time.perf_counter() - started, None)]
    for bits in map(int, args.bits.split(",")):
        for alg in args.only.split(","):
            table = {"bits": bits, "group_size": args.group_size, "data": "botchan"}
            if alg != "rtn":  # rtn calibrates on nothing: its config refuses these settings
                table |= {"num_samples": args.samples, "seq_len": args.seq_len}
            m = run_child(alg, table, model, data, work / f"{alg}-w{bits}")
            rows.append((alg.upper() if alg != "quarot" else "QuaRot", f"w{bits}g{args.group_size}",
                         m["perplexity"], m["seconds"], m.get("peak_rss_bytes")))  # fmt: skip
            print(f"  {rows[-1][0]} {rows[-1][1]}: {m['perplexity']:.3f} in {m['seconds']:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    print_table(rows, fp, args)


def print_table(rows: list, fp: float, args: argparse.Namespace) -> None:
    print(f"\nSmolLM2-135M, calibration {args.samples} x {args.seq_len} tokens of the Botchan train "
          "split, perplexity on 4,096 held-out tokens\n")  # fmt: skip
    print(
        "| method | weights | perplexity | vs FP | recovers of RTN's increase | time s | peak RSS MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    rtn = {w: p for name, w, p, _, _ in rows if name == "RTN"}
    for name, weights, ppl, seconds, rss in rows:
        base = rtn.get(weights)
        recovered = f"{(base - ppl) / (base - fp):.0%}" if base and name != "RTN" else "-"
        mem = f"{rss / 2**20:.0f}" if rss else "-"
        print(
            f"| {name} | {weights} | {ppl:.2f} | {ppl / fp - 1:+.1%} | {recovered} | {seconds:.0f} | {mem} |"
        )


if __name__ == "__main__":
    main()
