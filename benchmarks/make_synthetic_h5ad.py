"""Write a large synthetic .h5ad of Negative Binomial counts, chunk by chunk.

The matrix is never held in memory: rows are simulated ``--chunk`` cells at a time and
appended to the CSR datasets of an h5ad file (anndata's on-disk format), so a
1M-cell × 2,000-gene file (~7% non-zeros, ~1.1 GB) is written with ~200 MB of RAM::

    python benchmarks/make_synthetic_h5ad.py /tmp/synth_1m.h5ad --n-cells 1000000

The file is test/benchmark data: write it outside the repository (never commit it).
Cells come from ``--n-types`` types and ``--n-batches`` batches, as in
``svt.datasets.synthetic_counts`` (``obs["cell_type"]``, ``obs["batch"]``); the gene
profiles are skewed so that about 7% of entries are non-zero, like 10x data on HVGs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

try:
    from anndata.io import write_elem
except ImportError:  # anndata 0.10
    from anndata.experimental import write_elem


def simulate_chunk(rng: np.random.Generator, n: int, type_profiles: np.ndarray,
                   batch_shift: np.ndarray, mean_library: float):
    """``n`` cells of counts as float32 CSR, with their type and batch codes.

    Each cell draws its library size L (log-normal) and then L reads from its
    type × batch gene distribution (a multinomial, sampled as L categorical draws:
    cost grows with the counts, not with cells × genes, so 1M cells take minutes).
    """
    n_types, n_genes = type_profiles.shape
    n_batches = batch_shift.shape[0]
    types = rng.integers(0, n_types, n)
    batches = rng.integers(0, n_batches, n)
    lib = np.maximum(1, np.round(rng.lognormal(np.log(mean_library), 0.5, n))).astype(np.int64)
    group = types * n_batches + batches
    cell = np.repeat(np.arange(n), lib)
    gene = np.empty(len(cell), dtype=np.int64)
    draw_group = group[cell]
    u = rng.random(len(cell))
    for g in np.unique(group):
        t, b = divmod(int(g), n_batches)
        logits = type_profiles[t] + batch_shift[b]
        cdf = np.cumsum(np.exp(logits - logits.max()))
        sel = draw_group == g
        gene[sel] = np.minimum(np.searchsorted(cdf, u[sel] * cdf[-1]), n_genes - 1)
    X = sp.csr_matrix((np.ones(len(cell), dtype=np.float32), (cell, gene)), shape=(n, n_genes))
    X.sum_duplicates()
    return X, types, batches


def write_synthetic_h5ad(path: str | Path, n_cells: int = 1_000_000, n_genes: int = 2000,
                         n_types: int = 10, n_batches: int = 2, mean_library: float = 170.0,
                         chunk: int = 20_000, seed: int = 0,
                         verbose: bool = True) -> dict:
    """Write the file; return its shape, number of non-zeros and density."""
    rng = np.random.default_rng(seed)
    # A wide spread of gene means makes most genes rarely detected (sparse, like real HVGs).
    base = rng.normal(0, 1.6, n_genes)
    type_profiles = base + rng.normal(0, 1.0, (n_types, n_genes)) * (rng.random((n_types, n_genes)) < 0.2)
    batch_shift = rng.normal(0, 0.3, (n_batches, n_genes))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    all_types = np.empty(n_cells, dtype=np.int64)
    all_batches = np.empty(n_cells, dtype=np.int64)
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = (n_cells, n_genes)
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32,
                                chunks=(1 << 18,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32,
                                   chunks=(1 << 18,))
        indptr = g.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        nnz = 0
        for start in range(0, n_cells, chunk):
            n = min(chunk, n_cells - start)
            X, types, batches = simulate_chunk(rng, n, type_profiles, batch_shift, mean_library)
            all_types[start:start + n], all_batches[start:start + n] = types, batches
            data.resize((nnz + X.nnz,))
            indices.resize((nnz + X.nnz,))
            data[nnz:] = X.data
            indices[nnz:] = X.indices.astype(np.int32)
            indptr[start + 1:start + n + 1] = X.indptr[1:].astype(np.int64) + nnz
            nnz += X.nnz
            if verbose and (start // chunk) % 10 == 0:
                print(f"  {start + n:>9,} cells, {nnz:,} non-zeros, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical.from_codes(all_types, [f"type{t}" for t in range(n_types)]),
             "batch": pd.Categorical.from_codes(all_batches, [f"batch{b}" for b in range(n_batches)])},
            index=pd.Index([f"cell{i}" for i in range(n_cells)]),
        )
        var = pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(n_genes)]))
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    return {"n_cells": n_cells, "n_genes": n_genes, "nnz": nnz,
            "density": nnz / (n_cells * n_genes), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="output .h5ad (outside the repository)")
    p.add_argument("--n-cells", type=int, default=1_000_000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--n-types", type=int, default=10)
    p.add_argument("--n-batches", type=int, default=2)
    p.add_argument("--chunk", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    info = write_synthetic_h5ad(args.path, args.n_cells, args.n_genes, args.n_types,
                                args.n_batches, chunk=args.chunk, seed=args.seed)
    print(f"wrote {args.path}: {info['n_cells']:,} × {info['n_genes']:,}, "
          f"{info['nnz']:,} non-zeros ({100 * info['density']:.1f}%), {info['seconds']:.0f} s")


if __name__ == "__main__":
    main()
