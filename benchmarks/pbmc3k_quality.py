"""Clustering quality on pbmc3k: Leiden on the SCVAE latent vs on PCA of log-normalised data.

    python benchmarks/pbmc3k_quality.py [--data-dir ../shared/data] [--all-genes] [--seed 0]
        [--resolutions 0.5 1.0] [--grid] [--probe] [--prior mog --n-prior-components 10]
        [--scvi] [--latent NAME=FILE.npy ...] [--pca-comps 10 50] [--pca-scaled]
        [--pca-perturbed N] [--sd-scaled P ...]
        [--model-kwargs JSON] [--train-kwargs JSON]

Prints train time, epochs, held-out ELBO and, for each representation and Leiden
resolution, the number of clusters and ARI / NMI against the tutorial's `cell_type`.

``--grid`` adds the scib-style summary: resolutions 0.1, 0.2, …, 2.0 with Leiden seeds
0, 1, 2; per representation the ARI at the resolution of highest NMI (scib's protocol), the
best ARI and the mean ARI over the grid, each averaged over the Leiden seeds.
``--scvi`` scores scvi-tools' ``SCVI`` as well, trained with its own defaults (400 epochs,
ZINB, 10 latent dimensions; seed ``--seed``) on the same cells: the field's reference model
under the same protocol (needs the benchmark extra, ``pip install scvi-tools``).
``--latent X_gpu=pbmc3k_latent_fp32.npy`` scores a latent computed elsewhere (cells in the
file's order, e.g. the GPU runs of ``gpu_check.py``) under the same protocol.
``--pca-scaled`` adds PCA of the scaled data (scanpy's tutorial workflow).
``--pca-comps 10 20 50`` scores PCA with each of these numbers of components (default 50
alone; ``X_pca`` is 50, others ``X_pca10`` …): PCA's lead does not come from its dimension.
``--pca-perturbed N`` adds N PCAs (50 components) of the log-normalised data on a random 90%
of the genes (``X_pca_genes90_i``) and N fitted on a random 90% of the cells, all cells
projected (``X_pca_cells90_i``): how much PCA's own score moves under small perturbations.
``--model-kwargs '{"beta": 0.5}'`` and ``--train-kwargs '{"max_epochs": 100}'`` train with
other settings than the defaults.
``--sd-scaled 0.5 1`` also scores the latent means divided by each axis's mean posterior
standard deviation to these powers (a reading of the same model, not a new one).
``--probe`` asks whether the representation *contains* the naive / memory CD4 T distinction,
which PCA's clusters follow and the latent's do not: 5-fold cross-validated accuracy of a
logistic regression on the standardised coordinates of those cells.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import scanpy as sc
from _common import measured_code
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import scvae_tools as svt


def leiden_scores(adata, rep: str, resolutions=(0.5, 1.0), seed: int = 0) -> list[dict]:
    """Leiden clusterings of ``obsm[rep]`` scored against ``obs['cell_type']``."""
    a = adata.copy()
    sc.pp.neighbors(a, use_rep=rep, random_state=seed)
    rows = []
    for res in resolutions:
        sc.tl.leiden(a, resolution=res, flavor="igraph", n_iterations=2, directed=False,
                     random_state=seed)
        rows.append({"rep": rep, "resolution": res, "clusters": a.obs["leiden"].nunique(),
                     "ARI": adjusted_rand_score(a.obs["cell_type"], a.obs["leiden"]),
                     "NMI": normalized_mutual_info_score(a.obs["cell_type"], a.obs["leiden"])})
    return rows


def grid_summary(adata, rep: str, seeds=(0, 1, 2)) -> dict:
    """scib-style: per Leiden seed, ARI at the resolution of best NMI, best and mean ARI."""
    a = adata.copy()
    sc.pp.neighbors(a, use_rep=rep, random_state=0)
    at_best_nmi, best, mean = [], [], []
    for seed in seeds:
        aris, nmis = [], []
        for res in np.round(np.arange(0.1, 2.01, 0.1), 2):
            sc.tl.leiden(a, resolution=res, flavor="igraph", n_iterations=2, directed=False,
                         random_state=seed)
            aris.append(adjusted_rand_score(a.obs["cell_type"], a.obs["leiden"]))
            nmis.append(normalized_mutual_info_score(a.obs["cell_type"], a.obs["leiden"]))
        at_best_nmi.append(aris[int(np.argmax(nmis))])
        best.append(max(aris))
        mean.append(float(np.mean(aris)))
    return {"ARI at best NMI": np.mean(at_best_nmi), "best ARI": np.mean(best),
            "mean ARI": np.mean(mean)}


def naive_memory_probe(adata, rep: str) -> float:
    """Cross-validated accuracy of a linear classifier for naive vs memory CD4 T cells."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    labels = adata.obs["cell_type"].astype(str).to_numpy()
    keep = np.isin(labels, ["Naive CD4 T", "Memory CD4 T"])
    X = adata.obsm[rep][keep]
    X = (X - X.mean(0)) / X.std(0)
    return float(cross_val_score(LogisticRegression(max_iter=2000), X, labels[keep], cv=5).mean())


