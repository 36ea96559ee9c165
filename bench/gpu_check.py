"""Verify fastvae on a GPU in one sitting: tests, sanitizers and benchmarks in at most 5 minutes (a 300 s
budget, everything included), in at most 8 files.

    python -m bench.gpu_check --out DIR                             # on a CUDA machine: at most 300 s
    python -m bench.gpu_check --out DIR2 --steps tests,elbo_head    # after a fix: these steps (and environment)
    python -m bench.gpu_check --dry-run --out DIR                   # the same steps on the CPU at tiny sizes

--budget (default 300 s) holds the whole run: the steps, and a reserve of 10 s for stopping the last one and
writing the files (a lent machine's start comes on top). The environment step has 10 s of it; the other
steps chosen share the rest in proportion to their shares (the list at the end of --help gives them in
seconds of the default run). Each step is a subprocess with a deadline, the end of its share counted from the
kit's start, so a step that finishes early leaves its time to the next. A step that reaches its deadline is
stopped (its process group: SIGTERM, then SIGKILL) and recorded as cut short, with what it was running; a
failing step is recorded; either way the kit goes on to the next. The steps, in order:

  environment       always, first: GPU, driver, CUDA, torch, triton, commit; the measured device copy bandwidth
  tests             with TRITON_INTERPRET unset, every gpu-marked test of tests/ first (what `-m gpu`
                    selects), then the kernels' tests, KERNEL_TESTS in that order (parity with the reference
                    first, the slow test_compile.py last), every outcome recorded as it happens; a test
                    that kills its process or leaves the CUDA context broken is that test's failure
                    (crashed, faulted), and a new pytest process runs the tests after it
  sanitizer         compute-sanitizer memcheck and racecheck over bench.sanitize_kernels (every kernel,
                    forward and backward, at tail and unaligned shapes); passed only when the kernels ran
                    on CUDA under the tool; skipped, with the reason, without compute-sanitizer, when the
                    tool refuses the device or CUDA does not initialise under it; racecheck's findings in
                    Triton's own reductions (triton-lang/triton#7264) are triaged, kept in sanitizer.txt
  nccl              bench.gpu_check_nccl: 1-process torchrun jobs of fastvae.train on NCCL, at once: one to
                    the end, one stopped by SIGTERM, one non-finite; each rank's exit code as documented
  elbo_head         the headline case B=4096, D=784, K=32: fp32 (the target's dtype) first, then bf16; both
                    distributions; eager, compile and fused; as called and replayed from a CUDA graph; peak
                    memory; launches
  bandwidth         the fused head at B=65536, D=12288, K=32: GB/s against the measured copy bandwidth
  train_throughput  the canonical-example baseline, fastvae reference and fused (and whole-step CUDA graphs
                    where bench.train_throughput offers them) at batch 128 and 1024, with test loss, on
                    20,000 sprites (samples/s do not depend on the epoch's length; 60,000 would not fit)
  host_overhead     `python -m bench.host_overhead --json PATH` (real launches on CUDA), if present
  suite             not a default step (`--steps suite`, with the --budget a session has left): the rest of
                    tests/, every test neither gpu-marked nor in KERNEL_TESTS, nor the kit's own test_gpu_check.py

Files written into DIR (8 at most, none over 16 MiB): environment.json; tests.json (per test step: counts,
every failure with its first line and short traceback, skips by reason, the test running when it stopped);
sanitizer.txt; elbo_head.json (the headline and bandwidth cases); train_throughput.json; host_overhead.json;
gpu_check.json (the budget, the machine, and every step: status, one line, seconds, share, commands, its
output's tail); summary.md (the steps; for each failed or cut step its commands and its output's tail; the
first failing tests' tracebacks; the tables in the form of docs/benchmarks.md, each under its device, date,
commit and command).

--dry-run hides any GPU (CUDA_VISIBLE_DEVICES=""), runs the kernels under Triton's interpreter where a step
needs them, shrinks every size, and runs three tests of test_latent.py (one gpu-marked: skipped) as the
tests step and test_packaging.py as the suite; it skips the nccl step (NCCL needs CUDA).

Exit status: 0 every step ran and passed; 1 a step failed or was cut short; 2 a usage error (e.g. --out not
empty); 3 nothing failed but a step was skipped (e.g. compute-sanitizer missing, as on every dry run).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
LOG_TAIL_CHARS = 4000
SUMMARY_TAIL_CHARS = 2000  # of a failed or cut step's output, in summary.md
KILL_GRACE_S = 5.0
DEFAULT_BUDGET_S = 300.0
RESERVE_S = 10.0  # of every budget: stopping the last step (KILL_GRACE_S) and writing the files
ENVIRONMENT_S = 10.0  # the environment step's share of every budget
# The other steps' shares, in seconds of the default budget's 280 (300 less the reserve and the environment's
# share), scaled to what --budget leaves for the steps chosen. suite's is all of them: alone, it has the 280 s.
SHARES = {
    "tests": 110,
    "sanitizer": 45,
    "nccl": 25,
    "elbo_head": 45,
    "bandwidth": 12,
    "train_throughput": 27,
    "host_overhead": 16,
    "suite": 280,
}
STEPS = ["environment", *SHARES]  # the kit's order
DEFAULT_STEPS = [name for name in STEPS if name != "suite"]
# The file each step writes: tests and suite share one, elbo_head and bandwidth another; the kit adds its own.
FILES = {
    "environment": "environment.json",
    "tests": "tests.json",
    "sanitizer": "sanitizer.txt",
    "nccl": "gpu_check.json",  # its record there (the jobs' lines, in its output's tail) is all it writes
    "elbo_head": "elbo_head.json",
    "bandwidth": "elbo_head.json",
    "train_throughput": "train_throughput.json",
    "host_overhead": "host_overhead.json",
    "suite": "tests.json",
}
KIT_FILES = ("gpu_check.json", "summary.md")
# Sizes of the ELBO-head runs (batch, dim, latent): a GPU run's, and a dry run's.
HEADLINE = {False: (4096, 784, 32), True: (64, 64, 8)}
BANDWIDTH = {False: (65536, 12288, 32), True: (256, 96, 8)}
GPU_DTYPES = ["--dtype", "fp32", "bf16"]  # the ELBO head's: the targets' dtype first
DRY_DTYPES = ["--dtype", "fp32"]  # a dry run's ELBO head and sanitizer cases: fp32 only
# The tests step: after the gpu-marked tests, the kernels' tests in this order: the fused ops against the
# reference, then the model and training paths through them, the custom ops' checks, the launch path, and the
# slowest, test_compile.py (Inductor compiles a graph), last.
KERNEL_TESTS = ["test_latent.py", "test_likelihood.py", "test_extreme_inputs.py", "test_loss_scaling.py",
                "test_kernel_limits.py", "test_model.py", "test_iwae.py", "test_log_scale_floor.py",
                "test_opcheck.py", "test_cached_kernel.py", "test_compile.py"]  # fmt: skip
KIT_TEST = "test_gpu_check.py"  # the kit's own test: a dry run on the CPU, run by `make test`, not here
PYTEST = ["-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider", "-p", "bench.pytest_outcomes",
          "--continue-on-collection-errors"]  # fmt: skip
# A dry run's tests step: two kernel tests and a gpu-marked one (skipped; it runs first); its suite: one file.
DRY_TESTS = ["-k", "test_public_shapes_and_reference_impl or test_kl_matches_torch_distributions or "
             "test_cuda_graph_replay_draws_fresh_noise", "tests/test_latent.py"]  # fmt: skip
DRY_SUITE = ["tests/test_packaging.py"]
GRAPH_SYSTEMS = ("reference+graphs", "fused+graphs")  # whole-step CUDA graphs (--cuda-graphs)
FAILED_OUTCOMES = ("failed", "error", "xpassed", "crashed", "faulted")  # a test step's failures in tests.json
REPORT_TAIL_CHARS = 3000  # of a crashed test process's output, as its failure's report
SANITIZER_TOOLS = ("memcheck", "racecheck")
SANITIZER_ERROR_EXIT = 99  # --error-exitcode: the tool's exit status when it found something
KERNELS_DIR = ROOT / "kernels"  # installed as fastvae.kernels (pyproject.toml's package-dir)
TRITON_RACE_ISSUE = "triton-lang/triton#7264"
TRITON_LIBRARY = "/triton/language/"  # Triton's own code, where a reduction's shared-memory traffic is placed
# racecheck's report of a shared-memory race: each access at KERNEL+OFFSET in FILE:LINE.
RACE = re.compile(r"(?:error|warning): race reported between \w+ access at (\S+?)\+0x[0-9a-f]+ in (\S+):\d+ "
                  r"and \w+ access at (\S+?)\+0x[0-9a-f]+ in (\S+):\d+(?: \[\d+ hazards?\])?", re.IGNORECASE)
MEMCHECK_PART = 0.6  # memcheck's part of the sanitizer step's time; racecheck has the rest


@dataclass
class Step:
    """One step's record in gpu_check.json."""

    name: str
    status: str = "pending"  # passed, failed, cut (stopped at its deadline) or skipped
    line: str = ""
    seconds: float = 0.0
    share_s: float = 0.0  # its share of the budget
    allowed_s: float = 0.0  # the time it was given: its share and what the steps before it left unused
    commands: list[str] = field(default_factory=list)
    log_tail: str = ""


