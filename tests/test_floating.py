"""Floating sources: a PyPI range or a hub branch is resolved when the graph loads, the
resolution is the step's `identity["resolved"]`, the build fetches exactly that file, and a
pinned source never reads an index. The index is a PEP 503 tree of files in tmp_path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from workspace import Workspace, executed

from tasks import pkgindex
from tasks.config import ConfigValueError
from tasks.errors import RecipeError, StageError
from tasks.graph import load_graph
from tasks.stages import StepContext, data, model

PROSE = "The first line of the story.\n\nThe second paragraph of it.\n\nAnd a third, the end.\n"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class LocalIndex:
    """A file:// simple index: simple/<project>/index.html linking ../../files/<file>."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = root / "files"
        self.files.mkdir(parents=True)
        self.links: dict[str, list[str]] = {}

    @property
    def url(self) -> str:
        return (self.root / "simple").as_uri() + "/"

    def publish(self, path: Path, project: str, yanked: bool = False, digest: bool = True) -> Path:
        shutil.copy(path, self.files / path.name)
        fragment = f"#sha256={sha(path)}" if digest else ""
        attrs = ' data-yanked=""' if yanked else ""
        anchor = f'<a href="../../files/{path.name}{fragment}"{attrs}>{path.name}</a><br/>'
        self.links.setdefault(project, []).append(anchor)
        page = self.root / "simple" / project / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(f"<!DOCTYPE html><html><body>{''.join(self.links[project])}</body></html>")
        return path


def sdist(tmp: Path, version: str, text: str = PROSE) -> Path:
    """textpkg-<version>.tar.gz holding textpkg-<version>/data/prose.txt."""
    path = tmp / f"textpkg-{version}.tar.gz"
    body = text.encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"textpkg-{version}/data/prose.txt")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    return path


def wheel(tmp: Path, version: str, tag: str = "py3-none-any") -> Path:
    """tiny_llm-<version>-<tag>.whl holding tiny_llm/model.gguf (never loaded here)."""
    path = tmp / f"tiny_llm-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("tiny_llm/model.gguf", f"GGUF weights {version} {tag}")
    return path


@pytest.fixture
def index(tmp_path, monkeypatch) -> LocalIndex:
    """pip's settings point at a fresh local index, and nowhere else."""
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    served = LocalIndex(tmp_path / "index")
    monkeypatch.setenv("PIP_INDEX_URL", served.url)
    return served


