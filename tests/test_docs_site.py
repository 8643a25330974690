"""The documentation site (docs/) builds with warnings as errors, and every public name has a page.

A broken cross-reference, a docstring that does not render, a page outside every toctree or a public name
without an API entry is a warning, so a failure here. Skipped where the ``docs`` extra is not installed.
"""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kopt

for module in ("sphinx", "myst_nb", "sphinx_book_theme"):
    pytest.importorskip(module, reason="the docs extra is not installed")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("docs") / "html"
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"sphinx-build failed:\n{build.stdout}\n{build.stderr}"
    return out, build.stderr


def test_the_site_builds_without_a_warning(site):
    out, stderr = site
    assert "WARNING" not in stderr and "ERROR" not in stderr, stderr
    assert (out / "index.html").exists()


def namespaces() -> dict[str, list[str]]:
    names = {"kopt": [*kopt.__all__, "to_keras3"], "kopt.tf_keras": list(kopt.tf_keras.__all__)}
    names["kopt.keras"] = list(dict.fromkeys([*kopt.keras.__all__, "Muon", "muon_labels"]))
    return names


def test_every_public_name_has_a_page(site):
    out, _ = site
    missing = []
    for module_name, names in namespaces().items():
        module = importlib.import_module(module_name)
        for name in names:
            if isinstance(getattr(module, name), type(kopt)):  # a namespace: its own page
                page = out / "_autogen" / f"api_{module_name}.{name}.html"
            else:
                page = out / "_autogen" / "generated" / f"{module_name}.{name}.html"
            if not page.exists():
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names without an API page: {missing}"


def test_the_notebooks_are_rendered_with_their_plots(site):
    out, _ = site
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        html = (out / "_autogen" / "notebooks" / f"{notebook.stem}.html").read_text()
        assert "<img" in html, f"{notebook.name} shows no plot"


def test_an_optimizer_page_has_its_math(site):
    out, _ = site
    html = (out / "optimizers.html").read_text()
    assert html.count('class="math') >= 8 and re.search(r"\\sqrt", html)


def test_the_readme_links_resolve_to_pages_of_the_site(site):
    out, _ = site
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert targets
    for target in targets:
        if target.startswith(("http://", "https://")):
            continue
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
        if target.startswith("docs/") and target.endswith(".md"):
            page = out / (target.removeprefix("docs/").removesuffix(".md") + ".html")
            assert page.exists(), f"README links to {target}, which the site does not build ({page.name})"
