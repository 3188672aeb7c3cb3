"""ONNX Runtime dynamic quantization: int8 weights, activations quantized at run time.

```toml
[quantize.int8]
algorithm = "ort-dynamic"
from = "capture.fp32"
per_channel = false
```
"""

from __future__ import annotations

from typing import Any, Literal

from tasks.config import ConfigValueError, option, stage_config
from tasks.stages import StepContext
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
    """Dynamic int8 quantization of MatMul weights (QOperator: MatMulInteger)."""

    op_types: tuple[Literal["MatMul", "Gather"], ...] = option(
        ("MatMul",), "ONNX op types to quantize (Gather: the embedding table)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "op_types", tuple(sorted(set(self.op_types))))
        if "MatMul" not in self.op_types:  # the step exists to quantize the MatMuls
            raise ConfigValueError(
                "op_types", f"{list(self.op_types)} leaves out MatMul", 'use ["MatMul", "Gather"]'
            )


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DynamicQuantizeLinear takes float32 only: another input's output would not load.
    src = fp32_source(ctx, "ort-dynamic")
    dst = ctx.out / src.name
    ctx.log(f"quantizing {src.name} to dynamic {config.weight_type}")
    with work_copy(ctx) as model:  # it writes a shape-inferred copy beside the model it reads
        quantize_dynamic(
            model,
            dst,
            weight_type=QuantType.QInt8 if config.weight_type == "int8" else QuantType.QUInt8,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            op_types_to_quantize=list(config.op_types),
            nodes_to_exclude=match_nodes(src, config.nodes_to_exclude),
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
    return finish_quantized(ctx, "MatMulInteger")


SPEC = onnx_quantizer_spec("ort-dynamic", Config, run, "ONNX Runtime dynamic int8 quantization")
