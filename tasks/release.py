"""Quality gates and the release folder: which evaluated variants are fit to ship.

Each evaluate step with gates is judged on its entry's metrics (tasks/gates.py); a variant
that passes every gate of every evaluation of it is linked under
`artifacts/<recipe>/release/<evaluate step's name>`, so a deploy script reads one folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tasks.errors import KilnError
from tasks.gates import judge
from tasks.graph import Graph
from tasks.recipe import BASE
from tasks.staging import remove_path


def gate_verdicts(graph: Graph) -> dict[str, list[dict[str, Any]]]:
    """Each built evaluate step with gates -> its gates' results on its entry's metrics. Its
    perplexity change is against the base model's evaluation on the same data with the same
    settings, or not measured (its gate fails) when there is none: never against whatever
    other row the report would fall back to."""
    if not any(graph.step(ref).gates for ref in graph.evaluate_refs()):
        return {}  # nothing to judge: read no manifest (a no-op `doit` stays fast)
    measured = {ref: _metrics(graph, ref) for ref in graph.evaluate_refs()}
    verdicts = {}
    for ref in graph.evaluate_refs():
        step = graph.step(ref)
        if not step.gates or measured[ref] is None:
            continue
        metrics = {k: v for k, v in measured[ref].items() if k != "ppl_change"}
        base = next(
            (measured[r] for r in graph.evaluate_refs() if _is_reference(graph, r, ref)), None
        )
        if base and base.get("perplexity") and metrics.get("perplexity") is not None:
            metrics["ppl_change"] = metrics["perplexity"] / base["perplexity"] - 1
        verdicts[ref] = judge(step.gates, metrics)
    return verdicts


def _metrics(graph: Graph, ref: str) -> dict[str, Any] | None:
    """A built step's metrics (an unreadable manifest: none measured); None when not built."""
    key = graph.keys[ref]
    if not graph.store.is_complete(key):
        return None
    try:
        return graph.store.manifest(key).get("metrics") or {}
    except KilnError:
        return {}


EVAL_SETTINGS = ("data", "seq_len", "max_tokens")  # what a perplexity is comparable across


def _is_reference(graph: Graph, candidate: str, ref: str) -> bool:
    """Whether candidate evaluates the base model as ref evaluates its variant."""
    base, step = graph.step(candidate), graph.step(ref)
    return base.source == BASE and all(
        getattr(base.config, f, None) == getattr(step.config, f, None) for f in EVAL_SETTINGS
    )


def release_dir(graph: Graph) -> Path:
    return graph.store.root / graph.recipe.name / "release"


def update_release(
    graph: Graph, verdicts: dict[str, list[dict[str, Any]]]
) -> tuple[dict[str, str], bool]:
    """Link each gated evaluation whose variant passed every gate of every evaluation of it
    as release/<evaluate step's name> (each link replaced atomically), remove the others;
    ({name: variant ref}, whether anything changed)."""
    folder, store = release_dir(graph), graph.store
    failing = {graph.step(ref).source for ref, results in verdicts.items()
               if not all(r["passed"] for r in results)}  # fmt: skip
    passing = {}
    for ref in verdicts:
        step = graph.step(ref)
        if step.source not in failing and store.is_complete(graph.keys[step.source]):
            passing[step.name] = step.source
    changed = False
    for name, variant in passing.items():
        link = folder / name
        before = os.readlink(link) if link.is_symlink() else None
        store.link(link, graph.keys[variant])
        changed |= os.readlink(link) != before
    if folder.is_dir():
        for link in folder.iterdir():
            if link.name not in passing and link.is_symlink() and store.owns_link(link):
                remove_path(link)
                changed = True
    return passing, changed
