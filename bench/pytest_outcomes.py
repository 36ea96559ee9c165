"""A pytest plugin that writes one JSON line per test outcome as each test finishes, so a run that is
stopped part-way (a time budget) still says what ran and how. `python -m bench.gpu_check` loads it:

    python -m pytest -p bench.pytest_outcomes --outcomes-jsonl PATH ...

Lines: {"collected": N} once collection is done; then per outcome {"test", "outcome", "when", "seconds",
"line"}, with outcome one of passed, failed, error (in collection, set-up or tear-down), skipped, xfailed,
xpassed, and "line" the failure's message as pytest's short summary gives it, or the skip's reason; a
failure or error also has "report", the end of its traceback (the last 3000 characters). As in pytest's
own counts, a test that fails and then errors in its tear-down has two lines.
"""

from __future__ import annotations

import json

import pytest

REPORT_CHARS = 3000


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--outcomes-jsonl", default=None, help="append one JSON line per test outcome here")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--outcomes-jsonl")
    if path:
        config.pluginmanager.register(OutcomeWriter(path), "outcome-writer")


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
