"""Reference mapping (scArches-style architecture surgery).

A reference model was trained with ``batch_key`` (and possibly categorical covariates).
A query AnnData brings new batch categories the reference has never seen. Surgery:

1. The covariate one-hot vector grows by the new categories, so the first linear layer
   of the encoder (input: log1p counts + covariates) and of the decoder (input: z +
   covariates) gets new input columns; with ``dispersion="gene-batch"`` the per-batch
   inverse dispersion gets new columns too.
2. Every reference weight is copied and **frozen**; BatchNorm layers stay in evaluation
   mode (their running statistics are the reference's). Only the new columns are trained,
   through gradient masks, on the query cells' ELBO.

Because nothing the reference cells use changes, reference cells keep exactly their
latent coordinates, and query cells are encoded into that same latent space: labels can
be transferred by nearest neighbours (Lotfollahi et al. 2022, *Nat. Biotechnol.*).
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from .adapter import (
    AS_SAVED,
    CellData,
    DataSpec,
    _AsSaved,
    _check_not_empty,
    gene_positions,
    padded_genes,
)
from .devices import accumulator_dtype, seeded
from .module import VAE, ModuleConfig
from .train import (
    DISPERSION_LR_FACTOR,
    TrainConfig,
    _LoopState,
    _roll_back,
    _row_finite,
    _set_lr,
    _snapshot,
    _StepGuard,
    _weights_finite,
    check_patience,
    check_positive_finite,
    epoch_row,
    evaluate,
    field_max_epochs,
    nonzero_option,
    split_indices,
    validation_batch_size,
    warn_if_no_validation,
)

if TYPE_CHECKING:
    from .model import SCVAE

_FIRST_LAYERS = ("encoder.body.0.weight", "decoder.body.0.weight")


def _cov_labels(spec: DataSpec, cfg: ModuleConfig) -> list[tuple[str, str]]:
    """Names of the covariate one-hot / continuous columns, in the module's order."""
    labels: list[tuple[str, str]] = []
    if cfg.n_batch > 1:
        labels += [("batch", c) for c in spec.batch_categories]
    for key in spec.categorical_covariate_keys:
        labels += [(f"cat:{key}", c) for c in spec.categorical_covariate_categories[key]]
    labels += [("cont", k) for k in spec.continuous_covariate_keys]
    return labels


def _extended_spec(ref: DataSpec, query_adata) -> tuple[DataSpec, dict[str, list[str]]]:
    """The reference spec with the query's unseen categories appended; and what was added."""
    keys = ([ref.batch_key] if ref.batch_key else []) + list(ref.categorical_covariate_keys)
    for key in [*keys, *ref.continuous_covariate_keys, *([ref.size_factor_key] if ref.size_factor_key else [])]:
        if key not in query_adata.obs.columns:
            what = ("the cells' size factors" if key == ref.size_factor_key else
                    "the cells' covariate values" if key in ref.continuous_covariate_keys
                    else "the cells' batch / covariate labels")
            raise KeyError(
                f"The query AnnData lacks obs[{key!r}], which the reference model was set up "
                f"with. Add the column ({what}) first."
            )
    spec = copy.deepcopy(ref)
    added: dict[str, list[str]] = {}
    from .adapter import _categories  # the same category rules as at set-up

    if ref.batch_key:
        new = [c for c in _categories(query_adata.obs, ref.batch_key, ref.batch_categories)
               if c not in ref.batch_categories]
        spec.batch_categories = [*ref.batch_categories, *new]
        added["batch"] = new
    for key in ref.categorical_covariate_keys:
        known = ref.categorical_covariate_categories[key]
        new = [c for c in _categories(query_adata.obs, key, known) if c not in known]
        spec.categorical_covariate_categories[key] = [*known, *new]
        added[f"cat:{key}"] = new
    return spec, added


