"""Render a results JSON written by a benchmark's `--json PATH` as Markdown, for docs/benchmarks.md.

    python -m bench.report bench/results/elbo_head_cpu.json
    python -m bench.report bench/results/train_throughput_cpu.json

Also the pieces of `python -m bench.gpu_check`'s summary.md: a results table under its command and
environment (`section`), the kit's steps and the test suite's outcomes.
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


def _gbs(r: dict, bandwidth: float | None) -> str:
    """Achieved GB/s, with its share of the measured copy bandwidth."""
    gbs = r.get("gbs")
    if not gbs:
        return "–"
    return f"{gbs:,.0f}" + (f" ({100 * gbs / bandwidth:.0f}%)" if bandwidth else "")


def elbo_head_markdown(data: dict) -> list[str]:
    """"fwd ms" to "fwd+bwd ms": as called, launches included; "graph ms": fwd+bwd replayed from a CUDA graph
    (device time); "GB/s": the fused op's design bytes over the graph time, as a share of the copy bandwidth."""
    lines = [
        "| head | B | D | K | dtype | dist | impl | fwd ms | bwd ms | fwd+bwd ms | graph ms | GB/s (% of copy) "
        "| saved MB | ops/step | moved MB | peak MB | launches |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bandwidth = data.get("copy_bandwidth_gbs")
    for r in data["results"]:
        c = r["case"]
        lines.append(
            f"| {c.get('head', 'flat')} | {c['B']} | {c['D']} | {c['K']} | {c['dtype']} | {c['dist']} | {r['impl']} | "
            f"{_ms(r['fwd_ms'])} | "
            f"{_ms(r['bwd_ms'])} | {_ms(r['fwd_bwd_ms'])} | {_ms(r.get('graph_ms'))} | {_gbs(r, bandwidth)} | "
            f"{_mb(r['saved_bytes'])} | {r['ops_per_step'] or '–'} | {_mb(r['moved_bytes'])} | "
            f"{_mb(r.get('peak_extra_bytes'))} | {r.get('launches_per_step') or '–'} |"
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


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


def generic_markdown(data: dict) -> list[str]:
    """A table of any benchmark's "results" (a list of flat objects): one column per key."""
    results = data.get("results") or []
    columns = list(dict.fromkeys(key for r in results for key in r))
    if not columns:
        return ["(no results)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in results]
    return lines


RENDERERS = {"train_throughput": train_throughput_markdown, "elbo_head": elbo_head_markdown}


def markdown(data: dict) -> str:
    render = RENDERERS.get(data.get("benchmark"), generic_markdown)
    environment = [_environment_line(data["environment"]), ""] if "environment" in data else []
    return "\n".join([*environment, *render(data)])


def section(title: str, command: str, data: dict | None, note: str = "") -> list[str]:
    """A results table as docs/benchmarks.md has it: a heading, the command, the environment, the table."""
    lines = [f"## {title}", "", f"Command: `{command}`", ""]
    if note:
        lines += [note, ""]
    return lines + [markdown(data) if data else "No results: see the step's line above.", ""]


def steps_markdown(steps: list[dict]) -> list[str]:
    """The kit's steps: "allowed s" is a step's share of the budget plus what the steps before it left."""
    lines = ["| step | status | seconds | allowed s | result |", "|---|---|---|---|---|"]
    for s in steps:
        cells = [s["name"], s["status"], f"{s['seconds']:.0f}", f"{s['allowed_s']:.0f}", _cell(s["line"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tests_line(tests: dict) -> str:
    """'N of M tests ran: a failed, b passed, ...' from tests.json."""
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(tests["counts"].items())) or "no outcomes"
    collected = "?" if tests["collected"] is None else tests["collected"]
    return f"{tests['ran']} of {collected} tests ran: {counts}"


TRACEBACKS = 10  # failures whose tracebacks summary.md shows (tests.json has every one)
TRACEBACK_CHARS = 1500  # of each: its end, where the assertion is


def tests_markdown(tests: dict) -> list[str]:
    """A test step's counts, the test running when it stopped, every failure with its first line, the first
    failures' tracebacks (their ends), and the skips by reason."""
    lines = [f"Command: `{tests['command']}`", "", f"{tests_line(tests)} ({tests['seconds']:.0f} s)."]
    if tests["cut"]:
        lines.append(f"Cut short at the step's deadline: {tests['not_reached']} tests not reached.")
    if tests["running"]:
        lines.append(f"Running when it stopped: `{tests['running']}` (the last to finish: "
                     f"`{tests['last_finished'] or 'none'}`).")  # fmt: skip
    failures = tests["failures"]
    if failures:
        lines += ["", "| test | phase | first line |", "|---|---|---|"]
        lines += [f"| `{f['test']}` | {f['when']} | {_cell(f['line'])} |" for f in failures]
        shown = f"the first {TRACEBACKS}" if len(failures) > TRACEBACKS else "each"
        lines += ["", f"The end of {shown} failure's traceback (tests.json has them all):"]
        for f in failures[:TRACEBACKS]:
            lines += ["", f"`{f['test']}` ({f['when']}):", "", "```text",
                      f["report"][-TRACEBACK_CHARS:].strip() or f["line"], "```"]  # fmt: skip
    if tests["skips"]:
        lines += ["", "Skipped: " + "; ".join(f"{s['count']} × {s['reason']}" for s in tests["skips"]) + "."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json_path")
    args = p.parse_args()
    with open(args.json_path) as f:
        print(markdown(json.load(f)))


if __name__ == "__main__":
    main()
