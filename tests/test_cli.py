"""The command line: fit on an .h5ad, the demo, and `python -m scvae_tools.cli`."""

import subprocess
import sys

import anndata as ad
import numpy as np

import scvae_tools as svt
from scvae_tools.cli import main


def test_fit_writes_results(tmp_path):
    a = svt.datasets.synthetic_counts(n_cells=200, n_genes=60, n_batches=2, seed=0)
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(tmp_path / "in.h5ad")
    rc = main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad"), "--layer",
               "counts", "--batch-key", "batch", "--epochs", "3", "--n-latent", "4", "--quiet",
               "--save-model", str(tmp_path / "model")])
    assert rc == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_scvae"].shape == (200, 4) and "scvae_denoised" in out.layers
    assert out.uns["scvae"]["data"]["batch_key"] == "batch"
    model = svt.SCVAE.load(tmp_path / "model", out)
    np.testing.assert_allclose(model.get_latent_representation(), out.obsm["X_scvae"], rtol=1e-5)


def test_fit_reports_bad_keys_without_a_traceback(tmp_path, capsys):
    a = svt.datasets.synthetic_counts(n_cells=50, n_genes=20, seed=0)
    a.write_h5ad(tmp_path / "in.h5ad")
    rc = main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"),
               "--batch-key", "nope", "--quiet"])
    assert rc == 2 and "not a column of adata.obs" in capsys.readouterr().err


def test_fit_passes_cuda_graphs_on(tmp_path, capsys):
    """--cuda-graphs reaches train(): on a CPU it is refused with the fix named."""
    a = svt.datasets.synthetic_counts(n_cells=50, n_genes=20, seed=0)
    a.write_h5ad(tmp_path / "in.h5ad")
    rc = main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"),
               "--cuda-graphs", "--device", "cpu", "--quiet"])
    assert rc == 2 and "cuda_graphs=True needs a CUDA device" in capsys.readouterr().err


def test_demo_as_module(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scvae_tools.cli", "demo", "-o", str(tmp_path / "demo"),
         "--epochs", "3", "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for f in ["pbmc68k_scvae.h5ad", "umap.png", "training_history.png", "model/config.json"]:
        assert (tmp_path / "demo" / f).exists(), f
    out = ad.read_h5ad(tmp_path / "demo" / "pbmc68k_scvae.h5ad")
    assert "X_umap" in out.obsm and "leiden" in out.obs
