"""What the finetune and adapter stages write beside their output, and how one store entry finds
the other entries it was made from."""

from __future__ import annotations

from pathlib import Path

from tasks.errors import StageError

FINETUNE_INFO = "finetune.json"  # in a finetune step's output: its base's key and example format
ADAPTER_INFO = "adapter.json"  # in an adapter step's output: its ONNX base's key and the file


def entry_beside(entry: Path, key: str) -> Path:
    """Another store entry, found from one entry's path (store/<key[:2]>/<key>)."""
    other = entry.parent.parent / key[:2] / key
    if not (other / "MANIFEST.json").is_file():
        raise StageError(f"store entry {key[:16]}... is missing: run `doit` to rebuild it")
    return other
