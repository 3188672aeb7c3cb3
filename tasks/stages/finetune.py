"""Fine-tune a LoRA adapter on a float or quantized Hugging Face model.

```toml
[finetune.awq-tone]
from = "quantize.awq"              # trains against the int4 weights the ONNX model will have
method = "lora"                    # or "qlora": a float base loaded as bitsandbytes NF4
data = "tone"
text_template = "<|im_start|>user\\n{phrase}<|im_end|>\\n<|im_start|>assistant\\n{tone}<|im_end|>"
answer_field = "tone"              # loss only from {tone} on; also what evaluate scores
max_steps = 100
```

Output: the PEFT adapter (adapter_model.safetensors, adapter_config.json), `finetune.json`
(the base it belongs to and how records become prompts), and in the manifest the train and
held-out loss curves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from tasks.config import ConfigValueError, StageConfig, option, refuse_inapplicable, stage_config
from tasks.errors import StageError
from tasks.formats.finetune import FINETUNE_INFO
from tasks.stages import HF, StageSpec, StepContext
from tasks.tune.lora import DEFAULT_TARGETS

PEFT = "peft"  # the output format: a PEFT adapter for the input model


@stage_config
class Config(StageConfig):
    """One LoRA adapter trained on a named data set."""

    method: Literal["lora", "qlora"] = option(
        "lora", "lora: train against the input's weights as they are (float, or de-quantized "
        "int4); qlora: load a float input as bitsandbytes NF4 first",
    )  # fmt: skip
    data: str = option("", "name of the [data.<name>] set to train on (its train split)")
    text_template: str = option("", "how a record becomes text: '{phrase} -> {tone}'")
    chat_template: bool = option(
        False, "instead of text_template: the tokenizer's chat template, prompt_field as the "
        "user turn and answer_field as the assistant's",
    )  # fmt: skip
    prompt_field: str = option("", "chat_template: the field holding the user's message")
    answer_field: str = option(
        "", "the field that is the answer: the loss covers only the text from it on, and "
        "evaluate scores it; empty: the loss covers the whole text",
    )  # fmt: skip
    r: int = option(16, "LoRA rank", ge=1)
    alpha: int = option(32, "LoRA alpha (the update is scaled by alpha / r)", ge=1)
    dropout: float = option(0.05, "dropout on the LoRA input")
    target_modules: tuple[str, ...] = option(
        DEFAULT_TARGETS, "module names to adapt (default: every linear of the decoder)"
    )
    learning_rate: float = option(2e-4, "peak learning rate (AdamW)")
    warmup_steps: int = option(10, "steps of linear warm-up, then linear decay to zero")
    max_steps: int = option(100, "optimizer steps", ge=1)
    batch_size: int = option(8, "examples per forward pass", ge=1)
    grad_accum: int = option(1, "forward passes per optimizer step", ge=1)
    seq_len: int = option(256, "examples are cut to this many tokens", ge=1)
    eval_every: int = option(20, "held-out loss every this many steps (and at the end)", ge=1)
    eval_samples: int = option(64, "held-out examples the loss is measured on (0: none)", ge=0)
    seed: int = option(0, "seed of the shuffle, dropout and LoRA initialisation")
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", "where to train: auto takes a GPU when there is one"
    )

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigValueError("data", "a fine-tune needs data", 'set data = "<name>"')
        if bool(self.text_template) == self.chat_template:
            raise ConfigValueError(
                "text_template",
                "set both with chat_template" if self.chat_template else "not set",
                "set exactly one of text_template or chat_template = true",
            )
        if self.chat_template and not (self.prompt_field and self.answer_field):
            raise ConfigValueError(
                "prompt_field", "chat_template needs prompt_field and answer_field",
                'e.g. prompt_field = "phrase", answer_field = "tone"',
            )  # fmt: skip
        if self.prompt_field and not self.chat_template:
            raise ConfigValueError(
                "prompt_field", "only applies with chat_template = true", "remove it"
            )
        for key, ok in (
            ("warmup_steps", 0 <= self.warmup_steps < self.max_steps),
            ("learning_rate", self.learning_rate > 0),
            ("dropout", 0 <= self.dropout < 1),
            ("target_modules", bool(self.target_modules)),
        ):
            if not ok:
                raise ConfigValueError(key, f"{getattr(self, key)!r} is not allowed", _RULES[key])
        refuse_inapplicable(self, NARROW_SETTINGS)


# Without held-out examples there is no held-out loss to measure every so many steps.
NARROW_SETTINGS = (
    ("eval_every", lambda c: c.eval_samples > 0, "a held-out loss (eval_samples > 0)"),
)

_RULES = {
    "warmup_steps": "make it at least 0 and below max_steps",
    "learning_rate": "make it positive, e.g. 2e-4",
    "dropout": "make it at least 0 and below 1",
    "target_modules": 'name at least one module, e.g. ["q_proj", "v_proj"]',
}


def example_format(config: Config) -> Any:
    from tasks.tune.examples import Format

    return Format(
        text_template=config.text_template,
        chat_template=config.chat_template,
        prompt_field=config.prompt_field,
        answer_field=config.answer_field,
    )


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from tasks.runtimes.torch_lm import pick_device
    from tasks.tune import examples as ex
    from tasks.tune.lora import attach_lora, layers_without_gradient, load_base
    from tasks.tune.trainer import Schedule, train

    assert ctx.input is not None
    data_dir = ctx.data[config.data]
    fmt = example_format(config)
    train_records = ex.read_records(data_dir, "train")
    heldout_records = ex.read_records(data_dir, "heldout")
    key = "prompt_field/answer_field" if config.chat_template else "text_template"
    ex.check_fields(fmt, train_records, config.data, key)
    tokenizer = AutoTokenizer.from_pretrained(ctx.input)
    encode = lambda r: ex.encode(ex.make_example(fmt, r, tokenizer), tokenizer, config.seq_len)  # noqa: E731
    train_rows = [encode(r) for r in train_records]
    eval_rows = [encode(r) for r in heldout_records[: config.eval_samples]]

    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    ctx.log(f"{config.method} on {device.type}: loading the base model")
    model = attach_lora(
        load_base(ctx.input, config.method, device),
        config.r, config.alpha, config.dropout, config.target_modules,
    )  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def check_gradients() -> None:
        dead = layers_without_gradient(model)
        if dead:
            raise StageError(
                f"no gradient reached {len(dead)} LoRA layers ({', '.join(dead[:3])}, ...) "
                "after the first step: the adapter would not learn there"
            )

    schedule = Schedule(
        max_steps=config.max_steps, batch_size=config.batch_size, grad_accum=config.grad_accum,
        learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
        eval_every=config.eval_every, seed=config.seed,
    )  # fmt: skip
    history = train(
        model, train_rows, eval_rows, schedule, ex.pad_id(tokenizer), device,
        lambda steps: ctx.progress(steps, "training", total=config.max_steps), check_gradients,
    )  # fmt: skip
    model.save_pretrained(ctx.out)
    _portable_adapter_config(ctx.out / "adapter_config.json")
    # PEFT's model card template: boilerplate around the base's absolute path (a store entry).
    (ctx.out / "README.md").unlink(missing_ok=True)
    # The base by key (the input entry's name): the adapter means nothing without it.
    info = {"method": config.method, "format": fmt.as_dict(), "base_key": ctx.input.name}
    (ctx.out / FINETUNE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    steps_per_s = config.max_steps / history.seconds
    first, last = history.train[0][1], history.train[-1][1]
    ctx.log(f"{config.max_steps} steps in {history.seconds:.0f} s ({steps_per_s:.2f} steps/s), "
            f"loss {first:.3f} -> {last:.3f}")  # fmt: skip
    return {
        "method": config.method,
        "device": device.type,
        "trainable_params": trainable,
        "lora_layers": len(
            {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
        ),
        "train_examples": len(train_rows),
        "seconds": round(history.seconds, 2),
        "steps_per_s": round(steps_per_s, 4),
        "train_loss": history.train,
        "heldout_loss": history.heldout,
    }


def _portable_adapter_config(path: Path) -> None:
    """PEFT records the base's absolute path (a store entry here); the base is recorded in
    finetune.json by key instead, so the folder means the same wherever it is copied. PEFT
    keeps target_modules as a set: its order changes from one process to the next."""
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = None
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


SPEC = StageSpec(
    stage="finetune",
    algorithm=None,
    version="2",  # 2: no README.md (it named the base's path); target_modules sorted
    config=Config,
    run=run,
    doc="train a LoRA adapter on a Hugging Face model (float or quantized)",
    inputs=(HF,),
    output=PEFT,
    libraries=("torch", "transformers", "peft", "bitsandbytes"),
    needs={"peft": "pip install 'modelkiln[finetune]'"},
    data_fields=("data",),
)
