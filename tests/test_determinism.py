"""One key, one set of bytes: the calibrated quantizers (GPTQ, AWQ, QuaRot) write the same
files whatever the thread count torch runs with, and whether doit runs one step at a time or
two side by side (`doit -n 2` gives each step half the cores)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_text
from workspace import Workspace

from tasks.config import parse_config
from tasks.hostinfo import THREAD_VARIABLES
from tasks.stages import StepContext, spec_for

# 4 sequences of 512 tokens make one capture batch of 2,048 tokens: on the tiny model's
# 64-wide inputs MKL splits X^T X's tokens between threads, so the Hessians (and AWQ's Gram
# matrices) differ in their last bits unless that product runs on one thread; MKL's Cholesky
# of down_proj's 160-wide Hessian does too. 8 bits, so those last bits reach the codes: with
# the Cholesky on two threads GPTQ's weights came out different at 8 bits (not at 4).
TABLE = {"bits": 8, "group_size": 32, "data": "prose", "eval_tokens": 0,
         "num_samples": 4, "seq_len": 512}  # fmt: skip


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every weight file of a step's output."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def prose(tmp_path_factory) -> Path:
    """A data step's output written by hand: enough train tokens for 4 x 512."""
    out = tmp_path_factory.mktemp("data") / "prose"
    out.mkdir()
    paragraphs = tiny_text(200).split("\n\n")
    for split, part in (("train", paragraphs[:-20]), ("heldout", paragraphs[-20:])):
        lines = [json.dumps({"text": p.strip()}) for p in part]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture
def threads() -> Iterator[None]:
    """Restore torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def quantize(algorithm: str, model: Path, data: Path, out: Path) -> dict[str, str]:
    spec = spec_for("quantize", algorithm)
    config = parse_config(spec.config, TABLE, "recipe.toml", f"quantize.{algorithm}")
    out.mkdir(parents=True)
    ctx = StepContext(task=f"quantize:{algorithm}", out=out, artifacts=out.parent, input=model,
                      data={"prose": data})  # fmt: skip
    spec.run(config, ctx)
    return digests(out)


@pytest.mark.parametrize("algorithm", ["gptq", "awq", "quarot"])
def test_same_bytes_with_one_or_two_threads(algorithm, tiny_model, prose, tmp_path, threads):
    built: dict[int, dict[str, str]] = {}
    for count in (1, 2):
        torch.set_num_threads(count)
        built[count] = quantize(algorithm, tiny_model, prose, tmp_path / f"threads-{count}")
    assert built[1] == built[2]


def test_the_thread_count_is_restored(threads):
    from tasks.quant.threads import fixed_threads

    torch.set_num_threads(2)
    with fixed_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_ties_keep_the_earlier_candidate():
    """Equal losses never move the searches: with no input every candidate's output error is
    0, so AWQ keeps s = 1 and the clip search keeps no clipping (max_val = the group's amax)."""
    from tasks.quant.awq import search_clip, search_scales
    from tasks.quant.primitives import QuantSpec

    spec = QuantSpec(4, 8, True)
    x, w = torch.zeros(64, 16), torch.randn(8, 16)
    assert torch.equal(search_scales(x, [w], spec, grid=5), torch.ones(16))
    clip = search_clip(w, x, spec, grid=10)
    assert torch.equal(clip, w.abs().reshape(8, 2, 8).amax(-1))


def recipe(model: Path, prose: Path) -> str:
    steps = "".join(
        f"""
[quantize.{name}]
algorithm = "{name}"
{settings}
"""
        for name, settings in (
            (
                "gptq",
                'bits = 8\ngroup_size = 32\ndata = "prose"\nnum_samples = 4\nseq_len = 512\neval_tokens = 0',
            ),
            (
                "awq",
                'bits = 8\ngroup_size = 32\ndata = "prose"\nnum_samples = 4\nseq_len = 512\neval_tokens = 0',
            ),
        )
    )
    return f"""
[model]
source = "{model}"

[data.prose]
path = "{prose}"
format = "text"
heldout_fraction = 0.1
{steps}"""


def built_digests(ws: Workspace, jobs: str) -> dict[str, Any]:
    """Both steps built by `doit -n jobs`, with no thread count chosen beforehand: with 2 jobs
    doit gives each step half the cores (tasks.jobs), with 1 the step takes them all."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    argv = ws.argv("-n", jobs, "quantize:gptq", "quantize:awq")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return {s: digests(ws.artifacts / ws.name / "quantize" / s) for s in ("gptq", "awq")}


def test_doit_n2_builds_what_doit_n1_builds(tiny_model, tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text(tiny_text(200), encoding="utf-8")
    runs = {}
    for jobs in ("1", "2"):
        ws = Workspace(tmp_path / f"n{jobs}")
        ws.root.mkdir()
        ws.write(recipe(tiny_model, text))
        runs[jobs] = built_digests(ws, jobs)
    assert runs["1"] == runs["2"]
