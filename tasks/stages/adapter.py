"""A fine-tune's LoRA adapter as an onnxruntime adapter file for a shared ONNX base.

```toml
[adapter.awq-tone]
from = "finetune.awq-tone"
# base = "capture.awq-lora"   # optional: by default the recipe adds this capture step itself
```

The ONNX base is a capture of the fine-tune's base model with an empty LoRA input beside every
decoder projection (int4 MatMulNBits for a quantized base, the same integers as its checkpoint;
fp32 for a float one). It is its own step, keyed by the base model alone, so every adapter
trained on one base shares one ONNX model. This step writes `adapter.onnx_adapter`
(onnxruntime's adapter format: load it with `onnxruntime_genai.Adapters` and switch per
request) and `adapter.json`, and proves the pair against the PEFT model it came from.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from tasks.config import StageConfig, option, stage_config
from tasks.errors import RecipeError, StageError
from tasks.formats.finetune import ADAPTER_INFO, FINETUNE_INFO
from tasks.runtimes.onnx import ONNX_NEEDS
from tasks.stages import ONNX, ONNX_ADAPTER, PEFT, StageSpec, Step, StepContext, spec_for


@stage_config
class Config(StageConfig):
    """The ONNX form of one LoRA adapter."""

    base: str = option(
        "", "the capture step (with lora_slots = true) whose ONNX model the adapter plugs into; "
        "empty: the recipe adds capture.<base>-lora for the fine-tune's base model",
    )  # fmt: skip


def implied_base(step: Step, steps: dict[str, Step], file: str) -> tuple[Step, list[Step]]:
    """Complete an adapter step with its ONNX base: the capture of the fine-tune's base model
    with LoRA slots, added to the recipe unless the step names one."""
    finetune = steps.get(step.source)
    if finetune is None or finetune.stage != "finetune":
        what = (
            f"{step.source!r} is a {finetune.stage} step"
            if finetune
            else f"{step.source!r} names no step"
        )
        tunes = [r for r, s in steps.items() if s.stage == "finetune"]
        raise RecipeError(
            file, step.ref, f"an adapter is made from a fine-tune, but from = {what}",
            f"chain [finetune.<name>] from = \"{step.source}\" first, then set from = "
            f"\"finetune.<name>\" here" + (f" (fine-tunes here: {', '.join(tunes)})" if tunes else ""),
        )  # fmt: skip
    base_model = steps.get(finetune.source)
    if base_model is None:
        return step, []  # the dangling `from` is reported with the fine-tune
    if step.config.base:
        chosen = steps.get(step.config.base)
        if chosen and chosen.stage == "capture" and chosen.source != finetune.source:
            raise RecipeError(
                file, step.ref, f"base = {step.config.base!r} captures {chosen.source}, but "
                f"{finetune.ref} was trained on {finetune.source}",
                f"set base to a capture of {finetune.source} (or leave base out)",
            )  # fmt: skip
        if chosen and chosen.stage == "capture" and not chosen.config.lora_slots:
            raise RecipeError(
                file, step.ref, f"base = {step.config.base!r} has no LoRA inputs",
                f"set lora_slots = true in [{chosen.ref}] (or leave base out)",
            )  # fmt: skip
        return step, []
    quantized = base_model.stage == "quantize"
    # By the registry, not an import: a stage never imports a sibling stage.
    capture = spec_for("capture", None)
    config = capture.config(precision="int4" if quantized else "fp32", lora_slots=True)
    name = f"{base_model.name or 'model'}-lora"
    ref = f"capture.{name}"
    existing = steps.get(ref)
    if existing is not None and (existing.source, existing.config) != (finetune.source, config):
        raise RecipeError(
            file, step.ref, f"it needs {ref} to be the LoRA-ready capture of {finetune.source}, "
            f"but the recipe defines {ref} otherwise",
            f'rename [{ref}], or set base = "{ref}" here if it is meant as this base',
        )  # fmt: skip
    base_step = existing or Step("capture", name, capture, config, finetune.source, ())
    completed = dataclasses.replace(
        step, config=dataclasses.replace(step.config, base=ref), extra=(("base", ref),)
    )
    return completed, [base_step]


def onnx_logits_with_adapter(folder: Path, ids: list[int], adapter: Path | None) -> Any:
    """Logits [seq, vocab] of the ONNX base, with the adapter file active when given."""
    import numpy as np
    import onnxruntime as ort

    from tasks.formats.genai import model_file
    from tasks.runtimes.onnx import decoder_dims, empty_past_feed, ort_session

    session = ort_session(model_file(folder), ["CPUExecutionProvider"])
    options = ort.RunOptions()
    if adapter is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter))
        options.add_active_adapter(lora)
    feed = empty_past_feed(session, ids, decoder_dims(folder))
    (logits,) = session.run(["logits"], feed, options)
    return np.asarray(logits[0], dtype=np.float32)


def write_adapter_file(tensors: dict[str, Any], path: Path) -> None:
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    adapter.export_adapter(str(path))


def slot_dtype(base: Path) -> Any:
    import numpy as np

    decoder = json.loads((base / "genai_config.json").read_text())["model"]["decoder"]
    return np.float16 if "fp16" in json.dumps(decoder.get("session_options", {})) else np.float32


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from tasks.formats.genai import model_file
    from tasks.runtimes.onnx import compare_logits, prompt_ids
    from tasks.runtimes.torch_lm import load_peft_model, torch_logits_of
    from tasks.tune.onnx_lora import (
        ADAPTER_FILE,
        adapter_tensors,
        packed_widths,
        peft_pairs,
        read_slots,
    )

    assert ctx.input is not None
    base = ctx.steps["base"]
    info = json.loads((ctx.input / FINETUNE_INFO).read_text())
    hf_base = ctx.entry(info["base_key"])
    slots = read_slots(model_file(base))
    if not slots:
        raise StageError(f"{base} has no LoRA inputs: capture it with lora_slots = true")
    widths = packed_widths(json.loads((hf_base / "config.json").read_text()))
    tensors = adapter_tensors(peft_pairs(ctx.input), slots, widths, slot_dtype(base))
    write_adapter_file(tensors, ctx.out / ADAPTER_FILE)
    shutil.copy2(ctx.input / FINETUNE_INFO, ctx.out / FINETUNE_INFO)
    record = {"base_key": base.name, "adapter": ADAPTER_FILE, "finetune_key": ctx.input.name}
    (ctx.out / ADAPTER_INFO).write_text(json.dumps(record, indent=2) + "\n")
    ctx.log(f"{len(tensors) // 2} of {len(slots)} LoRA slots filled; checking against PEFT")

    ids = prompt_ids(base)
    model = load_peft_model(hf_base, ctx.input)
    with_adapter = compare_logits(
        torch_logits_of(model, ids), onnx_logits_with_adapter(base, ids, ctx.out / ADAPTER_FILE)
    )
    without = compare_logits(
        torch_logits_of(model, ids, adapter=False), onnx_logits_with_adapter(base, ids, None)
    )
    ctx.log(f"max |Δlogit| vs PEFT {with_adapter['max_abs_logit_diff']:.3g} "
            f"(base alone vs torch: {without['max_abs_logit_diff']:.3g})")  # fmt: skip
    return {
        "slots_filled": len(tensors) // 2,
        "adapter_bytes": (ctx.out / ADAPTER_FILE).stat().st_size,
        "vs_peft": with_adapter,
        "base_vs_torch": without,
    }


SPEC = StageSpec(
    stage="adapter",
    algorithm=None,
    version="1",
    config=Config,
    run=run,
    doc="LoRA adapter -> .onnx_adapter for a shared ONNX base with LoRA inputs",
    inputs=(PEFT,),
    output=ONNX_ADAPTER,
    libraries=("onnxruntime", "onnx", "numpy"),
    needs=ONNX_NEEDS | {"peft": "pip install 'modelkiln[finetune]'"},
    step_fields={"base": (ONNX,)},
    implies=implied_base,
)
