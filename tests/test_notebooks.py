"""Every notebook in notebooks/ runs top to bottom without an error.

Each notebook is executed headless with nbclient, in a kernel started from *this* interpreter (a kernelspec
written to a temporary folder, so a `python3` kernelspec installed elsewhere, possibly for another Python, is
never picked up), with notebooks/ as the working directory. The committed .ipynb files are read, never
written: their saved outputs stay as they are.
"""
import json
import os
import sys
import time

import nbclient
import nbformat
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")) if os.path.isdir(NOTEBOOKS) else []
CELL_TIMEOUT = 300  # seconds per cell; each notebook takes well under a minute on 2 CPU cores
MIN_EXERCISES = 3  # per notebook: a markdown "**Exercise N**" cell, then the learner's code cell with an assert
MAX_SIZE = 300 * 1024  # committed notebooks (with their outputs) stay small


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels")
    (d / "python3").mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (minivlm tests)", "language": "python"}
    (d / "python3" / "kernel.json").write_text(json.dumps(spec))
    return str(d)


def test_there_are_eight_notebooks():
    assert len(NAMES) == 8, NAMES
    assert [n[:2] for n in NAMES] == [f"{i:02d}" for i in range(1, 9)]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_holds_its_outputs(name):
    """The committed file was executed top to bottom and saved with its outputs, none of them an error."""
    path = os.path.join(NOTEBOOKS, name)
    assert os.path.getsize(path) < MAX_SIZE, f"{name} is {os.path.getsize(path) // 1024} KB"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "not executed in order"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_has_exercises(name):
    """At least MIN_EXERCISES exercises: a markdown cell containing "Exercise", and right after it a code cell
    (the learner's answer) that checks the answer with an assert."""
    cells = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4).cells
    checked = [i for i, c in enumerate(cells[:-1])
               if c.cell_type == "markdown" and "Exercise" in c.source
               and cells[i + 1].cell_type == "code" and "assert" in cells[i + 1].source]
    assert len(checked) >= MIN_EXERCISES, f"{name}: {len(checked)} exercise(s) followed by an assert cell"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, kernel_dir):
    path = os.path.join(NOTEBOOKS, name)
    nb = nbformat.read(path, as_version=4)  # an in-memory copy: the file itself is not touched
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]))
    client = nbclient.NotebookClient(nb, km=km, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": NOTEBOOKS}})
    t0 = time.time()
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    print(f"{name}: {time.time() - t0:.1f}s")
