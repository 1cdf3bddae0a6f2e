"""Datasets: real PBMC counts through a loader with a local cache, plus synthetic counts.

Files are looked up in ``data_dir``, else ``$SCVAE_TOOLS_DATA_DIR``, else
``$XDG_CACHE_HOME/scvae_tools`` (by default ``~/.cache/scvae_tools``). Only when a file is absent there is it built from its public
source (and cached); pass ``download=False`` (or set ``SCVAE_TOOLS_NO_DOWNLOAD=1``) to get
an error instead — the tests do.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import urllib.request
import uuid
import zlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .native import user_cache_dir

PBMC3K_FULL = "pbmc3k_full_counts.h5ad"
PBMC3K_HVG = "pbmc3k_hvg_counts.h5ad"
PBMC3K_URL = "https://cf.10xgenomics.com/samples/cell/pbmc3k/pbmc3k_filtered_gene_bc_matrices.tar.gz"
# What to do about an unreadable or wrong pbmc3k file at the expected name.
_PBMC3K_FIX = "Delete it so that it is built again, or replace it with the right file."

# scanpy's pbmc3k_processed labels → the names of the Seurat tutorial's annotation that the
# prepared files carry (its CD4 T cells are one group there, naive and memory here).
_PBMC3K_TYPE_NAMES = {"CD4 T cells": "CD4 T", "CD14+ Monocytes": "CD14+ Mono", "B cells": "B",
                      "CD8 T cells": "CD8 T", "NK cells": "NK", "FCGR3A+ Monocytes": "FCGR3A+ Mono",
                      "Dendritic cells": "DC", "Megakaryocytes": "Platelet"}


def get_data_dir(path: str | os.PathLike | None = None) -> Path:
    """The directory the loaders read from: ``path``, ``$SCVAE_TOOLS_DATA_DIR`` or the user cache.

    Parameters
    ----------
    path
        The directory to use (``~`` expanded); ``None``: ``$SCVAE_TOOLS_DATA_DIR`` when set
        and non-empty, else ``$XDG_CACHE_HOME/scvae_tools`` (``~/.cache/scvae_tools`` when
        that is unset or relative).
    """
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("SCVAE_TOOLS_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return user_cache_dir()


def pbmc68k(labels_key: str = "bulk_labels") -> ad.AnnData:
    """700 PBMCs × 765 genes with raw counts, embedded in scanpy (no download).

    scanpy's ``pbmc68k_reduced`` stores log-normalised values in ``raw``; the counts are
    recovered exactly as ``round(expm1(raw.X) · n_counts / 1e4)``. Cell labels are in
    ``obs[labels_key]`` (copied from ``bulk_labels``); ``obs["n_counts"]`` is the library size
    of the original, all-gene data.

    Parameters
    ----------
    labels_key
        ``obs`` column that receives the cell labels (``bulk_labels`` is always kept). It may
        not name one of the other columns, ``n_counts``, ``percent_mito`` or ``phase``.
    """
    import scanpy as sc

    columns = ["bulk_labels", "n_counts", "percent_mito", "phase"]
    if labels_key in columns[1:]:  # copying the labels there would silently replace that column
        raise ValueError(
            f"labels_key={labels_key!r} is one of pbmc68k's obs columns {columns[1:]}; pick "
            "another name for the label column (or keep the default 'bulk_labels')."
        )
    src = sc.datasets.pbmc68k_reduced()
    raw = src.raw.to_adata()
    lognorm = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    counts = np.rint(np.expm1(lognorm) * src.obs["n_counts"].to_numpy()[:, None] / 1e4)
    counts = sp.csr_matrix(counts.astype(np.float32))
    obs = src.obs[columns].copy()
    if labels_key != "bulk_labels":
        obs[labels_key] = obs["bulk_labels"]
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=raw.var_names.copy()))
    adata.layers["counts"] = counts.copy()
    adata.obsm["X_umap_reference"] = src.obsm["X_umap"].copy()
    return adata


def pbmc3k(
    data_dir: str | os.PathLike | None = None, hvg_only: bool = False, download: bool | None = None
) -> ad.AnnData:
    """The 2,638 cells of the PBMC 3k tutorial with raw counts and ``obs["cell_type"]``.

    Parameters
    ----------
    data_dir
        Where to look for (and cache) the file; see the module docstring for the default.
    hvg_only
        ``False``: all 32,738 genes (``pbmc3k_full_counts.h5ad``; ``MT-`` genes included for
        QC). ``True``: 2,000 highly variable genes (``pbmc3k_hvg_counts.h5ad``), with
        ``obs["n_counts_all_genes"]`` and ``obs["percent_mito"]`` computed over all genes.
    download
        Build the file when it is absent (default: yes, unless ``$SCVAE_TOOLS_NO_DOWNLOAD``
        is set to anything but ``0``/``false``/``no``). The full file is built from the
        public 10x matrix; the HVG file from the full file, which is built first if absent.

    Raises
    ------
    FileNotFoundError
        The file is absent and building it is not allowed.
    OSError
        The file is absent and building it failed (offline, not a tar, a full disk).
    ValueError
        The file is unreadable (corrupt, truncated) or lacks the ``obs`` columns above.

    Notes
    -----
    The prepared files (see ``../shared/data/README.md``) carry the Seurat tutorial's nine
    types. A file built here from the download takes its labels from scanpy's
    ``pbmc3k_processed`` instead, with the same names but eight types: naive and memory
    CD4 T cells are one group, ``"CD4 T"``. Such an HVG file has no ``X_umap_seurat``.
    Only the missing file is built, each under a temporary name renamed into place, so an
    interrupted build leaves no partial file behind.
    """
    folder = get_data_dir(data_dir)
    name = PBMC3K_HVG if hvg_only else PBMC3K_FULL
    path = folder / name
    if not path.exists():
        if download is None:
            flag = os.environ.get("SCVAE_TOOLS_NO_DOWNLOAD", "").strip().lower()
            download = flag in ("", "0", "false", "no")
        if not download:
            raise FileNotFoundError(
                f"{name} not found in {folder}. Point data_dir= or $SCVAE_TOOLS_DATA_DIR at the "
                "folder that holds it, or allow download=True to build it from the 10x source."
            )
        try:
            # Reuse a cached full file for the HVG one: no second download.
            if not (folder / PBMC3K_FULL).exists():
                _build_pbmc3k_full(folder)
            if hvg_only:
                _build_pbmc3k_hvg(folder)
        # Offline, a proxy's HTML page instead of the tar, a full disk: say where the file goes.
        except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
            raise OSError(
                f"{name} is not in {folder}, and building it from the public 10x matrix failed "
                f"({type(err).__name__}: {err}). Copy the file into that folder, or point "
                f"data_dir= or $SCVAE_TOOLS_DATA_DIR at a folder that holds it ({PBMC3K_URL})."
            ) from err
    required = ["cell_type", "n_counts_all_genes", "percent_mito"] if hvg_only else ["cell_type"]
    adata = _read_h5ad_checked(path, required, _PBMC3K_FIX)
    adata.var_names_make_unique()
    return adata


def _read_h5ad_checked(path: Path, obs_columns: list[str], fix: str) -> ad.AnnData:
    """Read a cached h5ad, naming the file and ``fix`` when it is corrupt or not the expected
    data (h5py's own error names neither)."""
    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path} could not be read as an h5ad file ({type(err).__name__}: {err}); it is "
            f"probably corrupt or truncated. {fix}"
        ) from err
    missing = [c for c in obs_columns if c not in adata.obs]
    if missing:
        raise ValueError(
            f"{path} is not the expected dataset: obs lacks {missing} (it has "
            f"{list(adata.obs.columns)}). {fix}"
        )
    return adata


