"""Conventions shared by every step that writes an ONNX model folder.

An ONNX step's output is a folder holding one decoder `model.onnx` (weights in external data
beside it), its tokenizer files and, when onnxruntime-genai can run it, `genai_config.json`.
ONNX quantizers rewrite the model file and copy everything else unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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
    skip = {model.name, f"{model.name}.data"}
    skip |= {p.name for p in src.glob(f"{model.stem}*.data")}
    for path in src.iterdir():
        if path.is_file() and path.name not in skip:
            shutil.copy2(path, dst / path.name)


def external_data_files(model: Path) -> list[str]:
    """The files the model's initializers keep their weights in (read from the graph only)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    found = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                found.add(entry.value)
    return sorted(found)


def private_copy(folder: Path, work: Path) -> Path:
    """A copy of the folder's model and its external data in `work`, for tools that write
    beside the model they read (calibration graphs, re-saved inputs): a store entry must not
    change. Returns the copy's model path."""
    model = model_file(folder)
    work.mkdir(parents=True, exist_ok=True)
    for name in [model.name, *external_data_files(model)]:
        shutil.copyfile(folder / name, work / name)
    return work / model.name


def save_with_external_data(model: Any, path: Path) -> None:
    """Save a ModelProto with its weights in one external data file beside it (`<name>.data`)."""
    import onnx

    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=1024)  # fmt: skip
