"""The remote store in a build: a step built and pushed by one workspace is pulled, not
rebuilt, by another; a no-op build never contacts the remote; push and pull by hand."""

from __future__ import annotations

import pytest
from workspace import Workspace, executed, tiny_recipe

from tasks.store import read_manifest

STEPS = ("model", "data/prose", "capture/fp32", "quantize/int8", "evaluate/fp32",
         "evaluate/int8", "report")  # fmt: skip


def workspace(root, tiny_model, prose_file, store_table: str) -> Workspace:
    ws = Workspace(root)
    root.mkdir()
    ws.write(tiny_recipe(tiny_model, prose_file, extra=store_table))
    return ws


def digests(ws: Workspace, step: str) -> dict[str, str]:
    return {f["path"]: f["xxh3"] for f in read_manifest(ws.artifacts / "recipe" / step)["files"]}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, tiny_model, prose_file):
    """A workspace that built the tiny recipe and pushed every step to a file:// remote."""
    root = tmp_path_factory.mktemp("remote")
    table = f'\n[store]\nremote = "file://{root / "shared"}"\npush = true\n'
    first = workspace(root / "first", tiny_model, prose_file, table)
    run = first.doit()
    assert "pulled from" not in run.stderr and run.stderr.count("built in") == len(STEPS)
    return root, table, first


def test_a_second_workspace_pulls_every_step_and_builds_none(pushed, tiny_model, prose_file):
    root, table, first = pushed
    second = workspace(root / "second", tiny_model, prose_file, table)
    run = second.doit()
    assert "built in" not in run.stderr, run.stderr
    assert run.stderr.count("pulled from") == len(STEPS), run.stderr
    for step in STEPS:
        assert digests(second, step) == digests(first, step), step
    assert second.doit("verify").returncode == 0
    assert executed(second.doit().stdout) == []  # and then it is simply up to date


def test_pull_and_push_by_hand(pushed, tiny_model, prose_file):
    root, table, _ = pushed
    third = workspace(root / "third", tiny_model, prose_file, table.replace("true", "false"))
    out = third.doit("pull", "capture:fp32").stdout
    assert "capture:fp32: pulled" in out and "pull: 1 pulled" in out
    assert (third.artifacts / "recipe" / "capture" / "fp32" / "model.onnx").is_file()
    assert "model: here already" not in out  # only the named step
    out = third.doit("push").stdout
    assert "capture:fp32: present" in out and "model: not built here" in out


def test_a_no_op_build_never_contacts_the_remote(pushed, tiny_model, prose_file):
    root, _, _ = pushed
    # Nothing listens on port 9: any contact would fail or hang.
    table = '\n[store]\nremote = "s3://bucket/models"\nendpoint_url = "http://127.0.0.1:9"\n'
    ws = workspace(root / "offline", tiny_model, prose_file, "")
    ws.doit()
    ws.write(tiny_recipe(tiny_model, prose_file, extra=table))
    run = ws.doit()
    assert executed(run.stdout) == [] and "pulled" not in run.stderr
    failed = ws.doit("push", check=False, env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                                                "AWS_MAX_ATTEMPTS": "1"})  # fmt: skip
    assert failed.returncode != 0 and "Traceback" not in failed.stdout + failed.stderr
    assert "s3://bucket/models" in failed.stdout + failed.stderr


def test_the_run_overrides_the_recipe(pushed, tiny_model, prose_file):
    root, table, _ = pushed
    ws = workspace(root / "override", tiny_model, prose_file, table)
    run = ws.doit("model", "remote=")  # an empty remote: this run builds everything itself
    assert "pulled" not in run.stderr and "built in" in run.stderr
    bad = ws.doit("model", "push=maybe", check=False)
    assert bad.returncode != 0 and "push=true or push=false" in bad.stderr


def test_a_secret_in_the_recipe_is_refused(tmp_path, tiny_model, prose_file):
    table = '\n[store]\nremote = "s3://bucket/x"\naws_secret_access_key = "abc"\n'
    ws = workspace(tmp_path / "ws", tiny_model, prose_file, table)
    run = ws.doit("list", check=False)
    assert run.returncode != 0 and "[store]" in run.stderr and "AWS_ACCESS_KEY_ID" in run.stderr
