"""Time and memory of the user-facing calls after training, on large data.

    python benchmarks/user_paths.py [--dataset synthetic-sparse] [--n-cells 100000]
        [--repeats 3] [--base REF]

Trains one epoch (the calls' cost does not depend on how well the model fits), then times
each call on the AnnData of all cells: latent, denoised expression (new array, into a
reused ``out=`` buffer, and only 10 genes with ``gene_list=``), ``write_to_adata`` with
layers, ``get_elbo``, ``get_kl_per_dimension`` and ``differential_expression`` of one group
against the rest.
For each it prints the median wall seconds over ``--repeats`` calls and the resident
memory the call added at its peak: Linux's ``VmHWM`` reset before the call, minus the
resident memory then. A call's result is freed before the next one starts.

With ``--base REF`` an older commit's package is extracted next to this checkout's (as in
``ab_step.py``), trained the same way, and its calls are interleaved with this checkout's.
Calls the older package lacks are skipped for it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _calls(model, adata) -> dict:
    import anndata as ad

    group = str(adata.obs["cell_type"].cat.categories[0])
    buf = np.empty((adata.n_obs, adata.n_vars), dtype=np.float32)
    calls = {
        "latent": lambda: model.get_latent_representation(adata),
        "expression": lambda: model.get_normalized_expression(adata),
        "expression, out=": lambda: model.get_normalized_expression(adata, out=buf),
        "expression, 10 genes": lambda: model.get_normalized_expression(
            adata, gene_list=list(adata.var_names[:10])),
        # A fresh AnnData sharing the counts: each call writes its layers anew.
        "write_to_adata": lambda: model.write_to_adata(
            ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var)),
        "get_elbo": lambda: model.get_elbo(adata),
        "get_kl_per_dimension": lambda: model.get_kl_per_dimension(adata),
        "differential_expression": lambda: model.differential_expression(
            adata, groupby="cell_type", group1=group),
    }
    if "out" not in inspect.signature(model.get_normalized_expression).parameters:
        del calls["expression, out="]
    if "gene_list" not in inspect.signature(model.get_normalized_expression).parameters:
        del calls["expression, 10 genes"]
    return calls


def _measure(call) -> tuple[float, float]:
    import _common

    before = _common.rss_mb()
    _common.reset_peak_rss()
    t = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - t
    added = _common.peak_rss_mb() - before
    del result
    return seconds, added


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=["synthetic", "synthetic-sparse"],
                   default="synthetic-sparse", help="as in compare_scvi.py")
    p.add_argument("--n-cells", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--base", default=None, help="an older commit to interleave with")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common  # next to this script
    from ab_step import _extract_base

    warnings.simplefilter("ignore")
    adata = _common.load(args.dataset, n_cells=args.n_cells).adata
    with tempfile.TemporaryDirectory() as tmp:
        packages = ["scvae_tools"]
        if args.base:
            _extract_base(args.base, Path(tmp))
            sys.path.insert(0, tmp)
            packages.insert(0, "scvae_base")
        calls = {}
        for pkg in packages:
            svt = importlib.import_module(pkg)
            model = svt.SCVAE(adata)
            model.train(max_epochs=1, progress_bar=False, seed=0)
            calls[pkg] = _calls(model, adata)
            for call in calls[pkg].values():  # warm-up: kernels built, caches filled
                call()
        results = {pkg: {name: [] for name in c} for pkg, c in calls.items()}
        for _ in range(args.repeats):
            for name in calls["scvae_tools"]:
                for pkg in packages:
                    if name in calls[pkg]:
                        results[pkg][name].append(_measure(calls[pkg][name]))
    label = {"scvae_tools": "this checkout", "scvae_base": f"base {args.base}"}
    print(f"{args.dataset}, {adata.n_obs} cells × {adata.n_vars} genes, median of "
          f"{args.repeats} calls; memory: resident MiB added at the call's peak "
          f"(pid {os.getpid()})")
    print(f"| call | {' | '.join(label[p] + ' s / MiB' for p in packages)} |")
    print(f"|---|{'---|' * len(packages)}")
    for name in calls["scvae_tools"]:
        cells = []
        for pkg in packages:
            got = results[pkg].get(name)
            cells.append("—" if not got else
                         f"{np.median([s for s, _ in got]):.2f} / {np.median([m for _, m in got]):.0f}")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
