"""Round-to-nearest weight quantization: the baseline every calibrated method must beat.

```toml
[quantize.rtn-w4]
algorithm = "rtn"
bits = 4
group_size = 64
data = "botchan"          # optional here: only to score the result on held-out text
```
"""

from __future__ import annotations

from typing import Any

from tasks.config import option, stage_config
from tasks.stages import StepContext
from tasks.stages.quantize.hf_common import HFQuantConfig, hf_spec, run_quantizer


@stage_config
class Config(HFQuantConfig):
    """Group-wise RTN; needs no calibration data. Written in the GPTQ checkpoint layout."""

    sym: bool = option(False, "symmetric (zero point fixed at the middle) or asymmetric")

    def needs_data(self) -> bool:
        return False


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from tasks.quant.handlers import Rtn

    extra = {"true_sequential": False}
    return run_quantizer(config, ctx, Rtn(config.spec()), "gptq", extra)


# 2: config.json no longer names the input's path (_name_or_path).
SPEC = hf_spec(
    "rtn", Config, run, "round-to-nearest weight quantization (GPTQ layout)", version="2",
    calibrated=False,
)  # fmt: skip
