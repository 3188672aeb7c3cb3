"""Evaluate a model, Hugging Face or ONNX: perplexity on held-out text, size, latency, tokens/s.

```toml
[evaluate.int8]
from = "quantize.int8"
data = "wiki"           # a [data.<name>] set; leave out for size and speed only
seq_len = 512
max_tokens = 4096
```

Perplexity is exp(mean negative log-likelihood) of the held-out text, tokenized once with the
model folder's own tokenizer and cut into non-overlapping windows, so the Hugging Face and ONNX
forms of one model score exactly the same tokens. Latency comes from a greedy loop with a
key/value cache (the median of `repeats` runs, after an untimed one that gives the sample);
an ONNX folder with a genai_config.json is also timed in onnxruntime-genai, the runtime it ships in.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tasks.config import StageConfig, option, refuse_inapplicable, stage_config
from tasks.digest import dir_size
from tasks.errors import PreflightError, StageError
from tasks.formats.genai import GENAI_CONFIG
from tasks.formats.text import read_text
from tasks.record import Record, frozen
from tasks.runtimes.perplexity import text_perplexity
from tasks.stages import HF, METRICS, ONNX, ONNX_ADAPTER, PEFT, StageSpec, StepContext

if TYPE_CHECKING:
    from tasks.runtimes.runners import Runner


@stage_config
class Config(StageConfig):
    """Perplexity on a data set's held-out split, size on disk, load time and generation speed."""

    data: str = option("", "name of a [data.<name>] set to measure perplexity on; empty: none")
    split: Literal["heldout", "train"] = option(
        "heldout", "split to score; 'train' is for debugging only: report held-out perplexity"
    )
    seq_len: int = option(512, "tokens per perplexity window (context the model sees)", ge=2)
    max_tokens: int = option(4096, "tokens scored, at most, in non-overlapping windows", ge=1)
    prompt: str = option("What is the capital of France?", "prompt for the latency runs")
    chat_template: bool = option(True, "wrap the prompt in the tokenizer's chat template, if any")
    new_tokens: int = option(
        32, "greedy tokens generated per latency run (decode speed needs a second token)", ge=2
    )
    repeats: int = option(3, "timed latency runs; the median is reported", ge=1)
    threads: int = option(
        1, "CPU threads (torch and onnxruntime); 1 is steadiest on shared CPUs", ge=1
    )
    answers: int = option(
        200, "held-out records whose answer is scored, when the model is a fine-tune with an "
        "answer_field (or prompts_from is set); 0: none", added=True, ge=0,
    )  # fmt: skip
    answer_tokens: int = option(8, "greedy tokens generated per answer", added=True, ge=1)
    prompts_from: str = option(
        "", "a finetune step: score this (base) model on its prompts and answers, for a "
        "before-training figure", added=True,
    )  # fmt: skip

    def __post_init__(self) -> None:
        refuse_inapplicable(self, NARROW_SETTINGS)


def _answers(config: Config) -> bool:
    return bool(config.data) and config.answers > 0


# Perplexity and answers are measured on the data set: without one, their settings do nothing.
# (Not answers itself: answers = 0 is how a fine-tune is timed without data.)
NARROW_SETTINGS = (
    *(
        (key, lambda c: bool(c.data), "a step with data")
        for key in ("split", "seq_len", "max_tokens")
    ),
    ("answer_tokens", _answers, "scoring answers (data, and answers > 0)"),
    ("prompts_from", _answers, "scoring answers (data, and answers > 0)"),
)


def prompt_ids(tokenizer: Any, config: Config) -> list[int]:
    if config.chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": config.prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids  # the template has its BOS
    return tokenizer(config.prompt).input_ids


