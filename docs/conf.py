"""Sphinx configuration of kopt's documentation site.

Build (from the repository root): ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.

The API reference is generated at build time from the modules' ``__all__`` (``write_api_pages`` below):
every public name gets an autosummary entry and a page made from its docstring, so a name exported later
gets its page without editing anything here, and ``check_every_name_documented`` fails the build (a
warning, an error under ``-W``) when a public name ends up without a documented object. The notebooks in
``notebooks/`` are copied in and rendered with their committed outputs (never executed here:
``tests/test_notebooks.py`` runs them).
"""

from __future__ import annotations

import ast
import inspect
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")  # kopt.to_keras3 imports Keras 3, on JAX's backend

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import kopt  # noqa: E402

project = "kopt"
author = "the kopt authors"
copyright = "the kopt authors"
release = version = kopt.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# ------------------------------------------------------------------------------------------- sources
GENERATED = "_autogen"  # written by this file at every build; ignored by git
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/.ipynb_checkpoints", f"{GENERATED}/keras3_toctree.md"]
templates_path = ["_templates"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks are committed executed; tests/test_notebooks.py runs them
nb_merge_streams = True

# ------------------------------------------------------------------------------------------- API pages
autosummary_generate = True
autosummary_generate_overwrite = True
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
add_module_names = False
add_function_parentheses = False  # {func}`kopt.SGD` (lr=0.01, ...) reads as the call it describes

# Cross-references: kopt's own must resolve (nitpicky); the types of other packages that appear in
# signatures (jax, numpy, optax, keras, typing, collections.abc) have no inventory here (the build runs
# offline), so they are ignored by these patterns, and so are kopt's private type aliases.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|np|numpy|optax|flax|nnx|keras|tf|tensorflow|h5py|equinox|eqx|chex)(\..*)?"),
    (r"py:.*", r"(typing|collections|collections\.abc|types|os|pathlib|re|enum|dataclasses)\..*"),
    (r"py:.*", r"(Any|Callable|Mapping|Sequence|Iterable|Iterator|NamedTuple|Protocol|Literal|Optional|Union)"),
    (r"py:.*", r"(PathLike|Path|ArrayLike|DTypeLike|Array|Sharding|NamedSharding|PartitionSpec|Mesh)"),
    (r"py:class", r"(int|float|str|bool|bytes|dict|list|tuple|set|object|type|None|NoneType|ValueError)"),
    # kopt's type aliases (``Params = Any`` and the like): documented in words, not objects of their own
    (r"py:.*", r"(kopt\.[\w.]+\.)?(Params|Updates|OptState|LearningRate|ScheduleLike|Pytree|PyTree|Numeric|Scalar)"),
    (r"py:.*", r"(kopt\.[\w.]+\.)?(TransformInitFn|TransformUpdateFn|Label|Labels|Mask|KeyPath|HyperParams)"),
    # private names that public docstrings point at (they have no page: not part of the API)
    (r"py:.*", r"(kopt\.[\w.]+\.)?(Layout|to_config|from_config|compiled_when_eager|config_flavor)"),
    (r"py:.*", r"(kopt\.[\w.]+\.)?(MAX_CONFIG_VALUES|header_limit)"),
    (r"py:mod", r"kopt\.[\w.]+"),  # kopt's private modules (kopt.optimizers, ...): their names are documented as kopt.X
]

# ------------------------------------------------------------------------------------------- HTML
html_theme = "sphinx_book_theme"
html_title = f"kopt {release}"
html_static_path: list[str] = []
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
    "use_download_button": True,
}
html_last_updated_fmt = None

# Math renders with MathJax from its CDN (as jax's and optax's sites do). Offline, point KOPT_DOCS_MATHJAX at
# a local MathJax 3 ``es5`` folder (``npm pack mathjax@3``, then ``package/es5``): it is copied into the site.
if os.environ.get("KOPT_DOCS_MATHJAX"):
    html_static_path.append(os.environ["KOPT_DOCS_MATHJAX"])
    mathjax_path = "tex-mml-chtml.js"


# ------------------------------------------------------------------------------------------- generators
def public_names(module) -> list[str]:
    """``__all__`` of a namespace, plus its lazily imported public names (``kopt.to_keras3``)."""
    names = list(module.__all__)
    extra = {
        "kopt": ["to_keras3"],  # imported on first use (Keras is an optional extra), not in __all__
        "kopt.keras": ["Muon", "muon_labels"],
    }.get(module.__name__, [])
    extra += [  # any other public name dir() offers that __all__ leaves out (a lazily imported one)
        name
        for name in dir(module)
        if not name.startswith("_") and not inspect.ismodule(getattr(module, name, None))
        and name not in names and module.__name__ == "kopt"
    ]
    return names + [name for name in dict.fromkeys(extra) if name not in names]


