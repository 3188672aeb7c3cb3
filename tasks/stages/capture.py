"""Capture: a Hugging Face causal LM -> an ONNX model folder.

With `ort_genai` (the default) onnxruntime-genai's model builder writes the folder, genai_config
included; otherwise `torch.onnx.export` (dynamo) writes a plain decoder with the builder's
input and output names. Either way the output is proved against the PyTorch model it came from.

```toml
[capture.fp32]
ort_genai = true
precision = "fp32"         # or "int4" (a GPTQ/AWQ input needs it); "fp16" with "cuda"
execution_provider = "cpu"
```
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from tasks import interrupt
from tasks.config import ConfigValueError, StageConfig, option, refuse_inapplicable, stage_config
from tasks.errors import StageError
from tasks.runtimes.onnx import (
    NBITS_BLOCK_SIZE,
    ONNX_EXTRA,
    ONNX_NEEDS,
    check_onnx_against,
    head_dims,
    prompt_ids,
    require_provider,
)
from tasks.runtimes.torch_lm import torch_logits
from tasks.stages import HF, ONNX, StageSpec, StepContext

# Bits onnxruntime's MatMulNBits, which the builder re-packs quantized checkpoints into, takes.
NBITS = (2, 4, 8)
LOG_TAIL_LINES = 40
# Builder extra options (and their deprecated int4_ aliases) that this step's own fields set.
INT4_KEYS = {"block_size": "int4_block_size", "accuracy_level": "int4_accuracy_level"}
INT4_KEYS |= {f"int4_{k}": v for k, v in INT4_KEYS.items()}
# Distributions that shape the output. onnx-ir: the builder writes its graph through it.
LIBRARIES = (
    "onnxruntime-genai",
    "onnxruntime",
    "onnx",
    "onnx-ir",
    "onnxscript",
    "torch",
    "transformers",
)
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"}


@stage_config
class Config(StageConfig):
    """How to turn the Hugging Face model into ONNX."""

    ort_genai: bool = option(True, "use onnxruntime-genai's model builder (else torch.onnx)")
    precision: Literal["fp32", "fp16", "int4"] = option("fp32", "weights' precision (builder)")
    execution_provider: Literal["cpu", "cuda"] = option("cpu", "provider the builder targets")
    int4_block_size: int = option(32, "int4 block size (builder)", rule=NBITS_BLOCK_SIZE)
    int4_accuracy_level: int | None = option(
        None,
        "int4 MatMul compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8; unset: 4 for a "
        "float input, 1 for a GPTQ/AWQ input (so it converts exactly) (builder)",
        ge=0,
        le=4,
    )
    extra_options: tuple[str, ...] = option(
        (),
        "more builder --extra_options, 'key=value'; a GPTQ/AWQ input gets "
        "nodes_to_exclude=/lm_head/MatMul and shared_embeddings=false (its float LM head and "
        "embedding stay float) unless set here",
    )

    lora_slots: bool = option(
        False, "add an empty LoRA input beside every decoder projection, for adapter steps "
        "(builder); the adapter stage adds such a capture by itself", added=True,
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.lora_slots and not self.ort_genai:
            raise ConfigValueError(
                "lora_slots", "needs the builder's graph names", "set ort_genai = true"
            )
        self._check_extra_options()
        refuse_inapplicable(self, NARROW_SETTINGS)
        if not self.ort_genai and (self.precision, self.execution_provider) != ("fp32", "cpu"):
            key = "precision" if self.precision != "fp32" else "execution_provider"
            raise ConfigValueError(
                key,
                f"{getattr(self, key)!r} is for the model builder; torch.onnx writes fp32",
                "set ort_genai = true, or quantize the fp32 capture in a quantize step",
            )
        # The builder writes fp16 for the CPU too, but onnxruntime-genai cannot run it there
        # (measured: a buffer-reuse failure in a Cast node) and the builder lists no FP16 CPU.
        if self.precision == "fp16" and self.execution_provider == "cpu":
            raise ConfigValueError(
                "precision",
                "fp16 does not run on the CPU in onnxruntime-genai",
                'use precision = "fp32" or "int4" on the CPU, or execution_provider = "cuda"',
            )

    def _check_extra_options(self) -> None:
        for item in self.extra_options:
            key = item.partition("=")[0].strip()
            if "=" not in item or not key:
                raise ConfigValueError(
                    "extra_options", f"{item!r} is not 'key=value'", 'e.g. ["exclude_embeds=true"]'
                )
            if key in INT4_KEYS:
                raise ConfigValueError(
                    "extra_options",
                    f"{key!r} is set by this step's own option",
                    f"set {INT4_KEYS[key]} instead",
                )


# Settings only the builder, or only its int4 precision, reads (torch.onnx has no options).
NARROW_SETTINGS = (
    ("int4_block_size", lambda c: c.precision == "int4", 'precision = "int4"'),
    ("int4_accuracy_level", lambda c: c.precision == "int4", 'precision = "int4"'),
    ("extra_options", lambda c: c.ort_genai, "the model builder (ort_genai = true)"),
)


def settings_for_quantized(config: Config) -> list[str]:
    """The settings a capture of a quantized checkpoint lacks: only the builder at int4 takes one."""
    needed = [] if config.ort_genai else ["ort_genai = true"]
    return needed + ([] if config.precision == "int4" else ['precision = "int4"'])


def check_quantization(hf_dir: Path, config: Config) -> dict[str, Any] | None:
    """The input's quantization_config, refused where the builder cannot take it."""
    path = hf_dir / "config.json"
    quant = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    if quant is None:
        return None
    bits = quant.get("bits")
    if bits not in NBITS:
        raise StageError(
            f"{path}: quantization_config.bits = {bits!r}; the builder's MatMulNBits takes "
            f"{', '.join(map(str, NBITS))} bits: quantize with one of those"
        )
    needed = settings_for_quantized(config)
    if needed:
        raise StageError(
            f"{path} is quantized ({quant.get('quant_method')}, {bits} bits): only the builder "
            'captures it, with precision = "int4"',
            fix=f"set {' and '.join(needed)}",
        )
    # GPTQ and AWQ store a packed linear as <name>.qweight, so <name>.weight is a float one.
    floats = float_projections(hf_dir) if quant.get("quant_method") in ("gptq", "awq") else []
    if floats:
        raise StageError(
            f"{hf_dir} is quantized ({quant.get('quant_method')}) but keeps "
            f"{len(floats)} decoder linears in float ({', '.join(floats[:4])}"
            f"{', ...' if len(floats) > 4 else ''}): the builder reads every decoder projection "
            "of a quantized checkpoint as packed and fails on a float one\n"
            "  fix: remove them from the quantize step's modules_to_not_convert (keep only "
            '"lm_head")'
        )
    return quant


