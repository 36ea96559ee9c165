"""`python -m bench.gpu_check`, the one-command GPU verification: its dry run on the CPU writes the files a
lent GPU session brings back, within a 300 s budget that holds everything, says what it skipped and why; a
failing or hanging step is recorded while the run goes on; the gpu-marked and kernel tests run first, in a
set order; --steps reruns only some steps. (On a GPU machine the dry run still runs on the CPU: it hides
the GPU.)"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bench import gpu_check, report

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
def test_dry_run_states_its_budget_and_keeps_within_it(dry_run):
    result, out = dry_run
    assert result.stdout.startswith("bench.gpu_check: a 300 s budget, everything included (10 s kept")
    record = json.loads((out / "gpu_check.json").read_text())
    assert (record["budget_s"], record["reserve_s"]) == (300, 10) and record["seconds"] < 300
    assert record["machine"].startswith("CPU") and "commit" in record["machine"]
    assert "of a 300 s budget (everything included)" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_dry_run_says_what_it_skipped_and_why(dry_run):
    result, out = dry_run
    steps = steps_of(out)
    assert list(steps) == gpu_check.DEFAULT_STEPS
    sanitizer = steps["sanitizer"]
    assert sanitizer["status"] == "skipped"
    assert "dry run: memcheck and racecheck not run" in sanitizer["line"]
    assert "72 cases on the CPU under TRITON_INTERPRET=1: 72 finite, 0 not finite" in sanitizer["line"]
    nccl = steps["nccl"]
    assert (nccl["status"], nccl["commands"]) == ("skipped", ["python -m bench.gpu_check_nccl --device cuda"])
    assert nccl["line"].startswith("dry run: NCCL needs CUDA")
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
    tests = json.loads((out / "tests.json").read_text())["tests"]
    assert (tests["collected"], tests["counts"], tests["failures"]) == (3, {"passed": 2, "skipped": 1}, [])
    assert tests["skips"] == [{"reason": "needs a CUDA device", "count": 1}]
    assert tests["running"] is None
    assert tests["last_finished"] == "tests/test_latent.py::test_kl_matches_torch_distributions"
    present = [name for name in gpu_check.KERNEL_TESTS if (ROOT / "tests" / name).exists()]
    assert f"--first-gpu-then {','.join(present)} " in tests["command"]
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
    for heading in ("## Steps", "## Tests: gpu-marked, then the kernels'", "## compute-sanitizer",
                    "## ELBO head: the headline case", "## ELBO head: the bandwidth case",
                    "## Training throughput"):  # fmt: skip
        assert heading in summary
    assert "Command: `python -m bench.elbo_head --batch 64 --dim 64 --latent 8" in summary
    assert "| 64 | 64 | 8 | fp32 | bernoulli | fused |" in summary
    assert "| fused | 128 | 1 |" in summary


def test_the_default_run_is_300_s_with_the_gpu_and_kernel_tests_first(capsys):
    """Everything in 300 s: the steps' shares and the reserve add up to it; the tests come right after the
    environment, then the sanitizer, then the benchmarks, the headline first; test_compile.py runs last."""
    assert gpu_check.DEFAULT_BUDGET_S == 300
    assert gpu_check.DEFAULT_STEPS == ["environment", "tests", "sanitizer", "nccl", "elbo_head", "bandwidth",
                                       "train_throughput", "host_overhead"]  # fmt: skip
    shares = gpu_check.shares(gpu_check.DEFAULT_BUDGET_S, gpu_check.DEFAULT_STEPS)
    assert sum(shares.values()) + gpu_check.RESERVE_S == pytest.approx(300)
    assert shares == {name: gpu_check.SHARES.get(name, gpu_check.ENVIRONMENT_S) for name in gpu_check.DEFAULT_STEPS}
    assert gpu_check.KERNEL_TESTS[:3] == ["test_latent.py", "test_likelihood.py", "test_extreme_inputs.py"]
    assert gpu_check.KERNEL_TESTS[-1] == "test_compile.py"
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "in at most 5 minutes (a 300 s budget, everything included)" in help_text
    assert "Shares of the default 300 s budget (10 s of it the reserve): environment 10 s, tests 110 s" in help_text


def test_steps_reruns_only_the_steps_named_after_the_environment(tmp_path, capsys):
    def chosen(*steps: str) -> list[str]:
        return gpu_check.parse_args(["--out", str(tmp_path / "out"), "--steps", *steps]).steps

    assert chosen("elbo_head,tests") == chosen("tests", "elbo_head") == ["environment", "tests", "elbo_head"]
    assert chosen("suite") == ["environment", "suite"]
    shares = gpu_check.shares(300, ["environment", "tests", "elbo_head"])  # the whole budget for the two
    proportion = gpu_check.SHARES["tests"] / gpu_check.SHARES["elbo_head"]
    assert shares["tests"] / shares["elbo_head"] == pytest.approx(proportion)
    assert sum(shares.values()) == pytest.approx(300 - gpu_check.RESERVE_S)
    assert gpu_check.shares(300, ["environment", "suite"])["suite"] == pytest.approx(280)
    with pytest.raises(SystemExit) as exit_info:
        chosen("tests,sanitiser")
    assert exit_info.value.code == 2
    assert "no step sanitiser; the steps: environment, tests, sanitizer," in capsys.readouterr().err


def test_the_files_stay_within_what_comes_back(tmp_path):
    """Every step writes one of at most 8 names; check_files flags a 9th entry, a folder, a file over 16 MiB."""
    assert set(gpu_check.FILES) == set(gpu_check.STEPS)
    assert len({*gpu_check.FILES.values(), *gpu_check.KIT_FILES}) <= gpu_check.MAX_FILES
    out = tmp_path / "out"
    out.mkdir()
    for i in range(8):
        (out / f"{i}.json").write_text("{}")
    assert gpu_check.check_files(out) == []
    (out / "big.txt").write_bytes(b"")
    os.truncate(out / "big.txt", 17 * MiB)
    (out / "folder").mkdir()
    assert gpu_check.check_files(out) == [f"10 entries in {out}, more than 8", "big.txt is 17.0 MiB, over 16 MiB",
                                          "folder is not a file"]  # fmt: skip


def test_a_failing_and_a_hanging_step_are_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "out"
    args = ["--dry-run", "--out", str(out), "--steps", "tests,elbo_head", "--budget", "21",
            "--inject", "tests=fail", "elbo_head=hang"]  # fmt: skip
    result = run_kit(*args, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    steps = steps_of(out)
    assert list(steps) == ["environment", "tests", "elbo_head"]
    assert steps["environment"]["status"] == "passed"
    assert steps["tests"]["status"] == "failed"
    assert steps["tests"]["line"] == "pytest exited with status 1: injected failure"
    assert steps["elbo_head"]["status"] == "cut"
    assert steps["elbo_head"]["line"].startswith("bench.elbo_head cut short at the step's deadline")
    assert steps["elbo_head"]["line"].endswith("its last output: (none)")
    assert json.loads((out / "gpu_check.json").read_text())["seconds"] < 21  # the stop included
    summary = (out / "summary.md").read_text()
    assert "- **tests** (failed): pytest exited with status 1: injected failure" in summary
    assert "- **elbo_head** (cut): bench.elbo_head cut short" in summary
    assert "### tests (failed)\n\nCommand: `python -c 'raise SystemExit('\"'\"'injected failure" in summary
    assert "```text\ninjected failure\n```" in summary  # the failed step's output


def test_the_suite_step_runs_the_rest_of_the_tests(tmp_path):
    kit = gpu_check.Kit(gpu_check.parse_args(["--dry-run", "--out", str(tmp_path / "out"), "--steps", "suite"]))
    kit.out.mkdir()
    try:
        kit.execute(kit.steps[1], gpu_check.step_suite)
    finally:
        shutil.rmtree(kit.scratch)
    step = kit.steps[1]
    assert step.status == "passed", step.line
    suite = json.loads((kit.out / "tests.json").read_text())["suite"]
    assert suite["counts"] == {"passed": 2} and suite["command"] == step.commands[0]
    ignored = [f"--ignore=tests/{name}" for name in (*gpu_check.KERNEL_TESTS, gpu_check.KIT_TEST)]
    assert f"-m 'not gpu' {' '.join(ignored)} tests/test_packaging.py" in step.commands[0]


# Stand-ins for compute-sanitizer (a GPU machine's tool), called as the kit calls it: `--tool TOOL` and five
# more words of options, then the program. CUDA_LINE is bench.sanitize_kernels' last line after a run on CUDA.
CUDA_LINE = "72 cases on CUDA: 72 finite, 0 not finite"
TRITON_FILE = "/usr/lib/python3/site-packages/triton/language/standard.py"
KERNEL_FILE = str(ROOT / "fastvae" / "kernels" / "likelihood.py")


def race(kernel: str, file: str, line: int = 290, hazards: int = 12) -> str:
    """racecheck's report of a race (its default form), as echo lines of a stand-in tool."""
    return (f'echo "========= Error: Race reported between Write access at {kernel}+0x1e30 in {file}:{line}"\n'
            f'echo "=========     and Write access at {kernel}+0x1e30 in {file}:{line} [{hazards} hazards]"\n'
            'echo "========="\n')  # fmt: skip


