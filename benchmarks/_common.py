"""Shared pieces of the speed benchmarks: data sets, the held-out split, one run per tool.

Each ``run_*`` function trains on the training cells only, then reports on the held-out
cells (ELBO, importance-weighted log p(x)) and on all cells (Leiden ARI / NMI of the latent
against the known labels). Both tools get the same split: the same held-out indices.

Times are reported both as wall-clock and as this process's CPU time (``time.process_time``):
with one torch thread and no loader workers (scvi-tools' ``dl_num_workers = 0``) the CPU time
is the work each tool does, and it stays meaningful on a shared, oversubscribed machine where
wall-clock mostly measures the other tenants. Throughputs (cells/s) use CPU time.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import numpy as np

DATA_DIR = None  # None: $SCVAE_TOOLS_DATA_DIR or ../shared/data (see load())


@dataclass
class Dataset:
    name: str
    adata: object  # AnnData with raw counts in X (CSR)
    labels_key: str
    test_idx: np.ndarray  # held-out cells, never trained on by either tool

    @property
    def train_idx(self) -> np.ndarray:
        mask = np.ones(self.adata.n_obs, dtype=bool)
        mask[self.test_idx] = False
        return np.flatnonzero(mask)


def measured_code() -> str:
    """Which scvae_tools a run measures: its folder and commit. A script started from a
    folder that holds an old clone imports that clone, not the installed package."""
    import subprocess
    from pathlib import Path

    import scvae_tools as svt

    where = Path(svt.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--",
                                str(where)], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return (f"scvae_tools {svt.__version__} from {where}"
            + (f" at {commit}{' + changes' if dirty else ''}" if commit else ""))


def _data_dir():
    import os
    from pathlib import Path

    for cand in (os.environ.get("SCVAE_TOOLS_DATA_DIR"),
                 Path(__file__).resolve().parents[1].parent / "shared" / "data"):
        if cand and (Path(cand) / "pbmc3k_hvg_counts.h5ad").exists():
            return Path(cand)
    return None


def load(name: str, n_cells: int | None = None, test_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """``pbmc3k`` (HVG counts), ``pbmc68k`` (scanpy's 700 cells), ``synthetic`` (n × 2,000,
    42% non-zeros) or ``synthetic-sparse`` (n × 2,000 shaped like pbmc3k's HVGs: ~11%
    non-zeros, median library ~480; ``svt.datasets.PBMC_LIKE``)."""
    import scvae_tools as svt

    if name == "pbmc3k":
        adata = svt.datasets.pbmc3k(_data_dir(), hvg_only=True, download=False)
        key = "cell_type"
    elif name == "pbmc68k":
        adata = svt.datasets.pbmc68k()
        key = "bulk_labels"
    elif name in ("synthetic", "synthetic-sparse"):
        shape = svt.datasets.PBMC_LIKE if name == "synthetic-sparse" else {}
        adata = svt.datasets.synthetic_counts(n_cells=n_cells or 100_000, n_genes=2000,
                                              n_types=8, seed=seed, **shape)
        key = "cell_type"
    else:
        raise ValueError(f"unknown dataset {name!r}; choose pbmc3k, pbmc68k, synthetic or "
                         "synthetic-sparse")
    rng = np.random.default_rng(seed)
    n_test = int(round(test_fraction * adata.n_obs))
    test_idx = np.sort(rng.permutation(adata.n_obs)[:n_test])
    return Dataset(name, adata, key, test_idx)


def leiden_scores(latent: np.ndarray, labels, seed: int = 0, leiden_seeds: int = 5
                  ) -> tuple[float, float]:
    """ARI and NMI of Leiden clusters (15-NN graph on the latent, resolution 1) vs labels,
    averaged over ``leiden_seeds`` Leiden runs (random states ``seed``, ``seed + 1``, …).

    One Leiden run is a noisy measurement: on one pbmc3k latent, random states 0–4 gave ARI
    0.539–0.589. The mean over five runs measures the latent rather than Leiden's luck.
    """
    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    a = ad.AnnData(np.zeros((latent.shape[0], 1), dtype=np.float32))
    a.obsm["X_lat"] = latent
    adjacency = None
    try:
        sc.pp.neighbors(a, use_rep="X_lat", n_neighbors=15, random_state=seed)
    except AttributeError:
        # Some scanpy/scipy pairs fail inside sc.pp.neighbors on larger data (csr_array has
        # no getnnz): fall back to a symmetrised sklearn 15-NN graph, the same for both tools.
        import scipy.sparse as sp
        from sklearn.neighbors import kneighbors_graph

        g = kneighbors_graph(latent, 15, include_self=False)
        adjacency = sp.csr_matrix(((g + g.T) > 0).astype(np.float64))
    lab = np.asarray(labels).astype(str)
    ari, nmi = [], []
    for s in range(seed, seed + leiden_seeds):
        sc.tl.leiden(a, resolution=1.0, random_state=s, flavor="igraph", n_iterations=2,
                     directed=False, adjacency=adjacency)
        ari.append(adjusted_rand_score(lab, a.obs["leiden"]))
        nmi.append(normalized_mutual_info_score(lab, a.obs["leiden"]))
    return float(np.mean(ari)), float(np.mean(nmi))


def reset_peak_rss() -> None:
    """Start :func:`peak_rss_mb` afresh from the current resident memory (Linux).

    Called once the data set is in memory, so that the peak is that of training and
    inference (the data included), not of building the data: generating the synthetic
    100k × 2,000 set peaks at ~8 GB of float64 temporaries, which had hidden both tools'
    own peaks behind the same figure.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak then includes loading the data
        pass


