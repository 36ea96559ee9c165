"""Every Python package in the source tree is listed in pyproject, with kernels/ as fastvae.kernels."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = config["package-dir"]
    assert package_dir["fastvae.kernels"] == "kernels"
    found = set()
    for source_root, prefix in (("fastvae", "fastvae"), ("kernels", "fastvae.kernels")):
        for init in (ROOT / source_root).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / source_root).parts
            found.add(".".join((prefix, *parts)))
    assert found == set(config["packages"])


def test_kernels_import_as_part_of_fastvae():
    import fastvae.kernels.latent as latent

    assert Path(latent.__file__).resolve().parent == ROOT / "kernels"
