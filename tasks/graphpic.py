"""The build graph as a picture: one node per step, coloured by its status in the last run.

Graphviz's `dot` draws it as SVG when it is installed; otherwise the picture is a Mermaid
flowchart in Markdown, which GitHub and most Markdown viewers draw themselves.

Step names are letters, digits, '-' and '_' (tasks/recipe.py), but every name is still quoted
as if it could hold anything: a picture must never be a way to inject DOT, Mermaid or Markdown.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

NOT_RUN = "not run"
# status -> (fill, border): light fills keep black text readable; the border carries the hue.
STATUS_COLOURS = {
    "built": ("#c7e9c0", "#2e8b3a"),
    "up-to-date": ("#e4e4e4", "#8c8c8c"),
    "pulled": ("#c6dbef", "#2171b5"),
    "failed": ("#f9c4c4", "#d62728"),
    "input-failed": ("#fdd9b0", "#e6550d"),
    "gate-failed": ("#ddd6ee", "#6a51a3"),
    NOT_RUN: ("#ffffff", "#b0b0b0"),
}
DOT_TIMEOUT_S = 60  # a few hundred nodes take well under a second


class GraphLike(Protocol):
    """What the picture needs of tasks.graph.Graph (not imported: it is a layer above)."""

    keys: dict[str, str]

    def task(self, ref: str) -> str: ...

    def inputs(self, ref: str) -> list[str]: ...


def statuses_of(summary: dict[str, Any] | None) -> dict[str, str]:
    """task -> status from a run summary (artifacts/<recipe>/runs/<id>.json); {} for none."""
    steps = (summary or {}).get("steps", {})
    return {task: step["status"] for task, step in steps.items() if step.get("status")}


def _status(statuses: dict[str, str], task: str) -> str:
    status = statuses.get(task, NOT_RUN)
    return status if status in STATUS_COLOURS else NOT_RUN


def _nodes_and_edges(graph: GraphLike) -> tuple[list[str], list[tuple[str, str]]]:
    """Tasks in the keys' order (inputs first, the report last) and (input, user) edges."""
    nodes = [graph.task(ref) for ref in graph.keys]
    edges: list[tuple[str, str]] = []
    for ref in graph.keys:
        for source in graph.inputs(ref):
            edge = (graph.task(source), graph.task(ref))
            if edge not in edges:
                edges.append(edge)
    return nodes, edges


def dot_quote(text: str) -> str:
    """A DOT double-quoted string that shows text and cannot end early. DOT's reader knows one
    escape, \\", so a backslash cannot be written as \\\\ (before the closing quote it would
    escape it). Graphviz reads character references in a label before its own \\ escapes, so a
    backslash is written &#92;&#92;, and line breaks and '&' as references too: the encoding is
    one-to-one, so distinct names stay distinct node ids."""
    for char, code in (("&", "&amp;"), ("\\", "&#92;&#92;"), ("\n", "&#10;"), ("\r", "&#13;")):
        text = text.replace(char, code)
    return '"' + text.replace('"', '\\"') + '"'


def _dot_label(*lines: str) -> str:
    """Lines joined by DOT's centred line break, \\n: the only backslashes in the string."""
    lines = tuple(part for line in lines for part in line.splitlines() or [""])
    return '"' + "\\n".join(dot_quote(line)[1:-1] for line in lines) + '"'


def _shape(task: str) -> str:
    stage = task.split(":", 1)[0]
    return {"data": "cylinder", "report": "note"}.get(stage, "box")


