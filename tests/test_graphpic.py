"""The build graph as a picture: DOT with the last run's colours, Mermaid when dot is absent."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tasks import graphpic
from tasks.graph import load_graph
from tasks.graphpic import STATUS_COLOURS, dot_quote, dot_source, draw, mermaid_source

RECIPE = """
[model]
source = "{model}"

[data.prose]
path = "{prose}"
format = "text"

[capture.fp32]
precision = "fp32"

[quantize.int8_per-channel]
algorithm = "ort-dynamic"
from = "capture.fp32"
per_channel = true

[evaluate.fp32]
from = "capture.fp32"
data = "prose"

[evaluate.int8_per-channel]
from = "quantize.int8_per-channel"
data = "prose"
"""
STATUSES = {
    "model": "up-to-date",
    "data:prose": "pulled",
    "capture:fp32": "built",
    "quantize:int8_per-channel": "failed",
    "evaluate:int8_per-channel": "input-failed",
    "evaluate:fp32": "gate-failed",
}  # the report is missing: not run
EDGES = {
    ("model", "capture:fp32"),
    ("capture:fp32", "quantize:int8_per-channel"),
    ("capture:fp32", "evaluate:fp32"),
    ("data:prose", "evaluate:fp32"),
    ("quantize:int8_per-channel", "evaluate:int8_per-channel"),
    ("data:prose", "evaluate:int8_per-channel"),
    ("evaluate:fp32", "report"),
    ("evaluate:int8_per-channel", "report"),
}
# A DOT double-quoted string as Graphviz's reader sees it: \" is the one escape (possessive:
# no backtracking into a shorter string).
QUOTED = r'"(?:\\"|[^"])*+"'


@pytest.fixture
def graph(tmp_path):
    """The recipe's graph; the model is a stand-in folder (keys hash files, nothing loads)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    prose = tmp_path / "prose.txt"
    prose.write_text("Some prose.\n\nMore prose.\n")
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE.format(model=model, prose=prose))
    return load_graph(recipe, tmp_path / "artifacts")


class OddGraph:
    """Names no recipe allows (tasks/recipe.py refuses them), to prove the quoting holds."""

    NAMES = ["model", 'evil"]; x -> y; "', "back\\slash\\", "two\nlines", "```end", "-Tpng"]

    keys = {name: "k" for name in NAMES}

    def task(self, ref: str) -> str:
        return ref

    def inputs(self, ref: str) -> list[str]:
        return [] if ref == "model" else ["model"]


def nodes_of(dot: str) -> dict[str, str]:
    """DOT node id -> its attribute text, for the node lines dot_source writes."""
    return dict(re.findall(rf"^  ({QUOTED}) \[(.*)\];$", dot, flags=re.M))


def test_dot_has_a_coloured_node_per_step_and_an_edge_per_input(graph):
    dot = dot_source(graph, STATUSES)
    nodes = {json.loads(n): attrs for n, attrs in nodes_of(dot).items()}  # DOT quoting == JSON here
    assert list(nodes) == [graph.task(ref) for ref in graph.keys] and "report" in nodes
    edges = {tuple(json.loads(n) for n in e) for e in re.findall(rf"({QUOTED}) -> ({QUOTED})", dot)}
    assert edges == EDGES
    for task, status in {**STATUSES, "report": "not run"}.items():
        fill, border = STATUS_COLOURS[status]
        assert f'fillcolor="{fill}", color="{border}"' in nodes[task], task
        assert f'label="{task}\\n{status}"' in nodes[task]
    assert "dashed" in nodes["report"] and "shape=cylinder" in nodes["data:prose"]


@pytest.mark.parametrize("name", OddGraph.NAMES)
def test_a_quoted_name_cannot_end_its_string(name):
    quoted = dot_quote(name)
    assert re.fullmatch(QUOTED, quoted) and "\n" not in quoted


def test_odd_names_stay_inside_their_quotes():
    dot = dot_source(OddGraph(), {})
    outside = re.sub(QUOTED, "S", dot)  # what is left is structure only
    assert outside.count("->") == len(OddGraph.NAMES) - 1 and "x -> y" not in outside
    assert len(nodes_of(dot)) == len(OddGraph.NAMES)
    md = mermaid_source(OddGraph(), {})
    assert md.count("```") == 2 and md.startswith("```mermaid\n") and md.endswith("```\n")
    assert '"' not in md.replace('["', "").replace('"]', "") and "\\" not in md


def test_without_dot_the_picture_is_mermaid(graph, tmp_path, monkeypatch):
    monkeypatch.setattr(graphpic.shutil, "which", lambda name: None)
    out = tmp_path / "pic"
    out.mkdir()
    (out / "graph.svg").write_text("<svg>stale</svg>")
    path = draw(graph, STATUSES, out)
    assert path == out / "graph.md" and not (out / "graph.svg").exists()
    md = path.read_text()
    assert md.startswith("```mermaid\nflowchart LR\n")
    assert '["quantize:int8_per-channel<br>failed"]' in md
    assert "classDef failed fill:#f9c4c4" in md and "classDef uptodate " in md
    assert re.search(r"class (n\d+,)*n\d+ notrun$", md, flags=re.M)
    assert md.count(" --> ") == len(EDGES)


def test_a_failing_dot_falls_back_and_only_ever_gets_a_fixed_argv(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "dot"
    log = tmp_path / "argv"
    fake.write_text(
        f'#!/bin/sh\necho "$@" > {log}\ncat > {log}.stdin\necho "syntax error" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setattr(graphpic.shutil, "which", lambda name: str(fake))
    path = draw(OddGraph(), {}, tmp_path / "pic")
    assert path.name == "graph.md"
    assert log.read_text() == "-Tsvg\n" and "-Tpng" in Path(f"{log}.stdin").read_text()
    assert "syntax error" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_with_graphviz_the_picture_is_an_svg(graph, tmp_path):
    (tmp_path / "pic").mkdir()
    (tmp_path / "pic" / "graph.md").write_text("stale")
    path = draw(graph, STATUSES, tmp_path / "pic")
    assert path == tmp_path / "pic" / "graph.svg" and not (tmp_path / "pic" / "graph.md").exists()
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    titles = {t.text for t in root.iter("{http://www.w3.org/2000/svg}title")}
    assert {graph.task(ref) for ref in graph.keys} <= titles
    assert STATUS_COLOURS["failed"][0] in path.read_text()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_graphviz_draws_odd_names_as_text_and_nothing_more():
    source = dot_source(OddGraph(), {})
    drawn = [
        subprocess.run(
            ["dot", f"-T{kind}"],
            input=source,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout  # fmt: skip
        for kind in ("json", "svg")
    ]
    parsed = json.loads(drawn[0])
    assert len(parsed["objects"]) == len(OddGraph.NAMES) and len(parsed["edges"]) == 5
    texts = {t.text for t in ET.fromstring(drawn[1]).iter("{http://www.w3.org/2000/svg}text")}
    for name in OddGraph.NAMES:
        assert all(line in texts for line in name.split("\n")), (name, texts)
