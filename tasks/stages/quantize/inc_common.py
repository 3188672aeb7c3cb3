"""What Intel's ONNX quantizers share: their environment and the checks around them.

`neural-compressor` lost its ONNX support in 3.8; Intel's ONNX quantizer is now the separate
`onnx-neural-compressor` 1.0, which requires numpy < 2 (the main environment's torch and
onnxruntime use numpy 2) and imports prettytable and scipy without declaring them. So it runs
in its own environment, pinned here and installed from the hashed lock made from these pins
(locks/inc.txt, refreshed with `python tools/lock_envs.py inc`); the main environment only
checks its output.
"""

from __future__ import annotations

from pathlib import Path

from tasks.envs import Environment

INC = Environment(
    name="inc",
    requirements=(
        "onnx-neural-compressor==1.0",
        "numpy==1.26.4",
        "onnx==1.23.2",
        "onnxruntime==1.32.0",
        "prettytable==3.18.0",  # imported, not declared
        "scipy==1.17.1",  # imported, not declared
    ),
    why="onnx-neural-compressor needs numpy < 2 and undeclared packages",
    lock=Path(__file__).with_name("locks") / "inc.txt",
)
