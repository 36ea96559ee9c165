"""bench.fault_stress: a 2-process torchrun job with --max-restarts and --auto-resume survives a killed
worker with the metrics rows of an uninterrupted job."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest

from bench import fault_stress
from fastvae.options import build_parser


def test_rows_leave_out_the_timing_columns(tmp_path):
    rows = [{"kind": "train", "step": 4, "loss": 1.5, "wall_time_s": 0.3, "samples_per_s": 900.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert fault_stress._rows(tmp_path) == [{"kind": "train", "step": 4, "loss": 1.5}]


def test_a_failed_job_is_reported_by_its_first_error():
    output = "W1203 closing signal SIGTERM\nTraceback (most recent call last):\n  File x\n"
    output += "RuntimeError: Gloo connectFullMesh failed\nerror: later\n"
    assert fault_stress._first_error(output) == "RuntimeError: Gloo connectFullMesh failed"
    assert fault_stress._first_error("exitcode: -9\n") == repr("exitcode: -9\n")


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/task").is_dir(), reason="Linux's /proc")
def test_workers_lists_the_children_of_a_process():
    child = "import time; time.sleep(60)"
    starter = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    parent = subprocess.Popen([sys.executable, "-c", starter])
    workers = []
    try:
        for _ in range(200):
            workers = fault_stress._workers(parent.pid)
            if workers:
                break
            __import__("time").sleep(0.05)
        assert len(workers) == 1
    finally:
        for pid in [parent.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait()


@pytest.mark.slow
@pytest.mark.skipif("--auto-resume" not in build_parser().format_help(), reason="needs fastvae.train --auto-resume")
def test_fault_stress_one_job_with_a_killed_worker_passes(tmp_path, capsys):
    path = tmp_path / "faults.json"
    assert fault_stress.main(["--runs", "1", "--kills", "1", "--json", str(path)]) == 0
    jobs = json.loads(path.read_text())
    assert [(job["kills"], job["passed"]) for job in jobs] == [(1, True)]
    assert "1 of 1 jobs ended as the uninterrupted one" in capsys.readouterr().out
