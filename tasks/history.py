"""History and regressions: one run's metrics, judged against the runs before it.

Reads the run summaries tasks/runs.py writes (artifacts/<recipe>/runs/<id>.json, schema 1).
`compare` is the judgement as data: the terminal prints it, tasks/runpage.py draws it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from tasks.errors import KilnError, did_you_mean
from tasks.report import milliseconds


def megabytes(size: float) -> str:
    """MB to a tenth, three digits below 100 MB: a 1% change of a small model shows."""
    mb = size / 1e6
    return f"{mb:.1f}" if mb >= 100 else f"{mb:.3g}"


@dataclass(frozen=True)
class Metric:
    """An evaluate metric as the report shows and judges it."""

    name: str  # the key in an evaluate step's metrics
    label: str
    better: Literal["lower", "higher"] | None  # None: shown, never judged
    tolerance: float | None  # the default: how much worse is still noise
    absolute: bool  # tolerance and change are differences, not fractions of the old value
    show: Callable[[float], str]
    scale: float = 1.0  # value / scale is what a plot's axis shows


METRICS = (
    Metric("perplexity", "perplexity", "lower", 0.005, False, lambda v: f"{v:.3f}"),
    Metric("ppl_change", "Δ ppl vs base", None, None, True, lambda v: f"{v:+.1%}"),
    Metric("size_bytes", "size MB", "lower", 0.01, False, megabytes, 1e6),
    Metric("decode_tokens_per_s", "decode tok/s", "higher", 0.15, False, lambda v: f"{v:.1f}"),
    Metric("first_token_ms", "first token ms", "lower", 0.25, False, milliseconds),
    Metric("answer_accuracy", "answer accuracy", "higher", 0.0, True, lambda v: f"{v:.1%}"),
)
BY_NAME = {m.name: m for m in METRICS}
JUDGED = [m.name for m in METRICS if m.better]


@dataclass(frozen=True)
class Change:
    """One metric of one evaluate step in the current run, against two earlier runs."""

    step: str  # the evaluate task, "evaluate:awq"
    variant: str  # the step it evaluates, "quantize.awq"
    data: str  # the data set it was measured on
    metric: str
    value: float
    previous: float | None  # the last earlier run that measured the step on the same data
    previous_run: str | None
    baseline: float | None
    baseline_run: str | None
    since_previous: float | None  # a fraction of the old value, or a difference (absolute)
    since_baseline: float | None
    regressed_since_previous: bool
    regressed_since_baseline: bool
    tolerance: float | None

    @property
    def regressed(self) -> bool:
        return self.regressed_since_previous or self.regressed_since_baseline

    def describe(self) -> str:
        """One line for the terminal: 'evaluate:gptq perplexity 15.296: +3.0% since
        20261130T020000Z (14.850), regression (tolerance 0.5%)'."""
        show = BY_NAME[self.metric].show
        against = [
            (self.since_previous, self.previous_run, self.previous, self.regressed_since_previous)
        ]
        if self.baseline_run != self.previous_run:
            against.append(
                (
                    self.since_baseline,
                    self.baseline_run,
                    self.baseline,
                    self.regressed_since_baseline,
                )
            )
        parts = [
            f"{delta(self.metric, change)} since {run} ({show(old)})"
            + (f", regression (tolerance {limit(self.metric, self.tolerance)})" if bad else "")
            for change, run, old, bad in against
            if old is not None
        ]
        label = BY_NAME[self.metric].label
        return f"{self.step} {label} {show(self.value)}: {'; '.join(parts) or 'first run'}"


def delta(metric: str, change: float | None) -> str:
    """A change as the terminal and the page show it: '+3.0%', or '-1.0 pp' (absolute)."""
    if change is None:
        return "-"
    return f"{change * 100:+.1f} pp" if BY_NAME[metric].absolute else f"{change:+.1%}"


def limit(metric: str, tolerance: float | None) -> str:
    """A tolerance as written: '0.5%', '0.01%' (not '0.0%'), or '2 pp' (absolute)."""
    if tolerance is None:
        return "-"
    return f"{tolerance * 100:.3g} pp" if BY_NAME[metric].absolute else f"{tolerance * 100:.3g}%"


