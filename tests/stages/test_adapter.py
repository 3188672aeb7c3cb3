"""ONNX adapters on the tiny model: one shared LoRA-ready base per base model, adapter files
that reproduce the PEFT model, two adapters switched in one onnxruntime-genai process, and the
recipe errors around the chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from stages.test_finetune import TEMPLATE, tone_records
from workspace import Workspace

from tasks.errors import RecipeError
from tasks.formats.finetune import FINETUNE_INFO
from tasks.recipe import load_recipe
from tasks.stages import StepContext
from tasks.stages.adapter import Config as AdapterConfig
from tasks.stages.adapter import run as run_adapter
from tasks.stages.capture import Config as CaptureConfig
from tasks.stages.capture import run as run_capture
from tasks.store import read_manifest
from tasks.tune.onnx_lora import ADAPTER_FILE, read_slots

CHAIN = """
[model]
source = "{model}"

[data.tone]
path = "{data}"
format = "jsonl"

[quantize.rtn]
group_size = 32
"""

TUNE_TABLES = """
[finetune.{name}]
from = "{base}"
data = "tone"
text_template = "{template}"
answer_field = "tone"
max_steps = 4
batch_size = 4
warmup_steps = 1
eval_every = 2
eval_samples = 4

[adapter.{name}]
from = "finetune.{name}"
"""


def tune_tables(name: str, base: str, template: str = TEMPLATE) -> str:
    return TUNE_TABLES.format(name=name, base=base, template=template)


def chain(tmp_path: Path, model: Path, base: str = "quantize.rtn") -> Workspace:
    """A workspace whose recipe fine-tunes `base` (finetune.a) and makes its adapter.a."""
    data = tmp_path / "tone.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    data.write_text("\n".join(json.dumps(r) for r in tone_records(40)) + "\n")
    ws = Workspace(tmp_path)
    ws.write(CHAIN.format(model=model, data=data) + tune_tables("a", base))
    return ws


def test_the_recipe_adds_one_lora_base_per_base_model(tmp_path, tiny_model):
    ws = chain(tmp_path, tiny_model)
    ws.write(ws.recipe.read_text() + tune_tables("b", "quantize.rtn", "{phrase} => {tone}"))
    recipe = load_recipe(ws.recipe)
    for name in ("a", "b"):
        assert recipe.steps[f"adapter.{name}"].extra == (("base", "capture.rtn-lora"),)
    base = recipe.steps["capture.rtn-lora"]
    assert base.source == "quantize.rtn" and base.config.precision == "int4"
    assert base.config.lora_slots
    float_chain = load_recipe(chain(tmp_path / "f", tiny_model, base="model").recipe)
    assert float_chain.steps["capture.model-lora"].config.precision == "fp32"


def test_an_adapter_from_a_step_that_is_not_a_fine_tune_names_what_to_chain(tmp_path, tiny_model):
    ws = chain(tmp_path, tiny_model)
    ws.write(ws.recipe.read_text().replace('from = "finetune.a"', 'from = "quantize.rtn"'))
    with pytest.raises(RecipeError) as err:
        load_recipe(ws.recipe)
    message = str(err.value)
    assert "[adapter.a]" in message and "'quantize.rtn' is a quantize step" in message
    assert '[finetune.<name>] from = "quantize.rtn"' in message and "finetune.a" in message


def test_a_base_without_lora_slots_is_refused(tmp_path, tiny_model):
    ws = chain(tmp_path, tiny_model)
    text = ws.recipe.read_text().replace(
        'from = "finetune.a"\n', 'from = "finetune.a"\nbase = "capture.plain"\n'
    )
    ws.write(text + '\n[capture.plain]\nfrom = "quantize.rtn"\nprecision = "int4"\n')
    with pytest.raises(RecipeError, match="(?s)has no LoRA inputs.*lora_slots = true"):
        load_recipe(ws.recipe)


@pytest.mark.parametrize("base", ["quantize.rtn", "model"])
def test_the_onnx_base_with_the_adapter_matches_the_peft_model(tmp_path, tiny_model, base):
    ws = chain(tmp_path, tiny_model, base=base)
    ws.doit("adapter")
    entry = ws.artifacts / "recipe" / "adapter" / "a"
    metrics = read_manifest(entry)["metrics"]
    assert metrics["slots_filled"] == 10  # qkv, o, gate, up, down in 2 layers
    assert metrics["vs_peft"]["max_abs_logit_diff"] <= 1e-3
    assert metrics["vs_peft"]["top1_agreement"] == 1.0
    assert (entry / ADAPTER_FILE).is_file()
    if base == "model":
        return  # the reuse below is the same for any base (a fine-tune takes 12 s: once is enough)
    # A second adapter on the same base reuses the base entry: only its own steps run.
    ws.write(ws.recipe.read_text() + tune_tables("b", base, "{phrase} => {tone}"))
    out = ws.doit("adapter").stdout
    assert "-- capture:" in out and ".  finetune:b" in out and ".  adapter:b" in out


def _peft_adapter(base_hf: Path, out: Path, seed: int) -> Path:
    """A PEFT adapter with random, clearly non-zero weights, written as a finetune step does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_hf), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(out)
    info = {"method": "lora", "format": {"text_template": "{text}"}, "base_key": base_hf.name}
    (out / FINETUNE_INFO).write_text(json.dumps(info))
    return out


def test_two_adapters_switch_per_request_in_one_genai_process(tmp_path, tiny_model):
    import shutil

    import onnxruntime_genai as og

    from tasks.runtimes.torch_lm import load_peft_model

    base_hf = tmp_path / "base"  # found by the key its fine-tunes record, as the store would
    shutil.copytree(tiny_model, base_hf)
    onnx_base = tmp_path / "onnx-base"
    onnx_base.mkdir()
    run_capture(CaptureConfig(lora_slots=True),
                StepContext("capture:b", onnx_base, tmp_path, input=base_hf))  # fmt: skip
    assert len(read_slots(onnx_base / "model.onnx")) == 10
    adapters = {}
    for name, seed in (("first", 1), ("second", 2)):
        peft_dir = _peft_adapter(base_hf, tmp_path / "store" / "ad" / f"ad-{name}", seed)
        out = tmp_path / name
        out.mkdir()
        ctx = StepContext(f"adapter:{name}", out, tmp_path, input=peft_dir,
                          steps={"base": onnx_base}, find_entry={"base": base_hf}.__getitem__)  # fmt: skip
        metrics = run_adapter(AdapterConfig(), ctx)
        assert metrics["vs_peft"]["max_abs_logit_diff"] <= 1e-3
        adapters[name] = (out / ADAPTER_FILE, load_peft_model(base_hf, peft_dir))
    model = og.Model(str(onnx_base))
    loaded = og.Adapters(model)
    for name, (path, _) in adapters.items():
        loaded.load(str(path), name)
    prompt = [5, 9, 13, 17]

    def genai(name: str | None) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + 6, do_sample=False)
        gen = og.Generator(model, params)
        if name:
            gen.set_active_adapter(loaded, name)
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
        return list(gen.get_sequence(0)[len(prompt) :])

    def torch_greedy(peft_model) -> list[int]:
        out = peft_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        return out[0, len(prompt) :].tolist()

    # Interleaved requests: each gets its own adapter's answer, then none, then the first again.
    first, second, none, again = genai("first"), genai("second"), genai(None), genai("first")
    assert first == torch_greedy(adapters["first"][1])
    assert second == torch_greedy(adapters["second"][1])
    assert first != second and none not in (first, second) and again == first
