"""The notebooks in notebooks/: committed with their outputs, and each runs top to bottom without an error.

Each notebook is re-executed in memory (the committed file is not touched) with nbclient, in a fresh
IPython kernel of this very Python (a kernel spec written for ``sys.executable``, so an installed
``python3`` spec of another interpreter cannot be picked up), in a scratch folder, so that the
``gallery.png`` the gallery notebook writes lands there and not in the work tree. The issue asks for
the whole set to run in under 5 minutes on 2 cores: each notebook gets its share of that.

Needs the ``notebooks`` extra (``pip install -e ".[notebooks]"``); without it these tests are
skipped, except in CI (``CI`` set), where a missing extra is a failure.
"""

import os
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_from_keras.ipynb", "03_optimizer_gallery.ipynb", "04_scaling.ipynb"]
CELL_TIMEOUT_S = 240
SET_BUDGET_S = 300  # the whole set, on 2 cores

try:  # the runner, and what the notebooks import besides kopt and JAX
    import matplotlib  # noqa: F401
    import nbformat
    import optax  # noqa: F401
    import sklearn  # noqa: F401
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
except ImportError as error:
    if os.environ.get("CI"):
        raise
    pytest.skip(f"the notebooks extra is not installed ({error})", allow_module_level=True)


def test_the_notebooks_are_all_here():
    assert [path.name for path in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_with_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    unexecuted = [i for i, cell in enumerate(code_cells) if cell.execution_count is None]
    assert not unexecuted, f"code cells {unexecuted} have no stored outputs: execute the notebook in place"
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs), "no stored plot"
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """A ``python3`` kernel spec that starts ``sys.executable -m ipykernel_launcher``, and only that one."""
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / "python3")
    return KernelSpecManager(kernel_dirs=[str(kernels)])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_runs_top_to_bottom(path, kernel_specs, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    # One more cell, to check which Python the kernel was.
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    kernel = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    client = NotebookClient(
        notebook,
        km=kernel,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    elapsed = time.perf_counter() - start

    executable = notebook.cells[-1].outputs[0].text.strip()
    assert os.path.realpath(executable) == os.path.realpath(sys.executable)
    assert elapsed < SET_BUDGET_S / len(EXPECTED), f"{path.name} took {elapsed:.0f} s"
    if path.name == "03_optimizer_gallery.ipynb":
        assert (tmp_path / "gallery.png").read_bytes().startswith(b"\x89PNG")
