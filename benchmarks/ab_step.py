"""Time per training step of this checkout against an older commit, in one process.

Single benchmark runs on a shared VM move by ±10–30%; an A/B in one process, with the two
versions' epochs interleaved, measures a change far more reliably. The older package is
extracted with ``git archive`` into a temporary folder under another name
(``scvae_base``) and imported next to the working tree's ``scvae_tools``.

    python benchmarks/ab_step.py --base 399efc8 --dataset pbmc3k --rounds 15
    python benchmarks/ab_step.py --base 399efc8 --dataset synthetic --n-cells 81000 --rounds 8
    python benchmarks/ab_step.py --base 399efc8 --dataset pbmc3k --likelihood zinb --rounds 5
    python benchmarks/ab_step.py --base 399efc8 --dataset pbmc3k --batches 4 --dispersion gene-batch

Both run the same loop as ``SCVAE.train`` (the module's ELBO, fused Adam, 128 cells per
batch, shuffled with their own generator); it prints the median time per step of each and
the median of the per-round ratios (new/base below 1: the working tree is faster).

With ``--inference``, each version trains one epoch instead, and the rounds time
``get_latent_representation`` and ``get_normalized_expression`` on all cells:

    python benchmarks/ab_step.py --inference --base cacd1d6 --dataset synthetic --n-cells 100000 --rounds 4
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent


def _extract_base(ref: str, into: Path) -> None:
    proc = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "scvae_tools"],
                          capture_output=True)
    if proc.returncode:
        raise SystemExit(f"--base {ref}: {proc.stderr.decode().strip()}")
    tar = proc.stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t.getmembers():
            m.name = m.name.replace("scvae_tools", "scvae_base", 1)
            t.extract(m, into, filter="data")


def _model(svt, adata, likelihood: str, dispersion: str):
    batch_key = "ab_batch" if "ab_batch" in adata.obs else None
    return svt.SCVAE(adata, n_hidden=128, n_latent=10, n_layers=1, likelihood=likelihood,
                     dispersion=dispersion, batch_key=batch_key)


def _setup(pkg: str, adata, batch_size: int, likelihood: str = "nb", dispersion: str = "gene"):
    svt = importlib.import_module(pkg)
    T = importlib.import_module(pkg + ".train")
    torch.manual_seed(0)
    model = _model(svt, adata, likelihood, dispersion)
    mod, data = model.module, model._data
    opt = T._adam(mod, T.TrainConfig(lr=1e-3), torch.device("cpu"))
    mod.train()
    gen = torch.Generator().manual_seed(0)
    options = T.nonzero_option(mod, data) if hasattr(T, "nonzero_option") else {}

    def epoch() -> float:
        steps, t = 0, time.perf_counter()
        for b in data.batches(np.arange(adata.n_obs), batch_size, shuffle=True, generator=gen,
                              device=torch.device("cpu"), drop_singleton=True, **options):
            terms = mod.elbo_terms(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs,
                                   nonzero=b.nonzero)
            loss = mod.loss(terms, beta=1.0, free_bits=0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        return (time.perf_counter() - t) / steps * 1e3

    return epoch


def _setup_inference(pkg: str, adata, batch_size: int, likelihood: str = "nb",
                     dispersion: str = "gene"):
    svt = importlib.import_module(pkg)
    model = _model(svt, adata, likelihood, dispersion)
    model.train(max_epochs=1, batch_size=batch_size, seed=0, progress_bar=False, device="cpu")

    def calls() -> tuple[float, float]:
        t = time.perf_counter()
        model.get_latent_representation(adata)
        latent = time.perf_counter() - t
        t = time.perf_counter()
        model.get_normalized_expression(adata)  # freed at once, like a caller's temporary
        return latent, time.perf_counter() - t

    return calls


def _report_inference(args, n_obs: int, times: dict) -> None:
    for i, what in enumerate(("latent", "expression")):
        base = np.array([t[i] for t in times["base"]])
        new = np.array([t[i] for t in times["new"]])
        print(f"{args.dataset}, {n_obs} cells, {args.rounds} rounds, {what}: base {args.base} "
              f"{np.median(base):.3f} s, working tree {np.median(new):.3f} s, "
              f"new/base (median of rounds) {np.median(new / base):.3f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="git commit or ref to compare against")
    p.add_argument("--dataset", choices=["pbmc3k", "synthetic", "synthetic-sparse"],
                   default="pbmc3k", help="as in compare_scvi.py (benchmarks/_common.load)")
    p.add_argument("--n-cells", type=int, default=81_000, help="synthetic cells")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data-dir", default=None,
                   help="pbmc3k folder (default: $SCVAE_TOOLS_DATA_DIR, else ../shared/data)")
    p.add_argument("--inference", action="store_true",
                   help="time latent and denoised expression of all cells instead of steps")
    p.add_argument("--likelihood", choices=["nb", "zinb", "poisson"], default="nb")
    p.add_argument("--dispersion", choices=["gene", "gene-batch", "gene-cell"], default="gene")
    p.add_argument("--batches", type=int, default=1,
                   help="with more than 1, cells get this many random batch labels (batch_key)")
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    if args.data_dir:
        os.environ["SCVAE_TOOLS_DATA_DIR"] = args.data_dir
    import _common  # next to this script; the same data sets as compare_scvi.py

    adata = _common.load(args.dataset, n_cells=args.n_cells).adata
    if args.batches > 1:  # labels for timing only: random, so no batch effect to learn
        labels = np.random.default_rng(0).integers(0, args.batches, adata.n_obs)
        adata.obs["ab_batch"] = pd.Categorical([f"b{i}" for i in labels])
    with tempfile.TemporaryDirectory() as tmp:
        _extract_base(args.base, Path(tmp))
        sys.path.insert(0, tmp)
        setup = _setup_inference if args.inference else _setup
        epochs = {name: setup(pkg, adata, args.batch_size, args.likelihood, args.dispersion)
                  for name, pkg in (("base", "scvae_base"), ("new", "scvae_tools"))}
        for run in epochs.values():  # warm-up: first-touch allocations, caches
            run()
        times: dict[str, list[float]] = {k: [] for k in epochs}
        for _ in range(args.rounds):
            for name, run in epochs.items():
                times[name].append(run())
    if args.inference:
        return _report_inference(args, adata.n_obs, times)
    base, new = np.array(times["base"]), np.array(times["new"])
    print(f"{args.dataset} ({args.likelihood}, {args.dispersion}, {args.batches} batches), "
          f"{adata.n_obs} cells, {args.rounds} rounds: "
          f"base {args.base} "
          f"{np.median(base):.2f} ms/step, working tree {np.median(new):.2f} ms/step, "
          f"new/base (median of rounds) {np.median(new / base):.3f}")


if __name__ == "__main__":
    main()
