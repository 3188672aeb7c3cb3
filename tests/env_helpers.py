"""Functions the environment tests run inside a throw-away environment (tasks.envs.call)."""

from __future__ import annotations

import sys
from typing import Any

from tasks.errors import StageError


def where(config: Any, ctx: Any, value: int) -> dict[str, Any]:
    import six  # only in the test environment, not in the main one

    print(f"  {ctx.task}: working in {sys.prefix}", file=sys.stderr)
    print("Progress: [####] 100%", end="", flush=True)  # to stdout, unterminated, as INC does
    return {"prefix": sys.prefix, "six": six.__version__, "value": value * 2}


def fail(config: Any, ctx: Any) -> dict[str, Any]:
    raise StageError("the quantizer refused the model\n  fix: quantize an fp32 capture")
