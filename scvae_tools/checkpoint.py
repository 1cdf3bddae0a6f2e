"""Safe persistence: atomic writes, training checkpoints and validated model files.

Three guarantees live here, shared by :meth:`SCVAE.save <scvae_tools.SCVAE.save>`,
:meth:`SCVAE.load <scvae_tools.SCVAE.load>` and the training loop:

* **Atomic writes.** A file is written to a temporary sibling, flushed to disk and renamed
  over the target (:func:`atomic_torch_save`); a model directory is swapped in the same way
  (:func:`replace_dir`). A crash or ``SIGKILL`` at any moment leaves either the old or the new
  version, never a torn one.
* **No code from files.** Weights and checkpoints are read with ``torch.load(weights_only=True)``
  (:func:`safe_torch_load`): only tensors and plain containers are unpickled; a file that asks
  for anything else (e.g. a ``__reduce__`` calling a function) is refused with a
  ``ValueError`` before any of it runs.
* **Validated configs.** ``config.json`` is checked field by field against the dataclasses
  it rebuilds (types, ranges, cross-field consistency) by :func:`validate_model_config`, so a
  corrupted or hand-edited file gives one clear error instead of a torch stack trace.

Training checkpoints (:class:`CheckpointConfig`, :func:`save_checkpoint`,
:func:`load_checkpoint`) hold the model and optimiser state, the RNG states, the epoch, the
history and the early-stopping state, so a resumed run continues exactly where the
interrupted one stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import math
import os
import pickle
import platform
import shutil
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "scvae_tools.checkpoint/1"
MODEL_FORMAT_PREFIX = "scvae_tools.model/"


# ---------------------------------------------------------------------- versions
def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that determine a result (for provenance)."""
    out = {"python": platform.python_version()}
    for name in ("scvae_tools", "torch", "numpy", "scipy", "pandas", "anndata"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    out["torch"] = str(torch.__version__)  # the running build (e.g. +cu121), not only the wheel name
    return out


# ---------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary sibling, then it is renamed.

    If ``write`` raises (or the process dies), ``path`` keeps its previous content and the
    temporary file is removed (or, after a kill, left as a hidden ``.name.*.tmp`` file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name, created with the umask's permissions (mkstemp's 0600 would make a
    # checkpoint or a written .h5ad unreadable to the colleagues a saved model is not).
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` (before it is renamed into place)."""
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the complete directory ``tmp`` to ``path``, replacing any previous ``path``.

    The old directory is first renamed aside and only deleted once the new one is in place;
    if the second rename fails the old one is put back, so ``path`` is never lost.
    """
    fsync_tree(tmp)
    if not path.exists():
        tmp.rename(path)
        _fsync_dir(path.parent)
        return
    old = path.with_name(f".{path.name}.old")
    _remove(old)  # left by a crash between the renames
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)
        raise
    _fsync_dir(path.parent)
    _remove(old)


def _remove(path: Path) -> None:
    """Delete a file, link or directory tree if it is there (a link, not what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- safe loading
def safe_torch_load(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load`` that never executes code from the file (``weights_only=True``).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is truncated, not a torch file, or contains objects other than tensors and
        plain containers (a pickle that would run code is refused before anything runs).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}.")
    if not path.is_file():  # a FIFO or device would block or never end
        raise ValueError(f"Could not read {what} {path}: it is not a regular file.")
    with open(path, "rb") as f:
        head = f.read(200)
    if head[:4] != b"PK\x03\x04":  # torch.save writes a zip archive
        lfs = head.startswith(b"version https://git-lfs")
        raise ValueError(
            f"Could not read {what} {path}: it is not a torch file"
            + (" but a Git LFS pointer (fetch it with `git lfs pull`)" if lfs else
               " (truncated, another format, or not written by torch.save)")
            + ". Re-save it, or restore it from a backup.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Refused to load {what} {path}: it contains Python objects other than tensors and "
            "plain containers, which could run arbitrary code. Only load files from sources you "
            f"trust; re-save the model with scvae_tools to get a safe file. ({str(err)[:300]})"
        ) from None
    # IndexError, KeyError…: the unpickler tripping over damaged bytes
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"Could not read {what} {path}: the file is truncated or not a torch file "
            f"({type(err).__name__}: {str(err)[:200]}). Re-save it, or restore it from a backup."
        ) from None


def check_state_dict(state: Any, source: str, reference: dict[str, torch.Tensor] | None = None,
                     against: str = "the model") -> dict[str, torch.Tensor]:
    """Check that ``state`` is a ``{name: finite tensor}`` dict; return it.

    With ``reference`` (the module's own ``state_dict()``) the names, shapes and dtypes must
    be the module's, checked first: a float64 weight could hold values that overflow the
    module's float32, and a tensor expanded from one number to 10⁶ × 10⁶ (8 KB on disk)
    would have the finiteness check allocate terabytes.
    """
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{source} is not a state dict of named tensors.")
    if reference is not None:
        missing = sorted(set(reference) - set(state))
        extra = sorted(set(state) - set(reference))
        if missing or extra:
            raise ValueError(f"{source} does not match {against}: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}; the files come from different models.")
        odd = [k for k, v in state.items()
               if v.shape != reference[k].shape or v.dtype != reference[k].dtype]
        if odd:
            k = odd[0]
            raise ValueError(
                f"{source} does not match {against}: {k} is {state[k].dtype} "
                f"{tuple(state[k].shape)}, the model's is {reference[k].dtype} "
                f"{tuple(reference[k].shape)}; the files come from different models.")
    bloated = [k for k, v in state.items()
               if v.untyped_storage().nbytes() < v.numel() * v.element_size()]
    if bloated:  # stride-0 views claim more values than their data holds
        raise ValueError(f"{source} has tensors larger than the data they hold (in "
                         f"{bloated[:5]}); it was not written by scvae_tools.")
    bad = [k for k, v in state.items()
           if (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"{source} has NaN or inf weights (in {bad[:5]}); it comes from a diverged or "
            "corrupted model. Retrain, or load an earlier save."
        )
    return state


# ---------------------------------------------------------------------- config validation
def _type_ok(value: Any, tp: Any) -> bool:
    """Whether a JSON value matches a (resolved) dataclass annotation."""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # within int64: 10**400 would overflow inside torch, not here
        return isinstance(value, int) and not isinstance(value, bool) and value.bit_length() < 63
    if tp is float:  # JSON writes 1.0 as 1 only by hand, but accept it; never NaN/inf
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(_type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
        )
    return True  # an annotation this checker does not know: the dataclass checks it


def check_field_types(obj: Any) -> None:
    """A ``TypeError`` naming the field unless every field of the dataclass ``obj`` has the
    type a saved file must have (what :func:`build_dataclass` checks on load): a setting
    that trains and saves must load again."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints.get(f.name, Any)
        if not _type_ok(value, tp):
            raise TypeError(f"{f.name} must be of type {_type_name(tp)}, got {value!r} "
                            f"({type(value).__name__}).")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:  # list[str], str | None, ...
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


def build_dataclass(cls: type, data: Any, section: str, source: str):
    """Build ``cls(**data)`` after checking keys and types; errors name ``section`` and ``source``."""
    prefix = f"{source}: '{section}'"
    if not isinstance(data, dict):
        raise ValueError(f"{prefix} must be a JSON object, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{prefix} has unknown field(s) {unknown}; the file was written by a newer or "
            "different scvae_tools version, or edited by hand."
        )
    required = [
        n for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in data]
    if missing:
        raise ValueError(f"{prefix} lacks required field(s) {missing}.")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        tp = hints.get(name, Any)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{source}: '{section}.{name}' must be finite, got {value!r}.")
        if not _type_ok(value, tp):
            raise ValueError(
                f"{source}: '{section}.{name}' must be of type {_type_name(tp)}, got {value!r} "
                f"({type(value).__name__})."
            )
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{prefix} is invalid: {err}") from None


def _finite_nonneg(config: dict, key: str, source: str, default: float) -> float:
    value = config.get(key, default)
    if not _type_ok(value, float) or value < 0:
        raise ValueError(f"{source}: '{key}' must be a finite number >= 0, got {value!r}.")
    return float(value)


def validate_model_config(config: Any, source: str = "config.json") -> dict[str, Any]:
    """Check a saved model's ``config.json`` content; return the rebuilt parts.

    Returns a dict with ``module`` (:class:`~scvae_tools.module.ModuleConfig`), ``data``
    (:class:`~scvae_tools.adapter.DataSpec`), ``train``
    (:class:`~scvae_tools.train.TrainConfig` or ``None``), ``beta`` and ``free_bits``.
    Unknown top-level keys are ignored (later versions may add some); unknown fields inside
    ``module``, ``data`` and ``train`` are errors.

    Raises
    ------
    ValueError
        Naming the field, what was expected and what the file holds.
    """
    from .adapter import DataSpec
    from .module import ModuleConfig
    from .train import TrainConfig

    if not isinstance(config, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(config).__name__}.")
    fmt = config.get("format")
    if fmt is not None and (not isinstance(fmt, str) or not fmt.startswith(MODEL_FORMAT_PREFIX)):
        raise ValueError(f"{source} is not a scvae_tools model config (format {fmt!r}).")
    for key in ("module", "data"):
        if key not in config:
            raise ValueError(f"{source} is not a scvae_tools model config: '{key}' is missing.")
    module = build_dataclass(ModuleConfig, config["module"], "module", source)
    data = build_dataclass(DataSpec, config["data"], "data", source)
    # Cross-field consistency: the weights are shaped by `module`, the encoding by `data`.
    if len(set(data.var_names)) != len(data.var_names):
        raise ValueError(f"{source}: 'data.var_names' has duplicate gene names.")
    for what, cats in [("batch_categories", data.batch_categories), *(
            (f"categorical_covariate_categories[{k!r}]", v)
            for k, v in data.categorical_covariate_categories.items())]:
        if len(set(cats)) != len(cats):  # one label, two columns: encoding is ambiguous
            raise ValueError(f"{source}: 'data.{what}' lists a category twice.")
    if data.n_genes != module.n_genes:
        raise ValueError(
            f"{source}: 'data.var_names' lists {data.n_genes} genes but 'module.n_genes' is "
            f"{module.n_genes}."
        )
    if (data.batch_key is None) != (len(data.batch_categories) == 0) or data.n_batch != module.n_batch:
        raise ValueError(
            f"{source}: batch settings disagree (batch_key={data.batch_key!r}, "
            f"{len(data.batch_categories)} batch categories, module.n_batch={module.n_batch})."
        )
    if set(data.categorical_covariate_categories) != set(data.categorical_covariate_keys) or (
        data.n_cats_per_cov != list(module.n_cats_per_cov)
    ):
        raise ValueError(
            f"{source}: categorical covariates disagree between 'data' "
            f"({data.categorical_covariate_keys}) and 'module.n_cats_per_cov' "
            f"({module.n_cats_per_cov})."
        )
    if len(data.continuous_covariate_keys) != module.n_continuous_cov:
        raise ValueError(
            f"{source}: {len(data.continuous_covariate_keys)} continuous covariate keys but "
            f"module.n_continuous_cov={module.n_continuous_cov}."
        )
    train_cfg = config.get("train")
    if isinstance(train_cfg, dict):  # the settings of its version, not today's defaults
        from .train import LEGACY_TRAIN_DEFAULTS
        train_cfg = LEGACY_TRAIN_DEFAULTS | train_cfg
    train = None if train_cfg is None else build_dataclass(TrainConfig, train_cfg, "train", source)
    versions = config.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise ValueError(f"{source}: 'versions' must map package names to version strings.")
    return {
        "module": module,
        "data": data,
        "train": train,
        "beta": _finite_nonneg(config, "beta", source, 1.0),
        "free_bits": _finite_nonneg(config, "free_bits", source, 0.0),
    }


# ---------------------------------------------------------------------- training checkpoints
@dataclass
class CheckpointConfig:
    """Where and how often :func:`~scvae_tools.train.train_module` checkpoints.

    Parameters
    ----------
    directory
        Folder for ``checkpoint.pt`` (created if needed); one file, replaced atomically.
    every
        Write after every ``every`` completed epochs, and always after the last one.
    resume
        Continue from the checkpoint in ``directory`` if there is one (else start afresh).
    identity
        What the checkpoint must match to be resumed (model architecture, genes, …), set by
        the caller; a checkpoint of another model is refused.
    cells
        A digest of the cell names in their order (:func:`cells_digest`): the split is saved
        as row numbers, which only mean the same cells in the same order.
    library
        The cells' library sizes (float32): the same names over other counts (another
        layer, other data) are not the run that was interrupted. Compared with a relative
        tolerance, since in-memory and backed reads sum in different orders.
    covariates
        A digest of the cells' batch codes and covariate values (:func:`covariates_digest`):
        relabelled batches or changed covariates under the same cell names are another run.
    """

    directory: Path
    every: int = 10
    resume: bool = False
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)
    cells: str = ""
    library: Any = None
    covariates: str = ""

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).expanduser()
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got {self.every!r}.")
        # Checked now, not at the first write `every` epochs into training.
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint_dir {str(self.directory)!r} is a file; pass a folder "
                             "(it is created if needed).")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"checkpoint_dir {str(self.directory)!r} cannot be created "
                             f"({err.strerror or err}); pass a folder you can write to.") from err
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise ValueError(f"checkpoint_dir {str(self.directory)!r} is not writable; pass a "
                             "folder you can write to.")

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT_FILE


def cells_digest(names) -> str:
    """SHA-1 of cell names in their order (for :class:`CheckpointConfig`)."""
    return hashlib.sha1("\n".join(map(str, names)).encode()).hexdigest()


def covariates_digest(*arrays) -> str:
    """SHA-1 of the cells' batch codes and covariate arrays (for :class:`CheckpointConfig`);
    in-memory and backed data encode them alike (both from ``obs``)."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (see :func:`atomic_torch_save`)."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT, **state}, path)


# What train_module writes and needs to resume.
TRAINING_STATE_KEYS = (
    "epoch", "stopped", "rollbacks", "rows", "best", "since_best", "best_state", "module",
    "optimizer", "rng", "train_config", "identity", "train_idx", "val_idx",
)


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """Read a training checkpoint safely; ``None`` when there is none at ``path``.

    ``required`` keys must be present (e.g. :data:`TRAINING_STATE_KEYS`), else ``ValueError``.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = safe_torch_load(path, "training checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a scvae_tools training checkpoint; delete it or pass another "
            "checkpoint_dir."
        )
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(
            f"{path} is an incomplete training checkpoint (missing {missing}); delete it, "
            "pass resume=False, or use another checkpoint_dir."
        )
    return state