def dot_source(graph: GraphLike, statuses: dict[str, str]) -> str:
    """A DOT digraph: inputs on the left, each step filled with its status's colour."""
    nodes, edges = _nodes_and_edges(graph)
    lines = [
        "digraph modelkiln {",
        "  rankdir=LR;",
        '  node [style="rounded,filled", fontname="sans-serif", fontsize=11, penwidth=1.5];',
        '  edge [color="#707070", arrowsize=0.7];',
    ]
    for task in nodes:
        status = _status(statuses, task)
        fill, border = STATUS_COLOURS[status]
        style = '"rounded,filled,dashed"' if status == NOT_RUN else '"rounded,filled"'
        lines.append(
            f"  {dot_quote(task)} [label={_dot_label(task, status)}, shape={_shape(task)}, "
            f'style={style}, fillcolor="{fill}", color="{border}", '
            f"tooltip={dot_quote(f'{task}: {status}')}];"
        )
    lines += [f"  {dot_quote(a)} -> {dot_quote(b)};" for a, b in edges]
    return "\n".join(lines + ["}"]) + "\n"


def mermaid_text(text: str) -> str:
    """text for a quoted Mermaid label: every character but letters, digits and ' _.:-' as a
    #<code>; entity, so no quote, bracket, '<' or backtick can end the label or the code block."""
    return "".join(c if re.fullmatch(r"[A-Za-z0-9 _.:-]", c) else f"#{ord(c)};" for c in text)


def _mermaid_class(status: str) -> str:
    return re.sub(r"[^a-z]", "", status)  # "up-to-date" -> "uptodate": a plain identifier


def mermaid_source(graph: GraphLike, statuses: dict[str, str]) -> str:
    """A Mermaid flowchart in a fenced Markdown block; nodes are n0, n1, ... so a step's name
    appears only inside quoted labels."""
    nodes, edges = _nodes_and_edges(graph)
    ids = {task: f"n{i}" for i, task in enumerate(nodes)}
    lines = ["```mermaid", "flowchart LR"]
    lines += [
        f'  {ids[t]}["{mermaid_text(t)}<br>{mermaid_text(_status(statuses, t))}"]' for t in nodes
    ]
    lines += [f"  {ids[a]} --> {ids[b]}" for a, b in edges]
    used: dict[str, list[str]] = {}
    for task in nodes:
        used.setdefault(_status(statuses, task), []).append(ids[task])
    for status, members in used.items():
        fill, border = STATUS_COLOURS[status]
        dash = ",stroke-dasharray:4 3" if status == NOT_RUN else ""
        name = _mermaid_class(status)
        lines.append(f"  classDef {name} fill:{fill},stroke:{border},color:#000{dash}")
        lines.append(f"  class {','.join(members)} {name}")
    return "\n".join(lines + ["```"]) + "\n"


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a viewer never sees half a picture."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _run_dot(dot: str, source: str) -> str | None:
    """SVG from `dot -Tsvg`, the DOT text on stdin (a fixed argv: recipe text never reaches
    the command line); None, with the reason on stderr, when dot fails."""
    try:
        done = subprocess.run(
            [dot, "-Tsvg"], input=source, capture_output=True, text=True, encoding="utf-8",
            timeout=DOT_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"graph: {dot} -Tsvg did not finish ({err}); drawing Mermaid", file=sys.stderr)
        return None
    if done.returncode != 0 or "<svg" not in done.stdout:
        why = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        print(f"graph: {dot} -Tsvg failed ({why[0]}); drawing Mermaid", file=sys.stderr)
        return None
    return done.stdout


def draw(graph: GraphLike, statuses: dict[str, str], out_dir: Path) -> Path:
    """out_dir/graph.svg drawn by Graphviz when `dot` is on PATH, else out_dir/graph.md
    (Mermaid). The other file, left from an earlier run, is removed: it would be stale."""
    out_dir.mkdir(parents=True, exist_ok=True)
    svg_path, md_path = out_dir / "graph.svg", out_dir / "graph.md"
    dot = shutil.which("dot")
    svg = _run_dot(dot, dot_source(graph, statuses)) if dot else None
    if svg is not None:
        _write(svg_path, svg)
        md_path.unlink(missing_ok=True)
        return svg_path
    _write(md_path, mermaid_source(graph, statuses))
    svg_path.unlink(missing_ok=True)
    return md_path
