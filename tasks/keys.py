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
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def library_versions(dists: tuple[str, ...]) -> dict[str, str]:
    return {d: library_version(d) for d in sorted(dists)}


def diff_identities(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two identities, one line per changed leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for k in sorted(set(old) | set(new)):
            sub = f"{path}.{k}" if path else str(k)
            if k not in old:
                lines.append(f"{sub}: added ({canonical_json(new[k])})")
            elif k not in new:
                lines.append(f"{sub}: removed (was {canonical_json(old[k])})")
            else:
                lines.extend(diff_identities(old[k], new[k], sub))
        return lines
    if old != new:
        return [f"{path}: {canonical_json(old)} -> {canonical_json(new)}"]
    return []