def tolerances_with(overrides: dict[str, float] | None) -> dict[str, float]:
    """The default tolerances with overrides; unknown metrics and negative values are errors."""
    found = {m.name: m.tolerance for m in METRICS if m.tolerance is not None}
    for name, value in (overrides or {}).items():
        if name not in found:
            raise KilnError(
                f"tolerance for {name!r}: no such judged metric{did_you_mean(name, JUDGED)}",
                f"set tolerances for: {', '.join(JUDGED)}",
            )
        if not isinstance(value, int | float) or value < 0 or math.isnan(value):
            raise KilnError(
                f"tolerance {name}={value!r} is not a number >= 0",
                "write a fraction of the old value (0.01 = 1%), or for answer_accuracy a "
                "difference (0.02 = 2 points)",
            )
        found[name] = float(value)
    return found


def _baseline_index(summaries: list[dict[str, Any]], baseline: str | None) -> int:
    ids = [s["run"]["id"] for s in summaries]
    if baseline is None:
        return 0
    if baseline not in ids:
        raise KilnError(
            f"baseline={baseline!r} is not a run of this recipe{did_you_mean(baseline, ids)}",
            f"name a run id from artifacts/<recipe>/runs/ (oldest {ids[0]}, newest {ids[-1]})",
        )
    return ids.index(baseline)


def measured(summary: dict[str, Any], task: str, metric: str, data: str | None) -> float | None:
    """The summary's value of metric for task when measured on data, else None."""
    step = summary.get("steps", {}).get(task, {})
    value = (step.get("metrics") or {}).get(metric)
    if value is None or step.get("data") != data:
        return None  # another data set's perplexity is another scale: not comparable
    return value


def _change(metric: Metric, now: float, then: float | None) -> float | None:
    if then is None:
        return None
    if metric.absolute:
        return now - then
    return (now - then) / abs(then) if then else None


def _worse(metric: Metric, now: float, then: float | None, tolerance: float | None) -> bool:
    if then is None or metric.better is None or tolerance is None:
        return False
    loss = then - now if metric.better == "higher" else now - then
    if not metric.absolute:
        if then == 0:
            return loss > 0
        loss /= abs(then)
    return loss > tolerance + 1e-12  # equal values are never a regression


def evaluate_steps(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The summary's evaluate steps that have metrics, by task, in recipe order."""
    return {
        task: step
        for task, step in summary.get("steps", {}).items()
        if step.get("stage") == "evaluate" and step.get("metrics")
    }


def compare(
    summaries: list[dict[str, Any]],
    baseline: str | None = None,
    tolerances: dict[str, float] | None = None,
) -> list[Change]:
    """Every metric of every evaluate step of the last summary against the previous run that
    measured it and the baseline run: the one named, else the oldest run that measured it (a
    first run that built only part of the recipe must not leave a metric with no baseline
    for good). Summaries: oldest first."""
    if not summaries:
        return []
    limits = tolerances_with(tolerances)
    *earlier, current = summaries
    named = summaries[_baseline_index(summaries, baseline)] if baseline is not None else None
    rows = []
    for task, step in evaluate_steps(current).items():
        data = step.get("data")
        for metric in METRICS:
            value = step["metrics"].get(metric.name)
            if value is None:
                continue
            prev_run = next(
                (s for s in reversed(earlier) if measured(s, task, metric.name, data) is not None),
                None,
            )
            prev = measured(prev_run, task, metric.name, data) if prev_run else None
            base_run = named if named is not current else None
            if baseline is None:
                base_run = next(
                    (s for s in earlier if measured(s, task, metric.name, data) is not None), None
                )
            base = measured(base_run, task, metric.name, data) if base_run else None
            tol = limits.get(metric.name)
            rows.append(
                Change(
                    step=task,
                    variant=step.get("variant", ""),
                    data=data or "",
                    metric=metric.name,
                    value=value,
                    tolerance=tol,
                    previous=prev,
                    previous_run=prev_run["run"]["id"] if prev_run else None,
                    baseline=base,
                    baseline_run=base_run["run"]["id"] if base is not None else None,
                    since_previous=_change(metric, value, prev),
                    since_baseline=_change(metric, value, base),
                    regressed_since_previous=_worse(metric, value, prev, tol),
                    regressed_since_baseline=_worse(metric, value, base, tol),
                )
            )
    return rows
