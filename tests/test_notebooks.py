"""Every notebook in notebooks/ runs top to bottom on the embedded model on CPU (executed with nbclient)."""
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"loss_playground.ipynb", "grpo.ipynb", "steering.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    how = "pip install -e \".[test]\""
    nbformat = pytest.importorskip("nbformat", reason=f"nbformat is not installed ({how})")
    nbclient = pytest.importorskip("nbclient", reason=f"nbclient is not installed ({how})")
    pytest.importorskip("ipykernel", reason=f"ipykernel is not installed ({how})")
    nb = nbformat.read(path, as_version=4)
    # the kernel starts in notebooks/ as Jupyter would; the notebooks find the repository from there
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{os.path.basename(path)} failed:\n{str(e)[-3000:]}")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert figures, "every notebook shows at least one figure"
