"""What one GPU can run of NCCL: three 1-process torchrun jobs of `python -m fastvae.train`, at once, and
how each ends. `python -m bench.gpu_check` runs it as its nccl step.

    python -m bench.gpu_check_nccl                  # on a CUDA machine: NCCL, about 15 s
    python -m bench.gpu_check_nccl --device cpu     # the same jobs with gloo

Under torchrun a process joins a process group even alone (fastvae/distributed.py), so these jobs take
the paths of N ranks: the rendezvous, the collectives of every step's statistics, the ranks' agreement on a
signal, and the shutdown. Each is `torchrun --nproc_per_node=1 -m bench.ddp_stress --worker ...` (its
rank's own exit code recorded) on bench.ddp_stress's run (256 sprites, 2 epochs, batch 32) with
`--no-pictures`:
  finished   to the end: the rank exits 0 (a barrier, then destroy_process_group), and so does torchrun
  SIGTERM    bench.ddp_stress's long run, stopped by a scheduler's SIGTERM to torchrun once 3 rows of
             metrics are written: the rank writes its checkpoint, prints `Resume with: torchrun [the same
             torchrun options] ...` and exits 143
  nonfinite  with --lr 1e6: the rank stops with the diagnosis (`error: training diverged at step ...`),
             exit code 3
The stopped and the diverged rank leave as a failed rank does, without a barrier: on NCCL an abort of the
communicators. Every job must end without an abort at exit (bench.ddp_stress.ABORT_MARKS); on CUDA, with
NCCL_DEBUG=INFO, each job's output must show its NCCL communicator set up (`Init COMPLETE`), so that a run
that never formed an NCCL group cannot pass.

It prints a line per job (and the end of a failed job's output), then a summary line; exit status 0 when
every job ended as expected, 1 otherwise, 2 for --device cuda without a CUDA device.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.ddp_stress import ABORT_MARKS, LONG_RUN, RUN, TIMEOUT_S, _free_port, _wait_for_training, _with
from fastvae import train

CASES = ("finished", "SIGTERM", "nonfinite")
EXPECTED = {"finished": 0, "SIGTERM": train.SIGNAL_EXIT[signal.SIGTERM], "nonfinite": train.EXIT_NONFINITE}
NCCL_READY = "Init COMPLETE"  # NCCL_DEBUG=INFO's line once a communicator is set up
RESUME = "Resume with: torchrun [the same torchrun options] -m fastvae.train --resume"
DIVERGED = "error: training diverged at step "
TAIL_LINES = 30  # of a failed job's output, printed


@dataclass
class Job:
    """One job's end: torchrun's exit status (None: killed at the timeout), its rank's and the problems."""

    case: str
    returncode: int | None
    rank_code: int | None
    seconds: float
    problems: list[str]


def job_args(case: str, device: str) -> list[str]:
    """fastvae.train's options for `case` on `device` (without --out)."""
    args = [*_with(LONG_RUN if case == "SIGTERM" else RUN, device=device), "--no-pictures"]
    return [*args, "--lr", "1e6"] if case == "nonfinite" else args


def job_command(case: str, device: str, codes_dir: Path, out: Path, port: int) -> list[str]:
    """The 1-process torchrun job of `case`, its rank run through bench.ddp_stress's --worker mode."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={port}",
            "-m", "bench.ddp_stress", "--worker", str(codes_dir), *job_args(case, device),
            "--out", str(out)]  # fmt: skip


def judge(case: str, device: str, returncode: int | None, rank_code: int | None, output: str, out: Path) -> list[str]:
    """What is wrong with a finished job of `case`: none when it ended as the module's docstring says."""
    problems = [f"output says {mark!r}" for mark in ABORT_MARKS if mark in output]
    if returncode is None:
        problems.append(f"did not end within {TIMEOUT_S} s")
    if rank_code != EXPECTED[case]:
        problems.append(f"rank exit code {rank_code}, expected {EXPECTED[case]}")
    if case == "finished" and returncode not in (0, None):
        problems.append(f"torchrun exited {returncode}")
    if case == "SIGTERM":
        if "Interrupted by SIGTERM" not in output or RESUME not in output:
            problems.append("no interruption message and torchrun resume command")
        if not (out / "checkpoint.pt").exists():
            problems.append("no checkpoint")
    if case == "nonfinite" and DIVERGED not in output:
        problems.append("no diagnosis of the non-finite step")
    if device == "cuda" and NCCL_READY not in output:
        problems.append(f"no NCCL communicator was set up (NCCL_DEBUG=INFO printed no {NCCL_READY!r})")
    return problems


def run_jobs(device: str, work: Path) -> list[Job]:
    """The three jobs at once in the empty folder `work`; SIGTERM to its job's torchrun once it trains."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"NCCL_DEBUG": "INFO"} if device == "cuda" else {})}
    started, procs, logs = time.monotonic(), {}, {}
    for case in CASES:
        (work / case).mkdir()
        logs[case] = work / case / "output.log"
        command = job_command(case, device, work / case, work / case / "run", _free_port())
        with open(logs[case], "wb") as log:
            procs[case] = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           env=env)  # fmt: skip
    if _wait_for_training(procs["SIGTERM"], work / "SIGTERM" / "run" / "metrics.jsonl"):
        procs["SIGTERM"].send_signal(signal.SIGTERM)  # what a scheduler does to the job's main process
    jobs = []
    for case, proc in procs.items():
        try:
            returncode: int | None = proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = None
        code_file = work / case / "rank0.exit"
        rank_code = int(code_file.read_text()) if code_file.exists() else None
        output = logs[case].read_text(errors="replace")
        problems = judge(case, device, returncode, rank_code, output, work / case / "run")
        jobs.append(Job(case, returncode, rank_code, time.monotonic() - started, problems))
        if problems:
            tail = "\n".join(output.splitlines()[-TAIL_LINES:])
            print(f"--- the end of the {case} job's output:\n{tail}\n---", flush=True)
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check_nccl", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda: NCCL (default); cpu: gloo")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench.gpu_check_nccl: no CUDA device here: NCCL needs one; --device cpu runs the jobs with gloo")
            return 2
    backend = "NCCL" if args.device == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="gpu_check_nccl-") as tmp:
        jobs = run_jobs(args.device, Path(tmp))
    for job in jobs:
        verdict = "as expected" if not job.problems else "FAILED: " + "; ".join(job.problems)
        print(f"{job.case}: {verdict} (rank exit code {job.rank_code}, torchrun {job.returncode}, "
              f"{job.seconds:.0f} s)", flush=True)  # fmt: skip
    good = sum(not job.problems for job in jobs)
    codes = ", ".join(f"{job.case} {job.rank_code}" for job in jobs)
    print(f"{good} of {len(jobs)} 1-process {backend} jobs ended as expected: {codes} (the ranks' exit codes)")
    return 0 if good == len(jobs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
