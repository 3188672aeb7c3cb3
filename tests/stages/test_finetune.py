"""Fine-tuning on the tiny model: what training touches, where gradients go (bitsandbytes'
CPU trap included), prompt/answer examples, and one clear error per bad setting."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tasks.config import parse_config
from tasks.errors import RecipeError, StageError
from tasks.stages import StepContext, spec_for
from tasks.stages.finetune import Config
from tasks.tune.examples import IGNORE, Format, encode, make_example, read_answer
from tasks.tune.lora import attach_lora, keep_4bit_trainable, layers_without_gradient, lora_layers

TONES = {"positive": ("good", "great", "lovely"), "negative": ("bad", "awful", "sad")}
TONES["neutral"] = ("the", "some", "a")
TEMPLATE = "<|im_start|>{phrase}<|im_end|>{tone}<|im_end|>"
TUNE = {"data": "tone", "text_template": TEMPLATE, "answer_field": "tone", "max_steps": 6,
        "batch_size": 4, "warmup_steps": 1, "eval_every": 3, "eval_samples": 8,
        "learning_rate": 1e-3}  # fmt: skip


def tone_records(n: int = 80, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        tone = rng.choice(sorted(TONES))
        phrase = f"the fox is {rng.choice(TONES[tone])} today"
        records.append({"text": phrase, "phrase": phrase, "tone": tone, "id": str(i)})
    return records


def write_data(folder: Path, records: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cut = len(records) * 3 // 4
    for split, part in (("train", records[:cut]), ("heldout", records[cut:])):
        lines = [json.dumps(r) for r in part]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def tone_data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("tone") / "data", tone_records())


def finetune(src: Path, data: Path, out: Path, **table: Any) -> dict[str, Any]:
    spec = spec_for("finetune", None)
    config = parse_config(spec.config, TUNE | table, "recipe.toml", "finetune.t")
    out.mkdir(parents=True)
    ctx = StepContext(task="finetune:t", out=out, artifacts=out.parent, input=src,
                      data={"tone": data})  # fmt: skip
    return spec.run(config, ctx)


def test_lora_training_writes_only_adapter_weights_and_leaves_the_base_as_it_was(
    tiny_model, tone_data, tmp_path
):
    before = load_file(tiny_model / "model.safetensors")
    metrics = finetune(tiny_model, tone_data, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert metrics["lora_layers"] == 14  # 7 projections x 2 layers
    assert any(t.abs().sum() > 0 for k, t in saved.items() if ".lora_B." in k)  # it learned
    after = load_file(tiny_model / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(metrics["train_loss"]) == 6 and [s for s, _ in metrics["heldout_loss"]] == [3, 6]
    info = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert info["base_key"] == tiny_model.name and info["format"]["answer_field"] == "tone"
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None  # no store path baked in


def test_training_only_moves_lora_parameters(tiny_model, tone_data):
    from tasks.tune.examples import collate

    model = attach_lora(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_model),
        4, 8, 0.0, ("q_proj", "v_proj"),
    )  # fmt: skip
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = [([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4])] * 2
    for _ in range(3):
        model(**collate(rows, 0)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert set(lora_layers(model)) and all(
        "q_proj" in n or "v_proj" in n for n in lora_layers(model)
    )


def _qlora_model(tiny_model: Path, fix: bool) -> Any:
    from tasks.tune.lora import load_base

    if fix:
        model = load_base(tiny_model, "qlora", torch.device("cpu"))
    else:  # what bitsandbytes does left alone
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=nf4)
    return attach_lora(model, 4, 8, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"))  # fmt: skip


def _grads_after_eval_pass(model: Any) -> list[str]:
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the eval pass that triggers bitsandbytes' CPU repack
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return layers_without_gradient(model)


def test_qlora_gradients_reach_every_lora_layer_after_an_eval_pass(tiny_model):
    pytest.importorskip("bitsandbytes")
    model = _qlora_model(tiny_model, fix=True)
    assert (
        type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__
        == "Linear4bit"
    )
    assert _grads_after_eval_pass(model) == []
    assert len(lora_layers(model)) == 14


def test_without_the_guard_bitsandbytes_loses_gradients_after_an_eval_pass(tiny_model):
    """The trap the guard exists for, on CPUs that have it (AVX512-BF16)."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn.modules import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    model = _qlora_model(tiny_model, fix=False)
    try:  # silently missing gradients, or (with some shapes) a failing backward
        dead = _grads_after_eval_pass(model)
    except RuntimeError as err:
        dead = [f"backward failed: {err}"]
    assert dead, "bitsandbytes no longer repacks on eval: the guard may be unnecessary"
    assert keep_4bit_trainable(model) == 14  # and the guard reaches every 4-bit layer