FLOATING = """
[model]
source = "pypi:tiny-llm"
file = "tiny_llm/model.gguf"

[data.floating]
pypi = "textpkg>=1.0"
member = "data/prose.txt"

[data.fixed]
path = "{prose}"

[capture.fp32]
precision = "fp32"

[evaluate.floating]
from = "capture.fp32"
data = "floating"

[evaluate.fixed]
from = "capture.fp32"
data = "fixed"
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    prose = tmp_path / "prose.txt"
    prose.write_text(PROSE)
    path = tmp_path / "recipe.toml"
    path.write_text(FLOATING.format(prose=prose))
    return path


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {ref for ref in before if before[ref] != after[ref]}


def test_a_new_release_rekeys_exactly_what_is_built_from_it(tmp_path, index, recipe):
    index.publish(wheel(tmp_path, "1.0"), "tiny-llm")
    index.publish(sdist(tmp_path, "1.0"), "textpkg")
    first = load_graph(recipe, tmp_path / "artifacts")
    assert first.identities["data.floating"]["resolved"] == {
        "source": "pypi:textpkg>=1.0",
        "version": "1.0",
        "file": "textpkg-1.0.tar.gz",
        "sha256": sha(tmp_path / "textpkg-1.0.tar.gz"),
    }
    assert first.identities["model"]["resolved"]["file"] == "tiny_llm-1.0-py3-none-any.whl"
    assert "resolved" not in first.identities["data.fixed"]  # a local file: its content digest
    assert load_graph(recipe, tmp_path / "artifacts").keys == first.keys  # nothing new: same keys

    index.publish(sdist(tmp_path, "1.1", PROSE + "\nA sequel.\n"), "textpkg")
    second = load_graph(recipe, tmp_path / "artifacts")
    assert second.identities["data.floating"]["resolved"]["version"] == "1.1"
    assert changed(first.keys, second.keys) == {"data.floating", "evaluate.floating", "report"}

    index.publish(wheel(tmp_path, "2.0"), "tiny-llm")
    third = load_graph(recipe, tmp_path / "artifacts")
    assert third.identities["model"]["resolved"]["version"] == "2.0"
    assert changed(second.keys, third.keys) == {
        "model", "capture.fp32", "evaluate.floating", "evaluate.fixed", "report",
    }  # fmt: skip


def test_the_build_fetches_the_release_resolved_at_load(tmp_path, index, recipe):
    """A release published between loading and building does not mix in: the step reads
    the file its key names, checked against the sha256 recorded at load."""
    index.publish(sdist(tmp_path, "1.0"), "textpkg")
    index.publish(wheel(tmp_path, "1.0"), "tiny-llm")
    graph = load_graph(recipe, tmp_path / "artifacts")
    index.publish(sdist(tmp_path, "1.1", "Another text.\n\nNothing like the first.\n"), "textpkg")
    out = tmp_path / "out"
    out.mkdir()
    ctx = StepContext(task="data:floating", out=out, artifacts=tmp_path / "artifacts")
    info = data.run(graph.step("data.floating").config, ctx)
    assert info["source"] == "textpkg-1.0.tar.gz:data/prose.txt"
    assert "The first line of the story." in (out / "train.jsonl").read_text()


def test_a_file_replaced_after_load_fails_its_recorded_sha256(tmp_path, index, recipe):
    index.publish(sdist(tmp_path, "1.0"), "textpkg")
    index.publish(wheel(tmp_path, "1.0"), "tiny-llm")
    graph = load_graph(recipe, tmp_path / "artifacts")
    pinned = graph.identities["data.floating"]["resolved"]["sha256"]
    sdist(index.files, "1.0", "Replaced under the same name.\n")
    out = tmp_path / "out"
    out.mkdir()
    ctx = StepContext(task="data:floating", out=out, artifacts=tmp_path / "artifacts")
    with pytest.raises(StageError, match=f"textpkg-1.0.tar.gz .* but the recipe pins {pinned}"):
        data.run(graph.step("data.floating").config, ctx)


def test_doit_rebuilds_the_floating_data_set_after_a_release(tmp_path, index, recipe):
    index.publish(sdist(tmp_path, "1.0"), "textpkg")
    index.publish(wheel(tmp_path, "1.0"), "tiny-llm")
    space = Workspace(tmp_path)
    space.write(recipe.read_text())
    first = space.doit("data")
    assert sorted(executed(first.stdout)) == ["data:fixed", "data:floating"]
    assert executed(space.doit("data").stdout) == []
    index.publish(sdist(tmp_path, "1.1", PROSE + "\nA sequel.\n"), "textpkg")
    assert executed(space.doit("data").stdout) == ["data:floating"]
    info = (space.artifacts / "recipe" / "data" / "floating" / "info.json").read_text()
    assert "textpkg-1.1.tar.gz" in info


def no_index(*args, **kwargs):
    raise AssertionError("a pinned source read the package index")


def test_a_pinned_source_never_reads_the_index(tmp_path, index, monkeypatch):
    model_wheel = wheel(tmp_path, "1.0")
    package = sdist(tmp_path, "1.0")
    path = tmp_path / "pinned.toml"
    path.write_text(f"""
[model]
source = "pypi:tiny-llm==1.0"
file = "tiny_llm/model.gguf"
sha256 = "{sha(model_wheel)}"

