"""Intel Neural Compressor's weight-only quantization of an ONNX model: RTN, AWQ or GPTQ into
MatMulNBits (onnx-neural-compressor, in its own environment).

```toml
[quantize.inc-awq]
algorithm = "inc-weight-only"
from = "capture.fp32"
method = "awq"             # rtn | awq | gptq
bits = 4
block_size = 32
data = "botchan"           # calibration text (awq and gptq)
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from tasks.config import option, stage_config
from tasks.formats.genai import save_with_external_data
from tasks.runtimes.onnx import NBITS_BLOCK_SIZE
from tasks.stages import StepContext
from tasks.stages.quantize.inc_common import INC
from tasks.stages.quantize.onnx_calibration import TextCalibration, reader, token_windows
from tasks.stages.quantize.onnx_common import (
    finish_quantized,
    fp32_source,
    onnx_quantizer_spec,
    work_copy,
)


@stage_config
class Config(TextCalibration):
    """Weight-only quantization of MatMul weights into MatMulNBits with Intel's quantizer."""

    method: Literal["rtn", "awq", "gptq"] = option(
        "rtn", "rtn needs no data; awq and gptq calibrate"
    )
    bits: Literal[4, 8] = option(4, "bits per weight")
    block_size: int = option(32, "weights per scale", rule=NBITS_BLOCK_SIZE)
    sym: bool = option(True, "symmetric (no zero points)")
    accuracy_level: int = option(
        0, "MatMulNBits compute type: 0 default, 1 fp32, 4 int8", ge=0, le=4
    )
    quantize_lm_head: bool = option(False, "quantize the last MatMul (the LM head) too")

    def __post_init__(self) -> None:
        self.check_calibration(
            self.method != "rtn", self.method, 'remove data, or set method = "awq"'
        )


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from tasks.envs import call

    src = fp32_source(ctx, "Intel's ONNX quantizer")
    ctx.log(
        f"{config.method} {config.bits}-bit, block {config.block_size} (Intel Neural Compressor)"
    )
    windows = token_windows(config, ctx) if config.data else []
    with work_copy(ctx) as model:  # its calibration writes <model>_augment.onnx beside it
        call(INC, f"{__name__}:quantize_in_env", config, ctx,
             {"model": str(model), "windows": windows})  # fmt: skip
    return finish_quantized(ctx, "MatMulNBits") | {"source": src.name}


def quantize_in_env(
    config: Config, ctx: StepContext, model: str, windows: list[list[int]]
) -> dict[str, Any]:
    """Runs inside the inc environment."""
    from onnx_neural_compressor import data_reader
    from onnx_neural_compressor.quantization import algorithm_entry as algos
    from onnx_neural_compressor.quantization import config as inc_config

    assert ctx.input is not None
    common = {
        "weight_bits": config.bits,
        "weight_group_size": config.block_size,
        "weight_sym": config.sym,
        "accuracy_level": config.accuracy_level,
        "quant_last_matmul": config.quantize_lm_head,
    }
    if config.method == "rtn":
        result = algos.rtn_quantize_entry(model, inc_config.RTNConfig(**common))
    else:
        feeds = reader(data_reader.CalibrationDataReader, Path(model), ctx.input, windows)
        if config.method == "awq":
            result = algos.awq_quantize_entry(model, inc_config.AWQConfig(**common), feeds)
        else:
            result = algos.gptq_quantize_entry(model, inc_config.GPTQConfig(**common), feeds)
    save_with_external_data(getattr(result, "model", result), ctx.out / Path(model).name)
    return {}


SPEC = onnx_quantizer_spec(
    "inc-weight-only", Config, run, "Intel Neural Compressor weight-only RTN/AWQ/GPTQ (MatMulNBits)",
    INC, data_fields=("data",), version="2",  # 2: calibration windows as the HF quantizers pick them
)  # fmt: skip
