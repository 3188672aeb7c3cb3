"""AWQ: activation-aware weight quantization (Lin et al., 2023). Salient input channels, found
from calibration activations, are scaled up before rounding and the scale folded into what
produces them, so the float model is unchanged and the rounding hurts them less.

```toml
[quantize.awq]
algorithm = "awq"
bits = 4
group_size = 64
data = "botchan"
```
"""

from __future__ import annotations

from typing import Any

from tasks.config import option, stage_config
from tasks.stages import StepContext
from tasks.stages.quantize.hf_common import HFQuantConfig, hf_spec, run_quantizer


@stage_config
class Config(HFQuantConfig):
    """AWQ scale search and weight clipping, then RTN. 4 bits: the AWQ GEMM layout; other
    widths: the GPTQ layout (AWQ's layout is 4-bit only)."""

    sym: bool = option(
        False, "symmetric (zero point fixed at the middle) or asymmetric (AWQ's zero_point)"
    )
    grid: int = option(
        20, "points of the scale search over alpha in [0, 1), and of the clip search", ge=2
    )
    duo_scaling: bool = option(
        True, "scales from activations and weights (false: activations only)"
    )
    clip: bool = option(True, "search a clipping range per weight group (not for q/k)")


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from tasks.quant.handlers import Awq

    handler = Awq(config.spec(), config.grid, config.duo_scaling, config.clip)
    layout = "awq" if config.bits == 4 else "gptq"
    return run_quantizer(config, ctx, handler, layout, {})


# 2: the searches measure errors through Gram matrices: the same losses, rounded differently,
# so a near tie can fall the other way (perplexity on the default recipe: 54.17 -> 54.27).
# 3: config.json no longer names the input's path (_name_or_path).
# 4: the same bytes whatever the thread count (Gram matrices and each loss's sum on one thread,
#    the clip error summed per row): losses rounded differently, so a near tie can fall the
#    other way; entries built before may hold another thread count's bits.
# 5: X^T X as a sum of 512-token products on the caller's threads (not one product on one
#    thread): the same bits on any thread count, and a Gram matrix rounded differently.
SPEC = hf_spec(
    "awq", Config, run, "AWQ activation-aware weight quantization (AWQ GEMM layout)", version="5"
)