def pca_embedding(adata, n_comps: int = 50, scaled: bool = False):
    """The standard scanpy path: normalise to 1e4, log1p, PCA (on HVGs when available);
    ``scaled``: each gene scaled to unit variance (clipped at 10) first, as scanpy's
    tutorial does."""
    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    if b.n_vars > 5000:
        sc.pp.highly_variable_genes(b, n_top_genes=2000)
        b = b[:, b.var["highly_variable"]].copy()
    if scaled:
        sc.pp.scale(b, max_value=10)
    sc.pp.pca(b, n_comps=n_comps, random_state=0)
    return b.obsm["X_pca"]


def perturbed_pcas(adata, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """PCA (50 components) of the log-normalised counts, ``n`` times on a random 90% of the
    genes and ``n`` times fitted on a random 90% of the cells (every cell projected)."""
    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    X = b.X.toarray() if hasattr(b.X, "toarray") else np.asarray(b.X)
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        genes = np.sort(rng.choice(b.n_vars, int(0.9 * b.n_vars), replace=False))
        c = b[:, genes].copy()
        sc.pp.pca(c, n_comps=50, random_state=0)
        out[f"X_pca_genes90_{i}"] = c.obsm["X_pca"]
    for i in range(n):
        cells = np.sort(rng.choice(b.n_obs, int(0.9 * b.n_obs), replace=False))
        mean = X[cells].mean(0)
        _, _, vt = np.linalg.svd(X[cells] - mean, full_matrices=False)
        out[f"X_pca_cells90_{i}"] = (X - mean) @ vt[:50].T
    return out


def scvi_latent(adata, seed: int) -> np.ndarray:
    """Latent means of scvi-tools' SCVI trained on ``adata`` (a copy) with its defaults."""
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    data = adata.copy()
    scvi.model.SCVI.setup_anndata(data)
    model = scvi.model.SCVI(data)
    model.train(accelerator="cpu", enable_progress_bar=False)
    return model.get_latent_representation()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--all-genes", action="store_true",
                   help="all 32,738 genes (PCA then on 2,000 HVGs) instead of the 2,000 HVGs")
    p.add_argument("--resolutions", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", action="store_true",
                   help="scib-style summary over resolutions 0.1-2.0 and Leiden seeds 0-2")
    p.add_argument("--probe", action="store_true",
                   help="linear-probe accuracy for naive vs memory CD4 T cells")
    p.add_argument("--prior", default="normal", choices=["normal", "mog"],
                   help="the latent prior (the default model uses the standard normal)")
    p.add_argument("--n-prior-components", type=int, default=10,
                   help="mixture components of --prior mog")
    p.add_argument("--scvi", action="store_true",
                   help="also score scvi-tools' SCVI trained with its defaults (benchmark extra)")
    p.add_argument("--latent", action="append", default=[], metavar="NAME=FILE.npy",
                   help="also score a latent computed elsewhere (e.g. by gpu_check.py)")
    p.add_argument("--pca-comps", type=int, nargs="+", default=[50],
                   help="PCA with each of these numbers of components (default: 50)")
    p.add_argument("--pca-scaled", action="store_true",
                   help="also PCA of scaled log-normalised data (X_pca_scaled, 50 components)")
    p.add_argument("--pca-perturbed", type=int, default=0, metavar="N",
                   help="also N PCAs on 90%% of the genes and N fitted on 90%% of the cells")
    p.add_argument("--sd-scaled", type=float, nargs="+", default=[], metavar="P",
                   help="also the latent means divided by (mean posterior SD per axis)**P "
                        "(X_scvae_sdP): axes the encoder is surer of weigh more")
    p.add_argument("--model-kwargs", type=json.loads, default={}, metavar="JSON",
                   help='other SCVAE settings, e.g. \'{"beta": 0.5}\'')
    p.add_argument("--train-kwargs", type=json.loads, default={}, metavar="JSON",
                   help='other train() settings, e.g. \'{"max_epochs": 100}\'')
    args = p.parse_args()
    if args.scvi:  # before our model trains, not after
        try:
            import scvi  # noqa: F401
        except ImportError:
            raise SystemExit("--scvi needs scvi-tools: pip install -e '.[bench]'.") from None
    print(measured_code())
    adata = svt.datasets.pbmc3k(args.data_dir, hvg_only=not args.all_genes)
    t0 = time.perf_counter()
    model = svt.SCVAE(adata, prior=args.prior, n_prior_components=args.n_prior_components,
                      **args.model_kwargs)
    model.train(progress_bar=False, seed=args.seed, **args.train_kwargs)
    secs = time.perf_counter() - t0
    means, variances = model.get_latent_representation(return_dist=True)
    adata.obsm["X_scvae"] = means
    reps = ["X_scvae"]
    for power in args.sd_scaled:
        name = f"X_scvae_sd{power:g}"
        adata.obsm[name] = (means / np.sqrt(variances).mean(0) ** power).astype(np.float32)
        reps.append(name)
    for k in args.pca_comps:
        name = "X_pca" if k == 50 else f"X_pca{k}"
        adata.obsm[name] = pca_embedding(adata, k)
        reps.append(name)
    if args.pca_scaled:
        adata.obsm["X_pca_scaled"] = pca_embedding(adata, scaled=True)
        reps.append("X_pca_scaled")
    for name, z in perturbed_pcas(adata, args.pca_perturbed).items():
        adata.obsm[name] = z
        reps.append(name)
    if args.scvi:
        t1 = time.perf_counter()
        adata.obsm["X_scvi"] = scvi_latent(adata, args.seed)
        print(f"scvi-tools SCVI (its defaults) trained in {time.perf_counter() - t1:.1f} s")
        reps.append("X_scvi")
    for spec in args.latent:
        name, _, path = spec.partition("=")
        z = np.load(path)
        if z.shape[0] != adata.n_obs:
            raise ValueError(f"{path} has {z.shape[0]} rows; pbmc3k has {adata.n_obs} cells")
        adata.obsm[name] = z
        reps.append(name)
    print(f"pbmc3k {adata.n_obs} cells × {adata.n_vars} genes: trained {len(model.history)} "
          f"epochs in {secs:.1f} s; held-out ELBO "
          f"{model.get_elbo(indices=model.validation_indices):.2f} nats/cell")
    print(f"{'rep':8s} {'res':>4s} {'clusters':>8s} {'ARI':>6s} {'NMI':>6s}")
    for rep in reps:
        for r in leiden_scores(adata, rep, resolutions=args.resolutions, seed=args.seed):
            print(f"{r['rep']:8s} {r['resolution']:4.1f} {r['clusters']:8d} {r['ARI']:6.3f} "
                  f"{r['NMI']:6.3f}")
    for rep in reps:
        if args.grid:
            summary = ", ".join(f"{k} {v:.3f}" for k, v in grid_summary(adata, rep).items())
            print(f"{rep}: {summary}")
        if args.probe:
            print(f"{rep}: naive vs memory CD4 T, linear-probe accuracy "
                  f"{naive_memory_probe(adata, rep):.3f}")


if __name__ == "__main__":
    main()
