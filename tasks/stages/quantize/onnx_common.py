"""What the ONNX -> ONNX quantizers share: the spec, the settings every one takes, the input
checks, a private work copy of the input, and the proof of the output."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from tasks.config import StageConfig, option, stage_config
from tasks.errors import StageError
from tasks.formats.genai import copy_sidecars, model_file, private_copy
from tasks.runtimes.onnx import (
    ONNX_NEEDS,
    activation_type,
    check_onnx_against,
    onnx_logits,
    op_counts,
    prompt_ids,
    require_provider,
    target_provider,
)
from tasks.stages import ONNX, StageSpec, StepContext


def onnx_quantizer_spec(
    algorithm: str, config: type, run: Any, doc: str, environment: Any = None,
    version: str = "1", **extra: Any,
) -> StageSpec:  # fmt: skip
    """The StageSpec every ONNX -> ONNX quantizer shares. With an environment, the quantizer
    runs there, and the main environment's onnxruntime only checks its output."""
    return StageSpec(
        stage="quantize", algorithm=algorithm, version=version, config=config, run=run, doc=doc,
        inputs=(ONNX,), output=ONNX, libraries=("onnxruntime", "onnx"), needs=ONNX_NEEDS,
        environment=environment, **extra,
    )  # fmt: skip


@stage_config
class NodeExclusion(StageConfig):
    """The setting every ONNX quantizer takes: nodes kept in float."""

    SETTINGS_LAST = True  # in the docs, after the stage's own settings

    nodes_to_exclude: tuple[str, ...] = option(
        (), "nodes to keep in float, by name or glob: '/lm_head/MatMul', '*/mlp/down_proj/*'"
    )

    def __post_init__(self) -> None:
        # A set in effect: reordering or repeating it must not change the step's key.
        object.__setattr__(self, "nodes_to_exclude", tuple(sorted(set(self.nodes_to_exclude))))


def match_nodes(model_path: Path, patterns: Sequence[str]) -> list[str]:
    """Names of the nodes matching glob patterns ('*/mlp/down_proj/*'); a pattern that matches
    nothing is an error, so a typo cannot silently quantize what it meant to keep."""
    import fnmatch

    import onnx

    names = [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node]
    matched: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            some = [n for n in names if "MatMul" in n][:3] or names[:3]
            raise StageError(
                f"nodes_to_exclude: {pattern!r} matches no node of {model_path.name}",
                f"use node names or glob patterns like {some}",
            )
        matched.update(hits)
    return sorted(matched)


@stage_config
class Int8Settings(NodeExclusion):
    """What every dynamic int8 quantizer takes (onnxruntime's, Intel's)."""

    weight_type: Literal["int8", "uint8"] = option("int8", "integer type of the weights")
    per_channel: bool = option(False, "one scale per output channel instead of per tensor")
    reduce_range: bool = option(False, "7-bit weights, for older x86 CPUs without VNNI")


def fp32_source(ctx: StepContext, quantizer: str) -> Path:
    """The input's model file, refused before any work unless this machine can run it and it
    computes in fp32 (what dynamic and weight-only quantizers take)."""
    assert ctx.input is not None
    src = model_file(ctx.input)
    require_provider(target_provider(ctx.input))
    if (dtype := activation_type(src)) != "float32":
        raise StageError(
            f"{src} computes in {dtype}; {quantizer} needs an fp32 model: "
            'quantize a capture with precision = "fp32"'
        )
    return src


@contextmanager
def work_copy(ctx: StepContext) -> Iterator[Path]:
    """A private copy of the input's model for a tool that writes beside what it reads; removed
    afterwards (it lives in the step's temporary output, so a killed step leaves no stray)."""
    import shutil

    assert ctx.input is not None
    work = ctx.out / ".work"
    try:
        yield private_copy(ctx.input, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def finish_quantized(ctx: StepContext, quantized_op: str) -> dict[str, Any]:
    """The common end of an ONNX quantizer: copy the sidecars, then prove the output."""
    assert ctx.input is not None
    copy_sidecars(ctx.input, ctx.out)
    metrics = check_quantized(ctx.input, ctx.out, quantized_op)
    ctx.log(f"max |Δlogit| vs the input model: {metrics['max_abs_logit_diff']:.3g}")
    return metrics


def check_quantized(src: Path, out: Path, quantized_op: str) -> dict[str, Any]:
    """Prove an ONNX quantizer's output: it has `quantized_op` nodes, loads and stays close."""
    count = op_counts(model_file(out)).get(quantized_op, 0)
    if count == 0:
        found = op_counts(model_file(src))
        raise StageError(
            f"{model_file(src)} has no MatMul with constant weights to quantize (its ops: "
            f"{', '.join(sorted(found))}): quantize an fp32 capture"
        )
    ids, provider = prompt_ids(src), target_provider(src)
    metrics = check_onnx_against(onnx_logits(src, ids, provider), out, ids, provider)
    metrics["quantized_nodes"] = count
    if not math.isfinite(metrics["max_abs_logit_diff"]):  # a NaN or inf logit: never usable
        raise StageError(
            f"{model_file(out)} gives non-finite logits on a short prompt; its input does not: "
            "the quantizer broke the model (try other settings, or keep the failing nodes in "
            "float with nodes_to_exclude)"
        )
    return metrics
