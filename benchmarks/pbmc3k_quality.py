"""Clustering quality on pbmc3k: Leiden on the SCVAE latent vs on PCA of log-normalised data.

    python benchmarks/pbmc3k_quality.py [--data-dir ../shared/data] [--all-genes] [--seed 0]
        [--resolutions 0.5 1.0]

Prints train time, epochs, held-out ELBO and, for each representation and Leiden
resolution, the number of clusters and ARI / NMI against the tutorial's `cell_type`.
"""

from __future__ import annotations

import argparse
import time

import scanpy as sc
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


def pca_embedding(adata, n_comps: int = 50):
    """The standard scanpy path: normalise to 1e4, log1p, PCA (on HVGs when available)."""
    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    if b.n_vars > 5000:
        sc.pp.highly_variable_genes(b, n_top_genes=2000)
        b = b[:, b.var["highly_variable"]].copy()
    sc.pp.pca(b, n_comps=n_comps, random_state=0)
    return b.obsm["X_pca"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--all-genes", action="store_true",
                   help="all 32,738 genes (PCA then on 2,000 HVGs) instead of the 2,000 HVGs")
    p.add_argument("--resolutions", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    adata = svt.datasets.pbmc3k(args.data_dir, hvg_only=not args.all_genes)
    t0 = time.perf_counter()
    model = svt.SCVAE(adata)
    model.train(progress_bar=False, seed=args.seed)
    secs = time.perf_counter() - t0
    adata.obsm["X_scvae"] = model.get_latent_representation()
    adata.obsm["X_pca"] = pca_embedding(adata)
    print(f"pbmc3k {adata.n_obs} cells × {adata.n_vars} genes: trained {len(model.history)} "
          f"epochs in {secs:.1f} s; held-out ELBO "
          f"{model.get_elbo(indices=model.validation_indices):.2f} nats/cell")
    print(f"{'rep':8s} {'res':>4s} {'clusters':>8s} {'ARI':>6s} {'NMI':>6s}")
    for rep in ("X_scvae", "X_pca"):
        for r in leiden_scores(adata, rep, resolutions=args.resolutions, seed=args.seed):
            print(f"{r['rep']:8s} {r['resolution']:4.1f} {r['clusters']:8d} {r['ARI']:6.3f} "
                  f"{r['NMI']:6.3f}")


if __name__ == "__main__":
    main()
