"""The run report: regressions judged against earlier runs, and the page a real browser draws.

The summaries are made here by `make_summary`, to the schema of tasks/runs.py (schema 1); the
browser test needs Debian's chromium (`apt-get install chromium`) and skips without it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tasks.errors import KilnError
from tasks.graphpic import draw, statuses_of
from tasks.history import compare, write_run_report

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "nightly"
BROWSER_TIMEOUT_S = 90
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
                "answer_accuracy": answers, "format": "hf", "data": "botchan",
            }  # fmt: skip
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


def test_a_step_measured_on_another_data_set_is_not_compared():
    runs = three_runs()
    runs[-1]["steps"]["evaluate:gptq"]["metrics"]["data"] = "wiki"
    gptq = [c for c in compare(runs) if c.step == "evaluate:gptq"]
    assert gptq and all(c.previous is None and c.baseline is None for c in gptq)


def write_report(tmp_path: Path, summaries: list[dict[str, Any]], **kwargs: Any) -> str:
    return write_run_report(summaries, tmp_path / "run.html", **kwargs).read_text("utf-8")


def test_the_page_has_every_plot_inline_and_reaches_for_nothing(tmp_path):
    page = write_report(tmp_path, three_runs())
    for figure in ("trend-perplexity", "trend-size_bytes", "trend-decode_tokens_per_s",
                   "tradeoff-size_bytes", "tradeoff-decode_tokens_per_s"):  # fmt: skip
        assert re.search(rf'<figure id="{figure}">.*?<svg[ >]', page, re.S), figure
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "<script" not in page and "<?xml" not in page and "<!DOCTYPE svg" not in page
    assert "▲ regression" in page and page.index('id="run"') < page.index('id="gates"')
    assert write_report(tmp_path / "again", three_runs()) == page  # no date, no random id


def test_failures_gates_and_odd_text_are_shown_escaped(tmp_path):
    gates = {"evaluate:awq": [
        {"gate": "max_ppl_change", "limit": 0.12, "value": 0.052, "passed": True},
        {"gate": "max_size_mb", "limit": 120, "value": 142.3, "passed": False},
    ]}  # fmt: skip
    runs = three_runs()
    runs[-1] = make_summary(
        "20261201T020000Z", failed={"quantize:gptq": "bad <script>alert(1)</script> & co"},
        outcome="step-failed", gates=gates,
    )  # fmt: skip
    page = write_report(tmp_path, runs)
    assert "<script>" not in page and "bad &lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "Not built: an input failed" in page and "quantize:gptq" in page
    assert "max_size_mb" in page and ">fail<" in page and "a step failed" in page
    assert "artifacts/nightly/release/awq" in page


def test_one_run_is_a_report_without_trends(tmp_path):
    page = write_report(tmp_path, three_runs()[:1])
    assert "Trends need a step measured in two runs" in page and 'id="tradeoff-size_bytes"' in page
    with pytest.raises(KilnError, match="no run summaries"):
        write_run_report([], tmp_path / "none.html")


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, tasks.history; assert 'matplotlib' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# ---- a real browser -------------------------------------------------------------------------


class SummaryGraph:
    """The graph a summary describes (its steps' refs and inputs), for the picture."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.steps = summary["steps"]
        self.keys = {step["ref"]: step["key"] for step in self.steps.values()}
        self.tasks = {step["ref"]: task for task, step in self.steps.items()}

    def task(self, ref: str) -> str:
        return self.tasks[ref]

    def inputs(self, ref: str) -> list[str]:
        return [self.steps[t]["ref"] for t in self.steps[self.tasks[ref]]["inputs"]]


def realistic_runs() -> list[dict[str, Any]]:
    """A week of nights: small noise, awq improving, gptq worse tonight, a failed night."""
    nights = []
    for day in range(7):
        drift = {"awq": 14.62 - 0.05 * day, "gptq": 14.85 + (0.45 if day == 6 else 0.01 * day)}
        failed = {"quantize:gptq": "CUDA out of memory"} if day == 3 else None
        nights.append(make_summary(
            f"202611{24 + day:02d}T020000Z", drift, failed=failed,
            built=("quantize:awq", "evaluate:awq", "evaluate:gptq"), speed=1 + 0.02 * (day % 3),
            outcome="step-failed" if failed else "ok",
        ))  # fmt: skip
    nights[-1]["steps"]["evaluate:awq"]["gates"] = [
        {"gate": "max_ppl_change", "limit": 0.12, "value": 0.027, "passed": True},
        {"gate": "max_size_mb", "limit": 150, "value": 142.3, "passed": True},
    ]
    return nights


def run_browser(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Chromium in its own process group, killed whole (zygote, renderers) on a timeout."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=BROWSER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium took more than {BROWSER_TIMEOUT_S} s: {argv}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture
def chromium(tmp_path):
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        profile = tmp_path / "profile"
        return run_browser([
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", f"--user-data-dir={profile}", *args,
        ])  # fmt: skip

    return run


def graph_picture(summary: dict[str, Any], out_dir: Path) -> str | None:
    """The graph as graphpic.draw draws it: SVG with Graphviz, else None (Mermaid is for
    Markdown, not this page)."""
    path = draw(SummaryGraph(summary), statuses_of(summary), out_dir)
    return path.read_text("utf-8") if path.suffix == ".svg" else None


def test_a_browser_draws_the_plots_and_the_regression(tmp_path, chromium):
    from PIL import Image

    runs = realistic_runs()
    graph = graph_picture(runs[-1], tmp_path / "graph")
    page = write_run_report(runs, tmp_path / "run.html", graph_svg=graph)
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<svg[ >]", dom.stdout)) >= 5 + (graph is not None)
    assert len(re.findall(r"<path[ >]", dom.stdout)) > 50  # drawn lines, points and axes
    for figure in ("trend-perplexity", "trend-size_bytes", "tradeoff-decode_tokens_per_s"):
        assert re.search(rf'<figure id="{figure}">.*?<svg[ >]', dom.stdout, re.S), figure
    assert 'class="regression"' in dom.stdout and "▲ regression" in dom.stdout

    png = tmp_path / "run.png"
    shot = chromium(f"--screenshot={png}", "--window-size=1280,2400", "--hide-scrollbars",
                    page.as_uri())  # fmt: skip
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 2400)
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, f"a blank page: {len(colours)} colours"
    assert max(colours)[0] < 0.97 * 1280 * 2400, "the page is nearly all one colour"
    if target := os.environ.get("MODELKILN_SCREENSHOT"):  # docs/img/run-report.png
        whole = tmp_path / "whole.png"  # the whole page: a taller window, cropped below
        chromium(f"--screenshot={whole}", "--window-size=1280,4000", "--hide-scrollbars",
                 page.as_uri())  # fmt: skip
        save_screenshot(Image.open(whole).convert("RGB"), ROOT / target)


def save_screenshot(image: Any, target: Path) -> None:
    """The page cropped below its last line, in a 128-colour palette: a small PNG for docs."""
    from PIL import Image, ImageChops

    content = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()
    bottom = (content[3] + 24) if content else image.height
    cropped = image.crop((0, 0, image.width, min(bottom, image.height)))
    target.parent.mkdir(parents=True, exist_ok=True)
    cropped.quantize(colors=128).save(target, optimize=True)
