"""Two "machines" on this host: a Ray cluster of two nodes (Ray's own test helper), each node's
workers with a workspace of their own, sharing only a remote store on moto's S3 server. The
doit driver's workspace is the head node's. Skipped where Ray is not installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from workspace import Workspace, tiny_recipe

from tasks.rayrun import NODE_ARTIFACTS

STEPS = ["model", "data:prose", "capture:fp32", "quantize:int8", "evaluate:fp32",
         "evaluate:int8", "report"]  # fmt: skip


@pytest.fixture
def two_nodes(tmp_path: Path, s3_remote):
    """(cluster address, the head's workspace, the second node's workspace, remote env)."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    head, other = Workspace(tmp_path / "head"), Workspace(tmp_path / "other")
    env = dict(s3_remote.env)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "env_vars": env},
    )
    node = cluster.add_node(num_cpus=1, env_vars={**env, NODE_ARTIFACTS: str(other.artifacts)})
    cluster.wait_for_nodes()
    try:
        yield cluster.address, head, other, s3_remote, {cluster.head_node.node_id, node.node_id}
    finally:
        cluster.shutdown()


def manifests(ws: Workspace) -> dict[str, dict]:
    """Every complete entry of a workspace's store: its manifest, by key."""
    found = {}
    for path in (ws.artifacts / "store").glob("*/*.json"):
        manifest = json.loads(path.read_text())
        found[manifest["key"]] = manifest
    return found


def files(manifest: dict) -> dict[str, str]:
    return {f["path"]: f["xxh3"] for f in manifest["files"]}


def test_two_nodes_with_their_own_workspaces_build_each_step_once(
    two_nodes, tiny_model, prose_file
):
    address, head, other, s3, node_ids = two_nodes
    for ws in (head, other):
        ws.root.mkdir()
        ws.write(tiny_recipe(tiny_model, prose_file) + s3.table("team", push=False))
    run = head.doit(f"ray={address}", "-n", "2", env=s3.env, timeout=900)
    summary = json.loads((head.artifacts / "recipe" / "runs" / "latest.json").read_text())
    steps = summary["steps"]
    assert {t: s["status"] for t, s in steps.items()} == dict.fromkeys(STEPS, "built"), run.stderr
    # Built once each, on some node: an entry's manifest says "pulled_from" everywhere but on
    # the node that built it (the report is built by the driver, on the head's workspace).
    built_here = {k for k, m in manifests(head).items() if "pulled_from" not in m}
    built_there = {k for k, m in manifests(other).items() if "pulled_from" not in m}
    assert not built_here & built_there
    assert built_here | built_there == {s["key"] for s in steps.values()}
    assert built_there, "the second node built nothing"
    ran_on = {s["node"].split("(")[1].rstrip(")") for t, s in steps.items() if t != "report"}
    assert ran_on == {n[:8] for n in node_ids}
    # Every entry a workspace holds has the same bytes as everywhere else; the driver's holds
    # them all, and the second node gets the rest with a pull, building nothing.
    pulled = other.doit("pull", env=s3.env)
    assert "built in" not in pulled.stderr
    ours, theirs = manifests(head), manifests(other)
    assert set(ours) == set(theirs) == {s["key"] for s in steps.values()}
    assert all(files(ours[k]) == files(theirs[k]) for k in ours)
