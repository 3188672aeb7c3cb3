"""Capture: a Hugging Face causal LM -> an ONNX model folder.

With `ort_genai` (the default) onnxruntime-genai's model builder writes the folder, genai_config
included; otherwise `torch.onnx.export` (dynamo) writes a plain decoder with the builder's
input and output names. Either way the output is proved against the PyTorch model it came from.

```toml
[capture.fp32]
ort_genai = true
precision = "fp32"         # "fp16" | "int4" ; a GPTQ/AWQ input needs "int4"
execution_provider = "cpu"
```
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.config import ConfigValueError, option
from tasks.errors import StageError
from tasks.stages import HF, ONNX, StageSpec, StepContext
from tasks.stages.onnx_run import check_onnx_against, prompt_ids, torch_logits

# Bits onnxruntime's MatMulNBits, which the builder re-packs quantized checkpoints into, takes.
NBITS = (2, 4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
LOG_TAIL_LINES = 40


@dataclass(frozen=True, kw_only=True)
class Config:
    """How to turn the Hugging Face model into ONNX."""

    ort_genai: bool = option(True, "use onnxruntime-genai's model builder (else torch.onnx)")
    precision: Literal["fp32", "fp16", "int4"] = option("fp32", "weights' precision (builder)")
    execution_provider: Literal["cpu", "cuda"] = option("cpu", "provider the builder targets")
    int4_block_size: int = option(32, "int4 block size: 16, 32, 64, 128 or 256 (builder)")
    int4_accuracy_level: int = option(
        4, "int4 MatMul compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8 (builder)"
    )
    extra_options: tuple[str, ...] = option((), "more builder --extra_options, 'key=value'")

    def __post_init__(self) -> None:
        if self.int4_block_size not in BLOCK_SIZES:
            raise ConfigValueError(
                "int4_block_size",
                f"{self.int4_block_size} is not a block size MatMulNBits takes",
                f"use one of {', '.join(map(str, BLOCK_SIZES))}",
            )
        if self.int4_accuracy_level not in range(5):
            raise ConfigValueError(
                "int4_accuracy_level", f"{self.int4_accuracy_level} is not 0 to 4", "use 4 (int8)"
            )
        for item in self.extra_options:
            if "=" not in item:
                raise ConfigValueError(
                    "extra_options", f"{item!r} is not 'key=value'", 'e.g. ["exclude_embeds=true"]'
                )
        if not self.ort_genai and self.precision != "fp32":
            raise ConfigValueError(
                "precision",
                f"{self.precision!r} needs the model builder; torch.onnx export writes fp32",
                "set ort_genai = true, or quantize the fp32 capture with a quantize step",
            )


def check_quantization(hf_dir: Path, config: Config) -> dict[str, Any] | None:
    """The input's quantization_config, refused where the builder cannot take it."""
    path = hf_dir / "config.json"
    quant = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    if quant is None:
        return None
    bits = quant.get("bits")
    if bits not in NBITS:
        raise StageError(
            f"{path}: quantization_config.bits = {bits!r}; the builder's MatMulNBits takes "
            f"{', '.join(map(str, NBITS))} bits: quantize with one of those"
        )
    if not config.ort_genai:
        raise StageError(f"{path}: a quantized checkpoint needs ort_genai = true to capture")
    if config.precision != "int4":
        raise StageError(
            f"{path} is quantized ({quant.get('quant_method')}, {bits} bits) and the builder "
            f'fails on it with precision = "{config.precision}": set precision = "int4"'
        )
    return quant


def builder_command(config: Config, hf_dir: Path, out: Path, cache: Path) -> list[str]:
    extra = list(config.extra_options)
    if config.precision == "int4":
        extra += [
            f"block_size={config.int4_block_size}",
            f"accuracy_level={config.int4_accuracy_level}",
        ]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir)]
    cmd += ["-o", str(out), "-p", config.precision, "-e", config.execution_provider]
    cmd += ["-c", str(cache)]
    return cmd + (["--extra_options", *extra] if extra else [])


def run_builder(config: Config, ctx: StepContext, hf_dir: Path) -> None:
    """Run the builder in a subprocess: it prints freely and holds on to memory when imported."""
    log_path = ctx.out / "builder.log"
    # The cache holds the builder's temporary external data: never in the output.
    with tempfile.TemporaryDirectory(prefix="builder-cache-") as cache:
        cmd = builder_command(config, hf_dir, ctx.out, Path(cache))
        ctx.log(f"model builder: {config.precision} for {config.execution_provider}")
        with log_path.open("w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:  # the log stays in the failed step's directory for inspection
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        raise StageError(
            f"onnxruntime-genai's model builder failed (exit {done.returncode}) on {hf_dir}; "
            f"last lines of {log_path}:\n" + "\n".join(tail)
        )
    log_path.unlink()


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    assert ctx.input is not None
    check_quantization(ctx.input, config)
    if config.ort_genai:
        run_builder(config, ctx, ctx.input)
    else:
        from tasks.stages.torch_export import export_decoder

        ctx.log("torch.onnx export (dynamo)")
        export_decoder(ctx.input, ctx.out)
    ctx.log("checking the ONNX model against PyTorch")
    ids = prompt_ids(ctx.input)
    metrics = check_onnx_against(torch_logits(ctx.input, ids), ctx.out, ids)
    ctx.log(f"max |Δlogit| vs torch: {metrics['max_abs_logit_diff']:.3g}")
    return metrics


SPEC = StageSpec(
    stage="capture",
    algorithm=None,
    version="1",
    config=Config,
    run=run,
    doc="Hugging Face model -> ONNX (onnxruntime-genai builder or torch.onnx)",
    inputs=(HF,),
    output=ONNX,
    libraries=("onnxruntime-genai", "onnxruntime", "onnx", "onnxscript", "torch", "transformers"),
    needs={
        "onnxruntime": "pip install 'modelkiln[onnx]'",
        "onnxruntime_genai": "pip install 'modelkiln[onnx]'",
        "onnx_ir": "pip install 'modelkiln[onnx]'",
    },
)
