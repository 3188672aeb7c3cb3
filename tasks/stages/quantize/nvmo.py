"""NVIDIA ModelOpt's ONNX quantization (nvidia-modelopt, in its own environment).

```toml
[quantize.nvmo-int4]
algorithm = "nvmo"
from = "capture.fp32"
mode = "int4"             # int4 | int8
method = "awq_clip"       # int4: awq_clip | rtn_dq; int8: entropy | max
block_size = 32           # int4: weights per scale
data = "botchan"          # awq_clip and int8 calibrate on its train split
```

int4 writes blocked int4 weights with a DequantizeLinear before each MatMul: onnxruntime runs
it on a CPU (and onnxruntime-genai, when the input was the builder's graph). int8 writes the
Q/DQ graph TensorRT wants; it runs on a CPU too, but slower than fp32 there. Refused up front,
with the method that would work: int4 `rtn` (its output does not load in onnxruntime's CPU
provider), and on the CPU `awq_lite` and `awq_full` (ModelOpt 0.47's numpy path crashes in
them). `device = "cuda"` calibrates on the GPU (onnxruntime-gpu, cupy) in an environment of its
own, where `awq_lite` and `awq_full` run; the output is checked on the CPU as always.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from tasks.config import ConfigValueError, option, refuse_inapplicable, stage_config
from tasks.envs import Environment
from tasks.errors import PreflightError, StageError
from tasks.runtimes.onnx import NBITS_BLOCK_SIZE
from tasks.stages import StepContext
from tasks.stages.quantize.onnx_calibration import TextCalibration, reader, token_windows
from tasks.stages.quantize.onnx_common import (
    NodeExclusion,
    finish_quantized,
    fp32_source,
    match_nodes,
    onnx_quantizer_spec,
    work_copy,
)

LOCKS = Path(__file__).with_name("locks")  # refreshed with tools/lock_envs.py

# Without the [onnx] extra: that pins onnx~=1.21 and pulls onnxruntime-gpu, which cannot live
# beside the CPU onnxruntime. The extra's ONNX helpers are pinned here by hand instead.
# torch is the CPU build, as the lock says: PyPI's Linux 2.13.0 is the CUDA one (its nvidia-*
# wheels are GBs a CPU never uses). It comes from https://download.pytorch.org/whl/cpu, not
# PyPI; the lock's hash is of the wheel this project was measured with (locked with
# --find-links /opt/wheels), and pip refuses any other file under that name.
MODELOPT = Environment(
    name="modelopt",
    requirements=(
        "nvidia-modelopt==0.47.0",
        "torch==2.13.0+cpu",  # imported by modelopt.onnx
        "numpy==2.4.6",
        "onnx==1.23.2",
        "onnxruntime==1.32.0",
        "onnx-graphsurgeon==0.6.1",
        "onnxconverter-common==1.16.0",
        "onnxscript==0.7.2",
        "onnxslim==0.1.98",
        "polygraphy==0.53.6",
        "ml_dtypes==0.6.0",
        "lief==1.0.0",
        "cppimport==26.4.17",  # builds its int4 packing extension on first use (needs g++)
        "setuptools-scm==10.3.4",  # builds cppimport, which has no wheel
    ),
    why="nvidia-modelopt[onnx] pins onnx~=1.21 and pulls onnxruntime-gpu",
    lock=LOCKS / "modelopt.txt",
    from_source=("cppimport",),
)
# device = "cuda": the [onnx] extra as ModelOpt pins it (onnxruntime-gpu, cupy); torch==2.13.0
# is PyPI's CUDA build. Its lock was only resolved (uv, from PyPI, for CPython 3.11 on Linux
# x86-64: every package has a wheel there but cppimport), never installed or run: there is no
# GPU here. Unchecked: torch 2.13.0 pulls CUDA 13 libraries (nvidia-*-cu13, cuda-toolkit 13)
# while cupy-cuda12x, and maybe onnxruntime-gpu 1.24.4, are CUDA 12 builds.
MODELOPT_CUDA = Environment(
    name="modelopt-cuda",
    requirements=(
        "nvidia-modelopt[onnx]==0.47.0",
        "torch==2.13.0",
        "numpy==2.4.6",
        "onnx==1.21.0",
        "onnxruntime-gpu==1.24.4",
        "cupy-cuda12x==14.2.0",
        "setuptools-scm==10.3.4",  # builds cppimport, which has no wheel
    ),
    why="ModelOpt's GPU calibration needs onnxruntime-gpu and cupy",
    lock=LOCKS / "modelopt-cuda.txt",
    from_source=("cppimport",),
)

METHODS = {"int4": ("awq_clip", "rtn_dq"), "int8": ("entropy", "max")}
GPU_ONLY = {
    "awq_lite": "ModelOpt 0.47's CPU (numpy) path crashes in it",
    "awq_full": "it runs awq_lite first, whose CPU (numpy) path crashes in ModelOpt 0.47",
}
NEVER = {"rtn": "its output does not load in onnxruntime's CPU provider"}
# ModelOpt's int4 blocks: MatMulNBits' sizes, and each must divide the MatMuls it quantizes
# (check_blocks_divide, at run time).
BLOCK_SIZE = replace(NBITS_BLOCK_SIZE, divides="each MatMul's input size")


@stage_config
class Config(TextCalibration, NodeExclusion):
    """ONNX -> ONNX quantization with NVIDIA ModelOpt."""

    mode: Literal["int4", "int8"] = option("int4", "int4 weights (DequantizeLinear) or int8 Q/DQ")
    method: str = option(
        "", "int4: awq_clip (calibrates; the default) or rtn_dq; int8: entropy (default) or max"
    )
    block_size: int = option(128, "int4: weights per scale", rule=BLOCK_SIZE)
    use_zero_point: bool = option(False, "int4: asymmetric blocks with zero points")
    device: Literal["cpu", "cuda"] = option(
        "cpu", "where ModelOpt calibrates: cuda adds awq_lite and awq_full", added=True
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.method:  # the mode's default, in the key as if written out
            object.__setattr__(self, "method", METHODS[self.mode][0])
        if self.method in NEVER:
            raise ConfigValueError(
                "method", f"{self.method!r} cannot be used: {NEVER[self.method]}",
                f"use one of {', '.join(METHODS['int4'])}",
            )  # fmt: skip
        if self.method in GPU_ONLY and self.device == "cpu":
            raise ConfigValueError(
                "method", f"{self.method!r} cannot run on the CPU: {GPU_ONLY[self.method]}",
                f"use one of {', '.join(METHODS['int4'])}, or set device = \"cuda\" on a "
                "machine with an NVIDIA GPU",
            )  # fmt: skip
        methods = METHODS[self.mode] + (tuple(GPU_ONLY) if self.mode == "int4" else ())
        if self.method not in methods:
            raise ConfigValueError(
                "method", f"{self.method!r} is not a method of mode {self.mode!r}",
                f"use one of {', '.join(METHODS[self.mode])}",
            )  # fmt: skip
        self.check_calibration(
            self.method != "rtn_dq", self.method, 'remove data, or set method = "awq_clip"'
        )
        refuse_inapplicable(self, INT4_ONLY)


# Settings of the int4 blocks: ModelOpt's int8 Q/DQ path does not read them.
INT4_ONLY = tuple(
    (key, lambda c: c.mode == "int4", 'mode = "int4"') for key in ("block_size", "use_zero_point")
)


def environment(config: Config) -> Environment:
    return MODELOPT_CUDA if config.device == "cuda" else MODELOPT


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from tasks.envs import call

    if config.device == "cuda":
        require_cuda()
    src = fp32_source(ctx, "ModelOpt")
    exclude = match_nodes(src, config.nodes_to_exclude)
    if config.mode == "int4":
        check_blocks_divide(src, config.block_size, set(exclude))
    windows = token_windows(config, ctx) if config.data else []
    what = f"block {config.block_size}" if config.mode == "int4" else "Q/DQ for TensorRT"
    ctx.log(f"{config.mode} {config.method}, {what} (NVIDIA ModelOpt)")
    with work_copy(ctx) as model:  # ModelOpt re-saves and annotates the model it reads
        done = call(environment(config), f"{__name__}:quantize_in_env", config, ctx,
                    {"model": str(model), "exclude": exclude, "windows": windows})  # fmt: skip
    return finish_quantized(ctx, "DequantizeLinear") | done | {"source": src.name}


def require_cuda() -> None:
    """Refuse before building a multi-GB environment on a machine without an NVIDIA GPU."""
    import shutil

    if shutil.which("nvidia-smi") is None:
        raise PreflightError(
            'device = "cuda" needs an NVIDIA GPU and its driver (no nvidia-smi here)',
            'set device = "cpu" (method awq_clip or rtn_dq), or build on a GPU machine',
        )


def check_blocks_divide(model: Path, block_size: int, exclude: set[str]) -> None:
    """Every MatMul weight's input size must be a multiple of the block size: say which is not,
    and which block sizes would do, before ModelOpt fails somewhere inside."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    sizes = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name not in exclude and node.input[1] in shapes:
            sizes[node.name] = shapes[node.input[1]][0]
    bad = {name: k for name, k in sizes.items() if k % block_size}
    if bad:
        name, k = next(iter(bad.items()))
        fits = [b for b in BLOCK_SIZE.sizes() if all(s % b == 0 for s in sizes.values())]
        raise StageError(
            f"block_size {block_size} does not divide the input size {k} of {name} "
            f"({len(bad)} MatMuls like it)",
            f"set block_size to one of {fits}",
        )


