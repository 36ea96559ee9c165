"""Elastic restarts: kill one worker of a 2-process torchrun job at random moments and check that the job,
started with `--max-restarts 2 --auto-resume`, still ends exactly as an uninterrupted one.

Each run is a `torchrun --nproc_per_node=2 --max-restarts 2` job on the CPU (gloo) of bench.ddp_stress's
long run (2048 sprites, 20 epochs) with `--checkpoint-every 16`. Once metrics.jsonl has a random number
of rows, one of the two workers (chosen at random) gets SIGKILL; torchrun then restarts both, and
`--auto-resume` continues the run from its last checkpoint. Kills come up to `--kills` times per job (the
restart budget). A job passes when torchrun exits 0 and its metrics.jsonl has the rows of an uninterrupted
job (run once first), timing columns (`wall_time_s`, `samples_per_s`) aside.

Usage:  python -m bench.fault_stress [--runs 10] [--kills 2] [--json PATH]
It prints a line per job and a summary, and exits 1 if any job did not pass.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.ddp_stress import LONG_RUN, TIMEOUT_S, _free_port, _with, write_jobs

RUN = [*_with(LONG_RUN, epochs="4"), "--checkpoint-every", "16", "--no-pictures"]  # 256 steps, 64 rows
TIMING = ("wall_time_s", "samples_per_s")


@dataclass
class Job:
    kills: int
    passed: bool
    returncode: int | None
    seconds: float
    problem: str = ""


def _torchrun(out: Path, restarts: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
        f"--max-restarts={restarts}", "-m", "fastvae.train", "--auto-resume", *RUN, "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )


def _workers(pid: int) -> list[int]:
    """The PIDs of the processes that torchrun (`pid`) started (Linux: /proc's children lists)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        children += [int(p) for p in text.split()]
    return sorted(children)


def _rows(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows without their timing columns."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _wait_rows(proc: subprocess.Popen, out: Path, rows: int) -> bool:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_rows(out)) >= rows:
            return True
        time.sleep(0.05)
    return False


def _first_error(output: str) -> str:
    """The first `error:` line or exception line (`SomethingError: ...`) of a job's output, else its end."""
    found = re.search(r"^(error: .*|[\w.]*(Error|Exception): .*)$", output, re.MULTILINE)
    return found.group(0)[:300] if found else repr(output[-300:])


def run_job(work: Path, reference: list[dict[str, Any]] | None, kills: int, rng: random.Random) -> Job:
    """One job in the empty directory `work`, with `kills` SIGKILLs of a random worker at random rows."""
    out, start = work / "run", time.perf_counter()
    proc = _torchrun(out, restarts=kills)
    done = 0
    for at in sorted(rng.sample(range(2, 60), kills)):
        if not _wait_rows(proc, out, at):
            break
        workers = _workers(proc.pid)
        if workers:
            os.kill(rng.choice(workers), signal.SIGKILL)
            done += 1
    try:
        output = proc.communicate(timeout=TIMEOUT_S * (kills + 1))[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
    problems = []
    if proc.returncode != 0:
        problems.append(f"torchrun exited {proc.returncode}: {_first_error(output)}")
    if reference is not None and _rows(out) != reference:
        problems.append(f"metrics rows differ from the uninterrupted job's ({len(_rows(out))} vs {len(reference)})")
    return Job(done, not problems, proc.returncode, time.perf_counter() - start, "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fault_stress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="interrupted jobs to run (default 10)")
    parser.add_argument("--kills", type=int, default=2, help="workers killed per job, at most --max-restarts (2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and victims")
    parser.add_argument("--json", type=Path, help="also write the jobs as JSON to this path")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="fault_stress-") as tmp:
        (Path(tmp) / "reference").mkdir()
        first = run_job(Path(tmp, "reference"), None, 0, rng)
        if not first.passed:
            print(f"the uninterrupted job failed: {first.problem}")
            return 1
        reference = _rows(Path(tmp, "reference", "run"))
        jobs = []
        for i in range(args.runs):
            work = Path(tmp, str(i))
            work.mkdir()
            job = run_job(work, reference, args.kills, rng)
            jobs.append(job)
            status = "passed" if job.passed else f"FAILED: {job.problem}"
            print(f"[{i + 1}/{args.runs}] {job.kills} workers killed: {status} ({job.seconds:.1f} s)", flush=True)
    print(f"{sum(job.passed for job in jobs)} of {len(jobs)} jobs ended as the uninterrupted one")
    return write_jobs(jobs, args.json, all(job.passed for job in jobs))


if __name__ == "__main__":
    sys.exit(main())
