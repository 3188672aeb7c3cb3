"""Peak memory of GPTQ on a ~1B-parameter Llama, against the model's bf16 size on disk.

    python bench/rss_1b.py [--work DIR] [--samples 8] [--seq-len 256]

Random weights (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads / 4 KV heads,
intermediate 5632, vocab 32000) saved in bf16; then GPTQ w4g128 with random calibration
tokens, in a child process whose peak RSS (VmHWM) is its own. Memory is what is measured
here: random weights say nothing about quality.
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
import json, sys, time, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from tasks.quant.checkpoint import pack_linear, write_quantized
from tasks.quant.handlers import Gptq
from tasks.quant.layerwise import quantize_layerwise
from tasks.quant.primitives import QuantSpec
src, out, samples, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spec = QuantSpec(4, 128, False)
calibration = torch.randint(0, 32000, (samples, seq_len), generator=torch.Generator().manual_seed(0))
started = time.perf_counter()
floats, quantized, config, report = quantize_layerwise(
    Path(src), Gptq(spec, act_order=True, static_groups=True), calibration, torch.device("cpu"),
    lambda it, desc, n: it, finish=lambda q: pack_linear(q, "gptq"))
write_quantized(Path(out), config, floats, quantized, "gptq", spec)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - started, "peak_rss": hwm}}))
"""


def build_model(folder: Path) -> int:
    """A random TinyLlama-shaped model in bf16; returns its size on disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kiln-1b-"))
    model = work / "model"
    if not (model / "config.json").is_file():
        started = time.perf_counter()
        build_model(model)
        print(f"built the random model in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    bf16 = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    params = json.loads((model / "config.json").read_text())
    argv = [sys.executable, "-c", CHILD.format(root=str(ROOT)), str(model), str(work / "gptq"),
            str(args.samples), str(args.seq_len)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(lines[-1][7:])
    out = sum(p.stat().st_size for p in (work / "gptq").glob("*.safetensors"))
    print(
        "| model | layers | bf16 size GB | GPTQ w4g128 peak RSS GB | ratio | time s | output GB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| random Llama {params['hidden_size']}x{params['num_hidden_layers']} | "
          f"{params['num_hidden_layers']} | {bf16 / 1e9:.2f} | {result['peak_rss'] / 1e9:.2f} | "
          f"{result['peak_rss'] / bf16:.2f} | {result['seconds']:.0f} | {out / 1e9:.2f} |")  # fmt: skip
    print(f"\ncalibration: {args.samples} x {args.seq_len} random tokens; work dir {work}")


if __name__ == "__main__":
    main()
