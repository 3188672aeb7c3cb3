"""Intel Neural Compressor's dynamic int8 quantization of an ONNX model (onnx-neural-compressor,
in its own environment).

```toml
[quantize.inc-int8]
algorithm = "inc-dynamic"
from = "capture.fp32"
per_channel = true
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import stage_config
from tasks.stages import StepContext
from tasks.stages.quantize.inc_common import INC
from tasks.stages.quantize.onnx_common import (
    Int8Settings,
    finish_quantized,
    fp32_source,
    match_nodes,
    onnx_quantizer_spec,
    work_copy,
)


@stage_config
class Config(Int8Settings):
    """Dynamic int8 quantization of MatMul weights with Intel's quantizer."""


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from tasks.envs import call

    src = fp32_source(ctx, "Intel's ONNX quantizer")
    exclude = match_nodes(src, config.nodes_to_exclude)
    ctx.log(f"quantizing {src.name} to dynamic {config.weight_type} (Intel Neural Compressor)")
    with work_copy(ctx) as model:
        call(INC, f"{__name__}:quantize_in_env", config, ctx,
             {"model": str(model), "exclude": exclude})  # fmt: skip
    return finish_quantized(ctx, "MatMulInteger")


def quantize_in_env(
    config: Config, ctx: StepContext, model: str, exclude: list[str]
) -> dict[str, Any]:
    """Runs inside the inc environment."""
    from onnx_neural_compressor.quantization import algorithm_entry
    from onnx_neural_compressor.quantization import config as inc_config
    from onnx_neural_compressor.quantization.quantize import quantize
    from onnxruntime.quantization import QuantType

    settings = inc_config.DynamicQuantConfig(
        weight_type=QuantType.QInt8 if config.weight_type == "int8" else QuantType.QUInt8,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        nodes_to_exclude=exclude,
        use_external_data_format=True,
        execution_provider="CPUExecutionProvider",
    )
    # onnx-neural-compressor 1.0 keeps reduce_range in its config but never hands it to the
    # quantizer (dynamic_quantize_entry makes its DynamicQuantizer without it, and that class
    # drops the argument anyway), so its int8 was full range whatever the recipe said, and
    # saturated on x86 without VNNI. The quantizer it makes is given the setting here.
    entry = algorithm_entry.quantizer
    made = entry.DynamicQuantizer

    class DynamicQuantizer(made):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.reduce_range = config.reduce_range

    entry.DynamicQuantizer = DynamicQuantizer
    try:
        quantize(model, str(ctx.out / Path(model).name), settings)
    finally:
        entry.DynamicQuantizer = made
    return {}


SPEC = onnx_quantizer_spec(
    "inc-dynamic", Config, run, "Intel Neural Compressor dynamic int8 quantization", INC,
    version="2",  # 2: reduce_range reaches the quantizer
)  # fmt: skip
