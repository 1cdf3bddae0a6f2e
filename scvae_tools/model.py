"""The user-facing model: :class:`SCVAE` ties an AnnData to a :class:`~scvae_tools.module.VAE`."""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from .adapter import AS_SAVED, DENSE_LIMIT_BYTES, CellData, DataSpec, _AsSaved, _label_text
from .backed import BackedCellData, is_backed, make_cell_data, read_backed
from .checkpoint import (
    CheckpointConfig,
    cells_digest,
    check_state_dict,
    covariates_digest,
    load_checkpoint,
    package_versions,
    replace_dir,
    safe_torch_load,
    validate_model_config,
)
from .devices import resolve_device, rng_kept, seeded
from .module import VAE, ModuleConfig
from .train import (
    DEFAULT_LR,
    TrainConfig,
    check_nonnegative_finite,
    check_patience,
    check_positive_finite,
    default_batch_size_and_lr,
    default_max_epochs,
    evaluate,
    field_max_epochs,
    split_indices,
    train_module,
    warn_if_no_validation,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
HISTORY_FILE = "history.csv"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, HISTORY_FILE)


def check_save_target(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ``FileExistsError`` unless :meth:`SCVAE.save` may write to ``path``.

    ``path`` may be new, an empty folder, or (with ``overwrite``) a model saved before. A
    folder holding anything else is never replaced: saving would delete those files.
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file; a model is saved as a folder. Choose "
                              "another path.")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    others = [name for name in entries if name not in MODEL_FILES]
    if others:
        shown = ", ".join(others[:5]) + (", …" if len(others) > 5 else "")
        raise FileExistsError(
            f"{path} holds files that are not part of a saved model ({shown}); saving there "
            "would delete them, so it is refused even with overwrite=True. Save the model to "
            "a new folder (e.g. a sub-folder), or move those files.")
    if not overwrite:
        raise FileExistsError(f"{path} holds a saved model; pass overwrite=True to replace "
                              "it.")


