"""Shared fixtures: a tiny random Llama with a tokenizer trained on the spot, and prose."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


def once_per_run(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """The folder `name`, filled by make(folder) once per test run: pytest-xdist's workers share
    it (the first fills it under a lock while the others wait), as its docs suggest for
    session fixtures. For inputs that are the same bytes wherever they are made."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, above each worker's own
    folder, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny HF model directory; treat it as read-only (copy it to change it)."""
    return once_per_run(tmp_path_factory, "tiny", lambda f: build_tiny_model(f / "model")) / "model"


@pytest.fixture(scope="session")
def prose_file(tmp_path_factory) -> Path:
    def write(folder: Path) -> None:
        (folder / "prose.txt").write_text(tiny_text(), encoding="utf-8")

    return once_per_run(tmp_path_factory, "prose", write) / "prose.txt"


@pytest.fixture(scope="session")
def tiny_built(tiny_model: Path, prose_file: Path, tmp_path_factory) -> Path:
    """The artifacts folder of a workspace that built the tiny recipe's model, data:prose and
    capture:fp32, once per run: `Workspace.seed` copies them into a test's store."""
    from workspace import Workspace, tiny_recipe

    def build(folder: Path) -> None:
        ws = Workspace(folder)
        ws.write(tiny_recipe(tiny_model, prose_file))
        ws.doit("model", "data", "capture:fp32")

    return once_per_run(tmp_path_factory, "tiny-built", build) / "artifacts"


@pytest.fixture(scope="session")
def fp32(tiny_built: Path) -> Path:
    """The tiny model captured by the genai builder, fp32 on the CPU (tiny_built's entry);
    read-only."""
    return (tiny_built / "recipe" / "capture" / "fp32").resolve()


# ---- S3: one moto server per session (per xdist worker), a fresh bucket per test ----------


class S3Server:
    """A moto S3 server on 127.0.0.1: its endpoint, the environment a `doit` subprocess needs
    to reach it (dummy credentials, no retries, no ~/.aws files), fresh buckets, and a switch
    that makes it refuse every request's credentials."""

    def __init__(self, endpoint: str, home: Path) -> None:
        self.endpoint = endpoint
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": "1",  # a failure test fails at once, not after retries
            "AWS_RETRY_MODE": "standard",
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-credentials"),
            "AWS_CONFIG_FILE": str(home / "no-config"),
        }

    def bucket(self) -> str:
        """A new, empty bucket's name (made with explicit credentials: no environment needed)."""
        import uuid

        import s3fs

        name = f"kiln-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(
            key="testing", secret="testing", endpoint_url=self.endpoint, skip_instance_cache=True
        )
        fs.mkdir(name)
        return name

    @contextlib.contextmanager
    def refusing_credentials(self) -> Iterator[None]:
        """Every request is authenticated while inside: moto knows no access key, so each one
        is refused (403 InvalidAccessKeyId). Process-wide: every server of this worker."""
        import urllib.request

        def auth_after(count: str) -> None:
            request = urllib.request.Request(
                f"{self.endpoint}/moto-api/reset-auth",
                data=count.encode(),
                headers={"Content-Type": "application/octet-stream"},  # not a form: raw data
                method="POST",
            )
            urllib.request.urlopen(request, timeout=10).close()

        auth_after("0")
        try:
            yield
        finally:
            auth_after("inf")


@dataclass(frozen=True)
class S3Remote:
    """An empty bucket on the moto server: its URL, endpoint and the subprocess environment."""

    bucket: str
    endpoint: str
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    def settings(self, prefix: str = "") -> dict[str, str]:
        """RemoteStore.from_settings's input for the bucket (under prefix)."""
        return {"remote": f"{self.url}/{prefix}".rstrip("/"), "endpoint_url": self.endpoint}

    def table(self, prefix: str = "", **more: object) -> str:
        """A recipe's [store] table for the bucket (under prefix), with more settings."""
        items = {**self.settings(prefix), **more}
        return "\n[store]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in items.items())


def _toml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else f'"{value}"'


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One moto S3 server for the session (with xdist: one per worker)."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}", tmp_path_factory.mktemp("aws"))
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_endpoint(s3_server: S3Server) -> str:
    """The session's moto S3 server, http://127.0.0.1:<port>."""
    return s3_server.endpoint


@pytest.fixture
def s3_remote(s3_server: S3Server, monkeypatch) -> S3Remote:
    """A fresh bucket; this process's environment is set to reach it (dummy credentials), so
    RemoteStore calls made here work, and `env` is what a `doit` subprocess needs."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return S3Remote(s3_server.bucket(), s3_server.endpoint, dict(s3_server.env))
