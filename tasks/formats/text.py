"""Data set files as the data stage writes them: one JSON object per line, with "text" (and
the record's fields), and the text templates that make that text from a record's fields."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from tasks.errors import StageError


def read_text(data_dir: Path, split: str) -> str:
    """The split's texts joined by blank lines (one JSON object with "text" per line)."""
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise StageError(f"data set {data_dir} has no {path.name}: rebuild its data step")
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n\n".join(json.loads(line)["text"] for line in lines if line.strip())


def template_fields(template: str) -> list[str]:
    """The field names a text_template uses; ValueError for a malformed or positional one."""
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    roots = [re.split(r"[.\[]", name)[0] for name in names]
    if not all(roots):
        raise ValueError("fields must be named, as in {phrase}, not {}")
    return roots