def fake_tool(memcheck: str, racecheck: str) -> str:
    """A stand-in whose memcheck and racecheck runs are these shell commands."""
    return f'#!/bin/sh\nif [ "$2" = memcheck ]; then\n{memcheck}\nelse\n{racecheck}\nfi\n'


RUN_ON_CUDA = f'echo "{CUDA_LINE}"; echo "========= ERROR SUMMARY: 0 errors"; exit 0'


def racecheck_finding(*reports: str) -> str:
    n = len(reports)
    summary = f"RACECHECK SUMMARY: {n} hazards displayed ({n} errors, 0 warnings)"
    return f'{"".join(reports)}echo "{CUDA_LINE}"\necho "========= {summary}"\nexit 99'


def sanitizer_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: str) -> tuple[gpu_check.Step, Path]:
    """The kit's sanitizer step (a GPU run's, not a dry run's) with `tool` as compute-sanitizer on PATH."""
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text(tool)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    kit = gpu_check.Kit(gpu_check.parse_args(["--out", str(tmp_path / "out"), "--steps", "sanitizer"]))
    kit.out.mkdir()
    step = kit.steps[1]
    try:
        kit.execute(step, gpu_check.step_sanitizer)
    finally:
        shutil.rmtree(kit.scratch)
    assert all(c.startswith(f"{fake} --tool ") for c in step.commands)
    assert all(c.endswith("python -m bench.sanitize_kernels --require-cuda") for c in step.commands)
    return step, kit.out / "sanitizer.txt"