def groups_of(path: Path, names: list[str]) -> list[tuple[str, list[str]]]:
    """The ``# comment`` headings of ``__all__`` in the module's source, with the names under each."""
    source = path.read_text()
    tree = ast.parse(source)
    start = end = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            start, end = node.lineno, node.end_lineno
    groups: list[tuple[str, list[str]]] = []
    heading = None
    if start is not None:
        for line in source.splitlines()[start - 1 : end]:
            text = line.strip()
            if text.startswith("#"):
                heading = text.lstrip("# ").strip()
                groups.append((heading[:1].upper() + heading[1:], []))
            elif text.startswith(("'", '"')) and text.rstrip(",").strip("'\"") in names:
                if not groups:
                    groups.append(("Names", []))
                groups[-1][1].append(text.rstrip(",").strip("'\""))
    listed = {name for _, group in groups for name in group}
    rest = [name for name in names if name not in listed]
    if rest:
        groups.append(("Imported on first use" if path.name == "__init__.py" else "More", rest))
    return [(heading, group) for heading, group in groups if group]


def autosummary(module: str, names: list[str]) -> str:
    lines = [f".. currentmodule:: {module}", "", ".. autosummary::", "   :toctree: generated", ""]
    return "\n".join(lines + [f"   {name}" for name in names]) + "\n"


NAMESPACES = {
    # module: (page title, intro)
    "kopt": ("kopt", "Everything ``from kopt import *`` gives, grouped as ``kopt.__all__`` groups it."),
    "kopt.tf_keras": ("kopt.tf_keras", "TensorFlow's Keras 2 optimizers (tf.keras 2.x, ``tf_keras``)."),
    "kopt.keras": ("kopt.keras", "Keras 3's optimizers (``keras.optimizers``, keras >= 3)."),
}


def write_api_pages() -> dict[str, list[str]]:
    """Writes ``_autogen/api_<module>.rst`` for every namespace; returns the names each must document."""
    import importlib

    out = DOCS / GENERATED
    out.mkdir(exist_ok=True)
    expected: dict[str, list[str]] = {}
    for module_name, (title, intro) in NAMESPACES.items():
        module = importlib.import_module(module_name)
        names = public_names(module)
        modules = [name for name in names if inspect.ismodule(getattr(module, name, None))]
        objects = [name for name in names if name not in modules]
        expected[module_name] = objects
        source = Path(module.__file__)
        text = [title, "=" * len(title), "", intro, ""]
        if module_name != "kopt":
            text += [f".. automodule:: {module_name}", "   :no-members:", ""]
        else:
            text += [f".. module:: {module_name}", ""]
        for heading, group in groups_of(source, names):
            subs = [name for name in group if name in modules]
            group = [name for name in group if name not in modules]
            if group:
                text += [heading, "-" * len(heading), "", autosummary(module_name, group)]
            if subs:
                text += [heading, "-" * len(heading), ""]
                text += [f"* :mod:`{module_name}.{sub}`: :doc:`api_{module_name}.{sub}`" for sub in subs] + [""]
        (out / f"api_{module_name}.rst").write_text("\n".join(text))
    return expected


def copy_notebooks() -> None:
    """The committed notebooks (with their outputs) and the images the pages show, copied into the source."""
    target = DOCS / GENERATED / "notebooks"
    target.mkdir(parents=True, exist_ok=True)
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        if not (target / notebook.name).exists() or (target / notebook.name).read_bytes() != notebook.read_bytes():
            shutil.copyfile(notebook, target / notebook.name)
    images = DOCS / GENERATED / "images"
    images.mkdir(exist_ok=True)
    for image in (ROOT / "notebooks" / "gallery.png", ROOT / "benchmarks" / "results" / "ratios.png"):
        shutil.copyfile(image, images / image.name)


def write_keras3_toctree() -> None:
    """The Keras 3 page's sub-pages that exist (``keras3_differences.md`` is written separately)."""
    pages = [name for name in ("keras3_differences",) if (DOCS / f"{name}.md").exists()]
    body = "```{toctree}\n:maxdepth: 1\n\n" + "".join(f"/{name}\n" for name in pages) + "```\n" if pages else ""
    path = DOCS / GENERATED / "keras3_toctree.md"
    if not path.exists() or path.read_text() != body:
        path.write_text(body)


EXPECTED = write_api_pages()
copy_notebooks()
write_keras3_toctree()


def check_every_name_documented(app, env) -> None:
    """A public name without a documented object is a warning (an error under ``-W``)."""
    from sphinx.util import logging

    logger = logging.getLogger("kopt.api")
    documented = set(env.get_domain("py").objects)
    for module_name, names in EXPECTED.items():
        for name in names:
            if f"{module_name}.{name}" not in documented:
                logger.warning("public name %s.%s has no API entry", module_name, name)


def resolve_by_public_name(app, env, node, contnode):
    """``kopt.transforms.trace`` (where a name is defined) resolves to ``kopt.trace`` (where it is documented)."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    owner, _, name = target.rpartition(".")
    if owner and owner != "kopt" and not owner.startswith("kopt."):
        return None
    domain = env.get_domain("py")
    for candidate in (f"kopt.{name}", f"kopt.tf_keras.{name}", f"kopt.keras.{name}"):
        if candidate != target and candidate in domain.objects:
            return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], candidate, node, contnode)
    return None


def setup(app):
    app.connect("env-check-consistency", check_every_name_documented)
    app.connect("missing-reference", resolve_by_public_name)