def _write_h5ad_atomic(adata: ad.AnnData, path: Path) -> None:
    """Write under a temporary name in the same folder, then rename: a failed or interrupted
    write never leaves a partial file under ``path`` (which would be taken as cached)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _build_pbmc3k_full(folder: Path) -> None:
    """Download the public 10x matrix, keep the tutorial's cells and annotate them."""
    import scanpy as sc

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "pbmc3k.tar.gz"
        urllib.request.urlretrieve(PBMC3K_URL, tar)  # noqa: S310 (fixed https URL)
        with tarfile.open(tar) as tf:
            tf.extractall(tmp, filter="data")
        full = sc.read_10x_mtx(Path(tmp) / "filtered_gene_bc_matrices" / "hg19", var_names="gene_symbols")
    full.var_names_make_unique()
    full.var["gene_symbols"] = full.var_names
    # The tutorial's annotated cells (scanpy downloads and caches this file itself).
    processed = sc.datasets.pbmc3k_processed()
    cells = processed.obs_names.intersection(full.obs_names)
    full = full[cells].copy()
    types = processed.obs.loc[cells, "louvain"].astype(str)
    full.obs["cell_type"] = pd.Categorical(types.map(lambda t: _PBMC3K_TYPE_NAMES.get(t, t)))
    full.X = sp.csr_matrix(full.X, dtype=np.float32)
    full.var["seurat_min_cells3"] = np.asarray((full.X > 0).sum(0)).ravel() >= 3
    _write_h5ad_atomic(full, folder / PBMC3K_FULL)


