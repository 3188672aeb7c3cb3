"""Run a decoder once to prove a model folder works: ONNX, PyTorch and onnxruntime-genai.

Every stage that writes a model runs it here: one forward pass over a short prompt with an
empty past, compared against the model it came from, and (for onnxruntime-genai folders) a few
greedy tokens. Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import option
from tasks.errors import PreflightError, StageError
from tasks.stages.onnx_folder import GENAI_CONFIG, copy_sidecars, model_file

ONNX_EXTRA = "pip install 'modelkiln[onnx]'"
# What every step that writes an ONNX folder needs (genai: to prove the folder runs there).
ONNX_NEEDS = {m: ONNX_EXTRA for m in ("onnxruntime", "onnx", "onnxruntime_genai")}


def onnx_quantizer_spec(
    algorithm: str, config: type, run: Any, doc: str, environment: Any = None,
    version: str = "1", **extra: Any,
) -> Any:  # fmt: skip
    """The StageSpec every ONNX -> ONNX quantizer shares. With an environment, the quantizer
    runs there, and the main environment's onnxruntime only checks its output."""
    from tasks.stages import ONNX, StageSpec

    return StageSpec(
        stage="quantize", algorithm=algorithm, version=version, config=config, run=run, doc=doc,
        inputs=(ONNX,), output=ONNX, libraries=("onnxruntime", "onnx"), needs=ONNX_NEEDS,
        environment=environment, **extra,
    )  # fmt: skip


if TYPE_CHECKING:
    import numpy as np
    import onnxruntime as ort

    from tasks.stages import StepContext

PROMPT = "The quick brown fox jumps over the lazy dog"
# Without a tokenizer any in-vocabulary ids do: the comparison is between two models.
FALLBACK_IDS = (1, 5, 9, 13, 17, 21, 25, 29)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# numpy has no bfloat16: a bf16 decoder cannot be fed from here, and says so.
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
ORT_DTYPES |= {"tensor(int32)": "int32"}


def prompt_ids(folder: Path, text: str = PROMPT) -> list[int]:
    """The prompt tokenized with the folder's tokenizer.json, else fixed ids."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return list(FALLBACK_IDS)
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids


def head_dims(config: dict[str, Any]) -> dict[str, int]:
    """Key/value heads and head size from a Hugging Face decoder's config settings."""
    heads = config["num_attention_heads"]
    return {
        "kv_heads": config.get("num_key_value_heads") or heads,
        "head_size": config.get("head_dim") or config["hidden_size"] // heads,
    }


def decoder_dims(folder: Path) -> dict[str, int]:
    """Key/value heads and head size, which ONNX inputs may leave symbolic (the builder does)."""
    genai = folder / GENAI_CONFIG
    if genai.is_file():
        decoder = json.loads(genai.read_text())["model"]["decoder"]
        return {"kv_heads": decoder["num_key_value_heads"], "head_size": decoder["head_size"]}
    hf = folder / "config.json"
    if hf.is_file():
        return head_dims(json.loads(hf.read_text()))
    return {}


def _past_shape(shape: list[Any], dims: dict[str, int], name: str) -> list[int]:
    """[batch, kv_heads, past_len, head_size] with batch 1 and an empty past."""
    known = [1, dims.get("kv_heads"), 0, dims.get("head_size")]
    out = [d if isinstance(d, int) else k for d, k in zip(shape, known, strict=True)]
    out[0], out[2] = 1, 0
    if None in out:
        raise StageError(f"cannot size the empty past {name} {shape}: no genai_config/config.json")
    return out


