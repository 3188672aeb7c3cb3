"""The evaluate stage on the tiny model, as a Hugging Face directory and as a genai builder folder."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tasks.config import parse_config
from tasks.errors import PreflightError, RecipeError, StageError
from tasks.formats.text import read_text
from tasks.runtimes.perplexity import perplexity, special_prefix, token_nll, token_windows
from tasks.stages import StepContext, spec_for
from tasks.stages.evaluate import Config, prompt_ids, run, size_bytes

# Small enough to keep the module's runs to seconds; still several windows.
FAST = Config(data="prose", seq_len=64, max_tokens=400, new_tokens=8, repeats=2)


@pytest.fixture(scope="module")
def data_dir(prose_file: Path, tmp_path_factory) -> Path:
    """A data set entry: paragraphs of the prose as JSON lines, split train/held-out."""
    paragraphs = prose_file.read_text(encoding="utf-8").split("\n\n")
    out = tmp_path_factory.mktemp("data")
    for name, part in (("train", paragraphs[:40]), ("heldout", paragraphs[40:])):
        lines = [json.dumps({"text": p.strip()}) for p in part]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def onnx_folder(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny model through onnxruntime-genai's model builder, fp32 on the CPU."""
    work = tmp_path_factory.mktemp("builder")
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_model)]
    command += ["-o", str(work / "onnx"), "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")]
    subprocess.run(command, check=True, capture_output=True)
    return work / "onnx"


def evaluate(folder: Path, data: Path, tmp: Path, config: Config = FAST) -> dict[str, Any]:
    out = tmp / "out"
    out.mkdir(parents=True, exist_ok=True)
    ctx = StepContext(task="evaluate:test", out=out, artifacts=tmp, input=folder)
    ctx.data["prose"] = data
    return run(config, ctx)


@pytest.fixture(scope="module")
def hf_metrics(tiny_model: Path, data_dir: Path, tmp_path_factory) -> dict[str, Any]:
    return evaluate(tiny_model, data_dir, tmp_path_factory.mktemp("eval_hf"))


@pytest.fixture(scope="module")
def onnx_metrics(onnx_folder: Path, data_dir: Path, tmp_path_factory) -> dict[str, Any]:
    return evaluate(onnx_folder, data_dir, tmp_path_factory.mktemp("eval_onnx"))


def test_uniform_logits_give_the_vocabulary_size() -> None:
    import numpy as np

    logits = np.zeros((5, 320), dtype=np.float32)
    assert perplexity(logits, np.array([0, 7, 319, 3, 3])) == pytest.approx(320)


def test_perplexity_by_hand() -> None:
    import numpy as np

    # p(label) = 3/4 and 1/2: NLLs ln(4/3) and ln 2, perplexity sqrt(4/3 * 2).
    logits = np.array([[0.0, math.log(3.0)], [5.0, 5.0]])
    assert token_nll(logits, np.array([1, 0])) == pytest.approx([math.log(4 / 3), math.log(2)])
    assert perplexity(logits, np.array([1, 0])) == pytest.approx(math.sqrt(8 / 3))


def test_windows_score_every_text_token_once() -> None:
    ids = list(range(100, 123))
    windows = token_windows(ids, [], seq_len=8, max_tokens=1000)
    assert all(len(w) <= 8 for w in windows)
    assert [t for w in windows for t in w[1:]] == ids[1:]  # the first token has no context
    with_bos = token_windows(ids, [1], seq_len=8, max_tokens=10)
    assert all(w[0] == 1 for w in with_bos)
    assert [t for w in with_bos for t in w[1:]] == ids[:10]


def test_config_is_validated() -> None:
    with pytest.raises(RecipeError, match="new_tokens = 1 is below the minimum 2"):
        parse_config(Config, {"new_tokens": 1}, "r.toml", "evaluate.x")
    with pytest.raises(RecipeError, match="split"):
        parse_config(Config, {"split": "test"}, "r.toml", "evaluate.x")
    assert spec_for("evaluate", None).data_fields == ("data",)