def test_the_sanitizers_verdicts_are_recorded(tmp_path, monkeypatch):
    """memcheck finds nothing on CUDA: passed; racecheck a race it does not place: failed."""
    unplaced = 'echo "========= Error: Race reported between Write access and Read access"\n'
    step, text = sanitizer_step(tmp_path, monkeypatch, fake_tool(RUN_ON_CUDA, racecheck_finding(unplaced)))
    assert step.status == "failed"
    assert step.line == (f"memcheck: ERROR SUMMARY: 0 errors; {CUDA_LINE} | racecheck: exit status 99; RACECHECK "
                         "SUMMARY: 1 hazards displayed (1 errors, 0 warnings); 1 of 1 findings not in Triton's "
                         "reductions")  # fmt: skip
    assert [c.split(" --error-exitcode")[0].split(" --tool ")[1] for c in step.commands] == ["memcheck", "racecheck"]
    assert "Race reported between Write access and Read access" in text.read_text()


def test_a_tool_that_refuses_the_device_is_a_skip_with_its_reason(tmp_path, monkeypatch):
    refusal = "Internal Sanitizer Error: Device not supported. Please refer to the Supported Devices section."
    tool = fake_tool(f'echo "========= {refusal}"; exit 1', "exit 1")
    step, text = sanitizer_step(tmp_path, monkeypatch, tool)
    assert (step.status, step.line) == ("skipped", f"memcheck: compute-sanitizer refused the device: {refusal}")
    assert len(step.commands) == 1  # racecheck would meet the same device
    assert refusal in text.read_text()


