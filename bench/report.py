"""Render a results JSON written by a benchmark's `--json PATH` as Markdown, for docs/benchmarks.md.

    python -m bench.report bench/results/elbo_head_cpu.json
    python -m bench.report bench/results/train_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import json


def _ms(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _mb(v) -> str:
    return "–" if not v else f"{v / 2**20:.2f}"


def _environment_line(env: dict) -> str:
    return (
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; commit {env['commit']}; "
        f"date {env['date']}; TRITON_INTERPRET={env['triton_interpret']}."
    )


def elbo_head_markdown(data: dict) -> list[str]:
    lines = [
        "| B | D | K | dtype | dist | impl | fwd ms | bwd ms | fwd+bwd ms | saved MB | ops/step | moved MB "
        "| peak MB | launches |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        c = r["case"]
        lines.append(
            f"| {c['B']} | {c['D']} | {c['K']} | {c['dtype']} | {c['dist']} | {r['impl']} | {_ms(r['fwd_ms'])} | "
            f"{_ms(r['bwd_ms'])} | {_ms(r['fwd_bwd_ms'])} | {_mb(r['saved_bytes'])} | {r['ops_per_step'] or '–'} | "
            f"{_mb(r['moved_bytes'])} | {_mb(r.get('peak_extra_bytes'))} | {r.get('launches_per_step') or '–'} |"
        )
    return lines


def train_throughput_markdown(data: dict) -> list[str]:
    lines = [
        "| system | batch | epochs timed | median epoch s | samples/s | vs baseline | test loss (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    baseline = {r["batch_size"]: r for r in data["results"] if r["system"] == "baseline"}
    for r in data["results"]:
        base = baseline.get(r["batch_size"])
        speedup = f"{r['samples_per_s'] / base['samples_per_s']:.1f}×" if base and base is not r else "–"
        lines.append(
            f"| {r['system']} | {r['batch_size']} | {len(r['epoch_seconds'])} | {r['median_epoch_s']:.2f} | "
            f"{r['samples_per_s']:,.0f} | {speedup} | {r['test_loss']:.2f} |"
        )
    return lines


def markdown(data: dict) -> str:
    render = train_throughput_markdown if data.get("benchmark") == "train_throughput" else elbo_head_markdown
    return "\n".join([_environment_line(data["environment"]), "", *render(data)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json_path")
    args = p.parse_args()
    with open(args.json_path) as f:
        print(markdown(json.load(f)))


if __name__ == "__main__":
    main()
