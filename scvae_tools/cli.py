"""Command line: ``scvae-tools fit``, ``scvae-tools apply`` and ``scvae-tools demo``.

- ``fit IN.h5ad -o OUT.h5ad``: train on the counts and write the results (latent in
  ``obsm``, denoised layers, settings and history in ``uns``); ``--save-model DIR`` keeps
  the model.
- ``apply IN.h5ad --model DIR -o OUT.h5ad``: write a saved model's results for other cells
  with the same genes, without training; with ``--query``, cells from batches the model
  has not seen are mapped onto it first (``SCVAE.load_query``: only the new batches'
  weights are fitted).
- ``demo``: train on the PBMC data that ship with scanpy; write an .h5ad and a UMAP.

Also runs as ``python -m scvae_tools.cli``, e.g. under ``torchrun`` for distributed
data-parallel training (``torchrun --nproc-per-node 2 -m scvae_tools.cli fit IN.h5ad -o
OUT.h5ad``): DDP is used automatically when torchrun started the process, and only
rank 0 writes the output and the saved model.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from pathlib import Path

from .distributed import is_main_process


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", default=None, help="layer with raw counts (default: X)")
    p.add_argument("--batch-key", default=None, help="obs column with batch labels")
    p.add_argument("--categorical-covariate-keys", nargs="+", default=None, metavar="KEY",
                   help="obs columns of categorical covariates (one-hot into both networks); "
                        "give the input file before this option (the keys run up to the "
                        "next option)")
    p.add_argument("--continuous-covariate-keys", nargs="+", default=None, metavar="KEY",
                   help="obs columns of continuous covariates (input file before, as above)")
    p.add_argument("--size-factor-key", default=None,
                   help="obs column with each cell's library size (default: its count sum)")
    p.add_argument("--allow-non-integer", action="store_true",
                   help="accept non-integer values (e.g. ambient-corrected counts)")
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--dropout-rate", type=float, default=0.1)
    p.add_argument("--likelihood", choices=["nb", "zinb", "poisson"], default="nb")
    p.add_argument("--dispersion", choices=["gene", "gene-batch", "gene-cell"], default="gene")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--free-bits", type=float, default=0.0,
                   help="KL floor per latent dimension, nats (default 0: none)")
    p.add_argument("--prior", choices=["normal", "mog"], default="normal",
                   help="N(0, I), or a learned mixture of Gaussians")
    p.add_argument("--n-prior-components", type=int, default=10,
                   help="mixture components of --prior mog")
    p.add_argument("--batch-norm", choices=["both", "encoder", "decoder", "none"],
                   default="both", help="BatchNorm in which network (default: both)")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: by data size)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="cells per minibatch (default 128; 1024 on a CUDA GPU from 100,000 "
                        "training cells)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 4e-3; 1e-2 with the GPU's batch 1024)")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="Adam's (default 1e-6)")
    p.add_argument("--eps", type=float, default=1e-2, help="Adam's epsilon (default 1e-2)")
    p.add_argument("--train-size", type=float, default=0.9,
                   help="share of cells trained on; the rest validate (default 0.9)")
    p.add_argument("--kl-warmup-epochs", type=int, default=None,
                   help="epochs over which β rises linearly to --beta, epoch e using "
                        "β·e/W (default: min(10, epochs // 4); with --resume, the "
                        "interrupted run's)")
    p.add_argument("--no-early-stopping", action="store_true",
                   help="train all --epochs instead of stopping when validation stalls")
    p.add_argument("--early-stopping-patience", type=int, default=30)
    p.add_argument("--validation-every", type=int, default=1,
                   help="score the validation cells every N epochs (default: every epoch)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant", "plateau"], default="cosine")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder/decoder")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the training step as a CUDA graph (experimental, CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    _add_output_args(p)
    p.add_argument("--save-model", default=None, help="also save the model to this directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-added", default="scvae",
                   help="result keys: obsm X_KEY, layers KEY_denoised / KEY_expected, uns KEY")
    p.add_argument("--no-layers", action="store_true", help="skip the dense denoised layers")


def _fit(adata, args):
    from .model import SCVAE, check_key_added

    check_key_added(args.key_added)  # before training, not after
    model = SCVAE(adata, layer=args.layer, batch_key=args.batch_key,
                  categorical_covariate_keys=args.categorical_covariate_keys,
                  continuous_covariate_keys=args.continuous_covariate_keys,
                  size_factor_key=args.size_factor_key, allow_non_integer=args.allow_non_integer,
                  n_latent=args.n_latent, n_hidden=args.n_hidden, n_layers=args.n_layers,
                  dropout_rate=args.dropout_rate, likelihood=args.likelihood,
                  dispersion=args.dispersion, beta=args.beta, free_bits=args.free_bits,
                  prior=args.prior, n_prior_components=args.n_prior_components,
                  use_batch_norm=args.batch_norm)
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                weight_decay=args.weight_decay, eps=args.eps,
                train_size=args.train_size, kl_warmup_epochs=args.kl_warmup_epochs,
                early_stopping=not args.no_early_stopping,
                early_stopping_patience=args.early_stopping_patience,
                lr_schedule=args.lr_schedule, validation_every=args.validation_every,
                precision=args.precision, compile=args.compile, cuda_graphs=args.cuda_graphs,
                device=args.device, progress_bar=not args.quiet,
                strategy=_strategy(getattr(args, "strategy", "none")),
                checkpoint_dir=getattr(args, "checkpoint_dir", None),
                checkpoint_every=getattr(args, "checkpoint_every", 10),
                resume=getattr(args, "resume", False))
    if not is_main_process():  # DDP: rank 0 alone computes and writes the results
        return model
    model.write_to_adata(adata, key_added=args.key_added, layers=not args.no_layers)
    return model


def _strategy(choice: str) -> str | None:
    """``--strategy`` → ``SCVAE.train(strategy=)``; ``auto`` picks DDP under torchrun."""
    from .distributed import launched_by_torchrun

    if choice == "auto":
        multi = launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        return "ddp" if multi else None
    return None if choice == "none" else choice


def _read(path: str, backed: bool):
    """The input AnnData; ``backed``: out of core, X stays on disk."""
    from .backed import open_h5ad

    return open_h5ad(path, backed=backed)


def _check_save_model(save_model: str | None, *written: str | Path | None) -> None:
    """Before any training: ``--save-model`` can be written (a new or empty folder, or a
    saved model), and is not (nor contains) a path the command writes: a model folder holds
    only the model, so saving after those files would be refused, after training."""
    if not save_model:
        return
    from .model import check_save_target

    check_save_target(save_model, overwrite=True)
    _check_writable_parent(save_model, "--save-model")
    folder = Path(save_model).resolve()
    for path in filter(None, written):
        out = Path(path).resolve()
        if out == folder or folder in out.parents:
            raise ValueError(f"--save-model {save_model} would also hold {path}; a model "
                             "folder holds only the model. Save it to a folder of its own, "
                             f"e.g. {Path(save_model) / 'model'}.")


def _check_writable_parent(path: str | Path, flag: str) -> None:
    """The nearest existing folder above ``path`` is a folder this process can write into
    (a file there, e.g. ``env.sh/model``, fails only when the path is created)."""
    parent = next((p for p in Path(path).absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PermissionError(f"{flag} {path}: cannot write into {parent}"
                              f"{' (a file, not a folder)' if parent and parent.is_file() else ''}"
                              "; choose a writable folder.")


def _check_output(path: str, input_path: str | None = None) -> None:
    """Refuse, before any training, an output path that could not be written."""
    out = Path(path)
    if str(path).endswith(("/", os.sep)) and not out.is_dir():  # Path() drops the slash
        raise IsADirectoryError(f"-o {path} names a folder; pass the path of an .h5ad file, "
                                f"e.g. {out / 'result.h5ad'}.")
    if out.is_dir():
        raise IsADirectoryError(f"-o {path} is a folder; pass the path of an .h5ad file, e.g. "
                                f"{out / 'result.h5ad'}.")
    if input_path is not None and out.exists() and out.resolve() == Path(input_path).resolve():
        raise FileExistsError(f"-o {path} is the input file; write the results to a new file "
                              "(the input is only read).")
    _check_writable_parent(out, "-o")


def _write(adata, path: str | Path, backed: bool) -> None:
    """Write the results atomically: a failed write (a full disk) keeps the file that was
    there before, instead of a truncated one."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if backed:  # copy X on disk instead of reading it into memory (atomic too)
        from .backed import write_h5ad_backed

        write_h5ad_backed(adata, path)
    else:
        from .checkpoint import atomic_write

        atomic_write(path, adata.write_h5ad)