def empty_past_feed(
    session: ort.InferenceSession, input_ids: list[int], dims: dict[str, int]
) -> dict[str, np.ndarray]:
    """Inputs for one decoder call over `input_ids` (batch 1) with an empty key/value cache."""
    import numpy as np

    seq = len(input_ids)
    feed: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        dtype = ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise StageError(f"decoder input {arg.name!r} has type {arg.type}, not one numpy has")
        if arg.name == "input_ids":
            feed[arg.name] = np.array([input_ids], dtype=dtype)
        elif arg.name == "attention_mask":
            feed[arg.name] = np.ones((1, seq), dtype=dtype)
        elif arg.name == "position_ids":
            feed[arg.name] = np.arange(seq, dtype=dtype)[None, :]
        elif arg.name.startswith("past_key_values."):
            feed[arg.name] = np.zeros(_past_shape(arg.shape, dims, arg.name), dtype=dtype)
        else:
            raise StageError(f"decoder input {arg.name!r} is not one this check knows how to feed")
    return feed


def ort_session(
    path: Path, providers: list[str], options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    """An onnxruntime session of the model file, or a StageError saying it does not load."""
    import onnxruntime as ort

    if options is None:
        options = ort.SessionOptions()
        # Errors only: a LoRA-ready model's empty default adapter inputs warn once per input.
        options.log_severity_level = 3
        # onnxruntime ignores OMP_NUM_THREADS; `doit -n N` (tasks/jobs.py) or the user set it.
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime's Fail, InvalidGraph, ... derive from Exception only
        raise StageError(f"{path} does not load in onnxruntime: {err}") from err


def onnx_logits(folder: Path, input_ids: list[int], provider: str = "cpu") -> np.ndarray:
    """Logits [seq, vocab] (float32) of the folder's decoder."""
    import numpy as np
    import onnxruntime as ort

    path = model_file(folder)
    providers = list(dict.fromkeys([PROVIDERS[provider], "CPUExecutionProvider"]))
    if providers[0] not in ort.get_available_providers():
        raise PreflightError(f"onnxruntime here has no {providers[0]} to run {path}")
    session = ort_session(path, providers)
    feed = empty_past_feed(session, input_ids, decoder_dims(folder))
    (logits,) = session.run(["logits"], feed)
    return np.asarray(logits[0], dtype=np.float32)


def load_causal_lm(hf_dir: Path) -> Any:
    """The folder's causal LM in fp32 on the CPU, in eval mode. A GPTQ/AWQ checkpoint is
    dequantized ((q - z) * s, what its ONNX conversion computes): transformers alone cannot
    load one without gptqmodel, whose CPU kernels run in bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.quant.checkpoint import is_quantized, load_dequantized

    if is_quantized(hf_dir):
        return load_dequantized(hf_dir, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def torch_logits(hf_dir: Path, input_ids: list[int]) -> np.ndarray:
    """Logits [seq, vocab] of the Hugging Face model in fp32 on the CPU."""
    import torch

    model = load_causal_lm(hf_dir)
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0]
    return logits.float().numpy()


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How far `candidate` is from `reference`: max/mean |Δlogit|, greedy-token agreement."""
    import numpy as np

    if reference.shape != candidate.shape:
        raise StageError(f"logits shape {candidate.shape} differs from {reference.shape}")
    diff = np.abs(reference - candidate)
    same_top1 = reference.argmax(-1) == candidate.argmax(-1)
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "top1_agreement": float(same_top1.mean()),
    }


@contextmanager
def genai_errors(folder: Path) -> Iterator[None]:
    """Turn onnxruntime-genai's failures in the block into a StageError naming the folder."""
    try:
        yield
    except RuntimeError as err:  # og reports every failure as RuntimeError
        raise StageError(f"{folder} does not run in onnxruntime-genai: {err}") from err


