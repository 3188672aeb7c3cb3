"""One key, one set of bytes: the same recipe built in two workspaces (other artifacts roots,
other temporary directories) gives every step the same key and the same files, and no file
names the workspace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from stages.test_finetune import tone_records
from workspace import Workspace

from tasks.store import read_manifest

# Every stage that writes files, on the tiny model (gptq, awq and quarot write through rtn's
# writer; inc-* and nvmo need environments of their own, too slow to build here). The adapter
# adds capture.rtn-lora (the builder at int4 on an HF-quantized input). Evaluate is left out:
# it writes no file; its metrics (timings included) live in the manifest, which is not compared.
RECIPE = """
[model]
source = "{model}"

[data.prose]
path = "{prose}"
format = "text"
heldout_fraction = 0.25

[data.tone]
path = "{tone}"
format = "jsonl"

[capture.fp32]

[quantize.int8]
algorithm = "ort-dynamic"
from = "capture.fp32"

[quantize.bnb4]
from = "capture.fp32"
block_size = 16

[quantize.rtn]
bits = 4
group_size = 16

[finetune.a]
from = "quantize.rtn"
data = "tone"
text_template = "{{phrase}} => {{tone}}"
answer_field = "tone"
max_steps = 2
batch_size = 4
warmup_steps = 1
eval_every = 2
eval_samples = 4
device = "cpu"

[adapter.a]
from = "finetune.a"
"""
STEPS = ("model", "data.prose", "data.tone", "capture.fp32", "quantize.int8", "quantize.bnb4",
         "quantize.rtn", "finetune.a", "capture.rtn-lora", "adapter.a")  # fmt: skip


def link(ws: Workspace, ref: str) -> Path:
    return ws.artifacts / "recipe" / ref.replace(".", "/")


def files(entry: Path) -> dict[str, Any]:
    manifest = read_manifest(entry)
    return {f["path"]: f["xxh3"] for f in manifest["files"]}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, tiny_model, prose_file) -> tuple[Workspace, Workspace]:
    builds = []
    for name in ("first", "second-workspace"):  # different lengths: paths cannot line up
        ws = Workspace(tmp_path_factory.mktemp(name))
        # Each workspace has its own copies of the inputs: the same content at other paths.
        model = shutil.copytree(tiny_model, ws.root / "inputs" / "model")
        prose = shutil.copy(prose_file, ws.root / "inputs" / "prose.txt")
        tone = ws.root / "inputs" / "tone.jsonl"
        tone.write_text("\n".join(json.dumps(r) for r in tone_records(40)) + "\n")
        ws.write(RECIPE.format(model=model, prose=prose, tone=tone))
        ws.doit()
        builds.append(ws)
    return builds[0], builds[1]


@pytest.mark.parametrize("ref", STEPS)
def test_a_step_has_one_key_and_one_set_of_bytes_wherever_it_is_built(two_builds, ref):
    first, second = (link(ws, ref) for ws in two_builds)
    assert first.resolve().name == second.resolve().name, "the keys differ"
    a, b = files(first), files(second)
    assert a.keys() == b.keys()
    differ = sorted(path for path in a if a[path] != b[path])
    assert not differ, f"{ref}: these files differ between the two workspaces: {differ}"


@pytest.mark.parametrize("ref", STEPS)
def test_no_output_file_names_the_workspace(two_builds, ref):
    for ws in two_builds:
        entry = link(ws, ref).resolve()
        # The workspace root; the store entry and its temporary directory lie under it.
        needles = [str(ws.root).encode(), str(ws.artifacts.resolve()).encode()]
        named = sorted(
            path
            for path in files(entry)
            if any(needle in (entry / path).read_bytes() for needle in needles)
        )
        assert not named, f"{ref}: these files name the workspace {ws.root}: {named}"