def _summary(model) -> str:
    hist = model.history
    h = hist.iloc[-1]
    if math.isnan(h["validation_elbo"]):  # no validation cells
        return f"trained {len(hist)} epochs; train ELBO {h['train_elbo']:.2f} nats/cell"
    restored = hist.attrs.get("restored_epoch")
    if restored:  # the model holds that epoch's weights (after the KL warm-up)
        row = hist.loc[hist["epoch"] == restored].iloc[0]
        return (f"trained {len(hist)} epochs; best validation ELBO "
                f"{row['validation_elbo']:.2f} nats/cell at epoch {restored} (the weights kept)")
    return f"trained {len(hist)} epochs; validation ELBO {h['validation_elbo']:.2f} nats/cell"


def cmd_fit(args) -> int:
    _check_output(args.output, args.input)
    _check_save_model(args.save_model, args.output, args.checkpoint_dir)
    adata = _read(args.input, args.backed)
    args.input_layers = list(adata.layers.keys())  # what an error's --layer hint may name
    model = _fit(adata, args)
    if not is_main_process():
        return 0
    _write(adata, args.output, args.backed)  # the results first: a failed save keeps them
    if args.save_model:
        model.save(args.save_model, overwrite=True)
    print(f"{_summary(model)}; wrote {args.output}")
    return 0


