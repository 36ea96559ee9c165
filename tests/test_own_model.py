"""Your own model in the engine: `--model MODULE:FACTORY`, `fastvae.fit`, `load_run(..., model=)` and the trust
rules (only a MODULE:ATTR string is ever imported). The factories are in tests/own_models.py.

Each way of training (the CLI with a factory, `fastvae.fit` with an instance and an array, `fastvae.fit` under
torchrun with a factory) is stopped mid-way, resumed, and must end bitwise where an uninterrupted run ends:
the same metrics rows (timing aside) and the same parameters, Adam moments and RNG state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import own_models
import pytest
import torch
from run_helpers import TIMING, assert_same_state, metrics_rows
from torch import nn

import fastvae
import fastvae.data
from fastvae import checkpoint, evaluate, train
from fastvae.data import load_dataset
from fastvae.options import ConfigError

TESTS = Path(__file__).resolve().parent
SHAPE = (1, 8, 8)
# 128 sprites of 8x8 in batches of 32: 4 steps per epoch, 2 epochs; statistics every 3 steps, so a stop after
# step 5 falls inside a statistics window and inside the second epoch.
CLI = [
    "--num-train", "128", "--num-test", "32", "--image-size", "8", "--batch-size", "32", "--epochs", "2",
    "--log-every", "3", "--lr", "3e-3", "--device", "cpu", "--no-pictures",
]  # fmt: skip
FIT = {"batch_size": 32, "epochs": 2, "log_every": 3, "lr": 3e-3, "device": "cpu", "pictures": False}
FACTORY = ["--model", "own_models:flat_vae", "--model-args", '{"width": 12}']


def _untimed(rows: dict[str, dict]) -> dict[str, dict]:
    return {kind: {k: v for k, v in row.items() if k not in TIMING} for kind, row in rows.items()}


def _last_rows(run_dir: Path) -> dict[str, dict]:
    """The last metrics row of each kind in the run's metrics.jsonl."""
    return {row["kind"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _same_weights(model: fastvae.VAE, run_dir: Path) -> bool:
    weights = checkpoint.load(run_dir / "checkpoint.pt")["model"]
    return model.state_dict().keys() == weights.keys() and all(
        torch.equal(value.cpu(), weights[name]) for name, value in model.state_dict().items()
    )


# ------------------------------------------------------------------------------------ the CLI, a factory


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """An uninterrupted CLI run of the factory."""
    out = tmp_path_factory.mktemp("cli") / "whole"
    assert train.main([*CLI, *FACTORY, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_a_factory_run_from_the_cli_resumes_exactly(cli_run, tmp_path):
    out = tmp_path / "stopped"
    assert train.main([*CLI, *FACTORY, "--out", str(out), "--stop-after", "5"]) == 0
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 5
    assert train.main(["--resume", str(out)]) == 0  # the factory is imported again, from config.json
    assert metrics_rows(out) == metrics_rows(cli_run)
    assert_same_state(out, cli_run)
    config = json.loads((cli_run / "config.json").read_text())
    assert (config["model_source"], config["model"], config["model_args"]) == (
        "factory", "own_models:flat_vae", {"width": 12}
    )
    assert (config["latent_dim"], config["likelihood"], config["arch"]) == (3, "bernoulli", "custom")


@pytest.mark.slow
def test_load_run_and_evaluate_rebuild_a_factory_run(cli_run, capsys):
    model, config = fastvae.load_run(cli_run, device="cpu")
    assert isinstance(model.encoder, own_models.Encoder) and model.latent_dim == 3
    assert _same_weights(model, cli_run)
    assert model.sample(2).shape == (2, *SHAPE)
    assert evaluate.main([str(cli_run), "--iw-samples", "2", "--device", "cpu"]) == 0
    assert json.loads((cli_run / "eval.json").read_text())["num_test"] == config["num_test"]


# --------------------------------------------------------------------- fastvae.fit: an instance, an array


def _sprites() -> torch.Tensor:
    """An array of 160 sprites (N, 1, 8, 8) uint8: fit splits off the last 10% as the test split, which leaves
    4 steps of 32 per epoch, as CLI has."""
    return load_dataset("sprites", num_train=160, num_test=1, image_size=8).train


def _fresh_model() -> fastvae.VAE:
    torch.manual_seed(7)
    return own_models.flat_vae(SHAPE, width=12)


@pytest.mark.slow
def test_fit_with_an_instance_and_an_array_resumes_exactly(tmp_path, capsys):
    data = _sprites()
    whole_model = _fresh_model()
    whole, final = fastvae.fit(whole_model, data, out=tmp_path / "whole", **FIT)
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps lines
    assert f"Load the model with: fastvae.load_run({str(whole)!r})" in printed and "Evaluate with" not in printed
    assert whole == tmp_path / "whole" and _untimed(final) == _untimed(_last_rows(whole))
    assert _same_weights(whole_model, whole)  # the instance was trained in place

    stopped, partial = fastvae.fit(_fresh_model(), data, out=tmp_path / "stopped", stop_after=5, **FIT)
    assert _untimed(partial) == _untimed(_last_rows(stopped))
    assert checkpoint.load(stopped / "checkpoint.pt")["step"] == 5
    resumed, final_resumed = fastvae.fit(own_models.flat_vae(SHAPE, width=12), data, resume=stopped)
    assert resumed == stopped and _untimed(final_resumed) == _untimed(final)
    assert metrics_rows(resumed) == metrics_rows(whole)
    assert_same_state(resumed, whole)

    config = json.loads((whole / "config.json").read_text())
    assert (config["model_source"], config["model"], config["dataset"]) == ("in-process", None, "array")
    assert config["model_class"] == "fastvae.model.VAE" and config["data_in_process"]
    with pytest.raises(fastvae.RunError, match=r"given in-process to fastvae\.fit.*load_run\(RUN_DIR, model=model\)"):
        fastvae.load_run(whole)
    model, _ = fastvae.load_run(whole, model=own_models.flat_vae(SHAPE, width=12))  # imports nothing
    assert _same_weights(model, whole)
    with pytest.raises(fastvae.RunError, match=r"data_shape \(64,\), but the data's samples have shape \(1, 8, 8\)"):
        fastvae.load_run(whole, model=own_models.flat_vae((64,), width=12))
    gaussian = own_models.flat_vae(SHAPE, width=12, likelihood="gaussian")
    with pytest.raises(ConfigError, match=r"model differs from the run's \(likelihood \"gaussian\", was \"bernoulli"):
        fastvae.fit(gaussian, data, resume=whole)
    with pytest.raises(ConfigError, match=r"the run's data were given in-process to fastvae\.fit"):
        train.train(train.build_parser().parse_args(["--resume", str(whole)]), train.Console(), set())


# ------------------------------------------------------------------------------------ fit under torchrun


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 tests/own_model_fit_probe.py ARGS` on the CPU (gloo)."""
    from test_distributed import _env, _free_port

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    return subprocess.run(
        [*launcher, str(TESTS / "own_model_fit_probe.py"), *args], capture_output=True, text=True, timeout=300,
        env=_env(),
    )  # fmt: skip


@pytest.mark.slow
def test_fit_under_torchrun_resumes_exactly(tmp_path):
    runs = {}
    for name, args in (("whole", ()), ("stopped", ("5",)), ("stopped", ("resume",))):
        result = _torchrun(str(tmp_path / name), *args)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = json.loads(result.stdout.strip().splitlines()[-1])
    whole, resumed = tmp_path / "whole", tmp_path / "stopped"
    assert _untimed(runs["stopped"]) == _untimed(runs["whole"])
    assert metrics_rows(resumed) == metrics_rows(whole)
    assert_same_state(resumed, whole)
    config = json.loads((whole / "config.json").read_text())
    assert (config["world_size"], config["model_source"], config["model"]) == (2, "factory", "own_models:flat_vae")
    model, _ = fastvae.load_run(whole, device="cpu")  # rebuilt by import
    assert _same_weights(model, whole)


# ------------------------------------------------------------------------------------------ bad options


SMALL = ["--num-train", "64", "--num-test", "8", "--image-size", "8", "--batch-size", "16", "--device", "cpu"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [*FACTORY, "--latent-dim", "4", "--sigma", "0.5"],
            "--latent-dim and --sigma apply to the built-in models only; your own model (--model) sets them",
        ),
        (["--model-args", '{"width": 8}'], "--model-args applies to --model MODULE:FACTORY (a factory) only"),
        (["--model", "own_models:flat_vae", "--model-args", "{width: 8}"], "--model-args: expected a JSON object"),
        (["--model", "own_models:flat_vae()"], "is not of the form MODULE:FACTORY"),
        (["--model", "no_such_module_here:make"], "cannot import no_such_module_here: ModuleNotFoundError"),
        (["--model", "own_models:nowhere"], "own_models has no attribute nowhere"),
        (["--model", "own_models:NOT_CALLABLE"], "NOT_CALLABLE is a int, not a callable factory"),
        (["--model", "own_models:not_a_vae"], "returned a Linear: it must be a fastvae.VAE, got Linear"),
        (
            ["--model", "own_models:other_shape"],
            "has data_shape (65,), but the data's samples have shape (1, 8, 8)",
        ),
        (["--model", "own_models:failing"], "raised RuntimeError: cannot build a model for (1, 8, 8)"),
        (
            ["--model", "own_models:flat_vae", "--model-args", '{"depth": 2}'],
            "raised TypeError: flat_vae() got an unexpected keyword argument 'depth'",
        ),
    ],
    ids=[
        "built-in-options", "args-without-model", "bad-json", "not-module-attr", "no-module", "no-attribute",
        "not-callable", "not-a-vae", "data-shape", "factory-raises", "factory-args",
    ],  # fmt: skip
)
def test_a_bad_own_model_is_one_error_line(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    try:
        code = train.main([*SMALL, *args, "--out", str(out)])
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_bad_fit_options_raise_one_clear_exception(tmp_path):
    data = _sprites()
    with pytest.raises(fastvae.FitOptionError, match=r"unknown options epoch, lrate; it takes .*checkpoint_every"):
        fastvae.fit(own_models.flat_vae, data, epoch=2, lrate=0.1)
    with pytest.raises(fastvae.FitOptionError, match=r"^epochs=0: must be >= 1, got 0$"):
        fastvae.fit(own_models.flat_vae, data, epochs=0)
    with pytest.raises(fastvae.FitOptionError, match=r"^cuda_graphs='yes': expected True or False$"):
        fastvae.fit(own_models.flat_vae, data, cuda_graphs="yes")
    with pytest.raises(fastvae.FitOptionError, match=r"^amp='fp8': invalid choice: 'fp8'"):
        fastvae.fit(own_models.flat_vae, data, amp="fp8")
    with pytest.raises(fastvae.FitOptionError, match=r"model must be a fastvae\.VAE, a factory .* got int"):
        fastvae.fit(3, data)
    with pytest.raises(fastvae.FitOptionError, match=r"data must be a data set name, a path, or an array"):
        fastvae.fit(own_models.flat_vae, [1.0, 2.0])
    assert issubclass(fastvae.FitOptionError, TypeError) and issubclass(fastvae.FitOptionError, ConfigError)
    with pytest.raises(ConfigError, match=r"^--likelihood apply to the built-in models only"):
        fastvae.fit(_fresh_model(), data, likelihood="bernoulli", out=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"^--model-args applies to --model MODULE:FACTORY"):
        fastvae.fit(_fresh_model(), data, model_args={"width": 4}, out=tmp_path / "b")
    with pytest.raises(ConfigError, match=r"^the model given to fastvae\.fit has data_shape \(3,\)"):
        fastvae.fit(own_models.flat_vae((3,)), data, out=tmp_path / "c", device="cpu")
    with pytest.raises(fastvae.data.DataError, match=r"values lie in \[-.*, but the model's likelihood is bernoulli"):
        fastvae.fit(own_models.flat_vae((4,)), torch.randn(40, 4), out=tmp_path / "d", device="cpu", batch_size=8)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------- trust and hand-made runs


def _with_config(run_dir: Path, out: Path, change) -> Path:
    """A copy of the run whose checkpoint's config went through `change` (which edits it in place)."""
    out.mkdir()
    state = checkpoint.load(run_dir / "checkpoint.pt")
    change(state["config"])
    checkpoint.save(out / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    return out


@pytest.mark.slow
def test_only_a_module_attr_string_is_ever_imported(cli_run, tmp_path, monkeypatch):
    """A config naming anything but MODULE:ATTR is refused before any import; the trap module shows that the
    MODULE:ATTR form itself is imported (so the refusal is what kept it out)."""
    (tmp_path / "trap_module.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported').touch()\n"
        "def make(data_shape, **model_args):\n    raise RuntimeError('the factory ran')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for index, spec in enumerate(["trap_module:make()", "trap_module:make; import os", "__import__('trap_module')"]):
        run = _with_config(cli_run, tmp_path / f"run{index}", lambda c, spec=spec: c.update(model=spec))
        with pytest.raises(fastvae.RunError, match="is not of the form MODULE:FACTORY .*nothing was imported"):
            fastvae.load_run(run)
        assert "trap_module" not in sys.modules and not (tmp_path / "imported").exists()
    run = _with_config(cli_run, tmp_path / "valid", lambda c: c.update(model="trap_module:make"))
    with pytest.raises(fastvae.RunError, match=r"trap_module:make\(\(1, 8, 8\), width=12\) raised RuntimeError"):
        fastvae.load_run(run)
    assert (tmp_path / "imported").exists()
    monkeypatch.delitem(sys.modules, "trap_module")


@pytest.mark.slow
def test_a_run_without_versions_or_shape_names_what_is_missing(cli_run, tmp_path):
    """A run driven by hand: its config lacks the versions and the data shape. The message says so, in
    one line (not "written by fastvae ?"), and the weights load into a model passed in."""

    def strip(config: dict) -> None:
        for key in ("versions", "data_shape", "model_source", "model"):
            config.pop(key)

    run = _with_config(cli_run, tmp_path / "bare", strip)
    with pytest.raises(fastvae.RunError) as info:
        fastvae.load_run(run)
    message = str(info.value)
    assert "no 'data_shape' setting (its config names no fastvae version, this is" in message
    assert "fastvae ?" not in message and "\n" not in message and "load_run(run_dir, model=...)" in message
    model, _ = fastvae.load_run(run, model=own_models.flat_vae(SHAPE, width=12))
    assert _same_weights(model, cli_run)


def _pair_model(latent_shape: tuple[int, int]) -> fastvae.VAE:
    """K = 2 in the latent shape (1, 2) or (2, 1), moments (N, 2, 2) or (N, 4, 1): the same weights either way."""
    torch.manual_seed(3)
    encoder = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (2 * latent_shape[0], latent_shape[1])))
    return fastvae.VAE(4, latent_shape, encoder=encoder, decoder=nn.Sequential(nn.Flatten(), nn.Linear(2, 4)))


def test_a_run_records_its_latent_shape_and_a_resume_keeps_it(tmp_path):
    data = torch.rand(40, 4, generator=torch.Generator().manual_seed(0))
    options = {"batch_size": 8, "epochs": 2, "device": "cpu", "pictures": False}
    run, _ = fastvae.fit(_pair_model((1, 2)), data, out=tmp_path / "run", stop_after=2, **options)
    config = json.loads((run / "config.json").read_text())
    assert (config["latent_dim"], config["latent_shape"]) == (2, [1, 2])
    with pytest.raises(ConfigError, match=r"model differs from the run's \(latent_shape \[2, 1\], was \[1, 2\]\)"):
        fastvae.fit(_pair_model((2, 1)), data, resume=run)
