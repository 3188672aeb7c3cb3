"""What the Hugging Face weight quantizers (rtn, gptq, awq, quarot) share: the common recipe
keys (and GPTQ's, which quarot takes too), their checks, and the run that streams the model
through tasks.quant.layerwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tasks.config import (
    ConfigValueError,
    PowerOfTwo,
    StageConfig,
    option,
    refuse_inapplicable,
    stage_config,
)
from tasks.errors import StageError
from tasks.stages import HF, StageSpec, StepContext

if TYPE_CHECKING:
    import torch

    from tasks.quant.layerwise import Handler
    from tasks.quant.primitives import QuantSpec

LIBRARIES = ("torch", "transformers", "safetensors")
NEEDS = {"torch": "pip install modelkiln", "safetensors": "pip install modelkiln"}
CALIBRATING = 'an algorithm that calibrates (gptq, awq; quarot with weight_quantizer = "gptq")'
# No -1 (one group per output channel): onnxruntime's MatMulNBits fails to load it, so
# write_quantized refuses it, and a recipe should not find out after the whole run.
GROUP_SIZE = PowerOfTwo(
    16, why="onnxruntime's MatMulNBits block sizes; -1, per output channel, does not load there",
    divides="the model's layer widths",
)  # fmt: skip


@stage_config
class HFQuantConfig(StageConfig):
    """Keys every Hugging Face quantizer takes."""

    bits: Literal[2, 3, 4, 8] = option(4, "bits per weight")
    group_size: int = option(128, "input columns sharing a scale", rule=GROUP_SIZE)
    sym: bool = option(True, "symmetric (zero point fixed at the middle) or asymmetric")
    data: str = option("", "calibration data set: a [data.<name>] table (its train split)")
    num_samples: int = option(16, "calibration sequences", ge=1)
    seq_len: int = option(512, "tokens per calibration sequence", ge=16)
    modules_to_not_convert: tuple[str, ...] = option(
        ("lm_head",), "modules left in float (names or suffixes)"
    )
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", "where to run: auto takes a GPU when there is one"
    )
    eval_tokens: int = option(4096, "held-out tokens to score the result on (0: skip)")

    # Settings that only some algorithms, or some values of other settings, read: given where
    # they are not read, they are refused (tasks.config.refuse_inapplicable).
    NARROW_SETTINGS = (
        ("num_samples", lambda c: c.needs_data(), CALIBRATING),
        ("seq_len", lambda c: c.needs_data(), CALIBRATING),
        ("eval_tokens", lambda c: bool(c.data), "a step with data (it scores the result)"),
        ("data", lambda c: c.needs_data() or c.eval_tokens > 0,
         "an algorithm that calibrates, or to scoring the result (eval_tokens > 0)"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        if "lm_head" not in self.modules_to_not_convert:
            raise ConfigValueError(
                "modules_to_not_convert", "the LM head is always kept in float here",
                'keep "lm_head" in the list',
            )  # fmt: skip
        if self.needs_data() and not self.data:
            raise ConfigValueError(
                "data",
                "this algorithm needs calibration data",
                'set data = "<name of a [data.<name>] table>"',
            )
        refuse_inapplicable(self, self.NARROW_SETTINGS)

    def needs_data(self) -> bool:
        return True

    def spec(self) -> QuantSpec:
        from tasks.quant.primitives import QuantSpec

        return QuantSpec(self.bits, self.group_size, self.sym)


@stage_config
class GptqSettings(HFQuantConfig):
    """GPTQ's keys: the gptq algorithm's, and quarot's when GPTQ quantizes the rotated weights."""

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


def hf_spec(
    algorithm: str, config: type, run: Any, doc: str, version: str = "1", calibrated: bool = True
) -> StageSpec:
    """calibrated: sums over calibration tokens, whose bits follow the CPU's kernels (RTN's
    rounding is exact on any CPU)."""
    return StageSpec(
        stage="quantize", algorithm=algorithm, version=version, config=config, run=run, doc=doc,
        inputs=(HF,), output=HF, libraries=LIBRARIES, needs=NEEDS, data_fields=("data",),
        isa_dependent=calibrated,
    )  # fmt: skip


