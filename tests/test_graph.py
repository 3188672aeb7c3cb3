"""Keys of a recipe's steps: what changes them and what must not (fast, no step runs)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from workspace import tiny_recipe

from tasks.errors import RecipeError
from tasks.graph import load_graph
from tasks.recipe import load_recipe


def keys_of(tmp_path, text: str, name: str = "recipe") -> dict[str, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_graph(path, tmp_path / "artifacts").keys


def with_every_default_written(path) -> str:
    """The recipe with every unset key of every step written out at its default."""
    recipe = load_recipe(path)
    text = path.read_text()
    for step in recipe.steps.values():
        header = f"[{step.stage}.{step.name}]" if step.name else f"[{step.stage}]"
        written = text.split(header, 1)[1].split("\n[", 1)[0]
        lines = []
        for field in dataclasses.fields(step.spec.config):
            if f"\n{field.name} =" in written or field.default is None:
                continue
            value = field.default
            toml = str(value).lower() if isinstance(value, bool) else repr(value)
            if isinstance(value, tuple):
                toml = "[" + ", ".join(f'"{v}"' for v in value) + "]"
            elif isinstance(value, str):
                toml = f'"{value}"'
            lines.append(f"{field.name} = {toml}")
        text = text.replace(header, header + "\n" + "\n".join(lines), 1)
    return text


def test_writing_every_default_explicitly_changes_no_key(tmp_path, tiny_model, prose_file):
    plain = tmp_path / "recipe.toml"
    plain.write_text(tiny_recipe(tiny_model, prose_file))
    explicit = with_every_default_written(plain)
    assert explicit.count("\n") > plain.read_text().count("\n") + 20
    assert keys_of(tmp_path / "b", explicit) == keys_of(tmp_path / "a", plain.read_text())


def test_renaming_a_data_set_or_step_keeps_the_outputs(tmp_path, tiny_model, prose_file):
    text = tiny_recipe(tiny_model, prose_file)
    renamed = text.replace("[data.prose]", "[data.book]").replace('data = "prose"', 'data = "book"')
    renamed = renamed.replace("[quantize.int8]", "[quantize.q8]").replace(
        '"quantize.int8"', '"quantize.q8"'
    )
    a, b = keys_of(tmp_path / "a", text), keys_of(tmp_path / "b", renamed)
    assert a["evaluate.int8"] == b["evaluate.int8"] and a["quantize.int8"] == b["quantize.q8"]
    assert a["report"] != b["report"]  # the report shows the names: it is rebuilt, alone


def test_moving_a_local_model_keeps_its_key_and_editing_it_changes_it(
    tmp_path, tiny_model, prose_file
):
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_model, moved)
    (moved / ".cache").mkdir()
    (moved / ".cache" / "meta").write_text("tool metadata is not content")
    a = keys_of(tmp_path / "a", tiny_recipe(tiny_model, prose_file))
    b = keys_of(tmp_path / "b", tiny_recipe(moved, prose_file))
    assert a == b
    (moved / "config.json").write_text((moved / "config.json").read_text() + " ")
    c = keys_of(tmp_path / "c", tiny_recipe(moved, prose_file))
    assert all(c[ref] != a[ref] for ref in a if ref != "data.prose")
    assert c["data.prose"] == a["data.prose"]


def test_two_steps_with_the_same_settings_share_an_entry(tmp_path, tiny_model, prose_file):
    text = (
        tiny_recipe(tiny_model, prose_file)
        + '\n[quantize.copy]\nalgorithm = "ort-dynamic"\nfrom = "capture.fp32"\n'
    )
    keys = keys_of(tmp_path, text)
    assert keys["quantize.copy"] == keys["quantize.int8"]


def test_the_report_is_keyed_by_its_recipe(tmp_path, tiny_model, prose_file):
    text = tiny_recipe(tiny_model, prose_file)
    a, b = keys_of(tmp_path / "a", text, "nightly"), keys_of(tmp_path / "b", text, "release")
    assert a["report"] != b["report"]
    assert {r: k for r, k in a.items() if r != "report"} == {
        r: k for r, k in b.items() if r != "report"
    }


@pytest.mark.parametrize("name", ["store", "downloads", ".hidden"])
def test_a_recipe_cannot_take_a_store_folder_name(tmp_path, tiny_model, prose_file, name):
    with pytest.raises(RecipeError, match="cannot be named"):
        keys_of(tmp_path, tiny_recipe(tiny_model, prose_file), name)


def test_gc_and_verify_handle_an_unreadable_manifest(tmp_path, tiny_model, prose_file, capsys):
    from tasks.glue import gc, verify

    path = tmp_path / "recipe.toml"
    path.write_text(tiny_recipe(tiny_model, prose_file))
    graph = load_graph(path, tmp_path / "artifacts")
    store, stray = graph.store, "ff" * 32
    tmp = store.new_tmp(stray)
    (tmp / "w.bin").write_bytes(b"x")
    store.publish(stray, tmp, {})
    store.manifest_path(stray).write_text("{")

    damage = verify(graph, remove_damaged=False, dry_run=False)
    assert damage is not None  # a TaskFailed naming the damage
    assert "unreadable" in capsys.readouterr().out
    gc(graph, dry_run=True)
    assert "(unreadable manifest)" in capsys.readouterr().out and store.is_complete(stray)
    assert verify(graph, remove_damaged=True, dry_run=False) is None
    assert not store.is_complete(stray)


def test_gc_removes_an_entry_left_without_its_manifest(tmp_path, tiny_model, prose_file, capsys):
    from tasks.glue import gc

    path = tmp_path / "recipe.toml"
    path.write_text(tiny_recipe(tiny_model, prose_file))
    graph = load_graph(path, tmp_path / "artifacts")
    store, key = graph.store, "ee" * 32
    tmp = store.new_tmp(key)
    (tmp / "w.bin").write_bytes(b"x" * 1000)
    store.publish(key, tmp, {})
    store.manifest_path(key).unlink()  # killed between the folder's rename and the manifest's
    gc(graph, dry_run=True)
    out = capsys.readouterr().out
    assert f"would remove incomplete entry store/{key[:2]}/{key} " in out
    assert "0 unfinished builds, 1 incomplete entries" in out
    assert store.entry(key).is_dir()
    gc(graph, dry_run=False)
    assert not store.entry(key).exists() and store.unfinished() == []


def test_doit_list_shows_steps_in_recipe_order_with_their_settings_in_toml(
    tmp_path, tiny_model, prose_file
):
    from workspace import Workspace

    ws = Workspace(tmp_path)
    # quantize.again reads quantize.late, written after it: it still lists first.
    extra = """
