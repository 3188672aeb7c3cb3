"""The run report page: every plot inline, every value escaped, and what a real browser draws.

The summaries come from tests/test_history.py (`make_summary`); the browser test needs
Debian's chromium (`apt-get install chromium`) and skips without it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_history import make_summary, three_runs

from tasks.errors import KilnError
from tasks.graphpic import draw, statuses_of
from tasks.runpage import write_run_report

ROOT = Path(__file__).resolve().parents[1]
BROWSER_TIMEOUT_S = 90


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
    assert "<code>nightly/release/awq</code>" in page  # under any artifacts= folder


def test_one_run_is_a_report_without_trends(tmp_path):
    page = write_report(tmp_path, three_runs()[:1])
    assert "Trends need a step measured in two runs" in page and 'id="tradeoff-size_bytes"' in page
    with pytest.raises(KilnError, match="no run summaries"):
        write_run_report([], tmp_path / "none.html")


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, tasks.runpage; assert 'matplotlib' not in sys.modules, 'imported'"
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


def test_past_ten_steps_a_trend_line_changes_its_style():
    """The colours come round again after ten: the 11th step's line is dashed, not the 1st's."""
    from tasks.history import BY_NAME
    from tasks.runpage import _trend_svg

    def run(n: int, i: int) -> dict[str, Any]:
        steps = {
            f"evaluate:v{k}": {"stage": "evaluate", "status": "built", "data": "d",
                               "metrics": {"perplexity": 10.0 + k + i}}
            for k in range(n)
        }  # fmt: skip
        return {"run": {"id": f"2026120{i + 1}T030000Z"}, "steps": steps}

    ten = _trend_svg([run(10, 0), run(10, 1)], BY_NAME["perplexity"])
    eleven = _trend_svg([run(11, 0), run(11, 1)], BY_NAME["perplexity"])
    assert ten and eleven and "stroke-dasharray" not in ten and "stroke-dasharray" in eleven
