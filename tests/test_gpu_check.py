"""`python -m bench.gpu_check`, the one-command GPU verification: its dry run on the CPU writes the files a
lent GPU session brings back, says what it skipped and why, and a failing or hanging step is recorded while
the run goes on. (On a GPU machine the dry run still runs on the CPU: it hides the GPU.)"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def run_kit(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def steps_of(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((out / "gpu_check.json").read_text())["steps"]}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("kit") / "out"
    return run_kit("--dry-run", "--out", str(out)), out


@pytest.mark.slow
def test_dry_run_writes_at_most_8_files_that_parse(dry_run):
    result, out = dry_run
    assert "Traceback" not in result.stdout + result.stderr
    names = {p.name for p in out.iterdir()}
    expected = {"environment.json", "tests.json", "sanitizer.txt", "elbo_head.json", "train_throughput.json",
                "gpu_check.json", "summary.md"}  # fmt: skip
    assert expected <= names and len(names) <= 8, names
    for path in out.iterdir():
        assert path.is_file() and path.stat().st_size <= 16 * MiB
        if path.suffix == ".json":
            json.loads(path.read_text())
    env = json.loads((out / "environment.json").read_text())
    assert env["cuda_devices"] == 0 and env["copy_bandwidth_gbs"] is None  # the dry run hides any GPU
    assert env["commit"] and env["torch"] == torch.__version__


@pytest.mark.slow
def test_dry_run_says_what_it_skipped_and_why(dry_run):
    result, out = dry_run
    steps = steps_of(out)
    assert list(steps) == list(gpu_check.SHARES)
    sanitizer = steps["sanitizer"]
    assert sanitizer["status"] == "skipped"
    assert "dry run: memcheck and racecheck not run" in sanitizer["line"]
    assert "72 cases on the CPU under TRITON_INTERPRET=1: 72 finite, 0 not finite" in sanitizer["line"]
    host = steps["host_overhead"]
    if importlib.util.find_spec("bench.host_overhead") is None:
        assert (host["status"], host["line"]) == ("skipped", "bench.host_overhead is not in this version")
    else:
        assert host["status"] == "passed", host["line"]
    for name in ("environment", "tests", "elbo_head", "bandwidth", "train_throughput"):
        assert steps[name]["status"] == "passed", (name, steps[name]["line"])
    assert "fused+graphs" in steps["train_throughput"]["line"]  # present, or said to be not available
    assert result.returncode == 3  # nothing failed, something skipped
    summary = (out / "summary.md").read_text()
    assert "- **sanitizer** (skipped): dry run" in summary
    assert "exit status 3" in summary and "dry run on the CPU" in summary


@pytest.mark.slow
def test_dry_run_records_the_tests_and_the_benchmarks(dry_run):
    _, out = dry_run
    tests = json.loads((out / "tests.json").read_text())
    assert (tests["collected"], tests["counts"], tests["failures"]) == (3, {"passed": 2, "skipped": 1}, [])
    assert tests["skips"] == [{"reason": "needs a CUDA device", "count": 1}]
    head = json.loads((out / "elbo_head.json").read_text())
    cases = [(r["case"]["B"], r["case"]["dist"], r["impl"]) for r in head["results"]]
    assert cases == [(64, "gaussian", "eager"), (64, "gaussian", "compile"), (64, "gaussian", "fused"),
                     (64, "bernoulli", "eager"), (64, "bernoulli", "compile"), (64, "bernoulli", "fused"),
                     (256, "gaussian", "fused"), (256, "bernoulli", "fused")]  # headline, then bandwidth  # fmt: skip
    throughput = json.loads((out / "train_throughput.json").read_text())
    assert [(r["system"], r["batch_size"]) for r in throughput["results"]] == [
        (s, b) for b in (64, 128) for s in ("baseline", "reference", "fused")
    ]
    summary = (out / "summary.md").read_text()
    for heading in ("## Steps", "## Tests", "## compute-sanitizer", "## ELBO head: the headline case",
                    "## ELBO head: the bandwidth case", "## Training throughput"):  # fmt: skip
        assert heading in summary
    assert "Command: `python -m bench.elbo_head --batch 64 --dim 64 --latent 8" in summary
    assert "| 64 | 64 | 8 | fp32 | bernoulli | fused |" in summary
    assert "| fused | 128 | 1 |" in summary


def test_a_failing_and_a_hanging_step_are_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "out"
    args = ["--dry-run", "--out", str(out), "--steps", "tests", "elbo_head", "--budget", "6",
            "--inject", "tests=fail", "elbo_head=hang"]  # fmt: skip
    result = run_kit(*args, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    steps = steps_of(out)
    assert steps["tests"]["status"] == "failed"
    assert steps["tests"]["line"] == "pytest exited with status 1: injected failure"
    assert steps["elbo_head"]["status"] == "cut"
    assert steps["elbo_head"]["line"].startswith("bench.elbo_head cut short at the step's deadline")
    assert steps["elbo_head"]["seconds"] < 6 + gpu_check.KILL_GRACE_S + 5
    summary = (out / "summary.md").read_text()
    assert "- **tests** (failed): pytest exited with status 1: injected failure" in summary
    assert "- **elbo_head** (cut): bench.elbo_head cut short" in summary


# A stand-in for compute-sanitizer (a GPU machine's tool): memcheck finds nothing, racecheck a hazard.
FAKE_SANITIZER = """#!/bin/sh
if [ "$2" = memcheck ]; then echo "========= ERROR SUMMARY: 0 errors"; exit 0; fi
echo "========= Error: Race reported between Write access and Read access"
echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"
exit 99
"""


def test_the_sanitizers_verdicts_are_recorded(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    kit = gpu_check.Kit(gpu_check.parse_args(["--out", str(tmp_path / "out"), "--steps", "sanitizer"]))
    kit.out.mkdir()
    try:
        kit.execute(kit.steps[0], gpu_check.step_sanitizer)
    finally:
        shutil.rmtree(kit.scratch)
    step = kit.steps[0]
    assert step.status == "failed"
    assert step.line == ("memcheck: exit status 0; ERROR SUMMARY: 0 errors | racecheck: exit status 99; "
                         "RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)")  # fmt: skip
    tools = [f"{fake} --tool {tool}" for tool in ("memcheck", "racecheck")]
    assert [c.split(" --error-exitcode")[0] for c in step.commands] == tools
    assert all(c.endswith("python -m bench.sanitize_kernels") for c in step.commands)
    assert "Race reported between Write access and Read access" in (kit.out / "sanitizer.txt").read_text()


def test_test_failures_are_recorded_with_their_first_lines(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_passes():\n    pass\n"
        "def test_fails():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n"
    )
    jsonl = tmp_path / "outcomes.jsonl"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "bench.pytest_outcomes", "--outcomes-jsonl", str(jsonl),
            "test_sample.py"]  # fmt: skip
    completed = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    tests = gpu_check.summarize_tests(jsonl, "pytest", gpu_check.Run(completed.returncode, 1.0, completed.stdout))
    assert tests["collected"] == 3 and tests["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    (failure,) = tests["failures"]
    assert (failure["test"], failure["line"]) == ("test_sample.py::test_fails", "AssertionError: one is not two")
    assert "assert 1 == 2" in failure["report"]
    assert tests["skips"] == [{"reason": "not here", "count": 1}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_a_gpu_the_real_run_stops_with_one_line(tmp_path):
    out = tmp_path / "out"
    result = run_kit("--out", str(out), "--steps", "environment", "tests", timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    steps = steps_of(out)
    assert steps["environment"]["status"] == "failed"
    assert "no CUDA device here" in steps["environment"]["line"] and "--dry-run" in steps["environment"]["line"]
    assert steps["tests"]["status"] == "skipped"
    assert steps["tests"]["line"] == "no CUDA device (see the environment step)"


def test_out_must_be_an_empty_folder(tmp_path, capsys):
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--out {tmp_path} is not an empty folder" in capsys.readouterr().err
