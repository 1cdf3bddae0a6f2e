"""Regenerate the backward-compatibility fixtures of tests/test_compat.py.

Run it once per commit, with that commit's checkout (not this one) first on PYTHONPATH:

    git worktree add /tmp/old_c3bd95e c3bd95e
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old_c3bd95e \\
        python tests/data/compat/make_fixtures.py c3bd95e tests/data/compat

It writes OUT/<commit>_<kind>/ for the kinds listed in PLAN under that commit, and
OUT/data.npz (the cells every commit trains on) if it is missing; if it exists, it must
equal what this script generates. Self-contained (numpy, pandas, anndata, torch and the
scvae_tools under test): it runs unchanged under every commit in PLAN.

Per model kind:   model/ (SCVAE.save), latent.npy (float32 latent means of every cell of
                  the training AnnData; the query AnnData for a query model), expr.npy
                  (float32 get_normalized_expression() of every EXPR_STEP-th cell), info.json.
Per checkpoint:   ckpt/checkpoint.pt of train(max_epochs=4, checkpoint_every=2,
                  early_stopping=False) and info.json (for nb_genebatch also that commit's
                  own resume to 6 epochs: the train ELBO of epoch 5, the first resumed one).
"""
from __future__ import annotations

import sys

# The environment may hold an editable install of another scvae_tools checkout: its import
# hook would silently serve that copy's submodules wherever the commit under test lacks
# them. Drop it before importing scvae_tools (and check every module's origin at the end).
sys.meta_path[:] = [f for f in sys.meta_path
                    if "editable" not in type(f).__module__.lower()
                    and "editable" not in getattr(f, "__name__", "").lower()]

import inspect  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import scvae_tools as svt  # noqa: E402
from scvae_tools import SCVAE  # noqa: E402

SMALL = {"n_hidden": 16, "n_latent": 4}
TRAIN = {"max_epochs": 3, "batch_size": 64, "seed": 0, "progress_bar": False}
CKPT_TRAIN = {"max_epochs": 4, "batch_size": 64, "seed": 0, "progress_bar": False,
              "early_stopping": False, "checkpoint_every": 2}
RESUME_EPOCHS = 6
EXPR_STEP = 10
GENEBATCH = {"batch_key": "batch", "dispersion": "gene-batch"}
PLAN = {
    # the oldest commit that works; no checkpoints, no load_query yet
    "475ec90": {"models": {
        "nb_genebatch": GENEBATCH,
        "covariates": {"batch_key": "batch", "categorical_covariate_keys": ["donor"],
                       "continuous_covariate_keys": ["pct"], "n_layers": 2},
    }},
    # Poisson models carried an unused dispersion θ; one Adam group (θ at the networks' lr)
    "8f00d96": {"models": {"poisson": {"likelihood": "poisson"}},
                "checkpoints": {"nb_genebatch": GENEBATCH, "poisson": {"likelihood": "poisson"}}},
    "c3bd95e": {"models": {
        "nb": {},
        "zinb": {"likelihood": "zinb"},
        "mog": {"prior": "mog", "n_prior_components": 3},
        "bn_decoder": {"use_batch_norm": "decoder"},
    }, "query": {"reference": GENEBATCH}},
}
QUERY_TRAIN = {"max_epochs": 3, "batch_size": 64, "seed": 0, "progress_bar": False}


def make_data() -> dict[str, np.ndarray]:
    """200 reference cells (batch0, batch1) and 80 query cells (batch2) × 40 genes: negative
    binomial counts of 3 cell types with a batch effect; obs 'donor' and 'pct' as covariates."""
    rng = np.random.default_rng(20261128)
    n_ref, n_query, n_genes, n_types = 200, 80, 40, 3
    n = n_ref + n_query
    batch = np.repeat(np.array(["batch0", "batch1", "batch2"]), [100, 100, n_query])
    cell_type = rng.integers(0, n_types, n)
    type_mean = rng.lognormal(0.0, 1.0, (n_types, n_genes))
    batch_effect = rng.lognormal(0.0, 0.3, (3, n_genes))
    b = np.searchsorted(["batch0", "batch1", "batch2"], batch)
    library = rng.lognormal(np.log(800.0), 0.3, n)
    mu = type_mean[cell_type] * batch_effect[b]
    mu = mu / mu.sum(1, keepdims=True) * library[:, None]
    theta = 5.0
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.uint16)
    return {"counts": counts, "batch": batch,
            "donor": np.array(["d0", "d1", "d2"])[rng.integers(0, 3, n)],
            "pct": rng.random(n), "n_ref": np.array(n_ref)}


def to_adata(data, which: str) -> ad.AnnData:
    """'ref' or 'query' AnnData from data.npz's arrays (tests/test_compat.py does the same)."""
    n_ref = int(data["n_ref"])
    rows = slice(0, n_ref) if which == "ref" else slice(n_ref, None)
    batch = data["batch"][rows].astype(str)
    obs = pd.DataFrame({
        "batch": pd.Categorical(batch, categories=sorted(set(batch))),
        "donor": pd.Categorical(data["donor"][rows].astype(str), categories=["d0", "d1", "d2"]),
        "pct": data["pct"][rows].astype(np.float64),
    }, index=[f"{which}{i}" for i in range(len(batch))])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(data["counts"].shape[1])])
    return ad.AnnData(data["counts"][rows].astype(np.float32), obs=obs, var=var)


def data_file(out: Path) -> dict[str, np.ndarray]:
    new = make_data()
    path = out / "data.npz"
    if path.exists():
        with np.load(path) as f:
            old = {k: f[k] for k in f.files}
        if set(old) != set(new) or not all(np.array_equal(old[k], new[k]) for k in new):
            sys.exit(f"{path} differs from what this script generates: delete it to regenerate "
                     "every fixture, or fix the script.")
    else:
        np.savez_compressed(path, **new)
    return new