def register_builder_ops() -> None:
    """The onnxruntime-genai builder's graph uses SimplifiedLayerNormalization, which
    onnxruntime registers in the ONNX domain but onnx does not know; ModelOpt runs onnx's
    checker on its input, so the op's schema is registered first (onnxruntime runs the op)."""
    from onnx import defs

    if defs.has("SimplifiedLayerNormalization"):
        return
    param, attr = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    optional = defs.OpSchema.FormalParameterOption.Optional
    defs.register_schema(
        defs.OpSchema(
            "SimplifiedLayerNormalization", "", 1,
            inputs=[param("X", "T"), param("scale", "V")],
            outputs=[param("Y", "V"), param("inv_std_var", "U", param_option=optional)],
            type_constraints=[("T", floats, ""), ("V", floats, ""),
                              ("U", ["tensor(float)", "tensor(double)"], "")],
            attributes=[attr("axis", defs.OpSchema.AttrType.INT, "", required=False),
                        attr("epsilon", defs.OpSchema.AttrType.FLOAT, "", required=False),
                        attr("stash_type", defs.OpSchema.AttrType.INT, "", required=False)],
        )
    )  # fmt: skip


# On a CPU, ModelOpt logs an ERROR that it finds no NVIDIA driver, and onnxruntime's Q/DQ tools
# warn once per tensor of the builder's contrib ops: expected, and hundreds of lines.
KNOWN_NOISE = ("Failed to get GPU count", "failed to infer the type of tensor")


