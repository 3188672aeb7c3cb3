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

from dataclasses import dataclass
from typing import Any

from tasks.config import ConfigValueError, option
from tasks.stages import StepContext
from tasks.stages.quantize.hf_common import HFQuantConfig, hf_spec, run_quantizer


@dataclass(frozen=True, kw_only=True)
class Config(HFQuantConfig):
    """GPTQ on every decoder linear, layer by layer; the GPTQ checkpoint layout (v1)."""

    sym: bool = option(False, "symmetric (zero point fixed at the middle) or asymmetric")
    damp_percent: float = option(0.01, "Hessian dampening, as a fraction of its mean diagonal")
    act_order: bool = option(True, "quantize columns by decreasing activation size (desc_act)")
    static_groups: bool = option(
        True,
        "with act_order: groups keep their columns and scales are fixed up front, so the "
        "checkpoint needs no g_idx permutation (and asymmetric zero points convert to ONNX)",
    )
    true_sequential: bool = option(True, "within a layer, quantize q/k/v, o, gate/up, down in turn")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp_percent < 1:
            raise ConfigValueError(
                "damp_percent", f"{self.damp_percent} is not in (0, 1)", "use 0.01 to 0.1"
            )
        if self.act_order and not self.static_groups and not self.sym:
            raise ConfigValueError(
                "act_order", "act_order with sym = false does not survive conversion to ONNX "
                "(onnxruntime's MatMulNBits ignores zero points when g_idx is present)",
                "set static_groups = true, sym = true, or act_order = false",
            )  # fmt: skip


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from tasks.quant.handlers import Gptq

    handler = Gptq(config.spec(), config.damp_percent, config.act_order, config.true_sequential,
                   config.static_groups)  # fmt: skip
    extra = {"damp_percent": config.damp_percent, "true_sequential": config.true_sequential,
             "static_groups": config.static_groups}  # fmt: skip
    return run_quantizer(config, ctx, handler, "gptq", extra)


# 2: config.json no longer names the input's path (_name_or_path).
SPEC = hf_spec(
    "gptq", Config, run, "GPTQ weight quantization, layer by layer (GPTQ layout)", version="2"
)
