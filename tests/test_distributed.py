"""Data-parallel training through torchrun: the context, the per-rank shards and seeds, and a 2-process run.

The 2-process run cannot be compared with a plain single-process run sample for sample: each rank draws
its own sampling noise (eps) from its own stream, `seed_noise(seed, rank)`, while a single process draws
the eps of the whole batch from one stream. So the reference here is a single process that trains on the
same global batches with the same optimizer, and draws the eps of the rows of rank r from rank r's stream
(`_emulate`). `test_emulation_with_one_rank_is_the_cli_run` checks that this reference, with one rank, is
exactly what `python -m fastvae.train` computes; `test_torchrun_two_processes_match_the_global_batch` then
checks that 2 processes under torchrun give what it computes for 2 ranks, to float tolerance: the same
shards, per-rank seeds, averaged gradients and all-reduced statistics. Any of them missing breaks the match.
The resume test stops such a run mid-way and resumes it under torchrun: it must end at the same reference.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastvae import checkpoint as ckpt
from fastvae import engine, functional, options, rundir
from fastvae.data import DataError, DeviceBatches, load_dataset
from fastvae.distributed import DistributedContext, LossForward, rank_seed, seed_noise

CPU = torch.device("cpu")
SEED = 3
RUN = [
    "--dataset", "sprites", "--likelihood", "bernoulli", "--num-train", "256", "--num-test", "64",
    "--batch-size", "32", "--epochs", "2", "--hidden", "32", "--latent-dim", "4", "--lr", "3e-3",
    "--log-every", "4", "--seed", str(SEED), "--device", "cpu",
]  # fmt: skip
STATS = ("loss", "elbo", "kl", "log_px")
EVAL_STATS = ("test_elbo", "test_kl", "test_log_px")


# ----------------------------------------------------------------------------------------- the context


def test_context_from_the_torchrun_environment():
    single = DistributedContext.from_env({})
    assert (single.rank, single.world_size, single.local_rank) == (0, 1, 0)
    assert single.is_main and not single.is_distributed
    ctx = DistributedContext.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (5, 8, 1)
    assert ctx.is_distributed and not ctx.is_main
    with pytest.raises(ValueError, match="RANK=8, WORLD_SIZE=8"):
        DistributedContext.from_env({"RANK": "8", "WORLD_SIZE": "8", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        DistributedContext.from_env({"WORLD_SIZE": "two"})


def test_under_torchrun_a_single_process_is_a_rank_of_a_group_of_one():
    """torchrun --nproc_per_node=1: the process joins a group (on a GPU, what one GPU can run of NCCL), and
    its model is not wrapped in DDP (nothing to average)."""
    ctx = DistributedContext.from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert (ctx.world_size, ctx.launched) == (1, True) and ctx.is_distributed and ctx.is_main
    assert not DistributedContext.from_env({"WORLD_SIZE": ""}).is_distributed
    module = torch.nn.Linear(2, 2)
    assert ctx.wrap(module, CPU) is module


@pytest.mark.parametrize(
    ("backend", "completed", "calls"),
    [("nccl", False, ["abort"]), ("gloo", False, ["destroy"]), ("nccl", True, ["barrier", "destroy"])],
)
def test_a_failed_rank_aborts_an_nccl_group_and_destroys_a_gloo_one(monkeypatch, backend, completed, calls):
    """A failed or stopped rank waits for no other: NCCL's communicators are aborted (destroying them would
    finalise them, which may wait for a lost peer); gloo's group is destroyed; a finished rank meets the
    others at a barrier first."""
    made: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: made.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: made.append("destroy"))
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda *a, **k: made.append("abort"))
    DistributedContext(rank=0, world_size=1, launched=True).cleanup(completed=completed)
    assert made == calls


def test_devices_and_backends():
    one, two = DistributedContext(), DistributedContext(rank=1, world_size=2, local_rank=1)
    assert one.device(torch.device("cuda:1")) == torch.device("cuda:1")  # a single process keeps its choice
    assert two.device(CPU) == CPU
    with pytest.raises(ValueError, match="each of the 2 processes uses cuda:LOCAL_RANK"):
        two.device(torch.device("cuda:0"))
    assert DistributedContext.backend(torch.device("cuda:1")) == "nccl"
    assert DistributedContext.backend(CPU) == "gloo"


def test_each_restart_of_a_torchrun_job_has_its_own_store_keys(monkeypatch):
    """torchrun's agent store outlives a restart: a restarted worker must not read the addresses that the
    previous attempt's (dead) workers published there, so the group's keys carry the attempt."""
    agent = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # every worker is a client of the agent's store
    ctx = DistributedContext(rank=1, world_size=2, local_rank=1)
    for attempt in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        ctx.rendezvous_store(datetime.timedelta(seconds=10)).set("rank_1", f"address of attempt {attempt}")
    assert agent.get("fastvae/attempt-0/rank_1") == b"address of attempt 0"
    assert agent.get("fastvae/attempt-1/rank_1") == b"address of attempt 1"
    assert not agent.check(["rank_1"])
    joined = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    ctx.init(CPU, timeout=10)
    joined["store"].set("probe", "1")  # the group is built on this attempt's store
    assert agent.check(["fastvae/attempt-1/probe"]) and (joined["rank"], joined["world_size"]) == (1, 2)


def test_single_process_collectives_are_no_ops():
    ctx = DistributedContext()
    t = torch.tensor([1.0, 2.0])
    assert ctx.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert ctx.broadcast_object("runs/x") == "runs/x"
    assert ctx.all_gather_object(7) == [7]
    module = torch.nn.Linear(2, 2)
    assert ctx.wrap(module, CPU) is module
    assert ctx.any_true(torch.tensor(True)) and not ctx.any_true(torch.zeros((), dtype=torch.bool))
    with ctx.session(CPU):  # joins no group
        assert not torch.distributed.is_initialized()


def test_loss_forward_is_the_model_loss():
    model = options.build_model(_config(hidden=[8], latent_dim=2, data_shape=[6]))
    x = torch.rand(4, 6)
    torch.manual_seed(0)
    expected = model.loss(x, beta=0.5, iw_samples=2)
    torch.manual_seed(0)
    out = LossForward(model)(x, 0.5, 2)
    assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))


# ------------------------------------------------------------------------------------ seeds and shards


def test_rank_seeds_differ_per_rank_and_are_reproducible():
    seeds = [rank_seed(0, rank) for rank in range(64)]
    assert len(set(seeds)) == 64
    assert seeds == [rank_seed(0, rank) for rank in range(64)]
    assert rank_seed(1, 0) != rank_seed(0, 1)  # not seed + rank
    assert rank_seed(0, 1, step=100) not in seeds  # a restart at a resume under another world size
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_seed_noise_gives_each_rank_its_own_noise(impl):
    """The reference path's eps and the fused sampler's Philox seed both come from the rank's stream."""

    def draw(rank: int) -> torch.Tensor:
        seed_noise(SEED, rank)
        if impl == "triton":
            return torch.tensor(functional._draw_seed(CPU))  # what the fused sampler would seed Philox with
        return functional.sample_latent(torch.zeros(3, 5), torch.zeros(3, 5), impl="torch")[0]

    assert torch.equal(draw(0), draw(0)) and torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(0), draw(1))


