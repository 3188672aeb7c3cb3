"""Our GPTQ and AWQ against llm-compressor's GPTQModifier and AWQModifier on SmolLM2-135M.

    python bench/peers.py [--artifacts artifacts] [--samples 16] [--seq-len 512] [--threads 1]

W4A16, group 64, asymmetric, lm_head in float, for both. llm-compressor pins a transformers
and compressed-tensors of its own, so it runs in a virtual environment of its own, built once
under artifacts/envs/bench-llmcompressor/ (rebuilt when REQUIREMENTS change). Both sides take
the same calibration windows (`calibration_ids`) and score the same held-out windows
(`text_perplexity`): the driver imports those two functions from this repository, which need
only numpy and a tokenizer. The peer is scored fake-quantized in memory right after oneshot;
ours from its packed checkpoint, dequantized. Peer time is oneshot alone; ours is the whole
step (streaming the model in, quantizing, writing the checkpoint).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ("torch==2.13.0", "llmcompressor==0.14.0.1")

DRIVER = """
import json, sys, time
from pathlib import Path
from types import SimpleNamespace
root, model_dir, data_dir, samples, seq_len, threads = json.loads(sys.argv[1])
sys.path.insert(0, root)
import torch
torch.set_num_threads(threads)
import compressed_tensors, llmcompressor, transformers
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, forward_quantize
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from transformers import AutoModelForCausalLM, AutoTokenizer
from tasks.stages import StepContext
from tasks.formats.text import read_text
from tasks.runtimes.perplexity import text_perplexity
from tasks.stages.quantize.hf_common import calibration_ids

# AWQ pins its cached activations for faster copies to a GPU; a CPU-only torch raises
# "Cannot access accelerator device" there. Nothing needs pinning on a CPU.
IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
print("VERSIONS " + json.dumps({m.__name__: m.__version__ for m in
      (torch, transformers, llmcompressor, compressed_tensors)}), flush=True)

model_dir, data_dir = Path(model_dir), Path(data_dir)
ids = calibration_ids(model_dir, data_dir, SimpleNamespace(num_samples=samples, seq_len=seq_len))
calibration = Dataset.from_dict({"input_ids": ids.tolist(),
                                 "attention_mask": torch.ones_like(ids).tolist()})
tokenizer = AutoTokenizer.from_pretrained(model_dir)
heldout = read_text(data_dir, "heldout")
ctx = StepContext(task="peer", out=Path("."), artifacts=Path("."))


def groups():  # W4A16_ASYM (4-bit, asymmetric, groups of 128) with groups of 64
    weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=64,
                               symmetric=False)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


RECIPES = {
    "GPTQ": lambda: GPTQModifier(config_groups=groups(), ignore=["lm_head"]),
    "AWQ": lambda: [AWQModifier(), QuantizationModifier(config_groups=groups(),
                                                        ignore=["lm_head"])],
}


class Runner:
    def __init__(self, model):
        self.model = model

    def logits(self, window):
        with torch.inference_mode():
            return self.model(torch.tensor([window])).logits[0].float().numpy()


for method, recipe in RECIPES.items():
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    started = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=calibration, recipe=recipe(),
            num_calibration_samples=len(ids), max_seq_length=seq_len,
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # the weight its forward uses: at most 16 levels per group
        used = forward_quantize(q, q.weight, "weight", q.quantization_scheme.weights)
    levels = max(g.unique().numel() for g in used.reshape(-1, 64)[:64])
    ppl = text_perplexity(Runner(model.eval()), tokenizer, heldout, 512, 4096, ctx)
    print("RESULT " + json.dumps({"method": method, "perplexity": ppl["perplexity"],
          "seconds": seconds, "status": str(getattr(q, "quantization_status", None)),
          "max_levels_per_group": levels}), flush=True)
"""


def peer_env(artifacts: Path) -> Path:
    """The virtual environment's python, installing it when missing or out of date."""
    env = (artifacts / "envs" / "bench-llmcompressor").resolve()
    python, marker, want = env / "bin" / "python", env / "requirements.txt", " ".join(REQUIREMENTS)
    if python.is_file() and marker.is_file() and marker.read_text() == want:
        print(f"llm-compressor env: {env} (cached)", file=sys.stderr)
        return python
    shutil.rmtree(env, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True)
    marker.write_text(want)
    print(f"llm-compressor env: installed {want} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)  # fmt: skip
    return python


def run_peer(python: Path, model: Path, data: Path, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="kiln-peer-") as tmp:
        (Path(tmp) / "driver.py").write_text(DRIVER)
        argv = json.dumps([str(ROOT), str(model), str(data), args.samples, args.seq_len,
                           args.threads])  # fmt: skip
        proc = subprocess.run([str(python), "driver.py", argv], cwd=tmp, capture_output=True,
                              text=True)  # fmt: skip
    results = []
    for line in proc.stdout.splitlines():
        if line.startswith("VERSIONS "):
            print(f"llm-compressor env: {line[9:]}", file=sys.stderr)
        elif line.startswith("RESULT "):
            results.append(json.loads(line[7:]))
            print(f"  {results[-1]}", file=sys.stderr, flush=True)
    if proc.returncode or len(results) < 2:
        raise SystemExit(f"llm-compressor driver failed:\n{proc.stderr[-4000:]}")
    return results


def load_bench_quantize():
    spec = importlib.util.spec_from_file_location("bench_quantize", ROOT / "bench" / "quantize.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, every process")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads, here and children
    model = (args.artifacts / "default" / "model").resolve()
    data = (args.artifacts / "default" / "data" / "botchan").resolve()
    if not all(p.with_name(f"{p.name}.json").is_file() for p in (model, data)):  # manifests
        raise SystemExit("build the default recipe's model and data first: doit model data")
    peers = run_peer(peer_env(args.artifacts), model, data, args)
    bench = load_bench_quantize()
    work = Path(tempfile.mkdtemp(prefix="kiln-peers-"))
    started = time.perf_counter()
    rows = [("FP", "float32", bench.float_perplexity(model, data), time.perf_counter() - started)]
    for peer in peers:
        alg = peer["method"].lower()
        table = {"bits": 4, "group_size": 64, "sym": False, "data": "botchan",
                 "num_samples": args.samples, "seq_len": args.seq_len, "eval_tokens": 0}  # fmt: skip
        m = bench.run_child(alg, table, model, data, work / alg)
        ppl = bench.float_perplexity(work / alg, data)  # held-out perplexity of any HF folder
        print(f"  ours {alg}: {ppl:.3f} in {m['seconds']:.0f} s", file=sys.stderr, flush=True)
        rows.append((peer["method"], "modelkiln", ppl, m["seconds"]))
        rows.append((peer["method"], "llm-compressor", peer["perplexity"], peer["seconds"]))
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nSmolLM2-135M, W4A16 asymmetric, group 64, lm_head in float; calibration "
          f"{args.samples} x {args.seq_len} tokens of the Botchan train split; perplexity on "
          f"4,096 held-out tokens; {args.threads} torch thread(s)\n")  # fmt: skip
    print("| method | implementation | perplexity | vs FP | ours vs peer | time s |")
    print("|---|---|---:|---:|---:|---:|")
    fp = rows[0][2]
    for i, (name, impl, ppl, seconds) in enumerate(rows):
        versus = f"{ppl / rows[i + 1][2] - 1:+.1%}" if impl == "modelkiln" else "-"
        print(f"| {name} | {impl} | {ppl:.2f} | {ppl / fp - 1:+.1%} | {versus} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
