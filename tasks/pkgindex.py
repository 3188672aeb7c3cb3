"""Which file a pinned `name==version` is on a package index, found the way pip finds it.

The indexes are pip's own (tasks.pipconfig), read through the simple API (PEP 503 HTML,
PEP 691 JSON) and find-links folders with urllib. Only index pages and the one file are read:
no pip runs and nothing from a package is executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from posixpath import basename
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from tasks.errors import StageError
from tasks.pipconfig import Settings
from tasks.requirement import normalize_name, version_key

# urllib.request and ssl are imported where a download needs them: loading the graph (every
# doit command) reads no index.
if TYPE_CHECKING:
    from http.client import HTTPResponse
    from urllib.response import addinfourl

# PEP 691 JSON first; an index that only speaks PEP 503 answers with its HTML.
ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, "
    "text/html;q=0.1"
)
SDIST_SUFFIXES = (".tar.gz", ".zip", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


@dataclasses.dataclass(frozen=True)
class Link:
    """A file an index lists: its name, where to get it and the sha256 the index gives."""

    filename: str
    url: str
    sha256: str  # "" when the index gives none
    yanked: bool = False  # PEP 592: pip takes it only for an exact pin


class _Unreachable(Exception):
    pass


def find_file(name: str, version: str, sdist: bool, sha256: str, settings: Settings) -> Link:
    """The file of `name==version` of the kind asked for: the first that the index says has
    `sha256`, else (the pin is checked after the download) the first in a fixed order,
    pure-Python wheels and .tar.gz first. Sources are read in pip's order, and the search
    stops at the first one that lists the pinned file."""
    project, wanted = normalize_name(name), version_key(version)
    assert wanted is not None  # the recipe's value was checked when it was read
    found: list[Link] = []
    listed: dict[str, tuple[str, bool]] = {}  # every file of the project: (version, sdist)
    failed: list[str] = []
    sources = [(url, True) for url in settings.indexes]
    sources += [(where, False) for where in settings.find_links]
    for where, is_index in sources:
        try:
            read = _index_links if is_index else _find_links
            links = read(where, project, settings)
        except (_Unreachable, OSError) as err:  # OSError: an unreadable local folder
            failed.append(f"{_shown(where)} ({err})")
            continue
        for link in links:
            if (parsed := _parse_filename(link.filename, project)) is not None:
                listed[link.filename] = parsed
                if parsed[1] == sdist and _same_version(parsed[0], wanted):
                    found.append(link)
        if any(link.sha256 == sha256 for link in found):
            return next(link for link in found if link.sha256 == sha256)
    if not found:
        where = ", ".join(_shown(w) for w, _ in sources) or "no index (pip's no-index is set)"
        raise StageError(*_nothing_found(f"{name}=={version}", sdist, where, listed, failed))
    # The index gives other digests (or none): download one to check, and name what it got.
    return min([link for link in found if not link.sha256] or found, key=_preference)


def newest_file(
    name: str, specifier: str, sdist: bool, settings: Settings, pin_fix: str
) -> tuple[str, Link]:
    """(version, file) of the newest release of `name` that `specifier` allows and that has a
    file of the kind asked for, picked as pip picks: every index and find-links source together,
    yanked files left out, pre-releases only when the specifier names one or nothing else fits
    (packaging's rule, which pip follows). A source that cannot be read fails the search, with
    `pin_fix`: the release it lists might be the newest."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    project = normalize_name(name)
    candidates: dict[Version, list[Link]] = {}
    failed: list[str] = []
    sources = [(url, _index_links) for url in settings.indexes]
    sources += [(where, _find_links) for where in settings.find_links]
    for where, read in sources:
        try:
            links = read(where, project, settings)
        except (_Unreachable, OSError) as err:  # OSError: an unreadable local folder
            failed.append(f"{_shown(where)} ({err})")
            continue
        for link in links:
            parsed = _parse_filename(link.filename, project)
            if parsed is None or parsed[1] != sdist or link.yanked:
                continue
            try:
                candidates.setdefault(Version(parsed[0]), []).append(link)
            except InvalidVersion:
                continue
    wanted = f"{name}{specifier}"
    if failed:
        problem = f"cannot read the package index to resolve {wanted}: {'; '.join(failed)}"
        raise StageError(problem, pin_fix)
    allowed = list(SpecifierSet(specifier).filter(candidates))
    if not allowed:
        kind = "sdist" if sdist else "wheel"
        where = ", ".join(_shown(w) for w, _ in sources) or "no index (pip's no-index is set)"
        listed = ", ".join(str(v) for v in sorted(candidates)[-12:]) or "none"
        raise StageError(
            f"no {kind} of {wanted} on {where} ({kind} versions there: {listed})",
            "loosen the version range, or check the name"
            + ("" if sdist else " (and whether the package has wheels)"),
        )
    version = max(allowed)
    # The file find_file would take for the pin (pure first), one the index gives a digest for
    # before one that would have to be hashed.
    best = min(candidates[version], key=lambda link: (_preference(link)[:2], not link.sha256))
    return str(version), best


def listed_sha256(link: Link) -> str:
    """The sha256 the index gives for a file, or of the file itself where it lies on this machine
    (a file:// index or a find-links folder); "" for a remote file listed without one."""
    if link.sha256 or not link.url.startswith("file:"):
        return link.sha256
    with open(_local_path(link.url), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _preference(link: Link) -> tuple[bool, str, str]:
    pure = link.filename.endswith(("-none-any.whl", ".tar.gz"))
    return not pure, link.filename, link.url


def _same_version(got: str, wanted: tuple) -> bool:
    key = version_key(got)
    # A pin without a local label (+cpu) matches any local label, as PEP 440's == does.
    return key is not None and (key == wanted or (not wanted[5] and key[:5] == wanted[:5]))


def _parse_filename(filename: str, project: str) -> tuple[str, bool] | None:
    """(version, is it an sdist) of a distribution file of `project`, else None."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        if len(parts) in (5, 6) and normalize_name(parts[0]) == project:
            return parts[1], False
        return None
    suffix = next((s for s in SDIST_SUFFIXES if filename.lower().endswith(s)), None)
    if suffix is None:
        return None
    stem = filename[: -len(suffix)]
    # Old sdists spell the name as they like ("vaderSentiment-3.3.2"), dashes included.
    for i, char in enumerate(stem):
        if char == "-" and normalize_name(stem[:i]) == project:
            return stem[i + 1 :], True
    return None


def _nothing_found(
    pin: str, sdist: bool, where: str, listed: dict[str, tuple[str, bool]], failed: list[str]
) -> tuple[str, str]:
    """(problem, fix) when the index has no file for the pin: what it lists instead."""
    if failed and not listed:
        return (
            f"cannot read the package index for {pin}: {'; '.join(failed)}",
            "check the network and pip's index settings (`pip config list`, PIP_INDEX_URL)",
        )
    kind = "sdist" if sdist else "wheel"
    version = version_key(pin.split("==")[1])
    assert version is not None
    versions = {v for v, is_sdist in listed.values() if is_sdist == sdist}
    ordered = sorted(versions, key=lambda v: version_key(v) or ())
    same = [f for f, (v, _) in listed.items() if _same_version(v, version)]
    if not listed:
        has = "the project is not listed there"
    else:
        has = f"{kind} versions: {', '.join(ordered[-12:])}" if ordered else f"no {kind}s"
        has += f"; files of this version: {', '.join(same[:6])}" if same else ""
    unread = f"; could not read {'; '.join(failed)}" if failed else ""
    fix = "pin a version listed there, or check the name"
    if same:
        fix = "set sdist = false (only wheels exist)" if sdist else "set sdist = true"
    return f"no {kind} of {pin} on {where} ({has}){unread}", fix


def _shown(url: str) -> str:
    """A URL without the password it may carry."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def source_host(url: str) -> str:
    """What a progress line names: the host, or the folder of a local file."""
    parts = urlsplit(url)
    return parts.hostname or str(Path(unquote(parts.path)).parent)


def _index_links(index: str, project: str, settings: Settings) -> list[Link]:
    """The files on an index's page for a project ([] when the index does not have it)."""
    page = _as_url(index).rstrip("/") + f"/{project}/"
    read = _read(page, settings)
    links = [] if read is None else _links(*read)
    parts = urlsplit(page)
    if parts.password is None:
        return links
    # The index's user:password@ opens its files on the same host too, as in pip.
    login, host = parts.netloc.rsplit("@", 1)
    for i, link in enumerate(links):
        if (target := urlsplit(link.url)).netloc == host:
            url = urlunsplit(target._replace(netloc=f"{login}@{host}"))
            links[i] = dataclasses.replace(link, url=url)
    return links


def _find_links(where: str, project: str, settings: Settings) -> list[Link]:
    """A find-links entry: a folder of files, a single file, or an HTML page of links (all
    projects: the caller picks the project's files)."""
    url = _as_url(where)
    if url.startswith("file:"):
        path = _local_path(url)
        if path.is_dir():
            return [
                Link(p.name, p.resolve().as_uri(), "")
                for p in sorted(path.iterdir())
                if p.is_file()
            ]
        if path.is_file() and not path.name.endswith((".html", ".htm")):
            return [Link(path.name, path.resolve().as_uri(), "")]
    read = _read(url, settings)
    return [] if read is None else _links(*read)


def _as_url(where: str) -> str:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", where):
        return where
    return Path(where).expanduser().resolve().as_uri()  # a path, as pip allows


def _links(body: bytes, url: str, content_type: str) -> list[Link]:
    """The files a simple-API page lists, with absolute URLs (relative hrefs, <base>)."""
    local = url.startswith("file:")
    if "json" in content_type:
        try:
            files = json.loads(body)["files"]
            raw = [
                (f["url"], f.get("filename", ""), f.get("hashes", {}), bool(f.get("yanked")))
                for f in files
            ]
        except (ValueError, KeyError, TypeError) as err:
            raise StageError(f"{_shown(url)} is not a PEP 691 project page ({err!r})") from None
    else:
        anchors = _Anchors()
        anchors.feed(body.decode("utf-8", "replace"))
        url = urljoin(url, anchors.base) if anchors.base else url
        raw = [(href, "", {}, yanked) for href, yanked in anchors.hrefs]
    links = []
    for href, filename, hashes, yanked in raw:
        target = urljoin(url, href)
        scheme = urlsplit(target).scheme
        # A remote page may not point at files on this machine.
        if scheme not in ("http", "https") and not (local and scheme == "file"):
            continue
        filename = filename or unquote(basename(urlsplit(target).path))
        fragment = re.search(r"(?:^|&)sha256=([0-9a-fA-F]{64})", urlsplit(target).fragment)
        sha256 = str(hashes.get("sha256", "")) if hashes else (fragment[1] if fragment else "")
        if filename and not filename.startswith(".") and not set("/\\\0") & set(filename):
            links.append(Link(filename, target.split("#", 1)[0], sha256.lower(), yanked))
    return links


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.base, self.hrefs = "", []  # hrefs: (href, yanked)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        href = values.get("href")
        if tag == "base" and href and not self.base:
            self.base = href
        elif tag == "a" and href:
            self.hrefs.append((href, "data-yanked" in values))  # an empty reason is yanked too


def _local_path(url: str) -> Path:
    from urllib.request import url2pathname

    return Path(url2pathname(urlsplit(url).path))


def _read(url: str, settings: Settings) -> tuple[bytes, str, str] | None:
    """(body, final URL after redirects, content type) of a page; None when it is not there."""
    import urllib.error

    if url.startswith("file:"):
        path = _local_path(url)
        if path.is_dir():  # a file:// index: pip reads the folder's index.html
            path = path / "index.html"
        if not path.is_file():
            return None
        kind = "application/json" if path.suffix == ".json" else "text/html"
        return path.read_bytes(), path.as_uri(), kind
    try:
        with _open(url, settings, ACCEPT) as response:
            return response.read(), response.geturl(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        if err.code in (404, 410):
            return None
        raise _Unreachable(f"HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise _Unreachable(str(getattr(err, "reason", err))) from None


def _open(url: str, settings: Settings, accept: str) -> HTTPResponse | addinfourl:
    import ssl
    import urllib.request

    parts = urlsplit(url)
    handlers: list[urllib.request.BaseHandler] = []
    if parts.scheme == "https":
        cert = Path(settings.cert) if settings.cert else None
        if cert is not None and not cert.exists():
            raise StageError(
                f"pip's cert setting names {cert}, which does not exist",
                "correct it (`pip config list`, PIP_CERT) or remove it",
            )
        context = ssl.create_default_context(
            cafile=str(cert) if cert and cert.is_file() else None,
            capath=str(cert) if cert and cert.is_dir() else None,
        )
        handlers.append(urllib.request.HTTPSHandler(context=context))
    if parts.password is not None:  # user:password@ in an index URL, as pip allows
        passwords = urllib.request.HTTPPasswordMgrWithDefaultRealm()
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        bare = urlunsplit(parts._replace(netloc=netloc))
        passwords.add_password(None, bare, unquote(parts.username or ""), unquote(parts.password))
        handlers.append(urllib.request.HTTPBasicAuthHandler(passwords))
        url = bare
    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "modelkiln"})
    return urllib.request.build_opener(*handlers).open(request, timeout=settings.timeout)


def download(link: Link, target: Path, settings: Settings) -> str:
    """Write the file a link names to `target`; return its sha256."""
    import urllib.error

    digest = hashlib.sha256()
    try:
        with _open(link.url, settings, "*/*") as source, open(target, "wb") as out:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as err:
        raise StageError(
            f"downloading {link.filename} from {_shown(link.url)} failed: "
            f"{getattr(err, 'reason', err)}",
            "check the network and run the build again",
        ) from None
    return digest.hexdigest()
