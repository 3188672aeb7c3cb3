"""pip's index settings, read the way pip reads them, for downloads that do not run pip.

index-url, extra-index-url, find-links, no-index, cert and timeout, from pip's configuration
files (global, user, site, then PIP_CONFIG_FILE; each file's [global] then [download] section)
and PIP_* variables, each overriding the one before, as in pip.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from tasks.errors import StageError

DEFAULT_INDEX = "https://pypi.org/simple/"
# pip's option names (as config keys and PIP_* variables) -> the setting they give.
SETTING_OF = {
    "index-url": "index", "pypi-url": "index", "extra-index-url": "extra",
    "find-links": "find_links", "no-index": "no_index", "cert": "cert",
    "timeout": "timeout", "default-timeout": "timeout",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Settings:
    """The index settings of pip's configuration that say where files come from."""

    indexes: tuple[str, ...] = (DEFAULT_INDEX,)  # index-url, then extra-index-urls
    find_links: tuple[str, ...] = ()
    cert: str = ""
    timeout: float = 15.0


def pip_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """pip's settings: config files (global, user, site, PIP_CONFIG_FILE; [global] then
    [download] sections), then PIP_* variables, each overriding the one before, as in pip."""
    merged: dict[str, str] = {}
    for path in _config_files(environ):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as err:
            raise StageError(f"cannot read pip's configuration {path}: {err}") from None
        for section in ("global", "download"):
            if parser.has_section(section):
                merged.update({f"{section}.{k}": v for k, v in parser.items(section)})
    values: dict[str, str] = {}
    for section in ("global", "download"):
        for key, value in merged.items():
            if key.startswith(section + "."):
                _put(values, key.split(".", 1)[1], value)
    for key, value in environ.items():
        if key.startswith("PIP_"):
            _put(values, key[4:], value)
    no_index = values.get("no_index", "").strip().lower() in ("1", "true", "yes", "on", "y")
    indexes = [values.get("index", "").strip() or DEFAULT_INDEX, *values.get("extra", "").split()]
    try:
        timeout = float(values.get("timeout") or 15)
    except ValueError:
        raise StageError(f"pip's timeout setting {values['timeout']!r} is not a number") from None
    return Settings(
        indexes=() if no_index else tuple(dict.fromkeys(indexes)),
        find_links=tuple(values.get("find_links", "").split()),
        cert=values.get("cert", "").strip(),
        timeout=timeout,
    )


def _put(values: dict[str, str], key: str, value: str) -> None:
    setting = SETTING_OF.get(key.lower().replace("_", "-").lstrip("-"))
    if setting:
        values[setting] = value


def _config_files(environ: Mapping[str, str]) -> list[Path]:
    """pip's configuration files, the one that wins last."""
    env_file = environ.get("PIP_CONFIG_FILE", "")
    if env_file == os.devnull:
        return []  # pip's way of saying: no configuration files
    home = Path(environ.get("HOME") or Path.home())
    if sys.platform == "win32":
        appdata = Path(environ.get("APPDATA", home))
        system = [Path(environ.get("PROGRAMDATA", "C:/ProgramData"), "pip", "pip.ini")]
        user = [appdata / "pip" / "pip.ini"]
        site = Path(sys.prefix, "pip.ini")
    else:
        xdg_dirs = environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
        system = [Path(d, "pip", "pip.conf") for d in xdg_dirs.split(os.pathsep) if d]
        system.append(Path("/etc/pip.conf"))
        user = [home / ".pip" / "pip.conf"]
        user.append(Path(environ.get("XDG_CONFIG_HOME") or home / ".config", "pip", "pip.conf"))
        if sys.platform == "darwin":
            system.insert(0, Path("/Library/Application Support/pip/pip.conf"))
            user.append(home / "Library" / "Application Support" / "pip" / "pip.conf")
        site = Path(sys.prefix, "pip.conf")
    # pip reads no user file when PIP_CONFIG_FILE names one that exists.
    files = [*system, *([] if env_file and Path(env_file).exists() else user), site]
    return [p for p in [*files, *([Path(env_file)] if env_file else [])] if p.is_file()]
