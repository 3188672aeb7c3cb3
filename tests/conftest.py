"""Shared fixtures: a tiny random Llama with a tokenizer trained on the spot, and prose."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread: on a shared 2-core box more threads ran several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

PROSE = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the fire. "
    "A small model learns to count words, and the words count back. "
    "Rain fell on the old town all night; in the morning the streets shone. "
    "She wrote letters to the sea and the sea wrote nothing back. "
)


def tiny_text(paragraphs: int = 60) -> str:
    """Deterministic English-like prose, paragraphs separated by blank lines."""
    words = PROSE.split()
    out = []
    for i in range(paragraphs):
        rot = words[i % len(words) :] + words[: i % len(words)]
        out.append(" ".join(rot[: 20 + i % 17]) + ".")
    return "\n\n".join(out) + "\n"


def build_tiny_model(out: Path, vocab_size: int = 320, hidden: int = 64) -> Path:
    """A random LlamaForCausalLM saved as a Hugging Face directory with a BPE tokenizer.

    vocab_size differs from every Linear's out_features: onnxruntime-genai's builder finds the
    LM head by `out_features == vocab_size`.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([tiny_text()] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=fast.vocab_size if fast.vocab_size != hidden else vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny HF model directory; treat it as read-only (copy it to change it)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def prose_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prose") / "prose.txt"
    path.write_text(tiny_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def fp32(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny model captured by the genai builder, fp32 on the CPU; read-only."""
    from tasks.stages import StepContext
    from tasks.stages.capture import Config, run

    out = tmp_path_factory.mktemp("quantize") / "fp32"
    out.mkdir()
    run(Config(), StepContext(task="capture:fp32", out=out, artifacts=out.parent, input=tiny_model))
    return out
