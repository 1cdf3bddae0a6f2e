"""Execute the tutorial notebooks top to bottom, in fast mode, as CI.

Each notebook is copied to a temporary directory and run there with nbclient and the
``python3`` kernel (which jupyter_client resolves to this interpreter, so the notebook sees
the same installed package). ``SCVAE_TUTORIAL_FAST=1`` makes the notebooks train for a few
epochs only; a failing cell raises ``CellExecutionError`` and fails the test. Data come from
``svt.datasets`` with ``$SCVAE_TOOLS_DATA_DIR`` / ``$SCVAE_TOOLS_NO_DOWNLOAD`` set by
``conftest.py``, so nothing is downloaded.
"""

from __future__ import annotations

import copy
import importlib.util
import os
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
    """The notebook executed in fast mode in ``tmp_path``; raises CellExecutionError on the
    first failing cell."""
    monkeypatch.setenv("SCVAE_TOOLS_NO_DOWNLOAD", "1")
    # Appended to the executed copy only: which interpreter ran the cells, and its CPU time.
    probe = ("import resource, sys\nprint(sys.executable)\n"
             "r = resource.getrusage(resource.RUSAGE_SELF)\nprint(r.ru_utime + r.ru_stime)")
    return _check_outputs().execute(TUTORIALS / name, tmp_path, fast=True, threads=None,
                                    timeout=600, append=(probe,))


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


def _check_outputs():
    """tutorials/check_outputs.py (a script, not part of the package), imported by path."""
    spec = importlib.util.spec_from_file_location("check_outputs", TUTORIALS / "check_outputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _edit_output(nb, index: int, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in the text outputs of code cell ``index``."""
    for o in nb.cells[index].outputs:
        if "text" in o:
            o["text"] = o["text"].replace(old, new)
        if "text/plain" in o.get("data", {}):
            o["data"]["text/plain"] = o["data"]["text/plain"].replace(old, new)


def test_stale_output_check_reports_changed_numbers() -> None:
    """The staleness check on the committed notebooks: a copy agrees with itself; a moved
    number is reported with its cell and both values; rounding in the last printed digit, a
    different speed of the progress bar and the history's ``seconds`` column are not; a
    markdown number read off an output that moved is reported."""
    co = _check_outputs()
    stored = nbformat.read(TUTORIALS / "03_embedded_pbmc68k.ipynb", as_version=4)
    assert co.stale_cells(stored, stored) == [] and co.stale_quotes(stored, stored) == []

    # Cell 10 trains: its progress bar says where early stopping ended (95 of 143 epochs,
    # as the markdown after it says).
    fresh = copy.deepcopy(stored)
    assert "95/143" in fresh.cells[10].outputs[0]["text"]
    _edit_output(fresh, 10, "95/143", "97/143")
    (cell,) = co.stale_cells(stored, fresh)
    assert cell.index == 10
    assert [(a.value, b.value) for a, b in cell.differing] == [(95.0, 97.0)]

    # The ARI/NMI table (cell 17): one unit in the third decimal is rounding, 0.02 is not.
    table = stored.cells[17].outputs[0]["data"]["text/plain"]
    assert "0.442" in table
    fresh = copy.deepcopy(stored)
    _edit_output(fresh, 17, "0.442", "0.443")
    assert co.stale_cells(stored, fresh) == []
    fresh = copy.deepcopy(stored)
    _edit_output(fresh, 17, "0.442", "0.462")
    (cell,) = co.stale_cells(stored, fresh)
    assert cell.index == 17 and {(a.value, b.value) for a, b in cell.differing} == {(0.442, 0.462)}

    # Time and speed are not results.
    fresh = copy.deepcopy(stored)
    _edit_output(fresh, 10, "[00:03<00:01, 30.67epoch/s", "[01:13<00:41, 1.37epoch/s")
    assert co.stale_cells(stored, fresh) == []
    quick = nbformat.read(TUTORIALS / "01_pbmc3k_quickstart.ipynb", as_version=4)
    history = quick.cells[14].outputs[0]["data"]["text/plain"].splitlines()
    # The last epoch's time, read off the table (a refresh rewrites it).
    assert history[-6].split()[-1] == "seconds"
    seconds = history[-1].split()[-1]
    assert "\n".join(history).count(seconds) == 1
    fresh = copy.deepcopy(quick)
    _edit_output(fresh, 14, seconds, f"{float(seconds) + 0.15:.6f}")
    assert co.stale_cells(quick, fresh) == []
    _edit_output(fresh, 14, "-641.249908", "-651.249908")  # train_elbo, same table
    assert [c.index for c in co.stale_cells(quick, fresh)] == [14]

    # 02's markdown cell 13 quotes the total rate that code cell 12 prints.
    vae = nbformat.read(TUTORIALS / "02_understanding_the_vae.ipynb", as_version=4)
    assert "16.2 nats with 10" in vae.cells[12].outputs[0]["text"]
    assert "16.2" in vae.cells[13].source
    fresh = copy.deepcopy(vae)
    _edit_output(fresh, 12, "16.2 nats with 10", "16.9 nats with 10")
    assert [c.index for c in co.stale_cells(vae, fresh)] == [12]
    assert [(q.index, q.number.value) for q in co.stale_quotes(vae, fresh)] == [(13, 16.2)]


def test_stack_record_names_what_differs() -> None:
    """A refreshed notebook records the machine that made its outputs; the check names what
    differs on another one (a library version, the thread count), and a missing record."""
    co = _check_outputs()
    nb = nbformat.v4.new_notebook()
    assert len(co.stack_differences(nb)) == 1 and "--refresh" in co.stack_differences(nb)[0]
    nb.metadata[co.STACK_KEY] = co.stack()
    assert co.stack_differences(nb) == []
    nb.metadata[co.STACK_KEY] = {**co.stack(), "torch": "1.0.0"}
    (difference,) = co.stack_differences(nb)
    assert difference.startswith("torch: 1.0.0 there")
    assert [d.split(":")[0] for d in co.stack_differences(nb, threads=co.THREADS + 1)] == [
        "threads", "torch"]


@pytest.mark.slow
def test_committed_outputs_not_stale(tmp_path: Path) -> None:
    """The committed full-mode outputs of 03_embedded_pbmc68k (the quickest notebook, ~25 s
    in full mode) still come out of the package. Run ``python tutorials/check_outputs.py``
    for all four before a release."""
    co = _check_outputs()
    name = "03_embedded_pbmc68k.ipynb"
    differences = co.stack_differences(nbformat.read(TUTORIALS / name, as_version=4))
    if differences:
        # Another CPU or library version moves the numbers by itself (e.g. the epoch where
        # early stopping ends): the comparison would test the machine, not the package.
        pytest.skip(f"{name}'s outputs were made on another stack: " + "; ".join(differences))
    cells, quotes = co.check(name, workdir=tmp_path)
    assert not cells and not quotes, co.report(name, cells, quotes)


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