[quantize.again]
algorithm = "ort-dynamic"
from = "quantize.late"

[quantize.late]
algorithm = "ort-dynamic"
from = "capture.fp32"
nodes_to_exclude = ["/lm_head/MatMul"]
"""
    ws.write(tiny_recipe(tiny_model, prose_file, per_channel=True, extra=extra))
    lines = ws.doit("list").stdout.splitlines()
    tasks = [line.split()[0] for line in lines]
    assert (
        tasks.index("quantize:int8") < tasks.index("quantize:again") < tasks.index("quantize:late")
    )
    by_task = {line.split()[0]: line for line in lines}
    assert "[per_channel = true]" in by_task["quantize:int8"]
    assert 'nodes_to_exclude = ["/lm_head/MatMul"]' in by_task["quantize:late"]
    # One line per stage says what the stage does; its steps say what they read.
    assert (
        by_task["evaluate:int8"].split(None, 1)[1] == '<- quantize.int8 [data = "prose", '
        "seq_len = 64, max_tokens = 256, new_tokens = 4, repeats = 1]"
    )


def test_the_platform_is_in_the_identity_of_steps_that_depend_on_it(
    tmp_path, tiny_model, prose_file, monkeypatch
):
    """An entry built on one platform is never taken for another's once stores are shared;
    a data set, plain text handled in Python, is the same everywhere."""
    import os

    from tasks import graph

    text = tiny_recipe(tiny_model, prose_file)
    here = keys_of(tmp_path / "x86", text)
    graph.platform_identity.cache_clear()
    u = os.uname()
    arm = os.uname_result((u.sysname, u.nodename, u.release, u.version, "arm64"))
    monkeypatch.setattr(os, "uname", lambda: arm)
    try:
        there = keys_of(tmp_path / "arm", text)
    finally:
        graph.platform_identity.cache_clear()
    assert here["data.prose"] == there["data.prose"]
    for ref in ("model", "capture.fp32", "quantize.int8", "evaluate.int8", "report"):
        assert here[ref] != there[ref], ref


def test_the_platform_is_read_as_the_platform_module_reads_it():
    """The identity reads os.uname() and sys.version (importing platform costs every run
    milliseconds); keys made before that change must not move."""
    import platform

    from tasks.graph import platform_identity
    from tasks.hostinfo import python_version

    assert platform_identity() == {
        "os": platform.system().lower(),
        "machine": platform.machine().lower(),
        "python": ".".join(platform.python_version_tuple()[:2]),
    }
    assert python_version() == platform.python_version()
