"""Training examples from data records: a prompt part and an answer part, as token ids.

A text template such as "<|im_start|>user\\n{phrase}<|im_end|>\\n<|im_start|>assistant\\n{tone}"
is split where `{answer_field}` starts: what comes before is the prompt (no loss), the rest is
the answer (the loss). With `chat_template`, the prompt is the tokenizer's chat template around
the prompt field with the assistant turn opened, and the answer is the rest of the rendered
conversation. Prompt and answer are tokenized apart, so training sees exactly the tokens that
generation does: the prompt's ids, then the tokens the model is to produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import PreflightError, StageError, did_you_mean
from tasks.formats.text import template_fields

IGNORE = -100  # the label of a token that carries no loss (PyTorch's cross-entropy default)


@dataclass(frozen=True)
class Format:
    """How a record becomes text: a template, or a chat turn around two fields."""

    text_template: str = ""
    chat_template: bool = False
    prompt_field: str = ""
    answer_field: str = ""

    def fields(self) -> list[str]:
        if self.chat_template:
            return [self.prompt_field, self.answer_field]
        return template_fields(self.text_template)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class Example:
    prompt: str  # the text generation starts from ("" when the whole text is trained on)
    answer: str  # the text the loss covers
    gold: str  # the answer field's raw value ("" without an answer field): what is scored


def read_records(data_dir: Path, split: str) -> list[dict[str, Any]]:
    """A data step's split, read through `datasets` (its JSON loader, in memory: no cache
    written outside the store)."""
    import tempfile

    try:
        import datasets
    except ImportError:
        raise PreflightError(
            "fine-tuning reads data through datasets: pip install 'modelkiln[finetune]'"
        ) from None
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise StageError(f"data set {data_dir} has no {path.name}: rebuild its data step")
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="datasets-") as cache:
        table = datasets.load_dataset(
            "json", data_files=str(path), split="train", keep_in_memory=True, cache_dir=cache
        )
    return [dict(record) for record in table]


def check_fields(fmt: Format, records: list[dict[str, Any]], data_name: str, key: str) -> None:
    """One clear error when the format names a field the data set does not have."""
    available = list(dict.fromkeys(k for record in records[:100] for k in record))
    for name in fmt.fields():
        if name not in available:
            raise StageError(
                f"{key} names the field {name!r}{did_you_mean(name, available)}, but data set "
                f"{data_name!r} has the fields {available}",
                f"use one of those in {key}",
            )


def prompt_part(template: str, record: dict[str, Any], answer_field: str) -> str:
    """The rendered template up to where answer_field's value starts."""
    marker = "\x00answer\x00"
    with_marker = template.format_map({**record, answer_field: marker})
    if marker not in with_marker:
        raise StageError(
            f"text_template has no {{{answer_field}}}", "add it, or unset answer_field"
        )
    return with_marker[: with_marker.index(marker)]


def make_example(fmt: Format, record: dict[str, Any], tokenizer: Any) -> Example:
    gold = str(record[fmt.answer_field]) if fmt.answer_field else ""
    if fmt.chat_template:
        user = [{"role": "user", "content": str(record[fmt.prompt_field])}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": gold}], tokenize=False
        )
        if not full.startswith(prompt):
            raise StageError(
                "the tokenizer's chat template renders the conversation without the prompt as "
                "its start, so the answer cannot be told apart",
                "use text_template",
            )
        return Example(prompt, full[len(prompt) :], gold)
    if not fmt.answer_field:
        return Example("", fmt.text_template.format_map(record), gold)
    prompt = prompt_part(fmt.text_template, record, fmt.answer_field)
    full = fmt.text_template.format_map(record)
    return Example(prompt, full[len(prompt) :], gold)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids as generation sees them (special tokens, e.g. a BOS, included)."""
    return list(tokenizer(prompt).input_ids) if prompt else []


def encode(example: Example, tokenizer: Any, seq_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) with the prompt's labels IGNORE, cut to seq_len tokens."""
    head = prompt_ids(tokenizer, example.prompt)
    if head:
        tail = list(tokenizer(example.answer, add_special_tokens=False).input_ids)
    else:
        tail = list(tokenizer(example.answer).input_ids)
    ids = (head + tail)[:seq_len]
    labels = ([IGNORE] * len(head) + tail)[:seq_len]
    return ids, labels


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask and labels (IGNORE on padding)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = [r[0] + [pad_id] * (width - len(r[0])) for r in rows]
    labels = [r[1] + [IGNORE] * (width - len(r[1])) for r in rows]
    mask = [[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows]
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def read_answer(text: str, labels: list[str]) -> str | None:
    """The label the generated text starts with (case and leading space ignored), if any."""
    text = text.strip().lower()
    for label in sorted(labels, key=len, reverse=True):  # "neutral" before "neu"
        if text.startswith(label.lower()):
            return label
    return None


def answer_accuracy(
    generate: Any, tokenizer: Any, records: list[dict[str, Any]], fmt: Format, progress: Any
) -> dict[str, Any]:
    """Greedy answers to held-out prompts, read from their first tokens, against the records'
    answer field; with the share of the most common answer (what always guessing it scores)."""
    from collections import Counter

    golds = [str(r[fmt.answer_field]) for r in records]
    labels = sorted(set(golds))
    correct = unanswered = 0
    for record, gold in zip(progress, golds, strict=True):
        example = make_example(fmt, record, tokenizer)
        ids = generate(prompt_ids(tokenizer, example.prompt))
        answer = read_answer(tokenizer.decode(ids, skip_special_tokens=True), labels)
        correct += answer == gold
        unanswered += answer is None
    n = max(len(records), 1)
    return {
        "answer_accuracy": correct / n,
        "answers_scored": len(records),
        "answers_unreadable": unanswered,
        "answer_majority_share": Counter(golds).most_common(1)[0][1] / n if golds else 0.0,
    }
