"""QuaRot: rotate the model's residual stream with randomised Hadamard matrices fused into its
weights (Ashkboos et al., 2024), then quantize the rotated weights with GPTQ or RTN. The rotation
removes outlier channels, so low-bit weights lose less.

```toml
[quantize.quarot-w3]
algorithm = "quarot"
bits = 3
group_size = 64
data = "botchan"
weight_quantizer = "gptq"
seed = 0
```
"""

from __future__ import annotations

import json
from typing import Any, Literal

from tasks.config import option, stage_config
from tasks.stages import StepContext
from tasks.stages.quantize.hf_common import GptqSettings, hf_spec, run_quantizer


@stage_config
class Config(GptqSettings):
    """Hadamard rotation fused into the weights, then GPTQ (or RTN); the GPTQ layout. The LM
    head and the embedding come out untied (the final norm is folded into the head)."""

    weight_quantizer: Literal["gptq", "rtn"] = option(
        "gptq", "how the rotated weights are quantized"
    )
    seed: int = option(0, "seed of the random signs of the Hadamard rotations")
    rotate_heads: bool = option(True, "also rotate each attention head's values (v_proj/o_proj)")

    # GPTQ's own settings apply only when GPTQ quantizes the rotated weights.
    NARROW_SETTINGS = GptqSettings.NARROW_SETTINGS + tuple(
        (key, lambda c: c.weight_quantizer == "gptq", 'weight_quantizer = "gptq"')
        for key in ("damp_percent", "act_order", "static_groups", "true_sequential")
    )

    def needs_data(self) -> bool:
        return self.weight_quantizer == "gptq"


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from tasks.quant.handlers import Gptq, Quarot, Rtn

    assert ctx.input is not None
    model = json.loads((ctx.input / "config.json").read_text())
    head_dim = model.get("head_dim") or model["hidden_size"] // model["num_attention_heads"]
    spec = config.spec()
    inner = (
        Gptq(
            spec,
            config.damp_percent,
            config.act_order,
            config.true_sequential,
            config.static_groups,
        )
        if config.weight_quantizer == "gptq"
        else Rtn(spec)
    )
    handler = Quarot(inner, model["hidden_size"], head_dim, config.seed, config.rotate_heads)
    extra = {"damp_percent": config.damp_percent, "true_sequential": config.true_sequential,
             "static_groups": config.static_groups}  # fmt: skip
    return run_quantizer(config, ctx, handler, "gptq", extra)


# 2: config.json no longer names the input's path (_name_or_path).
# 3: the same bytes whatever the thread count (Cholesky and X^T X on one thread); entries
#    built before may hold another thread count's bits, so they are built once more.
# 4: X^T X as a sum of 512-token products on the caller's threads (tasks/quant/threads.py):
#    as reproducible as 3, faster, and rounded differently.
SPEC = hf_spec(
    "quarot", Config, run, "QuaRot Hadamard rotation, then GPTQ or RTN (GPTQ layout)", version="4"
)
