"""Perplexity of a model over text: exp(mean negative log-likelihood) of the text, tokenized
once and cut into non-overlapping windows, so every format of one model scores the same tokens."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tasks.errors import StageError
from tasks.formats.text import read_text

if TYPE_CHECKING:
    import numpy as np

    from tasks.runtimes.runners import Runner


class Progress(Protocol):
    """What a step's context gives here: a progress bar over the windows."""

    def progress(
        self, items: Iterable[Any], desc: str, total: int | None = None
    ) -> Iterable[Any]: ...


def token_nll(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[label] per row of logits [n, vocab], summed in float64."""
    import numpy as np

    logits = np.asarray(logits)
    top = logits.max(axis=-1, keepdims=True)
    # exp in the logits' own dtype, sums in float64: no float64 copy of [n, vocab] in memory.
    log_total = np.log(np.exp(logits - top).sum(axis=-1, dtype=np.float64)) + top[:, 0]
    return log_total - logits[np.arange(len(labels)), labels].astype(np.float64)


def perplexity(logits: np.ndarray, labels: np.ndarray) -> float:
    """exp(mean NLL): row i of logits predicts labels[i]."""
    return math.exp(float(token_nll(logits, labels).mean()))


def special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before any text (a BOS), or []: models trained with one
    expect it, so every window starts with it."""
    marked = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return marked[: -len(plain)] if marked[-len(plain) :] == plain else []


def token_windows(
    ids: list[int], prefix: list[int], seq_len: int, max_tokens: int
) -> list[list[int]]:
    """Windows of at most seq_len tokens whose scored parts (all but the first
    `max(1, len(prefix))` tokens) tile the text: each text token is scored once. A window's
    context is the prefix, or without one the token just before its scored part."""
    context = len(prefix) or 1
    step = seq_len - context
    if step < 1:
        raise StageError(
            f"seq_len {seq_len} leaves no room to score after {context} context tokens"
        )
    start = 0 if prefix else 1
    end = min(len(ids), start + max_tokens)
    return [
        (prefix or ids[i - 1 : i]) + ids[i : min(i + step, end)] for i in range(start, end, step)
    ]


def score(runner: Runner, windows: Iterable[list[int]], context: int) -> dict[str, Any]:
    """Perplexity over all scored tokens of all windows."""
    total, count = 0.0, 0
    for window in windows:
        logits = runner.logits(window)
        total += float(token_nll(logits[context - 1 : -1], window[context:]).sum())
        count += len(window) - context
    if count == 0:
        raise StageError("no tokens to score: the data split is empty")
    return {"perplexity": math.exp(total / count), "tokens_scored": count}


def text_perplexity(
    runner: Runner, tokenizer: Any, text: str, seq_len: int, max_tokens: int, ctx: Progress
) -> dict[str, Any]:
    """Perplexity of the model over the first max_tokens tokens of text, in windows."""
    prefix = special_prefix(tokenizer)
    # verbose=False: the whole text is longer than the model's context, which is fine here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    windows = token_windows(ids, prefix, seq_len, max_tokens)
    progress = ctx.progress(windows, "perplexity", total=len(windows))
    return score(runner, progress, len(prefix) or 1)


def heldout_perplexity(
    folder: Path, data_dir: Path, ctx: Progress, seq_len: int = 512, max_tokens: int = 4096
) -> dict[str, Any]:
    """Perplexity of a Hugging Face model folder on a data set's held-out split: what a
    producing step (a quantizer) records about its own output."""
    from transformers import AutoTokenizer

    from tasks.runtimes.runners import HfRunner

    tokenizer = AutoTokenizer.from_pretrained(folder)
    runner = HfRunner(folder)
    return text_perplexity(
        runner, tokenizer, read_text(data_dir, "heldout"), seq_len, max_tokens, ctx
    )