# A decoder projection's weight; in a quantized checkpoint it should be <name>.qweight.
_PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w*proj\.weight$")


def float_projections(hf_dir: Path) -> list[str]:
    """Decoder projections (q/k/v/o, gate/up/down) a checkpoint holds as float weights, by
    module name, from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            names.update(f.keys())
    return sorted(
        (n.removesuffix(".weight") for n in names if _PROJECTION.match(n)),
        key=lambda n: (int(n.split(".")[2]), n),  # layer 2 before layer 10
    )


def quantized_defaults(config: Config, quant: dict[str, Any] | None) -> list[str]:
    """Extra options that make a GPTQ/AWQ checkpoint convert exactly, unless the step sets them:
    keep the float LM head in float (else the builder RTN-quantizes it), and keep a tied
    embedding float too (with tied embeddings the builder shares one int4 matrix for both:
    measured on SmolLM2's AWQ checkpoint, max |Δlogit| 3.5 and +1.3% perplexity)."""
    if quant is None:
        return []
    given = {item.partition("=")[0].strip() for item in config.extra_options}
    defaults = {"shared_embeddings": "false"}
    if not quant.get("lm_head"):
        defaults["nodes_to_exclude"] = "/lm_head/MatMul"
    return [f"{k}={v}" for k, v in defaults.items() if k not in given]


def builder_command(
    config: Config, hf_dir: Path, out: Path, cache: Path, quant: dict[str, Any] | None = None
) -> list[str]:
    """The builder's command line; `quant`: the input's quantization_config, if any."""
    extra = list(config.extra_options) + quantized_defaults(config, quant)
    if config.precision == "int4":
        # fp32 compute (1) reproduces a pre-quantized checkpoint's (q - z) * s; int8 (4) is faster.
        level = config.int4_accuracy_level
        level = level if level is not None else (1 if quant else 4)
        extra += [f"block_size={config.int4_block_size}", f"accuracy_level={level}"]
    cmd = interrupt.python_module(sys.executable, "onnxruntime_genai.models.builder")
    cmd += ["-i", str(hf_dir)]
    cmd += ["-o", str(out), "-p", config.precision, "-e", config.execution_provider]
    cmd += ["-c", str(cache)]
    return cmd + (["--extra_options", *extra] if extra else [])


def run_builder(
    config: Config, ctx: StepContext, hf_dir: Path, quant: dict[str, Any] | None = None
) -> None:
    """Run the builder in a subprocess: it prints freely and holds on to memory when imported."""
    log_path = ctx.out / "builder.log"
    # The cache holds the builder's temporary external data: never in the output. It lives in
    # the step's temporary directory, so a killed build leaves no stray copy behind in /tmp.
    cache = ctx.out / ".builder-cache"
    try:
        cmd = builder_command(config, hf_dir, ctx.out, cache, quant)
        ctx.log(f"model builder: {config.precision} for {config.execution_provider}")
        # Offline: the input is a local folder and only the model step touches the network.
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with log_path.open("w") as log:
            status = interrupt.run_child(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if status != 0:  # the log stays in the failed step's directory for inspection
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        raise StageError(
            f"onnxruntime-genai's model builder failed (exit {status}) on {hf_dir}; "
            f"last lines of {log_path}:\n" + "\n".join(tail)
        )
    log_path.unlink()


def past_names(layers: int, prefix: str) -> list[str]:
    """The builder's cache names, in (layer, key/value) order."""
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def flat_cache_decoder(model: Any) -> Any:
    """Wrap a causal LM so its cache goes in and out as flat tensors, as the ONNX graph has it."""
    import torch
    from transformers import DynamicCache

    class FlatCacheDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(config=self.model.config)
            for layer in range(len(past) // 2):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=cache,
                use_cache=True,
            )
            present = [
                t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
            ]
            return (out.logits, *present)

    return FlatCacheDecoder().eval()


def export_decoder(hf_dir: Path, out: Path) -> None:
    """torch.onnx (dynamo) export of the decoder with an explicit key/value cache, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    text = model.config.get_text_config(decoder=True)
    layers, dims = text.num_hidden_layers, head_dims(text.to_dict())
    kv_heads, head_size = dims["kv_heads"], dims["head_size"]
    # Example sizes above 1: torch.export specializes dimensions of size 0 and 1.
    batch, seq, past_len = 2, 3, 4
    past = tuple(torch.zeros(batch, kv_heads, past_len, head_size) for _ in range(2 * layers))
    args = (
        torch.ones(batch, seq, dtype=torch.int64),
        torch.ones(batch, past_len + seq, dtype=torch.int64),
        *past,
    )
    dim = torch.export.Dim
    b, p = dim("batch_size"), dim("past_sequence_length")
    dynamic = (
        {0: b, 1: dim("sequence_length")},
        {0: b, 1: dim("total_sequence_length")},
        tuple({0: b, 2: p} for _ in past),  # *past is one argument: its shapes are one tuple
    )
    torch.onnx.export(
        flat_cache_decoder(model),
        args,
        str(out / "model.onnx"),
        input_names=["input_ids", "attention_mask", *past_names(layers, "past_key_values")],
        output_names=["logits", *past_names(layers, "present")],
        dynamic_shapes=dynamic,
        dynamo=True,
        external_data=True,
        optimize=True,
    )


def copy_hf_sidecars(hf_dir: Path, out: Path) -> None:
    """Copy config and tokenizer files: everything in the HF folder except its weights."""
    for path in hf_dir.iterdir():
        weights = path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json")
        if path.is_file() and not weights:
            shutil.copy2(path, out / path.name)


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    assert ctx.input is not None
    quant = check_quantization(ctx.input, config)
    require_provider(config.execution_provider)
    if config.ort_genai:
        # The builder re-saves the tokenizer with transformers 5, so tokenizer_config.json says
        # "TokenizersBackend", which transformers 4 cannot load. It stays: onnxruntime-genai
        # accepts it, whereas it refuses tokenizer classes it does not know, so putting back
        # the input's file could break the folder; the genai check below proves it loads.
        run_builder(config, ctx, ctx.input, quant)
        if config.lora_slots:
            from tasks.formats.genai import model_file
            from tasks.tune.onnx_lora import add_lora_slots

            slots = add_lora_slots(model_file(ctx.out))
            ctx.log(f"{len(slots)} empty LoRA slots added (adapter inputs)")
    else:
        ctx.log("torch.onnx export (dynamo)")
        export_decoder(ctx.input, ctx.out)
        copy_hf_sidecars(ctx.input, ctx.out)
    ctx.log("checking the ONNX model against PyTorch")
    ids = prompt_ids(ctx.input)
    reference = torch_logits(ctx.input, ids)
    metrics = check_onnx_against(reference, ctx.out, ids, config.execution_provider)
    ctx.log(f"max |Δlogit| vs torch: {metrics['max_abs_logit_diff']:.3g}")
    return metrics


def check_source(step: Any, source: Any, file: str) -> None:
    """What check_quantization refuses at run time, refused when the recipe loads for a
    quantize step of this recipe: no quantize step runs for minutes to be refused after."""
    from tasks.errors import RecipeError

    bits = getattr(source.config, "bits", None)
    if source.stage != "quantize" or source.spec.output != HF or bits is None:
        return
    where, config = step.ref, step.config
    if bits not in NBITS:
        raise RecipeError(
            file, where, f"from = {source.ref!r} is a {bits}-bit checkpoint; the builder's "
            f"MatMulNBits takes {', '.join(map(str, NBITS))} bits",
            f"set bits = 4 in [{source.ref}], or capture another step",
        )  # fmt: skip
    needed = settings_for_quantized(config)
    if needed:
        raise RecipeError(
            file, where, f"from = {source.ref!r} is a quantized checkpoint, which only the "
            'builder captures, with precision = "int4"', "set " + " and ".join(needed),
        )  # fmt: skip
    kept = getattr(source.config, "modules_to_not_convert", ())
    floats = [m for m in kept if m.split(".")[-1].endswith("proj")]  # q_proj, mlp.down_proj, ...
    if floats:
        raise RecipeError(
            file, where, f"from = {source.ref!r} keeps decoder linears in float "
            f"(modules_to_not_convert = {list(floats)}): the builder reads every decoder "
            "projection of a quantized checkpoint as packed",
            f'set modules_to_not_convert = ["lm_head"] in [{source.ref}]',
        )  # fmt: skip


SPEC = StageSpec(
    stage="capture",
    algorithm=None,
    version="2",  # 2: quantized inputs keep a tied embedding float (shared_embeddings=false)
    config=Config,
    run=run,
    doc="Hugging Face model -> ONNX (onnxruntime-genai builder or torch.onnx)",
    inputs=(HF,),
    output=ONNX,
    libraries=LIBRARIES,
    # onnx_ir: the builder needs it without declaring it; onnxscript: torch.onnx's exporter.
    needs=ONNX_NEEDS | {"onnx_ir": ONNX_EXTRA, "onnxscript": ONNX_EXTRA},
    check_source=check_source,
)
