"""Regressions: every evaluate metric of the last run judged against earlier runs.

The summaries are made here by `make_summary`, to the schema of tasks/runs.py (schema 1);
tests/test_runpage.py draws the page from the same summaries.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tasks.errors import KilnError
from tasks.history import compare

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "nightly"
# name -> (variant, size bytes, perplexity, decode tok/s, first token ms, answer accuracy):
# SmolLM2-135M-like numbers, so the screenshot reads like a real night.
VARIANTS = {
    "base": ("model", 538.1e6, 13.90, 48.0, 95.0, 0.62),
    "int8": ("quantize.int8", 171.4e6, 14.05, 74.0, 61.0, 0.62),
    "awq": ("quantize.awq", 142.3e6, 14.62, 61.0, 80.0, 0.60),
    "gptq": ("quantize.gptq", 139.8e6, 14.85, 59.0, 82.0, 0.58),
}


def make_summary(
    run_id: str,
    perplexity: dict[str, float] | None = None,
    *,
    built: tuple[str, ...] = (),
    failed: dict[str, str] | None = None,
    speed: float = 1.0,
    outcome: str = "ok",
    gates: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """A schema-1 run summary of the recipe `nightly`: model, data:botchan, three quantize
    steps and an evaluate step per variant. perplexity: per variant, else VARIANTS'; built:
    the tasks this run built (the rest up to date); failed: task -> error (its users are then
    input-failed, with no metrics); speed: decode speed factor."""
    perplexity, failed, gates = perplexity or {}, failed or {}, gates or {}
    stamp = f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}T{run_id[9:11]}:{run_id[11:13]}:00.000Z"
    steps: dict[str, dict[str, Any]] = {}

    def add(task: str, ref: str, inputs: list[str], **more: Any) -> dict[str, Any]:
        status = "built" if task in built else "up-to-date"
        if task in failed:
            status = "failed"
        elif bad := [i for i in inputs if steps[i]["status"] in ("failed", "input-failed")]:
            status = "input-failed"
            more = {**more, "failed_inputs": bad, "error": f"{bad[0]} failed", "metrics": {}}
        ran = status in ("built", "failed")
        steps[task] = {
            "ref": ref, "stage": ref.split(".")[0], "status": status,
            "key": hashlib.sha256(ref.encode()).hexdigest(),
            "inputs": inputs, "started": stamp if ran else None, "finished": stamp if ran else None,
            "seconds": 42.5 if ran else None, "peak_rss_bytes": 2_100_000_000 if ran else None,
            "log": f"artifacts/store/{task.replace(':', '-')}.log", "metrics": {}, **more,
        }  # fmt: skip
        if status == "failed":
            steps[task] |= {"error": failed[task], "metrics": {}}
        return steps[task]

    add("model", "model", [])
    add("data:botchan", "data.botchan", [])
    for name, (variant, *_rest) in VARIANTS.items():
        if variant != "model":
            add(f"quantize:{name}", variant, ["model", "data:botchan"])
    base_ppl = perplexity.get("base", VARIANTS["base"][2])
    for name, (variant, size, ppl, tok_s, first_ms, answers) in VARIANTS.items():
        source = "model" if variant == "model" else variant.replace(".", ":")
        step = add(
            f"evaluate:{name}", f"evaluate.{name}", [source, "data:botchan"], variant=variant
        )
        if step["status"] in ("built", "up-to-date"):
            ppl = perplexity.get(name, ppl)
            step["metrics"] = {
                "perplexity": ppl, "ppl_change": ppl / base_ppl - 1, "size_bytes": size,
                "load_s": 0.8, "first_token_ms": first_ms, "decode_tokens_per_s": tok_s * speed,
                "answer_accuracy": answers, "format": "hf",
            }  # fmt: skip
            step["data"] = "botchan"
        if checks := gates.get(f"evaluate:{name}"):
            step["gates"] = checks
            if not all(g["passed"] for g in checks):
                step["how"], step["status"] = step["status"], "gate-failed"
    add("report", "report", [t for t in steps if t.startswith("evaluate:")])
    counts = {
        s: 0 for s in ("built", "up-to-date", "pulled", "failed", "input-failed", "gate-failed")
    }
    for step in steps.values():
        counts[step["status"]] += 1
    exit_code = {"ok": 0, "step-failed": 1, "gate-failed": 4}[outcome]
    return {
        "schema": 1,
        "run": {
            "id": run_id, "started": stamp, "finished": stamp, "seconds": 1332.3,
            "command": ["-n", "2"], "jobs": 2, "exit_code": exit_code, "outcome": outcome,
            "remote": {"url": "s3://models/kiln", "push": True, "skipped": None},
        },
        "recipe": {"name": RECIPE, "path": f"recipes/{RECIPE}.toml", "digest": "9f" * 8},
        "versions": {"modelkiln": "0.1.0", "python": "3.11.9", "doit": "0.36.0", "torch": "2.13.0"},
        "platform": {"os": "linux", "machine": "x86_64", "cpus": 2, "hostname": "ci-1"},
        "counts": counts,
        "steps": steps,
        "release": {"awq": "quantize.awq"},
    }  # fmt: skip


def three_runs() -> list[dict[str, Any]]:
    """gptq's perplexity gets 3% worse in the third run (tolerance 0.5%); awq's 2% better."""
    return [
        make_summary("20261129T020000Z", built=tuple(f"evaluate:{n}" for n in VARIANTS)),
        make_summary("20261130T020000Z", built=("quantize:int8", "evaluate:int8")),
        make_summary(
            "20261201T020000Z",
            {"gptq": 14.85 * 1.03, "awq": 14.62 * 0.98},
            built=("quantize:gptq", "quantize:awq", "evaluate:gptq", "evaluate:awq"),
        ),
    ]


def test_compare_flags_exactly_the_variant_that_got_worse():
    changes = compare(three_runs())
    flagged = [(c.step, c.metric) for c in changes if c.regressed]
    assert flagged == [("evaluate:gptq", "perplexity")]
    gptq = next(c for c in changes if c.step == "evaluate:gptq" and c.metric == "perplexity")
    assert gptq.regressed_since_previous and gptq.regressed_since_baseline
    assert gptq.previous_run == "20261130T020000Z" and gptq.baseline_run == "20261129T020000Z"
    assert gptq.since_previous == pytest.approx(0.03)
    awq = next(c for c in changes if c.step == "evaluate:awq" and c.metric == "perplexity")
    assert awq.since_previous == pytest.approx(-0.02) and not awq.regressed
    assert "evaluate:gptq perplexity 15.296" in gptq.describe() and "+3.0%" in gptq.describe()


def test_tolerances_and_baseline_can_be_chosen():
    runs = three_runs()
    assert not any(c.regressed for c in compare(runs, tolerances={"perplexity": 0.05}))
    strict = compare(runs, tolerances={"decode_tokens_per_s": 0.0})
    assert [c.step for c in strict if c.regressed] == ["evaluate:gptq"]  # speeds are equal
    late = compare(runs, baseline="20261130T020000Z")
    assert {c.baseline_run for c in late} == {"20261130T020000Z"}
    with pytest.raises(KilnError, match="did you mean perplexity"):
        compare(runs, tolerances={"perplexty": 0.01})
    with pytest.raises(KilnError, match="not a run of this recipe"):
        compare(runs, baseline="20250101T000000Z")


def test_a_slower_decode_beyond_its_tolerance_and_a_lost_answer_are_regressions():
    runs = three_runs()[:2] + [make_summary("20261201T020000Z", speed=0.8)]
    assert {c.metric for c in compare(runs) if c.regressed} == {"decode_tokens_per_s"}
    runs[-1] = make_summary("20261201T020000Z")
    runs[-1]["steps"]["evaluate:int8"]["metrics"]["answer_accuracy"] -= 0.01  # one answer
    assert [(c.step, c.metric) for c in compare(runs) if c.regressed] == [
        ("evaluate:int8", "answer_accuracy")
    ]
    within = three_runs()[:2] + [make_summary("20261201T020000Z", speed=0.9)]
    assert not any(c.regressed for c in compare(within))


def test_the_previous_run_is_the_last_one_that_measured_the_step():
    runs = three_runs()
    runs[1] = make_summary("20261130T020000Z", failed={"quantize:gptq": "out of memory"})
    gptq = next(c for c in compare(runs) if c.step == "evaluate:gptq" and c.metric == "perplexity")
    assert gptq.previous_run == "20261129T020000Z" and gptq.regressed_since_previous


def test_a_first_run_that_measured_nothing_leaves_the_baseline_to_the_next():
    """A slow drift, each night within tolerance, is still caught against the first run that
    measured the step (here the first run failed its quantizer and measured no gptq)."""
    first = make_summary("20261128T020000Z", failed={"quantize:gptq": "out of memory"})
    drift = [make_summary(f"202611{d}T020000Z", {"gptq": 14.85 * f}) for d, f in
             (("29", 1.0), ("30", 1.004), ("31", 1.008))]  # fmt: skip
    gptq = next(
        c
        for c in compare([first, *drift])
        if c.step == "evaluate:gptq" and c.metric == "perplexity"
    )
    assert gptq.baseline_run == "20261129T020000Z" and gptq.regressed_since_baseline
    assert not gptq.regressed_since_previous  # +0.4% a night: within 0.5%


def test_a_step_measured_on_another_data_set_is_not_compared():
    runs = three_runs()
    runs[-1]["steps"]["evaluate:gptq"]["data"] = "wiki"
    gptq = [c for c in compare(runs) if c.step == "evaluate:gptq"]
    assert gptq and all(c.previous is None and c.baseline is None for c in gptq)


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, tasks.history; assert 'matplotlib' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_a_first_token_below_10_ms_keeps_two_digits():
    from tasks.report import milliseconds

    assert [milliseconds(v) for v in (0.4213, 3.14159, 57.6, 1234.5)] == [
        "0.42",
        "3.1",
        "58",
        "1234",
    ]


def test_a_small_size_and_a_small_tolerance_keep_their_digits():
    """Before: 'size_bytes 0.3: +2.8% since ... (0.3), regression (tolerance 0.0%)'."""
    from tasks.history import limit, megabytes

    assert [megabytes(v) for v in (0.3128e6, 12.34e6, 175.23e6)] == ["0.313", "12.3", "175.2"]
    assert limit("perplexity", 0.0001) == "0.01%" and limit("size_bytes", 0.01) == "1%"
    assert limit("answer_accuracy", 0.02) == "2 pp"
