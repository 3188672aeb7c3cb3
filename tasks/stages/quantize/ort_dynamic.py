"""ONNX Runtime dynamic quantization: int8 weights, activations quantized at run time.

```toml
[quantize.int8]
algorithm = "ort-dynamic"
from = "capture.fp32"
per_channel = false
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tasks.config import option
from tasks.stages import ONNX, StageSpec, StepContext
from tasks.stages.onnx_folder import copy_sidecars, model_file


@dataclass(frozen=True, kw_only=True)
class Config:
    """Dynamic int8 quantization of MatMul weights (QOperator: MatMulInteger)."""

    weight_type: Literal["int8", "uint8"] = option("int8", "integer type of the weights")
    per_channel: bool = option(False, "one scale per output channel instead of per tensor")
    reduce_range: bool = option(False, "7-bit weights, for older x86 CPUs without VNNI")
    op_types: tuple[str, ...] = option(("MatMul",), "ONNX op types to quantize")


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert ctx.input is not None
    src = model_file(ctx.input)
    dst = ctx.out / src.name
    ctx.log(f"quantizing {src.name} to dynamic {config.weight_type}")
    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType.QInt8 if config.weight_type == "int8" else QuantType.QUInt8,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        op_types_to_quantize=list(config.op_types),
        use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},
    )
    copy_sidecars(ctx.input, ctx.out)
    return {}


SPEC = StageSpec(
    stage="quantize",
    algorithm="ort-dynamic",
    version="1",
    config=Config,
    run=run,
    doc="ONNX Runtime dynamic int8 quantization",
    inputs=(ONNX,),
    output=ONNX,
    libraries=("onnxruntime", "onnx"),
    needs={"onnxruntime": "pip install 'modelkiln[onnx]'"},
)