def _not_known_noise(record: Any) -> bool:
    return not any(text in record.getMessage() for text in KNOWN_NOISE)


def quantize_in_env(
    config: Config, ctx: StepContext, model: str, exclude: list[str], windows: list[list[int]]
) -> dict[str, Any]:
    """Runs inside the modelopt environment."""
    import logging

    import onnx
    from modelopt.onnx.quantization import quantize
    from onnxruntime.quantization import CalibrationDataReader

    from tasks.formats.genai import save_with_external_data

    assert ctx.input is not None
    register_builder_ops()
    for name in ("", "modelopt.onnx"):  # where those records are logged
        logging.getLogger(name).addFilter(_not_known_noise)
    work = Path(model).parent
    out = work / "quantized" / Path(model).name
    out.parent.mkdir()
    feeds = reader(CalibrationDataReader, Path(model), ctx.input, windows) if windows else None
    quantize(
        model, quantize_mode=config.mode, calibration_method=config.method,
        calibration_data_reader=feeds, output_path=str(out),
        calibration_eps=["cuda:0", "cpu"] if config.device == "cuda" else ["cpu"],
        use_external_data_format=True, block_size=config.block_size,
        use_zero_point=config.use_zero_point, high_precision_dtype="fp32",
        nodes_to_exclude=[f"^{re.escape(name)}$" for name in exclude] or None,
        log_level="WARNING",
    )  # fmt: skip
    if not out.is_file():
        raise StageError(f"ModelOpt wrote no model to {out}; its output is above")
    quantized = onnx.load(str(out))
    merged = merge_duplicate_initializers(quantized)
    save_with_external_data(quantized, ctx.out / Path(model).name)
    return {"merged_initializers": merged}


def merge_duplicate_initializers(model: Any) -> int:
    """ModelOpt's graph export gives every use of a shared initializer its own copy (the
    builder's tied embedding/LM head, the rotary caches of every layer: +170 MB on SmolLM2).
    Point every use at one copy of identical tensors; returns how many copies were dropped."""
    import hashlib

    from onnx import numpy_helper

    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        digest = hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest()
        same = (tensor.data_type, tuple(tensor.dims), digest)
        if same in first:
            rename[tensor.name] = first[same]
        else:
            first[same] = tensor.name
    if not rename:
        return 0
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    kept = [t for t in model.graph.initializer if t.name not in rename]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(rename)


SPEC = onnx_quantizer_spec(
    "nvmo", Config, run, "NVIDIA ModelOpt int4 (AWQ clip, RTN) or int8 Q/DQ", environment,
    data_fields=("data",), version="2",  # 2: calibration windows as the HF quantizers pick them
)  # fmt: skip
