"""The training engine: the steps, the device-side statistics, the test evaluation and the checkpoints.

`Trainer` runs the hot loop on data that live on the device. Every step adds its statistics to device-side
sums (`RunningMeans`), read (one host synchronisation) every `--log-every` steps together with a check of
the parameters; a non-finite sum or parameter raises NonFiniteError, and `Trainer.diagnose` names the
first bad step. All statistics are in nats per sample.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from fastvae import checkpoint as ckpt
from fastvae.data import DeviceBatches
from fastvae.distributed import DistributedContext, LossForward, seed_noise
from fastvae.graphs import DeviceBeta, GraphedSteps
from fastvae.model import VAE, LossOutput
from fastvae.options import ConfigError
from fastvae.units import bits_per_dim, sigma_stats

STATS = ("loss", "elbo", "kl", "log_px", "iwae")
EVAL_BATCH = 1000  # rows per evaluation batch


class NonFiniteError(Exception):
    """A reading saw a non-finite statistic or parameter since the last good state."""


class ImmediateExit(BaseException):  # noqa: N818
    """A second SIGINT/SIGTERM: leave at once, without saving (BaseException: nothing catches it on the way)."""

    def __init__(self, signum: int, saved: bool = False) -> None:
        super().__init__(signum)
        self.signum = signum
        self.saved = saved  # it came inside a checkpoint write, which was finished first


def autocast(device: torch.device, amp: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for --amp bf16; a no-op for --amp off. Without `cache` the casts are not
    cached (what a captured CUDA graph needs)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16", cache_enabled=cache)


class RunningMeans:
    """Device-side sums of the `LossOutput` statistics; `read` is the only host synchronisation. A non-finite
    value stays in its sum (inf and NaN are sticky) until the next `read`, which is how the non-finite guard
    sees a bad loss without a per-step sync; `read` also checks the parameters, which a non-finite gradient
    makes non-finite in the optimizer step that applies it.
    Under torchrun `read` averages over the ranks too and `finite` looks at every rank (collectives: every
    rank calls them at the same step), so the statistics cover the global batch; `sums` are this rank's."""

    def __init__(self, device: torch.device, ctx: DistributedContext | None = None) -> None:
        self.sums = torch.zeros(len(STATS), dtype=torch.float64, device=device)
        self.count = 0
        self.ctx = ctx or DistributedContext()

    def add(self, out: LossOutput) -> None:
        """Two launches: the step's statistics, stacked, added to the float64 sums. The caller counts the
        steps in `count` (a captured step adds on each replay)."""
        self.sums.add_(torch.stack([out.loss.detach(), out.elbo, out.kl, out.log_px, out.iwae]))

    @torch.no_grad()
    def read(self, params: list[torch.Tensor]) -> dict[str, float]:
        """The means since the previous read, by STATS name, and "param_norm": the summed norms of `params`,
        non-finite if any of them is. One host synchronisation."""
        total = self.ctx.all_reduce_sum(self.sums.clone()) / (self.count * self.ctx.world_size)
        norm = torch.stack(torch._foreach_norm(params)).sum().reshape(1) if params else total.new_zeros(1)
        means = torch.cat([total, norm.to(total.dtype)]).tolist()
        self.sums.zero_()
        self.count = 0
        return dict(zip((*STATS, "param_norm"), means, strict=True))

    def finite(self) -> bool:
        """No non-finite value since the previous read (a host sync)."""
        return not self.ctx.any_true(~torch.isfinite(self.sums).all())


