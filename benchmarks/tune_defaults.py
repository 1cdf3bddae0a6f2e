"""Time-to-quality sweep of scvae_tools' training defaults (the evidence in benchmarks/README.md).

Trains our model with each candidate setting on a data set's training cells and prints,
per candidate: train CPU seconds (and wall), epochs run, held-out ELBO and Leiden ARI, as JSON lines::

    python benchmarks/tune_defaults.py pbmc3k pbmc68k --synthetic-n 5000

Compare the held-out ELBO with scvi-tools' (defaults) from ``compare_scvi.py``'s results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CANDIDATES = {
    "b128_lr1e-3_p30": {"batch_size": 128, "lr": 1e-3, "early_stopping_patience": 30},
    "b256_lr2e-3_p10": {"batch_size": 256, "lr": 2e-3, "early_stopping_patience": 10},
    "b512_lr4e-3_p10": {"batch_size": 512, "lr": 4e-3, "early_stopping_patience": 10},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("datasets", nargs="+", choices=["pbmc3k", "pbmc68k", "synthetic"])
    p.add_argument("--synthetic-n", type=int, default=5000)
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: see benchmarks/README.md)")
    p.add_argument("--marginal-samples", type=int, default=10)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import _common
    import torch._dynamo  # noqa: F401  (imported by the first optimiser; keep it out of timings)

    for name in args.datasets:
        ds = _common.load(name, n_cells=args.synthetic_n)
        for cand in args.candidates:
            res = _common.run_ours(ds, dict(CANDIDATES[cand]), marginal_samples=args.marginal_samples)
            res.update(dataset=name, candidate=cand, n_cells=int(ds.adata.n_obs))
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
