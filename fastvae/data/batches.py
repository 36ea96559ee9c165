"""Batches on the device: `DeviceBatches` (shuffled, exactly resumable, sharded for DDP) and `to_float`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fastvae.data.splits import DataError


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1] (divided by 255); a float tensor passes through as float32.

    The shape and device are kept. Raises TypeError for other dtypes.
    """
    if batch.dtype == torch.uint8:
        return batch.to(torch.float32).div_(255.0)
    if batch.is_floating_point():
        return batch.to(torch.float32)
    raise TypeError(f"to_float expects uint8 or floating-point data, got {batch.dtype}")


class DeviceBatches:
    """Shuffled mini-batches of one split that lives on the device as a single tensor.

    `data` is (N, ...) uint8 (kept as uint8 on the device) or float (stored as float32); it is flattened to
    (N, D) once. Each epoch draws a permutation from a CPU generator seeded by (seed, epoch), so it is the same
    on every device, moves it to the device and yields float32 batches in [0, 1] of shape (batch_size, D) by
    slicing through it; with `drop_last=False` the last batch may be smaller.

    Exact resume: `position` is the number of batches of the current epoch handed out so far (set before
    each batch is yielded); after saving `(current_epoch, position)`, `epoch(current_epoch, start=position)`
    continues with the very next batch. `permutation(epoch)` gives the epoch's sample order.

    Data parallelism: with `world_size` W > 1 processes, `batch_size` is the *global* batch. Every rank holds
    the whole split and computes the same permutation; global batch i is perm[i*B : (i+1)*B] and rank `rank`
    takes its part of it: `torch.tensor_split(global_batch, W)[rank]`, so the ranks' parts, in rank order,
    make up the global batch. With `drop_last=True`, B must be a multiple of W (every rank gets B // W rows
    each step, as DDP needs); with `drop_last=False` the parts of the last batch differ by at most one row,
    and a rank whose part is empty skips that batch. `len` is the number of global batches (the same on every
    rank); `shard(epoch)` gives the rank's sample indices of an epoch in order.
    """

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        *,
        device: torch.device,
        seed: int,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if data.dtype != torch.uint8 and not data.is_floating_point():
            raise TypeError(f"DeviceBatches needs uint8 or floating-point data, got {data.dtype}")
        if data.ndim < 2 or len(data) == 0:
            raise DataError(f"need a non-empty (N, ...) data tensor, got shape {tuple(data.shape)}")
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if drop_last and batch_size > len(data):
            raise DataError(
                f"batch size {batch_size} is larger than the {len(data)} samples, so an epoch would have no "
                "batches; use a smaller batch size"
            )
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank {rank} and world size {world_size}")
        if drop_last and batch_size % world_size:
            raise DataError(
                f"the batch size {batch_size} is the global batch and must be a multiple of the {world_size} "
                f"processes (each takes batch size / {world_size} rows a step); use e.g. "
                f"{max(world_size, batch_size // world_size * world_size)}"
            )
        device = torch.device(device)
        dtype = torch.uint8 if data.dtype == torch.uint8 else torch.float32
        self.data = data.reshape(len(data), -1).to(device=device, dtype=dtype)
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.current_epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The (N,) int64 sample order of `epoch`, on the device; a function of (seed, epoch) only.

        It is drawn on the CPU, by a CPU generator, and moved to the device: CUDA's randperm is not the
        CPU's, so a draw on the device would give each kind of device its own order (and a run resumed on
        another kind a different one)."""
        if epoch < 0:
            raise DataError(f"epoch must be non-negative, got {epoch}")
        mixed = int(np.random.SeedSequence((self.seed, epoch)).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(mixed)
        return torch.randperm(len(self.data), generator=generator).to(self.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """The batches of `epoch` from batch index `start` on, each float32 (batch, D) in [0, 1].

        Arguments are checked at the call; `current_epoch` and `position` follow the iteration.
        """
        return map(self.gather, self.index_batches(epoch, start))

    def bounds(self, i: int) -> tuple[int, int]:
        """[lo, hi): the positions in the permutation of this rank's part of global batch `i`."""
        start = i * self.batch_size
        rows, extra = divmod(min(self.batch_size, len(self.data) - start), self.world_size)
        lo = start + self.rank * rows + min(self.rank, extra)  # as torch.tensor_split: the first parts get +1
        return lo, lo + rows + (1 if self.rank < extra else 0)

    def shard(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices of `epoch`, in the order its batches hand them out, on the device."""
        perm = self.permutation(epoch)
        return torch.cat([perm[slice(*self.bounds(i))] for i in range(len(self))])

    def index_batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """`epoch` as its batches' sample indices: int64 views of the permutation, on the device; `gather`
        makes each the batch that `epoch` yields. The same arguments, checks and position bookkeeping."""
        if not 0 <= start <= len(self):
            raise DataError(f"start batch {start} is out of range for an epoch of {len(self)} batches")
        return self._index_batches(epoch, self.permutation(epoch), start)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The float32 batch (len(indices), D) in [0, 1] of these samples."""
        return to_float(self.data[indices])

    def _index_batches(self, epoch: int, perm: torch.Tensor, start: int) -> Iterator[torch.Tensor]:
        self.current_epoch, self.position = epoch, start
        for i in range(start, len(self)):
            self.position = i + 1
            lo, hi = self.bounds(i)
            if hi > lo:
                yield perm[lo:hi]