def _status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` in MiB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB: since :func:`reset_peak_rss` on Linux
    (``VmHWM``), else since the start (``ru_maxrss``)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident memory of this process now, MiB (Linux ``VmRSS``; NaN elsewhere)."""
    now = _status_mb("VmRSS")
    return now if now is not None else float("nan")


def matmul_peak_gflops(n: int = 1024, reps: int = 10) -> float:
    """What a large float32 matmul reaches on this machine, GFLOP/s (best of ``reps``)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()  # CPU time: insensitive to other tenants (1 thread)
        a @ b
        best = min(best, time.process_time() - t)
    return 2 * n**3 / best / 1e9


def step_flops(n_genes: int, n_hidden: int = 128, n_latent: int = 10, batch: int = 128) -> float:
    """Matmul FLOPs of one training step of the 1-layer model (forward + backward).

    Encoder: genes→hidden (no gradient w.r.t. the input counts: 2 matmuls), hidden→2·latent;
    decoder: latent→hidden, hidden→genes (3 matmuls each: forward, grad input, grad weight).
    """
    mm = 2 * batch
    enc = mm * n_genes * n_hidden * 2 + mm * n_hidden * 2 * n_latent * 3
    dec = mm * n_latent * n_hidden * 3 + mm * n_hidden * n_genes * 3
    return float(enc + dec)


def _timed(fn, *args, repeats: int = 5):
    """``fn(*args)`` and its (CPU, wall) seconds: the best of ``repeats`` calls (the first
    one warms caches and allocators; on small data one call takes tens of milliseconds, and
    this VM's run-to-run noise needs several tries to see the undisturbed time)."""
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        best_cpu = min(best_cpu, time.process_time() - c)
        best_wall = min(best_wall, time.perf_counter() - t)
    return out, (best_cpu, best_wall)


def run_ours(ds: Dataset, settings: dict, marginal_samples: int = 100, seed: int = 0) -> dict:
    """Train scvae_tools on ``ds``'s training cells with ``settings`` (SCVAE.train kwargs)."""
    import scvae_tools as svt

    reset_peak_rss()
    train = ds.adata[ds.train_idx].copy()
    test = ds.adata[ds.test_idx].copy()
    arch = {k: settings.pop(k) for k in ("n_hidden", "n_latent", "n_layers", "likelihood")
            if k in settings}
    model = svt.SCVAE(train, **arch)
    t, c = time.perf_counter(), time.process_time()
    model.train(progress_bar=False, device="cpu", seed=seed, **settings)
    train_s, train_cpu_s = time.perf_counter() - t, time.process_time() - c
    hist = model.history
    epochs = len(hist)
    n_train_fit = len(model.train_indices)
    out = {"tool": "scvae_tools", "train_s": train_s, "train_cpu_s": train_cpu_s,
           "epochs": epochs, "cells_per_s": epochs * n_train_fit / train_cpu_s,
           "cells_per_s_wall": epochs * n_train_fit / train_s,
           "batch_size": model.train_config.batch_size, "lr": model.train_config.lr}
    out["heldout_elbo"] = model.get_elbo(test)
    out["heldout_marginal_ll"] = model.get_marginal_ll(test, n_samples=marginal_samples)
    latent, (inf_s, inf_wall) = _timed(model.get_latent_representation, ds.adata)
    _, (expr_s, expr_wall) = _timed(model.get_normalized_expression, ds.adata)
    out["latent_cells_per_s"] = ds.adata.n_obs / inf_s
    out["expression_cells_per_s"] = ds.adata.n_obs / expr_s
    out["latent_cells_per_s_wall"] = ds.adata.n_obs / inf_wall
    out["expression_cells_per_s_wall"] = ds.adata.n_obs / expr_wall
    out["ari"], out["nmi"] = leiden_scores(latent, ds.adata.obs[ds.labels_key])
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_scvi(ds: Dataset, settings: dict, marginal_samples: int = 100, seed: int = 0) -> dict:
    """Train scvi-tools' SCVI on ``ds``'s training cells; ``settings`` for SCVI / train()."""
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    reset_peak_rss()
    train = ds.adata[ds.train_idx].copy()
    test = ds.adata[ds.test_idx].copy()
    full = ds.adata.copy()
    model_kw = {k: settings.pop(k) for k in ("n_hidden", "n_latent", "n_layers", "dispersion",
                                             "gene_likelihood") if k in settings}
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(train, **model_kw)
    t, c = time.perf_counter(), time.process_time()
    model.train(accelerator="cpu", enable_progress_bar=False, **settings)
    train_s, train_cpu_s = time.perf_counter() - t, time.process_time() - c
    epochs = int(model.history["elbo_train"].shape[0])
    n_train_fit = len(model.train_indices)
    out = {"tool": "scvi-tools", "train_s": train_s, "train_cpu_s": train_cpu_s,
           "epochs": epochs, "cells_per_s": epochs * n_train_fit / train_cpu_s,
           "cells_per_s_wall": epochs * n_train_fit / train_s}
    scvi.model.SCVI.setup_anndata(test)
    out["heldout_elbo"] = float(model.get_elbo(test))  # a per-cell mean
    # Per cell, then the mean: with return_mean=True scvi-tools 1.4 averages its per-batch
    # means, so the last, short batch of the held-out cells weighs as much as a full one
    # (24 nats off after 3 epochs on pbmc3k's 264 cells: 128 + 128 + 8).
    out["heldout_marginal_ll"] = float(model.get_marginal_ll(
        test, n_mc_samples=marginal_samples, return_mean=False).mean())
    scvi.model.SCVI.setup_anndata(full)
    # Inference in batches as large as ours (scvi-tools' default 128 would halve its
    # latent throughput here): the comparison is of the computation, not of a default.
    from scvae_tools.model import default_inference_batch_size

    infer_batch = default_inference_batch_size(full.n_vars)
    latent, (inf_s, inf_wall) = _timed(
        lambda a: model.get_latent_representation(a, batch_size=infer_batch), full)
    _, (expr_s, expr_wall) = _timed(
        lambda a: model.get_normalized_expression(a, batch_size=infer_batch,
                                                  library_size=1e4, return_numpy=True), full)
    out["inference_batch_size"] = infer_batch
    out["latent_cells_per_s"] = full.n_obs / inf_s
    out["expression_cells_per_s"] = full.n_obs / expr_s
    out["latent_cells_per_s_wall"] = full.n_obs / inf_wall
    out["expression_cells_per_s_wall"] = full.n_obs / expr_wall
    out["ari"], out["nmi"] = leiden_scores(latent, full.obs[ds.labels_key])
    out["peak_rss_mb"] = peak_rss_mb()
    return out
