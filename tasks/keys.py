"""A step's identity and key.

The identity is everything that changes a step's output and nothing else: the stage, the
algorithm, the stage's VERSION, its parameters with defaults filled in, the keys of its inputs
and the versions of the libraries that shape the output. The key is SHA-256 of the identity's
canonical JSON, kept at full width.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import metadata
from typing import Any


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_of(identity: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


@cache
def library_version(dist: str) -> str:
    """Installed version of a distribution, or 'absent' (a later install then changes the key)."""
    try:
        found = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return "absent"
    # The Version header, read from the top of the file: metadata.version() parses the whole
    # file as e-mail first (transformers' is 40 kB of README), which every no-op run paid.
    text = found.read_text("METADATA") or found.read_text("PKG-INFO") or ""
    for line in text.partition("\n\n")[0].splitlines():  # the headers end at the first blank line
        if line.startswith("Version:"):
            return line.removeprefix("Version:").strip()
    return found.version


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
