"""Model runners behind one loop: PyTorch, onnxruntime and onnxruntime-genai.

A runner scores a whole window with an empty cache (`logits`) and generates greedily with a
key/value cache (`start` on the prompt, then `next` once per token), so the evaluate stage
measures every format with the same loop. Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tasks.formats.genai import GENAI_CONFIG, model_file
from tasks.runtimes.onnx import (
    ORT_DTYPES,
    decoder_dims,
    empty_past_feed,
    genai_errors,
    genai_greedy,
    ort_session,
)
from tasks.runtimes.torch_lm import load_causal_lm

if TYPE_CHECKING:
    import numpy as np


class Runner(Protocol):
    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) of one window, with an empty cache."""
        ...

    def start(self, ids: list[int]) -> int:
        """Run the prompt, keep its cache, return the greedy next token."""
        ...

    def next(self, token: int) -> int:
        """Feed one token through the cache, return the greedy next token."""
        ...


class HfRunner:
    """A transformers causal LM in float32 on the CPU (a GPTQ/AWQ checkpoint dequantized),
    with a fine-tune's LoRA adapter when one is given."""

    def __init__(self, folder: Path, adapter: Path | None = None) -> None:
        import torch

        from tasks.runtimes.torch_lm import load_peft_model

        self.torch = torch
        self.model = load_peft_model(folder, adapter) if adapter else load_causal_lm(folder)
        self.past: Any = None
        # transformers 5.2x renames forward's past_key_values to cache (the old name warns).
        inner = self.model.get_base_model() if adapter else self.model  # PEFT takes **kwargs
        params = inspect.signature(inner.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([ids])).logits[0].float().numpy()

    def _step(self, ids: list[int]) -> int:
        with self.torch.inference_mode():
            cache = {self.cache_arg: self.past}
            out = self.model(input_ids=self.torch.tensor([ids]), use_cache=True, **cache)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def start(self, ids: list[int]) -> int:
        self.past = None
        return self._step(ids)

    def next(self, token: int) -> int:
        return self._step([token])


class OrtRunner:
    """The decoder of an ONNX folder in onnxruntime (CPU provider), its cache fed back by hand:
    inputs past_key_values.{i}.key/value, outputs present.{i}.key/value (the genai builder's
    names), shape [batch, kv_heads, past_len, head_size]. With an adapter file, every run has
    that LoRA adapter active."""

    def __init__(self, folder: Path, threads: int, adapter: Path | None = None) -> None:
        import onnxruntime as ort

        self.run_options = ort.RunOptions()
        if adapter is not None:
            # Kept on self: the run options only point at it, and a freed adapter is silently
            # no adapter at all.
            self.lora = ort.LoraAdapter()
            self.lora.Load(str(adapter))
            self.run_options.add_active_adapter(self.lora)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # see ort_session
        self.session = ort_session(model_file(folder), ["CPUExecutionProvider"], options)
        self.dims = decoder_dims(folder)
        self.inputs = {arg.name: arg for arg in self.session.get_inputs()}
        self.outputs = [arg.name for arg in self.session.get_outputs()]
        self.past: dict[str, np.ndarray] = {}
        self.length = 0  # tokens in the cache

    def logits(self, ids: list[int]) -> np.ndarray:
        feed = empty_past_feed(self.session, ids, self.dims)
        (logits,) = self.session.run(["logits"], feed, self.run_options)
        return logits[0]

    def _run(self, feed: dict[str, np.ndarray], new: int) -> int:
        outputs = self.session.run(self.outputs, feed, self.run_options)
        results = dict(zip(self.outputs, outputs, strict=True))
        self.past = {
            name: results[name.replace("past_key_values.", "present.", 1)]
            for name in self.inputs
            if name.startswith("past_key_values.")
        }
        self.length += new
        return int(results["logits"][0, -1].argmax())

    def start(self, ids: list[int]) -> int:
        self.length = 0
        return self._run(empty_past_feed(self.session, ids, self.dims), len(ids))

    def next(self, token: int) -> int:
        import numpy as np

        feed = dict(self.past)
        for name, arg in self.inputs.items():
            dtype = ORT_DTYPES.get(arg.type)
            if name == "input_ids":
                feed[name] = np.array([[token]], dtype=dtype)
            elif name == "attention_mask":
                feed[name] = np.ones((1, self.length + 1), dtype=dtype)
            elif name == "position_ids":
                feed[name] = np.array([[self.length]], dtype=dtype)
        return self._run(feed, 1)


def greedy(
    runner: Runner, prompt: list[int], new_tokens: int, stop: frozenset[int] = frozenset()
) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds for the rest) of greedy decoding."""
    started = time.perf_counter()
    token = runner.start(prompt)
    first = time.perf_counter()
    tokens = [token]
    while len(tokens) < new_tokens and token not in stop:
        token = runner.next(token)
        tokens.append(token)
    return tokens, first - started, time.perf_counter() - first


def genai_model(folder: Path, threads: int) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def genai_with_adapter(model: Any, adapter: Path | None) -> tuple[Any, str] | None:
    """(onnxruntime-genai Adapters holding the file, its name), or None without one."""
    if adapter is None:
        return None
    import onnxruntime_genai as og

    adapters = og.Adapters(model)
    adapters.load(str(adapter), adapter.stem)
    return adapters, adapter.stem


def genai_metrics(
    folder: Path,
    prompt: list[int],
    new_tokens: int,
    repeats: int,
    threads: int,
    eos: frozenset[int],
    adapter: Path | None = None,
) -> dict[str, Any]:
    """Load time, first-token latency, decode speed and greedy text in onnxruntime-genai."""
    import onnxruntime_genai as og

    if not (folder / GENAI_CONFIG).is_file():
        return {}
    started = time.perf_counter()
    with genai_errors(folder):
        model = genai_model(folder, threads)
        active = genai_with_adapter(model, adapter)
        load_s = time.perf_counter() - started
        sample, _, _ = genai_greedy(model, prompt, new_tokens, adapter=active)  # also a warm-up
        runs = [
            genai_greedy(model, prompt, new_tokens, fixed=True, adapter=active)
            for _ in range(repeats)
        ]
        text = og.Tokenizer(model).decode([t for t in sample if t not in eos])
    return {
        "genai_load_s": load_s,
        "genai_first_token_ms": statistics.median(r[1] for r in runs) * 1e3,
        "genai_decode_tokens_per_s": statistics.median((len(r[0]) - 1) / r[2] for r in runs),
        "genai_sample": text,
    }


@contextmanager
def genai_answers(
    folder: Path, threads: int, adapter: Path | None, new_tokens: int
) -> Iterator[Any]:
    """A generate(prompt ids) -> new ids function in onnxruntime-genai, adapter active."""
    with genai_errors(folder):
        model = genai_model(folder, threads)
        active = genai_with_adapter(model, adapter)
        yield lambda ids: genai_greedy(model, ids, new_tokens, adapter=active)[0]
