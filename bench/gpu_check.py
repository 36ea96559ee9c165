"""Verify fastvae on a GPU in one sitting: tests, sanitizers and benchmarks, at most 8 files, about 8 minutes.

    python -m bench.gpu_check --out DIR             # on a CUDA machine (an H100: about 8 minutes)
    python -m bench.gpu_check --dry-run --out DIR   # the same steps on the CPU at tiny sizes (minutes)

Each step is a subprocess with a deadline: its share of --budget, plus whatever the steps before it left
unused. A step that reaches its deadline is stopped (its process group: SIGTERM, then SIGKILL) and recorded
as cut short; a failing step is recorded; either way the kit goes on to the next. Steps, in order:

  environment       GPU, driver, CUDA, torch, triton, commit; the measured device copy bandwidth
  tests             the whole test suite (tests/) with TRITON_INTERPRET unset, every outcome recorded as it
                    happens; the failures with their first lines
  sanitizer         compute-sanitizer memcheck and racecheck over bench.sanitize_kernels (every kernel,
                    forward and backward, at tail and unaligned shapes); skipped without compute-sanitizer
  elbo_head         the headline case B=4096, D=784, K=32: fp32 and bf16, both distributions, eager,
                    compile and fused; as called and replayed from a CUDA graph; peak memory; launches
  bandwidth         the fused head at B=65536, D=12288, K=32: GB/s against the measured copy bandwidth
  train_throughput  the canonical-example baseline, fastvae reference and fused (and whole-step CUDA graphs
                    where bench.train_throughput offers them) at batch 128 and 1024, with test loss
  host_overhead     `python -m bench.host_overhead --json PATH` (real launches on CUDA), if present

Files written into DIR (8 at most, none over 16 MiB): environment.json, tests.json, sanitizer.txt,
elbo_head.json (the headline and bandwidth cases), train_throughput.json, host_overhead.json, gpu_check.json
(every step: status, one line, seconds, budget, commands, its output's tail) and summary.md (the tables in
the form of docs/benchmarks.md, each under its device, date, commit and command).

--dry-run hides any GPU (CUDA_VISIBLE_DEVICES=""), runs the kernels under Triton's interpreter where a step
needs them, shrinks every size, and runs three tests instead of the suite.

Exit status: 0 every step ran and passed; 1 a step failed or was cut short; 2 a usage error (e.g. --out not
empty); 3 nothing failed but a step was skipped (e.g. compute-sanitizer missing, as on every dry run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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
KILL_GRACE_S = 5.0
# Each step's share of the budget, in seconds of the default 470 (the rest of the 8 minutes is kept for
# stopping a step and writing the summary); scaled to --budget and to the steps chosen with --steps.
SHARES = {
    "environment": 20,
    "tests": 150,
    "sanitizer": 80,
    "elbo_head": 110,
    "bandwidth": 35,
    "train_throughput": 60,
    "host_overhead": 15,
}
DEFAULT_BUDGET_S = 470.0
# Sizes of the ELBO-head runs (batch, dim, latent): a GPU run's, and a dry run's.
HEADLINE = {False: (4096, 784, 32), True: (64, 64, 8)}
BANDWIDTH = {False: (65536, 12288, 32), True: (256, 96, 8)}
# The suite on a GPU run: the kernels' tests first (they are what a GPU changes), then the others; not the kit's
# own test, which runs it as a dry run on the CPU. A dry run's tests: two kernel tests, and a GPU test (skipped).
KERNEL_TESTS = ["test_latent.py", "test_likelihood.py", "test_extreme_inputs.py", "test_compile.py",
                "test_iwae.py", "test_model.py"]  # fmt: skip
KIT_TEST = "test_gpu_check.py"
DRY_TESTS = ["tests/test_latent.py", "-k", "test_public_shapes_and_reference_impl or "
             "test_kl_matches_torch_distributions or test_cuda_graph_replay_draws_fresh_noise"]  # fmt: skip
DRY_DTYPES = ["--dtype", "fp32"]  # a dry run's ELBO head and sanitizer cases: fp32 only
GRAPH_SYSTEMS = ("reference+graphs", "fused+graphs")  # whole-step CUDA graphs (--cuda-graphs)
SANITIZER_TOOLS = ("memcheck", "racecheck")
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


class Kit:
    """Runs the steps, each against its deadline, and keeps their records."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.out = Path(args.out).resolve()  # the steps run in the repository root
        self.dry_run = args.dry_run
        self.inject = dict(item.split("=", 1) for item in args.inject)
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.started = time.monotonic()
        scale = args.budget / sum(SHARES[name] for name in args.steps)
        self.deadlines: dict[str, float] = {}
        cumulative = 0.0
        for name in args.steps:  # the end of the step's share, counted from the kit's start
            cumulative += SHARES[name] * scale
            self.deadlines[name] = cumulative
        self.steps = [Step(name, share_s=round(SHARES[name] * scale, 1)) for name in args.steps]
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
    if run.cut:
        step.status, step.line = "cut", f"{program} cut short at the step's deadline, after {run.seconds:.0f} s; {line}"
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
    path = kit.out / "environment.json"
    run = kit.python("-m", "bench.environment", "--json", str(path), interpret=False)
    kit.environment = env = read_json(path)
    settle(step, run, machine_line(env) if env else "", "bench.environment")
    if step.status == "passed" and env is None:
        step.status, step.line = "failed", "bench.environment wrote no environment.json"
    elif env is not None and not kit.dry_run and not env.get("cuda_devices"):
        step.status = "failed"
        step.line = f"no CUDA device here ({env['device']}): a GPU check needs one; --dry-run runs the kit on the CPU"


