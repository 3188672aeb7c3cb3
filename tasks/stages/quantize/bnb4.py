"""bitsandbytes-style 4-bit weights (NF4 or FP4) in ONNX: onnxruntime's MatMulBnb4.

```toml
[quantize.bnb4]
from = "capture.fp32"
quant_type = "nf4"
block_size = 64
```
"""

from __future__ import annotations

from typing import Any, Literal

from tasks.config import PowerOfTwo, option, stage_config
from tasks.formats.genai import model_file
from tasks.runtimes.onnx import require_provider, target_provider
from tasks.stages import StepContext
from tasks.stages.quantize.onnx_common import (
    NodeExclusion,
    finish_quantized,
    match_nodes,
    onnx_quantizer_spec,
)


@stage_config
class Config(NodeExclusion):
    """4-bit block-wise quantization of constant MatMul weights (MatMulBnb4)."""

    quant_type: Literal["nf4", "fp4"] = option("nf4", "4-bit NormalFloat or 4-bit float")
    # The kernels take power-of-two blocks of 16 or more (bitsandbytes uses 64).
    block_size: int = option(64, "weights per scale", rule=PowerOfTwo(16))


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    assert ctx.input is not None
    src = model_file(ctx.input)
    require_provider(target_provider(ctx.input))
    ctx.log(f"quantizing {src.name} to {config.quant_type}, block size {config.block_size}")
    quant_type = MatMulBnb4Quantizer.NF4 if config.quant_type == "nf4" else MatMulBnb4Quantizer.FP4
    quantizer = MatMulBnb4Quantizer(
        onnx.load(str(src)),
        quant_type,
        config.block_size,
        match_nodes(src, config.nodes_to_exclude),
    )
    quantizer.process()
    # External data (as <name>.data) keeps models over protobuf's 2 GB limit saveable.
    quantizer.model.save_model_to_file(str(ctx.out / src.name), use_external_data_format=True)
    return finish_quantized(ctx, "MatMulBnb4")


SPEC = onnx_quantizer_spec("bnb4", Config, run, "ONNX Runtime 4-bit NF4/FP4 weights (MatMulBnb4)")
