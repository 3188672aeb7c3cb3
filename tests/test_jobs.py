"""`doit -n N`: steps running side by side share the cores instead of each taking all."""

from __future__ import annotations

import pytest

from tasks.jobs import doit_jobs, share_cpus


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