@dataclass
class Run:
    """A finished command: its exit status (None: stopped at the deadline), seconds and output."""

    returncode: int | None
    seconds: float
    output: str

    @property
    def cut(self) -> bool:
        return self.returncode is None


def clip(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters: its start and, mostly, its end, with a marker between."""
    if len(text) <= limit:
        return text
    head = limit // 4
    return f"{text[:head]}\n[... {len(text) - limit} characters cut ...]\n{text[len(text) - (limit - head):]}"


def last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.strip().splitlines()) if line.strip()), "")


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing or unreadable (e.g. cut off mid-write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def shares(budget: float, steps: list[str]) -> dict[str, float]:
    """Each step's seconds of `budget`: the environment's ENVIRONMENT_S, and the others' SHARES scaled so
    that they fill what the reserve and the environment leave."""
    others = [name for name in steps if name != "environment"]
    scale = (budget - RESERVE_S - ENVIRONMENT_S) / sum(SHARES[name] for name in others) if others else 0.0
    return {name: ENVIRONMENT_S if name == "environment" else SHARES[name] * scale for name in steps}


class Kit:
    """Runs the steps, each against its deadline, and keeps their records."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.out = Path(args.out).resolve()  # the steps run in the repository root
        self.dry_run = args.dry_run
        self.inject = dict(item.split("=", 1) for item in args.inject)
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.started = time.monotonic()
        seconds = shares(args.budget, args.steps)
        self.deadlines: dict[str, float] = {}
        cumulative = 0.0
        for name in args.steps:  # the end of the step's share, counted from the kit's start
            cumulative += seconds[name]
            self.deadlines[name] = cumulative
        self.steps = [Step(name, share_s=round(seconds[name], 1)) for name in args.steps]
        self.current = self.steps[0]
        self.environment: dict | None = None

    def env(self, interpret: bool = True) -> dict[str, str]:
        """The steps' environment: TRITON_INTERPRET unset on a GPU run; on a dry run no visible GPU, and the
        interpreter where the step runs kernels (`interpret`)."""
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if self.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""
            if interpret:
                env["TRITON_INTERPRET"] = "1"
        return env

    def remaining(self) -> float:
        return self.deadlines[self.current.name] - (time.monotonic() - self.started)

    def shown(self, argv: list[str]) -> str:
        """A command as the record shows it: `python`, and $OUT for the output folder."""
        words = ["python" if a == sys.executable else a for a in argv]
        return shlex.join(words).replace(str(self.out), "$OUT").replace(str(self.scratch), "$TMP")

    def run(self, argv: list[str], env: dict[str, str], timeout: float | None = None) -> Run:
        """Run `argv` in the repository root until it exits or its time is up (the step's deadline, or
        `timeout` if sooner). Its output (stdout and stderr) goes to a log; the step keeps its tail."""
        step = self.current
        mode = self.inject.get(step.name)
        if mode:  # the test suite's way to make a step fail or hang
            code = "raise SystemExit('injected failure')" if mode == "fail" else "import time; time.sleep(10**6)"
            argv = [sys.executable, "-c", code]
        step.commands.append(self.shown(argv))
        limit = max(0.0, min(self.remaining(), float("inf") if timeout is None else timeout))
        log_path = self.scratch / f"{step.name}.log"
        log_path.unlink(missing_ok=True)
        start = time.monotonic()
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            except OSError as err:
                return Run(127, 0.0, f"could not start {argv[0]}: {err}")
            returncode: int | None
            try:
                returncode = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                returncode = None
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
            _signal_group(proc.pid, signal.SIGKILL)  # whatever the step left running (workers) goes too
            proc.wait()
        output = log_path.read_text(errors="replace")
        step.log_tail = clip(output, LOG_TAIL_CHARS)
        return Run(returncode, time.monotonic() - start, output)

    def python(self, *args: str, interpret: bool = True, timeout: float | None = None) -> Run:
        return self.run([sys.executable, *args], self.env(interpret), timeout)

    def execute(self, step: Step, action: Callable[[Kit, Step], None]) -> None:
        self.current = step
        step.allowed_s = round(max(0.0, self.remaining()), 1)
        print(f"[{step.name}] up to {step.allowed_s:.0f} s ...", flush=True)
        start = time.monotonic()
        try:
            action(self, step)
        except Exception as err:  # the kit's own fault in a step: recorded as the step's, the run goes on
            message = next(iter(str(err).strip().splitlines()), "")
            step.status, step.line = "failed", f"the kit failed in this step: {type(err).__name__}: {message}"
        step.seconds = round(time.monotonic() - start, 1)
        print(f"[{step.name}] {step.status} in {step.seconds:.0f} s: {step.line}", flush=True)


def settle(step: Step, run: Run, line: str, program: str) -> None:
    """The step's status and line from its run of `program`: cut short, failed, or passed with `line`."""
    if run.cut:  # what it reached: `line`, and its last words (e.g. the case a benchmark had begun)
        parts = [f"{program} cut short at the step's deadline, after {run.seconds:.0f} s", line,
                 f"its last output: {last_line(run.output) or '(none)'}"]  # fmt: skip
        step.status, step.line = "cut", "; ".join(part for part in parts if part)
    elif run.returncode < 0:  # a crash: SIGSEGV, SIGABRT, ...
        signame = signal.Signals(-run.returncode).name
        step.status, step.line = "failed", f"{program} was killed by {signame}: {last_line(run.output)}"
    elif run.returncode != 0:
        step.status, step.line = "failed", f"{program} exited with status {run.returncode}: {last_line(run.output)}"
    else:
        step.status, step.line = "passed", line


# --------------------------------------------------------------------------------------------------- steps


def machine_line(env: dict) -> str:
    bandwidth = env.get("copy_bandwidth_gbs")
    copy = f"measured copy bandwidth {bandwidth:,.0f} GB/s" if bandwidth else "copy bandwidth not measured (no GPU)"
    return (f"{env['device']}; driver {env.get('driver') or '–'}; torch {env['torch']} (CUDA "
            f"{env.get('cuda') or '–'}), triton {env['triton']}; commit {env['commit']}; date {env['date']}; "
            f"{copy}")  # fmt: skip


def step_environment(kit: Kit, step: Step) -> None:
    path = kit.out / FILES[step.name]
    run = kit.python("-m", "bench.environment", "--json", str(path), interpret=False)
    kit.environment = env = read_json(path)
    settle(step, run, machine_line(env) if env else "", "bench.environment")
    if step.status == "passed" and env is None:
        step.status, step.line = "failed", "bench.environment wrote no environment.json"
    elif env is not None and not kit.dry_run and not env.get("cuda_devices"):
        step.status = "failed"
        step.line = f"no CUDA device here ({env['device']}): a GPU check needs one; --dry-run runs the kit on the CPU"


def read_jsonl(jsonl: Path, start: int = 0) -> list[dict]:
    """The plugin's records in `jsonl` from line `start` on (a line cut off by the deadline is left out)."""
    records = []
    for line in jsonl.read_text().splitlines()[start:] if jsonl.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def summarize_tests(jsonl: Path, command: str, run: Run, processes: int = 1) -> dict:
    """A test step's record in tests.json from the plugin's lines: counts, failures in the order they came
    with their first lines and tracebacks (a crashed or faulted test among them), skips by reason, and the
    test running when the run stopped (one started and not finished: the deadline came in it)."""
    collected, records, started, finished = None, [], [], set()
    for record in read_jsonl(jsonl):
        if "collected" in record:  # the first process's: every test; a resumed one's counts what is left
            collected = record["collected"] if collected is None else collected
        elif "started" in record:
            started.append(record["started"])
        elif "finished" in record:
            finished.add(record["finished"])
        else:
            records.append(record)
    counts: dict[str, int] = {}
    skips: dict[str, int] = {}
    for r in records:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        if r["outcome"] == "skipped":
            skips[r["line"]] = skips.get(r["line"], 0) + 1
    ran = len({r["test"] for r in records if r["when"] != "collect"})
    return {
        "command": command,
        "exit_status": run.returncode,
        "cut": run.cut,
        "seconds": round(run.seconds, 1),
        "processes": processes,
        "collected": collected,
        "ran": ran,
        "not_reached": None if collected is None else max(0, collected - ran),
        "running": next((test for test in reversed(started) if test not in finished), None),
        "last_finished": next((test for test in reversed(started) if test in finished), None),
        "counts": counts,
        "failures": [{k: r.get(k, "") for k in ("test", "when", "line", "report")} for r in records
                     if r["outcome"] in FAILED_OUTCOMES],  # fmt: skip
        "skips": [{"reason": reason, "count": n} for reason, n in sorted(skips.items(), key=lambda kv: -kv[1])],
        "slowest": sorted(({"test": r["test"], "seconds": r["seconds"]} for r in records),
                          key=lambda r: -r["seconds"])[:10],  # fmt: skip
    }


def stopped_in(jsonl: Path, start: int, run: Run) -> str | None:
    """The test that ended the pytest process whose lines begin at line `start` of `jsonl`, if one did and
    tests are left after it: one that left the CUDA context broken (its "faulted" outcome), or one that the
    process died in (started, not finished), whose "crashed" outcome and end are then added to `jsonl`."""
    if run.cut:
        return None
    records = read_jsonl(jsonl, start)
    started = [r["started"] for r in records if "started" in r]
    finished = {r["finished"] for r in records if "finished" in r}
    collected = next((r["collected"] for r in records if "collected" in r), 0)
    faulted = [r["test"] for r in records if r.get("outcome") == "faulted"]
    crashed = [test for test in started if test not in finished]
    if faulted:
        test = faulted[-1]
    elif crashed:
        test = crashed[-1]
        how = (f"killed by {signal.Signals(-run.returncode).name}" if run.returncode < 0 and
               -run.returncode in signal.valid_signals() else f"exited with status {run.returncode}")  # fmt: skip
        line = f"the test process {how} in this test"
        with open(jsonl, "a") as f:
            f.write(json.dumps({"test": test, "outcome": "crashed", "when": "call", "seconds": 0.0, "line": line,
                                "report": clip(run.output, REPORT_TAIL_CHARS)}) + "\n")  # fmt: skip
            f.write(json.dumps({"finished": test}) + "\n")
    else:
        return None
    return test if started.index(test) + 1 < collected else None


def run_pytest(kit: Kit, step: Step, selection: list[str], note: str = "") -> None:
    """Run pytest on `selection` with the outcomes plugin; add the step's record to tests.json (under its
    name) and settle the step: its counts, `note`, the test running when it stopped, the first failure.

    A test that crashes its process (a signal, an exit) or leaves the CUDA context broken ends that pytest
    process: it is recorded as that test's failure, and a new process goes on after it (--resume-after),
    within the step's deadline, so that one fault does not fail, or hide, the tests after it."""
    jsonl = kit.scratch / f"{step.name}.jsonl"
    runs: list[Run] = []
    resume: list[str] = []
    while True:
        start = len(jsonl.read_text().splitlines()) if jsonl.exists() else 0
        # OPTION=VALUE: pytest takes an existing path among its words for a test path, to find its rootdir
        # (and so the tests' ids) by, unless the word starts with "-"
        runs.append(kit.python(*PYTEST, f"--outcomes-jsonl={jsonl}", *resume, *selection))
        after = stopped_in(jsonl, start, runs[-1])
        if after is None:
            break
        resume = [f"--resume-after={after}"]
    output = "\n".join(r.output for r in runs)
    step.log_tail = clip(output, LOG_TAIL_CHARS)
    last = runs[-1]
    code = 1 if len(runs) > 1 and last.returncode in (0, 5) else last.returncode  # 5: nothing left to run
    run = Run(code, sum(r.seconds for r in runs), output)
    tests = summarize_tests(jsonl, step.commands[0], run, len(runs))
    path = kit.out / FILES[step.name]
    path.write_text(json.dumps({**(read_json(path) or {}), step.name: tests}, indent=2))
    line = "; ".join(part for part in (report.tests_line(tests), note) if part)
    if len(runs) > 1:
        line += f"; {len(runs)} test processes (a crash or CUDA fault ended each before the last)"
    if tests["running"]:
        line += f"; running when it stopped: {tests['running']}"
    if tests["failures"]:
        first = tests["failures"][0]
        line += f"; first failure: {first['test']}: {first['line']}"
    settle(step, run, line, "pytest")
    if step.status == "failed" and tests["ran"]:  # the counts say more than pytest's last line
        step.line = f"{step.line.split(':')[0]}; {line}"


def step_tests(kit: Kit, step: Step) -> None:
    """The gpu-marked tests of tests/, then the kernels' tests (KERNEL_TESTS, in order)."""
    present = {path.name for path in (ROOT / "tests").glob("test_*.py")}
    missing = [name for name in KERNEL_TESTS if name not in present]
    selection = ["--first-gpu-then", ",".join(name for name in KERNEL_TESTS if name in present)]
    selection += DRY_TESTS if kit.dry_run else ["tests"]
    run_pytest(kit, step, selection, f"not in tests/: {', '.join(missing)}" if missing else "")


def step_suite(kit: Kit, step: Step) -> None:
    """The rest of tests/: neither gpu-marked nor a kernel test, nor the kit's own test."""
    ignored = [f"--ignore=tests/{name}" for name in (*KERNEL_TESTS, KIT_TEST)]
    run_pytest(kit, step, ["-m", "not gpu", *ignored, *(DRY_SUITE if kit.dry_run else ["tests"])])


def compute_sanitizer() -> str | None:
    """compute-sanitizer on PATH, or in the CUDA toolkit's bin folder; None if not found."""
    for candidate in (shutil.which("compute-sanitizer"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and not candidate.endswith("compute-sanitizer"):
            candidate = str(Path(candidate) / "bin" / "compute-sanitizer")
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def triton_kernels() -> set[str]:
    """The names of fastvae's Triton kernels (its `@triton.jit` functions): what a report names a kernel by."""
    names = set()
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def racecheck_findings(output: str) -> list[str]:
    """racecheck's findings in `output`: each an `Error:` or `Warning:` line (any case) with the indented
    lines that continue it, the `=========` prefixes dropped and the lines joined by a space."""
    findings: list[str] = []
    open_finding = False
    for raw in output.splitlines():
        if not raw.startswith("========="):
            open_finding = False
            continue
        body = raw.lstrip("=")
        text = body.strip()
        if re.match(r"(error|warning)\b", text, re.IGNORECASE):
            findings.append(text)
            open_finding = True
        elif open_finding and text and body.startswith(" " * 2) and "SUMMARY" not in text:
            findings[-1] += " " + text
        else:
            open_finding = False
    return findings


def in_triton_reduction(finding: str, kernels: set[str]) -> bool:
    """Whether a racecheck finding is one that triton-lang/triton#7264 explains: a race between two
    shared-memory accesses (racecheck's "Race reported between" form) that both lie in one of fastvae's
    Triton kernels and in Triton's own library code (triton/language/: the reduction a kernel's tl.sum or
    tl.max expands into), not in a line of fastvae. Anything else is not."""
    match = RACE.fullmatch(finding)
    if match is None:
        return False
    kernel_a, file_a, kernel_b, file_b = match.groups()
    return {kernel_a, kernel_b} <= kernels and all(TRITON_LIBRARY in f.replace(os.sep, "/") for f in (file_a, file_b))


def sanitizer_verdict(tool: str, run: Run) -> tuple[str, str, list[str]]:
    """A compute-sanitizer run's status (passed, failed, cut or skipped), its line, and the racecheck
    findings it triaged as Triton's own (passed with them). It passes only when bench.sanitize_kernels said
    its cases ran on CUDA; a tool that refuses the device, or a CUDA that does not initialise under it,
    is skipped with the reason."""
    from bench.sanitize_kernels import NO_CUDA, ON_CUDA

    lines = [line.strip("= \t") for line in run.output.splitlines()]
    refused = next((line for line in lines if "device not supported" in line.lower()), None)
    if refused is not None:
        return "skipped", f"{tool}: compute-sanitizer refused the device: {refused}", []
    no_cuda = next((line for line in lines if line.startswith(NO_CUDA)), None)
    if no_cuda is not None:
        return "skipped", f"{tool}: CUDA did not initialise under compute-sanitizer: {no_cuda[len(NO_CUDA):]}", []
    summary = "; ".join(line for line in lines if "SUMMARY" in line) or last_line(run.output)
    if run.cut:
        return "cut", f"{tool}: cut short at the step's deadline after {run.seconds:.0f} s; {summary}", []
    finished = next((line for line in reversed(lines) if ON_CUDA in line), None)
    if finished is None:
        return "failed", f"{tool}: exit status {run.returncode}; the kernels did not all run on CUDA: {summary}", []
    if run.returncode == 0:
        return "passed", f"{tool}: {summary}; {finished}", []
    findings = racecheck_findings(run.output) if tool == "racecheck" else []
    kernels = triton_kernels()
    triaged = [f for f in findings if in_triton_reduction(f, kernels)]
    if run.returncode == SANITIZER_ERROR_EXIT and findings and triaged == findings and " 0 not finite" in finished:
        return "passed", (f"{tool}: {len(triaged)} findings, all in Triton's own reductions inside fastvae's "
                          f"kernels ({TRITON_RACE_ISSUE}, open): triaged, not a failure, kept in "
                          f"{FILES['sanitizer']}; {finished}"), triaged  # fmt: skip
    untriaged = len(findings) - len(triaged)
    more = f"; {untriaged} of {len(findings)} findings not in Triton's reductions" if untriaged else ""
    return "failed", f"{tool}: exit status {run.returncode}; {summary}{more}", []


def step_sanitizer(kit: Kit, step: Step) -> None:
    sanitizer = None if kit.dry_run else compute_sanitizer()
    sections = []
    if sanitizer is None:
        why = "dry run" if kit.dry_run else \
            "compute-sanitizer not found (on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin)"
        run = kit.python("-m", "bench.sanitize_kernels", *(DRY_DTYPES if kit.dry_run else []))
        sections.append(f"== {step.commands[-1]} (no sanitizer: {why})\n{run.output}")
        settle(step, run, last_line(run.output), "bench.sanitize_kernels")
        if step.status == "passed":
            step.status = "skipped"
            step.line = f"{why}: memcheck and racecheck not run; bench.sanitize_kernels ran without them: {step.line}"
    else:
        env = {**kit.env(), "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # every tensor its own allocation
        verdicts, triaged = [], []
        for tool in SANITIZER_TOOLS:
            argv = [sanitizer, "--tool", tool, "--error-exitcode", str(SANITIZER_ERROR_EXIT), "--report-api-errors",
                    "no", "--print-limit", "100", sys.executable, "-m", "bench.sanitize_kernels",
                    "--require-cuda"]  # fmt: skip
            run = kit.run(argv, env, timeout=kit.remaining() * MEMCHECK_PART if tool == "memcheck" else None)
            status, line, found = sanitizer_verdict(tool, run)
            verdicts.append((status, line))
            triaged += found
            sections.append(f"== {step.commands[-1]} ({status}, {run.seconds:.0f} s)\n{run.output}")
            if status == "skipped":  # the other tool would meet the same device
                break
        statuses = {status for status, _ in verdicts}
        step.status = next(s for s in ("failed", "cut", "skipped", "passed") if s in statuses)
        step.line = " | ".join(line for _, line in verdicts)
        if triaged:
            note = (f"== racecheck findings triaged as Triton's own reductions ({TRITON_RACE_ISSUE}: butterfly "
                    f"shuffles whose threads write slightly different sums to one shared-memory slot), not a "
                    f"failure; each names a fastvae kernel and a line of triton/language/:")  # fmt: skip
            sections.insert(0, "\n".join([note, *triaged]))
    limit = MAX_FILE_BYTES // (4 * len(sections))  # characters: up to 4 bytes each
    (kit.out / FILES[step.name]).write_text("\n\n".join(clip(s, limit) for s in sections) + "\n")


def step_nccl(kit: Kit, step: Step) -> None:
    """bench.gpu_check_nccl's three 1-process torchrun jobs on NCCL (finished, SIGTERM, non-finite)."""
    argv = [sys.executable, "-m", "bench.gpu_check_nccl", "--device", "cuda"]
    if kit.dry_run:
        step.commands.append(kit.shown(argv))
        step.status, step.line = "skipped", ("dry run: NCCL needs CUDA; on a GPU, bench.gpu_check_nccl runs a "
                                             "1-process torchrun job to the end, one stopped by SIGTERM and a "
                                             "non-finite one")  # fmt: skip
        return
    run = kit.run(argv, kit.env(interpret=False))
    settle(step, run, last_line(run.output), "bench.gpu_check_nccl")


def elbo_head(kit: Kit, sizes: tuple[int, int, int], json_path: Path, impls: list[str]) -> Run:
    batch, dim, latent = sizes
    args = ["--batch", str(batch), "--dim", str(dim), "--latent", str(latent), "--impl", *impls]
    dtypes = [*DRY_DTYPES, "--reps", "2"] if kit.dry_run else GPU_DTYPES
    return kit.python("-m", "bench.elbo_head", *args, *dtypes, "--json", str(json_path))


def elbo_results_expected(kit: Kit, impls: list[str]) -> int:
    """Results an ELBO-head run gives: dtypes x 2 distributions x implementations."""
    return (1 if kit.dry_run else 2) * 2 * len(impls)


def step_elbo_head(kit: Kit, step: Step) -> None:
    sizes = HEADLINE[kit.dry_run]
    path = kit.out / FILES[step.name]
    impls = ["eager", "compile", "fused"]
    run = elbo_head(kit, sizes, path, impls)
    results = (read_json(path) or {}).get("results", [])
    line = f"{len(results)} of {elbo_results_expected(kit, impls)} results (B, D, K = {sizes})"
    uncaptured = [f"{r['impl']} {r['case']['dtype']} {r['case']['dist']}" for r in results if r.get("graph_error")]
    if uncaptured:
        line += f"; not capturable in a CUDA graph: {', '.join(uncaptured)} (see elbo_head.json)"
    settle(step, run, line, "bench.elbo_head")


def step_bandwidth(kit: Kit, step: Step) -> None:
    """The fused head at the bandwidth case; its results are added to elbo_head.json."""
    sizes = BANDWIDTH[kit.dry_run]
    scratch = kit.scratch / "bandwidth.json"
    run = elbo_head(kit, sizes, scratch, ["fused"])
    data = read_json(scratch) or {"results": []}
    if data["results"]:
        merged = read_json(kit.out / FILES[step.name]) or {**data, "results": []}
        merged["results"] += data["results"]
        merged["copy_bandwidth_gbs"] = merged.get("copy_bandwidth_gbs") or data.get("copy_bandwidth_gbs")
        (kit.out / FILES[step.name]).write_text(json.dumps(merged, indent=2))
    bandwidth = data.get("copy_bandwidth_gbs")
    achieved = [f"{r['case']['dtype']} {r['case']['dist']} {r['gbs']:,.0f} GB/s ({100 * r['gbs'] / bandwidth:.0f}%)"
                for r in data["results"] if r.get("gbs") and bandwidth]  # fmt: skip
    line = f"{len(data['results'])} of {elbo_results_expected(kit, ['fused'])} results (B, D, K = {sizes})"
    if achieved:
        line += f": {'; '.join(achieved)} of the measured copy bandwidth, {bandwidth:,.0f} GB/s"
    elif data["results"]:
        line += "; not timed (no GPU)"
    settle(step, run, line, "bench.elbo_head")


def step_train_throughput(kit: Kit, step: Step) -> None:
    from bench.train_throughput import ALL_SYSTEMS

    available = [s for s in GRAPH_SYSTEMS if s in ALL_SYSTEMS]
    graphs = [] if kit.dry_run else available  # CUDA graphs need CUDA
    systems = ["baseline", "reference", "fused", *graphs]
    sizes = ["--num-train", "256", "--num-test", "128", "--batch", "64", "128"] if kit.dry_run else \
        ["--num-train", "20000", "--num-test", "5000", "--batch", "128", "1024"]  # a third of sprites: its share
    path = kit.out / FILES[step.name]
    run = kit.python("-m", "bench.train_throughput", *sizes, "--epochs", "2", "--warmup", "1",
                     "--systems", *systems, "--json", str(path))  # fmt: skip
    results = (read_json(path) or {}).get("results", [])
    line = f"{len(results)} of {2 * len(systems)} results ({', '.join(systems)})"
    if not available:
        line += "; whole-step CUDA graphs (fused+graphs): not available in this version of bench.train_throughput"
    elif not graphs:
        line += f"; {', '.join(available)}: not run in the dry run (CUDA graphs need CUDA)"
    settle(step, run, line, "bench.train_throughput")


def step_host_overhead(kit: Kit, step: Step) -> None:
    if importlib.util.find_spec("bench.host_overhead") is None:
        step.status, step.line = "skipped", "bench.host_overhead is not in this version"
        return
    path = kit.out / FILES[step.name]
    run = kit.python("-m", "bench.host_overhead", "--json", str(path), interpret=False)
    results = (read_json(path) or {}).get("results")
    settle(step, run, f"{'no' if results is None else len(results)} results", "bench.host_overhead")


ACTIONS: dict[str, Callable[[Kit, Step], None]] = {
    "environment": step_environment,
    "tests": step_tests,
    "sanitizer": step_sanitizer,
    "nccl": step_nccl,
    "elbo_head": step_elbo_head,
    "bandwidth": step_bandwidth,
    "train_throughput": step_train_throughput,
    "host_overhead": step_host_overhead,
    "suite": step_suite,
}


# ------------------------------------------------------------------------------------------------- summary


def _elbo_rows(data: dict | None, sizes: tuple[int, int, int]) -> dict | None:
    if data is None:
        return None
    rows = [r for r in data["results"] if (r["case"]["B"], r["case"]["D"], r["case"]["K"]) == sizes]
    return {**data, "results": rows} if rows else None


def failure_details(step: dict) -> list[str]:
    """A failed or cut step in summary.md: its commands and the tail of its output."""
    tail = step["log_tail"][-SUMMARY_TAIL_CHARS:].strip() or "(no output)"
    return [f"### {step['name']} ({step['status']})", "", *(f"Command: `{c}`" for c in step["commands"]), "",
            f"The end of its output ({SUMMARY_TAIL_CHARS:,} characters at most; gpu_check.json has "
            f"{LOG_TAIL_CHARS:,}):", "", "```text", tail, "```", ""]  # fmt: skip


def summary_markdown(out: Path, record: dict) -> str:
    """summary.md: the kit's run, its steps, what failed or was cut (commands, output), the tests with the
    first failures' tracebacks, the sanitizers and each benchmark's table."""
    steps = {s["name"]: s for s in record["steps"]}
    title = "fastvae GPU check" + (": dry run on the CPU (tiny sizes; nothing here is a GPU figure)"
                                   if record["dry_run"] else "")  # fmt: skip
    lines = [f"# {title}", "", f"Command: `{record['command']}`", "",
             f"{record['date']}; {record['seconds']:.0f} s of a {record['budget_s']:.0f} s budget (everything "
             f"included); exit status {record['exit_status']}.", ""]  # fmt: skip
    if record["machine"]:
        lines += [f"Machine: {record['machine']}.", ""]
    lines += ["## Steps", "", *report.steps_markdown(record["steps"]), ""]
    not_run = [s for s in record["steps"] if s["status"] in ("skipped", "cut", "failed")]
    if not_run:
        lines += ["Failed, cut short or skipped:", ""]
        lines += [*(f"- **{s['name']}** ({s['status']}): {s['line']}" for s in not_run), ""]
    stopped = [s for s in not_run if s["status"] in ("cut", "failed") and s["commands"]]
    if stopped:
        lines += ["## What failed or was cut short", ""]
        for step in stopped:
            lines += failure_details(step)
    tests = read_json(out / "tests.json") or {}
    for name, heading in (("tests", "Tests: gpu-marked, then the kernels'"), ("suite", "Tests: the rest of the suite")):
        if name in tests:
            lines += [f"## {heading}", "", *report.tests_markdown(tests[name]), ""]
    if "sanitizer" in steps:
        commands = "; ".join(f"`{c}`" for c in steps["sanitizer"]["commands"])
        lines += ["## compute-sanitizer", "", f"Commands: {commands}", "", steps["sanitizer"]["line"], "",
                  "Their output is in sanitizer.txt.", ""]  # fmt: skip
    elbo = read_json(out / "elbo_head.json")
    benchmarks = [
        ("elbo_head", "ELBO head: the headline case", _elbo_rows(elbo, HEADLINE[record["dry_run"]]), ""),
        ("bandwidth", "ELBO head: the bandwidth case", _elbo_rows(elbo, BANDWIDTH[record["dry_run"]]),
         "Its results are added to elbo_head.json."),
        ("train_throughput", "Training throughput", read_json(out / "train_throughput.json"), ""),
        ("host_overhead", "Host overhead", read_json(out / "host_overhead.json"), ""),
    ]
    for name, heading, data, note in benchmarks:
        if name in steps and steps[name]["commands"]:
            lines += report.section(heading, steps[name]["commands"][-1], data, note)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the kit


def check_files(out: Path) -> list[str]:
    """What breaks the limits on what comes back: more than 8 entries, one over 16 MiB, a folder."""
    entries = sorted(out.iterdir())
    problems = [f"{len(entries)} entries in {out}, more than {MAX_FILES}"] if len(entries) > MAX_FILES else []
    for entry in entries:
        if not entry.is_file():
            problems.append(f"{entry.name} is not a file")
        elif entry.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{entry.name} is {entry.stat().st_size / 2**20:.1f} MiB, over 16 MiB")
    return problems


def exit_status(steps: list[Step]) -> int:
    statuses = {s.status for s in steps}
    if statuses & {"failed", "cut", "pending"}:
        return 1
    return 3 if "skipped" in statuses else 0


def step_names(text: str) -> list[str]:
    """--steps' value: NAME[,NAME...], each a step of the kit."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in STEPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"no step {', '.join(unknown) or repr(text)}; the steps: {', '.join(STEPS)}")
    return names


def shares_epilog() -> str:
    """--help's last lines: the steps' shares of the default budget."""
    default = shares(DEFAULT_BUDGET_S, DEFAULT_STEPS)
    listed = ", ".join(f"{name} {default[name]:.0f} s" for name in DEFAULT_STEPS)
    return (f"Shares of the default {DEFAULT_BUDGET_S:.0f} s budget ({RESERVE_S:.0f} s of it the reserve): {listed}. "
            f"With --steps, the environment keeps its {ENVIRONMENT_S:.0f} s and the other steps chosen share the "
            f"rest in these proportions (suite's weight: {SHARES['suite']}).")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__, epilog=shares_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--out", required=True, help="an empty or new folder for the files (at most 8)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole run, everything included (default {DEFAULT_BUDGET_S:.0f}: "
                        f"5 minutes); more than {RESERVE_S + ENVIRONMENT_S:.0f}")  # fmt: skip
    p.add_argument("--steps", nargs="+", type=step_names, metavar="NAME[,NAME...]",
                   help=f"only these steps, run in the kit's order after the environment, which always runs "
                        f"(default: {','.join(DEFAULT_STEPS)}; also: suite)")  # fmt: skip
    p.add_argument("--inject", nargs="+", default=[], metavar="STEP=fail|hang", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = DEFAULT_STEPS if args.steps is None else {name for names in args.steps for name in names}
    args.steps = [name for name in STEPS if name in chosen or name == "environment"]
    for item in args.inject:
        name, _, mode = item.partition("=")
        if name not in STEPS or mode not in ("fail", "hang"):
            p.error(f"--inject takes STEP=fail or STEP=hang, got {item!r}")
    if args.budget <= RESERVE_S + ENVIRONMENT_S:
        p.error(f"--budget must be more than {RESERVE_S + ENVIRONMENT_S:.0f} seconds (the reserve and the "
                f"environment's share), got {args.budget:g}")  # fmt: skip
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        p.error(f"--out {out} is not an empty folder: the kit writes its files into an empty or new one")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kit = Kit(args)
    kit.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "bench.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    mode = "a dry run on the CPU" if args.dry_run else "on the GPU"
    planned = ", ".join(f"{s.name} {s.share_s:.0f} s" for s in kit.steps)
    print(f"bench.gpu_check: a {args.budget:.0f} s budget, everything included ({RESERVE_S:.0f} s kept to stop "
          f"the last step and write the files), {mode}; files into {kit.out}; steps: {planned}",
          flush=True)  # fmt: skip
    for step in kit.steps:
        if kit.environment is not None and not kit.dry_run and not kit.environment.get("cuda_devices"):
            step.status, step.line = "skipped", "no CUDA device (see the environment step)"
            print(f"[{step.name}] skipped: {step.line}", flush=True)
        else:
            kit.execute(step, ACTIONS[step.name])
    record = {
        "command": command,
        "dry_run": args.dry_run,
        "budget_s": args.budget,
        "reserve_s": RESERVE_S,
        "seconds": round(time.monotonic() - kit.started, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_line(kit.environment) if kit.environment else None,
        "exit_status": exit_status(kit.steps),
        "steps": [asdict(s) for s in kit.steps],
    }
    record_path, summary_path = (kit.out / name for name in KIT_FILES)
    record_path.write_text(json.dumps(record, indent=2))
    summary_path.write_text(summary_markdown(kit.out, record))
    shutil.rmtree(kit.scratch, ignore_errors=True)
    problems = check_files(kit.out)
    for problem in problems:
        print(f"bench.gpu_check: {problem}", flush=True)
    status = 1 if problems else record["exit_status"]
    print(f"bench.gpu_check: exit status {status}; the summary is {summary_path}", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
