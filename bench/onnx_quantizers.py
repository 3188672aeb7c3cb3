"""The ONNX quantizers on SmolLM2-135M's fp32 capture: perplexity, size and latency of
onnxruntime's (dynamic int8, NF4), Intel Neural Compressor's (dynamic int8, weight-only RTN and
AWQ) and NVIDIA ModelOpt's (int4 RTN and AWQ, int8 Q/DQ), the last two each in its own
environment; plus what each environment cost to build and takes on disk.

    OMP_NUM_THREADS=1 python bench/onnx_quantizers.py [--artifacts artifacts]

Builds bench/onnx_quantizers.toml with doit (entries shared with the default recipe are reused),
then prints one Markdown table from the manifests, and the environments under artifacts/envs/
with their build time and size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "bench" / "onnx_quantizers.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), f"recipe={RECIPE}",
           f"artifacts={args.artifacts}"]  # fmt: skip
    if subprocess.run(cmd, cwd=ROOT).returncode:
        raise SystemExit("the bench recipe did not build")
    sys.path.insert(0, str(ROOT))
    from tasks.envs import managed_envs
    from tasks.recipe import load_recipe
    from tasks.staging import disk_usage
    from tasks.store import read_manifest

    links = args.artifacts / RECIPE.stem
    recipe = load_recipe(RECIPE)
    print(
        "| step | quantizer | size MB | perplexity | Δ ppl vs fp32 | max abs Δlogit vs fp32 |"
        " 1st token ms | decode tok/s (ort) | decode tok/s (genai) | quantize s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for step in recipe.of_stage("evaluate"):
        m = read_manifest(links / "evaluate" / step.name)["metrics"]
        base = base or m["perplexity"]
        source = recipe.steps[step.source]
        algorithm = source.spec.algorithm or "fp32 capture"
        built = read_manifest(links / Path(*step.source.split(".", 1)))
        diff = built["metrics"].get("max_abs_logit_diff") if source.stage == "quantize" else None
        print(
            f"| {step.source} | {algorithm} | {m['size_bytes'] / 1e6:.1f} | {m['perplexity']:.2f} | "
            f"{m['perplexity'] / base - 1:+.1%} | {'-' if diff is None else f'{diff:.3g}'} | "
            f"{m['first_token_ms']:.0f} | {m['decode_tokens_per_s']:.1f} | "
            f"{m.get('genai_decode_tokens_per_s', 0):.1f} | {built['timings']['seconds']:.1f} |"
        )
    print("\n| environment | build s | size MB | key |")
    print("|---|---:|---:|---|")
    for key, folder in managed_envs(args.artifacts).items():
        marker = json.loads((folder / "ENV.json").read_text())
        print(f"| {folder.name} | {marker.get('build_seconds', '?')} | "
              f"{disk_usage(folder) / 1e6:.0f} | {key[:16]}... |")  # fmt: skip


if __name__ == "__main__":
    main()
