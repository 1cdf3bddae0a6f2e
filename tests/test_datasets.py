"""Dataset loaders: the pbmc3k file built from the public 10x matrix (downloads faked here)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.io
import scipy.sparse as sp

import scvae_tools as svt
from scvae_tools import datasets


def _fake_10x_tar(path: Path, n_cells: int = 40, n_genes: int = 2100) -> list[str]:
    """A tar.gz laid out like 10x's pbmc3k_filtered_gene_bc_matrices (v1: genes.tsv)."""
    rng = np.random.default_rng(0)
    root = path.parent / "src" / "filtered_gene_bc_matrices" / "hg19"
    root.mkdir(parents=True)
    counts = sp.random(n_genes, n_cells, density=0.3, random_state=0, format="coo",
                       data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float64)
    scipy.io.mmwrite(root / "matrix.mtx", counts)
    genes = [f"MT-{j}" if j < 5 else f"G{j}" for j in range(n_genes)]
    pd.DataFrame({"id": [f"ENSG{j:05d}" for j in range(n_genes)], "symbol": genes}).to_csv(
        root / "genes.tsv", sep="\t", header=False, index=False)
    barcodes = [f"CELL{i:03d}-1" for i in range(n_cells)]
    pd.Series(barcodes).to_csv(root / "barcodes.tsv", header=False, index=False)
    with tarfile.open(path, "w:gz") as tf:
        tf.add(path.parent / "src" / "filtered_gene_bc_matrices", "filtered_gene_bc_matrices")
    return barcodes


def test_pbmc3k_built_from_the_download_matches_the_prepared_files(tmp_path, monkeypatch):
    """With the files absent, pbmc3k() builds both from the 10x matrix and scanpy's labels,
    with the prepared files' type names and obs columns."""
    tar = tmp_path / "pbmc3k.tar.gz"
    barcodes = _fake_10x_tar(tar)
    labels = ["CD4 T cells", "B cells", "CD14+ Monocytes", "Megakaryocytes"]
    processed = ad.AnnData(obs=pd.DataFrame(
        {"louvain": pd.Categorical([labels[i % 4] for i in range(30)])},
        index=barcodes[:30]))  # the tutorial kept 30 of the 40 cells
    monkeypatch.setattr(datasets.urllib.request, "urlretrieve",
                        lambda url, dest: Path(dest).write_bytes(tar.read_bytes()))
    monkeypatch.setattr(sc.datasets, "pbmc3k_processed", lambda: processed)
    monkeypatch.setenv("SCVAE_TOOLS_NO_DOWNLOAD", "0")  # "0" allows it
    cache = tmp_path / "cache"
    full = svt.datasets.pbmc3k(data_dir=cache)
    assert full.shape == (30, 2100) and full.X.dtype == np.float32
    assert sorted(full.obs["cell_type"].cat.categories) == ["B", "CD14+ Mono", "CD4 T", "Platelet"]
    hvg = svt.datasets.pbmc3k(data_dir=cache, hvg_only=True, download=False)  # cached now
    assert hvg.n_vars == 2000 and {"n_counts_all_genes", "percent_mito"} <= set(hvg.obs)
    mito = full[:, full.var_names.str.startswith("MT-")].X.sum(1).A1
    np.testing.assert_allclose(hvg.obs["percent_mito"], 100 * mito / full.X.sum(1).A1,
                               rtol=1e-5)
    monkeypatch.setenv("SCVAE_TOOLS_NO_DOWNLOAD", "1")
    with pytest.raises(FileNotFoundError, match="not found in"):
        svt.datasets.pbmc3k(data_dir=tmp_path / "empty")


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_empty_or_relative_xdg_cache_home_means_the_default(monkeypatch, tmp_path, xdg):
    """XDG_CACHE_HOME= (empty) made the cache the folder 'scvae_tools' of wherever Python
    ran: downloads and compiled kernels landed in the user's working directory."""
    from scvae_tools import native

    monkeypatch.delenv("SCVAE_TOOLS_DATA_DIR", raising=False)
    monkeypatch.delenv("SCVAE_TOOLS_KERNEL_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert datasets.get_data_dir() == tmp_path / ".cache" / "scvae_tools"
    assert native.cache_dir() == tmp_path / ".cache" / "scvae_tools" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.get_data_dir() == tmp_path / "xdg" / "scvae_tools"