def summarize_tests(jsonl: Path, command: str, run: Run) -> dict:
    """tests.json from the plugin's lines: counts, failures with their first lines, skips by reason."""
    collected, records = None, []
    for line in jsonl.read_text().splitlines() if jsonl.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut off by the deadline
        if "collected" in record:
            collected = record["collected"]
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
        "collected": collected,
        "ran": ran,
        "not_reached": None if collected is None else max(0, collected - ran),
        "counts": counts,
        "failures": [{k: r.get(k, "") for k in ("test", "when", "line", "report")} for r in records
                     if r["outcome"] in ("failed", "error", "xpassed")],  # fmt: skip
        "skips": [{"reason": reason, "count": n} for reason, n in sorted(skips.items(), key=lambda kv: -kv[1])],
        "slowest": sorted(({"test": r["test"], "seconds": r["seconds"]} for r in records),
                          key=lambda r: -r["seconds"])[:10],  # fmt: skip
    }


def step_tests(kit: Kit, step: Step) -> None:
    jsonl = kit.scratch / "outcomes.jsonl"
    files = sorted(path.name for path in (ROOT / "tests").glob("test_*.py"))
    ordered = [*(f for f in KERNEL_TESTS if f in files), *(f for f in files if f not in KERNEL_TESTS + [KIT_TEST])]
    selection = DRY_TESTS if kit.dry_run else [f"tests/{f}" for f in ordered]
    run = kit.python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.pytest_outcomes",
                     "--outcomes-jsonl", str(jsonl), "--continue-on-collection-errors", *selection)  # fmt: skip
    tests = summarize_tests(jsonl, step.commands[-1], run)
    (kit.out / "tests.json").write_text(json.dumps(tests, indent=2))
    line = report.tests_line(tests)
    if tests["failures"]:
        first = tests["failures"][0]
        line += f"; first failure: {first['test']}: {first['line']}"
    settle(step, run, line, "pytest")
    if step.status == "failed" and tests["ran"]:  # the counts say more than pytest's last line
        step.line = f"{step.line.split(':')[0]}; {line}"