@torch.no_grad()
def test_statistics(
    model: VAE, test: DeviceBatches, amp: str, ctx: DistributedContext | None = None
) -> dict[str, float]:
    """Test ELBO, KL and log p(x|z) over the whole split (one draw of z per sample), nats per sample.

    Under torchrun each rank evaluates its shard of the split (`test` is sharded) and the sums are all-reduced.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=test.device)
    for x in test.epoch(0):
        with autocast(test.device, amp):
            log_px, kl = model.log_px_and_kl(x)
        sums += torch.stack([(log_px - kl).sum(), kl.sum(), log_px.sum()]).double()
    (ctx or DistributedContext()).all_reduce_sum(sums)
    elbo, kl, log_px = (sums / len(test.data)).tolist()
    return {"test_elbo": elbo, "test_kl": kl, "test_log_px": log_px}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU. For honest timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The state (uint8) of the training device's CUDA generator, the only one a run draws from; None for
    another kind of device."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_cuda_rng(saved: torch.Tensor | list[torch.Tensor] | None, device: torch.device) -> None:
    """Put a checkpoint's CUDA RNG state (`cuda_rng_state`) back into `device`'s generator; nothing when
    `device` is not a GPU or the run was saved off one (None, or [] in older checkpoints).

    Older checkpoints hold a list of every visible GPU's state: the entry at the device's index is taken, or
    the first when there are fewer (the run saw fewer GPUs, so its device had a lower number)."""
    if device.type != "cuda" or saved is None or (isinstance(saved, list) and not saved):
        return
    if isinstance(saved, list):
        index = torch.cuda.current_device() if device.index is None else device.index
        saved = saved[index] if index < len(saved) else saved[0]
    torch.cuda.set_rng_state(saved, device)


# ---------------------------------------------------------------------------------------- the loop


@dataclass
class Trainer:
    """One training run: the model, its optimizer, the data on the device and the run's records.

    `checkpoint_path` (None: no checkpoints) is where `save_checkpoint` writes. Every step adds its
    statistics to device-side sums (`running`); `log_train` reads them with the parameters' norm and raises
    NonFiniteError when one is not finite, after which `diagnose` re-runs the steps since the last
    good state (a copy kept at each clean statistics reading) to say which step and which term failed.
    With --cuda-graphs the steps are replays of one captured graph (`graphed`, fastvae/graphs.py).
    """

    config: dict[str, Any]
    model: VAE
    train: DeviceBatches
    test: DeviceBatches
    metrics: IO[str]
    device: torch.device
    step: int = 0
    train_seconds: float = 0.0
    train_samples: int = 0
    last: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_path: Path | None = None
    ctx: DistributedContext = field(default_factory=DistributedContext)  # torchrun: this process's rank
    events: Any = None  # --tensorboard on rank 0: an EventLog (fastvae/tensorboard.py) that gets each row

    def __post_init__(self) -> None:
        graphed, cuda = bool(self.config.get("cuda_graphs")), self.device.type == "cuda"
        self.optimizer = torch.optim.Adam(  # a graphed step's Adam keeps its step counts on the device
            self.model.parameters(), lr=self.config["lr"], fused=cuda, capturable=graphed
        )
        self.loss_step = self._make_loss_step()
        # β as the step's forward takes it with --compile or --cuda-graphs: a device tensor (see beta_arg)
        self.device_beta = DeviceBeta(self.device, self.beta()) if graphed or self.config["compile"] else None
        self.running = RunningMeans(self.device, self.ctx)
        self.metrics_rows = 0  # lines written to metrics.jsonl (kept in the checkpoint)
        self.stop_signal: int | None = None
        self._writing = False  # a checkpoint write is under way: a second signal waits for its end
        self._deferred_exit: int | None = None
        self.checkpoint_step: int | None = None  # the step of the last checkpoint written or loaded
        self._good: dict[str, Any] | None = None  # the state at the last clean statistics reading
        self.started = time.perf_counter()
        self._window_start = self.started
        self._window_samples = 0
        # --cuda-graphs: the steps as replays of a captured graph (fastvae/graphs.py)
        self.graphed = GraphedSteps(self) if graphed else None

    def _make_loss_step(self) -> Callable[[torch.Tensor, float | torch.Tensor], LossOutput]:
        """The step's forward: `model.loss` itself, or under torchrun the DistributedDataParallel-wrapped
        loss (which averages the gradients over the ranks in backward); in bf16 autocast with --amp bf16;
        compiled with --compile."""
        iw_samples, amp, model = self.config["iw_samples"], self.config["amp"], self.model
        if self.ctx.is_distributed:
            module = self.ctx.wrap(LossForward(model), self.device)
            forward = lambda x, beta: module(x, beta, iw_samples)  # noqa: E731
        else:
            forward = lambda x, beta: model.loss(x, beta=beta, iw_samples=iw_samples)  # noqa: E731
        if amp == "off" and not self.config["compile"]:
            return forward

        cache = not self.config.get("cuda_graphs")

        def loss_step(x: torch.Tensor, beta: float | torch.Tensor) -> LossOutput:
            with autocast(self.device, amp, cache):
                return forward(x, beta)

        return torch.compile(loss_step) if self.config["compile"] else loss_step

    def beta(self) -> float:
        """The KL weight at the current step: linear from 0 over --kl-warmup steps, then --beta."""
        warmup = self.config["kl_warmup"]
        return self.config["beta"] * (min(1.0, self.step / warmup) if warmup else 1.0)

    def beta_arg(self) -> float | torch.Tensor:
        """The KL weight as the step's forward is given it: `beta()`, or with --compile or --cuda-graphs the
        0-dim float32 device tensor `device_beta` refilled with it, which the loss reads on the device (a
        compiled step would otherwise be specialised on every value of a --kl-warmup: a graph per step)."""
        beta = self.beta()
        return beta if self.device_beta is None else self.device_beta.set(beta)

    def step_on(self, indices: torch.Tensor) -> None:
        """One training step on the samples `indices` of the training split: a replay with --cuda-graphs."""
        if self.graphed is not None:
            self.graphed.step(indices)
        else:
            self.train_step(self.train.gather(indices))

    def train_step(self, x: torch.Tensor) -> None:
        """One eager step on the batch x (B, D)."""
        self.step_body(x, self.beta_arg())
        self.after_step(len(x))

    def step_body(self, x: torch.Tensor, beta: float | torch.Tensor) -> None:
        """A step's device work (what --cuda-graphs captures): forward, backward, Adam, the statistics."""
        out = self.loss_step(x, beta)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        self.running.add(out)  # the non-finite guard, on the device (see RunningMeans)

    def after_step(self, rows: int) -> None:
        """A step's host bookkeeping, after its device work on `rows` rows of this rank."""
        self.step += 1
        self.running.count += 1
        self._window_samples += rows * self.ctx.world_size  # the global batch (the ranks' parts are equal)

    def write(self, row: dict[str, Any]) -> None:
        row["wall_time_s"] = round(time.perf_counter() - self.started, 3)
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.metrics_rows += 1
        self.last[row["kind"]] = row
        self.history.append(row)
        if self.events is not None:
            self.events.add_row(row)

    def log_train(self, epoch: int) -> None:
        """Read the running means (host sync), with the throughput since the previous reading.
        Raises NonFiniteError (writing no row) when a statistic since then, or a parameter, is not finite."""
        if self.running.count == 0:
            return
        synchronize(self.device)
        means = self.running.read(list(self.model.parameters()))
        if not all(math.isfinite(v) for v in means.values()):
            raise NonFiniteError
        del means["param_norm"]
        now = time.perf_counter()
        seconds = now - self._window_start
        self.train_seconds += seconds
        self.train_samples += self._window_samples
        row = {"kind": "train", "step": self.step, "epoch": epoch, "beta": self.beta(), **means}
        if self.config["iw_samples"] == 1:
            del row["iwae"]  # the same as the ELBO
        if self.model.log_scale is not None:  # --sigma learned
            row.update({f"sigma_{name}": value for name, value in sigma_stats(self.model).items()})
        row["samples_per_s"] = self._window_samples / seconds if seconds > 0 else None
        self.write(row)
        self._window_start, self._window_samples = now, 0

    def evaluate(self, epoch: int) -> None:
        """Log the pending training statistics, evaluate on the test split; excluded from the timing."""
        self.log_train(epoch)
        self.model.eval()
        stats = test_statistics(self.model, self.test, self.config["amp"], self.ctx)
        bpd = bits_per_dim(
            stats["test_elbo"], math.prod(self.model.data_shape), self.model.likelihood,
            bool(self.config.get("data_8bit")),
        )
        if bpd is not None:
            stats["test_bpd"] = bpd
        self.write({"kind": "eval", "step": self.step, "epoch": epoch, **stats})
        self.model.train()
        self._window_start = time.perf_counter()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[None]:
        """Train one epoch from batch `start` on, yielding after every step (for the progress bar and
        for stopping: after a yield the state is complete and `capture` gives it). The epoch-end
        evaluation runs after the last yield, also when `start` is the end of the epoch."""
        log_every, eval_every = self.config["log_every"], self.config["eval_every"]
        for indices in self.train.index_batches(epoch, start):
            self.step_on(indices)
            if eval_every and self.step % eval_every == 0:
                self.evaluate(epoch)
                self.keep_good(epoch, self.train.position)
            elif self.step % log_every == 0:
                self.log_train(epoch)
                self.keep_good(epoch, self.train.position)
            yield
        if not eval_every:
            self.evaluate(epoch)
        self.log_train(epoch)
        self.keep_good(epoch + 1, 0)

    # ------------------------------------------------------------------------------ state and checkpoints

    def capture(self, epoch: int, position: int) -> dict[str, Any]:
        """A copy of everything the run's future depends on; training resumes at batch `position` of
        `epoch`. The checkpoint payload, less the permutation."""
        return ckpt.clone(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "epoch": epoch,
                "position": position,
                "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng_state(self.device)},
                "running": {"sums": self.running.sums, "count": self.running.count},
                "metrics_rows": self.metrics_rows,
                "train_seconds": self.train_seconds,
                "train_samples": self.train_samples,
                "config": self.config,
            }
        )

    def restore(self, state: dict[str, Any]) -> None:
        """Put the run back in a captured (or checkpointed) state."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{self.checkpoint_path} does not fit the run's model: {problem}") from None
        self.step = state["step"]
        if self.graphed is not None:  # the optimizer's state tensors were replaced
            self.graphed.invalidate()
        own = self._own_part(state)
        if own is None:  # written by another number of processes: this rank's noise restarts, and the
            seed_noise(self.config["seed"], self.ctx.rank, self.step)  # ranks share the window's sums
            sums = [part["running"]["sums"] for part in state["ranks"]]
            own = {"running": {"sums": sum(sums) / len(sums), "count": state["running"]["count"]}}
        else:
            torch.set_rng_state(own["rng"]["torch"])
            restore_cuda_rng(own["rng"]["cuda"], self.device)
        self.running.sums.copy_(own["running"]["sums"])
        self.running.count = own["running"]["count"]
        self.metrics_rows = state["metrics_rows"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.train_samples = state.get("train_samples", 0)

    def _own_part(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """This rank's RNG state and statistics window in `state`, or None when it has none.

        A checkpoint holds every rank's, under "ranks" (rank order); one written by a different number of
        processes has none for this rank. A `capture` holds this process's own.
        """
        parts = state.get("ranks")
        if parts is None:
            return state
        return parts[self.ctx.rank] if len(parts) == self.ctx.world_size else None

    def keep_good(self, epoch: int, position: int) -> None:
        """Called after a clean statistics reading: the state to re-run from if a later step fails."""
        self._good = self.capture(epoch, position)

    def all_finite(self) -> bool:
        """The statistics since the last reading and every parameter are finite (a host sync)."""
        params = [p.detach() for p in self.model.parameters()]
        return self.running.finite() and all(bool(torch.isfinite(p).all()) for p in params)

    def save_checkpoint(self, epoch: int, position: int) -> None:
        """Write checkpoint.pt atomically for a resume at batch `position` of `epoch`; never a
        non-finite one (raises NonFiniteError instead)."""
        if self.checkpoint_path is None:
            return
        synchronize(self.device)
        if not self.all_finite():
            raise NonFiniteError
        state = self.capture(epoch, position)
        state["permutation"] = self.train.permutation(epoch).cpu()
        own = {"rng": state["rng"], "running": {**state["running"], "sums": state["running"]["sums"].cpu()}}
        state["ranks"] = self.ctx.all_gather_object(own)  # every rank's noise and window; rank 0 writes
        # A second signal inside the write would break torch.save's zip writer (a traceback that masks the
        # exit) or leave checkpoint_step behind the file on disk: it waits for the write, then leaves.
        self._writing = True
        try:
            if self.ctx.is_main:
                state["metrics_lines"] = [json.dumps(row) for row in self.history[: self.metrics_rows]]
                self.metrics.flush()
                with contextlib.suppress(AttributeError, OSError, ValueError):  # a StringIO has no file
                    os.fsync(self.metrics.fileno())  # the rows the checkpoint counts are on disk before it
                ckpt.save(self.checkpoint_path, state)
                self.checkpoint_step = self.step
        finally:
            self._writing = False
        if self._deferred_exit is not None:
            raise ImmediateExit(self._deferred_exit, saved=True)
        self.ctx.barrier()  # no rank leaves (and has torchrun stop the others) before the file is written
        self.checkpoint_step = self.step

    def should_stop(self) -> bool:
        """--stop-after reached, or a signal came. Under torchrun the ranks agree on a signal at the
        statistics readings (every --log-every steps), so that they all stop after the same step."""
        stop_after = self.config.get("stop_after")
        if stop_after is not None and self.step >= stop_after:
            return True
        if not self.ctx.is_distributed:
            return self.stop_signal is not None
        if self.step % self.config["log_every"]:
            return False
        return self.ctx.any_true(torch.tensor(self.stop_signal is not None, device=self.device))

    def on_signal(self, signum: int, frame: object) -> None:
        """SIGINT/SIGTERM: stop after the current step; a second one leaves at once (after the checkpoint
        write under way, if any, so that the file on disk is whole and its step known)."""
        if self.stop_signal is not None:
            if self._writing:
                self._deferred_exit = signum
                return
            raise ImmediateExit(signum)
        self.stop_signal = signum

    # -------------------------------------------------------------------------------------- diagnosis

    def diagnose(self) -> str:
        """Re-run the steps since the last good state, checking each, and describe the first bad one."""
        detected, good = self.step, self._good
        where = self.checkpoint_text()
        if good is None:
            return f"a non-finite loss or gradient before step {detected}. {where}"
        self.restore(good)
        epoch, position = good["epoch"], good["position"]
        if position >= len(self.train):
            epoch, position = epoch + 1, 0
        params = dict(self.model.named_parameters())
        for x in self.train.epoch(epoch, position):
            if self.step >= detected:
                break
            beta, lr = self.beta_arg(), self.optimizer.param_groups[0]["lr"]
            with torch.no_grad(), autocast(self.device, self.config["amp"]):
                _, logvar = self.model.encode(x)
            max_logvar = logvar.detach().abs().max().item()
            with self.graphed.noise(self.step) if self.graphed is not None else contextlib.nullcontext():
                out = self.loss_step(x, beta)  # with --cuda-graphs, the seed the step drew
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            terms = [name for name, value in (("KL", out.kl), ("log-likelihood", out.log_px)) if not value.isfinite()]
            if not out.loss.isfinite() and not terms:
                terms = ["loss"]
            modules = sorted(
                {
                    name.rpartition(".")[0] or name
                    for name, p in params.items()
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())
                }
            )
            if self.ctx.any_true(torch.tensor(bool(terms or modules), device=self.device)):  # on any rank
                what = [f"the {' and the '.join(terms)} went non-finite"] if terms else []
                if modules:
                    what.append(f"non-finite gradients of {', '.join(modules)}")
                if not what:
                    what = ["a non-finite loss in another process's part of the batch"]
                hint = f"Try a lower --lr (now {lr:g})" + (" or --amp off" if self.config["amp"] != "off" else "")
                return (
                    f"training diverged at step {self.step + 1}: {'; '.join(what)}. Largest |logvar| "
                    f"{max_logvar:.4g}, learning rate {lr:g}. {where} {hint}."
                )
            self.optimizer.step()
            self.step += 1
        return (
            f"a non-finite loss or gradient between steps {good['step'] + 1} and {detected}, which did not "
            f"recur when those steps were re-run. {where} Try a lower --lr or --amp off."
        )

    def checkpoint_text(self) -> str:
        """Where the last good checkpoint is, as a sentence for an error message."""
        if self.checkpoint_step is None or self.checkpoint_path is None:
            return "No checkpoint was written."
        try:
            ckpt.load(self.checkpoint_path)  # verified (CRC-32s and SHA-256) before it is called good
        except ckpt.CheckpointError as err:
            return f"The last checkpoint cannot be resumed from: {err} (resume with --from-previous)."
        return f"The last good checkpoint is {self.checkpoint_path} (step {self.checkpoint_step})."