def test_cuda_that_does_not_initialise_under_the_tool_is_a_skip_not_a_run_on_the_cpu(tmp_path, monkeypatch):
    """The tool runs the real bench.sanitize_kernels, which finds no usable CUDA here (as under a tool whose
    container runtime hides the device: error 999): it must stop with torch's reason, not run the cases on
    the CPU under the interpreter, and the step is skipped with that reason."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tool = '#!/bin/sh\nshift 8\nexec "$@"\n'  # drop --tool TOOL and the options, run the program
    step, text = sanitizer_step(tmp_path, monkeypatch, tool)
    assert step.status == "skipped", step.line
    assert step.line.startswith("memcheck: CUDA did not initialise under compute-sanitizer: ")
    assert len(step.line) > len("memcheck: CUDA did not initialise under compute-sanitizer: ")
    output = text.read_text()
    assert "no CUDA under this run: " in output and "cases on" not in output


def test_torchs_warning_is_the_reason_when_cuda_fails_to_initialise(monkeypatch):
    """torch only warns when cudaGetDeviceCount fails (error 999): that warning is the reason given."""
    from bench import sanitize_kernels

    warning = "CUDA initialization: Unexpected error from cudaGetDeviceCount(). Error 999: unknown error"

    def unavailable() -> bool:
        warnings.warn(warning, UserWarning, stacklevel=1)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    assert sanitize_kernels.cuda_status() == (False, warning)


def test_kernels_run_on_the_cpu_under_the_tool_fail_the_step(tmp_path, monkeypatch):
    cpu = 'echo "72 cases on the CPU under TRITON_INTERPRET=1: 72 finite, 0 not finite"; exit 0'
    step, _ = sanitizer_step(tmp_path, monkeypatch, fake_tool(cpu, cpu))
    assert step.status == "failed"
    assert step.line.startswith("memcheck: exit status 0; the kernels did not all run on CUDA: ")


def test_racecheck_findings_in_tritons_reductions_are_triaged_and_kept(tmp_path, monkeypatch):
    reports = (race("_loglik_kernel", TRITON_FILE), race("_latent_bwd_kernel", TRITON_FILE, 237, 1))
    step, text = sanitizer_step(tmp_path, monkeypatch, fake_tool(RUN_ON_CUDA, racecheck_finding(*reports)))
    assert step.status == "passed", step.line
    racecheck = step.line.split(" | ")[1]
    assert racecheck.startswith("racecheck: 2 findings, all in Triton's own reductions inside fastvae's "
                                "kernels (triton-lang/triton#7264, open): triaged, not a failure, kept in "
                                "sanitizer.txt")  # fmt: skip
    kept = text.read_text()
    assert kept.startswith("== racecheck findings triaged as Triton's own reductions (triton-lang/triton#7264")
    assert kept.count(f"_loglik_kernel+0x1e30 in {TRITON_FILE}:290") == 4  # in the note (2) and the output (2)


@pytest.mark.parametrize(
    "reports",
    [
        [race("_loglik_kernel", KERNEL_FILE)],  # in a line of fastvae: a race of ours
        [race("_loglik_kernel", TRITON_FILE), race("other_kernel", TRITON_FILE)],  # not one of fastvae's kernels
        [race("_loglik_kernel", TRITON_FILE),
         'echo "========= Error: Potential WAW hazard detected at __shared__ 0x0 in block (0,0,0) :"\n'],
    ],
    ids=["fastvae-line", "other-kernel", "another-form"],
)
def test_other_racecheck_findings_still_fail(tmp_path, monkeypatch, reports):
    step, _ = sanitizer_step(tmp_path, monkeypatch, fake_tool(RUN_ON_CUDA, racecheck_finding(*reports)))
    assert step.status == "failed"
    untriaged = sum(1 for r in reports if TRITON_FILE not in r or "other_kernel" in r)
    assert step.line.endswith(f"; {untriaged} of {len(reports)} findings not in Triton's reductions")


SAMPLE_TESTS = {
    "conftest.py": "def pytest_configure(config):\n    config.addinivalue_line('markers', 'gpu: needs CUDA')\n",
    "test_one.py": "import pytest\n"
    "def test_passes():\n    pass\n"
    "def test_fails():\n    assert 1 == 2, 'one is not two'\n"
    "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n"
    "@pytest.mark.gpu\ndef test_on_gpu():\n    pass\n",
    "test_two.py": "import os, signal\ndef test_other():\n    pass\n"
    "def test_crashes():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    "def test_after_the_crash():\n    pass\n",
    # A stand-in for a test that leaves the CUDA context broken (an illegal address): from then on, every
    # synchronisation of this process's device fails.
    "test_three.py": "import torch\n"
    "def test_breaks_the_context():\n"
    "    def broken():\n"
    "        raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
    "    torch.cuda.is_initialized, torch.cuda.synchronize = lambda: True, broken\n"
    "def test_after_the_fault():\n    assert not torch.cuda.is_initialized()\n",
    "test_four.py": "def test_not_chosen():\n    pass\n",
}


def test_the_tests_run_in_order_and_a_crash_or_cuda_fault_is_that_tests_and_the_rest_still_run(tmp_path):
    """--first-gpu-then: the gpu-marked test first, then the files in the order named, the rest deselected;
    a failure keeps its short traceback. A test that kills its process, and one that leaves the CUDA context
    broken, are each recorded as that test's failure, and a new process runs the tests after it."""
    tests_dir = tmp_path / "sample"
    tests_dir.mkdir()
    for name, text in SAMPLE_TESTS.items():
        (tests_dir / name).write_text(text)
    kit = gpu_check.Kit(gpu_check.parse_args(["--dry-run", "--out", str(tmp_path / "out"), "--steps", "tests"]))
    kit.out.mkdir()
    step = kit.steps[1]
    try:
        kit.current = step
        # The sample's own root: without one, pytest roots the node IDs at the common ancestor of the
        # checkout and tmp_path (/tmp for a clone under /tmp), and they would name that path.
        order = ["--first-gpu-then", "test_one.py,test_two.py,test_three.py"]
        gpu_check.run_pytest(kit, step, [f"--rootdir={tests_dir}", *order, str(tests_dir)])
        jsonl = (kit.scratch / "tests.jsonl").read_text()
    finally:
        shutil.rmtree(kit.scratch)
    started = [json.loads(line)["started"].split("::")[1] for line in jsonl.splitlines() if "started" in line]
    assert started == ["test_on_gpu", "test_passes", "test_fails", "test_skipped", "test_other", "test_crashes",
                       "test_after_the_crash", "test_breaks_the_context", "test_after_the_fault"]  # fmt: skip
    assert len(step.commands) == 3 and "--resume-after" not in step.commands[0]
    assert "--resume-after=test_two.py::test_crashes " in step.commands[1]
    assert "--resume-after=test_three.py::test_breaks_the_context " in step.commands[2]
    tests = json.loads((kit.out / "tests.json").read_text())["tests"]
    assert tests["collected"] == 9 and tests["processes"] == 3 and tests["running"] is None
    assert tests["counts"] == {"passed": 6, "failed": 1, "skipped": 1, "crashed": 1, "faulted": 1}
    failures = [(f["test"].split("::")[1], f["when"], f["line"]) for f in tests["failures"]]
    assert failures == [("test_fails", "call", "AssertionError: one is not two"),
                        ("test_crashes", "call", "the test process killed by SIGKILL in this test"),
                        ("test_breaks_the_context", "teardown",
                         "CUDA error: an illegal memory access was encountered")]  # fmt: skip
    assert "test_one.py:5: in test_fails\n    assert 1 == 2, 'one is not two'" in tests["failures"][0]["report"]
    assert tests["skips"] == [{"reason": "not here", "count": 1}]
    assert step.status == "failed"
    assert "9 of 9 tests ran" in step.line and "3 test processes (a crash or CUDA fault ended each" in step.line
    summary = "\n".join(report.tests_markdown(tests))
    assert "| `test_two.py::test_crashes` | call | the test process killed by SIGKILL in this test |" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_a_gpu_the_real_run_stops_with_one_line(tmp_path):
    out = tmp_path / "out"
    result = run_kit("--out", str(out), "--steps", "tests,nccl", timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    steps = steps_of(out)
    assert steps["environment"]["status"] == "failed"
    assert "no CUDA device here" in steps["environment"]["line"] and "--dry-run" in steps["environment"]["line"]
    for name in ("tests", "nccl"):
        assert steps[name]["status"] == "skipped"
        assert steps[name]["line"] == "no CUDA device (see the environment step)"


def test_out_must_be_an_empty_folder(tmp_path, capsys):
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--out {tmp_path} is not an empty folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the nccl step's jobs


def test_the_nccl_jobs_are_1_process_torchrun_jobs_of_the_training_cli(tmp_path):
    from bench import gpu_check_nccl as nccl

    commands = {case: nccl.job_command(case, "cuda", tmp_path / case, tmp_path / "run", 29500) for case in nccl.CASES}
    for command in commands.values():
        assert command[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29500"]
        assert command[5:8] == ["-m", "bench.ddp_stress", "--worker"]  # the rank's own exit code is recorded
        assert command[command.index("--device") + 1] == "cuda" and "--no-pictures" in command
        assert command[-2:] == ["--out", str(tmp_path / "run")]
    assert commands["nonfinite"][-4:-2] == ["--lr", "1e6"]
    assert commands["SIGTERM"][commands["SIGTERM"].index("--num-train") + 1] == "2048"  # long enough to stop
    assert nccl.EXPECTED == {"finished": 0, "SIGTERM": 143, "nonfinite": 3}  # docs/training.md's exit codes


def test_the_nccl_jobs_are_judged_by_their_ranks_exit_codes_and_the_nccl_group(tmp_path):
    from bench import gpu_check_nccl as nccl

    ready = "NCCL INFO ncclCommInitRankConfig comm 0x1 rank 0 nranks 1 cudaDev 0 - Init COMPLETE\n"
    stopped = f"{ready}Interrupted by SIGTERM after step 12; checkpoint written.\n{nccl.RESUME} runs/x\n"
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert nccl.judge("SIGTERM", "cuda", 1, 143, stopped, tmp_path) == []
    assert nccl.judge("finished", "cuda", 0, 0, ready, tmp_path) == []
    assert nccl.judge("nonfinite", "cuda", 1, 3, f"{ready}{nccl.DIVERGED}2: ...", tmp_path) == []
    assert nccl.judge("finished", "cuda", 0, 0, "", tmp_path) == [
        "no NCCL communicator was set up (NCCL_DEBUG=INFO printed no 'Init COMPLETE')"]  # fmt: skip
    assert nccl.judge("finished", "cpu", 0, 0, "", tmp_path) == []  # gloo: no NCCL line to look for
    assert nccl.judge("finished", "cuda", 1, 0, f"{ready}terminate called without an active exception", tmp_path) \
        == ["output says 'terminate called'", "torchrun exited 1"]  # fmt: skip
    assert nccl.judge("SIGTERM", "cuda", 1, 1, ready, tmp_path / "none") == [
        "rank exit code 1, expected 143", "no interruption message and torchrun resume command", "no checkpoint"]
    assert nccl.judge("nonfinite", "cuda", None, None, ready, tmp_path) == [
        f"did not end within {nccl.TIMEOUT_S} s", "rank exit code None, expected 3",
        "no diagnosis of the non-finite step"]  # fmt: skip


@pytest.mark.slow
def test_the_nccl_jobs_end_as_documented_in_a_1_process_gloo_group():
    """The same jobs on the CPU: a 1-process group (gloo) run to the end, stopped by SIGTERM (the resume
    command names torchrun: the process was a rank of a group), and stopped by a non-finite loss."""
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check_nccl", "--device", "cpu"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == ("3 of 3 1-process gloo jobs ended as expected: finished 0, "
                                              "SIGTERM 143, nonfinite 3 (the ranks' exit codes)")  # fmt: skip
