"""A step's identity and key.

The identity is everything that changes a step's output and nothing else: the stage, the
algorithm, the stage's VERSION, its parameters with defaults filled in, the keys of its inputs
and the versions of the libraries that shape the output. The key is SHA-256 of the identity's
canonical JSON, kept at full width.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from functools import cache
from importlib import metadata
from importlib.machinery import PathFinder
from typing import Any

from tasks.requirement import normalize_name


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_of(identity: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


@cache
def library_version(dist: str) -> str:
    """Installed version of a distribution, or 'absent' (a later install then changes the key)."""
    folders = _metadata_folders()
    folder = None if folders is None else folders.get(normalize_name(dist))
    text = (_read(folder, "METADATA") or _read(folder, "PKG-INFO")) if folder else ""
    if not text:  # absent, gone since the listing, or in a zip on sys.path: importlib looks
        try:
            found = metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            return "absent"
        text = found.read_text("METADATA") or found.read_text("PKG-INFO") or ""
    # The Version header, read from the top of the file: metadata.version() parses the whole
    # file as e-mail first (transformers' is 40 kB of README), which every no-op run paid.
    for line in text.partition("\n\n")[0].splitlines():  # the headers end at the first blank line
        if line.startswith("Version:"):
            return line.removeprefix("Version:").strip()
    return metadata.distribution(dist).version


@cache
def _metadata_folders() -> dict[str, str] | None:
    """Each installed distribution's metadata folder by PEP 503 name: the first on sys.path,
    where importlib.metadata.distribution() finds it (its lookup machinery cost a no-op about
    0.3 ms a library). None where the path holds a zip or egg, or a finder of distributions
    other than the standard one: importlib.metadata then looks itself."""
    if any(hasattr(f, "find_distributions") and f is not PathFinder for f in sys.meta_path):
        return None
    folders: dict[str, str] = {}
    for root in sys.path:
        try:
            children = os.listdir(root or ".")
        except OSError:
            if os.path.exists(root):  # a file: a zip importlib.metadata reads inside
                return None
            continue
        if root.lower().endswith(".egg"):
            return None
        for child in children:
            if child.lower().endswith((".dist-info", ".egg-info")):
                name = normalize_name(child.rpartition(".")[0].partition("-")[0])
                folders.setdefault(name, os.path.join(root, child))
    return folders


def _read(folder: str, name: str) -> str:
    """The file's start, through its headers (to the first blank line), or "" where it is
    missing."""
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            text = fh.read(8192)
            return text if "\n\n" in text else text + fh.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ""


def library_versions(dists: tuple[str, ...]) -> dict[str, str]:
    return {d: library_version(d) for d in sorted(dists)}


def diff_identities(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, old value, new value) for every leaf that differs; None where absent."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for k in sorted(set(old) | set(new)):
            sub = f"{path}.{k}" if path else str(k)
            changes += diff_identities(old.get(k), new.get(k), sub)
        return changes
    return [(path, old, new)] if old != new else []
