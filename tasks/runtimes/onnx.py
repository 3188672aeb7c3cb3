"""onnxruntime and onnxruntime-genai: sessions, empty-past feeds, logits, greedy tokens.

Every stage that writes an ONNX model runs it here to prove the folder works: one forward pass
over a short prompt with an empty past, compared against the model it came from, and (for
onnxruntime-genai folders) a few greedy tokens. Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import PowerOfTwo
from tasks.errors import PreflightError, StageError
from tasks.formats.genai import GENAI_CONFIG, model_file

ONNX_EXTRA = "pip install 'modelkiln[onnx]'"
# What every step that writes an ONNX folder needs (genai: to prove the folder runs there).
ONNX_NEEDS = {m: ONNX_EXTRA for m in ("onnxruntime", "onnx", "onnxruntime_genai")}
# The block sizes onnxruntime's MatMulNBits (and blocked DequantizeLinear) take.
NBITS_BLOCK_SIZE = PowerOfTwo(16, 256, why="the block sizes onnxruntime's MatMulNBits takes")

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime as ort

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