def cmd_apply(args) -> int:
    from .model import SCVAE, check_key_added

    check_key_added(args.key_added)
    if args.query and args.warm_start:
        raise ValueError("--query already fine-tunes the mapped model on these cells; leave "
                         "out --warm-start (--epochs sets how long).")
    if not (args.query or args.warm_start) and (args.epochs is not None
                                                or args.seed is not None):
        raise ValueError("--epochs and --seed set the training of --query or --warm-start; "
                         "without either the model is applied as it is. Add --query for "
                         "cells of new batches, --warm-start to train the model further, or "
                         "drop those flags.")
    _check_output(args.output, args.input)
    _check_save_model(args.save_model, args.output)
    model_dir = Path(args.model).resolve()
    if args.save_model and Path(args.save_model).resolve() == model_dir:
        raise ValueError(f"--save-model {args.save_model} is the --model folder: saving there "
                         "would replace the model applied (and its training history). Save "
                         "to another folder.")
    for flag, path in (("-o", args.output), ("--save-model", args.save_model)):
        if path and model_dir in Path(path).resolve().parents:
            raise ValueError(f"{flag} {path} is inside the --model folder {args.model}, which "
                             "holds only the model (it is only read; other files there would "
                             "block saving it again). Write it elsewhere.")
    if args.pad_missing_genes and args.backed:
        raise ValueError("--pad-missing-genes builds a new AnnData in memory; leave out "
                         "--backed, or write a padded file first.")
    adata = _read(args.input, args.backed)
    args.input_layers = list(adata.layers.keys())  # what an error's --layer hint may name
    # --layer: where these files keep their counts, if not where the model read them
    where = {} if args.layer is None else {"layer": None if args.layer == "X" else args.layer}
    if args.pad_missing_genes:
        adata = SCVAE.prepare_query_anndata(adata, args.model,
                                            max_missing_fraction=args.max_missing_fraction)
    if args.query:  # new batches: fit their weights only, the reference stays as it was
        model = SCVAE.load_query(args.model, adata, max_epochs=args.epochs, seed=args.seed or 0,
                                 device=args.device, progress_bar=not args.quiet, **where)
    else:
        model = SCVAE.load(args.model, adata, device=args.device, **where)  # checks the genes
        if args.warm_start:  # from the saved weights, on these cells
            model.train(max_epochs=args.epochs, seed=args.seed or 0, warm_start=True,
                        device=args.device, progress_bar=not args.quiet)
    model.write_to_adata(adata, key_added=args.key_added, layers=not args.no_layers)
    _write(adata, args.output, args.backed)
    if args.save_model:
        model.save(args.save_model, overwrite=True)
    what = ("mapped onto" if args.query else "trained further" if args.warm_start
            else "applied")
    print(f"{what} the model in {args.model}: {adata.n_obs} cells; wrote {args.output}")
    if (args.query or args.warm_start) and not model.history.empty:  # as fit reports it
        print(_summary(model))
    return 0


