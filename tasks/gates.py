"""Quality gates: what an evaluated variant must reach to be released.

An evaluate step says them in its recipe table (`gates = { max_ppl_change = 0.12 }`). They
are not part of its key: tightening a gate re-judges the variant from the metrics already
measured, it does not measure again.
"""

from __future__ import annotations

import math
from typing import Any

from tasks.record import Record, frozen


@frozen
class Gate(Record):
    metric: str  # the evaluate step's metric it reads
    most: bool  # True: the value must be at most the limit; False: at least
    scale: float  # metric value * scale = the gate's unit
    doc: str


GATES = {
    "max_ppl_change": Gate(
        "ppl_change", True, 1.0,
        "held-out perplexity at most this much above the base model's on the same data "
        "(0.12: +12%)",
    ),
    "max_perplexity": Gate("perplexity", True, 1.0, "held-out perplexity at most this"),
    "min_answer_accuracy": Gate(
        "answer_accuracy", False, 1.0, "share of prompts answered right, at least this (0.7: 70%)"
    ),
    "max_size_mb": Gate("size_bytes", True, 1e-6, "size on disk at most this many MB"),
    "min_decode_tokens_per_s": Gate(
        "decode_tokens_per_s", False, 1.0, "decode speed at least this many tokens per second"
    ),
    "max_first_token_ms": Gate("first_token_ms", True, 1.0, "first token within this many ms"),
    "max_load_s": Gate("load_s", True, 1.0, "load time at most this many seconds"),
}  # fmt: skip


def check_gates(table: Any) -> tuple[tuple[str, float], ...]:
    """The gates of a recipe table as (name, limit) pairs; ValueError says what is wrong."""
    if not isinstance(table, dict):
        raise ValueError(
            f"gates = {table!r} is not a table: write gates = {{ max_ppl_change = 0.1 }}"
        )
    for name, limit in table.items():
        if name not in GATES:
            known = ", ".join(GATES)
            raise ValueError(f"unknown gate {name!r}: the gates are {known}")
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not math.isfinite(limit)
        ):
            raise ValueError(f"gate {name} = {limit!r} is not a number")
    return tuple((name, float(limit)) for name, limit in table.items())


def judge(gates: tuple[tuple[str, float], ...], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Each gate's limit, the measured value in the gate's unit and whether it passed. A metric
    the evaluation did not measure fails its gate: a gate that cannot be checked is not met."""
    results = []
    for name, limit in gates:
        gate = GATES[name]
        raw = metrics.get(gate.metric)
        value = raw * gate.scale if isinstance(raw, int | float) else None
        within = value is not None and (value <= limit if gate.most else value >= limit)
        passed = bool(within)
        results.append({"gate": name, "limit": limit, "value": value, "passed": passed})
    return results


def describe(result: dict[str, Any]) -> str:
    """`max_size_mb 174.2 > 150` for a failed gate, `... <= ...` for a passed one."""
    gate, value = GATES[result["gate"]], result["value"]
    if value is None:
        return f"{result['gate']}: not measured"
    sign = ("<=" if result["passed"] else ">") if gate.most else (">=" if result["passed"] else "<")
    # five digits: 319.97 against a limit of 319.5, not "320"; the limit as it was written
    return f"{result['gate']} {value:.5g} {sign} {result['limit']:.6g}"
