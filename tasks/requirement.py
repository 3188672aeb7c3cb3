"""Names and versions of Python packages as the standards spell them (PEP 508 names, PEP 440
versions, PEP 503 normalization): plain regular expressions, light enough for recipe loading."""

from __future__ import annotations

import re

NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")  # PEP 508: ASCII only
VERSION = re.compile(  # PEP 440, appendix B
    r"v?(?:(?P<epoch>[0-9]+)!)?(?P<release>[0-9]+(?:\.[0-9]+)*)"
    r"(?P<pre>[-_.]?(?P<pre_l>alpha|a|beta|b|preview|pre|c|rc)[-_.]?(?P<pre_n>[0-9]+)?)?"
    r"(?P<post>-(?P<post_n1>[0-9]+)|[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>[0-9]+)?)?"
    r"(?P<dev>[-_.]?dev[-_.]?(?P<dev_n>[0-9]+)?)?"
    r"(?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?",
    re.IGNORECASE,
)
PRE_LABELS = {"alpha": "a", "beta": "b", "c": "rc", "pre": "rc", "preview": "rc"}


def normalize_name(name: str) -> str:
    """PEP 503's form of a project name, as index URLs spell it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def version_key(text: str) -> tuple | None:
    """A PEP 440 version as a comparable tuple (equal versions, equal tuples), or None."""
    m = VERSION.fullmatch(text.strip())
    if m is None:
        return None
    release = [int(n) for n in m["release"].split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()  # 1.0 == 1.0.0
    pre_label = (m["pre_l"] or "").lower()
    pre = (PRE_LABELS.get(pre_label, pre_label), int(m["pre_n"] or 0)) if pre_label else ()
    post = (int(m["post_n1"] or m["post_n2"] or 0),) if m["post"] else ()
    dev = (int(m["dev_n"] or 0),) if m["dev"] else ()
    local = tuple(re.split(r"[-_.]", m["local"].lower())) if m["local"] else ()
    return int(m["epoch"] or 0), tuple(release), pre, post, dev, local


OPERATORS = ("~=", "==", "!=", "<=", ">=", "<", ">")  # two-character ones first


def split_floating(text: str) -> tuple[str, list[str]] | None:
    """(name, specifiers) of a floating requirement, `name` or `name>=1.0,<2` (PEP 440
    specifiers, comma-separated, no spaces, extras, markers or URLs); None when it is not one."""
    m = NAME.match(text)
    if m is None:
        return None
    name, rest = m[0], text[m.end() :]
    specifiers = rest.split(",") if rest else []
    for spec in specifiers:
        op = next((o for o in OPERATORS if spec.startswith(o)), None)
        version = spec[len(op) :] if op else ""
        if version.endswith(".*") and op in ("==", "!="):
            version = version[:-2]
        if op is None or not VERSION.fullmatch(version):
            return None
    return name, specifiers
