"""kopt is a typed package: ``py.typed`` ships, mypy is clean on kopt/, and ``dir(kopt)`` lists every public name.

The mypy strictness is pyproject.toml's ``[tool.mypy]``; the check runs in a subprocess with a fresh
cache (about 10 s on 2 cores) and is skipped where mypy (in the ``test`` extra) is not installed.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import kopt

ROOT = Path(__file__).resolve().parent.parent


def test_py_typed_marks_the_package():
    assert (Path(kopt.__file__).parent / "py.typed").is_file()


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy (the test extra) is not installed")
def test_mypy_is_clean_on_kopt(tmp_path):
    check = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache"), "kopt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, f"mypy kopt (config: pyproject.toml [tool.mypy]):\n{check.stdout}{check.stderr}"


def test_dir_lists_every_public_name():
    # kopt.to_keras3 is imported on first use (module __getattr__): dir() must still offer it, as tab completion uses.
    listed = set(dir(kopt))
    missing = [name for name in [*kopt.__all__, "to_keras3"] if name not in listed]
    assert not missing, f"dir(kopt) lacks {missing}"