N = 103


def _indexed(n: int = N) -> torch.Tensor:
    """(n, 1) uint8 whose sample i holds the value i, so a batch tells its sample indices."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1)


def _ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] * 255).round().long().tolist()


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_shards_make_up_the_global_batches(world_size):
    data = _indexed()
    whole = DeviceBatches(data, 12, device=CPU, seed=4)
    ranks = [DeviceBatches(data, 12, device=CPU, seed=4, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in (0, 5):
        global_batches = [_ids(b) for b in whole.epoch(epoch)]
        per_rank = [[_ids(b) for b in r.epoch(epoch)] for r in ranks]
        assert all(len(batches) == len(whole) == 8 for batches in per_rank)  # the same steps on every rank
        for i, batch in enumerate(global_batches):
            parts = [batches[i] for batches in per_rank]
            assert all(len(part) == 12 // world_size for part in parts)
            assert sum(parts, []) == batch  # rank r holds the r-th block of each global batch
        shards = [r.shard(epoch) for r in ranks]
        assert [s.tolist() for s in shards] == [sum(batches, []) for batches in per_rank]
        assert sorted(torch.cat(shards).tolist()) == sorted(whole.permutation(epoch)[:96].tolist())  # disjoint


def test_uneven_last_batch_is_split_and_an_empty_part_skipped():
    data = _indexed()  # 103 samples: ten batches of 10, then one of 3, over 4 ranks
    ranks = [DeviceBatches(data, 10, device=CPU, seed=1, drop_last=False, rank=r, world_size=4) for r in range(4)]
    batches = [list(r.epoch(0)) for r in ranks]
    assert [len(b) for b in batches] == [11, 11, 11, 10]  # rank 3's part of the last batch is empty: skipped
    assert [len(b[-1]) for b in batches] == [1, 1, 1, 2]
    assert [len(b[0]) for b in batches] == [3, 3, 2, 2]  # as torch.tensor_split(batch, 4)
    ids = [i for b in batches for x in b for i in _ids(x)]
    assert sorted(ids) == list(range(N))  # every test sample counted exactly once over the ranks
    assert all(len(r) == 11 and r.position == 11 for r in ranks)


def test_shard_errors():
    with pytest.raises(DataError, match="batch size 30 is the global batch and must be a multiple of the 4"):
        DeviceBatches(_indexed(), 30, device=CPU, seed=0, rank=0, world_size=4)
    with pytest.raises(DataError, match="need 0 <= rank < world_size"):
        DeviceBatches(_indexed(), 30, device=CPU, seed=0, rank=2, world_size=2)
    DeviceBatches(_indexed(), 30, device=CPU, seed=0, drop_last=False, rank=3, world_size=4)  # eval: any size


# ------------------------------------------------------------------------------------- runs end to end


def _config(**overrides) -> dict:
    config = {"arch": "mlp", "likelihood": "bernoulli", "sigma": 1.0, "beta": 1.0, "impl": "auto"}
    return {**config, **overrides}


def _emulate(config: dict, world_size: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One process training on the global batches, the eps of rank r's rows drawn from rank r's stream.

    Follows `fastvae.train` step by step: model from torch.manual_seed(seed), Adam on the mean loss over
    the global batch, statistics every --log-every steps averaged over the global batch, a test
    evaluation at each epoch end. Returns the final parameters and the metric rows (without timings).
    It runs on one thread, as the runs it is compared with do (`_env`): a different number of threads sums
    the matrix products in another order.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _emulate_on_this_thread(config, world_size)
    finally:
        torch.set_num_threads(threads)


def _emulate_on_this_thread(config: dict, world_size: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    seed = config["seed"]
    splits = load_dataset("sprites", seed=seed, num_train=config["num_train"], num_test=config["num_test"])
    torch.manual_seed(seed)
    model = options.build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    streams = []
    for rank in range(world_size):
        seed_noise(seed, rank)
        streams.append(torch.get_rng_state())

    def on_rank(rank, fn):
        torch.set_rng_state(streams[rank])
        result = fn()
        streams[rank] = torch.get_rng_state()
        return result

    batches = DeviceBatches(splits.train, config["batch_size"], device=CPU, seed=seed)
    test = DeviceBatches(splits.test, engine.EVAL_BATCH, device=CPU, seed=seed, drop_last=False)
    rows, window, step = [], [], 0
    for epoch in range(config["epochs"]):
        for x in batches.epoch(epoch):
            parts = x.tensor_split(world_size)
            outs = [on_rank(r, lambda p=p: model.loss(p)) for r, p in enumerate(parts)]
            optimizer.zero_grad()
            (sum(out.loss for out in outs) / world_size).backward()
            optimizer.step()
            step += 1
            window.append([sum(getattr(out, s).double().item() for out in outs) / world_size for s in STATS])
            if step % config["log_every"] == 0:
                means = torch.tensor(window, dtype=torch.float64).mean(0).tolist()
                rows.append({"kind": "train", "step": step, "epoch": epoch, **dict(zip(STATS, means, strict=True))})
                window = []
        sums = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for x in test.epoch(0):
                for r, p in enumerate(x.tensor_split(world_size)):
                    log_px, kl = on_rank(r, lambda p=p: model.log_px_and_kl(p))
                    sums += torch.stack([(log_px - kl).sum(), kl.sum(), log_px.sum()]).double()
        means = (sums / len(splits.test)).tolist()
        rows.append({"kind": "eval", "step": step, "epoch": epoch, **dict(zip(EVAL_STATS, means, strict=True))})
    return model.state_dict(), rows


def _result(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor], list[dict]]:
    config = json.loads((run_dir / "config.json").read_text())
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return config, state, rows


def _assert_same(state, rows, expected_state, expected_rows, rtol: float, atol: float) -> None:
    assert state.keys() == expected_state.keys()
    for name, value in expected_state.items():
        torch.testing.assert_close(state[name], value, rtol=rtol, atol=atol, msg=name)
    assert [(r["kind"], r["step"], r["epoch"]) for r in rows] == [
        (r["kind"], r["step"], r["epoch"]) for r in expected_rows
    ]
    for row, expected in zip(rows, expected_rows, strict=True):
        for key in STATS if row["kind"] == "train" else EVAL_STATS:
            assert row[key] == pytest.approx(expected[key], rel=rtol, abs=atol), (row, expected)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, program: tuple[str, ...] = ("-m", "fastvae.train")) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m fastvae.train ARGS` on the CPU (gloo)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    return subprocess.run([*launcher, *program, *args], capture_output=True, text=True, timeout=120, env=_env())


@pytest.mark.slow
def test_emulation_with_one_rank_is_the_cli_run(tmp_path):
    out = tmp_path / "single"
    result = subprocess.run(
        [sys.executable, "-m", "fastvae.train", *RUN, "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config, state, rows = _result(out)
    assert config["world_size"] == 1
    _assert_same(state, rows, *_emulate(config, world_size=1), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_torchrun_two_processes_match_the_global_batch(tmp_path):
    out = tmp_path / "ddp"
    result = _torchrun(*RUN, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("Training on sprites") == 1, result.stdout  # only rank 0 prints
    assert "2 processes, global batch 32" in " ".join(result.stdout.split())  # the console wraps lines
    config, state, rows = _result(out)
    assert config["world_size"] == 2 and config["batch_size"] == 32
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "metrics.jsonl", "checkpoint.pt", ckpt.PREVIOUS, rundir.LOCK_FILE]
        + [name for name in rundir.PICTURES if name != "manifold.png"]
    )  # latent dim 4: no manifold.png; one process (rank 0) wrote the run, so one lock and no temporary files
    expected_state, expected_rows = _emulate(config, world_size=2)
    # Rank 0's metrics alone, or noise shared by the ranks, would be off by far more than this.
    _assert_same(state, rows, expected_state, expected_rows, rtol=1e-5, atol=1e-6)
    _, one_rank_rows = _emulate(config, world_size=1)
    assert rows[-1]["test_elbo"] != pytest.approx(one_rank_rows[-1]["test_elbo"], rel=1e-5)  # noise matters


@pytest.mark.slow
def test_torchrun_resume_continues_exactly_or_on_another_world_size(tmp_path):
    """Stopped after step 6 (mid statistics window), a 2-process run resumed under torchrun ends exactly where
    an uninterrupted one does: every rank gets back its own noise stream and window sums. Resumed by a single
    process instead, the run goes on with the same global batches and fresh noise."""
    out = tmp_path / "ddp"
    stopped = _torchrun(*RUN, "--out", str(out), "--stop-after", "6")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 6 and len(checkpoint["ranks"]) == 2
    assert not torch.equal(checkpoint["ranks"][0]["rng"]["torch"], checkpoint["ranks"][1]["rng"]["torch"])
    single = tmp_path / "single"
    shutil.copytree(out, single)

    resumed = _torchrun("--resume", str(out))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming at step 6" in resumed.stdout
    config, state, rows = _result(out)
    _assert_same(state, rows, *_emulate(config, world_size=2), rtol=1e-5, atol=1e-6)

    result = subprocess.run(
        [sys.executable, "-m", "fastvae.train", "--resume", str(single)],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config, _, single_rows = _result(single)
    assert config["world_size"] == 1 and [r["world_size"] for r in config["resumed"]] == [1]
    assert [(r["kind"], r["step"]) for r in single_rows] == [(r["kind"], r["step"]) for r in rows]
    assert single_rows[0] == rows[0]  # written before the stop
    assert all(math.isfinite(r["test_elbo"]) for r in single_rows if r["kind"] == "eval")


@pytest.mark.slow
def test_under_torchrun_only_rank_0_writes_tensorboard_events(tmp_path):
    """One event file (each writer makes its own), holding the rows of rank 0's metrics.jsonl."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "ddp"
    result = _torchrun(*RUN, "--epochs", "1", "--out", str(out), "--tensorboard", "--no-pictures")
    assert result.returncode == 0, result.stdout + result.stderr
    files = list((out / "tensorboard").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents."), files
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    _, _, rows = _result(out)
    expected = [(row["step"], pytest.approx(row["elbo"], rel=1e-6)) for row in rows if row["kind"] == "train"]
    assert [(event.step, event.value) for event in events.Scalars("train/elbo")] == expected


PROBE = str(Path(__file__).with_name("ddp_shutdown_probe.py"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["wrap"], 0),
        (["train", *RUN], 0),
        (["train", *RUN, "--stop-after", "6"], 0),
        (["train", *RUN, "--batch-size", "512"], 2),
    ],
    ids=["ddp-module", "finished", "stopped", "failed"],
)
def test_every_rank_ends_its_process_group_before_it_exits(tmp_path, args, code):
    """The cause of the SIGABRTs at exit (docs/distributed.md): a process group that outlived
    destroy_process_group, whose threads then freed tensors while the interpreter shut down. After a bare
    DDP module, a finished run, a stopped one (an exception through the trainer's frames) and a failed one,
    no gloo thread may be left on either rank, so that the exit cannot race them. Checked directly, not by
    repetition."""
    out = ["--out", str(tmp_path / "run")] if args[0] == "train" else []
    result = _torchrun(*args, *out, program=(PROBE,))
    assert result.returncode == (code and 1), result.stdout + result.stderr  # torchrun: 1 if a worker failed
    for rank in (0, 1):
        assert f"rank {rank}: exit code {code}, gloo threads left []" in result.stdout, result.stdout + result.stderr