def _build_pbmc3k_hvg(folder: Path) -> None:
    """Select 2,000 highly variable genes (Seurat v3) from the cached full file."""
    import scanpy as sc

    path = folder / PBMC3K_FULL
    full = _read_h5ad_checked(path, ["cell_type"], _PBMC3K_FIX)
    full.var_names_make_unique()
    full.X = sp.csr_matrix(full.X, dtype=np.float32)
    # Recomputed, not read from var: a full file copied in from elsewhere may lack the column.
    keep = np.asarray((full.X > 0).sum(0)).ravel() >= 3
    hvg = full[:, keep].copy()
    sc.pp.highly_variable_genes(hvg, n_top_genes=2000, flavor="seurat_v3")
    hvg = hvg[:, hvg.var["highly_variable"].to_numpy()].copy()
    totals = np.asarray(full.X.sum(1)).ravel()
    mito = np.asarray(full[:, full.var_names.str.startswith("MT-")].X.sum(1)).ravel()
    hvg.obs["n_counts_all_genes"] = totals
    hvg.obs["percent_mito"] = 100 * mito / totals
    _write_h5ad_atomic(hvg, folder / PBMC3K_HVG)


def cellbench(data_dir: str | os.PathLike | None = None, singlets_only: bool = True) -> ad.AnnData:
    """CellBench 5 lung-adenocarcinoma cell lines across runs and technologies (Tian et al. 2019).

    ``obs["cell_line"]`` is the truth to keep apart, ``obs["batch"]`` (5 runs) and
    ``obs["technology"]`` the effects to remove. With ``singlets_only`` the demuxlet
    doublets are dropped. This file has no automatic download; put
    ``cellbench_5_cell_lines.h5ad`` into the data directory.

    Parameters
    ----------
    data_dir
        Folder holding the file; default ``$SCVAE_TOOLS_DATA_DIR``, else the user cache
        (see the module docstring).
    singlets_only
        Drop the cells demuxlet called doublets or ambiguous (keep ``demuxlet_cls == "SNG"``).

    Raises
    ------
    FileNotFoundError
        The file is not in the data directory.
    ValueError
        The file is unreadable (corrupt, truncated) or lacks ``cell_line``, ``batch``,
        ``technology`` or (with ``singlets_only``) ``demuxlet_cls`` in ``obs``.
    """
    path = get_data_dir(data_dir) / "cellbench_5_cell_lines.h5ad"
    if not path.exists():
        raise FileNotFoundError(
            f"{path.name} not found in {path.parent}; point data_dir= or $SCVAE_TOOLS_DATA_DIR at it."
        )
    required = ["cell_line", "batch", "technology"] + (["demuxlet_cls"] if singlets_only else [])
    adata = _read_h5ad_checked(path, required, (
        "Delete it and put the right file there (it has no automatic download), or point "
        "data_dir= at a folder that holds it."))
    if singlets_only:
        adata = adata[adata.obs["demuxlet_cls"].astype(str) == "SNG"].copy()
    return adata


def _nb_counts_from_logits(
    rng: np.random.Generator, logits: np.ndarray, theta: float, mean_library: float,
    library_sd: float = 0.3,
) -> np.ndarray:
    """NB counts (Gamma–Poisson) with proportions softmax(logits) and log-normal libraries."""
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    lib = rng.lognormal(np.log(mean_library), library_sd, logits.shape[0])
    mu = rho * lib[:, None]
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1.0  # never emit an empty cell
    return counts


#: ``synthetic_counts`` settings whose counts resemble pbmc3k's 2,000 variable genes in
#: sparsity, library size and the spread of gene means (the defaults are ~4× denser).
PBMC_LIKE: dict[str, float] = {"mean_library": 480.0, "gene_sd": 2.0, "library_sd": 0.5,
                               "theta": 2.0}


