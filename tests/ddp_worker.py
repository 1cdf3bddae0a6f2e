"""Worker for tests/test_distributed.py, run by ``torchrun --nproc-per-node 2`` (Gloo, CPU).

Trains ``SCVAE(...).train(strategy="ddp")`` on an .h5ad (in memory, or backed with
``--backed``) and records, per rank and epoch, which training cells the sampler gave this
rank (by wrapping :func:`scvae_tools.distributed.shard_batches`, the function the trainer
calls once per epoch). Rank ``r`` writes ``OUT/seen_rank{r}.npz`` and its final weights
``OUT/params_rank{r}.npy``; rank 0 also writes
``OUT/result.json`` (held-out ELBO, history, split).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import scvae_tools as svt
import scvae_tools.distributed as sd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backed", action="store_true")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--interrupt-at-epoch", type=int, default=0,
                   help="stop training (as if killed) during this epoch's validation")
    p.add_argument("--fail-on-rank", type=int, default=None,
                   help="this rank alone raises an error during the third validation")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    seen: list[np.ndarray] = []
    real = sd.shard_batches

    def recording(*a, **kw):
        cells = []
        for b in real(*a, **kw):
            cells.append(b.index.cpu().numpy())
            yield b
        seen.append(np.concatenate(cells))

    sd.shard_batches = recording
    adata = svt.backed.read_backed(args.path) if args.backed else ad.read_h5ad(args.path)
    model = svt.SCVAE(adata, n_latent=5, batch_key="batch")
    if args.backed:
        model._data.chunk_size = 64  # several chunks even for a few hundred cells
    if args.interrupt_at_epoch:
        import scvae_tools.train as st

        real_evaluate, calls = st.evaluate, []

        def interrupted(*a, **kw):
            calls.append(1)
            if len(calls) == args.interrupt_at_epoch:
                # Killed, as by SIGKILL: no Python teardown. (Unwinding an exception out of
                # a DDP run can deadlock in torch's Gloo teardown: its worker thread waits
                # for the GIL while the main thread joins it.)
                os._exit(0)
            return real_evaluate(*a, **kw)

        st.evaluate = interrupted
    if args.fail_on_rank is not None and int(os.environ["RANK"]) == args.fail_on_rank:
        import scvae_tools.train as st

        real_evaluate, calls = st.evaluate, []

        def failing(*a, **kw):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError(f"injected failure on rank {args.fail_on_rank}")
            return real_evaluate(*a, **kw)

        st.evaluate = failing
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, seed=0,
                early_stopping=False, progress_bar=False, device="cpu", strategy="ddp",
                checkpoint_dir=args.checkpoint_dir, checkpoint_every=2, resume=args.resume)
    rank = int(os.environ["RANK"])
    np.savez(out / f"seen_rank{rank}.npz", *seen)
    # DDP keeps the replicas identical: the test compares these across ranks.
    params = torch.cat([p.detach().flatten() for p in model.module.parameters()]).numpy()
    np.save(out / f"params_rank{rank}.npy", params)
    if rank == 0:
        result = {
            "world_size": int(os.environ["WORLD_SIZE"]),
            "recorded_world_size": model.train_config.world_size,
            "heldout_elbo": model.get_elbo(indices=model.validation_indices),
            "train_indices": model.train_indices.tolist(),
            "validation_elbo": model.history["validation_elbo"].tolist(),
            "epochs": len(model.history),
            "latent": model.get_latent_representation().tolist(),
        }
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
