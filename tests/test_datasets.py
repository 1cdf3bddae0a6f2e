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


def _fake_sources(tmp_path: Path, monkeypatch) -> list[str]:
    """Fake the 10x download and scanpy's pbmc3k_processed; the list records each download."""
    tar = tmp_path / "pbmc3k.tar.gz"
    barcodes = _fake_10x_tar(tar)
    labels = ["CD4 T cells", "B cells", "CD14+ Monocytes", "Megakaryocytes"]
    processed = ad.AnnData(obs=pd.DataFrame(
        {"louvain": pd.Categorical([labels[i % 4] for i in range(30)])},
        index=barcodes[:30]))  # the tutorial kept 30 of the 40 cells
    downloads: list[str] = []

    def urlretrieve(url, dest):
        downloads.append(url)
        Path(dest).write_bytes(tar.read_bytes())

    monkeypatch.setattr(datasets.urllib.request, "urlretrieve", urlretrieve)
    monkeypatch.setattr(sc.datasets, "pbmc3k_processed", lambda: processed)
    monkeypatch.setenv("SCVAE_TOOLS_NO_DOWNLOAD", "0")  # "0" allows it
    return downloads


def test_pbmc3k_built_from_the_download_matches_the_prepared_files(tmp_path, monkeypatch):
    """With the files absent, pbmc3k() builds both from the 10x matrix and scanpy's labels,
    with the prepared files' type names and obs columns."""
    downloads = _fake_sources(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    full = svt.datasets.pbmc3k(data_dir=cache)
    assert full.shape == (30, 2100) and full.X.dtype == np.float32
    assert sorted(full.obs["cell_type"].cat.categories) == ["B", "CD14+ Mono", "CD4 T", "Platelet"]
    svt.datasets.pbmc3k(data_dir=cache, hvg_only=True)  # built from the cached full file
    hvg = svt.datasets.pbmc3k(data_dir=cache, hvg_only=True, download=False)  # cached now
    assert hvg.n_vars == 2000 and {"n_counts_all_genes", "percent_mito"} <= set(hvg.obs)
    mito = full[:, full.var_names.str.startswith("MT-")].X.sum(1).A1
    np.testing.assert_allclose(hvg.obs["percent_mito"], 100 * mito / full.X.sum(1).A1,
                               rtol=1e-5)
    assert len(downloads) == 1
    monkeypatch.setenv("SCVAE_TOOLS_NO_DOWNLOAD", "1")
    with pytest.raises(FileNotFoundError, match="not found in"):
        svt.datasets.pbmc3k(data_dir=tmp_path / "empty")


def test_pbmc3k_builds_only_the_missing_file_and_reuses_the_full_one(tmp_path, monkeypatch):
    """The HVG step failing (scikit-misc absent) failed pbmc3k(hvg_only=False) too, after its
    file was written, and every retry downloaded again and overwrote the full file."""
    downloads = _fake_sources(tmp_path, monkeypatch)
    cache = tmp_path / "cache"

    def no_skmisc(*args, **kwargs):
        raise ImportError("Please install skmisc package via `pip install --user scikit-misc")

    monkeypatch.setattr(sc.pp, "highly_variable_genes", no_skmisc)
    assert svt.datasets.pbmc3k(data_dir=cache).shape == (30, 2100)
    full_file = cache / datasets.PBMC3K_FULL
    assert [p.name for p in cache.iterdir()] == [datasets.PBMC3K_FULL]
    written = full_file.stat().st_mtime_ns
    with pytest.raises(ImportError, match="scikit-misc"):
        svt.datasets.pbmc3k(data_dir=cache, hvg_only=True)
    assert [p.name for p in cache.iterdir()] == [datasets.PBMC3K_FULL]
    monkeypatch.undo()  # scikit-misc "installed"; and a download now would fail the test
    monkeypatch.setattr(datasets.urllib.request, "urlretrieve", pytest.fail)
    assert svt.datasets.pbmc3k(data_dir=cache, hvg_only=True, download=True).n_vars == 2000
    assert len(downloads) == 1 and full_file.stat().st_mtime_ns == written


def test_pbmc3k_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A write that fails half-way (full disk, interrupt) left a partial file under the final
    name, which later calls took as cached."""
    _fake_sources(tmp_path, monkeypatch)
    cache = tmp_path / "cache"

    def half_write(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", half_write)
    with pytest.raises(OSError, match="No space left on device"):
        svt.datasets.pbmc3k(data_dir=cache)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("payload", ["html", "truncated"])
def test_pbmc3k_download_that_is_not_a_tar_says_where_the_file_goes(tmp_path, monkeypatch,
                                                                     payload):
    """A proxy's HTML page (or a cut-off tar) raised a bare tarfile.ReadError, which is no
    OSError, so the message saying where to copy the file was skipped."""
    tar = tmp_path / "pbmc3k.tar.gz"
    _fake_10x_tar(tar)
    body = (b"<html><body>Access denied</body></html>" if payload == "html"
            else tar.read_bytes()[: tar.stat().st_size // 2])
    monkeypatch.setattr(datasets.urllib.request, "urlretrieve",
                        lambda url, dest: Path(dest).write_bytes(body))
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="Copy the file into that folder"):
        svt.datasets.pbmc3k(data_dir=cache, download=True)
    assert not (cache / datasets.PBMC3K_FULL).exists()


def _small_adata(**obs: list[str]) -> ad.AnnData:
    obs_df = pd.DataFrame(obs, index=[f"c{i}" for i in range(3)])
    return ad.AnnData(X=sp.csr_matrix(np.ones((3, 4), dtype=np.float32)), obs=obs_df)


_LOADERS = {
    "pbmc3k_hvg": (datasets.PBMC3K_HVG, lambda d: svt.datasets.pbmc3k(d, hvg_only=True)),
    "pbmc3k_full": (datasets.PBMC3K_FULL, lambda d: svt.datasets.pbmc3k(d)),
    "cellbench": ("cellbench_5_cell_lines.h5ad", lambda d: svt.datasets.cellbench(d)),
}


@pytest.mark.parametrize("damage", ["empty", "truncated"])
@pytest.mark.parametrize("loader", list(_LOADERS))
def test_corrupt_cached_file_names_its_path_and_the_fix(tmp_path, monkeypatch, loader, damage):
    """A corrupt cached file raised h5py's bare OSError, naming neither the file nor a fix."""
    monkeypatch.setenv("SCVAE_TOOLS_NO_DOWNLOAD", "1")
    name, load = _LOADERS[loader]
    good = tmp_path / "good.h5ad"
    _small_adata(cell_type=["a"] * 3).write_h5ad(good)
    data = b"" if damage == "empty" else good.read_bytes()[: good.stat().st_size // 2]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match="Delete it") as err:
        load(tmp_path)
    assert str(tmp_path / name) in str(err.value)


@pytest.mark.parametrize("loader", list(_LOADERS))
def test_wrong_cached_file_names_the_missing_columns(tmp_path, monkeypatch, loader):
    """Another dataset at the expected name (pbmc68k's obs) was returned silently: no
    cell_type, or for CellBench no cell_line/batch and singlets_only skipped."""
    monkeypatch.setenv("SCVAE_TOOLS_NO_DOWNLOAD", "1")
    name, load = _LOADERS[loader]
    _small_adata(bulk_labels=["a"] * 3, phase=["G1"] * 3).write_h5ad(tmp_path / name)
    with pytest.raises(ValueError, match="obs lacks") as err:
        load(tmp_path)
    assert str(tmp_path / name) in str(err.value)
    assert ("cell_line" if loader == "cellbench" else "cell_type") in str(err.value)


def test_cellbench_needs_demuxlet_cls_only_for_singlets(tmp_path):
    path = tmp_path / "cellbench_5_cell_lines.h5ad"
    _small_adata(cell_line=["A549"] * 3, batch=["b"] * 3, technology=["t"] * 3).write_h5ad(path)
    assert svt.datasets.cellbench(tmp_path, singlets_only=False).n_obs == 3
    with pytest.raises(ValueError, match="demuxlet_cls"):
        svt.datasets.cellbench(tmp_path)


@pytest.mark.parametrize("key", ["n_counts", "percent_mito", "phase"])
def test_pbmc68k_labels_key_may_not_overwrite_another_column(key):
    """labels_key="n_counts" silently replaced the library sizes with the labels."""
    with pytest.raises(ValueError, match=f"labels_key='{key}'"):
        svt.datasets.pbmc68k(labels_key=key)
    adata = svt.datasets.pbmc68k(labels_key="cell_type")
    assert (adata.obs["cell_type"] == adata.obs["bulk_labels"]).all()
    assert adata.obs["n_counts"].dtype.kind == "f"


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
