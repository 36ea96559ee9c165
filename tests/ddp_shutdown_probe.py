"""Started by `test_distributed.py` under torchrun: run something in a process group, then report this
rank's exit code and the gloo threads still alive (none, if the group has ended).

- `ddp_shutdown_probe.py train ARGS`: `python -m fastvae.train ARGS`.
- `ddp_shutdown_probe.py wrap`: a DDP-wrapped module in `DistributedContext.session`, with nothing else
  imported first: DDP's lazy import of torch._dynamo then happens while the group exists.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from fastvae.distributed import DistributedContext


def gloo_threads() -> list[str]:
    """The names of this process's threads that belong to gloo (a process group's transport and workers)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended while we looked
            continue
    return [name for name in names if "gloo" in name]


def gloo_threads_after(grace: float = 2.0) -> list[str]:
    """`gloo_threads()` once they are gone, or after `grace` seconds: a destroyed group's transport loop
    (`gloo_tcp_loop`) was once seen to end a moment after destroy_process_group returned, on a loaded
    2-core machine. A group that outlives its destroy keeps its threads for good."""
    deadline = time.monotonic() + grace
    while (left := gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def wrap() -> int:
    ctx, cpu = DistributedContext.from_env(), torch.device("cpu")
    with ctx.session(cpu):
        module = ctx.wrap(torch.nn.Linear(3, 2), cpu)
        module(torch.ones(4, 3)).sum().backward()
        del module
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "train":
        from fastvae import train

        code = train.main(sys.argv[2:])
    else:
        code = wrap()
    print(f"rank {os.environ['RANK']}: exit code {code}, gloo threads left {gloo_threads_after()}", flush=True)
    sys.exit(code)