[data.pinned]
pypi = "textpkg==1.0"
sha256 = "{sha(package)}"
member = "data/prose.txt"
""")
    shutil.rmtree(index.root)  # no index at all, and any read of one fails the test
    for reader in ("_index_links", "_find_links", "_read", "_open"):
        monkeypatch.setattr(pkgindex, reader, no_index)
    graph = load_graph(path, tmp_path / "artifacts")
    assert all("resolved" not in identity for identity in graph.identities.values())


def test_a_pinned_identity_has_no_resolution(tmp_path, index):
    """So floating support changes no pinned step's key."""
    path = tmp_path / "pinned.toml"
    path.write_text(f'[data.x]\npypi = "textpkg==1.0"\nsha256 = "{"a" * 64}"\nmember = "a"\n'
                    '[model]\nsource = "pypi:tiny-llm==1.0"\nfile = "m.gguf"\n'
                    f'sha256 = "{"b" * 64}"\n')  # fmt: skip
    identity = load_graph(path, tmp_path / "artifacts").identities["data.x"]
    assert sorted(identity) == ["algorithm", "inputs", "libraries", "params", "stage", "version"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_index_is_one_error_that_says_how_to_pin(
    tmp_path, index, recipe, monkeypatch
):
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{closed_port()}/simple/")
    with pytest.raises(RecipeError) as err:
        load_graph(recipe, tmp_path / "artifacts")
    message = str(err.value)
    assert message.startswith(
        f"{recipe}: [model] cannot read the package index to resolve tiny-llm"
    )
    assert 'fix: pin it to build without the index: source = "pypi:tiny-llm==<version>"' in message
    # Through doit: one line of error, no traceback.
    space = Workspace(tmp_path)
    space.write(recipe.read_text())
    proc = space.doit("list", check=False)
    assert proc.returncode != 0
    assert "modelkiln: " in proc.stderr and "cannot read the package index" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("requirement", "published", "picked"),
    [
        ("textpkg", ["1.0", "1.1", "2.0rc1"], "1.1"),  # no pre-release unless asked
        ("textpkg>=2.0rc1", ["1.0", "1.1", "2.0rc1"], "2.0rc1"),  # asked
        ("textpkg", ["1.0rc1"], "1.0rc1"),  # nothing else fits: pip takes it too
        ("textpkg<1.1", ["1.0", "1.1", "1.2"], "1.0"),
        ("textpkg~=1.0", ["0.9", "1.0", "1.9", "2.0"], "1.9"),
        ("textpkg==1.*,!=1.9", ["1.0", "1.5", "1.9", "2.0"], "1.5"),
        ("TextPkg", ["1.0", "1.10", "1.9"], "1.10"),  # PEP 440 order, normalized name
    ],
)
def test_the_newest_version_that_fits_is_taken(tmp_path, index, requirement, published, picked):
    for version in published:
        index.publish(sdist(tmp_path, version), "textpkg")
    config = data.Config(pypi=requirement, member="data/prose.txt")
    assert config.resolve()["version"] == picked


def test_yanked_files_and_other_kinds_are_skipped(tmp_path, index):
    index.publish(wheel(tmp_path, "1.0"), "tiny-llm")
    index.publish(wheel(tmp_path, "1.1", "cp311-cp311-linux_x86_64"), "tiny-llm")
    index.publish(wheel(tmp_path, "1.1"), "tiny-llm")
    index.publish(wheel(tmp_path, "1.2"), "tiny-llm", yanked=True)
    tar = tmp_path / "tiny_llm-1.3.tar.gz"
    tar.write_bytes(b"an sdist: the model stage reads wheels")
    index.publish(tar, "tiny-llm")
    resolved = model.Config(source="pypi:tiny-llm", file="tiny_llm/model.gguf").resolve()
    assert resolved["file"] == "tiny_llm-1.1-py3-none-any.whl"  # the pure wheel first


def test_a_json_page_marks_yanked_files():
    page = {
        "files": [
            {"filename": "p-1.0.tar.gz", "url": "p-1.0.tar.gz", "hashes": {}, "yanked": False},
            {"filename": "p-2.0.tar.gz", "url": "p-2.0.tar.gz", "hashes": {}, "yanked": "bad"},
        ]
    }
    body = json.dumps(page).encode()
    links = pkgindex._links(body, "https://x/simple/p/", "application/vnd.pypi.simple.v1+json")
    assert [link.yanked for link in links] == [False, True]


def test_a_local_file_without_a_listed_digest_is_hashed(tmp_path, index):
    package = index.publish(sdist(tmp_path, "1.0"), "textpkg", digest=False)
    resolved = data.Config(pypi="textpkg", member="data/prose.txt").resolve()
    assert resolved["sha256"] == sha(package)


