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

import json
from dataclasses import dataclass
from typing import Any, Literal

from tasks.config import ConfigValueError, option
from tasks.stages import StepContext
from tasks.stages.onnx_run import finish_quantized, fp32_source, onnx_quantizer_spec
from tasks.stages.quantize.inc_common import INC, save_model

BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits takes


@dataclass(frozen=True, kw_only=True)
class Config:
    """Weight-only quantization of MatMul weights into MatMulNBits with Intel's quantizer."""

    method: Literal["rtn", "awq", "gptq"] = option(
        "rtn", "rtn needs no data; awq and gptq calibrate"
    )
    bits: Literal[4, 8] = option(4, "bits per weight")
    block_size: int = option(32, "weights per scale: 16, 32, 64, 128 or 256")
    sym: bool = option(True, "symmetric (no zero points)")
    accuracy_level: int = option(0, "MatMulNBits compute type: 0 default, 1 fp32, 4 int8")
    quantize_lm_head: bool = option(False, "quantize the last MatMul (the LM head) too")
    data: str = option("", "awq/gptq: the [data.<name>] set whose train split calibrates")
    num_samples: int = option(8, "awq/gptq: calibration sequences")
    seq_len: int = option(256, "awq/gptq: tokens per calibration sequence")

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ConfigValueError(
                "block_size", f"{self.block_size} is not a block size MatMulNBits takes",
                f"use one of {', '.join(map(str, BLOCK_SIZES))}",
            )  # fmt: skip
        if self.accuracy_level not in range(5):
            raise ConfigValueError(
                "accuracy_level", f"{self.accuracy_level} is not 0 to 4", "use 0"
            )
        if self.method == "rtn" and self.data:
            raise ConfigValueError(
                "data", "rtn uses no calibration data", 'remove data, or set method = "awq"'
            )
        if self.method != "rtn" and not self.data:
            raise ConfigValueError(
                "data", f"{self.method} calibrates on data", 'set data = "<a [data.<name>] set>"'
            )
        for key in ("num_samples", "seq_len"):
            if getattr(self, key) < 1:
                raise ConfigValueError(
                    key, f"{getattr(self, key)} is not allowed", "make it 1 or more"
                )


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from tasks.envs import call

    src = fp32_source(ctx, "Intel's ONNX quantizer")
    ctx.log(
        f"{config.method} {config.bits}-bit, block {config.block_size} (Intel Neural Compressor)"
    )
    call(INC, f"{__name__}:quantize_in_env", config, ctx)
    return finish_quantized(ctx, "MatMulNBits") | {"source": src.name}


class _Windows:
    """Calibration feeds for the decoder: windows of the train split, with an empty cache."""

    def __init__(self, config: Config, ctx: StepContext) -> None:
        from tokenizers import Tokenizer

        from tasks.stages.onnx_folder import model_file
        from tasks.stages.onnx_run import decoder_dims, empty_past_feed, ort_session

        assert ctx.input is not None
        lines = (ctx.data[config.data] / "train.jsonl").read_text(encoding="utf-8").splitlines()
        text = "\n\n".join(json.loads(line)["text"] for line in lines if line.strip())
        tokenizer = Tokenizer.from_file(str(ctx.input / "tokenizer.json"))
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        step = max(config.seq_len, len(ids) // config.num_samples)
        windows = [ids[i : i + config.seq_len] for i in range(0, len(ids), step)]
        windows = [w for w in windows if len(w) == config.seq_len][: config.num_samples]
        session = ort_session(model_file(ctx.input), ["CPUExecutionProvider"])
        dims = decoder_dims(ctx.input)
        self.feeds = [empty_past_feed(session, w, dims) for w in windows]
        self.position = 0

    def get_next(self) -> dict | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def quantize_in_env(config: Config, ctx: StepContext) -> dict[str, Any]:
    """Runs inside the inc environment."""
    from onnx_neural_compressor import data_reader
    from onnx_neural_compressor.quantization import algorithm_entry as algos
    from onnx_neural_compressor.quantization import config as inc_config

    from tasks.stages.onnx_folder import model_file

    assert ctx.input is not None
    src = model_file(ctx.input)
    common = {
        "weight_bits": config.bits,
        "weight_group_size": config.block_size,
        "weight_sym": config.sym,
        "accuracy_level": config.accuracy_level,
        "quant_last_matmul": config.quantize_lm_head,
    }
    if config.method == "rtn":
        model = algos.rtn_quantize_entry(str(src), inc_config.RTNConfig(**common))
    else:
        reader_class = type("Reader", (_Windows, data_reader.CalibrationDataReader), {})
        reader = reader_class(config, ctx)
        if config.method == "awq":
            model = algos.awq_quantize_entry(str(src), inc_config.AWQConfig(**common), reader)
        else:
            model = algos.gptq_quantize_entry(str(src), inc_config.GPTQConfig(**common), reader)
    save_model(getattr(model, "model", model), ctx.out / src.name)
    return {}


SPEC = onnx_quantizer_spec(
    "inc-weight-only", Config, run, "Intel Neural Compressor weight-only RTN/AWQ/GPTQ (MatMulNBits)",
    INC, data_fields=("data",),
)  # fmt: skip