def outputs(m, adata, d: Path, info: dict) -> None:
    np.save(d / "latent.npy", np.asarray(m.get_latent_representation(adata), dtype=np.float32))
    expr = np.asarray(m.get_normalized_expression(adata), dtype=np.float32)[::EXPR_STEP]
    np.save(d / "expr.npy", expr)
    info["elbo"] = float(m.get_elbo(adata))
    if getattr(m.module_config, "prior", "normal") == "mog":
        # no public API shows the prior: log p(z) at the stored latent means, for the test
        with torch.no_grad():
            z = torch.from_numpy(np.load(d / "latent.npy"))
            info["prior_log_prob_mean"] = float(m.module.cpu().prior_log_prob(z).mean())


def write_info(d: Path, info: dict) -> None:
    (d / "info.json").write_text(json.dumps(info, indent=1) + "\n")


def readable(d: Path) -> None:
    """Checkpoints are written 0600: fixtures are 0644 (folders 0755)."""
    for p in [d, *d.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def fresh(d: Path) -> Path:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def main(commit: str, out: Path) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    src = Path(svt.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sys.exit(f"{src} is not a git checkout: cannot tell which commit it is.")
    if not head.startswith(commit) or commit not in PLAN:
        sys.exit(f"scvae_tools comes from {src} at {head[:7]}, not {commit} (one of {list(PLAN)})")
    plan = PLAN[commit]
    out.mkdir(parents=True, exist_ok=True)
    data = data_file(out)
    ref, query = to_adata(data, "ref"), to_adata(data, "query")
    base = {"commit": commit, "scvae_tools_version": getattr(svt, "__version__", None),
            "torch": torch.__version__, "generator": "tests/data/compat/make_fixtures.py"}

    for kind, kw in plan.get("models", {}).items():
        d = fresh(out / f"{commit}_{kind}")
        model_kwargs = {**SMALL, **kw}
        m = SCVAE(ref, **model_kwargs)
        m.train(**TRAIN)
        m.save(d / "model")
        info = {**base, "kind": kind, "adata": "ref", "model_kwargs": model_kwargs,
                "train_kwargs": TRAIN, "expr_rows_step": EXPR_STEP}
        outputs(m, ref, d, info)
        write_info(d, info)
        readable(d)
        print("wrote", d.name, flush=True)

    if "query" in plan:
        d = fresh(out / f"{commit}_query")
        ref_kwargs = {**SMALL, **plan["query"]["reference"]}
        with tempfile.TemporaryDirectory() as tmp:
            r = SCVAE(ref, **ref_kwargs)
            r.train(**TRAIN)
            r.save(Path(tmp) / "reference")
            q = SCVAE.load_query(Path(tmp) / "reference", query, **QUERY_TRAIN)
            q.save(d / "model")
        # query.reference_dir is informational (no version reads it back); it named the
        # temporary folder above
        cfg_file = d / "model" / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["query"]["reference_dir"] = "reference (a temporary folder, not kept)"
        cfg_file.write_text(json.dumps(cfg, indent=1))
        info = {**base, "kind": "query", "adata": "query", "reference_model_kwargs": ref_kwargs,
                "reference_train_kwargs": TRAIN, "load_query_kwargs": QUERY_TRAIN,
                "expr_rows_step": EXPR_STEP}
        outputs(q, query, d, info)
        write_info(d, info)
        readable(d)
        print("wrote", d.name, flush=True)

    train_params = inspect.signature(SCVAE.train).parameters
    for kind, kw in plan.get("checkpoints", {}).items():
        d = fresh(out / f"{commit}_ckpt_{kind}")
        model_kwargs = {**SMALL, **kw}
        SCVAE(ref, **model_kwargs).train(**CKPT_TRAIN, checkpoint_dir=d / "ckpt")
        state = torch.load(d / "ckpt" / "checkpoint.pt", weights_only=True)
        # the settings of that run as train() arguments, for the resume under a later version
        # (whose defaults may differ)
        saved = {k: v for k, v in state["train_config"].items()
                 if k in train_params and k not in ("max_epochs", "seed", "batch_size")}
        info = {**base, "kind": f"ckpt_{kind}", "adata": "ref", "model_kwargs": model_kwargs,
                "train_kwargs": CKPT_TRAIN, "resume_kwargs": saved,
                "checkpoint_epoch": int(state["epoch"])}
        if kind == "nb_genebatch":  # this version's own resume, on a copy
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copytree(d / "ckpt", Path(tmp) / "ckpt")
                m = SCVAE(ref, **model_kwargs)
                m.train(**{**CKPT_TRAIN, "max_epochs": RESUME_EPOCHS},
                        checkpoint_dir=Path(tmp) / "ckpt", resume=True)
            hist = m.history
            first = hist.loc[hist["epoch"] == int(state["epoch"]) + 1, "train_elbo"]
            info["resumed_to"] = RESUME_EPOCHS
            info["old_resume_first_epoch_train_elbo"] = float(first.iloc[0])
        write_info(d, info)
        readable(d)
        print("wrote", d.name, flush=True)

    root = str(Path(svt.__file__).resolve().parent)
    foreign = sorted(name for name, mod in list(sys.modules.items())
                     if name.startswith("scvae_tools") and getattr(mod, "__file__", None)
                     and not str(Path(mod.__file__).resolve()).startswith(root))
    if foreign:
        sys.exit(f"modules imported from another copy of scvae_tools: {foreign}")
    print(f"{commit}: scvae_tools from {root}; all modules from there", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], Path(sys.argv[2]).resolve())