def _transplant(ref_module: VAE, ref_spec: DataSpec, new_module: VAE, new_spec: DataSpec,
                new_labels: set[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Copy reference weights into the grown module; return gradient masks (1 = trainable,
    :func:`_masks`).

    New covariate columns start at the mean of the reference's columns for the same
    covariate (an 'average batch'), or at zero when the reference had none.
    """
    ref_cfg, new_cfg = ref_module.cfg, new_module.cfg
    old_labels, labels = _cov_labels(ref_spec, ref_cfg), _cov_labels(new_spec, new_cfg)
    old_pos = {lab: i for i, lab in enumerate(old_labels)}
    ref_state = ref_module.state_dict()
    state = new_module.state_dict()
    for name, new_t in state.items():
        old_t = ref_state[name]
        if name in _FIRST_LAYERS:
            n_front = ref_cfg.n_genes if name.startswith("encoder") else ref_cfg.n_latent
            w = torch.zeros_like(new_t)
            w[:, :n_front] = old_t[:, :n_front]
            for j, lab in enumerate(labels):
                col = n_front + j
                if lab in old_pos:
                    w[:, col] = old_t[:, n_front + old_pos[lab]]
                else:
                    siblings = [n_front + i for l2, i in old_pos.items() if l2[0] == lab[0]]
                    if siblings:
                        w[:, col] = old_t[:, siblings].mean(1)
            state[name] = w
        elif name == "log_theta" and new_cfg.dispersion == "gene-batch":
            w = new_t.clone()
            n_old = old_t.shape[1]
            w[:, :n_old] = old_t
            for j in range(n_old, w.shape[1]):
                w[:, j] = old_t.mean(1)
            state[name] = w
        else:
            if old_t.shape != new_t.shape:
                raise RuntimeError(f"Unexpected shape change in {name}: {tuple(old_t.shape)} → {tuple(new_t.shape)}.")
            state[name] = old_t.clone()
    new_module.load_state_dict(state)
    return _masks(new_module, new_spec, new_labels)


def _query_train_mode(module: nn.Module) -> None:
    """Training mode (dropout on) but BatchNorm frozen with the reference's statistics."""
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def load_query(
    cls: type[SCVAE],
    reference_dir: str | os.PathLike,
    query_adata,
    max_epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    eps: float = 1e-2,
    train_size: float = 0.9,
    early_stopping: bool = True,
    early_stopping_patience: int = 30,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress_bar: bool = True,
    layer: str | None | _AsSaved = AS_SAVED,
) -> SCVAE:
    """Map query cells onto a saved reference; see :meth:`SCVAE.load_query`."""
    from .model import _whole

    # As train() checks them: a fractional or negative epoch count, a zero batch or lr
    # were truncated, taken as they were or failed deep in the loop.
    max_epochs = None if max_epochs is None else _whole(max_epochs, "max_epochs", minimum=0)
    batch_size = _whole(batch_size, "batch_size", minimum=2)
    early_stopping_patience = _whole(early_stopping_patience, "early_stopping_patience",
                                     minimum=0)
    seed = _whole(seed, "seed", minimum=0)
    check_positive_finite(lr, "lr")
    check_positive_finite(eps, "eps")
    if isinstance(query_adata, (str, os.PathLike)):
        query_adata = ad.read_h5ad(query_adata)
    elif getattr(query_adata, "isbacked", False):
        query_adata = query_adata.to_memory()
    check_patience(early_stopping, early_stopping_patience)
    reference = cls.load(reference_dir, adata=None, device="cpu", layer=layer)
    ref_spec, ref_cfg = reference.spec, reference.module_config
    if ref_spec.batch_key is None and not ref_spec.categorical_covariate_keys:
        raise ValueError(
            "The reference model was trained without batch_key (or categorical covariates), "
            "so there are no batch inputs to extend. Embed the query with the reference as it is "
            "(`SCVAE.load(reference_dir, query_adata)`; on the command line, `apply` without "
            "--query), or retrain the reference with batch_key=."
        )
    new_spec, added = _extended_spec(ref_spec, query_adata)
    new_cfg = ModuleConfig(**{**ref_cfg.to_dict(), "n_batch": new_spec.n_batch,
                              "n_cats_per_cov": new_spec.n_cats_per_cov})
    data = CellData(query_adata, new_spec, trained=True)  # checks genes, counts; names the fix
    with seeded(seed, torch.device("cpu")):  # the caller's random state is given back
        module = VAE(new_cfg)
    new_labels = {(k, c) for k, cats in added.items() for c in cats}
    masks = _transplant(reference.module, ref_spec, module, new_spec, new_labels)

    # A shallow copy of the loaded reference keeps every attribute `load` sets; the parts
    # that change are replaced (the reference's own module stays untouched).
    model = copy.copy(reference)
    model.spec, model.module_config, model.module = new_spec, new_cfg, module
    model.train_indices = model.validation_indices = None
    model.is_trained = True
    model._data = data
    model.device = _resolve(device)
    n_epochs = min(200, field_max_epochs(data.n_obs)) if max_epochs is None else int(max_epochs)
    if not new_labels:
        n_epochs = 0  # nothing to fine-tune: the record says so
    model.query_info = {
        "reference_dir": os.path.abspath(reference_dir),
        "new_categories": {k: v for k, v in added.items() if v},
        "settings": {"max_epochs": n_epochs, "batch_size": batch_size, "lr": lr, "eps": eps,
                     "train_size": train_size, "early_stopping": early_stopping,
                     "early_stopping_patience": early_stopping_patience, "seed": seed},
    }
    if not new_labels or n_epochs == 0:
        # Nothing new to learn (all query categories known): the reference maps it as it is.
        model.history = pd.DataFrame()
        module.to(model.device).eval()
        return model
    train_idx, val_idx = split_indices(data.n_obs, train_size, seed)
    with seeded(seed, model.device):
        model.history = _fine_tune(module, data, masks, train_idx, val_idx, n_epochs, batch_size,
                                   lr, eps, model.beta, model.free_bits, early_stopping,
                                   early_stopping_patience, seed, model.device, progress_bar)
    model.train_indices, model.validation_indices = train_idx, val_idx
    model.train_threads = torch.get_num_threads()
    return model


def prepare_query_anndata(adata, reference, max_missing_fraction: float = 0.25):
    """A copy of ``adata`` with exactly the reference model's genes, in the model's order.

    Genes the model does not know are dropped; genes the query lacks are added as zero
    counts, in ``X`` and in every layer, and flagged in ``var["scvae_padded"]``. The result
    can go to :meth:`SCVAE.load_query`, :meth:`SCVAE.load` or any evaluation call.
    ``obs``, ``obsm``, ``obsp`` (e.g. a neighbour graph that ``uns["neighbors"]`` names),
    ``uns``, ``raw`` and the name of the ``var`` index are copied; ``varm`` and ``varp``
    (gene × gene or gene × component matrices that zeros cannot extend) are left out.
    ``adata`` itself is not changed; genes it already flags as padded (a query prepared
    before) stay flagged, and count as missing. ``SCVAE.train`` refuses cells with padded genes
    (except a query model's fine-tuning): it would learn the padded genes as never
    expressed.

    The encoder reads a padded gene as "not detected" in every query cell, so the more
    genes are padded, the more the query's latent can shift: a warning gives the count,
    and more than ``max_missing_fraction`` of the model's genes missing is refused (with
    almost none shared, the usual cause is other gene identifiers, e.g. Ensembl IDs
    against symbols). On synthetic data with four cell types (150 genes), label transfer
    to the padded query kept 100% accuracy with 8 genes (5%) missing, and fell to 74% with
    30 (20%) and 26% with 60 (40%).

    Parameters
    ----------
    adata
        Query cells × genes, in memory (``adata.to_memory()`` for a backed one).
    reference
        A trained :class:`SCVAE`, or the folder of one saved with :meth:`SCVAE.save`.
    max_missing_fraction
        Refuse when more than this share of the model's genes is missing from ``adata``.
    """
    from .model import SCVAE  # imported here: model.py imports this module in its methods

    if isinstance(reference, SCVAE):
        genes = list(reference.spec.var_names)
    else:
        genes = list(SCVAE.load(reference, device="cpu").spec.var_names)
    if getattr(adata, "isbacked", False):
        raise ValueError("prepare_query_anndata needs the query in memory: pass "
                         "adata.to_memory().")
    _check_not_empty(adata)
    have = pd.Index([str(v) for v in adata.var_names])
    pos = gene_positions(have.tolist(), genes)  # -1: a gene the query lacks
    # Genes an earlier call padded are zeros, not counts: they stay flagged (and missing),
    # or preparing a prepared query again would pass them off as measured.
    padded = (pos < 0) | np.isin(genes, padded_genes(adata.var, genes))
    missing = int(padded.sum())
    if missing > max_missing_fraction * len(genes):
        raise ValueError(
            f"The query lacks {missing} of the model's {len(genes)} genes (e.g. "
            f"{[genes[j] for j in np.flatnonzero(padded)[:5]]}; the query has e.g. "
            f"{have[:5].tolist()}): more than max_missing_fraction={max_missing_fraction}. "
            "Check that both use the same gene identifiers (symbols or Ensembl IDs) and "
            "species; if that many genes are truly missing, the latent of these cells would "
            "shift a lot (pass a larger max_missing_fraction, on the command line "
            "--max-missing-fraction, to go on anyway).")
    if missing:
        warnings.warn(
            f"{missing} of the model's {len(genes)} genes ({missing / len(genes):.0%}) are "
            "missing from the query and were added as zero counts; the encoder reads them as "
            "not detected, which can shift the query's latent.", UserWarning, stacklevel=3)
    present = np.flatnonzero(pos >= 0)
    # One-hot selection: query gene pos[j] → model gene j; missing genes get empty columns.
    select = sp.csr_matrix((np.ones(present.size), (pos[present], present)),
                           shape=(len(have), len(genes)))

    def reindexed(M):
        if sp.issparse(M):
            out = (sp.csr_matrix(M) @ select.astype(M.dtype)).tocsr()
            out.sort_indices()
            return out
        M = np.asarray(M)
        out = np.zeros((M.shape[0], len(genes)), dtype=M.dtype)
        out[:, present] = M[:, pos[present]]
        return out

    var = adata.var.copy()
    var.index = have
    for col in var.columns:  # padded genes get <NA>: nullable types keep bool and int (and .h5ad)
        if pd.api.types.is_bool_dtype(var[col]):
            var[col] = var[col].astype("boolean")
        elif pd.api.types.is_integer_dtype(var[col]):
            var[col] = var[col].astype("Int64")
    var = var[var.index.isin(genes)]  # unique there (gene_positions checked): reindex works
    var = var.reindex(pd.Index(genes, name=adata.var.index.name))
    var["scvae_padded"] = padded
    out = ad.AnnData(
        X=None if adata.X is None else reindexed(adata.X), obs=adata.obs.copy(), var=var,
        obsm={k: v.copy() for k, v in adata.obsm.items()},
        obsp={k: v.copy() for k, v in adata.obsp.items()},
        uns=copy.deepcopy(dict(adata.uns)),
        layers={k: reindexed(v) for k, v in adata.layers.items()},
    )
    if adata.raw is not None:
        out.raw = adata.raw.to_adata()
    return out


def query_masks(module: VAE, spec: DataSpec, new_categories: dict[str, list[str]]
                ) -> dict[str, torch.Tensor]:
    """The gradient masks of a query model, rebuilt from ``query_info["new_categories"]``:
    those :func:`_transplant` gave ``load_query`` (:func:`_masks`)."""
    return _masks(module, spec, {(k, c) for k, cats in new_categories.items() for c in cats})


def _masks(module: VAE, spec: DataSpec, new: set[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Gradient masks (1 = trainable) of a grown module: the first layers' columns of the
    ``new`` (covariate, category) labels, and those batches' dispersions under
    ``dispersion="gene-batch"``. Columns of reference categories that had none before (a
    reference with a single batch) stay frozen: reference cells are unchanged."""
    cfg = module.cfg
    labels = _cov_labels(spec, cfg)
    params = dict(module.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for name in _FIRST_LAYERS:
        n_front = cfg.n_genes if name.startswith("encoder") else cfg.n_latent
        mask = torch.zeros_like(params[name], device="cpu")
        for j, lab in enumerate(labels):
            if lab in new:
                mask[:, n_front + j] = 1.0
        masks[name] = mask
    if module.log_theta is not None and cfg.dispersion == "gene-batch":
        mask = torch.zeros_like(module.log_theta, device="cpu")
        for j, c in enumerate(spec.batch_categories):
            if ("batch", c) in new:
                mask[:, j] = 1.0
        masks["log_theta"] = mask
    return masks


def continue_query(model: SCVAE, max_epochs: int, batch_size: int, lr: float, eps: float,
                   train_size: float, early_stopping: bool, patience: int, seed: int,
                   device: torch.device, progress_bar: bool) -> None:
    """Fine-tune a query model's new columns further (``train(warm_start=True)`` on a model
    from :meth:`SCVAE.load_query`): reference weights stay frozen, as in ``load_query``."""
    data = model._require_data()
    masks = query_masks(model.module, model.spec, model.query_info["new_categories"])
    if not any(bool(m.any()) for m in masks.values()):
        raise ValueError("This query model has no new categories to fine-tune (the reference "
                         "maps it as it is); there is nothing for warm_start to train.")
    module = copy.deepcopy(model.module).cpu()  # should it fail, the model keeps its weights
    train_idx, val_idx = split_indices(data.n_obs, train_size, seed)
    if not _has_new_cells(model.spec, data, model.query_info["new_categories"], train_idx):
        raise ValueError("None of these training cells belongs to the query's new categories "
                         f"({model.query_info['new_categories']}): only their weights train, so "
                         "warm_start would change nothing. Pass the query's cells.")
    warn_if_no_validation(train_size, data.n_obs, val_idx, stacklevel=4)
    with seeded(seed, device):
        history = _fine_tune(module, data, masks, train_idx, val_idx, max_epochs, batch_size,
                             lr, eps, model.beta, model.free_bits, early_stopping, patience,
                             seed, device, progress_bar)
    model.module, model.device, model.history = module, device, history
    model.train_indices, model.validation_indices = train_idx, val_idx
    model.train_threads = torch.get_num_threads()
    model.loaded_from = None  # the weights no longer match a saved folder
    # A dict, not a list of runs: uns (and .h5ad) take nested dicts, not lists of them.
    runs = model.query_info.get("continued", {}).get("runs", 0) + 1
    model.query_info = {**model.query_info, "continued": {
        "runs": runs,
        "last": {"max_epochs": int(max_epochs), "batch_size": int(batch_size),
                 "lr": float(lr), "eps": float(eps), "train_size": float(train_size),
                 "early_stopping": bool(early_stopping),
                 "early_stopping_patience": int(patience), "seed": int(seed)}}}


def _resolve(device):
    from .devices import resolve_device

    return resolve_device(device)


def _fine_tune(
    module: VAE, data: CellData, masks: dict[str, torch.Tensor], train_idx: np.ndarray,
    val_idx: np.ndarray, max_epochs: int, batch_size: int, lr: float, eps: float, beta: float,
    free_bits: float, early_stopping: bool, patience: int, seed: int, device: torch.device,
    progress_bar: bool,
) -> pd.DataFrame:
    """Train only the masked-in entries of the new parameters; return the history.

    A NaN/inf loss, gradient or validation ELBO is handled as ``train()`` handles it: back to
    the last good epoch with the learning rate times ``TrainConfig.rollback_lr_factor``, at
    most ``TrainConfig.max_rollbacks`` times, then a ``FloatingPointError``.
    """
    module.to(device)
    params = dict(module.named_parameters())
    for p in module.parameters():
        p.requires_grad_(False)
    # The networks' entries first: _roll_back reports group 0's learning rate.
    names = sorted(masks, key=lambda n: n == "log_theta")
    groups, hooks = [], []
    for name in names:
        p = params[name]
        p.requires_grad_(True)
        m = masks[name].to(device)
        hooks.append(p.register_hook(lambda g, m=m: g * m))
        # The new batches' θ learn faster, as in training (TrainConfig.dispersion_lr_factor).
        scale = DISPERSION_LR_FACTOR if name == "log_theta" else 1.0
        groups.append({"params": [p], "lr": lr * scale, "lr_scale": scale})
    # No weight decay: it would shrink the frozen reference entries despite the zero gradient.
    optim = torch.optim.Adam(groups, lr=lr, eps=eps, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)  # (the global ones: seeded by the caller)
    rollbacks = TrainConfig()  # its max_rollbacks and rollback_lr_factor, as train()'s
    loop, best_state = _LoopState(), None
    guard = _StepGuard(device, [params[n] for n in names])
    good = _snapshot(module, optim)  # the state a divergence rolls back to
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_epochs, desc="Query", unit="epoch")
    sums = torch.zeros(2, dtype=accumulator_dtype(device), device=device)
    try:
        while not loop.stopped and loop.epoch < max_epochs:
            epoch = loop.epoch
            t0 = time.perf_counter()
            _query_train_mode(module)
            sums.zero_()
            guard.reset()
            _set_lr(optim, lr * loop.lr_scale)
            for step, b in enumerate(data.batches(
                    train_idx, batch_size, shuffle=True, generator=gen, device=device,
                    **nonzero_option(module, data))):
                terms = module.elbo_terms(b.x, b.library, b.batch_index, b.cat_covs, b.cont_covs,
                                          nonzero=b.nonzero)
                loss = module.loss(terms, beta=beta, free_bits=free_bits)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                if guard.bad_step(step, loss):  # CPU: checked now; accelerators: flagged
                    break
                optim.step()
                sums += torch.stack([terms["log_px"].detach().sum(), terms["kl"].detach().sum()]).to(sums.dtype)
            bad_step = guard.first_bad_step()
            row: dict = {}
            if bad_step is None:
                val = (evaluate(module, data, val_idx, validation_batch_size(batch_size), device)
                       if len(val_idx) else None)
                row = epoch_row(epoch, beta, sums, len(train_idx), val, optim, t0)
            # The validation ELBO and the weights too: the epoch's last step can break them
            # after the training ELBO (summed before each step) was scored.
            if (bad_step is not None or not _row_finite(row, has_validation=len(val_idx) > 0)
                    or not _weights_finite(module)):
                _roll_back(module, optim, good, loop, rollbacks, epoch, bad_step,
                           advice="fine-tune with a lower lr")
                continue
            loop.rows.append(row)
            loop.epoch = epoch + 1
            good = _snapshot(module, optim)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(elbo=f"{row['train_elbo']:.1f}", val=f"{row['validation_elbo']:.1f}")
            monitor = row["validation_elbo"] if len(val_idx) else row["train_elbo"]
            if monitor > loop.best:
                loop.best, loop.since_best, loop.best_epoch = monitor, 0, epoch + 1
                best_state = {n: params[n].detach().clone() for n in names}
            else:
                loop.since_best += 1
            loop.stopped = early_stopping and loop.since_best >= patience
    finally:
        for h in hooks:
            h.remove()
        if bar is not None:
            bar.close()
    if early_stopping and best_state is not None:
        with torch.no_grad():
            for n, t in best_state.items():
                params[n].copy_(t)
    for p in module.parameters():
        p.requires_grad_(True)
    module.eval()
    module.forget_cached_weights()
    history = pd.DataFrame(loop.rows)
    # As train_module: the epoch whose weights are kept (None: the last one's).
    history.attrs["restored_epoch"] = (loop.best_epoch if early_stopping and best_state is not None
                                       else None)
    return history


def category_codes(spec: DataSpec, data) -> list[tuple[str, list[str], np.ndarray]]:
    """Each categorical input of ``data``: its label as ``query_info`` names it ("batch",
    "cat:<key>"), its categories and each cell's code."""
    columns = ([("batch", spec.batch_categories, np.asarray(data.batch_index))]
               if spec.batch_key is not None else [])
    cat_covs = np.asarray(data.cat_covs)
    columns += [(f"cat:{key}", spec.categorical_covariate_categories[key], cat_covs[:, j])
                for j, key in enumerate(spec.categorical_covariate_keys)]
    return columns


def _has_new_cells(spec: DataSpec, data: CellData, new: dict, idx: np.ndarray) -> bool:
    """Whether a cell of ``idx`` has one of the ``new`` (query_info) categories."""
    for label, cats, codes in category_codes(spec, data):
        new_codes = [cats.index(c) for c in new.get(label, [])]
        if new_codes and np.isin(codes[idx], new_codes).any():
            return True
    return False
