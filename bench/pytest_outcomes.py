"""A pytest plugin that writes one JSON line per test outcome as each test finishes, so a run that is
stopped part-way (a time budget) or crashes still says what ran, how, and what was running. `python -m
bench.gpu_check` loads it:

    python -m pytest -p bench.pytest_outcomes --outcomes-jsonl=PATH [--first-gpu-then FILE,...] ...

Lines: {"collected": N} once collection is done; {"started": NODEID} as each test begins and {"finished":
NODEID} once its tear-down is done; then per outcome {"test", "outcome", "when", "seconds", "line"}, with
outcome one of passed, failed, error (in collection, set-up or tear-down), skipped, xfailed, xpassed,
faulted (below), and "line" the failure's message as pytest's short summary gives it, or the skip's
reason; a failure or error also has "report", the end of its traceback (the last 3000 characters; with
`--tb=short`, a short one). As in pytest's own counts, a test that fails and then errors in its tear-down
has two outcome lines.

--first-gpu-then FILE,...: run only the tests marked `gpu` (from any file collected) and those of the files
named (by file name, e.g. test_latent.py), the gpu-marked ones first, then the files' tests in the order
the files are named; every other test collected is deselected.

--resume-after NODEID: deselect the tests up to NODEID, itself included, in the order they would run: how
bench.gpu_check goes on in a new process after a test crashed its process or left the CUDA context
broken.

A broken CUDA context: after each test, once the test process has initialised CUDA, the plugin
synchronises the device. After an illegal address or a device-side assert every CUDA call fails from then
on, and every later CUDA test would fail with it, hiding which test was at fault. So when the
synchronisation fails, the test gets an outcome "faulted" (when "teardown", the CUDA error as its line),
and the process ends at once with exit status FAULT_EXIT.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

REPORT_CHARS = 3000
FAULT_EXIT = 70  # the test process's exit status after a test left the CUDA context broken


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--outcomes-jsonl", default=None, help="append one JSON line per test outcome here")
    parser.addoption(
        "--first-gpu-then",
        default=None,
        metavar="FILE,...",
        help="only the gpu-marked tests, first, then the tests of these files in this order",
    )
    parser.addoption("--resume-after", default=None, metavar="NODEID",
                     help="deselect the tests up to this one, itself included, in their order")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--outcomes-jsonl")
    if path:
        config.pluginmanager.register(OutcomeWriter(path), "outcome-writer")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    first_gpu_then(config, items)
    after = config.getoption("--resume-after")
    if after is not None:
        ids = [item.nodeid for item in items]
        if after not in ids:
            raise pytest.UsageError(f"--resume-after {after}: no such test among those selected")
        done = ids.index(after) + 1
        config.hook.pytest_deselected(items=items[:done])
        del items[:done]


def first_gpu_then(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--first-gpu-then: keep the gpu-marked tests, first, and the named files' tests, in the files' order."""
    files = config.getoption("--first-gpu-then")
    if files is None:
        return
    rank = {name: i for i, name in enumerate(files.split(","))}

    def key(item: pytest.Item) -> int:
        """-1 for a gpu-marked test, else its file's place among the files named."""
        return -1 if item.get_closest_marker("gpu") else rank[item.path.name]

    kept, dropped = [], []
    for item in items:
        (kept if item.get_closest_marker("gpu") or item.path.name in rank else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = sorted(kept, key=key)  # stable: collection order within a file and among the gpu-marked


def message(report: pytest.TestReport | pytest.CollectReport) -> str:
    """One line: a failure's crash message as the short summary gives it, a skip's reason, or for a
    collection error the last `E` line of its report (the exception, e.g. a ModuleNotFoundError)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line number, "Skipped: reason")
        text = longrepr[2].removeprefix("Skipped: ")
    elif getattr(longrepr, "reprcrash", None) is not None:
        text = longrepr.reprcrash.message
    else:
        lines = str(longrepr or "").splitlines()
        errors = [line[1:].strip() for line in lines if line.startswith("E ")]
        text = errors[-1] if errors else "\n".join(lines)
    return next(iter(text.strip().splitlines()), "")


def cuda_fault() -> str | None:
    """The CUDA error that a synchronisation of the device raises, if this process has initialised CUDA
    and its context is broken; None otherwise (torch is not imported here: it is never loaded for this)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
    except Exception as err:  # torch.AcceleratorError, a RuntimeError; whatever the driver raises
        return next(iter(str(err).strip().splitlines()), type(err).__name__)
    return None


def outcome(report: pytest.TestReport) -> str | None:
    """The outcome this phase's report settles: any failure or skip, or the call's result; else None."""
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.failed:
        return "failed" if report.when == "call" else "error"
    if report.skipped or report.when == "call":
        return report.outcome
    return None


class OutcomeWriter:
    """Appends the JSON lines to `path`, each as soon as it is known."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.write({"collected": len(session.items)})

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.write({"started": nodeid})

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        fault = cuda_fault()
        if fault is not None:
            self.write({"test": nodeid, "outcome": "faulted", "when": "teardown", "seconds": 0.0, "line": fault,
                        "report": f"after this test the CUDA context was broken: {fault}"})  # fmt: skip
        self.write({"finished": nodeid})
        if fault is not None:
            os._exit(FAULT_EXIT)  # no later test can use CUDA in this process; the kit starts a new one

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.write({"test": report.nodeid, "outcome": "error", "when": "collect", "seconds": 0.0,
                        "line": message(report), "report": report.longreprtext[-REPORT_CHARS:]})  # fmt: skip

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        result = outcome(report)
        if result is None:
            return
        line = "" if result == "passed" else message(report)
        record = {"test": report.nodeid, "outcome": result, "when": report.when,
                  "seconds": round(report.duration, 3), "line": line}  # fmt: skip
        if result in ("failed", "error"):
            record["report"] = report.longreprtext[-REPORT_CHARS:]
        self.write(record)