def cmd_demo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    from . import datasets
    from .model import check_key_added, check_save_target
    from .plotting import training_history

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"-o {args.output} is a file; demo writes a folder of results: "
                              "pass a new or existing folder.")
    check_save_target(out / "model", overwrite=True)  # before training, not after
    _check_save_model(args.save_model, out)
    check_key_added(args.key_added)  # before the folder is made: a refused run leaves none
    out.mkdir(parents=True, exist_ok=True)
    adata = datasets.pbmc68k()
    print(f"pbmc68k (embedded in scanpy): {adata.n_obs} cells × {adata.n_vars} genes")
    model = _fit(adata, args)
    sc.pp.neighbors(adata, use_rep=f"X_{args.key_added}")
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    sc.tl.umap(adata, random_state=0)
    from sklearn.metrics import adjusted_rand_score

    ari = adjusted_rand_score(adata.obs["bulk_labels"], adata.obs["leiden"])
    fig = sc.pl.umap(adata, color=["bulk_labels", "leiden"], wspace=0.6, return_fig=True,
                     show=False)
    fig.savefig(out / "umap.png", dpi=120, bbox_inches="tight")
    training_history(model).savefig(out / "training_history.png", dpi=120)
    _write(adata, out / "pbmc68k_scvae.h5ad", backed=False)
    model.save(out / "model", overwrite=True)
    if args.save_model:
        model.save(args.save_model, overwrite=True)
    print(f"{_summary(model)}; Leiden vs bulk_labels ARI {ari:.3f}")
    print(f"wrote {out / 'pbmc68k_scvae.h5ad'}, {out / 'umap.png'}, "
          f"{out / 'training_history.png'}, {out / 'model'}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(  # the docstring's first line, without its reST quotes
        prog="scvae-tools", description=__doc__.splitlines()[0].replace("``", ""))
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
    apply = sub.add_parser("apply", help="write a saved model's results for an .h5ad (no "
                           "training, unless --query or --warm-start)")
    apply.add_argument("input", help="input .h5ad with raw counts of the model's genes")
    apply.add_argument("--model", required=True, help="folder of a model saved by fit --save-model "
                                                       "or SCVAE.save")
    apply.add_argument("-o", "--output", required=True, help="output .h5ad")
    _add_output_args(apply)
    apply.add_argument("--layer", default=None,
                       help="the input's counts are in this layer (X: in adata.X), not where "
                            "the model read them in training")
    apply.add_argument("--backed", action="store_true", help="stream the counts from disk")
    apply.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    apply.add_argument("--query", action="store_true",
                       help="cells from new batches: fine-tune the new batches' weights of the "
                            "reference model first (scArches-style reference mapping)")
    apply.add_argument("--warm-start", action="store_true",
                       help="train the saved model further on these cells first, from its "
                            "weights (SCVAE.train(warm_start=True)); with --save-model, keep it")
    apply.add_argument("--epochs", type=int, default=None,
                       help="--query, --warm-start: max epochs of that training (default: "
                            "by data size)")
    apply.add_argument("--seed", type=int, default=None,
                       help="--query, --warm-start: seed of that training (default 0)")
    apply.add_argument("--save-model", default=None,
                       help="save the model here (with --query, the mapped model)")
    apply.add_argument("--pad-missing-genes", action="store_true",
                       help="add the model's genes that the input lacks as zero counts (a "
                            "warning gives how many) and drop the others; the output then "
                            "has exactly the model's genes (SCVAE.prepare_query_anndata)")
    apply.add_argument("--max-missing-fraction", type=float, default=0.25,
                       help="--pad-missing-genes: refuse inputs lacking more than this share "
                            "of the model's genes (default 0.25)")
    apply.add_argument("--quiet", action="store_true", help="no progress bar")
    apply.set_defaults(func=cmd_apply)
    demo = sub.add_parser("demo", help="train on the embedded PBMC data; write .h5ad + UMAP PNG")
    demo.add_argument("-o", "--output", default="demo_out", help="output folder")
    _add_model_args(demo)
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    # "warning: …" alone: the source line of a call inside this module means nothing to
    # someone at the command line (recorded warnings, e.g. under pytest, are not formatted)
    python_format, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return args.func(args)
    # OSError: unreadable or non-.h5ad input, unwritable output (one line, not a traceback)
    except (ValueError, KeyError, OSError, FloatingPointError) as err:
        # str() of a KeyError is the repr of its message: take the message itself
        keyerror_text = isinstance(err, KeyError) and err.args and isinstance(err.args[0], str)
        message = err.args[0] if keyerror_text else str(err)
        flags = _flags_for(message, args.command, args)
        if flags:
            message += f" (on the command line: {', '.join(flags)})"
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = python_format


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _flags_for(message: str, command: str, args: argparse.Namespace | None = None) -> list[str]:
    """The flags for the Python fixes an error message names (``layer='counts'`` …), where
    ``command`` has them (``apply`` reads the layer the model was trained on); for an obs
    column that does not exist, the flag in ``args`` that named it."""
    flags = []
    layers = getattr(args, "input_layers", None) or []
    if command == "apply" and getattr(args, "layer", None) is None:
        # the counts are elsewhere than the model read them: say where they are
        named = re.findall(r"adata\.layers\['([^']+)'\] looks like raw counts", message)
        flags += [f"--layer {m}" for m in named if m in layers]
        if "The model was trained on adata.layers[" in message:
            flags.append("--layer X if adata.X holds the counts")
    if command in ("fit", "demo"):
        # Only layers the input has: messages also say "e.g. layer='counts'", or how to
        # make such a layer in Python, which no flag does.
        flags += [f"--layer {m}" for m in dict.fromkeys(re.findall(r"layer='([^']+)'", message))
                  if m in layers]
        if "Pass layer= naming" in message:
            flags.append("--layer LAYER")
        if "Pass layer=None" in message:
            flags.append("leave out --layer to use adata.X")
        if "allow_non_integer=True" in message:
            flags.append("--allow-non-integer")
    missing = re.match(r"'([^']+)' is not a column of adata.obs", message)
    if missing and args is not None:
        flags += [f"--{name.replace('_', '-')} naming an existing column"
                  for name in ("batch_key", "categorical_covariate_keys",
                               "continuous_covariate_keys", "size_factor_key")
                  if missing.group(1) in _as_list(getattr(args, name, None))]
    flags += [f"--key-added {m}" for m in re.findall(r"key_added='([^']+)'", message)]
    if command in ("fit", "demo"):  # training settings named by their Python argument
        for python, flag in (("early_stopping=False", "--no-early-stopping"),
                             ("needs a batch_key", "--batch-key COLUMN"),
                             ("needs checkpoint_dir=", "--checkpoint-dir DIR")):
            if python in message:
                flags.append(flag)
    if "layers=False" in message:
        flags.append("--no-layers")
    for python, flag in (("cuda_graphs=False", "leave out --cuda-graphs"),
                         ("strategy=None", "--strategy none"),
                         ("resume=False", "leave out --resume"),
                         ("device='auto'", "--device auto"),
                         ("dispersion='gene'", "--dispersion gene"),
                         ("likelihood='nb'", "--likelihood nb")):
        if python in message and (command != "apply" or python.startswith("device")):
            flags.append(flag)
    if ("prepare_query_anndata" in message and command == "apply" and args is not None
            and not args.pad_missing_genes and not args.backed):  # (not with --backed)
        flags.append("apply --pad-missing-genes")
    if "load_query" in message and command == "apply":
        flags.append("apply --query")
    return flags


if __name__ == "__main__":
    sys.exit(main())