def check_group_size(src: Path, config: HFQuantConfig) -> None:
    """Every decoder linear's in_features must be a multiple of group_size: say which layer
    does not divide, and which group sizes would work, before any weight is loaded."""
    cfg = json.loads((src / "config.json").read_text())
    widths = {"hidden_size (q, k, v, gate, up)": cfg["hidden_size"],
              "intermediate_size (down_proj)": cfg["intermediate_size"]}  # fmt: skip
    heads = cfg["num_attention_heads"]
    # head_dim may be present but null.
    widths["o_proj"] = (cfg.get("head_dim") or cfg["hidden_size"] // heads) * heads
    for what, width in widths.items():
        if width % config.group_size:
            fits = [g for g in (16, 32, 64, 128, 256) if all(w % g == 0 for w in widths.values())]
            fix = (
                f"use group_size = {' or '.join(map(str, fits))}"
                if fits
                else "no power-of-two group size >= 16 divides every layer's width: "
                "this model cannot be written in a layout onnxruntime loads"
            )
            raise StageError(
                f"group_size {config.group_size} does not divide {what} = {width}", fix=fix
            )


def calibration_ids(src: Path, data_dir: Path, config: HFQuantConfig) -> torch.Tensor:
    """num_samples windows of seq_len tokens, evenly spread over the data set's train split."""
    import torch
    from transformers import AutoTokenizer

    from tasks.formats.text import read_text
    from tasks.stages.quantize.windows import calibration_windows

    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = tokenizer(read_text(data_dir, "train"), add_special_tokens=False, verbose=False).input_ids
    return torch.tensor(calibration_windows(ids, config.num_samples, config.seq_len))


def run_quantizer(config: HFQuantConfig, ctx: StepContext, handler: Handler, layout: str,
                  extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Stream the model through the handler, write the packed checkpoint, measure it."""
    from tasks.quant.checkpoint import check_layout, pack_linear, write_quantized
    from tasks.quant.layerwise import quantize_layerwise
    from tasks.quant.memory import PeakMemory
    from tasks.runtimes.torch_lm import pick_device

    assert ctx.input is not None
    check_group_size(ctx.input, config)
    try:
        check_layout(layout, config.spec())
    except ValueError as err:
        raise StageError(str(err)) from None
    device = pick_device(config.device)
    calibration = (
        calibration_ids(ctx.input, ctx.data[config.data], config) if handler.needs_data else None
    )
    with PeakMemory(device) as peak:
        floats, quantized, model_config, report = quantize_layerwise(
            ctx.input,
            handler,
            calibration,
            device,
            lambda it, desc, n: ctx.progress(it, desc, n),
            keep_float=config.modules_to_not_convert,
            finish=lambda q: pack_linear(q, layout),  # pack each layer at once: less memory
        )
        count = len(quantized)
        try:
            write_quantized(ctx.out, model_config, floats, quantized, layout, config.spec(), extra)
        except ValueError as err:  # a combination no runtime would read back correctly
            raise StageError(str(err)) from None
    _copy_tokenizer(ctx.input, ctx.out)
    metrics = {"device": device.type, "layout": layout, "seconds_per_layer": report.seconds_per_layer,
               "quantized_linears": count, "numerics": numerics(device), **peak.metrics()}  # fmt: skip
    if config.data and config.eval_tokens:
        from tasks.runtimes.perplexity import heldout_perplexity

        metrics |= heldout_perplexity(
            ctx.out, ctx.data[config.data], ctx, max_tokens=config.eval_tokens
        )
        ctx.log(f"held-out perplexity {metrics['perplexity']:.3f}")
    return metrics


def numerics(device: torch.device) -> dict[str, Any]:
    """What the weights' bits can depend on besides the key (docs/design.md, "Reproducible
    bytes"): not the thread count (tasks.quant.threads), but the kernels torch picks for this
    CPU's instruction set and the BLAS it was built with, or the GPU and its CUDA."""
    import re

    import torch

    blas = re.search(r"Math Kernel Library Version ([\d.]+)", torch.__config__.show())
    out: dict[str, Any] = {
        "device": device.type,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": f"mkl {blas.group(1)}" if blas else "other",
    }
    if device.type == "cuda":
        out |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    skip = {"config.json", "model.safetensors.index.json"}
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in skip:
            shutil.copy2(path, dst / path.name)
