"""The real model in minutes: the default recipe's float, ONNX, int8 and RTN steps on SmolLM2,
built offline on a CPU and checked. CI runs these every time (marker `slow`); the whole recipe,
half an hour on two cores, is tests/test_default_recipe.py (marker `full`)."""

from __future__ import annotations

import pytest
from workspace import ROOT, Workspace, executed

from tasks.recipe import load_recipe
from tasks.store import read_manifest

pytestmark = pytest.mark.slow

# The evaluations asked for; doit builds them and what they read (model, data, capture,
# the two quantizers) and nothing else of the recipe.
ASKED = ("evaluate:torch", "evaluate:fp32", "evaluate:int8-keep-down", "evaluate:rtn")


@pytest.fixture(scope="module")
def part_build(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("smollm2"))
    ws.write((ROOT / "recipes" / "default.toml").read_text())
    first = ws.doit("-n", "2", *ASKED, timeout=1800)
    return ws, first


def metrics(ws: Workspace, name: str) -> dict:
    return read_manifest(ws.artifacts / "recipe" / "evaluate" / name)["metrics"]


def check_onnx_matches_pytorch(ws: Workspace) -> None:
    """The captured fp32 graph scores held-out text as the PyTorch model does, and answers."""
    torch_ppl, fp32 = metrics(ws, "torch")["perplexity"], metrics(ws, "fp32")
    assert abs(fp32["perplexity"] / torch_ppl - 1) < 0.005, (fp32["perplexity"], torch_ppl)
    assert "Paris" in fp32["sample"]


def test_the_steps_asked_for_and_only_what_they_read_are_built(part_build):
    ws, first = part_build
    steps = load_recipe(ws.recipe).steps
    wanted = set(ASKED) | {"model", "data:botchan", "capture:fp32"}
    wanted |= {"quantize:int8-keep-down", "quantize:rtn"}
    assert wanted <= {s.task for s in steps.values()}
    assert set(executed(first.stdout)) == wanted
    assert executed(ws.doit(*ASKED).stdout) == []


def test_onnx_fp32_matches_pytorch(part_build):
    check_onnx_matches_pytorch(part_build[0])


def test_int8_and_rtn_are_smaller_and_close(part_build):
    ws, _ = part_build
    torch_ppl, fp32_size = metrics(ws, "torch")["perplexity"], metrics(ws, "fp32")["size_bytes"]
    # (name, perplexity bound over float, how many times smaller than fp32 at least)
    for name, bound, smaller in (("int8-keep-down", 1.15, 1.3), ("rtn", 1.3, 2.5)):
        m = metrics(ws, name)
        assert torch_ppl < m["perplexity"] < bound * torch_ppl, (name, m["perplexity"])
        assert m["size_bytes"] < fp32_size / smaller, (name, m["size_bytes"])


def test_the_store_verifies(part_build):
    ws, _ = part_build
    assert ws.doit("verify").returncode == 0
