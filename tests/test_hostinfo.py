"""What a key says about the machine (tasks/hostinfo.py): the CPU's instruction level for the
calibrated quantizers, and the device `device = "auto"` stands for."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tasks import graph as graph_module
from tasks import hostinfo
from tasks.graph import load_graph
from tasks.runner import _as_keyed

AVX512 = "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl\n"


def test_levels_from_cpuinfo():
    assert hostinfo.level_of("processor : 0\n" + AVX512) == "avx512"
    assert hostinfo.level_of("flags : fpu sse2 avx avx2 fma avx512f\n") == "avx2"
    assert hostinfo.level_of("flags : fpu sse2 avx\n") == "baseline"


def test_the_level_is_what_torch_picks_here(monkeypatch):
    import torch

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    hostinfo.cpu_level.cache_clear()
    torch_level = torch.backends.cpu.get_cpu_capability().lower()
    assert hostinfo.cpu_level() == ("baseline" if torch_level == "default" else torch_level)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # torch obeys it, so the key does
    hostinfo.cpu_level.cache_clear()
    assert hostinfo.cpu_level() == "avx2"
    hostinfo.cpu_level.cache_clear()


def test_hidden_gpus_are_no_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hostinfo.gpu_models() == [] and hostinfo.resolve_device("auto") == "cpu"
    assert hostinfo.resolve_device("cuda") == "cuda"


RECIPE = """
[model]
source = "{model}"
[data.prose]
path = "{prose}"
format = "text"
[quantize.gptq]
bits = 4
group_size = 32
data = "prose"
[quantize.rtn]
bits = 4
group_size = 32
[capture.fp32]
precision = "fp32"
"""


def test_calibrated_keys_follow_the_cpu_and_auto_follows_the_gpu(
    tmp_path, tiny_model, prose_file, monkeypatch
):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(model=tiny_model, prose=prose_file))

    def keys(level: str, gpus: list[str]) -> dict[str, str]:
        monkeypatch.setattr(graph_module, "cpu_level", lambda: level)
        monkeypatch.setattr(graph_module, "gpu_models", lambda: gpus)
        monkeypatch.setattr(graph_module, "resolve_device", lambda c: "cuda" if gpus else "cpu")
        return load_graph(path, tmp_path / "artifacts").keys

    here, other_cpu, gpu = keys("avx512", []), keys("avx2", []), keys("avx512", ["NVIDIA H200"])
    changed = {ref for ref in here if here[ref] != other_cpu[ref]}
    assert changed == {"quantize.gptq"}  # RTN's rounding and an export are exact on any CPU
    changed = {ref for ref in here if here[ref] != gpu[ref]}
    assert changed == {"quantize.gptq", "quantize.rtn"}  # device = "auto": a GPU here
    graph = load_graph(path, tmp_path / "artifacts")
    assert graph.identities["quantize.gptq"]["device"] == {"type": "cuda", "gpus": ["NVIDIA H200"]}
    assert _as_keyed(graph, "quantize.gptq").device == "cuda"  # runs where its key says
    assert graph.step("quantize.gptq").config.device == "auto"


@pytest.mark.parametrize("written", ["cpu", "cuda"])
def test_a_device_written_out_is_kept(tmp_path, tiny_model, prose_file, written):
    path = tmp_path / "r.toml"
    path.write_text(
        RECIPE.format(model=tiny_model, prose=prose_file).replace(
            "[quantize.rtn]\n", f'[quantize.rtn]\ndevice = "{written}"\n'
        )
    )
    graph = load_graph(path, tmp_path / "artifacts")
    assert graph.identities["quantize.rtn"]["device"]["type"] == written
    assert _as_keyed(graph, "quantize.rtn").device == written


def test_a_step_with_a_step_field_runs_with_its_own_config(
    tmp_path, tiny_model, prose_file, monkeypatch
):
    """evaluate's prompts_from names a finetune step: the evaluation still gets its own config
    (a loop over such inputs once rebound the step's ref, and it ran with the finetune's)."""
    from stages.test_finetune import tone_records

    from tasks import runner

    tone = tmp_path / "tone.jsonl"
    tone.write_text("".join(json.dumps(r) + "\n" for r in tone_records()))
    path = tmp_path / "r.toml"
    path.write_text(f"""
[model]
source = "{tiny_model}"

[data.tone]
path = "{tone}"
format = "jsonl"

[finetune.a]
data = "tone"
text_template = "{{phrase}} => {{tone}}"
answer_field = "tone"

[evaluate.before]
data = "tone"
prompts_from = "finetune.a"
""")
    graph = load_graph(path, tmp_path / "artifacts")
    step = graph.step("evaluate.before")
    got = []
    spy = dataclasses.replace(step.spec, run=lambda config, ctx: got.append(config) or {})
    monkeypatch.setitem(graph.recipe.steps, step.ref, dataclasses.replace(step, spec=spy))
    monkeypatch.setattr(runner, "_refuse_damaged_input", lambda *a: None)
    monkeypatch.setattr(runner, "_refuse_changed_input", lambda *a: None)
    runner._run(graph, "evaluate.before", "evaluate:before", tmp_path / "out")
    assert got == [step.config]


def test_int8_saturates_on_avx2_without_vnni_only():
    assert hostinfo.saturates_int8("flags\t\t: fpu sse2 avx avx2 fma\n")
    assert not hostinfo.saturates_int8("flags\t\t: fpu avx2 fma avx_vnni\n")
    assert hostinfo.saturates_int8(AVX512)  # AVX-512 without VNNI (Skylake) saturates too
    assert not hostinfo.saturates_int8("processor : 0\n")  # not x86
