"""Quantize a Hugging Face decoder one layer at a time, streaming weights from safetensors.

The model skeleton is built on the meta device (no memory); each decoder layer in turn gets
its weights read from the checkpoint, is quantized by a handler (RTN, GPTQ, AWQ, QuaRot), runs
the calibration activations forward to feed the next layer, and is dropped. Peak memory is
about one layer plus the activations, whatever the model's size.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from tasks.errors import StageError
from tasks.quant.memory import release_freed_memory
from tasks.quant.primitives import QuantizedLinear

LAYERS = "model.layers."


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class WeightReader:
    """Tensors of a safetensors checkpoint by name, each read from disk only when asked for.

    Plain reads, not mmap (as safetensors' safe_open does): pages of an mmap'd file that were
    touched stay resident in the process, so streaming a model through would end up holding
    all of it and peak memory would reach the checkpoint's size."""

    def __init__(self, folder: Path) -> None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise StageError(f"{folder} has no .safetensors weights")
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for file in files:
            with open(file, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            header.pop("__metadata__", None)
            for name, info in header.items():
                self._where[name] = (file, 8 + size, info)

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        file, base, info = self._where[name]
        begin, end = info["data_offsets"]
        buffer = bytearray(end - begin)
        with open(file, "rb", buffering=0) as fh:
            fh.seek(base + begin)
            fh.readinto(buffer)
        flat = torch.frombuffer(buffer, dtype=DTYPES[info["dtype"]]) if buffer else torch.empty(0)
        return flat.reshape(info["shape"])


@dataclass
class Layer:
    """One decoder layer being quantized: its module (float weights loaded) and how to run it."""

    index: int
    module: torch.nn.Module
    inputs: torch.Tensor | None  # hidden states entering the layer [samples, tokens, hidden]
    run: Callable[[torch.Tensor], torch.Tensor]  # the layer on a batch of hidden states
    keep_float: tuple[str, ...] = ()  # module names (or suffixes) not to quantize

    def linears(self) -> dict[str, torch.nn.Linear]:
        """The linears to quantize, by name within the layer."""
        full = f"{LAYERS}{self.index}."
        return {
            n: m
            for n, m in self.module.named_modules()
            if isinstance(m, torch.nn.Linear) and not kept_float(full + n, self.keep_float)
        }

    def forward_all(self, batch_size: int = 4) -> torch.Tensor:
        assert self.inputs is not None
        with torch.no_grad():
            return torch.cat([self.run(b) for b in self.inputs.split(batch_size)])


def kept_float(name: str, keep: tuple[str, ...]) -> bool:
    """Whether a module is named in keep, in full or by a dotted suffix ("mlp.down_proj",
    "down_proj"; not "proj")."""
    return any(name == k or name.endswith("." + k) for k in keep)


def check_keep_float(skeleton: torch.nn.Module, keep: tuple[str, ...]) -> None:
    """Every name in keep must match a linear: a typo would quietly quantize it."""
    from tasks.errors import did_you_mean

    linears = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    for k in keep:
        if not any(kept_float(n, (k,)) for n in linears):
            suffixes = {n.split(".", 3)[-1] if n.startswith(LAYERS) else n for n in linears}
            raise StageError(
                f"modules_to_not_convert: {k!r} matches no linear of the model"
                f"{did_you_mean(k, suffixes)}",
                f"name linears in full or by a suffix: {', '.join(sorted(suffixes))}",
            )


class Handler(Protocol):
    """What one algorithm does per layer (and, for rotations, to the weights around them)."""

    needs_data: bool

    def transform_ends(
        self, embed: torch.Tensor, norm: torch.Tensor, head: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(embedding, final norm and LM head by state-dict name, config updates); head None:
        tied to the embedding."""
        ...

    def transform_layer(
        self, index: int, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]: ...

    def quantize_layer(self, layer: Layer) -> dict[str, QuantizedLinear]: ...


@dataclass
class Report:
    """What the run measured, for the manifest."""

    seconds_per_layer: list[float] = field(default_factory=list)


def quantize_layerwise(
    src: Path,
    handler: Handler,
    calibration: torch.Tensor | None,  # token ids [samples, tokens]
    device: torch.device,
    progress: Callable[[Iterable[Any], str, int], Iterable[Any]],
    keep_float: tuple[str, ...] = (),
    finish: Callable[[QuantizedLinear], Any] = QuantizedLinear.compact,
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedLinear], dict[str, Any], Report]:
    """(float tensors, quantized linears by module name, config, report) of the whole model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    reader = WeightReader(src)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    check_keep_float(skeleton, keep_float)
    report = Report()
    floats: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedLinear] = {}

    ends, config_updates = _ends(reader, handler)
    hidden, run = None, None
    if handler.needs_data and calibration is not None:
        embed = ends["model.embed_tokens.weight"].to(device).float()
        hidden = torch.nn.functional.embedding(calibration.to(device), embed)
        run = _layer_runner(skeleton, config, calibration.shape[1], device)
        del embed
    del ends  # read again at the end: not held while the layers are quantized
    layers = skeleton.model.layers
    for index in progress(range(len(layers)), "layers", len(layers)):
        started = time.perf_counter()
        module = _load_layer(layers[index], index, reader, handler, device)
        runner = (lambda h, m=module: run(m, h)) if run else None
        layer = Layer(index, module, hidden, runner, keep_float)
        for name, q in handler.quantize_layer(layer).items():
            quantized[f"{LAYERS}{index}.{name}"] = finish(q)
        if hidden is not None:
            hidden = layer.forward_all()
        _keep_floats(module, index, quantized, reader, floats)
        layers[index] = torch.nn.Identity()  # free the layer's weights
        release_freed_memory()
        report.seconds_per_layer.append(round(time.perf_counter() - started, 3))
    floats |= _ends(reader, handler)[0]
    return floats, quantized, config.to_dict() | config_updates, report


def _ends(reader: WeightReader, handler: Handler) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The embedding, final norm and LM head as the handler transforms them (deterministic)."""
    head = reader.get("lm_head.weight") if reader.has("lm_head.weight") else None
    embed, norm = reader.get("model.embed_tokens.weight"), reader.get("model.norm.weight")
    return handler.transform_ends(embed, norm, head)


def _load_layer(meta_layer: torch.nn.Module, index: int, reader: WeightReader, handler: Handler,
                device: torch.device) -> torch.nn.Module:  # fmt: skip
    prefix = f"{LAYERS}{index}."
    weights = {n[len(prefix) :]: reader.get(n) for n in reader.names() if n.startswith(prefix)}
    weights = handler.transform_layer(index, weights)
    module = meta_layer.to_empty(device=device).float().eval()
    module.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return module


def _keep_floats(module: torch.nn.Module, index: int, quantized: dict[str, QuantizedLinear],
                 reader: WeightReader, floats: dict[str, torch.Tensor]) -> None:  # fmt: skip
    """The layer's tensors that stay in float (norms, biases), in the checkpoint's dtype."""
    for name, tensor in module.state_dict().items():
        full = f"{LAYERS}{index}.{name}"
        if name.endswith(".weight") and full.removesuffix(".weight") in quantized:
            continue
        dtype = reader.get(full).dtype if reader.has(full) else tensor.dtype
        floats[full] = tensor.detach().to("cpu", dtype)


def _layer_runner(skeleton: Any, config: Any, tokens: int, device: torch.device):
    """A function running one decoder layer on hidden states, with the model's rotary
    position embeddings and a causal mask (no cache)."""
    rotary = type(skeleton.model.rotary_emb)(config=config).to(device)
    positions = torch.arange(tokens, device=device)[None]
    with torch.no_grad():
        cos_sin = rotary(torch.zeros(1, tokens, 1, device=device), positions)

    def run(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = module(hidden, position_ids=positions, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out

    return run
