"""Render a results JSON written by `python -m bench.elbo_head --json PATH` as a Markdown table.

    python -m bench.report bench/results/elbo_head_cpu.json
"""

from __future__ import annotations

import argparse
import json


def _ms(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _mb(v) -> str:
    return "–" if not v else f"{v / 2**20:.2f}"


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; commit {env['commit']}; "
        f"date {env['date']}; TRITON_INTERPRET={env['triton_interpret']}.",
        "",
        "| B | D | K | dtype | dist | impl | fwd ms | bwd ms | fwd+bwd ms | saved MB | ops/step | moved MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        c = r["case"]
        lines.append(
            f"| {c['B']} | {c['D']} | {c['K']} | {c['dtype']} | {c['dist']} | {r['impl']} | {_ms(r['fwd_ms'])} | "
            f"{_ms(r['bwd_ms'])} | {_ms(r['fwd_bwd_ms'])} | {_mb(r['saved_bytes'])} | {r['ops_per_step'] or '–'} | "
            f"{_mb(r['moved_bytes'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json_path")
    args = p.parse_args()
    with open(args.json_path) as f:
        print(markdown(json.load(f)))


if __name__ == "__main__":
    main()