def compute_sanitizer() -> str | None:
    """compute-sanitizer on PATH, or in the CUDA toolkit's bin folder; None if not found."""
    for candidate in (shutil.which("compute-sanitizer"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and not candidate.endswith("compute-sanitizer"):
            candidate = str(Path(candidate) / "bin" / "compute-sanitizer")
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


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
        results = []
        for tool in SANITIZER_TOOLS:
            argv = [sanitizer, "--tool", tool, "--error-exitcode", "99", "--report-api-errors", "no",
                    "--print-limit", "100", sys.executable, "-m", "bench.sanitize_kernels"]  # fmt: skip
            run = kit.run(argv, env, timeout=kit.remaining() * MEMCHECK_PART if tool == "memcheck" else None)
            found = [line.strip("= \t") for line in run.output.splitlines() if "SUMMARY" in line]
            verdict = "cut short" if run.cut else f"exit status {run.returncode}"
            results.append((run, f"{tool}: {verdict}; {'; '.join(found) or last_line(run.output)}"))
            sections.append(f"== {step.commands[-1]} ({verdict}, {run.seconds:.0f} s)\n{run.output}")
        runs = [run for run, _ in results]
        step.status = ("failed" if any(r.returncode not in (0, None) for r in runs)
                       else "cut" if any(r.cut for r in runs) else "passed")  # fmt: skip
        step.line = " | ".join(line for _, line in results)
    limit = MAX_FILE_BYTES // (4 * len(sections))  # characters: up to 4 bytes each
    (kit.out / "sanitizer.txt").write_text("\n\n".join(clip(s, limit) for s in sections) + "\n")


def elbo_head(kit: Kit, sizes: tuple[int, int, int], json_path: Path, impls: list[str]) -> Run:
    batch, dim, latent = sizes
    args = ["--batch", str(batch), "--dim", str(dim), "--latent", str(latent), "--impl", *impls]
    return kit.python("-m", "bench.elbo_head", *args, *([*DRY_DTYPES, "--reps", "2"] if kit.dry_run else []),
                      "--json", str(json_path))  # fmt: skip


def elbo_results_expected(kit: Kit, impls: list[str]) -> int:
    """Results an ELBO-head run gives: dtypes x 2 distributions x implementations."""
    return (1 if kit.dry_run else 2) * 2 * len(impls)


def step_elbo_head(kit: Kit, step: Step) -> None:
    sizes = HEADLINE[kit.dry_run]
    path = kit.out / "elbo_head.json"
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
        merged = read_json(kit.out / "elbo_head.json") or {**data, "results": []}
        merged["results"] += data["results"]
        merged["copy_bandwidth_gbs"] = merged.get("copy_bandwidth_gbs") or data.get("copy_bandwidth_gbs")
        (kit.out / "elbo_head.json").write_text(json.dumps(merged, indent=2))
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
        ["--batch", "128", "1024"]
    path = kit.out / "train_throughput.json"
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
    path = kit.out / "host_overhead.json"
    run = kit.python("-m", "bench.host_overhead", "--json", str(path), interpret=False)
    results = (read_json(path) or {}).get("results")
    settle(step, run, f"{'no' if results is None else len(results)} results", "bench.host_overhead")


ACTIONS: dict[str, Callable[[Kit, Step], None]] = {
    "environment": step_environment,
    "tests": step_tests,
    "sanitizer": step_sanitizer,
    "elbo_head": step_elbo_head,
    "bandwidth": step_bandwidth,
    "train_throughput": step_train_throughput,
    "host_overhead": step_host_overhead,
}


# ------------------------------------------------------------------------------------------------- summary


def _elbo_rows(data: dict | None, sizes: tuple[int, int, int]) -> dict | None:
    if data is None:
        return None
    rows = [r for r in data["results"] if (r["case"]["B"], r["case"]["D"], r["case"]["K"]) == sizes]
    return {**data, "results": rows} if rows else None


def summary_markdown(out: Path, record: dict) -> str:
    """summary.md: the kit's run, its steps, the tests, the sanitizers and each benchmark's table."""
    steps = {s["name"]: s for s in record["steps"]}
    env = read_json(out / "environment.json")
    title = "fastvae GPU check" + (": dry run on the CPU (tiny sizes; nothing here is a GPU figure)"
                                   if record["dry_run"] else "")  # fmt: skip
    lines = [f"# {title}", "", f"Command: `{record['command']}`", "",
             f"{record['date']}; {record['seconds']:.0f} s of a {record['budget_s']:.0f} s budget; "
             f"exit status {record['exit_status']}.", ""]  # fmt: skip
    if env:
        lines += [f"Machine: {machine_line(env)}.", ""]
    lines += ["## Steps", "", *report.steps_markdown(record["steps"]), ""]
    not_run = [s for s in record["steps"] if s["status"] in ("skipped", "cut", "failed")]
    if not_run:
        lines += ["Failed, cut short or skipped:", ""]
        lines += [*(f"- **{s['name']}** ({s['status']}): {s['line']}" for s in not_run), ""]
    tests = read_json(out / "tests.json")
    if tests:
        lines += ["## Tests", "", *report.tests_markdown(tests), ""]
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="an empty or new folder for the files (at most 8)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for all the steps together (default {DEFAULT_BUDGET_S:.0f})")  # fmt: skip
    p.add_argument("--steps", nargs="+", choices=list(SHARES), default=list(SHARES),
                   help="only these steps (run in the kit's order), their shares scaled to the budget")  # fmt: skip
    p.add_argument("--inject", nargs="+", default=[], metavar="STEP=fail|hang", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = [name for name in SHARES if name in args.steps]
    for item in args.inject:
        name, _, mode = item.partition("=")
        if name not in SHARES or mode not in ("fail", "hang"):
            p.error(f"--inject takes STEP=fail or STEP=hang, got {item!r}")
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget:g}")
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
    print(f"bench.gpu_check: {len(kit.steps)} steps in {args.budget:.0f} s, {mode}; files into {kit.out}", flush=True)
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
        "seconds": round(time.monotonic() - kit.started, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "exit_status": exit_status(kit.steps),
        "steps": [asdict(s) for s in kit.steps],
    }
    (kit.out / "gpu_check.json").write_text(json.dumps(record, indent=2))
    (kit.out / "summary.md").write_text(summary_markdown(kit.out, record))
    shutil.rmtree(kit.scratch, ignore_errors=True)
    problems = check_files(kit.out)
    for problem in problems:
        print(f"bench.gpu_check: {problem}", flush=True)
    status = 1 if problems else record["exit_status"]
    print(f"bench.gpu_check: exit status {status}; the summary is {kit.out / 'summary.md'}", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
