"""The run report: one self-contained HTML page on a recipe's last run and the runs before it.

No network, plots inline as SVG, fonts from the system; what regressed is history.compare's
judgement. matplotlib is imported only by the functions that draw, never on import.
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any

from tasks.errors import KilnError
from tasks.graphpic import STATUS_COLOURS
from tasks.history import (
    BY_NAME,
    METRICS,
    Change,
    Metric,
    compare,
    delta,
    evaluate_steps,
    limit,
    measured,
    tolerances_with,
)

OUTCOMES = {"ok": ("OK", "built"), "step-failed": ("a step failed", "failed"),
            "gate-failed": ("a gate failed", "gate-failed")}  # fmt: skip
# A fixed salt and no metadata: the same runs give the same bytes (no date, no random ids).
SVG_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
PLOT_STYLE = {
    "svg.hashsalt": "modelkiln", "svg.fonttype": "none",  # text stays text, in system fonts
    "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": "#e6e6e6", "axes.axisbelow": True,
}  # fmt: skip


def write_run_report(
    summaries: list[dict[str, Any]],
    out: Path,
    baseline: str | None = None,
    tolerances: dict[str, float] | None = None,
    graph_svg: str | None = None,
) -> Path:
    """One self-contained HTML page on the last run of summaries (one recipe, oldest first)."""
    if not summaries:
        raise KilnError("no run summaries to report on", "run `doit` once: it writes one")
    changes = compare(summaries, baseline, tolerances)
    page = _page(summaries, changes, tolerances_with(tolerances), graph_svg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


# ---- the page: every value escaped, every plot inline ----------------------------------------

SECTIONS = [("run", "The run"), ("gates", "Gates"), ("metrics", "Metrics"), ("trends", "Trends"),
            ("tradeoffs", "Trade-offs"), ("graph", "The graph")]  # fmt: skip


def _css_class(status: str) -> str:
    return "s-" + "".join(c for c in status if c.isalpha())


CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1d1d1f;"
    "margin:1.5rem auto;max-width:76rem;padding:0 1.5rem;line-height:1.45}"
    "h1{font-size:1.55rem;margin:.2rem 0}h2{font-size:1.2rem;margin-top:2rem;"
    "border-bottom:1px solid #ddd;padding-bottom:.2rem}nav a{margin-right:1rem}"
    "table{border-collapse:collapse;margin:.5rem 0}"
    "th,td{padding:.25rem .7rem;border-bottom:1px solid #e6e6e6;text-align:left;vertical-align:top}"
    "th{background:#f5f5f5;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}"
    ".badge{display:inline-block;padding:0 .55rem;border:1px solid;border-radius:.8rem;"
    "font-size:.88rem;margin-right:.3rem}.muted{color:#666;font-size:.9rem}"
    ".regression{color:#b00020;font-weight:600}.better{color:#2e7d32}"
    "code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em}"
    ".plots{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:.5rem 0}"
    "figure svg,#graph svg{max-width:100%;height:auto}figcaption{font-weight:600}"
    + "".join(
        f".{_css_class(s)}{{background:{fill};border-color:{border}}}"
        for s, (fill, border) in STATUS_COLOURS.items()
    )
)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _badge(status: str, text: str) -> str:
    return f'<span class="badge {_css_class(status)}">{_e(text)}</span>'


def _table(head: list[str], rows: list[list[str]], numeric: tuple[int, ...] = ()) -> str:
    """Cells are HTML already; columns in numeric are right-aligned."""

    def cls(i: int) -> str:
        return ' class="num"' if i in numeric else ""

    top = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{top}</tr>{body}</table>"


def _when(stamp: str | None) -> str:
    """'2026-12-01T09:37:00.123Z' -> '2026-12-01 09:37 UTC'."""
    return f"{stamp[:10]} {stamp[11:16]} UTC" if stamp and len(stamp) >= 16 else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else _e(value)


def _run_section(summary: dict[str, Any], changes: list[Change]) -> str:
    run, steps = summary["run"], summary.get("steps", {})
    text, status = OUTCOMES.get(run.get("outcome", ""), (run.get("outcome", "?"), "failed"))
    argv = [str(a) for a in run.get("command") or []]
    argv = argv if argv[:1] == ["doit"] else ["doit", *argv]
    parts = [
        f"<p>{_badge(status, text)} exit code {_e(run.get('exit_code'))} · started "
        f"{_when(run.get('started'))} · took {_duration(run.get('seconds'))} · "
        f"<code>{_e(' '.join(argv))}</code> ({_e(run.get('jobs', 1))} at a time)</p>",
        "<p>" + "".join(_badge(s, f"{n} {s}") for s, n in summary.get("counts", {}).items() if n)
        + "</p>",
    ]  # fmt: skip
    if remote := run.get("remote"):
        push = " (push)" if remote.get("push") else ""
        skipped = f" — skipped: {_e(remote['skipped'])}" if remote.get("skipped") else ""
        parts.append(f"<p>Remote store <code>{_e(remote.get('url'))}</code>{push}{skipped}</p>")
    if bad := [c for c in changes if c.regressed]:
        names = ", ".join(f"{c.step} {c.metric}" for c in bad)
        parts.append(f'<p class="regression">▲ {len(bad)} regressed: {_e(names)}</p>')
    else:
        parts.append('<p class="muted">No metric regressed beyond its tolerance.</p>')
    failed = [(t, s) for t, s in steps.items() if s.get("status") == "failed"]
    if failed:
        rows = [[_e(t), _e(s.get("error", "")), f"<code>{_e(s.get('log', ''))}</code>"]
                for t, s in failed]  # fmt: skip
        parts.append("<h3>Failed</h3>" + _table(["step", "error", "log"], rows))
    blocked = [(t, s) for t, s in steps.items() if s.get("status") == "input-failed"]
    if blocked:
        rows = [[_e(t), _e(", ".join(s.get("failed_inputs", []))), _e(s.get("error", ""))]
                for t, s in blocked]  # fmt: skip
        parts.append("<h3>Not built: an input failed</h3>" + _table(["step", "input", "why"], rows))
    parts.append(_all_steps(summary))
    return "".join(parts)


def _all_steps(summary: dict[str, Any]) -> str:
    rows = [
        [_e(task), _badge(s.get("status", "not run"), s.get("status", "not run")),
         _duration(s.get("seconds")),
         f"{s['peak_rss_bytes'] / 1e6:,.0f}" if s.get("peak_rss_bytes") else "-"]
        for task, s in summary.get("steps", {}).items()
    ]  # fmt: skip
    table = _table(["step", "status", "time", "peak memory MB"], rows, numeric=(2, 3))
    versions = " · ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items())
    where = summary.get("platform", {})
    machine = f"{where.get('os', '?')} {where.get('machine', '?')}, {where.get('cpus', '?')} CPUs"
    return (
        f"<details><summary>All {len(rows)} steps</summary>{table}</details>"
        f'<p class="muted">{_e(versions)} · {_e(machine)} · {_e(where.get("hostname", ""))}</p>'
    )


def _gates_section(summary: dict[str, Any]) -> str:
    rows = [
        [_e(task), _e(gate.get("gate")), _number(gate.get("limit")), _number(gate.get("value")),
         _badge("built", "pass") if gate.get("passed") else _badge("gate-failed", "fail")]
        for task, step in summary.get("steps", {}).items()
        for gate in step.get("gates") or []
    ]  # fmt: skip
    gates = (
        _table(["step", "gate", "limit", "value", "result"], rows, numeric=(2, 3))
        if rows
        else '<p class="muted">No evaluate step has gates.</p>'
    )
    name = summary.get("recipe", {}).get("name", "<recipe>")
    released = "".join(
        f"<li><code>{_e(name)}/release/{_e(r)}</code> → {_e(v)}</li>"
        for r, v in (summary.get("release") or {}).items()
    )
    return gates + (
        f"<p>Released, in the artifacts folder (<code>artifacts=</code>):</p><ul>{released}</ul>"
        if released
        else "<p>Nothing released.</p>"
    )


def _since(change: Change, which: str) -> str:
    """'prev +3.0%' under a value: red with a flag when worse beyond the tolerance, green
    when better, the old value and its run in the tooltip."""
    since, regressed = (
        getattr(change, f"since_{which}"),
        getattr(change, f"regressed_since_{which}"),
    )
    old, run = getattr(change, which), getattr(change, f"{which}_run")
    if since is None or old is None:
        return ""
    metric, text = BY_NAME[change.metric], f"{which[:4]} {delta(change.metric, since)}"
    tip = f' title="{_e(metric.show(old))} in {_e(run)}"'
    if regressed:
        return f'<span class="regression"{tip}>{_e(text)} ▲ regression</span>'
    better = metric.better and since and (since < 0) == (metric.better == "lower")
    return f'<span class="{"better" if better else "muted"}"{tip}>{_e(text)}</span>'


def _metrics_section(changes: list[Change], tolerances: dict[str, float]) -> str:
    """One row per evaluate step, one column per metric: the value, and under it its change
    since the previous run that measured the step and since the baseline."""
    if not changes:
        return '<p class="muted">No evaluate step has metrics in this run.</p>'
    columns = [m for m in METRICS if any(c.metric == m.name for c in changes)]
    by_step: dict[str, dict[str, Change]] = {}
    for c in changes:
        by_step.setdefault(c.step, {})[c.metric] = c
    rows = []
    for step, cells in by_step.items():
        first = next(iter(cells.values()))
        where = f"{first.variant} on {first.data}"
        row = [f'<b>{_e(step)}</b><br><span class="muted">{_e(where)}</span>']
        for m in columns:
            c = cells.get(m.name)
            notes = [n for n in (_since(c, "previous"), _since(c, "baseline")) if n] if c else []
            row.append(f"{m.show(c.value)}<br>{'<br>'.join(notes)}" if c else "-")
        rows.append(row)
    base = next((c.baseline_run for c in changes if c.baseline_run), None)
    limits = ", ".join(f"{BY_NAME[m].label} {limit(m, t)}" for m, t in tolerances.items())
    return (
        f'<p class="muted">Under each value: <i>prev</i>, the change since the previous run that '
        f"measured the step on the same data set; <i>base</i>, since the baseline run "
        f"{_e(base or '(none)')}. Regression: worse than the tolerance, {_e(limits)}.</p>"
        + _table(["step"] + [m.label for m in columns], rows, tuple(range(1, len(columns) + 1)))
    )


# ---- plots: matplotlib, imported here only ------------------------------------------------


def _inline_svg(svg: str) -> str:
    """An SVG document as an element for HTML: no XML prolog, DOCTYPE (it names a URL) or
    xlink declaration (the HTML parser knows xlink:href)."""
    svg = svg[svg.find("<svg") :] if "<svg" in svg else ""
    return svg.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "")


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata=SVG_METADATA, bbox_inches="tight")
    return _inline_svg(buffer.getvalue())


def _figure(width: float, height: float) -> Any:
    # A bare Figure, not pyplot: no GUI back-end is ever loaded (Agg-like, headless), and no
    # global figure list to leak; savefig(format="svg") picks the SVG canvas itself.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _short(task: str) -> str:
    return task.split(":", 1)[-1]


def _run_label(run_id: str) -> str:
    """'20261201T093700Z' -> '12-01\n09:37' (two lines: eight fit under a small plot)."""
    ok = len(run_id) >= 13 and run_id[8] == "T"
    return f"{run_id[4:6]}-{run_id[6:8]}\n{run_id[9:11]}:{run_id[11:13]}" if ok else run_id


LINES = ("o-", "s--", "^:", "D-.")  # marker and line style of the 1st to 10th step, 11th to 20th...


def _colours(summaries: list[dict[str, Any]]) -> dict[str, str]:
    """One colour per evaluate step, the same in every plot (the newest run's order first)."""
    tasks = dict.fromkeys(t for s in reversed(summaries) for t in evaluate_steps(s))
    return {task: f"C{i % 10}" for i, task in enumerate(tasks)}


def _series(summaries: list[dict[str, Any]], metric: Metric) -> dict[str, list[tuple[int, float]]]:
    """Per evaluate step, (run index, value) where it was measured on its latest data set;
    only steps measured in two runs or more."""
    series = {}
    for task in _colours(summaries):
        data = next(s["steps"][task].get("data")
                    for s in reversed(summaries) if task in evaluate_steps(s))  # fmt: skip
        points = [(i, v / metric.scale) for i, s in enumerate(summaries)
                  if (v := measured(s, task, metric.name, data)) is not None]  # fmt: skip
        if len(points) >= 2:
            series[task] = points
    return series


def _trend_svg(summaries: list[dict[str, Any]], metric: Metric) -> str | None:
    import matplotlib

    colours = _colours(summaries)
    series = _series(summaries, metric)
    if not series:
        return None
    with matplotlib.rc_context(PLOT_STYLE):
        fig = _figure(5.0, 2.3)
        ax = fig.add_subplot()
        order = {task: i for i, task in enumerate(colours)}
        for task, points in series.items():
            xs, ys = zip(*points, strict=True)
            line = LINES[order[task] // 10 % len(LINES)]  # past 10 steps the colours come again
            ax.plot(
                xs, ys, line, color=colours[task], markersize=3.5, linewidth=1.6, label=_short(task)
            )
        every = max(1, math.ceil(len(summaries) / 8))
        ticks = list(range(0, len(summaries), every))
        ax.set_xticks(ticks, [_run_label(summaries[i]["run"]["id"]) for i in ticks])
        ax.set_ylabel(f"{metric.label} ({metric.better} is better)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        return _svg(fig)


def _tradeoff_svg(points: list[tuple[str, float, float, str]], x_label: str, y_label: str) -> str:
    import matplotlib

    with matplotlib.rc_context(PLOT_STYLE):
        fig = _figure(4.4, 3.0)
        ax = fig.add_subplot()
        ax.scatter([p[1] for p in points], [p[2] for p in points], s=30, c=[p[3] for p in points])
        for name, x, y, _ in points:
            ax.annotate(name, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        return _svg(fig)


def _trends_section(summaries: list[dict[str, Any]]) -> str:
    figures = [
        f'<figure id="trend-{m.name}"><figcaption>{_e(m.label)}</figcaption>{svg}</figure>'
        for m in (BY_NAME["perplexity"], BY_NAME["size_bytes"], BY_NAME["decode_tokens_per_s"])
        if (svg := _trend_svg(summaries, m))
    ]
    if not figures:
        return '<p class="muted">Trends need a step measured in two runs.</p>'
    return f'<div class="plots">{"".join(figures)}</div>'


def _tradeoffs_section(summaries: list[dict[str, Any]]) -> str:
    steps, colours = evaluate_steps(summaries[-1]), _colours(summaries)
    figures = []
    for name, x_label in [("size_bytes", "size MB"), ("decode_tokens_per_s", "decode tok/s")]:
        scale = BY_NAME[name].scale
        points = [
            (_short(t), m[name] / scale, m["perplexity"], colours[t])
            for t, s in steps.items()
            if (m := s["metrics"]).get(name) is not None and m.get("perplexity") is not None
        ]
        if points:
            svg = _tradeoff_svg(points, x_label, "perplexity (lower is better)")
            figures.append(f'<figure id="tradeoff-{name}"><figcaption>perplexity against '
                           f"{_e(x_label)}</figcaption>{svg}</figure>")  # fmt: skip
    if not figures:
        return '<p class="muted">No evaluate step measured perplexity in this run.</p>'
    return f'<div class="plots">{"".join(figures)}</div>'


def _page(
    summaries: list[dict[str, Any]],
    changes: list[Change],
    tolerances: dict[str, float],
    graph_svg: str | None,
) -> str:
    current = summaries[-1]
    recipe, run_id = current.get("recipe", {}).get("name", "recipe"), current["run"]["id"]
    bodies = {
        "run": _run_section(current, changes),
        "gates": _gates_section(current),
        "metrics": _metrics_section(changes, tolerances),
        "trends": _trends_section(summaries),
        "tradeoffs": _tradeoffs_section(summaries),
        "graph": _inline_svg(graph_svg) if graph_svg else "",
    }
    shown = [(key, title) for key, title in SECTIONS if bodies[key]]
    nav = "".join(f'<a href="#{key}">{_e(title)}</a>' for key, title in shown)
    sections = "".join(f'<section id="{k}"><h2>{_e(t)}</h2>{bodies[k]}</section>' for k, t in shown)
    title = f"{recipe}: run {run_id}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width"><style>{CSS}</style></head>'
        f"<body><h1>{_e(title)}</h1><nav>{nav}</nav>{sections}"
        f'<p class="muted">From {len(summaries)} run summaries, {_e(summaries[0]["run"]["id"])} '
        f"to {_e(run_id)}.</p></body></html>\n"
    )
