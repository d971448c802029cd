"""An install from a wheel (``pip install .`` or from git, as on a cluster) has what capfilt reads
at run time besides its code: the shipped recipes, found by name."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import capfilt
from capfilt.config import RECIPES_DIR, shipped_recipe_names

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(capfilt.__file__).resolve().parent


def _package_data_globs() -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    return project["tool"]["setuptools"]["package-data"]["capfilt"]


def test_package_data_covers_every_shipped_recipe():
    assert RECIPES_DIR.parent == PACKAGE  # inside the package, not beside it in the checkout
    shipped = {p for p in RECIPES_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {"tiny", "demo", "blip-base", "real-cpu"} <= set(shipped_recipe_names())
    covered = {p for pattern in _package_data_globs() for p in PACKAGE.glob(pattern)}
    assert shipped - covered == set(), "files under capfilt/recipes that a wheel would leave out"


def _can_build_wheels_offline() -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the ``wheel`` package."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    major, minor = (int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1)


@pytest.mark.slow
@pytest.mark.skipif(
    not _can_build_wheels_offline(), reason="no setuptools here that builds wheels offline"
)
def test_a_wheel_install_loads_the_shipped_recipes_by_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "capfilt", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + [str(src), "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("capfilt-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    for recipe in RECIPES_DIR.rglob("*"):
        if recipe.is_file():
            assert f"capfilt/{recipe.relative_to(PACKAGE).as_posix()}" in names

    # the wheel's package, not the checkout's, in a folder with no recipes in sight
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    )
    probe = (
        "import capfilt, sys; from capfilt.config import load_recipe; "
        f"assert capfilt.__file__.startswith({str(site)!r}), capfilt.__file__; "
        "print(load_recipe('real-cpu').model.image_size)"  # real-cpu extends demo: both by name
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "128"