def test_nothing_that_fits_lists_what_there_is(tmp_path, index):
    index.publish(sdist(tmp_path, "1.0"), "textpkg")
    with pytest.raises(StageError, match=r"no sdist of textpkg>=2 on .*versions there: 1\.0"):
        data.Config(pypi="textpkg>=2", member="data/prose.txt").resolve()


@pytest.mark.parametrize(
    ("pypi", "sha256", "member", "key"),
    [
        ("textpkg>=1.0", "a" * 64, "a.txt", "pypi"),  # a range cannot be pinned
        ("textpkg==1.0", "", "a.txt", "sha256"),  # a pin needs its digest, as before
        ("textpkg >= 1.0", "", "a.txt", "pypi"),
        ("textpkg[extra]>=1.0", "", "a.txt", "pypi"),
        ("textpkg~=1", "", "a.txt", "pypi"),
        ("textpkg>=1.0; python_version>'3'", "", "a.txt", "pypi"),
        ("textpkg", "", "", "member"),
    ],
)
def test_bad_floating_requirements_are_refused(pypi, sha256, member, key):
    with pytest.raises(ConfigValueError) as err:
        data.Config(pypi=pypi, sha256=sha256, member=member)
    assert err.value.key == key


@pytest.mark.parametrize(
    "requirement", ["tiny-llm", "tiny-llm>=0.1", "tiny-llm>=0.1,<1", "tiny-llm==0.*"]
)
def test_floating_requirements_are_accepted(requirement):
    model.Config(source=f"pypi:{requirement}", file="tiny_llm/model.gguf")
    data.Config(pypi=requirement, member="a.txt")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> dict[str, str]:
    """The hub's answer to repo_info (the one network call of resolve_revision): branch ->
    commit. Its cache in tmp_path."""
    from huggingface_hub import HfApi, constants

    branches = {"main": COMMIT}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def repo_info(self, repo_id, *, repo_type=None, revision=None, token=None):
        return SimpleNamespace(sha=branches[revision or "main"])

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    return branches


def test_a_hub_branch_is_resolved_to_its_commit_and_loaded_at_it(tmp_path, hub, monkeypatch):
    path = tmp_path / "hub.toml"
    path.write_text('[model]\nsource = "org/tiny"\n\n[capture.fp32]\nprecision = "fp32"\n')
    graph = load_graph(path, tmp_path / "artifacts")
    resolved = {"source": "org/tiny", "revision": "main", "version": COMMIT}
    assert graph.identities["model"]["resolved"] == resolved
    seen = []
    monkeypatch.setattr(model, "_load_hf", lambda where, dtype, hub, ctx: seen.append(hub))
    model._load(graph.step("model").config, StepContext("model", tmp_path, tmp_path), tmp_path)
    assert seen == [{"revision": COMMIT}]  # the commit the key names, not the branch
    hub["main"] = "f" * 40
    again = load_graph(path, tmp_path / "artifacts")
    assert changed(graph.keys, again.keys) == {"model", "capture.fp32"}


def test_a_hub_commit_is_not_resolved(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "resolve_revision", no_index)
    path = tmp_path / "hub.toml"
    path.write_text(f'[model]\nsource = "org/tiny"\nrevision = "{COMMIT}"\n')
    assert "resolved" not in load_graph(path, tmp_path / "artifacts").identities["model"]


def test_an_unreachable_hub_says_how_to_pin(tmp_path, hub, monkeypatch):
    import httpx2
    from huggingface_hub import HfApi

    def unreachable(self, repo_id, **kwargs):
        raise httpx2.ConnectError("no route to huggingface.co")

    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    path = tmp_path / "hub.toml"
    path.write_text('[data.wiki]\nhf_dataset = "org/set"\n[model]\nsource = "org/tiny"\n'
                    f'revision = "{COMMIT}"\n')  # fmt: skip
    with pytest.raises(RecipeError) as err:
        load_graph(path, tmp_path / "artifacts")
    message = str(err.value)
    assert "[data.wiki] cannot resolve the data set 'org/set' at 'main' to a commit" in message
    assert (
        'fix: pin the commit to build without the hub: hf_revision = "<its 40-hex commit>"'
        in message
    )
