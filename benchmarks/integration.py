"""Batch correction on CellBench (5 runs, 2 technologies, 5 known cell lines), scored with scib-metrics.

Embeddings compared on the same cells and the same 2,000 HVGs (seurat_v3 on counts):

* ``PCA``              — normalize_total + log1p + 30 PCs (no integration: the baseline).
* ``scvae (no batch)`` — ``svt.SCVAE(adata)``: the VAE without batch information.
* ``scvae``            — ``svt.SCVAE(adata, batch_key=...)``.
* ``scVI``             — scvi-tools' ``SCVI`` with the same batch key (if scvi-tools is installed).

Metrics (scib-metrics, computed as its ``Benchmarker`` does: pynndescent neighbours, 90 for
iLISI, 50 for kBET, 15 for graph connectivity): batch mixing — iLISI, kBET (per label),
silhouette batch; cell-line conservation — graph connectivity, silhouette label. All in
[0, 1], higher is better. ``--query`` adds reference mapping: a reference on the four
CEL-seq2 runs, Drop-seq mapped onto it with ``SCVAE.load_query`` (and scvi-tools'
``load_query_data``), scored by kNN label transfer accuracy onto the reference latent.

scib-metrics and scvi-tools are benchmark-only extras (``pip install -e ".[bench]"``);
run it from the bench venv::

    .venv-bench/bin/python benchmarks/integration.py --seeds 0 1 --query
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def load_cellbench(n_top_genes: int, batch_key: str):
    import scanpy as sc
    from _common import _data_dir

    import scvae_tools as svt

    adata = svt.datasets.cellbench(_data_dir())  # singlets only
    sc.pp.filter_genes(adata, min_cells=3)
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat_v3",
                                batch_key=batch_key)
    adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    keep = np.asarray(adata.X.sum(1)).ravel() > 0
    return adata[keep].copy()


def pca_embedding(adata, n_comps: int = 30, seed: int = 0) -> np.ndarray:
    import scanpy as sc

    a = adata.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=n_comps, random_state=seed)
    return a.obsm["X_pca"]


def scvae_embedding(adata, batch_key: str | None, epochs: int, seed: int) -> tuple[np.ndarray, int]:
    import scvae_tools as svt

    model = svt.SCVAE(adata, batch_key=batch_key, n_latent=10)
    model.train(max_epochs=epochs, seed=seed, progress_bar=False)
    return model.get_latent_representation(), len(model.history)


def scvi_embedding(adata, batch_key: str, epochs: int, seed: int) -> tuple[np.ndarray, int]:
    import scvi

    scvi.settings.seed = seed
    a = adata.copy()
    scvi.model.SCVI.setup_anndata(a, batch_key=batch_key)
    model = scvi.model.SCVI(a, n_latent=10)
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    return model.get_latent_representation(), epochs


def scib_scores(X: np.ndarray, batch: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    import scib_metrics as sm
    from scib_metrics.nearest_neighbors import pynndescent

    nn = pynndescent(np.asarray(X, dtype=np.float32), n_neighbors=90, random_state=0)
    out = {
        "iLISI": sm.ilisi_knn(nn, batch),
        "kBET": sm.kbet_per_label(nn.subset_neighbors(n=50), batch, labels),
        "silhouette_batch": sm.silhouette_batch(X, labels, batch),
        "graph_connectivity": sm.graph_connectivity(nn.subset_neighbors(n=15), labels),
        "silhouette_label": sm.silhouette_label(X, labels),
    }
    out = {k: float(v) for k, v in out.items()}
    out["batch_mean"] = float(np.mean([out["iLISI"], out["kBET"], out["silhouette_batch"]]))
    out["bio_mean"] = float(np.mean([out["graph_connectivity"], out["silhouette_label"]]))
    return out


def knn_accuracy(ref_latent, ref_labels, query_latent, query_labels, k: int = 15) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=k).fit(ref_latent, ref_labels)
    return float(np.mean(knn.predict(query_latent) == query_labels))


def joint_ilisi(ref_latent, query_latent) -> float:
    """iLISI of reference vs query cells in the joint latent (0: apart, 1: fully mixed)."""
    import scib_metrics as sm
    from scib_metrics.nearest_neighbors import pynndescent

    Z = np.vstack([ref_latent, query_latent]).astype(np.float32)
    origin = np.array(["reference"] * len(ref_latent) + ["query"] * len(query_latent))
    return float(sm.ilisi_knn(pynndescent(Z, n_neighbors=90, random_state=0), origin))


def query_mapping(adata, batch_key: str, label_key: str, query_batch: str, epochs: int,
                  seed: int, tools: list[str], workdir: Path) -> list[dict]:
    """Reference = every other batch; query = ``query_batch``; kNN label transfer accuracy."""
    import scvae_tools as svt

    is_q = (adata.obs[batch_key].astype(str) == query_batch).to_numpy()
    ref, query = adata[~is_q].copy(), adata[is_q].copy()
    ref_labels = ref.obs[label_key].astype(str).to_numpy()
    q_labels = query.obs[label_key].astype(str).to_numpy()
    rows = []
    reference = svt.SCVAE(ref, batch_key=batch_key, n_latent=10)
    reference.train(max_epochs=epochs, seed=seed, progress_bar=False)
    path = workdir / f"scvae_ref_{seed}"
    reference.save(path, overwrite=True)
    z_ref = reference.get_latent_representation()
    for name, q_epochs in (("scvae load_query, no fine-tuning", 0), ("scvae load_query", epochs)):
        t0 = time.perf_counter()
        qm = svt.SCVAE.load_query(path, query, max_epochs=q_epochs, seed=seed, progress_bar=False)
        seconds = time.perf_counter() - t0
        z_q = qm.get_latent_representation()
        rows.append({"method": name, "seed": seed, "query_cells": int(is_q.sum()),
                     "knn_accuracy": knn_accuracy(z_ref, ref_labels, z_q, q_labels),
                     "ref_query_iLISI": joint_ilisi(z_ref, z_q), "seconds": seconds})
    if "scvi" in tools:
        import scvi

        scvi.settings.seed = seed
        r = ref.copy()
        scvi.model.SCVI.setup_anndata(r, batch_key=batch_key)
        ref_model = scvi.model.SCVI(r, n_latent=10)
        ref_model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
        z_ref_scvi = ref_model.get_latent_representation()
        t0 = time.perf_counter()
        q = query.copy()
        scvi.model.SCVI.prepare_query_anndata(q, ref_model)
        qm = scvi.model.SCVI.load_query_data(q, ref_model)
        qm.train(max_epochs=epochs, plan_kwargs={"weight_decay": 0.0}, accelerator="cpu",
                 enable_progress_bar=False)
        seconds = time.perf_counter() - t0
        z_q = qm.get_latent_representation()
        rows.append({"method": "scVI load_query_data", "seed": seed, "query_cells": int(is_q.sum()),
                     "knn_accuracy": knn_accuracy(z_ref_scvi, ref_labels, z_q, q_labels),
                     "ref_query_iLISI": joint_ilisi(z_ref_scvi, z_q), "seconds": seconds})
    return rows


def umap_figure(adata, embeddings: dict[str, np.ndarray], batch_key: str, label_key: str, path: str):
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    fig, axes = plt.subplots(2, len(embeddings), figsize=(3.4 * len(embeddings), 6.6),
                             constrained_layout=True, squeeze=False)
    for j, (name, X) in enumerate(embeddings.items()):
        a = ad.AnnData(np.zeros((X.shape[0], 1), dtype=np.float32), obs=adata.obs.copy())
        a.obsm["X_emb"] = X
        sc.pp.neighbors(a, use_rep="X_emb", n_neighbors=15, random_state=0)
        sc.tl.umap(a, random_state=0)
        for i, key in enumerate((batch_key, label_key)):
            sc.pl.umap(a, color=key, ax=axes[i, j], show=False, frameon=False, size=12,
                       legend_loc="right margin" if j == len(embeddings) - 1 else "none",
                       title=f"{name}: {key}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-key", default="batch", help="obs column to integrate: batch (5 runs) or technology")
    p.add_argument("--label-key", default="cell_line")
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=300, help="max epochs for both VAEs (scvae stops early)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tools", default="pca,scvae_nobatch,scvae,scvi")
    p.add_argument("--query", action="store_true", help="also benchmark reference mapping (Drop-seq onto CEL-seq2)")
    p.add_argument("--query-only", action="store_true", help="only the reference-mapping part")
    p.add_argument("--out", default=str(HERE / "results" / "integration.csv"))
    p.add_argument("--umap", default=None, help="write a UMAP figure (first seed) to this PNG")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # scored for every method: fail now, not after the first has trained
        import scib_metrics  # noqa: F401
    except ImportError:
        raise SystemExit("integration.py scores with scib-metrics, which is not installed: "
                         "pip install -e '.[bench]'.") from None
    tools = args.tools.split(",")
    if "scvi" in tools:
        try:
            import scvi  # noqa: F401
        except ImportError:
            print("scvi-tools not installed: skipping scVI (pip install -e '.[bench]').")
            tools.remove("scvi")
    adata = load_cellbench(args.n_top_genes, args.batch_key)
    batch = adata.obs[args.batch_key].astype(str).to_numpy()
    labels = adata.obs[args.label_key].astype(str).to_numpy()
    print(f"CellBench singlets: {adata.n_obs} cells × {adata.n_vars} HVGs; "
          f"{len(set(batch))} values of {args.batch_key!r}, {len(set(labels))} cell lines")
    rows, first = [], {}
    for seed in ([] if args.query_only else args.seeds):
        runs = {}
        if "pca" in tools:
            runs["PCA"] = lambda s=seed: (pca_embedding(adata, seed=s), 0)
        if "scvae_nobatch" in tools:
            runs["scvae (no batch)"] = lambda s=seed: scvae_embedding(adata, None, args.epochs, s)
        if "scvae" in tools:
            runs["scvae"] = lambda s=seed: scvae_embedding(adata, args.batch_key, args.epochs, s)
        if "scvi" in tools:
            runs["scVI"] = lambda s=seed: scvi_embedding(adata, args.batch_key, args.epochs, s)
        for name, fn in runs.items():
            t0 = time.perf_counter()
            X, epochs = fn()
            seconds = time.perf_counter() - t0
            scores = scib_scores(X, batch, labels)
            rows.append({"method": name, "seed": seed, "epochs": epochs, "train_s": seconds, **scores})
            print(f"  seed {seed} {name:18s} " + " ".join(f"{k}={v:.3f}" for k, v in scores.items()),
                  flush=True)
            if seed == args.seeds[0]:
                first[name] = X
    if rows:
        table = pd.DataFrame(rows)
        cols = ["iLISI", "kBET", "silhouette_batch", "graph_connectivity", "silhouette_label",
                "batch_mean", "bio_mean", "epochs", "train_s"]
        summary = table.groupby("method", sort=False)[cols].mean()
        if len(args.seeds) > 1:
            spread = table.groupby("method", sort=False)[["batch_mean", "bio_mean"]].std()
            summary["batch_mean_sd"], summary["bio_mean_sd"] = spread["batch_mean"], spread["bio_mean"]
        print(f"\nbatch_key={args.batch_key!r}, labels={args.label_key!r}, seeds={args.seeds} (mean):")
        print(summary.round(3).to_markdown() if _has_tabulate() else summary.round(3).to_string())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print(f"per-seed rows written to {args.out}")
        if args.umap:
            umap_figure(adata, first, args.batch_key, args.label_key, args.umap)
            print(f"UMAPs written to {args.umap}")
    if args.query or args.query_only:
        import tempfile

        qrows = []
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                qrows += query_mapping(adata, "batch", args.label_key, "sc_dropseq", args.epochs,
                                       seed, tools, Path(tmp))
        qt = pd.DataFrame(qrows)
        qsum = qt.groupby("method", sort=False)[["knn_accuracy", "ref_query_iLISI", "seconds"]].mean()
        print("\nReference mapping: Drop-seq (query) onto the 4 CEL-seq2 runs (reference): "
              "15-NN label transfer accuracy, iLISI of reference vs query cells:")
        print(qsum.round(3).to_markdown() if _has_tabulate() else qsum.round(3).to_string())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        qt.to_csv(Path(args.out).with_name(Path(args.out).stem + "_query.csv"), index=False)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