def genai_greedy(
    model: Any,
    prompt: Sequence[int],
    new_tokens: int,
    fixed: bool = False,
    adapter: tuple[Any, str] | None = None,
) -> tuple[list[int], float, float]:
    """(new tokens, seconds to the first, seconds for the rest) of greedy decoding in
    onnxruntime-genai. `fixed` forbids stopping at EOS (genai's min_length), so timed runs
    decode exactly new_tokens; `adapter`: (og.Adapters, name) to activate for this request.
    Call it inside `genai_errors`."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    length = len(prompt) + new_tokens
    params.set_search_options(max_length=length, min_length=length if fixed else 0, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(*adapter)
    started = time.perf_counter()
    generator.append_tokens(prompt)  # runs the prompt; the next call only picks the token
    generator.generate_next_token()
    first = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    tokens = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]
    return tokens, first - started, time.perf_counter() - first


def genai_generate(folder: Path, text: str = PROMPT, new_tokens: int = 8) -> str:
    """A few greedy tokens from onnxruntime-genai: proves the folder runs there as a whole."""
    import onnxruntime_genai as og

    with genai_errors(folder):
        model = og.Model(str(folder))
        tokenizer = og.Tokenizer(model)
        tokens, _, _ = genai_greedy(model, tokenizer.encode(text), new_tokens)
        return tokenizer.decode(tokens)


def check_onnx_against(
    reference: np.ndarray, folder: Path, input_ids: list[int], provider: str = "cpu"
) -> dict[str, Any]:
    """Metrics of the folder's model vs reference logits, plus genai text when it has a config."""
    logits = onnx_logits(folder, input_ids, provider)
    metrics: dict[str, Any] = compare_logits(reference, logits)
    metrics["prompt_tokens"] = len(input_ids)
    if (folder / GENAI_CONFIG).is_file():
        metrics["genai_text"] = genai_generate(folder)
    return metrics


@dataclass(frozen=True, kw_only=True)
class NodeExclusion:
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
                f"nodes_to_exclude: {pattern!r} matches no node of {model_path.name}\n"
                f"  fix: use node names or glob patterns like {some}"
            )
        matched.update(hits)
    return sorted(matched)


def op_counts(model_path: Path) -> dict[str, int]:
    """How many nodes of each op type the graph has (weights are not read)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def activation_type(model_path: Path) -> str:
    """The float type the decoder computes in ("float32", "float16"): its cache's, or logits'."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    values = [i for i in graph.input if i.name.startswith("past_key_values.")] or [
        o for o in graph.output if o.name == "logits"
    ]
    if not values:
        raise StageError(f"{model_path}: no past_key_values.* input or logits output")
    return str(onnx.helper.tensor_dtype_to_np_dtype(values[0].type.tensor_type.elem_type))


def target_provider(folder: Path) -> str:
    """The execution provider a folder is built for: the first in its genai_config, else cpu."""
    genai = folder / GENAI_CONFIG
    if not genai.is_file():
        return "cpu"
    session = json.loads(genai.read_text())["model"]["decoder"].get("session_options", {})
    for options in session.get("provider_options", []):
        return next(iter(options), "cpu")
    return "cpu"


def require_provider(provider: str) -> None:
    """Refuse, before any work, to build what this machine cannot run to prove it."""
    if provider == "cpu":
        return
    import onnxruntime as ort
    import onnxruntime_genai as og

    have_ort = PROVIDERS.get(provider) in ort.get_available_providers()
    if provider != "cuda" or not (have_ort and og.is_cuda_available()):
        raise PreflightError(
            f"a model for the {provider!r} execution provider is proved by running it there, and "
            "this machine cannot (needs onnxruntime-gpu, onnxruntime-genai-cuda and a GPU): "
            "build this step on such a machine"
        )


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


BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits and blocked DequantizeLinear take here


def check_block_size(block_size: int) -> None:
    from tasks.config import ConfigValueError

    if block_size not in BLOCK_SIZES:
        raise ConfigValueError(
            "block_size", f"{block_size} is not a block size MatMulNBits takes",
            f"use one of {', '.join(map(str, BLOCK_SIZES))}",
        )  # fmt: skip


@contextmanager
def work_copy(ctx: StepContext) -> Iterator[Path]:
    """A private copy of the input's model for a tool that writes beside what it reads; removed
    afterwards (it lives in the step's temporary output, so a killed step leaves no stray)."""
    import shutil

    from tasks.stages.onnx_folder import private_copy

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
