"""Data-parallel training under torchrun: which process this is, its device, and the collectives it needs.

`torchrun --nproc_per_node=N -m fastvae.train ...` starts N processes (ranks) per node and tells each,
through environment variables, its global RANK, the WORLD_SIZE and its LOCAL_RANK on the node.
`DistributedContext.from_env()` reads them; without them (a plain `python -m fastvae.train`) it is the
single-process context, whose collectives are no-ops, so the training code has one path for both. Under
torchrun a process joins the group even alone (N = 1): its collectives, signal agreement and shutdown are
those of N ranks, which is what one GPU can run of NCCL.

Each rank runs on `cuda:LOCAL_RANK` with the NCCL backend, or on the CPU with gloo. See docs/distributed.md
for what is per rank and what is global.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import os
import re
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DistributedContext", "LossForward", "rank_seed", "seed_noise"]

# gloo raises a bare RuntimeError when a peer times out or its connection drops (NCCL: DistError)
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|Timed out waiting|Connection (reset|closed)|ProcessGroup", re.IGNORECASE)
DEFAULT_TIMEOUT = 300.0  # seconds a collective waits for the other ranks (--dist-timeout)
_NOISE_STREAM = 0x6E6F697365  # tags the sampling-noise seeds, apart from other uses of (seed, n)


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"the environment variable {name}={text!r} is not an integer") from None


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a data-parallel run: `rank` of `world_size`, `local_rank` on its node.

    The default, `DistributedContext()`, is a single process (rank 0 of 1): every collective is a no-op.
    `launched`: started by torchrun, so the process joins a process group even as the only rank.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(
                f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got RANK={self.rank}, "
                f"WORLD_SIZE={self.world_size}, LOCAL_RANK={self.local_rank}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistributedContext:
        """The context torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK (default: os.environ).

        Without WORLD_SIZE it is the single process; with it, a rank of a group (of one, with WORLD_SIZE=1).
        Raises ValueError for values that make no sense.
        """
        env = os.environ if env is None else env
        world_size = _env_int(env, "WORLD_SIZE", 1)
        rank = _env_int(env, "RANK", 0)
        launched = env.get("WORLD_SIZE", "") != ""
        return cls(rank=rank, world_size=world_size, local_rank=_env_int(env, "LOCAL_RANK", rank), launched=launched)

    @property
    def is_distributed(self) -> bool:
        """Whether this process is a rank of a process group: more than one rank, or started by torchrun."""
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, and writes the run directory."""
        return self.rank == 0

    # ------------------------------------------------------------------------------ device and group

    def device(self, requested: torch.device) -> torch.device:
        """This rank's device for the `requested` one: cuda:LOCAL_RANK for CUDA, the CPU as is.

        A single process keeps `requested`. Raises ValueError for a CUDA index under several processes
        (each rank picks its own GPU) or a LOCAL_RANK beyond the visible GPUs.
        """
        if not self.is_distributed or requested.type != "cuda":
            return requested
        if requested.index is not None:
            raise ValueError(
                f"--device {requested} names one GPU, but under torchrun each of the {self.world_size} processes "
                "uses cuda:LOCAL_RANK; pass --device cuda (or leave it out), and choose the GPUs with "
                "CUDA_VISIBLE_DEVICES"
            )
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ValueError(
                f"LOCAL_RANK {self.local_rank} needs GPU cuda:{self.local_rank}, but {count} are visible; "
                "start at most that many processes per node (--nproc_per_node)"
            )
        return torch.device("cuda", self.local_rank)

    @staticmethod
    def backend(device: torch.device) -> str:
        """NCCL for CUDA devices, gloo for the CPU."""
        return "nccl" if device.type == "cuda" else "gloo"

    def init(self, device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Join the process group (torchrun's env:// rendezvous); nothing for a single process.

        `timeout`: seconds a collective waits for the other ranks before it fails (--dist-timeout)."""
        if not self.is_distributed or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # torch.distributed.nn.functional has `group=group.WORLD` default arguments, evaluated when it is
        # first imported, which torch does lazily (DistributedDataParallel imports torch._dynamo, which
        # imports it). Imported after the group exists, those defaults would hold the group for the life
        # of the process, so that destroy_process_group could not end its threads (docs/distributed.md).
        importlib.import_module("torch.distributed.nn")

        wait = datetime.timedelta(seconds=timeout)
        dist.init_process_group(
            backend=self.backend(device),
            store=self.rendezvous_store(wait),
            rank=self.rank,
            world_size=self.world_size,
            device_id=device if device.type == "cuda" else None,
            timeout=wait,
        )

    def rendezvous_store(self, timeout: datetime.timedelta) -> dist.Store:
        """torchrun's env:// store, its keys under this restart's own prefix.

        torchrun's static rendezvous (no --rdzv-backend) keeps one agent store for the whole job, and torch's
        env:// store for its workers does not prefix their keys by restart (torch/distributed/rendezvous.py,
        `_create_c10d_store`, in the torch of constraints.txt). So after `--max-restarts` restarts the
        workers, a new one can read the address that a dead worker of the previous attempt published and
        fail with gloo's "connectFullMesh failed ... Connection refused" (seen in 1 of 4 killed-worker
        jobs of bench.fault_stress). TORCHELASTIC_RESTART_COUNT keeps the attempts' keys apart."""
        store, _, _ = next(dist.rendezvous("env://", self.rank, self.world_size, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.PrefixStore(f"fastvae/attempt-{attempt}", store)

    def cleanup(self, completed: bool = True) -> None:
        """Leave the process group, if this process joined one, and end its threads.

        Call it after the last collective, with no reference left to the DDP-wrapped module: its reducer
        holds the group, and a reference cycle (the trainer's loss step closes over the trainer) would keep
        it until the interpreter's final collection, when a communication thread that frees a tensor can
        no longer take the GIL and aborts the process. So: collect those cycles, wait for every rank
        (`completed`: a failed rank does not wait for ranks that may never arrive), then destroy the group,
        which joins its threads while the interpreter is fully alive.

        A failed rank (not `completed`: an error, a lost peer, a stop by signal or --stop-after) of an NCCL
        group aborts the group instead (ncclCommAbort): destroying it finalises its communicators, which
        may wait for collectives that a lost peer never joins. gloo's destroy does not wait for peers.
        """
        if not (self.is_distributed and dist.is_initialized()):
            return
        gc.collect()
        if completed:
            dist.barrier()
        elif dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()  # the world's groups, cleared as destroy clears them
            return
        dist.destroy_process_group()

    @contextlib.contextmanager
    def session(self, device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> Iterator[DistributedContext]:
        """`init` on entry, `cleanup` on exit. After an error, the frames that the error's traceback
        keeps alive (and, through them, the DDP module) are cleared first, so the group still ends.
        A failed collective (a rank that stopped answering, or died) raises PeerLost."""
        self.init(device, timeout)
        try:
            yield self
        except (dist.DistError, RuntimeError) as err:
            if not isinstance(err, dist.DistError) and not _COLLECTIVE_FAILURE.search(str(err)):
                _clear_traceback_frames(err)
                self.cleanup(completed=False)
                raise
            lost = self.silent_ranks()
            _clear_traceback_frames(err)
            self.cleanup(completed=False)
            raise PeerLost(self.rank, lost, timeout) from None
        except BaseException as err:
            _clear_traceback_frames(err)
            self.cleanup(completed=False)
            raise
        self.cleanup()

    def silent_ranks(self, grace: float = 2.0) -> list[int]:
        """After a failed collective: the ranks that do not report the failure too within `grace` seconds
        (each rank that gets here marks itself in the rendezvous store), i.e. those that stopped answering."""
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set(f"fastvae/failed/{self.rank}", "1")
            deadline = time.monotonic() + grace
            others = [r for r in range(self.world_size) if r != self.rank]
            while time.monotonic() < deadline:
                silent = [r for r in others if not store.check([f"fastvae/failed/{r}"])]
                if not silent:
                    break
                time.sleep(0.1)
            return silent
        except (RuntimeError, ValueError, dist.DistError):  # the store went with the rank that hosted it
            return []

    # --------------------------------------------------------------------------------- collectives

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over the ranks, in place (every rank gets the sum); returns it."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable), on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), as a list indexed by rank, on every rank."""
        if not self.is_distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def any_true(self, flag: Tensor) -> bool:
        """Whether the one-element `flag` (bool or number, on this rank's device) is set on any rank.

        A host synchronisation; under torchrun a collective, so every rank must call it at the same point.
        """
        if not self.is_distributed:
            return bool(flag.item())
        mark = flag.detach().reshape(1).to(torch.int32)
        dist.all_reduce(mark, op=dist.ReduceOp.MAX)
        return bool(mark.item())

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """`module` in DistributedDataParallel (gradients averaged over the ranks in backward); as is alone,
        a group of one included (nothing to average).

        DDP broadcasts rank 0's parameters when it wraps, so every rank starts from the same model.
        """
        if self.world_size == 1:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


class PeerLost(Exception):
    """A collective failed under torchrun: a rank stopped answering within --dist-timeout, or died."""

    def __init__(self, rank: int, silent: list[int], timeout: float) -> None:
        who = (
            f"rank {', '.join(map(str, silent))} stopped answering"
            if silent
            else "another rank stopped answering or left"
        )
        super().__init__(
            f"rank {rank}: {who} (a collective failed or waited longer than --dist-timeout {timeout:g} s)"
        )
        self.silent = silent


def _clear_traceback_frames(err: BaseException) -> None:
    """Drop the local variables of the finished frames in `err`'s traceback and in those of its causes.

    The message and the traceback's lines stay; frames still running (the callers) are left as they are.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__


class LossForward(nn.Module):
    """`model.loss` as `forward`, so that DistributedDataParallel (which hooks `forward`) syncs its gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, beta: float | Tensor, iw_samples: int) -> Any:
        return self.model.loss(x, beta=beta, iw_samples=iw_samples)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s sampling noise in a run seeded with `seed`: a 63-bit int.

    A function of (seed, rank, step) only, distinct per rank, and unrelated to `seed + rank` (so run 0's
    rank 1 does not repeat run 1's rank 0). `step` > 0 restarts the noise at a resume whose checkpoint
    holds no RNG state for this rank (it was written by a different number of processes).
    """
    if seed < 0 or rank < 0 or step < 0:
        raise ValueError(f"seed, rank and step must be non-negative, got {seed}, {rank} and {step}")
    sequence = np.random.SeedSequence((seed, rank, step), spawn_key=(_NOISE_STREAM,))
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_noise(seed: int, rank: int, step: int = 0) -> None:
    """Seed torch's generators (CPU and every GPU) with `rank_seed(seed, rank, step)`.

    The reference path draws eps from them, and the fused sampler its Philox seed (`functional._draw_seed`),
    so each rank draws its own noise, reproducibly.
    """
    torch.manual_seed(rank_seed(seed, rank, step))
