"""The complete example in docs/drop-in.md runs as written and trains."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "drop-in.md"


def test_drop_in_example_runs_and_lowers_the_loss(capsys):
    text = DOC.read_text()
    section = text.split("## A complete example", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    printed = capsys.readouterr().out
    first, last = (float(v) for v in re.findall(r"negative ELBO ([\d.]+) nats", printed))
    assert last < first - 20, printed
