"""The README's commands, the demo and the docstring examples."""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import kopt
import kopt.demo

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_exactly_the_readme_test_command():
    demo, tests = readme_commands()[:2]
    assert "kopt.demo" in demo and "pytest" in tests
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_demo_trains_every_optimizer(capsys):
    kopt.demo.main(["--steps", "30"])
    out = capsys.readouterr().out
    for name in ("SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "Adamax", "Nadam"):
        assert name in out
    rows = [line for line in out.splitlines() if "(" in line and line[-1].isdigit()]
    losses = [float(row.split()[-2]) for row in rows]
    initial = float(re.search(r"initial loss ([0-9.]+)", out).group(1))
    assert len(losses) == len(kopt.demo.OPTIMIZERS)
    assert all(loss < initial for loss in losses)


#: Every module of kopt, subpackages' too, by its name below ``kopt.`` (``keras_io.configs``).
MODULES = sorted(module.name.removeprefix("kopt.") for module in pkgutil.walk_packages(kopt.__path__, "kopt."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    """Every ``>>>`` example in kopt's docstrings runs and prints what it shows (``# doctest: +SKIP`` aside)."""
    if name == "keras3":
        pytest.importorskip("keras", reason="the keras3 extra is not installed")
    module = importlib.import_module(f"kopt.{name}")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module, globs={}):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_the_docstrings_hold_examples():
    examples = sum(
        len(test.examples)
        for name in MODULES
        if name != "keras3"
        for test in doctest.DocTestFinder().find(importlib.import_module(f"kopt.{name}"))
    )
    assert examples >= 100