class SCVAE:
    """Variational autoencoder for single-cell counts with a Negative Binomial likelihood.

    Parameters
    ----------
    adata
        Cells × genes AnnData with raw counts in ``X`` or ``layers[layer]`` (dense, CSR or
        CSC; integer-valued). It is validated here and never modified.
    layer
        Layer holding the counts; ``None`` uses ``adata.X``.
    batch_key
        ``obs`` column of batch labels; the encoder and decoder are conditioned on it.
    categorical_covariate_keys, continuous_covariate_keys
        Further ``obs`` columns to condition on (one-hot encoded / used as they are): a list
        of names, or one name.
    size_factor_key
        ``obs`` column with each cell's library size; default: the cell's total counts.
    n_latent, n_hidden, n_layers, dropout_rate
        Architecture: latent dimensions, hidden units per layer, hidden layers, encoder dropout.
    likelihood
        ``"nb"`` (Negative Binomial, default), ``"zinb"`` (zero-inflated NB) or ``"poisson"``.
    dispersion
        NB inverse dispersion θ per ``"gene"``, per ``"gene-batch"`` or per ``"gene-cell"``.
    beta
        Weight of the KL term in the ELBO (β-VAE); 1 gives the true ELBO.
    free_bits
        Per-dimension KL floor λ in nats (0 disables) against posterior collapse.
    allow_non_integer
        Accept non-integer values (e.g. ambient-corrected counts).
    prior
        p(z): ``"normal"`` (N(0, I), default; KL in closed form) or ``"mog"``, a learned
        mixture of ``n_prior_components`` diagonal Gaussians that can follow the shape of the
        aggregated posterior (fewer "holes"); its KL is a one-sample Monte-Carlo estimate.
    n_prior_components
        Mixture components of the ``"mog"`` prior.
    use_batch_norm
        BatchNorm after each hidden layer of ``"both"`` networks (default), only the
        ``"encoder"`` or the ``"decoder"``, or ``"none"`` (as scvi-tools). On pbmc3k,
        ``"decoder"`` gave Leiden clusters slightly closer to the annotation (ARI +0.025 ±
        0.014 over 9 seeds; benchmarks/CLUSTERING.md, the third sweep).

    Examples
    --------
    >>> model = SCVAE(adata, n_latent=10)
    >>> model.train()
    >>> model.write_to_adata(adata)          # obsm["X_scvae"], layers["scvae_denoised"], ...
    """

    def __init__(
        self,
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | str | None = None,
        continuous_covariate_keys: list[str] | str | None = None,
        size_factor_key: str | None = None,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        likelihood: str = "nb",
        dispersion: str = "gene",
        beta: float = 1.0,
        free_bits: float = 0.0,
        allow_non_integer: bool = False,
        prior: str = "normal",
        n_prior_components: int = 10,
        use_batch_norm: str | bool = "both",
    ):
        if dispersion == "gene-batch" and batch_key is None:
            raise ValueError("dispersion='gene-batch' needs a batch_key.")
        if likelihood == "poisson" and dispersion != "gene":
            # A Poisson has no dispersion: the setting would only add unused parameters.
            raise ValueError(f"likelihood='poisson' has no dispersion, so dispersion={dispersion!r} "
                             "would have no effect; leave dispersion='gene' (the default), or "
                             "use likelihood='nb' for a per-batch or per-cell dispersion.")
        if isinstance(adata, (str, os.PathLike)):  # out of core: counts stay on disk
            adata = read_backed(adata)
        self.spec = DataSpec.from_anndata(
            adata, layer=layer, batch_key=batch_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            size_factor_key=size_factor_key, allow_non_integer=allow_non_integer,
        )
        self.module_config = ModuleConfig(
            n_genes=self.spec.n_genes, n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers,
            dropout_rate=dropout_rate, likelihood=likelihood, dispersion=dispersion,
            n_batch=self.spec.n_batch, n_cats_per_cov=self.spec.n_cats_per_cov,
            n_continuous_cov=len(self.spec.continuous_covariate_keys),
            prior=prior, n_prior_components=int(n_prior_components),
            use_batch_norm=use_batch_norm,
        )
        for name, value in (("beta", beta), ("free_bits", free_bits)):
            check_nonnegative_finite(value, name)
        self.beta = float(beta)
        self.free_bits = float(free_bits)
        # train() draws its own initial weights from its seed; these only serve an untrained
        # model, so they come from a fixed seed and leave the caller's random state alone.
        with seeded(0, torch.device("cpu")):
            self.module = VAE(self.module_config)
        self.device = torch.device("cpu")
        self.history = pd.DataFrame()
        self.train_config: TrainConfig | None = None
        self.train_indices: np.ndarray | None = None
        self.validation_indices: np.ndarray | None = None
        self.is_trained = False
        self.loaded_from: str | None = None  # the folder of SCVAE.load, if it came from one
        self.train_threads: int | None = None  # torch's CPU threads in the last train()
        self.query_info: dict[str, Any] | None = None  # set by load_query
        # Backed AnnData (or a path) streams from disk; see scvae_tools.backed.
        self._data: CellData | BackedCellData | None = make_cell_data(adata, self.spec)
        if isinstance(self._data, CellData):
            _warn_if_many_empty_genes(self._data)

    # ------------------------------------------------------------------ properties
    @property
    def var_names(self) -> pd.Index:
        """The genes the model was built on, in its order."""
        return pd.Index(self.spec.var_names)

    @property
    def n_latent(self) -> int:
        """The number of latent dimensions."""
        return self.module_config.n_latent

    def __repr__(self) -> str:
        c = self.module_config
        state = "trained" if self.is_trained else "untrained"
        return (
            f"SCVAE({state}; {c.n_genes} genes, n_latent={c.n_latent}, n_hidden={c.n_hidden}, "
            f"n_layers={c.n_layers}, likelihood={c.likelihood!r}, dispersion={c.dispersion!r}, "
            f"beta={self.beta}, batch_key={self.spec.batch_key!r}, device={self.device})"
        )

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        train_size: float = 0.9,
        early_stopping: bool = True,
        seed: int = 0,
        device: str | torch.device = "auto",
        progress_bar: bool = True,
        kl_warmup_epochs: int | None = None,
        weight_decay: float = 1e-6,
        eps: float = 1e-2,
        early_stopping_patience: int = 30,
        validation_every: int = 1,
        lr_schedule: str = "cosine",
        precision: str = "32",
        compile: bool = False,
        cuda_graphs: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        resume: bool = False,
        strategy: str | None = None,
        warm_start: bool = False,
    ) -> SCVAE:
        """Fit the model by maximising the ELBO with Adam.

        Training starts from new initial weights drawn from ``seed``, unless
        ``warm_start=True``: on a model from :meth:`load` it therefore does not continue
        training the saved weights by default (scvi-tools' ``train()`` does), and says so
        in a warning. On a query model from :meth:`load_query` it would fit a new model to
        the query cells alone (it warns); ``warm_start=True`` fine-tunes the mapping further.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; default ``100,000 / n_cells``, between 10 and
            400 (38 for pbmc3k's 2,638 cells). With the defaults below this reaches a better
            held-out ELBO than scvi-tools' 400-epoch default in a tenth of the epochs
            (evidence: ``benchmarks/README.md``, "Defaults").
        batch_size
            Cells per minibatch. Default 128, as in scvi-tools; on a CUDA GPU with at least
            100,000 training cells (one process), 1024: there a batch-128 step waits on
            kernel launches, and batch 1024 runs an epoch ~7× faster with a held-out ELBO
            within 0.2% (evidence: ``benchmarks/HISTORY.md``, stop 20). The values used are in
            ``uns["scvae"]["train"]``.
        lr
            Adam's peak learning rate (decayed, see ``lr_schedule``): by default 4e-3, or
            1e-2 where the default batch is 1024 (a ``batch_size`` of your own keeps 4e-3).
            For scvi-tools' own schedule pass ``batch_size=128, lr=1e-3,
            lr_schedule="constant", max_epochs=400``. The per-gene (or per-gene-and-batch)
            dispersions θ learn at 10× ``lr`` (their own Adam group): at the networks' rate
            they hardly moved from their start in a default-length run.
        train_size
            Fraction of cells used for training; the rest is the validation set that early
            stopping and ``history["validation_*"]`` use. 1.0 trains on all cells.
        early_stopping
            Stop when the validation ELBO has not improved for ``early_stopping_patience``
            epochs (30), and restore the best weights. With ``train_size=1.0`` (no
            validation cells) it watches the training ELBO instead, averaged over each
            epoch while the weights change (with dropout on), a noisier guide.
        seed
            Seeds the split, initial weights, shuffling and sampling; same seed, device and
            number of torch threads give identical results on the CPU (the thread count,
            recorded as ``torch_threads``, sets the order of float sums).
        device
            ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        progress_bar
            Show a tqdm bar with the train and validation ELBO.
        kl_warmup_epochs
            Epochs over which β ramps linearly up to ``beta``: epoch e (1, 2, …) uses
            ``beta · min(1, e / kl_warmup_epochs)``, so the first already has a little KL
            (scvi-tools' ramp starts at 0); default ``min(10, max_epochs // 4)`` (when
            resuming, the interrupted run's); 0 disables.
        weight_decay
            Adam's weight decay (default 1e-6, as in scvi-tools).
        eps
            Adam's eps (default 1e-2, as in scvi-tools); must be positive.
        early_stopping_patience
            Scored epochs without improvement before stopping (default 30; with
            ``validation_every > 1`` it counts validation checks, not epochs).
        validation_every
            Score the validation cells every this many epochs and after the last one (like
            scvi-tools' ``check_val_every_n_epoch``); the ``validation_*`` columns of
            ``history`` are NaN in between, and early stopping's patience then counts
            checks, not epochs. Default 1: every epoch.
        lr_schedule
            ``"cosine"`` (default): the learning rate decays from ``lr`` to ``lr / 100``
            over ``max_epochs``, step by step. ``"constant"``: ``lr`` throughout.
            ``"plateau"``: ``lr`` times 0.3 whenever the validation ELBO has not improved
            for 5 epochs.
        precision
            ``"32"`` (default) or ``"bf16-mixed"``: the encoder and decoder matmuls run
            under bfloat16 autocast while the likelihood, KL, weights and optimiser stay
            float32. For GPUs with bf16 tensor cores; on most CPUs it is slower.
        compile
            ``torch.compile`` the encoder and decoder (in place; saving and loading are
            unchanged). Compiling takes tens of seconds and needs a C compiler on the CPU,
            so it pays off only for long runs, typically on a GPU.
        cuda_graphs
            CUDA only, experimental: capture the training step of full batches once as a
            CUDA graph and replay it, instead of launching its ~200 kernels one by one.
            On an H100 a batch-128 step is bound by those launches: 41–45 s per epoch of
            1M cells eagerly. A prototype of the graphed step ran that epoch in 5.1 s
            (``benchmarks/gpu_check.py``). This option itself has so far run on the CPU
            only, as the same step without the capture (tests): check it against the
            eager run on your data. Not with ``compile=True`` or DDP.
        checkpoint_dir
            Folder for a training checkpoint (model, optimiser, RNG states, epoch, history,
            early-stopping state), written atomically so that a killed run never leaves a
            torn file. ``None`` (default) writes none.
        checkpoint_every
            Write the checkpoint every this many epochs (and after the last one).
        resume
            Continue from the checkpoint in ``checkpoint_dir`` (pass the same data and
            settings; ``max_epochs`` may grow, and a cosine schedule then follows the new
            length); starts afresh when there is none yet. On the
            CPU a resumed run gives the same model as an uninterrupted one.
        strategy
            ``None``: one process. ``"ddp"``: distributed data parallel inside a process
            group started by ``torchrun`` (see :mod:`scvae_tools.distributed`): each rank
            trains on its shard of every epoch (``batch_size`` is per rank), gradients are
            all-reduced (NCCL on GPUs, Gloo on CPUs) and only rank 0 shows progress and
            writes checkpoints. ``device="auto"`` then means ``cuda:LOCAL_RANK`` or the CPU.
        warm_start
            Continue from the current weights (a loaded model's, or an earlier ``train()``'s)
            instead of new ones: more epochs, or fine-tuning on other cells with the same
            genes and covariates. A fresh optimiser and learning-rate schedule, no KL warm-up
            by default, and a new train/validation split from ``seed`` (validation cells
            may then include cells the weights were trained on; ``history`` holds this run
            only). On a query model from :meth:`load_query`: more fine-tuning of its new
            columns alone, the reference's weights frozen (reference cells keep their
            latent), with load_query's defaults (constant lr 1e-3, batch 128, at most 200
            epochs); recorded in ``query_info["continued"]``. Every weight of a plain model
            trains, so on cells that lack some of its batches (or categories of a
            categorical covariate) a warning says that cells of those will map differently
            (``load_query`` keeps them fixed).

        Returns
        -------
        The model itself, trained (``self.history`` holds one row per epoch).

        Raises
        ------
        FloatingPointError
            Training kept producing NaN/inf after ``max_rollbacks`` (3) rollbacks to the last
            good epoch, each with a 4× lower learning rate (a query model's fine-tuning
            too). The model is left as it was before
            this call (an earlier fit is kept; nothing diverged is ever used).
        ValueError
            Among others: the cells have genes padded by :meth:`prepare_query_anndata`
            (``var["scvae_padded"]``), which training would learn as never expressed (a
            query model's ``warm_start`` fine-tuning, which trains covariate columns only,
            is allowed); or ``warm_start`` on a query model whose cells include none of
            its new categories (nothing would train).
        """
        data = self._require_data("to train it, load it with SCVAE.load(path, adata)")
        if warm_start and not self.is_trained:
            raise ValueError("warm_start=True continues from trained weights, and this model "
                             "has none yet; leave warm_start=False.")
        if warm_start and self.query_info is not None:
            # Only the new covariate columns train (as in load_query, which takes padded
            # cells too): the reference's view of the padded genes stays as it was.
            return self._continue_query(locals())
        padded = getattr(data, "padded_genes", [])
        if padded:
            shown = ", ".join(padded[:5]) + (", …" if len(padded) > 5 else "")
            raise ValueError(
                f"var['scvae_padded'] flags {len(padded)} of the model's genes ({shown}) as "
                "added with zero counts by prepare_query_anndata, not measured: training would "
                "learn them as never expressed. Use the model as it is, map new batches with "
                "SCVAE.load_query (command line: apply --query), or train on cells that measure "
                "every gene (a new model can leave the padded ones out: "
                "adata[:, ~adata.var['scvae_padded']]).")
        if warm_start:
            self._warn_if_unmarked_query(data)
        if cuda_graphs and resolve_device(device).type != "cuda":
            raise ValueError(
                f"cuda_graphs=True needs a CUDA device, got device={device!r} "
                f"({resolve_device(device)}); leave cuda_graphs=False on CPUs and MPS.")
        n = data.n_obs
        # Whole numbers, NumPy's included (a seed from np.arange), and nothing else: 2.7
        # epochs or a patience of 2.5 used to be truncated or taken as they were.
        seed = _whole(seed, "seed", minimum=0)
        validation_every = _whole(validation_every, "validation_every")
        early_stopping_patience = _whole(early_stopping_patience, "early_stopping_patience",
                                         minimum=0)
        max_epochs = None if max_epochs is None else _whole(max_epochs, "max_epochs")
        batch_size = None if batch_size is None else _whole(batch_size, "batch_size")
        check_patience(early_stopping, early_stopping_patience)
        # eps=0 divides 0 by 0 in Adam wherever a gradient is exactly zero: NaN weights,
        # rolled back as a divergence that blames the data (query fine-tuning refuses it too).
        check_positive_finite(eps, "eps")
        check_nonnegative_finite(weight_decay, "weight_decay")
        max_epochs = default_max_epochs(n) if max_epochs is None else max_epochs
        checkpoint = self._checkpoint_config(checkpoint_dir, _whole(checkpoint_every,
                                                                    "checkpoint_every"), resume)
        if kl_warmup_epochs is None and checkpoint is not None and checkpoint.resume:
            # The default follows max_epochs: resuming with more epochs keeps the run's own.
            saved = load_checkpoint(checkpoint.path) or {}
            kl_warmup_epochs = saved.get("train_config", {}).get("kl_warmup_epochs")
        if kl_warmup_epochs is None:  # trained weights need no warm-up of β
            kl_warmup_epochs = 0 if warm_start else min(10, max_epochs // 4)
        elif isinstance(kl_warmup_epochs, (int, np.integer)) and kl_warmup_epochs > max_epochs:
            # (other types are refused, with their own message, by TrainConfig)
            warnings.warn(
                f"kl_warmup_epochs={kl_warmup_epochs} is longer than max_epochs={max_epochs}: "
                f"β only reaches {self.beta * max_epochs / kl_warmup_epochs:.3g} (not "
                f"beta={self.beta}) and early stopping, which starts after the warm-up, never "
                "runs. Pass kl_warmup_epochs ≤ max_epochs.", UserWarning, stacklevel=2)
        train_idx, val_idx = split_indices(n, train_size, seed)
        warn_if_no_validation(train_size, n, val_idx, stacklevel=2)
        if batch_size is None or lr is None:
            auto_device = None if strategy is not None else resolve_device(device)
            auto_batch, auto_lr = default_batch_size_and_lr(len(train_idx), auto_device)
            # The large-batch lr only goes with the large batch it was measured for.
            lr = (auto_lr if batch_size is None else DEFAULT_LR) if lr is None else lr
            batch_size = auto_batch if batch_size is None else batch_size
        cfg = TrainConfig(
            max_epochs=max_epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            eps=eps, beta=self.beta, free_bits=self.free_bits, kl_warmup_epochs=kl_warmup_epochs,
            early_stopping=early_stopping, early_stopping_patience=early_stopping_patience,
            validation_every=validation_every, lr_schedule=lr_schedule, precision=precision,
            compile=compile, cuda_graphs=cuda_graphs, seed=seed, train_size=train_size,
            warm_start=bool(warm_start),
        )
        dist_ctx = _dist_context(strategy, device)
        cfg.world_size = 1 if dist_ctx is None else dist_ctx.world_size
        device = resolve_device(device) if dist_ctx is None else dist_ctx.device
        resuming = checkpoint is not None and checkpoint.resume and checkpoint.path.exists()
        if not (warm_start or resuming):  # (a resumed run starts from its checkpoint)
            self._warn_if_discarding_weights()
        finished = False
        try:
            # The seed (and, with warm_start, the starting weights) fully determines the
            # result, whatever came before; the caller's own random state is given back.
            with seeded(seed, device):
                # A copy: should training fail, the model keeps the weights it had.
                if warm_start:
                    module = copy.deepcopy(self.module).cpu()
                    module.forget_cached_weights()
                else:
                    module = VAE(self.module_config)  # re-initialised
                history = train_module(module, data, train_idx, val_idx, cfg, device,
                                       progress_bar=progress_bar, checkpoint=checkpoint,
                                       dist=dist_ctx)
            finished = True
        finally:
            if dist_ctx is not None:
                dist_ctx.close(finished)
        # Only a run that finished replaces the model: a diverged one raised above.
        self.module, self.device, self.history = module, device, history
        self.query_info = None  # trained from scratch: no longer a query mapped onto a reference
        self.loaded_from = None
        self.train_config, self.train_indices, self.validation_indices = cfg, train_idx, val_idx
        self.train_threads = torch.get_num_threads()  # with the seed, it fixes the CPU result
        self.is_trained = True
        if dist_ctx is None or dist_ctx.is_main:  # one warning, not one per rank
            self._warn_if_collapsed()
        return self

    def _continue_query(self, args: dict[str, Any]) -> SCVAE:
        """``train(warm_start=True)`` on a query model: more fine-tuning of its new columns,
        the reference's weights frozen, as :meth:`load_query` does (scvi-tools' query
        models train so)."""
        from .query import continue_query

        # What the query's fine-tuning does, or train()'s defaults (not given): anything else
        # is refused rather than ignored.
        allowed = {"kl_warmup_epochs": (None, 0), "weight_decay": (1e-6, 0.0),
                   "validation_every": (1,), "lr_schedule": ("cosine", "constant"),
                   "precision": ("32",), "compile": (False,), "cuda_graphs": (False,),
                   "checkpoint_dir": (None,), "checkpoint_every": (10,), "resume": (False,),
                   "strategy": (None,)}
        given = sorted(k for k, ok in allowed.items() if args[k] not in ok)
        if given:
            raise ValueError(
                f"Settings that do not apply to a query model's fine-tuning: {', '.join(given)}"
                " (warm_start on a model from load_query trains only its new columns, as "
                "load_query does); leave them at their defaults.")
        n = self._require_data().n_obs
        # load_query's defaults: a constant lr of 1e-3, the field's epoch rule, at most 200
        max_epochs = (min(200, field_max_epochs(n)) if args["max_epochs"] is None
                      else _whole(args["max_epochs"], "max_epochs"))
        batch_size = 128 if args["batch_size"] is None else _whole(args["batch_size"],
                                                                     "batch_size", minimum=2)
        lr = 1e-3 if args["lr"] is None else args["lr"]
        check_positive_finite(lr, "lr")
        check_positive_finite(args["eps"], "eps")
        check_patience(args["early_stopping"], args["early_stopping_patience"])
        continue_query(self, max_epochs, batch_size, lr, args["eps"], args["train_size"],
                       args["early_stopping"], args["early_stopping_patience"],
                       _whole(args["seed"], "seed", minimum=0), resolve_device(args["device"]),
                       args["progress_bar"])
        return self

    def _warn_if_unmarked_query(self, data) -> None:
        """A model trained further on cells of only some of its batches (or categories of a
        categorical covariate): every weight moves, so cells of the others move too. (Query
        models saved before their mapping was recorded in config.json load as such plain
        models.) A model's own training cells have every category: no warning then."""
        from .query import category_codes

        missing = []
        for label, cats, codes in category_codes(self.spec, data):
            present = set(np.unique(codes).tolist())
            name = label.removeprefix("cat:")
            missing += [f"{name} {c!r}" for i, c in enumerate(cats) if i not in present]
        if missing:
            shown = ", ".join(missing[:5]) + (", …" if len(missing) > 5 else "")
            warnings.warn(
                "train(warm_start=True) updates every weight of this model on these cells, "
                f"which have none of {shown}: cells of those will map differently "
                "afterwards. To add new batches while the rest stays fixed, map them with "
                "SCVAE.load_query(reference_dir, adata) (command line: apply --query); "
                "that also holds for a query model saved by an older scvae_tools, whose "
                "config.json lacks 'query' (map the query again).",
                UserWarning, stacklevel=3)

    def _warn_if_discarding_weights(self) -> None:
        """scvi-tools' ``train()`` continues from a loaded or mapped model's weights; ours
        starts afresh (seeded), which must not pass unnoticed."""
        if self.query_info is not None:
            warnings.warn(
                "train() fits a new model, from new initial weights, to this query's cells "
                "alone: the reference weights that load_query mapped them onto are "
                "discarded, and the query no longer shares the reference's latent space. To "
                "fine-tune the mapping for longer, pass warm_start=True.",
                UserWarning, stacklevel=3)
        elif getattr(self, "loaded_from", None) is not None:
            warnings.warn(
                f"train() starts from new initial weights: the weights loaded from "
                f"{self.loaded_from} are discarded. To train them further, pass "
                "warm_start=True; an interrupted run continues with "
                "train(checkpoint_dir=..., resume=True).",
                UserWarning, stacklevel=3)

    def _checkpoint_config(self, checkpoint_dir, every: int, resume: bool) -> CheckpointConfig | None:
        if checkpoint_dir is None:
            if resume:
                raise ValueError("resume=True needs checkpoint_dir=, the folder that the "
                                 "interrupted run wrote its checkpoint to.")
            return None
        # A checkpoint is only resumed into the same architecture, genes and covariates.
        identity = {"module": self.module_config.to_dict(), "data": self.spec.to_dict()}
        data = self._require_data()
        return CheckpointConfig(Path(checkpoint_dir), every=every, resume=resume,
                                identity=identity, cells=cells_digest(data.obs_names),
                                library=np.asarray(data.library, dtype=np.float32),
                                covariates=covariates_digest(data.batch_index, data.cat_covs,
                                                             data.cont_covs))

    def _warn_if_collapsed(self) -> None:
        if self.history.empty or self.validation_indices is None:
            return
        data = self._require_data()
        kl = self._kl_per_dim_mean(data)
        collapsed = int((kl < 0.01).sum())
        if collapsed == len(kl):
            warnings.warn(
                "Posterior collapse: every latent dimension has KL < 0.01 nats — the latent "
                "carries no information about the cells. Lower beta, use free_bits or a "
                "longer kl_warmup_epochs.", UserWarning, stacklevel=3,
            )
        elif collapsed:
            warnings.warn(
                f"{collapsed} of {len(kl)} latent dimensions are collapsed (KL < 0.01 nats); "
                "they encode nothing. This is often harmless (n_latent larger than needed); "
                "see model.get_kl_per_dimension().", UserWarning, stacklevel=3,
            )

    def to_device(self, device: str | torch.device = "auto") -> SCVAE:
        """Move the model to ``device``, as scvi-tools' ``model.to_device``; later evaluation
        runs there.

        Also frees what the attached data held on the previous device: after training on
        a GPU, ``model.to_device("cpu")`` gives its memory back (the counts stay resident
        there otherwise, for fast evaluation). Training with ``train(device=...)`` moves
        the model again.

        Parameters
        ----------
        device
            ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a :class:`torch.device`, or
            ``"auto"`` (CUDA, then MPS, then CPU). A device that is not there is refused.

        Returns
        -------
        The model itself.
        """
        device = resolve_device(device)  # refuses a device that is not there, unchanged
        self.module.to(device)
        self.device = device
        if self._data is not None:
            self._data.release_device()
        return self

    # ------------------------------------------------------------------ evaluation
    def _require_data(self, fix: str = "pass adata= to this method") -> CellData | BackedCellData:
        if self._data is None:
            raise ValueError(f"This model has no AnnData attached; {fix}.")
        return self._data

    def _data_for(self, adata) -> CellData | BackedCellData:
        """CellData for ``adata`` (the training data when None), encoded like the training data.

        A backed AnnData or an .h5ad path gives a :class:`BackedCellData` (read in chunks).
        """
        if adata is None:
            return self._require_data()
        # Read in place: this CellData lives for one read-only evaluation call.
        return make_cell_data(adata, self.spec, copy=False, trained=True)

    def _check_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError("The model is not trained yet; call model.train() first.")

    def _eval_batches(self, data: CellData, batch_size: int, indices=None, sparse: bool = False,
                      nonzero: bool = False):
        batch_size = check_positive_int(batch_size, "batch_size")
        self._module_on_device().eval()
        return data.batches(indices, batch_size=batch_size, device=self.device, sparse=sparse,
                            nonzero=nonzero)

    def _module_on_device(self) -> VAE:
        """The module, moved to the model's device if any of its tensors is elsewhere.

        ``Module.to`` walks every parameter and buffer even when nothing moves (~1.5 ms
        here): a tenth of a small data set's inference call.
        """
        want = self.device  # "cuda" (no index) matches tensors on the current CUDA device
        tensors = (*self.module.parameters(), *self.module.buffers())
        if any(t.device.type != want.type or want.index not in (None, t.device.index)
               for t in tensors):
            self.module.to(want)
        return self.module

    def get_latent_representation(
        self, adata=None, give_mean: bool = True, batch_size: int | None = None,
        indices: np.ndarray | None = None, return_dist: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent coordinates of each cell: posterior means (or one sample), cells × n_latent.

        Parameters
        ----------
        adata
            AnnData with the model's genes (reordered by name when needed); ``None``: the
            training data.
        give_mean
            The posterior means (default); ``False``: one sample of q(z|x) per cell.
        batch_size
            Cells per batch; by default as many as keep a cells × genes block near 32 MB
            (4,194 cells for 2,000 genes; between 1,024 and 8,192).
        indices
            Only these cells (row numbers, in this order, or a boolean mask).
        return_dist
            Return the posterior q(z|x) = N(mean, variance) itself, as the tuple
            ``(means, variances)`` (each cells × n_latent), as scvi-tools does: how
            uncertain each cell's position is, per dimension, as far as the encoder can tell.
        """
        self._check_trained()
        data = self._data_for(adata)
        indices = _check_indices(indices, data.n_obs)
        if return_dist:
            return self._posterior(data, batch_size, indices)
        return self._latent(data, give_mean, batch_size, indices)

    def _gene_indices(self, gene_list) -> np.ndarray | None:
        """Positions of ``gene_list`` (names, or one name) among the model's genes; ``None``
        for all genes."""
        if gene_list is None:
            return None
        if isinstance(gene_list, str):
            gene_list = [gene_list]
        idx = pd.Index(self.spec.var_names).get_indexer([str(g) for g in gene_list])
        if (idx < 0).any():
            missing = [g for g, i in zip(gene_list, idx, strict=True) if i < 0]
            raise KeyError(f"Genes not in the model: {missing[:5]}"
                           f"{' …' if len(missing) > 5 else ''}; see model.var_names.")
        return idx

    def _inference_batch_size(self, batch_size: int | None, n_samples: int = 1) -> int:
        """``batch_size``, or by default cells for ~2²³ cells × genes × samples values per
        block (32 MB of float32), between 1,024 and 8,192. Fewer, larger batches mean larger
        matmuls and less per-batch overhead: ~14% faster inference on pbmc3k than 1,024."""
        if batch_size is not None:
            return check_positive_int(batch_size, "batch_size")
        return default_inference_batch_size(self.spec.n_genes, n_samples)

    def _posterior_z(self, b, give_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's covariate vector and z: the posterior means, or one sample per cell."""
        cov = self.module.covariates(b.batch_index, b.cat_covs, b.cont_covs)
        m, v = self.module.encode(b.x, cov)
        return cov, (m if give_mean else m + v.sqrt() * torch.randn_like(m))

    def _latent(self, data: CellData, give_mean: bool = True, batch_size: int | None = None,
                indices: np.ndarray | None = None) -> np.ndarray:
        means, variances = self._posterior(data, batch_size, indices)
        if give_mean:
            return means
        noise = torch.randn(means.shape, dtype=torch.float32).numpy()  # the caller's generator (torch.manual_seed)
        return means + np.sqrt(variances) * noise

    @torch.inference_mode()
    def _posterior(self, data: CellData, batch_size: int | None = None,
                   indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Posterior means and variances, (cells, n_latent) each."""
        n = data.n_obs if indices is None else len(indices)
        means = np.empty((n, self.n_latent), dtype=np.float32)
        variances = np.empty_like(means)
        start = 0
        batch_size = self._inference_batch_size(batch_size)
        for b in self._eval_batches(data, batch_size, indices, sparse=True):  # encoder only
            cov = self.module.covariates(b.batch_index, b.cat_covs, b.cont_covs)
            m, v = self.module.encode(b.x, cov)
            means[start:start + len(m)] = m.cpu().numpy()
            variances[start:start + len(m)] = v.cpu().numpy()
            start += len(m)
        return means, variances

    def get_normalized_expression(
        self,
        adata=None,
        library_size: float | str = 1e4,
        n_samples: int = 1,
        transform_batch: str | None = None,
        batch_size: int | None = None,
        out: np.ndarray | None = None,
        indices: np.ndarray | None = None,
        gene_list: list[str] | None = None,
    ) -> np.ndarray:
        """Denoised expression, cells × genes (genes in the model's order, ``var_names``,
        or in ``gene_list``'s).

        Coming from scvi-tools: the default scale is per 1e4 counts, like scanpy's
        ``normalize_total`` (scvi-tools' is ``library_size=1``, proportions), and the result
        is a numpy array (``pd.DataFrame(x, index=adata.obs_names, columns=model.var_names)``
        labels it).

        Parameters
        ----------
        adata
            AnnData with the model's genes (reordered by name when needed); ``None``: the
            training data.
        library_size
            A number: expression per ``library_size`` counts (default 1e4, like
            ``sc.pp.normalize_total``). ``"observed"``: ℓ·ρ at each cell's own library size,
            the expected counts (under ZINB those of the count part: denoised values are
            free of the extra zeros, as in scvi-tools). ``1``: gene proportions.
        n_samples
            With 1, decode the posterior mean; with more, average the decoded mean over
            this many posterior samples of z.
        transform_batch
            Decode every cell as if it came from this batch (counterfactual expression).
        batch_size
            Cells per batch; by default as many as keep a cells × genes (× samples) block
            near 32 MB, between 1,024 and 8,192 cells.
        out
            A C-contiguous float32 array of shape (cells, genes) to write the result into,
            batch by batch, instead of a new one; it is returned. For results larger than
            memory pass a memory-mapped array, e.g.
            ``np.lib.format.open_memmap("denoised.npy", mode="w+", dtype=np.float32,
            shape=(adata.n_obs, model.var_names.size))`` with a backed AnnData. For repeated
            calls, reusing one buffer also spares the operating system zeroing fresh memory
            (up to a fifth of a call on large dense data).
        indices
            Only these cells (row numbers, in this order, or a boolean mask).
        gene_list
            Only these genes, in this order (names from ``model.var_names``). Each cell is
            still normalised over all genes; only the result is smaller: for a few marker
            genes over many cells, cells × len(gene_list) values instead of cells × genes.
        """
        self._check_trained()
        n_samples = check_positive_int(n_samples, "n_samples")
        if not (library_size == "observed" or (
                isinstance(library_size, (int, float, np.number)) and np.isfinite(library_size)
                and library_size > 0)):
            raise ValueError("library_size must be a positive number (e.g. 1e4) or "
                             f"'observed', got {library_size!r}.")
        data = self._data_for(adata)
        indices = _check_indices(indices, data.n_obs)
        genes = self._gene_indices(gene_list)
        shape = (data.n_obs if indices is None else len(indices),
                 self.spec.n_genes if genes is None else len(genes))
        if out is not None:
            _check_out(out, shape)
        return self._expression(data, library_size, n_samples, transform_batch, batch_size, out,
                                indices, genes)

    @torch.inference_mode()
    def _expression(self, data: CellData, library_size: float | str = 1e4, n_samples: int = 1,
                    transform_batch: str | None = None, batch_size: int | None = None,
                    out: np.ndarray | None = None, indices: np.ndarray | None = None,
                    genes: np.ndarray | None = None) -> np.ndarray:
        # Written batch by batch into one array: no list of blocks and no concatenation copy.
        if out is None:
            out = np.empty((data.n_obs if indices is None else len(indices),
                            self.spec.n_genes if genes is None else len(genes)), dtype=np.float32)
        start = 0
        batch_size = self._inference_batch_size(batch_size, n_samples)
        scratch = genes_t = None  # with a gene subset: all genes of a block, then the subset
        for b in self._eval_batches(data, batch_size, indices, sparse=True):
            # Counterfactual: encode with the cell's observed batch, decode as transform_batch.
            batch_index = self._transform_batch_index(b.batch_index, transform_batch)
            cov = self.module.covariates(batch_index, b.cat_covs, b.cont_covs)
            cov_observed = self.module.covariates(b.batch_index, b.cat_covs, b.cont_covs)
            m, v = self.module.encode(b.x, cov_observed)
            if n_samples > 1:
                z = m + v.sqrt() * torch.randn((n_samples, *m.shape), dtype=m.dtype,
                                                device=m.device)
            else:
                z = m
            lib = b.library if library_size == "observed" else float(library_size)
            dest = torch.from_numpy(out[start:start + len(m)])
            start += len(m)
            if genes is not None and genes_t is None:
                genes_t = torch.as_tensor(genes, device=m.device)
            if n_samples == 1 and m.device.type == "cpu" and m.dtype == torch.float32:
                # Decode straight into the output array: no intermediate cells × genes buffers
                # (with a gene subset, into one scratch block reused by every batch).
                if genes is None:
                    self.module.scaled_proportions_(z, cov, lib, dest)
                    continue
                if scratch is None:
                    scratch = torch.empty((len(m), self.spec.n_genes), dtype=m.dtype)
                block = scratch[:len(m)]
                self.module.scaled_proportions_(z, cov, lib, block)
                torch.index_select(block, 1, genes_t, out=dest)
                continue
            # μ = ℓ·ρ, so the mean over samples of μ is ℓ times the mean of ρ.
            rho = self.module.proportions(z, cov)
            if n_samples > 1:
                rho = rho.mean(0)
            if genes is not None:
                rho = rho.index_select(1, genes_t)
            # Straight into the output (from the device, one copy): no host tensor between.
            dest.copy_(rho.mul_(lib))
        return out

    def _transform_batch_index(self, batch_index: torch.Tensor, transform_batch) -> torch.Tensor:
        if transform_batch is None:
            return batch_index
        cats = self.spec.batch_categories
        if isinstance(transform_batch, (list, tuple, np.ndarray, pd.Index)):
            raise TypeError(f"transform_batch takes one batch, got {transform_batch!r}; call "
                            "once per batch (and average the results for a mean over batches).")
        if self.spec.batch_key is None:
            raise ValueError(
                f"transform_batch={transform_batch!r} needs a model trained with batch_key=; "
                "this one has none (a batch given as a categorical covariate is encoded, but "
                "not swapped by transform_batch). Train with batch_key= naming that column.")
        # written as the obs labels are (1.0 is batch "1"; "1.0" for a model saved so)
        name = _label_text(pd.Series([transform_batch]), cats)(transform_batch)
        if name not in cats:
            raise KeyError(f"transform_batch={transform_batch!r} is not a known batch; choose from {cats}.")
        return torch.full_like(batch_index, cats.index(name))

    @torch.inference_mode()
    def get_elbo(self, adata=None, indices: np.ndarray | None = None, batch_size: int = 1024,
                 seed: int | None = 0) -> float:
        """Mean per-cell ELBO in nats (higher is better; full normalised likelihood).

        Uses one posterior sample per cell, like scvi-tools' ``get_elbo``.

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None``: the training data.
        indices
            Only these cells (e.g. ``model.validation_indices``).
        batch_size
            Cells scored at a time.
        seed
            Seeds the draws of z (the caller's torch random state is left as it was), so
            the same model and cells give the same value at every call; ``None``: drawn
            from the caller's state.
        """
        self._check_trained()
        data = self._data_for(adata)
        indices = _check_indices(indices, data.n_obs)
        batch_size = check_positive_int(batch_size, "batch_size")
        with seeded(seed, self.device):  # (with a seed, the caller's state is given back)
            return evaluate(self._module_on_device(), data, indices, batch_size, self.device,
                            keep_rng=False)["elbo"]

    @torch.inference_mode()
    def get_marginal_ll(
        self, adata=None, n_samples: int = 100, indices: np.ndarray | None = None,
        batch_size: int = 256, return_per_cell: bool = False, seed: int | None = 0,
    ) -> float | np.ndarray:
        """Importance-weighted estimate of log p(x), mean per cell in nats (higher is better).

        IWAE (Burda et al. 2016) with ``n_samples`` draws from each cell's q(z|x): a lower
        bound on log p(x) that tightens as ``n_samples`` grows, and equals the ELBO in
        expectation with one.

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None``: the training data.
        n_samples
            Draws of z per cell.
        indices
            Only these cells (e.g. ``model.validation_indices``).
        batch_size
            Cells scored at a time; their samples are decoded in blocks of at most ~2²⁴
            samples × cells × genes values.
        return_per_cell
            Return the per-cell values instead of their mean.
        seed
            Seeds the draws (the caller's torch random state is left as it was), so a call
            gives the same value each time; ``None``: drawn from the caller's state.
        """
        self._check_trained()
        n_samples = check_positive_int(n_samples, "n_samples")
        data = self._data_for(adata)
        indices = _check_indices(indices, data.n_obs)
        vals = []
        # The batches' non-zeros spare the likelihood a search of each samples × cells block.
        with seeded(seed, self.device):
            for b in self._eval_batches(data, batch_size, indices, nonzero=True):
                vals.append(self.module.importance_weighted_log_px(
                    b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs, n_samples=n_samples,
                    nonzero=b.nonzero))
        per_cell = torch.cat(vals).cpu().numpy().astype(np.float64)
        return per_cell if return_per_cell else float(per_cell.mean())

    @torch.inference_mode()
    def get_kl_per_dimension(self, adata=None, indices: np.ndarray | None = None) -> pd.Series:
        """Mean KL(q(z_d|x) ‖ p(z_d)) per latent dimension in nats; near 0 means collapsed.

        Closed form for the standard normal prior; a Monte-Carlo estimate against each
        dimension's marginal for a learned (``"mog"``) prior (the same draws at every call).

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None``: the training data.
        indices
            Only these cells (row numbers or a boolean mask), e.g.
            ``model.validation_indices``; ``None``: all of them.

        Returns
        -------
        Series indexed ``z0``, ``z1``, …
        """
        self._check_trained()
        data = self._data_for(adata)
        kl = self._kl_per_dim_mean(data, _check_indices(indices, data.n_obs))
        return pd.Series(kl, index=[f"z{d}" for d in range(len(kl))], name="kl")

    def _kl_per_dim_mean(self, data: CellData, indices: np.ndarray | None = None) -> np.ndarray:
        """Mean KL per latent dimension over ``indices`` (default: all cells)."""
        total, n = None, 0
        # Under a mixture prior the KL is a Monte Carlo estimate: the same draws every call,
        # and the caller's random state left as it was.
        with seeded(0, self.device), torch.inference_mode():
            for b in self._eval_batches(data, 1024, indices, sparse=True):  # encoder only
                cov = self.module.covariates(b.batch_index, b.cat_covs, b.cont_covs)
                kl = self.module.kl_per_dim(*self.module.encode(b.x, cov))[1].sum(0)
                total = kl if total is None else total + kl
                n += b.x.shape[0]
        return (total / n).cpu().numpy()

    def sample(self, n: int, source: str = "prior", adata=None, seed: int = 0):
        """Generate ``n`` cells of counts from the model; see :func:`scvae_tools.diagnostics.sample`.

        Each generated cell takes the library size and covariates of a randomly chosen real
        cell of ``adata``; counts are drawn from p(x|z).

        Parameters
        ----------
        n
            Number of cells to generate.
        source
            ``"prior"``: z from p(z); ``"aggregated"``: from the aggregated posterior
            q(z) = mean over cells of q(z|x) (a draw from the chosen cell's own q(z|x)).
        adata
            Real cells to take libraries and covariates from; ``None``: the training data.
        seed
            Seeds every draw.

        Returns
        -------
        AnnData with counts in ``X`` and the drawn z in ``obsm["X_latent"]``.
        """
        from .diagnostics import sample

        return sample(self, n, source=source, adata=adata, seed=seed)

    # ------------------------------------------------------------------ downstream analysis
    def differential_expression(
        self,
        adata,
        groupby: str,
        group1: str | list[str] | None = None,
        group2: str | None = None,
        mode: str = "change",
        delta: float = 0.25,
        n_samples: int = 1000,
        fdr_target: float = 0.05,
        pseudocounts: float | None = None,
        batch_correction: bool = False,
        max_cells_per_group: int = 2000,
        seed: int = 0,
        batch_size: int = 1024,
        key_added: str | None = None,
    ) -> pd.DataFrame:
        """Bayesian differential expression between groups of cells.

        Compares each group's mean denoised expression (a pseudo-bulk of the decoded gene
        proportions) through its posterior: every one of ``n_samples`` replicates redraws the
        group's cells with replacement and one posterior sample of z per drawn cell. See
        :mod:`scvae_tools.differential` for the method.

        Parameters
        ----------
        adata
            AnnData with the model's genes and ``obs[groupby]``.
        groupby
            ``obs`` column defining the groups.
        group1
            Group(s) to test; ``None``: every group (but ``group2``), each on its own.
        group2
            Reference group; ``None``: all cells not in the tested group ("Rest").
        mode
            ``"change"``: P(|LFC| ≥ ``delta``) per gene; ``"vanilla"``: P(mean1 > mean2).
        delta
            Smallest log2 fold change that counts as a change (``mode="change"``).
        n_samples
            Posterior replicates per group.
        fdr_target
            Genes are called (column ``is_de_fdr_<fdr_target>``) while the posterior expected
            false discovery rate of the called set stays at or below this (``mode="change"``
            only: vanilla mode makes no calls, as in scvi-tools). Genes that
            :meth:`prepare_query_anndata` added as zeros (``var["scvae_padded"]``) are never
            called and stay out of that rate (and of ``key_added``'s ``pvals_adj``).
        pseudocounts
            ε in log2(mean + ε), on the proportion scale; ``None`` (the default) estimates
            it from genes not detected in a group: the 0.9 quantile of their largest
            posterior proportion, the level from which scvi-tools'
            ``estimate_pseudocounts_offset`` starts (scvi-tools 1.4 then divides it by the
            number of genes, which leaves almost no shrinkage). scvi-tools' own default is
            ``pseudocounts=0.0``: pass that to reproduce its log fold changes (the estimate
            shrinks those of genes barely expressed in one group).
        batch_correction
            Decode every cell under every batch and average (batch-free expression); default:
            each cell's own batch.
        max_cells_per_group
            Larger groups are subsampled to this many cells (conservative, and bounds memory).
        seed
            Seeds the subsampling, bootstrap and posterior draws.
        batch_size
            Cells decoded at a time.
        key_added
            Also store the results in ``adata.uns[key_added]`` in ``sc.tl.rank_genes_groups``'
            format, so ``sc.get.rank_genes_groups_df`` and ``sc.pl.rank_genes_groups_*`` work
            (see :func:`scvae_tools.differential.store_rank_genes_groups`). ``adata`` is not
            modified otherwise.

        Returns
        -------
        DataFrame indexed by gene, strongest evidence first, with scvi-tools' columns:
        ``proba_de``, ``proba_not_de``, ``bayes_factor`` (log odds), ``scale1``/``scale2``
        (posterior mean proportions), ``pseudocounts``, ``delta``, ``lfc_mean``/``median``/
        ``std``/``min``/``max`` (log2, positive = higher in group1), ``raw_mean1/2``,
        ``non_zeros_proportion1/2``, ``raw_normalized_mean1/2`` (counts per 1e4),
        ``is_de_fdr_<fdr_target>``, ``comparison``, ``group1``, ``group2``. With
        ``mode="vanilla"``: ``proba_m1``/``proba_m2`` instead of ``proba_de``/``proba_not_de``,
        no ``is_de_fdr_*`` column, and genes tied at the same Bayes factor (it saturates for
        clear markers) ordered by ``lfc_mean``. ``group1`` given as a list: each group once.

        Examples
        --------
        >>> de = model.differential_expression(adata, "cell_type", "B", "CD14+ Mono")
        >>> de[de["is_de_fdr_0.05"] & (de["lfc_mean"] > 0)].head()    # up in B cells
        """
        from .differential import differential_expression

        return differential_expression(
            self, adata, groupby, group1=group1, group2=group2, mode=mode, delta=delta,
            n_samples=n_samples, fdr_target=fdr_target, pseudocounts=pseudocounts,
            batch_correction=batch_correction, max_cells_per_group=max_cells_per_group,
            seed=seed, batch_size=batch_size, key_added=key_added,
        )

    @torch.inference_mode()
    def get_likelihood_parameters(
        self, adata=None, indices: np.ndarray | None = None, give_mean: bool = True,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """The parameters of p(x | z) for each cell, as scvi-tools' method of this name.

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None``: the training data.
        indices
            Only these cells (row numbers, or a boolean mask); each result has cells × genes
            float32 values, so restrict large data to the cells of interest.
        give_mean
            Decode the posterior mean of z (as denoised expression does); ``False``: one
            sample of z per cell.
        batch_size
            Cells per batch (default as for denoised expression).

        Returns
        -------
        A dict of cells × genes arrays (genes in the model's order):

        - ``"mean"``: μ = ℓ·ρ at each cell's library size, the expected counts under NB and
          Poisson; under ZINB the mean of the count part, the expected counts being
          (1 − dropout)·μ;
        - ``"dispersions"`` (NB, ZINB): the inverse dispersion θ, Var = μ + μ²/θ
          (the same for all cells with ``dispersion="gene"``, per batch with
          ``"gene-batch"``);
        - ``"dropout"`` (ZINB): the probability of an extra zero.
        """
        self._check_trained()
        data = self._data_for(adata)
        return self._likelihood_parameters(data, _check_indices(indices, data.n_obs), give_mean,
                                           batch_size)

    @torch.inference_mode()
    def _likelihood_parameters(self, data: CellData, indices: np.ndarray | None,
                               give_mean: bool, batch_size: int | None) -> dict[str, np.ndarray]:
        n = data.n_obs if indices is None else len(indices)
        keys = ["mean"] + (["dispersions"] if self.module_config.likelihood != "poisson" else [])
        keys += ["dropout"] if self.module_config.likelihood == "zinb" else []
        out = {k: np.empty((n, self.spec.n_genes), dtype=np.float32) for k in keys}
        start = 0
        for b in self._eval_batches(data, self._inference_batch_size(batch_size), indices,
                                    sparse=True):
            cov, z = self._posterior_z(b, give_mean)
            params = self.module.decode(z, b.library, cov, b.batch_index)
            rows = slice(start, start + len(z))
            start += len(z)
            out["mean"][rows] = params["mu"].cpu().numpy()
            if "dispersions" in out:  # (genes,) for per-gene θ: broadcast over the rows
                out["dispersions"][rows] = params["theta"].cpu().numpy()
            if "dropout" in out:
                out["dropout"][rows] = torch.sigmoid(params["pi_logits"]).cpu().numpy()
        return out

    @torch.inference_mode()
    def _times_no_dropout_(self, out: np.ndarray, data: CellData, batch_size: int | None) -> None:
        """``out`` (cells × genes, the model's gene order) times 1 − π, batch by batch: no
        cells × genes array of π is held (a ZINB model's expected counts)."""
        start = 0
        for b in self._eval_batches(data, self._inference_batch_size(batch_size), sparse=True):
            cov, z = self._posterior_z(b, True)
            pi_logits = self.module.decode(z, b.library, cov, b.batch_index)["pi_logits"]
            rows = torch.from_numpy(out[start:start + len(z)])
            rows.mul_(torch.sigmoid(pi_logits.neg_()).cpu())  # 1 − σ(l) = σ(−l)
            start += len(z)

    def posterior_predictive_sample(
        self, adata=None, n_samples: int = 1, gene_list: list[str] | None = None,
        batch_size: int = 256, seed: int | None = 0,
    ) -> np.ndarray:
        """Counts simulated from the fitted model for each observed cell.

        For each of ``n_samples`` replicates every cell draws z ~ q(z|x) and then counts from
        p(x|z) (NB / ZINB / Poisson) at its observed library size and covariates.

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None``: the training data.
        n_samples
            Replicates per cell.
        gene_list
            Only these genes (in this order); ``None``: all of the model's genes.
        batch_size
            Cells per minibatch.
        seed
            Seeds the draws (``None``: torch's global random state).

        Returns
        -------
        Dense float32 array of integer counts, shape (cells, genes, n_samples). Memory is
        cells × genes × n_samples × 4 bytes: use ``gene_list`` or :func:`scvae_tools.tl.ppc`
        (which streams) on large data.
        """
        from .ppc import posterior_predictive_sample

        return posterior_predictive_sample(self, adata, n_samples=n_samples, gene_list=gene_list,
                                           batch_size=batch_size, seed=seed)

    @classmethod
    def load_query(
        cls,
        reference_dir: str | os.PathLike,
        query_adata,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        train_size: float = 0.9,
        early_stopping: bool = True,
        early_stopping_patience: int = 30,
        seed: int = 0,
        device: str | torch.device = "auto",
        progress_bar: bool = True,
        eps: float = 1e-2,
        layer: str | None | _AsSaved = AS_SAVED,
    ) -> SCVAE:
        """Map a query dataset with new batches onto a saved reference model (scArches).

        The reference (saved with :meth:`save`, trained with ``batch_key``) is grown by the
        query's unseen batch (and categorical covariate) categories: new input columns in the
        first encoder and decoder layers (and new per-batch dispersions). All reference
        weights are frozen, BatchNorm keeps the reference statistics, and only the new
        columns are fine-tuned on the query cells, so query cells land in the reference's
        latent space while reference cells keep exactly their coordinates. See
        :mod:`scvae_tools.query`.

        Parameters
        ----------
        reference_dir
            Directory of the saved reference model.
        query_adata
            Query cells: the reference's genes (any order; extra genes are dropped, missing
            ones are an error) and its ``obs`` columns (``batch_key``, covariates). An
            AnnData, or the path of an .h5ad file; a file or a backed AnnData is read into
            memory (fine-tuning passes over the cells many times).
        max_epochs
            Fine-tuning epochs; default ``min(200, 20000 / n_cells · 400)``. 0 skips
            fine-tuning (the new columns keep their start: the mean of the reference batches).
        batch_size, lr, train_size, early_stopping, early_stopping_patience
            As in :meth:`train` (no KL warm-up, no weight decay).
        seed, device, progress_bar, eps
            As in :meth:`train` (``eps``: Adam's).
        layer
            Where the query keeps its counts, if not where the reference read them (as in
            :meth:`load`).

        Returns
        -------
        A trained model attached to ``query_adata``; ``model.history`` holds the fine-tuning,
        ``model.query_info`` the reference, the new categories and the fine-tuning's
        settings (saved with the model and written to ``uns[key]["query"]``, next to the
        reference's own training settings in ``"train"``). Use it like any model (latent,
        ``write_to_adata``, ``save``); it also embeds reference cells, as before.
        ``model.train(max_epochs=N, warm_start=True)`` fine-tunes the new columns further;
        :meth:`train` without ``warm_start`` would fit a new model to the query alone (it
        warns).

        Examples
        --------
        >>> reference.save("ref_model")
        >>> query_model = svt.SCVAE.load_query("ref_model", query_adata)
        >>> query_adata.obsm["X_scvae"] = query_model.get_latent_representation()
        """
        from .query import load_query

        return load_query(
            cls, reference_dir, query_adata, max_epochs=max_epochs, batch_size=batch_size, lr=lr,
            train_size=train_size, early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience, seed=seed, device=device,
            progress_bar=progress_bar, eps=eps, layer=layer,
        )

    @staticmethod
    def prepare_query_anndata(adata, reference, max_missing_fraction: float = 0.25):
        """A copy of ``adata`` with exactly the model's genes: extra genes dropped, missing
        ones added as zero counts (flagged in ``var["scvae_padded"]``), as scvi-tools'
        ``prepare_query_anndata`` but returning a new AnnData. See
        :func:`scvae_tools.query.prepare_query_anndata`.

        Parameters
        ----------
        adata
            Query cells × genes, in memory (``adata.to_memory()`` for a backed one).
        reference
            A trained :class:`SCVAE`, or the folder of one saved with :meth:`save`.
        max_missing_fraction
            Refuse when more than this share of the model's genes is missing from ``adata``.

        Examples
        --------
        >>> query = svt.SCVAE.prepare_query_anndata(query, "ref_model")
        >>> query_model = svt.SCVAE.load_query("ref_model", query)
        """
        from .query import prepare_query_anndata

        return prepare_query_anndata(adata, reference, max_missing_fraction)

    # ------------------------------------------------------------------ AnnData output
    def write_to_adata(
        self, adata, key_added: str = "scvae", layers: bool = True, batch_size: int | None = None
    ) -> None:
        """Store results in ``adata`` the scanpy way.

        Writes ``obsm[f"X_{key_added}"]`` (latent means), ``layers[f"{key_added}_denoised"]``
        (expression per 1e4 counts), ``layers[f"{key_added}_expected"]`` (expected counts at
        each cell's library: ℓ·ρ, times 1 − π under ZINB) and ``uns[key_added]`` (settings,
        version, history, and under ``"layers"`` the layers written). Pass ``layers=False``
        to skip the two dense cells × genes layers on large data; layers an earlier model
        wrote under the same key are then removed (with a warning), not left beside this
        model's latent.

        The layers are on a linear scale (like ``normalize_total``'s output before
        ``log1p``): ``log1p`` a copy before plots that expect log data. Do not run scanpy's
        ``rank_genes_groups`` on them: its fold changes assume log data, and denoised values
        carry no sampling noise, so its p-values are far too small (on pbmc3k, 1,508 of
        2,000 genes at p_adj < 1e-10 for B vs the rest, against 64 on log-normalised X).
        Use :meth:`differential_expression` (``key_added=`` writes scanpy's format).
        The AnnData must have the model's genes (in any order, extra genes are not allowed
        for layers since layers must match ``adata.var``).

        Everything is computed and checked for NaN/inf before anything is written, so on an
        error ``adata`` is left untouched.

        A backed AnnData (``backed="r"``) is read in chunks; the latent and ``uns`` go to
        its in-memory ``obsm``/``uns`` (save with ``svt.backed.write_h5ad_backed(adata,
        new_path)``, which copies X on disk instead of reading it), and the
        dense layers are refused when they would exceed 1 GiB (pass ``layers=False``).

        Parameters
        ----------
        adata
            The AnnData to write into, with the model's genes.
        key_added
            Prefix of the keys written (``X_<key>``, ``<key>_denoised``, ``<key>_expected``,
            ``uns[<key>]``).
        layers
            Write the two dense layers (default); ``False``: the latent and ``uns`` only.
        batch_size
            Cells per batch for the latent and the layers (default as in
            :meth:`get_latent_representation`).
        """
        self._check_trained()
        check_key_added(key_added)
        check_writable(adata, layers, self.spec.n_genes)
        data = self._data_for(adata)
        out_obsm = {f"X_{key_added}": self._latent(data, batch_size=batch_size)}
        out_layers = {}
        if layers:
            order = _gene_order(adata.var_names, self.spec.var_names)
            den = self._expression(data, 1e4, batch_size=batch_size)
            # μ = ℓ·ρ: expected counts are the denoised values rescaled to each cell's library,
            # so one decoding pass serves both layers.
            factor = torch.from_numpy(np.asarray(data.library, dtype=np.float32) / np.float32(1e4))
            exp = np.empty_like(den)  # the same product as numpy's, on torch's threads
            torch.mul(torch.from_numpy(den), factor[:, None], out=torch.from_numpy(exp))
            if self.module_config.likelihood == "zinb":  # E[x] = (1 − π)·μ: extra zeros
                self._times_no_dropout_(exp, data, batch_size)
            if order is not None:  # adata lists the genes in another order
                # take along an axis: ~6x faster than den[:, order] on a C-ordered matrix
                den, exp = np.take(den, order, axis=1), np.take(exp, order, axis=1)
            out_layers = {f"{key_added}_denoised": den, f"{key_added}_expected": exp}
        for name, arr in {**out_obsm, **out_layers}.items():
            # A NaN or inf anywhere makes its row's sum non-finite (float64: no overflow),
            # and the sums need no cells × genes mask: a third of the time on large layers.
            if not np.isfinite(arr.sum(axis=1, dtype=np.float64)).all():
                raise ValueError(
                    f"The model produced NaN/inf values for {name!r}; nothing was written. "
                    "Its weights or this AnnData's counts are broken (e.g. extreme values): "
                    "check the input, or retrain."
                )
        record = self._uns_record()
        record["layers"] = np.asarray(list(out_layers), dtype=object)  # which are this model's
        # An earlier model's layers under this key: those its record lists (older records
        # list none: then the two names, if a model's record is there at all). A user's own
        # layer of that name, with no model record, is kept.
        earlier = adata.uns.get(key_added)
        if not (isinstance(earlier, dict) and "version" in earlier):
            theirs = []
        elif "layers" in earlier:
            theirs = [str(n) for n in earlier["layers"]]
        else:
            theirs = [f"{key_added}_denoised", f"{key_added}_expected"]
        stale = [n for n in theirs if n not in out_layers and n in adata.layers]
        adata.obsm.update(out_obsm)
        for name, arr in out_layers.items():
            adata.layers[name] = arr
        for name in stale:
            del adata.layers[name]
        if stale:
            warnings.warn(f"Removed layers {stale}: an earlier model wrote them under "
                          f"key_added={key_added!r}, and they would not match this one's "
                          "latent (layers=False writes none).", UserWarning, stacklevel=2)
        adata.uns[key_added] = record

    def _restored_epoch(self) -> int | None:
        """The epoch whose weights the model holds (``history.attrs``), or None."""
        epoch = self.history.attrs.get("restored_epoch")
        return None if epoch is None else int(epoch)

    def _uns_record(self) -> dict[str, Any]:
        """Settings, versions and history in h5ad-writable form (no None values)."""
        hist = {c: self.history[c].to_numpy() for c in self.history.columns}
        return _drop_none({
            "version": __version__,
            "torch_version": str(torch.__version__),
            "model": self.module_config.to_dict(),
            "data": self.spec.to_dict() | {"var_names": np.asarray(self.spec.var_names, dtype=object)},
            "beta": self.beta,
            "free_bits": self.free_bits,
            "train": self.train_config.to_dict() if self.train_config else {},
            "seed": self.train_config.seed if self.train_config else None,
            "torch_threads": self.train_threads,
            "versions": package_versions(),
            "history": hist,
            "restored_epoch": self._restored_epoch(),
            "query": self.query_info,
        })

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Save to a directory: ``config.json``, ``model.pt`` (state dict), ``history.csv``.

        ``config.json`` also records the last training's held-out cells, which :meth:`load`
        gives back as ``validation_indices`` when it attaches the same cells.

        The directory is written to a temporary sibling and renamed into place, so a crash
        mid-save never leaves a half-written model (and with ``overwrite`` the previous one
        survives until the new one is complete).

        Parameters
        ----------
        path
            The model's folder: new, empty, or (with ``overwrite``) a model saved before.
        overwrite
            Replace a model saved at ``path``. Only a saved model is replaced: a folder
            holding anything else is refused (see :func:`check_save_target`).
        """
        self._check_trained()
        # "." or "..": a folder with a name and a parent. A symlink ("latest" -> "run_3"):
        # its target is the model replaced (the link was renamed aside before, and replaced
        # by a folder, leaving the target as it was and later saves failing).
        path = Path(path).resolve()
        check_save_target(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A private sibling, created with the user's umask (mkdtemp's would give rwx------).
        tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            self._write_model_files(tmp)
            replace_dir(tmp, path)  # atomic: the old model survives any failure before this
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_model_files(self, tmp: Path) -> None:
        config = {
            "format": "scvae_tools.model/1",
            "version": __version__,
            "torch_version": str(torch.__version__),
            "module": self.module_config.to_dict(),
            "data": self.spec.to_dict(),
            "beta": self.beta,
            "free_bits": self.free_bits,
            "train": self.train_config.to_dict() if self.train_config else None,
            "seed": self.train_config.seed if self.train_config else None,
            "torch_threads": self.train_threads,
            "versions": package_versions(),
            # the epoch whose weights these are (a CSV cannot carry the history's attrs)
            "restored_epoch": self._restored_epoch(),
        }
        if self.query_info is not None:  # a mapped query: how it was mapped
            config["query"] = self.query_info
        if self.validation_indices is not None and self._data is not None:
            # Which cells were held out, for load() to give back with the same cells: the
            # held-out ELBO of a loaded model is otherwise easily taken over all cells. A
            # bit per cell in config.json (no new file: a folder of the previous version's
            # files stays one that it can overwrite).
            n = int(self._data.n_obs)
            mask = np.zeros(n, dtype=bool)
            mask[self.validation_indices] = True
            config["split"] = {"n_obs": n, "cells": cells_digest(self._data.obs_names),
                               "validation": base64.b64encode(np.packbits(mask)).decode()}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        torch.save(state, tmp / WEIGHTS_FILE)
        self.history.to_csv(tmp / HISTORY_FILE, index=False)

    @classmethod
    def load(cls, path: str | os.PathLike, adata=None, device: str | torch.device = "auto",
             layer: str | None | _AsSaved = AS_SAVED) -> SCVAE:
        """Load a saved model; attach ``adata`` (checked against the saved genes) if given.

        Weights are read with ``torch.load(weights_only=True)``: no code from the file runs,
        and a file that would need to run code is refused with a ``ValueError``.
        ``config.json`` is validated field by field (types, ranges, consistency) and the
        weights must match it and be finite; any problem raises a ``ValueError`` naming it.

        Parameters
        ----------
        path
            The folder :meth:`save` wrote.
        adata
            AnnData to attach (its genes are checked against the saved ones, and reordered by
            name when needed); ``None``: attach one later through the methods' ``adata=``.
            When its cells are those the model was saved with (the same names in the same
            order), ``train_indices`` and ``validation_indices`` are the saved split, so
            ``get_elbo(indices=model.validation_indices)`` scores the held-out cells again;
            otherwise they are ``None``.
        device
            Where the model runs: ``"auto"`` (CUDA, else MPS, else the CPU), or a torch
            device.
        layer
            Where this model reads counts from now on: ``adata.layers[layer]``, or ``X``
            with ``None``. By default where it read them in training (``model.spec.layer``):
            pass this for data that keep their counts elsewhere (a model trained on
            ``layers["counts"]``, new files with counts in ``X``). It is saved with the model.
        """
        path = Path(path)
        if path.is_file():
            raise FileNotFoundError(f"{path} is a file; a saved SCVAE is a folder: pass "
                                    f"{path.parent if path.name == CONFIG_FILE else 'its folder'}.")
        if not (path / CONFIG_FILE).exists():
            old = path.with_name(f".{path.name}.old")
            hint = (f" A save was interrupted while swapping folders: the previous model is in "
                    f"{old}; rename it to {path.name}." if (old / CONFIG_FILE).exists() else "")
            raise FileNotFoundError(f"No saved SCVAE at {path} ({CONFIG_FILE} missing).{hint}")
        config_file = path / CONFIG_FILE
        # A regular file of sane size: a FIFO would block, /dev/zero fill the memory.
        if not config_file.is_file() or config_file.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{config_file} is not a config.json that scvae_tools writes (not "
                             "a regular file, or over 64 MB); re-save the model or restore it "
                             "from a backup.")
        try:
            raw = json.loads(config_file.read_text())
        # RecursionError: nesting thousands deep; ValueError: e.g. an integer of 5,000 digits
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise ValueError(f"{config_file} is not valid JSON ({type(err).__name__}: "
                             f"{str(err)[:200]}); the file is corrupted: re-save the model or "
                             "restore it from a backup.") from None
        config = validate_model_config(raw, str(path / CONFIG_FILE))
        if layer is not AS_SAVED:
            if layer is not None and not isinstance(layer, str):
                raise TypeError(f"layer must be a layer name or None (X), got {layer!r}.")
            if (layer is not None and adata is not None and hasattr(adata, "layers")
                    and layer not in adata.layers):  # not "the model was trained on" it
                raise KeyError(f"layer={layer!r} (given to SCVAE.load) is not a layer of this "
                               f"AnnData (available: {list(adata.layers)}); name the layer "
                               "that holds its raw counts, or layer=None for adata.X.")
            config["data"].layer = layer
        model = cls.__new__(cls)
        model.spec = config["data"]
        model.module_config = config["module"]
        model.beta = config["beta"]
        model.free_bits = config["free_bits"]
        _check_weights_fit(model.module_config, path / WEIGHTS_FILE)
        # Its initial weights are replaced by the saved ones: drawing them must not move
        # the caller's random state.
        with rng_kept(torch.device("cpu")):
            model.module = VAE(model.module_config)
        state = safe_torch_load(path / WEIGHTS_FILE, "model weights")
        if model.module.log_theta is None and isinstance(state, dict):
            state.pop("log_theta", None)  # earlier versions gave Poisson models an unused θ
        state = check_state_dict(state, str(path / WEIGHTS_FILE),
                                 reference=model.module.state_dict(), against=CONFIG_FILE)
        model.module.load_state_dict(state)  # names, shapes and dtypes checked just above
        model.device = resolve_device(device)
        model.module.to(model.device).eval()
        model.history = _read_history(path / HISTORY_FILE)
        restored = raw.get("restored_epoch")
        if isinstance(restored, int) and not isinstance(restored, bool) and restored >= 0:
            model.history.attrs["restored_epoch"] = restored
        model.train_config = config["train"]
        threads = raw.get("torch_threads")
        model.train_threads = threads if isinstance(threads, int) and threads > 0 else None
        model.train_indices = model.validation_indices = None
        query = raw.get("query")
        if query is not None and not _query_info_ok(query, model.spec):
            raise ValueError(f"{config_file}: 'query' is not the record of a reference mapping "
                             "(new_categories per batch or covariate key the model knows); "
                             "the file was edited or corrupted. Re-save the model.")
        model.query_info = query
        model.loaded_from = str(path)
        model.is_trained = True
        model._data = None if adata is None else make_cell_data(adata, model.spec, trained=True)
        model._restore_split(raw.get("split"), str(path / CONFIG_FILE))
        return model

    def _restore_split(self, split: Any, source: str) -> None:
        """``train_indices`` / ``validation_indices`` as saved, when the attached cells are
        the ones the model was saved with (same names in the same order); else left None."""
        data = self._data
        if (data is None or not isinstance(split, dict) or split.get("n_obs") != data.n_obs
                or split.get("cells") != cells_digest(data.obs_names)):
            return
        n = data.n_obs
        try:
            bits = np.frombuffer(base64.b64decode(split["validation"], validate=True), np.uint8)
            if len(bits) != (n + 7) // 8:
                raise ValueError(f"{len(bits) * 8} bits for {n} cells")
        except (KeyError, TypeError, ValueError) as err:  # binascii.Error is a ValueError
            raise ValueError(f"{source}: 'split.validation' is not a bit per cell ({err}); "
                             "delete the 'split' entry (only validation_indices is lost) or "
                             "re-save the model.") from None
        mask = np.unpackbits(bits, count=n).astype(bool)
        self.validation_indices = np.flatnonzero(mask)
        self.train_indices = np.flatnonzero(~mask)


MAX_CONFIG_BYTES = 64 << 20


def _check_weights_fit(module_config, weights: Path) -> None:
    """Refuse a config.json whose architecture needs far more memory than the weights file
    holds (n_latent = 10⁹ would allocate 32 GB before the weights are compared): it is
    built first on the meta device, which allocates nothing."""
    with torch.device("meta"), rng_kept(torch.device("cpu")):
        planned = VAE(module_config)
    need = sum(t.numel() * t.element_size() for t in planned.state_dict().values())
    have = weights.stat().st_size if weights.is_file() else 0
    if have and need > 2 * have + (1 << 20):
        raise ValueError(
            f"{weights.parent / CONFIG_FILE} describes a model of {need / 1e6:,.0f} MB of "
            f"weights, but {weights.name} holds {have / 1e6:,.1f} MB: the two files do not "
            "belong together (or config.json was edited). Re-save the model.")


def _query_info_ok(query: Any, spec: DataSpec) -> bool:
    """A saved query record names, per batch or covariate key of the model, new categories
    it knows (what warm-start fine-tuning rebuilds its masks from)."""
    if not isinstance(query, dict) or not isinstance(query.get("new_categories"), dict):
        return False
    # keyed as query.py records them: "batch", and "cat:<key>" per categorical covariate
    known = {"batch": spec.batch_categories, **{
        f"cat:{k}": v for k, v in spec.categorical_covariate_categories.items()}}
    return all(k in known and isinstance(v, list) and set(map(str, v)) <= set(known[k])
               for k, v in query["new_categories"].items())


def _read_history(path: Path) -> pd.DataFrame:
    """The saved training history; an unreadable one is reported and left out, since the
    model itself does not need it."""
    if not path.is_file() or path.stat().st_size <= 1:
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        warnings.warn(f"{path} could not be read ({type(err).__name__}: {str(err)[:120]}); "
                      "the model is loaded without its training history.", UserWarning,
                      stacklevel=3)
        return pd.DataFrame()


def default_inference_batch_size(n_genes: int, n_samples: int = 1) -> int:
    """Cells per inference batch by default: ~2²³ cells × genes × samples values per block
    (32 MB of float32), between 1,024 and 8,192 cells."""
    return int(min(8192, max(1024, (1 << 23) // (n_genes * max(1, int(n_samples))))))


def check_h5ad_key(key_added) -> None:
    """A ``key_added`` that an .h5ad file can hold: a non-empty string without '/'."""
    if not isinstance(key_added, str) or not key_added.strip():
        raise ValueError(f"key_added must be a non-empty string (e.g. 'scvae'), got {key_added!r}.")
    if "/" in key_added:  # anndata cannot read such keys back from an .h5ad
        raise ValueError(f"key_added must not contain '/' (an .h5ad group separator), got "
                         f"{key_added!r}; e.g. key_added={key_added.replace('/', '_')!r}.")


def check_key_added(key_added) -> None:
    """``key_added`` names the results (``obsm[f"X_{key_added}"]``, …): refuse what would
    write under an empty or doubled name, before any training is spent."""
    check_h5ad_key(key_added)
    if key_added.startswith("X_"):  # scanpy's key_added is sometimes the obsm key itself
        raise ValueError(
            f"key_added names the results, not the obsm key: {key_added!r} would write "
            f"obsm['X_{key_added}'] and layers['{key_added}_denoised']. Pass "
            f"key_added={key_added[2:]!r} for obsm[{key_added!r}].")


def check_writable(adata, layers: bool, n_genes: int, caller: str = "write_to_adata") -> None:
    """``write_to_adata`` needs an AnnData object, and bounded dense layers for backed data
    (also checked by ``svt.tl.scvae``, the ``caller`` then, before it trains)."""
    if not isinstance(layers, (bool, np.bool_)):  # layers="counts" meant layer="counts"
        raise TypeError(
            f"{caller}: layers= is True or False (write the dense denoised/expected layers or "
            f"not), got {layers!r}. The layer the counts are read from is layer='name' "
            "(singular), given to SCVAE or svt.tl.scvae.")
    if not isinstance(adata, (str, os.PathLike)) and not all(
            hasattr(adata, a) for a in ("obsm", "uns", "var_names")):
        raise TypeError(f"{caller} writes its results into an AnnData (e.g. the one the model "
                        f"was trained on), got {type(adata).__name__}.")
    if isinstance(adata, (str, os.PathLike)):
        raise ValueError(
            f"{caller} writes its results into an AnnData object, not a path; open the file with "
            "`adata = anndata.read_h5ad(path, backed='r')`, pass that, then save it with "
            "`svt.backed.write_h5ad_backed(adata, out_path)` (which copies X on disk)."
        )
    if layers and is_backed(adata) and 2 * adata.n_obs * n_genes * 4 > DENSE_LIMIT_BYTES:
        gb = 2 * adata.n_obs * n_genes * 4 / 1e9
        raise ValueError(
            f"The dense denoised/expected layers of this backed AnnData would take {gb:.1f} GB "
            "of memory; pass layers=False (the latent and uns are still written), or compute "
            "expression for subsets with model.get_normalized_expression(adata[idx].to_memory())."
        )


def _dist_context(strategy: str | None, device):
    """The process group for ``strategy="ddp"`` (``None`` for one process)."""
    if strategy is None:
        return None
    if strategy != "ddp":
        raise ValueError(f"strategy must be None or 'ddp', got {strategy!r}.")
    from .distributed import DistContext

    return DistContext.from_env(device)


def _warn_if_many_empty_genes(data: CellData) -> None:
    """Genes without a single count cost every step as much as any other and teach the
    model nothing (e.g. pbmc3k's 32,738 genes, 16,159 of them never detected)."""
    empty = data.genes_without_counts()
    n_genes = data.X.shape[1]
    if empty >= 0.1 * n_genes:
        warnings.warn(
            f"{empty:,} of {n_genes:,} genes have no counts in any cell; they slow training "
            "and inference without informing the model. Drop them first, e.g. "
            "`sc.pp.filter_genes(adata, min_cells=1)`, or select variable genes.",
            UserWarning, stacklevel=3)


def _whole(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int (Python or NumPy integer), or a ``TypeError``/``ValueError``
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a whole number, got {value!r}.")
    if value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}.")
    return int(value)


def check_positive_int(value, name: str) -> int:
    """``value`` as an int, or a ``ValueError`` naming ``name`` if it is not a positive one."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_indices(indices, n_obs: int) -> np.ndarray | None:
    """``indices`` (row numbers, or a boolean mask over the cells) as int64 row numbers
    within ``n_obs`` cells, or ``None`` for all cells."""
    if indices is None:
        return None
    idx = np.asarray(indices)
    if idx.dtype == bool:  # a mask over the cells, as scanpy users write them
        if idx.shape != (n_obs,):
            raise ValueError(f"A boolean mask as indices needs one value per cell ({n_obs}), "
                             f"got shape {idx.shape}.")
        idx = np.flatnonzero(idx)
    if idx.size == 0:  # an ELBO of no cells would read 0.0, a perfect fit
        raise ValueError("indices is empty: there are no cells to evaluate (e.g. "
                         "model.validation_indices after train(train_size=1.0)).")
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise ValueError(f"indices must be a 1-D array of row numbers, got shape {idx.shape} "
                         f"and dtype {idx.dtype}.")
    if idx.min() < 0 or idx.max() >= n_obs:
        raise ValueError(f"indices must lie in [0, {n_obs}) for these {n_obs} cells; got "
                         f"values from {idx.min()} to {idx.max()}.")
    return idx.astype(np.int64, copy=False)


def _check_out(out, shape: tuple[int, int]) -> None:
    """Refuse an ``out=`` array that the batches could not be written into as they are."""
    problems = []
    if not isinstance(out, np.ndarray):
        problems.append(f"it is a {type(out).__name__}, not a numpy array")
    else:
        if out.shape != shape:
            problems.append(f"its shape is {out.shape}, not (cells, genes) = {shape}")
        if out.dtype != np.float32:
            problems.append(f"its dtype is {out.dtype}, not float32")
        if not out.flags.c_contiguous:
            problems.append("it is not C-contiguous")
        if not out.flags.writeable:
            problems.append("it is read-only")
    if problems:
        raise ValueError(f"out= cannot take the result: {'; '.join(problems)}. Pass "
                         f"np.empty({shape}, dtype=np.float32), or a memory-mapped array of "
                         "that shape and dtype (np.lib.format.open_memmap).")


def _gene_order(have: pd.Index, want: list[str]) -> np.ndarray | None:
    """Column order that maps the model's gene order onto ``have``; None when they agree
    (the layers are then stored as computed, without a reordered copy)."""
    if [str(v) for v in have] == list(want):
        return None
    if len(have) != len(want):
        raise ValueError(
            f"write_to_adata with layers=True needs exactly the model's {len(want)} genes, "
            f"the AnnData has {len(have)}. Subset it with `adata[:, model.var_names]` (for a "
            "backed AnnData: `adata[:, model.var_names].to_memory()`, or keep the file and "
            "pass layers=False) or pass layers=False."
        )
    return pd.Index(want).get_indexer([str(v) for v in have])


def _drop_none(d):
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, (list, tuple)):
        return [_drop_none(v) for v in d if v is not None]
    return d
