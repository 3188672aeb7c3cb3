"""The data stage: prose with Gutenberg markers, tables with templates, packaged files, HF ids."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

from tasks.config import ConfigValueError
from tasks.errors import StageError
from tasks.stages import StepContext
from tasks.stages.data import SPEC, Config, run

HEADER = "The Project Gutenberg EBook of Tiny\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK TINY ***\r\n\r\n"
FOOTER = "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK TINY ***\r\n\r\nLicense text.\r\n"
TWEETS = (
    '1\t2.7\tSomehow I was blessed with "amazing" friends\r\n'
    "2\t1.4\tYay. Another good phone interview.\r\n"
    "3\t-2.1\tThe bus was late again\r\n"
    "4\t0.1\tIt is Tuesday\r\n"
)


def context(tmp_path: Path, name: str = "out") -> StepContext:
    out = tmp_path / name
    out.mkdir()
    return StepContext(task="data:x", out=out, artifacts=tmp_path / "artifacts")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def gutenberg(tmp_path, prose_file) -> Path:
    """The shared prose wrapped in a Gutenberg header and footer, with a BOM and CRLF ends."""
    body = prose_file.read_text(encoding="utf-8").replace("\n", "\r\n")
    path = tmp_path / "book.txt"
    path.write_bytes(("\ufeff" + HEADER + body + FOOTER).encode("utf-8"))
    return path


def prose_config(path: Path, **fields) -> Config:
    return Config(
        path=str(path),
        start_marker="*** START OF THIS PROJECT",
        end_marker="*** END OF THIS PROJECT",
        **fields,
    )


def test_prose_is_cut_at_the_markers_and_held_out_at_the_end(tmp_path, gutenberg, prose_file):
    info = run(prose_config(gutenberg, record_chars=400), context(tmp_path))
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    heldout = read_jsonl(tmp_path / "out" / "heldout.jsonl")
    texts = [r["text"] for r in train + heldout]
    whole = "\n\n".join(texts)
    assert "Gutenberg" not in whole and "License" not in whole and "\ufeff" not in whole
    assert "\r" not in whole
    # Every paragraph survives, in order, and records join paragraphs up to record_chars.
    paragraphs = prose_file.read_text().strip().split("\n\n")
    assert whole.split("\n\n") == paragraphs
    assert all(len(t) <= 400 for t in texts if "\n\n" in t) and len(train) > 3
    # Held out: the last contiguous part, not a sample from the middle.
    assert heldout[-1]["text"].endswith(paragraphs[-1]) and len(heldout) == round(len(texts) * 0.1)
    assert info == json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["train"] == len(train) and info["heldout"] == len(heldout)
    assert SPEC.local_inputs(prose_config(gutenberg)) == {"path": str(gutenberg)}


def test_hard_wraps_are_undone_and_long_paragraphs_cut_at_line_ends(tmp_path):
    wrapped = tmp_path / "wrapped.txt"
    lines = [f"line {i} of a paragraph" for i in range(40)]  # no blank line at all
    wrapped.write_text("\n".join(lines) + "\n\nA short one,\nwrapped.\n")
    run(Config(path=str(wrapped), record_chars=200, heldout_fraction=0), context(tmp_path))
    texts = [r["text"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")]
    assert all(len(t) <= 200 for t in texts) and len(texts) > 3
    assert " ".join(texts[:-1]) + " " + texts[-1].split("\n\n")[0] == " ".join(lines)
    assert texts[-1].endswith("\n\nA short one, wrapped.")


def test_output_is_deterministic(tmp_path, gutenberg):
    tsv = tmp_path / "t.tsv"
    tsv.write_text(TWEETS * 5)
    for config in (
        prose_config(gutenberg),
        Config(path=str(tsv), format="tsv", columns=("id", "score", "phrase"), text_field="phrase"),
    ):
        shutil.rmtree(tmp_path / "a", ignore_errors=True)
        shutil.rmtree(tmp_path / "b", ignore_errors=True)
        run(config, context(tmp_path, "a"))
        run(config, context(tmp_path, "b"))
        for name in ("train.jsonl", "heldout.jsonl", "info.json"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tsv_with_a_template_keeps_the_fields(tmp_path):
    tsv = tmp_path / "tweets.tsv"
    tsv.write_bytes(TWEETS.encode())
    config = Config(
        path=str(tsv),
        format="tsv",
        columns=("id", "score", "phrase"),
        text_template="{phrase} -> {score}",
        heldout_fraction=0.25,
    )
    assert config.shuffle is True  # tables are shuffled unless told otherwise
    run(config, context(tmp_path))
    records = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(
        tmp_path / "out" / "heldout.jsonl"
    )
    assert len(records) == 4
    first = next(r for r in records if r["id"] == "1")
    assert first == {
        "text": 'Somehow I was blessed with "amazing" friends -> 2.7',
        "id": "1",
        "score": "2.7",
        "phrase": 'Somehow I was blessed with "amazing" friends',
    }


def test_csv_with_a_header_and_jsonl(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('phrase,tone\r\n"good, really",positive\r\nbad,negative\r\nmeh,neutral\r\n')
    run(
        Config(path=str(csv_file), format="csv", text_template="{phrase} -> {tone}", shuffle=False),
        context(tmp_path, "c"),
    )
    assert read_jsonl(tmp_path / "c" / "train.jsonl")[0]["text"] == "good, really -> positive"
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"line {i}", "n": i}) for i in range(10)) + "\n")
    info = run(
        Config(path=str(jsonl), format="jsonl", max_records=5, seed=3), context(tmp_path, "j")
    )
    assert info["records"] == 5 and info["fields"] == ["text", "n"]


def test_missing_template_field_lists_the_fields(tmp_path):
    tsv = tmp_path / "tweets.tsv"
    tsv.write_text(TWEETS)
    config = Config(
        path=str(tsv),
        format="tsv",
        columns=("id", "score", "phrase"),
        text_template="{phrase} -> {tone}",
    )
    with pytest.raises(StageError) as err:
        run(config, context(tmp_path))
    assert "'tone'" in str(err.value) and "['id', 'score', 'phrase']" in str(err.value)
    bad_spec = Config(
        path=str(tsv), format="tsv", columns=("id", "score", "phrase"), text_template="{score:.1f}"
    )
    with pytest.raises(StageError, match="record 1"):
        run(bad_spec, context(tmp_path, "o2"))


def test_missing_marker_and_wrong_column_count_say_the_fix(tmp_path, gutenberg):
    with pytest.raises(StageError, match=r"start_marker '\*\*\* BEGIN'.*\n  fix: .*START OF THIS"):
        run(Config(path=str(gutenberg), start_marker="*** BEGIN"), context(tmp_path))
    tsv = tmp_path / "t.tsv"
    tsv.write_text(TWEETS)
    with pytest.raises(StageError, match="line 1 has 3 fields, expected 2"):
        run(Config(path=str(tsv), format="tsv", columns=("id", "phrase")), context(tmp_path, "o2"))


def test_unreadable_csv_is_a_stage_error(tmp_path):
    """csv.Error (here a quote left open, which runs past csv's field limit) gets a fix."""
    bad = tmp_path / "d.csv"
    bad.write_text('phrase,tone\ngood,positive\n"never closed,' + "x" * 200_000 + "\n")
    with pytest.raises(StageError, match=r"d.csv line \d+ is not valid csv: .*\n  fix: check"):
        run(Config(path=str(bad), format="csv"), context(tmp_path))


def test_nested_member_of_a_pypi_sdist(tmp_path, monkeypatch):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        add(tar, "set/tweets_GroundTruth.txt", TWEETS.encode())
    sdist = tmp_path / "vader-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        add(tar, "vader-1.0/res/set.tar.gz", inner.getvalue())
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()

    # No index: pip's find-links folder (what fetch reads, the way pip would) holds the file.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(sdist.parent))
    config = Config(
        pypi="vader==1.0",
        sha256=digest,
        member="vader-1.0/res/set.tar.gz/set/tweets_GroundTruth.txt",
        format="tsv",
        columns=("id", "score", "phrase"),
        text_field="phrase",
        heldout_fraction=0.25,
    )
    info = run(config, context(tmp_path))
    assert info["records"] == 4 and info["heldout"] == 1
    assert SPEC.local_inputs(config) == {}


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_hf_dataset_is_loaded_with_its_split_and_revision(tmp_path, monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return [{"sentence": f"s{i}", "label": i % 2} for i in range(20)]

    fake_datasets(monkeypatch, load_dataset)
    config = Config(
        hf_dataset="org/set", hf_split="validation", hf_revision="v1", text_field="sentence"
    )
    assert config.shuffle is False
    info = run(config, context(tmp_path))
    assert calls == [("org/set", None, "validation", "v1")]
    assert (
        info["train"] == 18 and read_jsonl(tmp_path / "out" / "heldout.jsonl")[-1]["text"] == "s19"
    )


def fake_datasets(monkeypatch, load_dataset) -> None:
    fake = type(sys)("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("Unknown split 'tets'. Should be one of ['train', 'test']."),
        FileNotFoundError("Dataset 'org/nope' doesn't exist on the Hub"),
    ],
)
def test_hf_dataset_load_errors_say_the_fix(tmp_path, monkeypatch, error):
    def load_dataset(path, name=None, split=None, revision=None):
        raise error

    fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(StageError, match=r"cannot load the data set 'org/set'") as err:
        run(Config(hf_dataset="org/set", hf_split="tets"), context(tmp_path))
    assert f"{type(error).__name__}: {error}" in str(err.value)
    assert "\n  fix: check those names" in str(err.value)


def test_no_library_version_rekeys_data_sets():
    assert SPEC.libraries == ()


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        # Settings that do not apply to the source or format would change the key only.
        ({"path": "a.txt", "member": "x/a.txt"}, "member"),
        ({"path": "a.txt", "sdist": False}, "sdist"),
        ({"path": "a.txt", "hf_name": "wikitext-2-raw-v1"}, "hf_name"),
        ({"path": "a.txt", "hf_split": "test"}, "hf_split"),
        ({"pypi": "x==1", "sha256": "a" * 64, "member": "a", "hf_revision": "v1"}, "hf_revision"),
        ({"hf_dataset": "org/set", "format": "jsonl"}, "format"),
        ({"hf_dataset": "org/set", "encoding": "latin-1"}, "encoding"),
        ({"hf_dataset": "org/set", "record_chars": 500}, "record_chars"),
        ({"path": "a.jsonl", "format": "jsonl", "record_chars": 500}, "record_chars"),
        ({"path": "a.tsv", "format": "tsv", "end_marker": "***"}, "end_marker"),
        ({"path": "a.txt", "seed": 3}, "seed"),  # prose is not shuffled by default
        ({"path": "a.tsv", "format": "tsv", "shuffle": False, "seed": 3}, "seed"),
        ({}, "source"),
        ({"path": "a.txt", "pypi": "x==1"}, "source"),
        ({"pypi": "x==1", "member": "x/a.txt"}, "sha256"),
        ({"pypi": "x==1", "sha256": "a" * 64}, "member"),
        ({"path": "a.txt", "sha256": "a" * 64}, "sha256"),
        ({"path": "a.tsv", "format": "tsv", "start_marker": "***"}, "start_marker"),
        ({"path": "a.txt", "columns": ("a",)}, "columns"),
        ({"path": "a.txt", "text_template": "{} -> {tone}"}, "text_template"),
        ({"path": "a.txt", "text_template": "{phrase"}, "text_template"),
        ({"path": "a.txt", "heldout_fraction": 1.0}, "heldout_fraction"),
    ],
)
def test_bad_configs_are_rejected(fields, key):
    with pytest.raises(ConfigValueError) as err:
        Config(**fields)
    assert err.value.key == key