def synthetic_counts(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_types: int = 5,
    n_batches: int = 1,
    batch_effect: float = 0.5,
    theta: float = 5.0,
    mean_library: float = 2000.0,
    seed: int = 0,
    gene_sd: float = 1.0,
    library_sd: float = 0.3,
) -> ad.AnnData:
    """Negative Binomial counts from cell types (and optional batches) with known truth.

    Each type has its own gene-proportion profile (log-normal perturbations of a shared
    base whose log-proportions have standard deviation ``gene_sd``); each batch multiplies
    genes by its own log-normal factor. Library sizes are log-normal with median
    ``mean_library`` and log standard deviation ``library_sd``. ``obs["cell_type"]`` and
    ``obs["batch"]`` hold the truth; ``X`` is CSR float32 integer counts.

    The defaults give dense counts (42% non-zeros for 2,000 genes). For counts shaped like
    pbmc3k's 2,000 variable genes (9.8% non-zeros, median library 484), pass
    ``**svt.datasets.PBMC_LIKE``: about 11% non-zeros, median library ~476.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the counts.
    n_types
        Cell types (``obs["cell_type"]``, drawn uniformly per cell).
    n_batches
        Batches (``obs["batch"]``, drawn uniformly per cell).
    batch_effect
        Standard deviation of each batch's log-factor per gene.
    theta
        The NB's inverse dispersion, the same for every gene.
    mean_library
        Median library size.
    seed
        Seeds everything drawn.
    gene_sd
        Standard deviation of the shared base log-proportions (larger: a wider spread of
        gene means, sparser counts).
    library_sd
        Log standard deviation of the library sizes.
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(0, gene_sd, n_genes)
    type_profiles = base + rng.normal(0, 1.0, (n_types, n_genes)) * (rng.random((n_types, n_genes)) < 0.2)
    batch_shift = rng.normal(0, batch_effect, (n_batches, n_genes))
    types = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    counts = _nb_counts_from_logits(rng, type_profiles[types] + batch_shift[batches], theta,
                                    mean_library, library_sd)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type{t}" for t in types]),
         "batch": pd.Categorical([f"batch{b}" for b in batches])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


def synthetic_factors(
    n_cells: int = 1000,
    n_genes: int = 300,
    n_factors: int = 3,
    genes_per_factor: int = 30,
    effect: float = 1.5,
    theta: float = 10.0,
    mean_library: float = 3000.0,
    seed: int = 0,
) -> ad.AnnData:
    """Negative Binomial counts driven by independent continuous factors with known genes.

    For disentanglement checks: factor k ~ Uniform(−1, 1), independently per cell, scales
    the log-proportion of its own block of ``genes_per_factor`` genes by ``±effect`` (a sign
    per gene); the remaining genes follow a shared baseline. ``obs["factor0"], …`` hold the
    factor values, ``var["factor"]`` the factor that drives each gene (``"none"`` for
    background genes); ``X`` is CSR float32 integer counts.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the counts.
    n_factors
        Independent continuous factors.
    genes_per_factor
        Genes in each factor's block (``n_factors × genes_per_factor ≤ n_genes``).
    effect
        Size of a factor's effect on the log-proportions of its genes.
    theta
        The NB's inverse dispersion, the same for every gene.
    mean_library
        Median library size.
    seed
        Seeds everything drawn.
    """
    if n_factors * genes_per_factor > n_genes:
        raise ValueError(
            f"n_factors × genes_per_factor = {n_factors * genes_per_factor} exceeds n_genes="
            f"{n_genes}; lower genes_per_factor or raise n_genes."
        )
    rng = np.random.default_rng(seed)
    factors = rng.uniform(-1.0, 1.0, (n_cells, n_factors))
    base = rng.normal(0, 1.0, n_genes)
    loadings = np.zeros((n_factors, n_genes))
    owner = np.full(n_genes, "none", dtype=object)
    genes = rng.permutation(n_genes)
    for k in range(n_factors):
        block = genes[k * genes_per_factor:(k + 1) * genes_per_factor]
        loadings[k, block] = effect * rng.choice([-1.0, 1.0], len(block))
        owner[block] = f"factor{k}"
    counts = _nb_counts_from_logits(rng, base + factors @ loadings, theta, mean_library)
    obs = pd.DataFrame({f"factor{k}": factors[:, k] for k in range(n_factors)},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame({"factor": pd.Categorical(owner)}, index=[f"gene{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