def test_chat_template_wraps_the_prompt(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    plain = prompt_ids(tokenizer, Config())
    assert plain == tokenizer("What is the capital of France?").input_ids
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    wrapped = prompt_ids(tokenizer, Config())
    assert wrapped[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompt_ids(tokenizer, Config(chat_template=False)) == plain


def test_size_counts_every_file_of_the_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 5)
    assert size_bytes(tmp_path) == 15


def test_hf_and_onnx_score_the_same_tokens_alike(hf_metrics: dict, onnx_metrics: dict) -> None:
    assert (hf_metrics["format"], onnx_metrics["format"]) == ("hf", "onnx")
    assert hf_metrics["tokens_scored"] == onnx_metrics["tokens_scored"] == 400
    assert onnx_metrics["perplexity"] == pytest.approx(hf_metrics["perplexity"], rel=5e-3)
    # A random model: near its vocabulary size, and a real number.
    assert 100 < hf_metrics["perplexity"] < 1000
    assert onnx_metrics["sample"] == hf_metrics["sample"]  # fp32 greedy tokens match


@pytest.mark.parametrize("which", ["hf_metrics", "onnx_metrics"])
def test_latency_and_size(which: str, request: pytest.FixtureRequest) -> None:
    metrics = request.getfixturevalue(which)
    for key in ("size_bytes", "load_s", "first_token_ms", "decode_tokens_per_s"):
        assert metrics[key] > 0, key
    assert isinstance(metrics["sample"], str)
    json.dumps(metrics)  # goes into the manifest as is


def test_genai_is_measured_for_a_builder_folder(onnx_metrics: dict, hf_metrics: dict) -> None:
    assert onnx_metrics["genai_decode_tokens_per_s"] > 0
    assert onnx_metrics["genai_first_token_ms"] > 0
    assert onnx_metrics["genai_load_s"] > 0
    # Texts are not compared: genai and transformers decode the random model's broken UTF-8
    # differently. The tokens are compared below.
    assert isinstance(onnx_metrics["genai_sample"], str)
    assert "genai_sample" not in hf_metrics


def test_genai_and_onnxruntime_greedy_tokens_match(onnx_folder: Path) -> None:
    from tasks.runtimes.onnx import genai_greedy
    from tasks.runtimes.runners import OrtRunner, genai_model, greedy

    prompt, eos = [57, 74, 301, 223, 75, 85], frozenset({0})
    ours, _, _ = greedy(OrtRunner(onnx_folder, threads=1), prompt, 12, eos)
    theirs, _, _ = genai_greedy(genai_model(onnx_folder, 1), prompt, 12)
    assert theirs == ours


def test_a_bos_tokenizer_starts_every_window_with_bos(tiny_model: Path) -> None:
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert special_prefix(tokenizer) == []
    bos = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tokenizer.backend_tokenizer.post_processor = bos  # as Llama's tokenizers do
    assert special_prefix(tokenizer) == [0]


def test_without_data_no_perplexity(tiny_model: Path, data_dir: Path, tmp_path: Path) -> None:
    config = Config(new_tokens=FAST.new_tokens, repeats=1)  # no perplexity settings either
    metrics = evaluate(tiny_model, data_dir, tmp_path, config)
    assert "perplexity" not in metrics and "tokens_scored" not in metrics
    assert metrics["size_bytes"] > 0 and metrics["decode_tokens_per_s"] > 0


def test_errors_before_loading_a_model(
    tiny_model: Path, onnx_folder: Path, data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    with pytest.raises(StageError, match="longer than the model's context 512"):
        evaluate(tiny_model, data_dir, tmp_path, replace(FAST, seq_len=1024))
    with pytest.raises(StageError, match="no train.jsonl"):
        read_text(tmp_path, "train")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(PreflightError, match="modelkiln\\[onnx\\]"):
        evaluate(onnx_folder, data_dir, tmp_path)
