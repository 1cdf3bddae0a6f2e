"""Cost of the reliability machinery per epoch: NaN/inf step guard + rollback snapshot, and
checkpoints written every epoch, against a loop with the guard and snapshot switched off.

    python benchmarks/reliability_overhead.py [--epochs 6] [--repeats 3] [--threads 2]

Runs on pbmc3k HVG counts (2638 cells × 2000 genes, from $SCVAE_TOOLS_DATA_DIR) or, without it,
synthetic counts of the same shape. Variants are interleaved so that load from other
processes hits each alike; the median seconds per epoch (history["seconds"], which includes
the validation pass, excludes checkpoint writes) and the wall time per run are printed, and
the direct cost of one guard check and one snapshot.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

import scvae_tools as svt
from scvae_tools import train as train_mod


def _load():
    try:
        return svt.datasets.pbmc3k(hvg_only=True, download=False), "pbmc3k_hvg"
    except Exception:  # no shared data: same shape, synthetic
        return svt.datasets.synthetic_counts(n_cells=2638, n_genes=2000, seed=0), "synthetic"


class _NoGuard(train_mod._StepGuard):
    def bad_step(self, step, loss):
        return False


def run(adata, variant: str, epochs: int) -> tuple[float, float]:
    real_guard, real_snapshot = train_mod._StepGuard, train_mod._snapshot
    kwargs = {}
    if variant == "off":
        train_mod._StepGuard, train_mod._snapshot = _NoGuard, lambda module, optim: None
    tmp = tempfile.TemporaryDirectory()
    if variant == "checkpoint every epoch":
        kwargs = {"checkpoint_dir": tmp.name, "checkpoint_every": 1}
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = svt.SCVAE(adata).train(max_epochs=epochs, progress_bar=False,
                                           early_stopping=False, **kwargs)
        wall = time.perf_counter() - t0
    finally:
        train_mod._StepGuard, train_mod._snapshot = real_guard, real_snapshot
        tmp.cleanup()
    return statistics.median(model.history["seconds"]), wall / epochs


def micro(adata) -> tuple[float, float]:
    """Direct cost: one guard check (per step) and one snapshot (per epoch), in ms."""
    model = svt.SCVAE(adata)
    module = model.module.train()
    optim = train_mod._adam(module, train_mod.TrainConfig(), torch.device("cpu"))
    b = next(model._data.batches(batch_size=128))
    loss = module.loss(module.elbo_terms(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs))
    loss.backward()
    optim.step()
    guard = train_mod._StepGuard(torch.device("cpu"), list(module.parameters()))
    t0 = time.perf_counter()
    for i in range(200):
        guard.bad_step(i, loss)
    t_guard = (time.perf_counter() - t0) / 200
    t0 = time.perf_counter()
    for _ in range(20):
        train_mod._snapshot(module, optim)
    t_snap = (time.perf_counter() - t0) / 20
    return 1e3 * t_guard, 1e3 * t_snap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adata, name = _load()
    variants = ["off", "guard + snapshot (default)", "checkpoint every epoch"]
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    run(adata, "off", 1)  # warm-up (imports, allocator)
    for _ in range(args.repeats):
        for v in variants:
            results[v].append(run(adata, v, args.epochs))
    print(f"{name}: {adata.n_obs} cells × {adata.n_vars} genes, CPU, {args.threads} threads, "
          f"{args.epochs} epochs × {args.repeats} repeats (medians)")
    guard_ms, snap_ms = micro(adata)
    print(f"  guard check {guard_ms:.2f} ms/step, rollback snapshot {snap_ms:.2f} ms/epoch")
    for v in variants:
        epoch = statistics.median(r[0] for r in results[v])
        wall = statistics.median(r[1] for r in results[v])
        print(f"  {v:28s} {epoch:7.3f} s/epoch (loop)   {wall:7.3f} s/epoch (wall)")


if __name__ == "__main__":
    main()
