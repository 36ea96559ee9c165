"""Worked examples, importable from the repository root (`python -m examples.NAME`, `--model examples.NAME:build`).
Not part of the installed fastvae package."""
