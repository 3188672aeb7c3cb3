"""`doit -n N`: steps running side by side share the cores instead of each taking all."""

from __future__ import annotations

import os

import pytest

from tasks.errors import UsageError
from tasks.jobs import doit_jobs, refuse_state_commands, share_cpus


@pytest.mark.parametrize(
    ("argv", "jobs"),
    [
        ([], 1),
        (["quantize:awq"], 1),
        (["-n", "2"], 2),
        (["-n3", "recipe=x.toml"], 3),
        (["run", "--process", "4", "evaluate"], 4),
        (["--process=2"], 2),
        (["-n", "0"], 1),
        (["-n"], 1),
        (["recipe=n.toml", "-v", "2"], 1),
        (["-n", "2", "-n", "4"], 4),  # the last one, as doit takes it
    ],
)
def test_jobs_come_from_doits_process_option(argv, jobs):
    assert doit_jobs(argv) == jobs


def test_parallel_steps_split_the_cores():
    environ: dict[str, str] = {}
    assert share_cpus(2, environ, cpus=8) == 4
    assert environ == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}


def test_more_jobs_than_cores_still_leaves_each_one_thread():
    environ: dict[str, str] = {}
    assert share_cpus(3, environ, cpus=2) == 1
    assert environ["OMP_NUM_THREADS"] == "1"


def test_one_job_or_a_chosen_thread_count_is_left_alone():
    environ: dict[str, str] = {}
    assert share_cpus(1, environ, cpus=8) is None and environ == {}
    chosen = {"OMP_NUM_THREADS": "6"}
    assert share_cpus(2, chosen, cpus=8) is None and chosen == {"OMP_NUM_THREADS": "6"}


def test_the_cores_are_those_this_process_may_use():
    from tasks.jobs import usable_cpus

    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)


def test_onnxruntime_sessions_follow_the_thread_count(tmp_path, monkeypatch):
    """onnxruntime does not read OMP_NUM_THREADS itself: the sessions modelkiln opens do."""
    import onnx
    from onnx import TensorProto, helper

    from tasks.runtimes.onnx import ort_session

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), path)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    session = ort_session(path, ["CPUExecutionProvider"])
    assert session.get_session_options().intra_op_num_threads == 3


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["forget", "quantize:int8"], True),
        (["-f", "dodo.py", "-d", "ws", "ignore", "quantize:int8", "recipe=r.toml"], True),
        (["reset-dep"], True),
        (["-a", "quantize:int8"], True),
        (["run", "--always-execute"], True),
        (["quantize:int8", "recipe=r.toml"], False),
        (["-f", "forget", "gc", "--dry-run"], False),  # a dodo file named forget
        (["list", "--all"], False),
        ([], False),
    ],
)
def test_commands_on_doits_database_are_refused(argv, refused):
    """modelkiln keeps no doit database: they said they acted and changed nothing."""
    if refused:
        with pytest.raises(UsageError, match="keeps none"):
            refuse_state_commands(argv)
    else:
        refuse_state_commands(argv)
