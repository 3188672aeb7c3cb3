"""The recipe's report: one row per evaluate step, as a terminal table, Markdown and HTML.

The report is a step like the others (keyed by the evaluate steps it shows), so it is rebuilt
only when one of them changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPORT_STEP = "report"
REPORT_VERSION = "3"  # 2: a data column, Δ ppl per data set, answer accuracy; 3: ms below 10


def milliseconds(value: float) -> str:
    """Whole milliseconds, but two digits below 10: a tiny model's 0.4 ms is not "0"."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


COLUMNS = [  # (metric, header, format)
    ("size_bytes", "size MB", lambda v: f"{v / 1e6:.1f}"),
    ("perplexity", "perplexity", lambda v: f"{v:.2f}"),
    ("ppl_change", "Δ ppl", lambda v: f"{v:+.1%}"),
    ("load_s", "load s", lambda v: f"{v:.2f}"),
    ("first_token_ms", "1st token ms", milliseconds),
    ("decode_tokens_per_s", "decode tok/s", lambda v: f"{v:.1f}"),
    ("answer_accuracy", "answers", lambda v: f"{v:.1%}"),
]


TEXT_COLUMNS = 4  # step, model, format, data: left-aligned; the metrics right-aligned


def report_identity(title: str, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Keyed by what the report shows: its title and, per evaluate step, its key and the
    names that label its row."""
    return {"stage": REPORT_STEP, "version": REPORT_VERSION, "title": title, "rows": rows}


def make_rows(evaluations: list[tuple[str, str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """(task, from, data set, metrics) per evaluate step -> rows, with the change in perplexity
    relative to the base model's row on the same data set (else that data set's first row)."""
    rows = [
        {"step": task, "model": source, "data": data, **metrics}
        for task, source, data, metrics in evaluations
    ]
    for row in rows:
        same = [r for r in rows if r["data"] == row["data"] and r.get("perplexity")]
        base = next((r for r in same if r["model"] == "model"), same[0] if same else None)
        if base and row.get("perplexity"):
            row["ppl_change"] = row["perplexity"] / base["perplexity"] - 1
    return rows


def _cells(row: dict[str, Any]) -> list[str]:
    cells = [row["step"], row["model"], str(row.get("format", "")), row.get("data") or "-"]
    return cells + [fmt(row[m]) if row.get(m) is not None else "-" for m, _, fmt in COLUMNS]


def headers() -> list[str]:
    return ["step", "model", "format", "data"] + [h for _, h, _ in COLUMNS]


def text_table(rows: list[dict[str, Any]]) -> str:
    table = [headers()] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < TEXT_COLUMNS else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = headers()
    out = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * TEXT_COLUMNS + ["---:"] * (len(head) - TEXT_COLUMNS)) + "|",
    ]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(out)


def _bars(rows: list[dict[str, Any]], metric: str, title: str, fmt: Any) -> str:
    """An inline SVG bar chart of one metric: no plotting library needed to read the report."""
    import html  # here and below: every doit run imports this module (for the report's key)

    values = [(r["step"], r.get(metric)) for r in rows if r.get(metric) is not None]
    if not values:
        return ""
    top = max(v for _, v in values) or 1.0
    bar_h, label_w, width = 22, 220, 420
    parts = [f'<svg width="{label_w + width + 90}" height="{bar_h * len(values) + 10}" role="img">']
    for i, (name, value) in enumerate(values):
        y, w = 5 + i * bar_h, max(2.0, width * value / top)
        parts.append(f'<text x="0" y="{y + 15}">{html.escape(name)}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.0f}" height="{bar_h - 6}" fill="#4c78a8"/>'
        )
        parts.append(f'<text x="{label_w + w + 6:.0f}" y="{y + 15}">{fmt(value)}</text>')
    parts.append("</svg>")
    return f"<h2>{html.escape(title)}</h2>\n" + "\n".join(parts)


def html_report(rows: list[dict[str, Any]], title: str) -> str:
    import html

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers())
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows
    )
    samples = "".join(
        f"<dt>{html.escape(r['step'])}</dt><dd>{html.escape(str(r['sample']))}</dd>"
        for r in rows
        if r.get("sample")
    )
    charts = "\n".join(
        _bars(rows, m, t, f)
        for m, t, f in [
            ("perplexity", "Perplexity on held-out text (lower is better)", lambda v: f"{v:.2f}"),
            ("size_bytes", "Size on disk (MB)", lambda v: f"{v / 1e6:.1f}"),
            (
                "answer_accuracy",
                "Answer accuracy on held-out prompts (higher is better)",
                lambda v: f"{v:.1%}",
            ),
            (
                "decode_tokens_per_s",
                "Decode speed (tokens/s, higher is better)",
                lambda v: f"{v:.1f}",
            ),
        ]
    )
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse}td,th{padding:.3em .8em;border-bottom:1px solid #ddd}"
        "td:nth-child(n+5){text-align:right;font-variant-numeric:tabular-nums}"
        "svg text{font-size:13px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<table><tr>{head}</tr>{body}</table>\n{charts}\n"
        f"<h2>Greedy samples</h2><dl>{samples}</dl></body></html>\n"
    )


def write_report(out: Path, rows: list[dict[str, Any]], title: str) -> None:
    (out / "report.md").write_text(f"# {title}\n\n{markdown_table(rows)}\n", encoding="utf-8")
    (out / "report.html").write_text(html_report(rows, title), encoding="utf-8")
