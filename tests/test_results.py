"""What a run reports besides nats: bits per dimension, a learned sigma's statistics, and
`python -m fastvae.evaluate`'s command line (one `error:` line, clean --help)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fastvae import evaluate, options, train
from fastvae.units import bits_per_dim

TINY = ["--num-train", "256", "--num-test", "64", "--batch-size", "64", "--hidden", "32", "--latent-dim", "2"]


def test_bits_per_dim_bernoulli_and_eight_bit_gaussian():
    assert bits_per_dim(-784 * math.log(2), 784, "bernoulli", eight_bit=False) == pytest.approx(1.0)
    # a Gaussian density on x/255: the dequantised discrete likelihood adds D ln 256 nats
    assert bits_per_dim(784 * math.log(256), 784, "gaussian", eight_bit=True) == pytest.approx(0.0)
    assert bits_per_dim(-784.0, 784, "gaussian", eight_bit=True) == pytest.approx((1 + math.log(256)) / math.log(2))
    assert bits_per_dim(-10.0, 784, "gaussian", eight_bit=False) is None  # a density on real-valued data


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "learned"
    code = train.main([*TINY, "--sigma", "learned", "--epochs", "1", "--log-every", "2", "--no-pictures",
                       "--out", str(out)])
    assert code == 0
    return out


def test_learned_sigma_and_bpd_in_metrics_summary_and_eval(learned_run, capsys):
    config = json.loads((learned_run / "config.json").read_text())
    assert config["data_8bit"] is True
    rows = [json.loads(line) for line in (learned_run / "metrics.jsonl").read_text().splitlines()]
    train_row, eval_row = rows[0], [r for r in rows if r["kind"] == "eval"][-1]
    assert 0 < train_row["sigma_min"] <= train_row["sigma_mean"] <= train_row["sigma_max"]
    d = math.prod(config["data_shape"])
    assert eval_row["test_bpd"] == pytest.approx((-eval_row["test_elbo"] / d + math.log(256)) / math.log(2))
    assert evaluate.main([str(learned_run), "--iw-samples", "4", "--chunk", "4"]) == 0
    results = json.loads((learned_run / "eval.json").read_text())
    assert results["test_elbo"]["bpd"] == pytest.approx(
        (-results["test_elbo"]["mean"] / d + math.log(256)) / math.log(2)
    )
    assert results["iwae"]["bpd"] < results["test_elbo"]["bpd"] + 0.1
    assert 0 < results["sigma"]["min"] <= results["sigma"]["mean"] <= results["sigma"]["max"]
    out = capsys.readouterr().out
    assert "bits/dim" in out and "learned σ" in out


@pytest.mark.parametrize(
    "argv", [["RUN", "--iw-samples", "x"], ["RUN", "--bogus"], []], ids=["bad-int", "unknown", "missing"]
)
def test_evaluate_bad_arguments_give_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_evaluate_help_is_clean(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and text.count("(default: the run's)") == 1
    for action in evaluate.build_parser()._actions:
        assert action.help, action.dest


@pytest.mark.parametrize("name", ["gpu", "tpu:0"], ids=["a-word", "unknown-type"])
def test_a_bad_device_is_one_short_line(name):
    with pytest.raises(options.ConfigError) as err:
        options.resolve_device(name)
    message = str(err.value)
    assert "\n" not in message and "privateuseone" not in message and name in message
