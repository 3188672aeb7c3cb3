"""Bad input: one clear message, a non-zero exit, no traceback, nothing already built lost."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from workspace import ROOT, Workspace, tiny_recipe

from tasks.graph import load_graph
from tasks.store import manifest_file

LOAD_ERRORS = [
    ("malformed", lambda r: r.replace("[quantize.int8]", "[quantize.int8"), "not valid TOML"),
    ("unknown table", lambda r: r + "\n[quantise.x]\n", "did you mean quantize?"),
    (
        "unknown key",
        lambda r: r.replace("per_channel =", "per_chanel ="),
        "did you mean per_channel?",
    ),
    (
        "wrong type",
        lambda r: r.replace("seq_len = 64", 'seq_len = "64"'),
        "write seq_len = 64, without quotes",
    ),
    (
        "unknown algorithm",
        lambda r: r.replace('"ort-dynamic"', '"ort-dynamik"'),
        "did you mean ort-dynamic?",
    ),
    (
        "dangling from",
        lambda r: r.replace('from = "quantize.int8"', 'from = "quantize.int9"'),
        "names no step (did you mean quantize.int8?)",
    ),
    (
        "cycle",
        lambda r: r.replace("[capture.fp32]", '[capture.fp32]\nfrom = "capture.fp32"'),
        "cycle",
    ),
    (
        "onnx-only quantizer given HF",
        lambda r: r.replace('from = "capture.fp32"\nper_channel', 'from = "model"\nper_channel'),
        'set from = "capture.fp32"',
    ),
    (
        "missing data set",
        lambda r: r.replace('data = "prose"', 'data = "prosa"', 1),
        "did you mean prose?",
    ),
]


@pytest.mark.parametrize(("case", "edit", "message"), LOAD_ERRORS, ids=[c[0] for c in LOAD_ERRORS])
def test_recipe_errors_at_load(tmp_path, tiny_model, prose_file, case, edit, message):
    ws = Workspace(tmp_path)
    ws.write(edit(tiny_recipe(tiny_model, prose_file)))
    proc = ws.doit("list", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert str(ws.recipe) in proc.stderr  # names the file


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such recipe file"),
        (lambda p: p.mkdir(), "cannot read the recipe"),
        (lambda p: p.write_bytes(b"[model]\nsource = '\xe9'\n"), "cannot read the recipe"),
    ],
    ids=["missing", "a directory", "not utf-8"],
)
def test_unreadable_recipe_files(tmp_path, make, message):
    ws = Workspace(tmp_path)
    make(ws.recipe)
    proc = ws.doit("list", check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_local_model_directory(tmp_path, prose_file):
    ws = Workspace(tmp_path)
    ws.write(tiny_recipe(tmp_path / "nowhere", prose_file))
    proc = ws.doit("list", check=False)
    assert proc.returncode != 0 and "no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_explicit_default_does_not_change_a_key(tmp_path, tiny_model, prose_file):
    plain = tmp_path / "a.toml"
    plain.write_text(tiny_recipe(tiny_model, prose_file))
    explicit = tmp_path / "b.toml"
    explicit.write_text(
        tiny_recipe(tiny_model, prose_file).replace(
            "[capture.fp32]", "[capture.fp32]\nort_genai = true"
        )
    )
    a, b = load_graph(plain, tmp_path / "art"), load_graph(explicit, tmp_path / "art")
    assert {r: k for r, k in a.keys.items() if r != "report"} == {
        r: k for r, k in b.keys.items() if r != "report"
    }


def test_corrupt_safetensors_fails_cleanly_and_keeps_what_was_built(
    tmp_path, tiny_model, prose_file
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    ws.write(tiny_recipe(model, prose_file))
    ws.doit("data")
    (model / "model.safetensors").write_bytes(b"\x00\x01garbage")
    proc = ws.doit("model", check=False)
    assert proc.returncode != 0
    assert "model.safetensors" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert manifest_file(ws.artifacts / "recipe" / "data" / "prose").is_file()


def test_sha256_mismatch_of_a_fetched_file(tmp_path, tiny_model):
    ws = Workspace(tmp_path)
    recipe = tiny_recipe(tiny_model, tmp_path / "unused.txt").replace(
        'path = "' + str(tmp_path / "unused.txt") + '"',
        'pypi = "sentencepiece==0.2.3"\nsha256 = "'
        + "0" * 64
        + '"\nmember = "sentencepiece-0.2.3/test/botchan.txt"',
    )
    ws.write(recipe)
    proc = ws.doit("data", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "sha256" in out and "21618ad31f0453a1" in out  # names the digest it got
    assert "Traceback" not in out


def test_loading_tasks_imports_nothing_heavy(tmp_path, tiny_model, prose_file):
    ws = Workspace(tmp_path)
    ws.write(tiny_recipe(tiny_model, prose_file))
    probe = (
        "import runpy, sys\n"
        "import doit.doit_cmd as c\n"
        f"c._CMDLINE_VARS = {{'recipe': {str(ws.recipe)!r}, 'artifacts': {str(ws.artifacts)!r}}}\n"
        f"ns = runpy.run_path({str(ROOT / 'dodo.py')!r})\n"
        "assert len(list(ns['task_evaluate']())) == 3\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'onnx', 'datasets') if m in sys.modules]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_misspelt_variable_is_refused_rather_than_building_the_default_recipe(tmp_path):
    ws = Workspace(tmp_path)
    proc = subprocess.run([*ws.argv("list"), "recipie=mine.toml"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "unknown variable recipie='mine.toml' (did you mean recipe?)" in proc.stderr
    assert "Traceback" not in proc.stderr and "model" not in proc.stdout
