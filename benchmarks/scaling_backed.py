"""Scaling of out-of-core (backed) and distributed (DDP) training: time per epoch, peak RSS.

Complements ``benchmarks/scaling.py`` (in-memory scaling). Every configuration runs in a
fresh process (or ``torchrun`` group), so each peak RSS is that run's own::

    # data (never commit it): 10k / 100k / 1M cells × 2,000 genes, ~7% non-zeros
    python benchmarks/make_synthetic_h5ad.py /tmp/synth_1m.h5ad --n-cells 1000000
    # one configuration
    python benchmarks/scaling_backed.py one /tmp/synth_1m.h5ad --mode backed --epochs 1
    # the grid: sizes × {memory, backed} × {1, 2 ranks}; prints a markdown table
    python benchmarks/scaling_backed.py grid --workdir /tmp/svt_scaling --sizes 10000 100000 1000000

``--max-cells N`` trains on the first N cells' worth of steps only (an honest partial
epoch; the table says so and extrapolates the epoch time linearly), which keeps a 1M-cell
run on a 2-core machine short while the peak RSS is still measured over real streaming.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cpu_s() -> float:
    """CPU seconds (user + system) this process has used: robust to other load."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_gb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_one(path: str, mode: str, epochs: int, batch_size: int, max_cells: int | None,
            out: str | None, threads: int) -> dict:
    """Train on ``path`` (backed or in memory) inside this process; return the measurements."""
    import anndata as ad
    import numpy as np
    import torch

    import scvae_tools as svt
    from scvae_tools.distributed import env_rank, launched_by_torchrun

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    adata = svt.backed.read_backed(path) if mode == "backed" else ad.read_h5ad(path)
    model = svt.SCVAE(adata, n_latent=10)
    setup_s = time.perf_counter() - t0
    data = model._data
    n_cells = data.n_obs
    if max_cells is not None and max_cells < n_cells:
        # A partial epoch: train on the first max_cells rows (read chunk-shuffled exactly
        # as in a full epoch, only fewer of them); the library/validation pass at set-up
        # still streamed the whole file.
        sub = np.arange(max_cells)
        model._data = _Subset(data, sub)
    strategy = "ddp" if launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    t1, c1 = time.perf_counter(), _cpu_s()
    model.train(max_epochs=epochs, batch_size=batch_size, train_size=0.9, early_stopping=False,
                progress_bar=False, strategy=strategy, device="cpu", kl_warmup_epochs=0)
    train_s, train_cpu_s = time.perf_counter() - t1, _cpu_s() - c1
    h = model.history
    cells = model._data.n_obs
    res = {
        "n_cells": n_cells, "mode": mode, "ranks": int(os.environ.get("WORLD_SIZE", "1")),
        "rank": env_rank(), "trained_cells": cells, "epochs": epochs,
        "threads": threads, "setup_s": round(setup_s, 1), "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "load_avg_1min": round(os.getloadavg()[0], 1),
        "epoch_s": round(float(h["seconds"].mean()), 1),
        "epoch_s_full": round(float(h["seconds"].mean()) * n_cells / cells, 1),
        "validation_elbo": round(float(h["validation_elbo"].iloc[-1]), 2),
        "peak_rss_gb": round(_peak_rss_gb(), 3),
    }
    if out:
        Path(out).write_text(json.dumps(res))
    return res


class _Subset:
    """First-N-cells view of a (backed) CellData for partial-epoch timing runs."""

    def __init__(self, data, rows):
        import numpy as np

        self._data, self._rows = data, np.asarray(rows)
        self.n_obs = len(rows)
        self.spec = data.spec

    def epoch_order(self, indices, generator):
        import numpy as np

        if hasattr(self._data, "epoch_order"):
            # Map back to positions in the subset after drawing a chunk-local order.
            order = self._data.epoch_order(self._rows[indices], generator)
            return np.searchsorted(self._rows, order)
        import torch

        return indices[torch.randperm(len(indices), generator=generator).numpy()]

    def batches(self, indices=None, batch_size=128, shuffle=False, generator=None,
                device="cpu", drop_singleton=False, **kwargs):
        import numpy as np

        idx = np.arange(self.n_obs) if indices is None else np.asarray(indices)
        if shuffle:
            idx = self.epoch_order(idx, generator)
        # kwargs: what training asks of every data source (nonzero=, sparse=)
        yield from self._data.batches(self._rows[idx], batch_size, False, None, device,
                                      drop_singleton, **kwargs)


def grid(workdir: str, sizes: list[int], epochs: int, max_cells: int | None,
         ranks: list[int], modes: list[str], threads: int = 1) -> list[dict]:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        path = work / f"synth_{n}.h5ad"
        if not path.exists():
            subprocess.run([sys.executable, str(HERE / "make_synthetic_h5ad.py"), str(path),
                            "--n-cells", str(n)], check=True)
        for mode in modes:
            for r in ranks:
                outs = [work / f"res_{n}_{mode}_{r}_{k}.json" for k in range(r)]
                for o in outs:
                    o.unlink(missing_ok=True)
                args = [str(HERE / "scaling_backed.py"), "one", str(path), "--mode", mode,
                        "--epochs", str(epochs), "--out", str(work / f"res_{n}_{mode}_{r}_{{rank}}.json"),
                        "--threads", str(threads)]
                if max_cells and max_cells < n:
                    args += ["--max-cells", str(max_cells)]
                cmd = ([sys.executable, *args] if r == 1 else
                       [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", str(r), *args])
                subprocess.run(cmd, check=True)
                res = [json.loads(o.read_text()) for o in outs]
                row = res[0] | {"peak_rss_gb": max(x["peak_rss_gb"] for x in res),
                                "peak_rss_gb_sum": round(sum(x["peak_rss_gb"] for x in res), 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = ("| cells | data | ranks | cells / epoch | wall s / epoch | wall s / full epoch | "
            "train CPU s (rank 0) | peak RSS per rank (GB) | validation ELBO | load avg |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(  # (full epoch: extrapolated linearly from a partial one, --max-cells)
        f"| {r['n_cells']:,} | {r['mode']} | {r['ranks']} | {r['trained_cells']:,} | "
        f"{r['epoch_s']} | {r['epoch_s_full']} | {r['train_cpu_s']} | {r['peak_rss_gb']} | "
        f"{r['validation_elbo']} | {r['load_avg_1min']} |\n"
        for r in rows)
    return head + body


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one", help="one configuration in this process (or under torchrun)")
    one.add_argument("path")
    one.add_argument("--mode", choices=["backed", "memory"], default="backed")
    one.add_argument("--epochs", type=int, default=1)
    one.add_argument("--batch-size", type=int, default=128)
    one.add_argument("--max-cells", type=int, default=None)
    one.add_argument("--threads", type=int, default=1)
    one.add_argument("--out", default=None, help="JSON result file; {rank} is replaced")
    g = sub.add_parser("grid", help="sizes × modes × ranks, each in a fresh process")
    g.add_argument("--workdir", required=True)
    g.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    g.add_argument("--modes", nargs="+", default=["memory", "backed"])
    g.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-cells", type=int, default=None)
    g.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args(argv)
    if args.cmd == "one":
        out = args.out.replace("{rank}", os.environ.get("RANK", "0")) if args.out else None
        print(json.dumps(run_one(args.path, args.mode, args.epochs, args.batch_size,
                                 args.max_cells, out, args.threads)), flush=True)
    else:
        rows = grid(args.workdir, args.sizes, args.epochs, args.max_cells, args.ranks, args.modes,
                    args.threads)
        print(to_markdown(rows))


if __name__ == "__main__":
    main()
