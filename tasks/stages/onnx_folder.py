"""Conventions shared by every step that writes an ONNX model folder.

An ONNX step's output is a folder holding one decoder `model.onnx` (weights in external data
beside it), its tokenizer files and, when onnxruntime-genai can run it, `genai_config.json`.
ONNX quantizers rewrite the model file and copy everything else unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tasks.errors import StageError

GENAI_CONFIG = "genai_config.json"


def model_file(folder: Path) -> Path:
    """The decoder model of an ONNX folder: the one genai_config.json names, else the only .onnx."""
    config = folder / GENAI_CONFIG
    if config.is_file():
        name = json.loads(config.read_text())["model"]["decoder"]["filename"]
        return folder / name
    found = sorted(folder.glob("*.onnx"))
    if len(found) != 1:
        raise StageError(f"{folder}: expected one .onnx model, found {[p.name for p in found]}")
    return found[0]


def copy_sidecars(src: Path, dst: Path) -> None:
    """Copy everything but the model and its external data (tokenizer, genai_config, ...)."""
    model = model_file(src)
    skip = {model.name, f"{model.name}.data", "MANIFEST.json"}
    skip |= {p.name for p in src.glob(f"{model.stem}*.data")}
    for path in src.iterdir():
        if path.is_file() and path.name not in skip:
            shutil.copy2(path, dst / path.name)
