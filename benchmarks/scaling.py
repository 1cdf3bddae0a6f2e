"""Time per training epoch and peak memory against the number of cells (synthetic × 2,000 genes).

Each size runs in its own subprocess (so peak RSS is per size): synthetic NB counts are
simulated in chunks straight into CSR (``make_synthetic_h5ad.simulate_chunk``, ~7-10%
non-zeros like 10x HVGs), wrapped in an AnnData, and one epoch of the training step
(``CellData.batches`` → ``VAE.elbo_terms`` → loss → backward → fused Adam, batch 128, the
default architecture, each batch carrying its non-zeros as in ``SCVAE.train``) is timed in
CPU seconds of the process and in wall-clock seconds (``--threads`` torch threads, default 1).
With ``--max-steps`` only that many steps are timed and the epoch time is extrapolated
linearly (steps per epoch × seconds per step) — printed as such::

    python benchmarks/scaling.py --sizes 10000 100000
    python benchmarks/scaling.py --sizes 1000000 --max-steps 400   # extrapolated epoch
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def make_counts(n_cells: int, n_genes: int = 2000, seed: int = 0, chunk: int = 50_000):
    """CSR float32 counts of ``n_cells`` synthetic cells (and their type labels)."""
    import scipy.sparse as sp
    from make_synthetic_h5ad import simulate_chunk

    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1.6, n_genes)
    profiles = base + rng.normal(0, 1.0, (10, n_genes)) * (rng.random((10, n_genes)) < 0.2)
    shift = rng.normal(0, 0.3, (1, n_genes))
    parts, types = [], []
    for start in range(0, n_cells, chunk):
        X, t, _ = simulate_chunk(rng, min(chunk, n_cells - start), profiles, shift, 300.0)
        parts.append(X)
        types.append(t)
    return sp.vstack(parts, format="csr"), np.concatenate(types)


def worker(n_cells: int, max_steps: int | None, batch_size: int, threads: int) -> dict:
    import anndata as ad
    import pandas as pd
    import torch

    torch.set_num_threads(threads)
    import torch._dynamo  # noqa: F401  (the first optimiser imports it; keep it out of timings)

    from scvae_tools.adapter import CellData, DataSpec
    from scvae_tools.module import VAE, ModuleConfig
    from scvae_tools.train import TrainConfig, _adam, nonzero_option

    t = time.perf_counter()
    X, _ = make_counts(n_cells)
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=[f"g{i}" for i in range(X.shape[1])]))
    gen_s = time.perf_counter() - t
    spec = DataSpec.from_anndata(adata)
    data = CellData(adata, spec)
    del adata
    device = torch.device("cpu")
    torch.manual_seed(0)
    vae = VAE(ModuleConfig(n_genes=X.shape[1])).train()
    opt = _adam(vae, TrainConfig(batch_size=batch_size), device)
    idx = np.arange(n_cells)
    gen = torch.Generator().manual_seed(0)
    steps_per_epoch = -(-n_cells // batch_size)
    n_timed, t0 = 0, None
    warmup = 3
    # As in SCVAE.train: in-memory CSR batches carry their non-zeros for the likelihood.
    for i, b in enumerate(data.batches(idx, batch_size, shuffle=True, generator=gen,
                                       device=device, drop_singleton=True,
                                       **nonzero_option(vae, data))):
        if i == warmup:
            # the first steps (allocations, caches) are not timed; CPU time of this process
            # is the work done, wall-clock also counts the machine's other tenants
            t0, c0 = time.perf_counter(), time.process_time()
        terms = vae.elbo_terms(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs,
                               nonzero=b.nonzero)
        loss = vae.loss(terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            n_timed += 1
        if max_steps is not None and n_timed >= max_steps:
            break
    wall_per_step = (time.perf_counter() - t0) / n_timed
    per_step = (time.process_time() - c0) / n_timed
    return {"n_cells": n_cells, "n_genes": int(X.shape[1]), "density": X.nnz / np.prod(X.shape),
            "storage": "dense tensor" if "x" in data._on_device(device) else "CSR (dense blocks per batch)",
            "steps_per_epoch": steps_per_epoch, "timed_steps": n_timed,
            "extrapolated": n_timed < steps_per_epoch - warmup - 1,
            "ms_per_step": per_step * 1e3, "epoch_s": per_step * steps_per_epoch,
            "wall_ms_per_step": wall_per_step * 1e3, "wall_epoch_s": wall_per_step * steps_per_epoch,
            "cells_per_s": batch_size / per_step, "simulate_s": gen_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    p.add_argument("--max-steps", type=int, default=None,
                   help="time only this many steps per size and extrapolate the epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: see benchmarks/README.md)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.max_steps, args.batch_size, args.threads)))
        return
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--worker", str(n), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads)]
        if args.max_steps is not None:
            cmd += ["--max-steps", str(args.max_steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{n} cells: FAILED\n{proc.stderr[-2000:]}")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{n:>9,} cells: {r['epoch_s']:.1f} s/epoch "
              f"({'extrapolated from ' + str(r['timed_steps']) + ' steps' if r['extrapolated'] else 'measured'}), "
              f"{r['ms_per_step']:.1f} CPU ms/step, {r['wall_epoch_s']:.1f} wall s/epoch, "
              f"{r['cells_per_s']:.0f} cells/CPU s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MiB, {r['storage']}", flush=True)
    print(f"\nCPU time of the training process ({args.threads} torch thread(s)) and wall clock.\n")
    print("| cells | density | storage | CPU s / epoch | wall s / epoch | CPU ms / step | wall ms / step | cells / CPU s | peak RSS MiB | epoch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n_cells']:,} | {100 * r['density']:.1f}% | {r['storage']} | {r['epoch_s']:.1f} | "
              f"{r.get('wall_epoch_s', float('nan')):.1f} | "
              f"{r['ms_per_step']:.1f} | {r['wall_ms_per_step']:.0f} | {r['cells_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{'extrapolated (' + str(r['timed_steps']) + ' steps)' if r['extrapolated'] else 'measured'} |")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"\nepoch time ratio {b['epoch_s'] / a['epoch_s']:.1f}× for "
              f"{b['n_cells'] / a['n_cells']:.0f}× the cells (linear = equal).")


if __name__ == "__main__":
    main()