def test_settings_that_apply_are_accepted():
    Config(path="a.txt", shuffle=True, seed=3, record_chars=500, start_marker="***")
    Config(path="a.tsv", format="tsv", seed=3, columns=("a",), encoding="latin-1")
    Config(pypi="x==1", sha256="a" * 64, member="x/a.txt", sdist=False)
    Config(hf_dataset="org/set", hf_name="n", hf_split="test", hf_revision="v1", shuffle=True)
    with pytest.raises(ConfigValueError, match="seed: only applies to a shuffled data set"):
        Config(hf_dataset="org/set", seed=1)


def test_writing_the_default_shuffle_gives_the_same_params():
    from tasks.config import as_params

    assert as_params(Config(path="a.txt")) == as_params(Config(path="a.txt", shuffle=False))
    assert as_params(Config(path="a.tsv", format="tsv")) == as_params(
        Config(path="a.tsv", format="tsv", shuffle=True)
    )


def test_a_score_is_binned_into_a_named_tone(tmp_path):
    tsv = tmp_path / "tweets.tsv"
    tsv.write_bytes((TWEETS + "5\t-0.5\tMeh\r\n6\t0.5\tFine\r\n").encode())
    config = Config(
        path=str(tsv), format="tsv", columns=("id", "score", "phrase"), bin_field="score",
        bin_edges=(-0.5, 0.5), bin_names=("negative", "neutral", "positive"), bin_into="tone",
        text_template="{phrase} -> {tone}", heldout_fraction=0.0,
    )  # fmt: skip
    info = run(config, context(tmp_path))
    tones = {r["id"]: r["tone"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    # An edge value goes to the bucket above it.
    assert tones == {"1": "positive", "2": "positive", "3": "negative", "4": "neutral",
                     "5": "neutral", "6": "positive"}  # fmt: skip
    assert info["buckets"] == {"negative": 1, "neutral": 2, "positive": 3}


@pytest.mark.parametrize(
    "fields, key, message",
    [
        ({"bin_field": "score", "bin_edges": (0.5, -0.5), "bin_names": ("a", "b", "c")},
         "bin_edges", "ascending"),
        ({"bin_field": "score", "bin_edges": (0.0,), "bin_names": ("a", "b", "c")},
         "bin_names", "give 2 names"),
        ({"bin_edges": (0.0,)}, "bin_edges", "only applies to a binned field"),
    ],
)  # fmt: skip
def test_bad_bins_are_refused_with_the_fix(tmp_path, fields, key, message):
    with pytest.raises(ConfigValueError) as err:
        Config(path="x.tsv", format="tsv", columns=("id", "score", "phrase"), **fields)
    assert err.value.key == key and message in f"{err.value.problem} {err.value.fix}"


def test_a_bin_field_that_is_missing_or_not_a_number_is_one_error(tmp_path):
    tsv = tmp_path / "tweets.tsv"
    tsv.write_bytes(TWEETS.encode())
    common = {"path": str(tsv), "format": "tsv", "columns": ("id", "score", "phrase"),
              "bin_edges": (0.0,), "bin_names": ("low", "high"), "text_field": "phrase"}  # fmt: skip
    with pytest.raises(StageError, match=r"did you mean score\?\).*the fields"):
        run(Config(bin_field="scor", **common), context(tmp_path))
    with pytest.raises(StageError, match="phrase = 'Somehow.*is not a number"):
        run(Config(bin_field="phrase", **common), context(tmp_path, "out2"))


def test_new_options_at_their_defaults_leave_the_key_unchanged():
    """Options added after a stage shipped stay out of the key at their defaults, so existing
    steps are not rebuilt when one is added."""
    from tasks.config import as_params

    params = as_params(Config(path="x.txt"))
    assert "bin_field" not in params and "bin_names" not in params and "path" in params
    assert as_params(Config(path="x.tsv", format="tsv", bin_field="s", bin_edges=(0.0,),
                            bin_names=("a", "b")))["bin_field"] == "s"  # fmt: skip
