"""Execute the tutorial notebooks top to bottom, in fast mode, as CI.

Each notebook is copied to a temporary directory and run there with nbclient and the
``python3`` kernel (which jupyter_client resolves to this interpreter, so the notebook sees
the same installed package). ``SCVAE_TUTORIAL_FAST=1`` makes the notebooks train for a few
epochs only; a failing cell raises ``CellExecutionError`` and fails the test. Data come from
``svt.datasets`` with ``$SCVAE_TOOLS_DATA_DIR`` / ``$SCVAE_TOOLS_NO_DOWNLOAD`` set by
``conftest.py``, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

# conftest.py points $SCVAE_TOOLS_DATA_DIR at the shared data when it finds it.
_DATA = os.environ.get("SCVAE_TOOLS_DATA_DIR")


def _have(name: str | None) -> bool:
    return name is None or (bool(_DATA) and (Path(_DATA) / name).exists())


HAVE_PBMC3K = _have("pbmc3k_full_counts.h5ad")
TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
# notebook → the data file it needs from ../shared/data (None: pbmc68k ships with scanpy)
NOTEBOOKS = {
    "01_pbmc3k_quickstart.ipynb": "pbmc3k_full_counts.h5ad",
    "02_understanding_the_vae.ipynb": None,
    "03_embedded_pbmc68k.ipynb": None,
    "04_cellbench_batch_correction.ipynb": "cellbench_5_cell_lines.h5ad",
}


def _run(name: str, tmp_path: Path, monkeypatch) -> nbformat.NotebookNode:
    src = TUTORIALS / name
    work = tmp_path / "tutorials"
    work.mkdir()
    shutil.copy(src, work / name)
    nb = nbformat.read(work / name, as_version=4)
    # Appended to the temporary copy only: which interpreter ran the cells, and its CPU time.
    nb.cells.append(nbformat.v4.new_code_cell(
        "import resource, sys\nprint(sys.executable)\n"
        "r = resource.getrusage(resource.RUSAGE_SELF)\nprint(r.ru_utime + r.ru_stime)"))
    monkeypatch.setenv("SCVAE_TUTORIAL_FAST", "1")
    monkeypatch.setenv("SCVAE_TOOLS_NO_DOWNLOAD", "1")
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def _outputs(nb, output_type: str | None = None, mime: str | None = None) -> list:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if output_type and o["output_type"] != output_type:
                continue
            if mime and mime not in o.get("data", {}):
                continue
            out.append(o)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_tutorial_executes(name: str, tmp_path: Path, monkeypatch) -> None:
    if not _have(NOTEBOOKS[name]):
        pytest.skip(f"{NOTEBOOKS[name]} (../shared/data) not available")
    nb = _run(name, tmp_path, monkeypatch)

    # The kernel was this venv's interpreter, not some other python3 on the machine.
    executable, cpu_seconds = nb.cells[-1].outputs[0]["text"].split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    print(f"{name}: kernel CPU time {float(cpu_seconds):.0f} s")
    # The notebook really ran in fast mode (its set-up cell prints the flag).
    assert any("fast mode: True" in o.get("text", "") for o in _outputs(nb, "stream"))
    # Every code cell ran, and the figures are there.
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not _outputs(nb, "error")
    assert len(_outputs(nb, mime="image/png")) >= 4


def test_committed_notebooks_have_outputs() -> None:
    """The committed notebooks carry their figures (visible when browsing the repository)
    and were executed in full mode, in order, without errors."""
    for name in NOTEBOOKS:
        nb = nbformat.read(TUTORIALS / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        counts = [c.execution_count for c in code]
        assert counts == list(range(1, len(code) + 1)), f"{name}: not executed top to bottom"
        assert not _outputs(nb, "error"), f"{name}: has an error output"
        assert len(_outputs(nb, mime="image/png")) >= 4, f"{name}: figures missing"
        texts = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
        assert "fast mode: False" in texts, f"{name}: committed outputs come from fast mode"


def _readme_quickstart() -> str:
    readme = (TUTORIALS.parent / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_PBMC3K, reason="pbmc3k files (../shared/data) not available")
def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch):
    """The README's quickstart, executed as printed: its names exist and its results land
    where it says."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCVAE_TOOLS_NO_DOWNLOAD", "1")
    code = _readme_quickstart()
    assert "svt.SCVAE(" in code and "write_to_adata" in code  # the block was found
    scope: dict = {}
    exec(compile(code, "README.md quickstart", "exec"), scope)
    adata, model = scope["adata"], scope["model"]
    assert {"X_scvae", "X_umap"} <= set(adata.obsm) and "leiden" in adata.obs
    assert {"scvae_denoised", "scvae_expected"} <= set(adata.layers)
    assert (tmp_path / "pbmc_model" / "config.json").exists()
    # The re-loaded model and the one-liner's retraining (same seed): the same latent up to
    # float rounding: sc.pp.neighbors resets torch's thread count (1 in the tests) between.
    z, z_tl = model.get_latent_representation(), adata.obsm["X_scvae"]
    assert min(np.corrcoef(z[:, d], z_tl[:, d])[0, 1] for d in range(z.shape[1])) > 0.98