def eos_ids(folder: Path, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and the generation configs: they can differ
    (chat models end turns with a token other than the tokenizer's EOS)."""
    found = {tokenizer.eos_token_id}
    for name, keys in (("generation_config.json", ()), (GENAI_CONFIG, ("model",))):
        if (folder / name).is_file():
            config = json.loads((folder / name).read_text())
            for key in keys:
                config = config.get(key, {})
            value = config.get("eos_token_id")
            found |= set(value) if isinstance(value, list) else {value}
    return frozenset(i for i in found if isinstance(i, int))


def size_bytes(folder: Path) -> int:
    """Bytes a user ships: every file of the folder (a store entry holds only the step's)."""
    return dir_size(folder)


def time_generation(
    runner: Runner, prompt: list[int], config: Config, eos: frozenset[int]
) -> tuple[list[int], dict[str, float]]:
    """The greedy sample (stopped at EOS; also the warm-up) and the median latency of
    `repeats` runs of exactly new_tokens: EOS is ignored so every run times the same work."""
    import statistics  # here, not at the top: every doit run imports this module

    from tasks.runtimes.runners import greedy

    sample, _, _ = greedy(runner, prompt, config.new_tokens, eos)
    runs = [greedy(runner, prompt, config.new_tokens) for _ in range(config.repeats)]
    return [t for t in sample if t not in eos], {
        "first_token_ms": statistics.median(r[1] for r in runs) * 1e3,
        "decode_tokens_per_s": statistics.median((len(r[0]) - 1) / r[2] for r in runs),
    }


def load_runner(folder: Path, fmt: str, threads: int, adapter: Path | None = None) -> Runner:
    from tasks.runtimes.runners import HfRunner, OrtRunner

    return OrtRunner(folder, threads, adapter) if fmt == ONNX else HfRunner(folder, adapter)


def measure(
    config: Config, ctx: StepContext, model: Model, tokenizer: Any, prompt: list[int]
) -> dict[str, Any]:
    """Load the model, score the data set if any, time generation. The model is freed on
    return, before onnxruntime-genai loads its own copy."""
    from tasks.runtimes.runners import greedy

    started = time.perf_counter()
    runner = load_runner(model.folder, model.fmt, config.threads, model.adapter)
    metrics: dict[str, Any] = {"load_s": time.perf_counter() - started}
    if config.data:
        if config.split != "heldout":
            ctx.log(f"scoring the {config.split} split: for debugging; report held-out perplexity")
        text = read_text(ctx.data[config.data], config.split)
        metrics |= text_perplexity(runner, tokenizer, text, config.seq_len, config.max_tokens, ctx)
    eos = eos_ids(model.folder, tokenizer)
    sample, timings = time_generation(runner, prompt, config, eos)
    metrics |= timings
    metrics["sample"] = tokenizer.decode(sample, skip_special_tokens=True)
    if model.answers and model.fmt == HF:  # ONNX models answer in onnxruntime-genai, below

        def generate(ids: list[int]) -> list[int]:
            return greedy(runner, ids, config.answer_tokens, eos)[0]

        metrics |= score_answers(generate, tokenizer, model, config, ctx)
    return metrics


def context_length(folder: Path) -> int | None:
    """The longest sequence the model takes, from genai_config.json or config.json."""
    genai, hf = folder / GENAI_CONFIG, folder / "config.json"
    if genai.is_file():
        return json.loads(genai.read_text())["model"].get("context_length")
    if hf.is_file():
        return json.loads(hf.read_text()).get("max_position_embeddings")
    return None


def require_onnx_runtimes(folder: Path) -> None:
    """The ONNX extra is optional: say how to install it before any model is loaded."""
    modules = ["onnxruntime"] + (["onnxruntime_genai"] if (folder / GENAI_CONFIG).is_file() else [])
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise PreflightError(
                f"evaluating the ONNX model {folder} needs '{module}': pip install 'modelkiln[onnx]'"
            )


@frozen
class Model(Record):
    """What an evaluate step runs: a model folder, maybe a LoRA adapter on it, and the
    fine-tune's prompt format when there are answers to score."""

    folder: Path
    fmt: str  # HF or ONNX
    adapter: Path | None = None  # a PEFT folder (HF) or an .onnx_adapter file (ONNX)
    answers: Any = None  # tasks.tune.examples.Format with an answer_field, or None

    def size_bytes(self) -> int:
        extra = 0
        if self.adapter is not None:
            extra = (
                size_bytes(self.adapter) if self.adapter.is_dir() else self.adapter.stat().st_size
            )
        return size_bytes(self.folder) + extra


def resolve_model(ctx: StepContext) -> Model:
    """The input as a runnable model: a finetune step's PEFT adapter runs on its base model,
    an adapter step's .onnx_adapter on its shared ONNX base (both found in the store)."""
    from tasks.formats.finetune import ADAPTER_INFO, FINETUNE_INFO
    from tasks.tune.examples import Format

    assert ctx.input is not None
    source = ctx.steps.get("prompts_from", ctx.input)
    fmt_file = source / FINETUNE_INFO
    answers = None
    if fmt_file.is_file():
        answers = Format(**json.loads(fmt_file.read_text(encoding="utf-8"))["format"])
        answers = answers if answers.answer_field else None
    if (ctx.input / ADAPTER_INFO).is_file():
        info = json.loads((ctx.input / ADAPTER_INFO).read_text())
        base = ctx.entry(info["base_key"])
        return Model(base, ONNX, ctx.input / info["adapter"], answers)
    if (ctx.input / FINETUNE_INFO).is_file():
        info = json.loads((ctx.input / FINETUNE_INFO).read_text())
        return Model(ctx.entry(info["base_key"]), HF, ctx.input, answers)
    fmt = ONNX if any(ctx.input.glob("*.onnx")) else HF
    return Model(ctx.input, fmt, None, answers)


def score_answers(
    generate: Any, tokenizer: Any, model: Model, config: Config, ctx: StepContext
) -> dict[str, Any]:
    """Accuracy of the answers read from the first generated tokens on held-out records."""
    from tasks.tune.examples import answer_accuracy, read_records

    if not config.data:
        raise StageError("scoring answers needs data", fix="set data = the fine-tune's data set")
    records = read_records(ctx.data[config.data], "heldout")[: config.answers]
    return answer_accuracy(
        generate, tokenizer, records, model.answers, ctx.progress(records, "answers")
    )


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from tasks.quant.threads import fixed_threads
    from tasks.runtimes.runners import genai_answers, genai_metrics

    model = resolve_model(ctx)
    if not config.answers:
        model = dataclasses.replace(model, answers=None)
    folder = model.folder
    if model.fmt == ONNX:
        require_onnx_runtimes(folder)
    limit = context_length(folder)
    if config.data and limit and config.seq_len > limit:
        raise StageError(f"seq_len {config.seq_len} is longer than the model's context {limit}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    metrics: dict[str, Any] = {"format": model.fmt, "size_bytes": model.size_bytes()}
    if model.adapter is not None:
        metrics["adapter"] = True
    prompt = prompt_ids(tokenizer, config)
    with fixed_threads(config.threads):  # restored after: doit goes on to other steps
        metrics |= measure(config, ctx, model, tokenizer, prompt)
    if model.fmt == ONNX:
        eos = eos_ids(folder, tokenizer)
        args = (config.new_tokens, config.repeats, config.threads, eos)
        metrics |= genai_metrics(folder, prompt, *args, adapter=model.adapter)
        if model.answers and (folder / GENAI_CONFIG).is_file():
            with genai_answers(folder, config.threads, model.adapter, config.answer_tokens) as gen:
                metrics |= score_answers(gen, tokenizer, model, config, ctx)
    ctx.log(summary(metrics))
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    parts = [metrics["format"], f"{metrics['size_bytes'] / 1e6:.1f} MB"]
    if "perplexity" in metrics:
        parts.append(f"perplexity {metrics['perplexity']:.3f} ({metrics['tokens_scored']} tokens)")
    parts.append(f"load {metrics['load_s']:.2f} s, first token {metrics['first_token_ms']:.1f} ms")
    parts.append(f"{metrics['decode_tokens_per_s']:.1f} tok/s")
    if "genai_decode_tokens_per_s" in metrics:
        parts.append(f"genai {metrics['genai_decode_tokens_per_s']:.1f} tok/s")
    if "answer_accuracy" in metrics:
        parts.append(f"answers {metrics['answer_accuracy']:.1%} of {metrics['answers_scored']}")
    return ", ".join(parts)


SPEC = StageSpec(
    stage="evaluate",
    algorithm=None,
    version="1",
    config=Config,
    run=run,
    doc="perplexity on held-out text, size on disk, load time, latency and tokens/s",
    inputs=(HF, ONNX, PEFT, ONNX_ADAPTER),
    output=METRICS,
    libraries=("transformers", "torch", "onnxruntime", "onnxruntime-genai", "tokenizers"),
    needs={"transformers": "pip install modelkiln", "torch": "pip install modelkiln"},
    data_fields=("data",),
    step_fields={"prompts_from": (PEFT,)},
)
