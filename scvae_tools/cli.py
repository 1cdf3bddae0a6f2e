"""Command line: ``scvae-tools fit IN.h5ad -o OUT.h5ad`` and ``scvae-tools demo``.

Also runs as ``python -m scvae_tools.cli``, e.g. under ``torchrun`` for distributed
data-parallel training (``torchrun --nproc-per-node 2 -m scvae_tools.cli fit IN.h5ad -o
OUT.h5ad``): DDP is used automatically when torchrun started the process, and only
rank 0 writes the output and the saved model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .distributed import is_main_process


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", default=None, help="layer with raw counts (default: X)")
    p.add_argument("--batch-key", default=None, help="obs column with batch labels")
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--likelihood", choices=["nb", "zinb", "poisson"], default="nb")
    p.add_argument("--dispersion", choices=["gene", "gene-batch", "gene-cell"], default="gene")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: by data size)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3, help="peak learning rate")
    p.add_argument("--validation-every", type=int, default=1,
                   help="score the validation cells every N epochs (default: every epoch)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant", "plateau"], default="cosine")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder/decoder")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the training step as a CUDA graph (experimental, CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-layers", action="store_true", help="skip the dense denoised layers")
    p.add_argument("--save-model", default=None, help="also save the model to this directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _fit(adata, args):
    from .model import SCVAE

    model = SCVAE(adata, layer=args.layer, batch_key=args.batch_key, n_latent=args.n_latent,
                  n_hidden=args.n_hidden, n_layers=args.n_layers, likelihood=args.likelihood,
                  dispersion=args.dispersion, beta=args.beta)
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                lr_schedule=args.lr_schedule, validation_every=args.validation_every,
                precision=args.precision, compile=args.compile, cuda_graphs=args.cuda_graphs,
                device=args.device, progress_bar=not args.quiet,
                strategy=_strategy(getattr(args, "strategy", "none")),
                checkpoint_dir=getattr(args, "checkpoint_dir", None),
                checkpoint_every=getattr(args, "checkpoint_every", 10),
                resume=getattr(args, "resume", False))
    if not is_main_process():  # DDP: rank 0 alone computes and writes the results
        return model
    model.write_to_adata(adata, layers=not args.no_layers)
    if args.save_model:
        model.save(args.save_model, overwrite=True)
    return model


def _strategy(choice: str) -> str | None:
    """``--strategy`` → ``SCVAE.train(strategy=)``; ``auto`` picks DDP under torchrun."""
    from .distributed import launched_by_torchrun

    if choice == "auto":
        multi = launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        return "ddp" if multi else None
    return None if choice == "none" else choice


def cmd_fit(args) -> int:
    import anndata as ad

    if args.backed:  # out of core: X stays on disk; anndata copies it into the output
        from .backed import read_backed

        adata = read_backed(args.input)
    else:
        adata = ad.read_h5ad(args.input)
    model = _fit(adata, args)
    if not is_main_process():
        return 0
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    if args.backed:  # copy X on disk instead of reading it into memory
        from .backed import write_h5ad_backed

        write_h5ad_backed(adata, args.output)
    else:
        adata.write_h5ad(args.output)
    h = model.history.iloc[-1]
    print(f"trained {len(model.history)} epochs; validation ELBO {h['validation_elbo']:.2f} "
          f"nats/cell; wrote {args.output}")
    return 0


def cmd_demo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    from . import datasets
    from .plotting import training_history

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    adata = datasets.pbmc68k()
    print(f"pbmc68k (embedded in scanpy): {adata.n_obs} cells × {adata.n_vars} genes")
    model = _fit(adata, args)
    sc.pp.neighbors(adata, use_rep="X_scvae")
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    sc.tl.umap(adata, random_state=0)
    from sklearn.metrics import adjusted_rand_score

    ari = adjusted_rand_score(adata.obs["bulk_labels"], adata.obs["leiden"])
    fig = sc.pl.umap(adata, color=["bulk_labels", "leiden"], wspace=0.6, return_fig=True,
                     show=False)
    fig.savefig(out / "umap.png", dpi=120, bbox_inches="tight")
    training_history(model).savefig(out / "training_history.png", dpi=120)
    adata.write_h5ad(out / "pbmc68k_scvae.h5ad")
    model.save(out / "model", overwrite=True)
    h = model.history.iloc[-1]
    print(f"trained {len(model.history)} epochs; validation ELBO {h['validation_elbo']:.2f} "
          f"nats/cell; Leiden vs bulk_labels ARI {ari:.3f}")
    print(f"wrote {out / 'pbmc68k_scvae.h5ad'}, {out / 'umap.png'}, "
          f"{out / 'training_history.png'}, {out / 'model'}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scvae-tools", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train on an .h5ad of counts and write the results")
    fit.add_argument("input", help="input .h5ad with raw counts")
    fit.add_argument("-o", "--output", required=True, help="output .h5ad")
    _add_model_args(fit)
    fit.add_argument("--backed", action="store_true",
                     help="stream the counts from disk (out of core; X must be CSR or dense); "
                          "combine with --no-layers for large data")
    fit.add_argument("--strategy", choices=["auto", "none", "ddp"], default="auto",
                     help="ddp: distributed data parallel (under torchrun); auto: ddp when "
                          "launched by torchrun with more than one process")
    fit.add_argument("--checkpoint-dir", default=None,
                     help="write an atomic training checkpoint to this folder")
    fit.add_argument("--checkpoint-every", type=int, default=10,
                     help="epochs between checkpoints (default 10)")
    fit.add_argument("--resume", action="store_true",
                     help="continue from the checkpoint in --checkpoint-dir (same arguments)")
    fit.set_defaults(func=cmd_fit)
    demo = sub.add_parser("demo", help="train on the embedded PBMC data; write .h5ad + UMAP PNG")
    demo.add_argument("-o", "--output", default="demo_out", help="output folder")
    _add_model_args(demo)
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