def test_qlora_refuses_an_already_quantized_base(tmp_path, tone_data, tiny_model):
    (tmp_path / "q").mkdir()
    for f in tiny_model.iterdir():
        (tmp_path / "q" / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(StageError, match='(?s)already quantized.*method = "lora"'):
        finetune(tmp_path / "q", tone_data, tmp_path / "out", method="qlora")


def test_a_template_field_the_data_lacks_is_one_error_listing_the_fields(
    tiny_model, tone_data, tmp_path
):
    with pytest.raises(StageError) as err:
        finetune(tiny_model, tone_data, tmp_path / "out", text_template="{phrse} -> {tone}")
    message = str(err.value)
    assert "'phrse'" in message and "did you mean phrase?" in message
    assert "['text', 'phrase', 'tone', 'id']" in message


def test_examples_put_the_loss_on_the_answer_only(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    fmt = Format(text_template=TEMPLATE, answer_field="tone")
    example = make_example(fmt, {"phrase": "a {fox}", "tone": "good"}, tok)
    assert example.prompt == "<|im_start|>a {fox}<|im_end|>" and example.answer == "good<|im_end|>"
    ids, labels = encode(example, tok, 64)
    prompt_len = len(tok(example.prompt).input_ids)
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and len(ids) > prompt_len
    whole = encode(make_example(Format(text_template=TEMPLATE), {"phrase": "x", "tone": "y"}, tok),
                   tok, 64)  # fmt: skip
    assert IGNORE not in whole[1]  # no answer field: the loss covers everything
    assert len(encode(example, tok, 3)[0]) == 3


def test_chat_template_examples_split_at_the_assistant_turn(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fmt = Format(chat_template=True, prompt_field="phrase", answer_field="tone")
    example = make_example(fmt, {"phrase": "nice fox", "tone": "positive"}, tok)
    assert example.prompt.endswith("<|im_start|>assistant\n")
    assert example.answer == "positive<|im_end|>\n" and example.gold == "positive"


def test_answers_are_read_from_the_first_tokens():
    labels = ["negative", "neutral", "positive"]
    assert read_answer(" Positive!", labels) == "positive"
    assert read_answer("neutral, mostly", labels) == "neutral"
    assert read_answer("I think it is positive", labels) is None


@pytest.mark.parametrize(
    "table, key, message",
    [
        ({"data": ""}, "data", "needs data"),
        ({"text_template": ""}, "text_template", "exactly one of text_template or chat_template"),
        ({"chat_template": True, "answer_field": "tone", "text_template": ""}, "prompt_field",
         "needs prompt_field and answer_field"),
        ({"warmup_steps": 6}, "warmup_steps", "below max_steps"),
        ({"r": 0}, "r", "1 or more"),
        ({"method": "dora"}, "method", "'lora' | 'qlora'"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_clear_error(table, key, message):
    with pytest.raises(RecipeError) as err:
        parse_config(Config, TUNE | table, "recipe.toml", "finetune.t")
    assert key in str(err.value) and message in str(err.value)


def test_a_missing_target_module_names_the_models_linears(tiny_model, tone_data, tmp_path):
    with pytest.raises(StageError, match=r"q_proj.*v_proj|\['down_proj'"):
        finetune(tiny_model, tone_data, tmp_path / "out", target_modules=["qkv"])


@pytest.mark.gpu
def test_training_runs_on_cuda(tiny_model, tone_data, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    metrics = finetune(tiny_model, tone_data, tmp_path / "out", device="cuda", max_steps=20)
    assert metrics["device"] == "cuda"
    cpu = finetune(tiny_model, tone_data, tmp_path / "cpu", device="cpu", max_steps=20)
    print(f"steps/s: cuda {metrics['steps_per_s']:.1f}, cpu {cpu['steps_per_s']:.1f}")
