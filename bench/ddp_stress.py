"""Stress the shutdown of torchrun jobs: how many of N finished 2-process jobs exit cleanly, and whether
interrupted ones keep their exit codes.

Cases, each a `torchrun --nproc_per_node=2` job on the CPU (gloo) of the run that tests/test_distributed.py
trains (256 sprites, 2 epochs):
  finished    N times: the job must exit 0, with no abort at exit (`terminate called ...`, SIGABRT)
  SIGINT      once: Ctrl-C at a terminal, i.e. SIGINT to the job's whole process group, mid-training
  SIGTERM     once: a scheduler's SIGTERM to the torchrun process alone, which passes it on to the ranks
An interrupted job must write its checkpoint and print the resume command, and every rank must exit with
130 (SIGINT) or 143 (SIGTERM). torchrun itself reports a job that was signalled as failed, so the ranks'
own exit codes are recorded by running each rank through this module's `--worker` mode: it calls
`fastvae.train.main`, what `python -m fastvae.train` runs, and writes the code it returns to a file;
the process's real exit status (an abort at exit included) is what torchrun reports.

Usage:  python -m bench.ddp_stress [--runs 50] [--json PATH]
It prints a line per job and a summary, and exits 1 if any job did not end cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastvae import train

RUN = [
    "--dataset", "sprites", "--likelihood", "bernoulli", "--num-train", "256", "--num-test", "64",
    "--batch-size", "32", "--epochs", "2", "--hidden", "32", "--latent-dim", "4", "--log-every", "4",
    "--device", "cpu",
]  # fmt: skip

def _with(args: list[str], **values: str) -> list[str]:
    """`args` with the values of some options replaced: _with(RUN, epochs="20")."""
    out = list(args)
    for name, value in values.items():
        out[out.index("--" + name.replace("_", "-")) + 1] = value
    return out


LONG_RUN = _with(RUN, num_train="2048", epochs="20")  # 64 steps per epoch: interrupted mid-training
ABORT_MARKS = ("terminate called", "Fatal Python error", "SIGABRT", "exitcode: -6", "exitcode  : -6")
TIMEOUT_S = 180


@dataclass
class Job:
    case: str
    clean: bool
    returncode: int | None
    rank_codes: list[int | None]
    seconds: float
    problem: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], codes_dir: Path) -> subprocess.Popen:
    """A 2-process job whose ranks run `python -m bench.ddp_stress --worker CODES_DIR ARGS`."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
        "-m", "bench.ddp_stress", "--worker", str(codes_dir), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )


def _rank_codes(codes_dir: Path) -> list[int | None]:
    codes = []
    for rank in (0, 1):
        path = codes_dir / f"rank{rank}.exit"
        codes.append(int(path.read_text()) if path.exists() else None)
    return codes


def _wait_for_training(proc: subprocess.Popen, metrics: Path, rows: int = 3) -> bool:
    """Until metrics.jsonl has `rows` rows (training is under way); False if the job ended or stalled first."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return True
        time.sleep(0.05)
    return False


def run_job(case: str, work: Path) -> Job:
    """One job of `case` ("finished", "SIGINT" or "SIGTERM") in the empty directory `work`."""
    codes_dir, out = work / "codes", work / "run"
    codes_dir.mkdir()
    start = time.perf_counter()
    proc = _torchrun([*(RUN if case == "finished" else LONG_RUN), "--out", str(out)], codes_dir)
    expected = 0
    if case != "finished":
        if not _wait_for_training(proc, out / "metrics.jsonl"):
            proc.kill()
            output = proc.communicate()[0]
            return Job(case, False, proc.returncode, _rank_codes(codes_dir), time.perf_counter() - start,
                       "training did not start: " + output[-300:])  # fmt: skip
        if case == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
        else:
            proc.send_signal(signal.SIGTERM)  # what a scheduler does to the job's main process
        expected = train.SIGNAL_EXIT[signal.Signals[case]]
    try:
        output = proc.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
    seconds, codes = time.perf_counter() - start, _rank_codes(codes_dir)
    problems = [f"output says {mark!r}" for mark in ABORT_MARKS if mark in output]
    if codes != [expected, expected]:
        problems.append(f"rank exit codes {codes}, expected {expected}")
    if case == "finished" and proc.returncode != 0:
        problems.append(f"torchrun exited {proc.returncode}")
    if case != "finished":
        resume = "Resume with: torchrun [the same torchrun options] -m fastvae.train --resume"
        if f"Interrupted by {case}" not in output or resume not in output:
            problems.append("no interruption message and resume command")
        if not (out / "checkpoint.pt").exists():
            problems.append("no checkpoint")
    return Job(case, not problems, proc.returncode, codes, seconds, "; ".join(problems))


def worker(codes_dir: str, argv: list[str]) -> int:
    """One rank: `python -m fastvae.train ARGV`, recording the code it exits with."""
    code = train.main(argv)
    Path(codes_dir, f"rank{os.environ['RANK']}.exit").write_text(str(code))
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[2:])
    parser = argparse.ArgumentParser(prog="python -m bench.ddp_stress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="finished jobs to run (default 50)")
    parser.add_argument("--json", type=Path, help="also write the jobs as JSON to this path")
    args = parser.parse_args(argv)
    jobs = []
    with tempfile.TemporaryDirectory(prefix="ddp_stress-") as tmp:
        cases = ["finished"] * args.runs + ["SIGINT", "SIGTERM"]
        for i, case in enumerate(cases):
            work = Path(tmp, str(i))
            work.mkdir()
            job = run_job(case, work)
            jobs.append(job)
            status = "clean" if job.clean else f"NOT CLEAN: {job.problem}"
            print(f"[{i + 1}/{len(cases)}] {case}: {status} (rank exit codes {job.rank_codes}, {job.seconds:.1f} s)",
                  flush=True)  # fmt: skip
    for case in ("finished", "SIGINT", "SIGTERM"):
        of_case = [job for job in jobs if job.case == case]
        print(f"{case}: {sum(job.clean for job in of_case)} of {len(of_case)} exited cleanly")
    return write_jobs(jobs, args.json, all(job.clean for job in jobs))


def write_jobs(jobs: list[Any], path: Path | None, ok: bool) -> int:
    """Write the jobs (dataclasses) as JSON to `path` (if given); the exit code: 0 if `ok`, else 1."""
    if path is not None:
        path.write_text(json.dumps([asdict(job) for job in jobs], indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
