"""GPTQ: one-shot weight quantization that corrects each column's rounding error with the
inverse Hessian of the layer's calibration inputs (Frantar et al., 2022).

```toml
[quantize.gptq-w4]
algorithm = "gptq"
bits = 4
group_size = 64
data = "botchan"
damp_percent = 0.01
act_order = false
```
"""

from __future__ import annotations

from typing import Any

from tasks.config import stage_config
from tasks.stages import StepContext
from tasks.stages.quantize.hf_common import GptqSettings, hf_spec, run_quantizer


@stage_config
class Config(GptqSettings):
    """GPTQ on every decoder linear, layer by layer; the GPTQ checkpoint layout (v1)."""


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from tasks.quant.handlers import Gptq

    handler = Gptq(config.spec(), config.damp_percent, config.act_order, config.true_sequential,
                   config.static_groups)  # fmt: skip
    extra = {"damp_percent": config.damp_percent, "true_sequential": config.true_sequential,
             "static_groups": config.static_groups}  # fmt: skip
    return run_quantizer(config, ctx, handler, "gptq", extra)


# 2: config.json no longer names the input's path (_name_or_path).
# 3: the same bytes whatever the thread count (Cholesky and X^T X on one thread); entries
#    built before may hold another thread count's bits, so they are built once more.
# 4: X^T X as a sum of 512-token products on the caller's threads (tasks/quant/threads.py):
#    as reproducible as 3, faster, and rounded differently.
SPEC = hf_spec(
    "gptq", Config, run, "GPTQ weight quantization, layer by layer (GPTQ layout)", version="4"
)
