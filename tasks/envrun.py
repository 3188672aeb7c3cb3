"""The child side of `tasks.envs.call`: run one function inside a stage's own environment.

    <env>/bin/python -m tasks.envrun request.json

Imports only the light modules of this package and the stage's module; the function's return
value, or the message of a KilnError it raised, goes to the result file as JSON.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def main(request_path: str) -> int:
    from tasks.config import parse_config
    from tasks.errors import KilnError
    from tasks.stages import StepContext

    request = json.loads(Path(request_path).read_text())
    result = Path(request["result"])
    module, _, name = request["config_class"].partition(":")
    config_class = getattr(importlib.import_module(module), name)
    c = request["ctx"]
    ctx = StepContext(
        task=c["task"], out=Path(c["out"]), artifacts=Path(c["artifacts"]),
        input=Path(c["input"]) if c["input"] else None,
        data={k: Path(v) for k, v in c["data"].items()},
        steps={k: Path(v) for k, v in c["steps"].items()},
    )  # fmt: skip
    module, _, name = request["function"].partition(":")
    function = getattr(importlib.import_module(module), name)
    try:
        config = parse_config(config_class, request["config"], "(environment)", c["task"])
        value = function(config, ctx, **request["extra"])
    except KilnError as err:
        result.write_text(json.dumps({"error": str(err)}))
        return 3
    result.write_text(json.dumps({"value": value}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
