"""The command line: fit on an .h5ad, apply a saved model, the demo, and `python -m scvae_tools.cli`."""

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scvae_tools as svt
from scvae_tools.cli import main


def test_fit_writes_results(tmp_path, capsys):
    a = svt.datasets.synthetic_counts(n_cells=200, n_genes=60, n_batches=2, seed=0)
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(tmp_path / "in.h5ad")
    rc = main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad"), "--layer",
               "counts", "--batch-key", "batch", "--epochs", "3", "--n-latent", "4", "--quiet",
               "--save-model", str(tmp_path / "model")])
    assert rc == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    # The summary reports the epoch whose weights were kept (early stopping restores the best).
    val = np.asarray(out.uns["scvae"]["history"]["validation_elbo"])
    assert (f"best validation ELBO {val.max():.2f} nats/cell at epoch {val.argmax() + 1}"
            in capsys.readouterr().out)
    assert out.obsm["X_scvae"].shape == (200, 4) and "scvae_denoised" in out.layers
    assert out.uns["scvae"]["data"]["batch_key"] == "batch"
    model = svt.SCVAE.load(tmp_path / "model", out)
    np.testing.assert_allclose(model.get_latent_representation(), out.obsm["X_scvae"], rtol=1e-5)


def _covariate_counts(n_cells: int = 200, seed: int = 0) -> ad.AnnData:
    a = svt.datasets.synthetic_counts(n_cells=n_cells, n_genes=60, n_batches=2, seed=seed)
    rng = np.random.default_rng(seed)
    a.obs["donor"] = rng.choice(["d1", "d2", "d3"], a.n_obs)
    a.obs["pct_mito"] = rng.random(a.n_obs)
    a.obs["size_factor"] = np.asarray(a.X.sum(1)).ravel() * 1.5
    return a


def test_fit_passes_model_and_training_options(tmp_path, capsys):
    """Covariates, size factors, architecture and schedule options reach the model."""
    _covariate_counts().write_h5ad(tmp_path / "in.h5ad")
    rc = main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad"), "--quiet",
               "--batch-key", "batch", "--categorical-covariate-keys", "donor",
               "--continuous-covariate-keys", "pct_mito", "--size-factor-key", "size_factor",
               "--dropout-rate", "0.2", "--free-bits", "0.1", "--prior", "mog",
               "--n-prior-components", "3", "--epochs", "4", "--train-size", "1.0",
               "--no-early-stopping", "--kl-warmup-epochs", "2", "--key-added", "vae"])
    assert rc == 0
    assert "4 epochs; train ELBO" in capsys.readouterr().out  # no validation cells
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_vae"].shape == (200, 10) and "scvae_denoised" not in out.layers
    assert {"vae_denoised", "vae_expected"} <= set(out.layers)
    rec = out.uns["vae"]
    assert list(rec["data"]["categorical_covariate_keys"]) == ["donor"]
    assert list(rec["data"]["continuous_covariate_keys"]) == ["pct_mito"]
    assert rec["data"]["size_factor_key"] == "size_factor"
    assert rec["model"]["dropout_rate"] == 0.2 and rec["model"]["prior"] == "mog"
    assert rec["model"]["n_prior_components"] == 3 and rec["free_bits"] == 0.1
    assert rec["train"]["train_size"] == 1.0 and rec["train"]["kl_warmup_epochs"] == 2
    assert not rec["train"]["early_stopping"]
    # β rose over the 2 warm-up epochs (1/2, then 1), then held at 1.
    np.testing.assert_allclose(rec["history"]["beta"], [0.5, 1.0, 1.0, 1.0])
    # Expected counts follow the given size factors, not the count sums.
    np.testing.assert_allclose(out.layers["vae_expected"].sum(1), out.obs["size_factor"], rtol=1e-4)


def test_apply_writes_a_saved_models_results(tmp_path, capsys):
    """`apply` gives other cells the saved model's latent and layers, genes in any order."""
    a = _covariate_counts()
    a.write_h5ad(tmp_path / "in.h5ad")
    assert main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "fit.h5ad"), "--quiet",
                 "--batch-key", "batch", "--epochs", "3",
                 "--save-model", str(tmp_path / "model")]) == 0
    fitted = ad.read_h5ad(tmp_path / "fit.h5ad")
    new = a[:, a.var_names[::-1]].copy()  # the same cells, genes reversed
    new.write_h5ad(tmp_path / "new.h5ad")
    rc = main(["apply", str(tmp_path / "new.h5ad"), "--model", str(tmp_path / "model"),
               "-o", str(tmp_path / "applied.h5ad"), "--device", "cpu"])
    assert rc == 0 and "applied the model" in capsys.readouterr().out
    out = ad.read_h5ad(tmp_path / "applied.h5ad")
    np.testing.assert_allclose(out.obsm["X_scvae"], fitted.obsm["X_scvae"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.layers["scvae_denoised"],
                               fitted[:, out.var_names].layers["scvae_denoised"], rtol=1e-4)
    assert out.uns["scvae"]["data"]["batch_key"] == "batch"
    # Out of core: the counts stream from disk, the results are the same.
    assert main(["apply", str(tmp_path / "new.h5ad"), "--model", str(tmp_path / "model"),
                 "-o", str(tmp_path / "applied_backed.h5ad"), "--backed"]) == 0
    backed = ad.read_h5ad(tmp_path / "applied_backed.h5ad")
    np.testing.assert_allclose(backed.obsm["X_scvae"], out.obsm["X_scvae"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(backed.layers["scvae_denoised"], out.layers["scvae_denoised"],
                               rtol=1e-4)


def test_apply_warm_start_trains_the_saved_model_further(tmp_path, capsys):
    """`apply --warm-start` continues from the saved weights on the input's cells (there was
    no way to do it from the command line), and saves the result with --save-model."""
    a = _covariate_counts()
    a.write_h5ad(tmp_path / "in.h5ad")
    assert main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "fit.h5ad"), "--quiet",
                 "--batch-key", "batch", "--epochs", "2", "--no-early-stopping",
                 "--save-model", str(tmp_path / "model")]) == 0
    capsys.readouterr()
    fitted = ad.read_h5ad(tmp_path / "fit.h5ad").uns["scvae"]["history"]
    rc = main(["apply", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "model"),
               "-o", str(tmp_path / "more.h5ad"), "--warm-start", "--epochs", "10", "--quiet",
               "--save-model", str(tmp_path / "more_model")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "trained further the model in" in out and "trained 10 epochs" in out
    more = ad.read_h5ad(tmp_path / "more.h5ad")
    rec = more.uns["scvae"]
    assert rec["train"]["warm_start"] and rec["train"]["max_epochs"] == 10
    hist = rec["history"]
    # It starts where the saved fit ended (a fresh start's first epoch is far worse), and
    # goes on improving.
    assert hist["train_elbo"][0] > fitted["train_elbo"][-1]
    assert hist["train_elbo"][0] > fitted["train_elbo"][0] + 10  # fresh: ~ the fit's first
    assert max(hist["validation_elbo"]) > fitted["validation_elbo"][-1]
    saved = svt.SCVAE.load(tmp_path / "more_model", a)
    np.testing.assert_allclose(saved.get_latent_representation(), more.obsm["X_scvae"],
                               rtol=1e-4, atol=1e-5)
    # The model folder given is only read.
    original = svt.SCVAE.load(tmp_path / "model", a)
    assert len(original.history) == 2


def test_apply_explains_extra_and_missing_genes(tmp_path, capsys):
    a = _covariate_counts()
    a.write_h5ad(tmp_path / "in.h5ad")
    assert main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "fit.h5ad"), "--quiet",
                 "--epochs", "2", "--no-layers", "--save-model", str(tmp_path / "model")]) == 0
    extra = ad.AnnData(X=sp.hstack([a.X[:, :1] * 3, a.X], format="csr"), obs=a.obs,
                       var=pd.DataFrame(index=["EXTRA", *a.var_names]))  # one more, first
    extra.write_h5ad(tmp_path / "extra.h5ad")
    args = ["apply", str(tmp_path / "extra.h5ad"), "--model", str(tmp_path / "model"),
            "-o", str(tmp_path / "o.h5ad")]
    assert main(args) == 2
    assert "--no-layers" in capsys.readouterr().err and not (tmp_path / "o.h5ad").exists()
    assert main([*args, "--no-layers"]) == 0  # the latent ignores the extra gene
    # ...exactly: the model's genes are read by name, so the cells get the fit's latent.
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "o.h5ad").obsm["X_scvae"],
                               ad.read_h5ad(tmp_path / "fit.h5ad").obsm["X_scvae"],
                               rtol=1e-5, atol=1e-6)
    a[:, 1:].copy().write_h5ad(tmp_path / "missing.h5ad")
    assert main(["apply", str(tmp_path / "missing.h5ad"), "--model", str(tmp_path / "model"),
                 "-o", str(tmp_path / "m.h5ad")]) == 2
    err = capsys.readouterr().err
    assert a.var_names[0] in err  # the missing gene is named, with the flag that pads it
    assert "(on the command line: apply --pad-missing-genes)" in err
    with pytest.warns(UserWarning, match="1 of the model's 60 genes"):
        assert main(["apply", str(tmp_path / "missing.h5ad"), "--model", str(tmp_path / "model"),
                     "-o", str(tmp_path / "m.h5ad"), "--pad-missing-genes"]) == 0
    assert main(["apply", str(tmp_path / "missing.h5ad"), "--model", str(tmp_path / "model"),
                 "-o", str(tmp_path / "m2.h5ad"), "--pad-missing-genes",
                 "--max-missing-fraction", "0.01"]) == 2  # 1 of 60 is more than 1%
    assert "--max-missing-fraction" in capsys.readouterr().err
    # From a file read out of core: the file to write, no flag that --backed refuses, and
    # the padding limit as in memory (30 of 60 genes are too many to pad).
    assert main(["apply", str(tmp_path / "missing.h5ad"), "--model", str(tmp_path / "model"),
                 "-o", str(tmp_path / "b.h5ad"), "--backed"]) == 2
    err = capsys.readouterr().err
    assert ".to_memory(), model).write_h5ad(path)" in err and "--pad-missing-genes" not in err
    a[:, 30:].copy().write_h5ad(tmp_path / "half.h5ad")
    assert main(["apply", str(tmp_path / "half.h5ad"), "--model", str(tmp_path / "model"),
                 "-o", str(tmp_path / "b.h5ad"), "--backed"]) == 2
    assert "too many to pad" in capsys.readouterr().err
    padded = ad.read_h5ad(tmp_path / "m.h5ad")
    assert list(padded.var_names) == list(a.var_names)  # the model's genes, the first as zeros
    assert padded.var["scvae_padded"].tolist() == [True] + [False] * 59
    assert padded.X[:, 0].nnz == 0 and "scvae_denoised" in padded.layers
    # Training further on padded cells taught the model that the padded gene is never
    # expressed (and --save-model kept that model): refused, before anything is written.
    with pytest.warns(UserWarning, match="1 of the model's 60 genes"):
        assert main(["apply", str(tmp_path / "missing.h5ad"), "--model", str(tmp_path / "model"),
                     "-o", str(tmp_path / "m3.h5ad"), "--pad-missing-genes", "--warm-start",
                     "--epochs", "2", "--save-model", str(tmp_path / "m3_model")]) == 2
    err = capsys.readouterr().err
    assert "flags 1 of the model's genes" in err
    assert "on the command line: apply --pad-missing-genes" not in err  # (it was given)
    assert not (tmp_path / "m3.h5ad").exists() and not (tmp_path / "m3_model").exists()
    # Nothing is written into the --model folder: it holds only the model.
    for flag, path in (("-o", tmp_path / "model" / "o.h5ad"),
                       ("--save-model", tmp_path / "model" / "again")):
        out = [] if flag == "-o" else ["-o", str(tmp_path / "m4.h5ad")]
        assert main(["apply", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "model"),
                     *out, flag, str(path), "--no-layers"]) == 2
        assert "is inside the --model folder" in capsys.readouterr().err
        assert not path.exists()


def test_fit_reports_bad_keys_without_a_traceback(tmp_path, capsys):
    a = svt.datasets.synthetic_counts(n_cells=50, n_genes=20, seed=0)
    a.write_h5ad(tmp_path / "in.h5ad")
    rc = main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"),
               "--batch-key", "nope", "--quiet"])
    err = capsys.readouterr().err
    # The key keeps both its quotes (a KeyError's str() is the repr of its message).
    assert rc == 2 and "error: 'nope' is not a column of adata.obs" in err, err
    assert "(on the command line: --batch-key naming an existing column)" in err, err
    for flags, named in ((["--continuous-covariate-keys", "cell_type", "c2"],
                          "--continuous-covariate-keys naming an existing column"),
                         (["--size-factor-key", "sf"], "--size-factor-key naming an existing "
                          "column"),
                         (["--layer", "counts"], "leave out --layer to use adata.X")):
        assert main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"),
                     "--quiet", *flags]) == 2
        assert f"(on the command line: {named})" in capsys.readouterr().err
    # Fractional counts: the flag that allows them (lost once when the obs check was added)
    frac = a.copy()
    frac.X = frac.X.astype(np.float32) * 0.5
    frac.write_h5ad(tmp_path / "frac.h5ad")
    assert main(["fit", str(tmp_path / "frac.h5ad"), "-o", str(tmp_path / "o.h5ad"),
                 "--quiet"]) == 2
    assert "--allow-non-integer" in capsys.readouterr().err
    # An obsm-style key is refused before training, with the flag that fixes it.
    rc = main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"),
               "--key-added", "X_vae", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "(on the command line: --key-added vae)" in err, err
    for flags, named in ((["--dispersion", "gene-batch"], "--batch-key COLUMN"),
                         (["--early-stopping-patience", "0"], "--no-early-stopping"),
                         (["--resume"], "--checkpoint-dir DIR")):
        assert main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"),
                     "--quiet", *flags]) == 2
        assert f"(on the command line: {named})" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()


def test_fit_errors_give_the_flag_that_fixes_them(tmp_path, capsys):
    """Normalised X with the counts in a layer: the message names the layer and its flag."""
    a = svt.datasets.synthetic_counts(n_cells=100, n_genes=30, seed=0)
    a.layers["counts"] = a.X.copy()
    a.X = a.X.multiply(1e4 / a.X.sum(1)).tocsr().log1p()
    a.write_h5ad(tmp_path / "lognorm.h5ad")
    args = ["fit", str(tmp_path / "lognorm.h5ad"), "-o", str(tmp_path / "o.h5ad"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "adata.layers['counts']" in err and "(on the command line: --layer counts" in err
    assert main([*args, "--layer", "counts", "--epochs", "2"]) == 0
    # The messages' own example ("e.g. layer='counts'") is no flag for a file without that
    # layer: only the layers the input has are suggested.
    a.layers["raw_counts"] = a.layers.pop("counts")
    a.write_h5ad(tmp_path / "lognorm.h5ad")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "(on the command line: --layer raw_counts, --allow-non-integer)" in err, err
    del a.layers["raw_counts"]
    a.write_h5ad(tmp_path / "lognorm.h5ad")
    assert main(args) == 2
    assert "--layer" not in capsys.readouterr().err.split("on the command line")[-1]


def test_an_hdf5_file_that_is_not_an_h5ad_is_one_line(tmp_path, capsys):
    """A 10x .h5 (groups matrix/…) made anndata raise a TypeError: a 12-frame traceback;
    with --backed, h5py's text without the file's name or the fix."""
    import h5py

    with h5py.File(tmp_path / "p.h5", "w") as f:
        f["matrix/data"] = np.arange(3)
    for extra in ([], ["--backed"]):
        assert main(["fit", str(tmp_path / "p.h5"), "-o", str(tmp_path / "o.h5ad"),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert "p.h5 cannot be read as an .h5ad file" in err and "sc.read_10x_h5" in err, err
        assert "Traceback" not in err
    with pytest.raises(ValueError, match="is a folder"):
        svt.SCVAE(str(tmp_path))


def test_fit_passes_cuda_graphs_on(tmp_path, capsys):
    """--cuda-graphs reaches train(): on a CPU it is refused with the fix named."""
    a = svt.datasets.synthetic_counts(n_cells=50, n_genes=20, seed=0)
    a.write_h5ad(tmp_path / "in.h5ad")
    rc = main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"),
               "--cuda-graphs", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "cuda_graphs=True needs a CUDA device" in err
    assert "(on the command line: leave out --cuda-graphs)" in err, err


def test_demo_as_module(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scvae_tools.cli", "demo", "-o", str(tmp_path / "demo"),
         "--epochs", "3", "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for f in ["pbmc68k_scvae.h5ad", "umap.png", "training_history.png", "model/config.json"]:
        assert (tmp_path / "demo" / f).exists(), f
    out = ad.read_h5ad(tmp_path / "demo" / "pbmc68k_scvae.h5ad")
    assert "X_umap" in out.obsm and "leiden" in out.obs


def test_warnings_print_as_one_line_without_our_source():
    """At the command line a warning reads "warning: …", not a path into cli.py."""
    code = ("import warnings, scvae_tools.cli as c\n"
            "c.cmd_demo = lambda args: warnings.warn('look here') or 0\n"
            "raise SystemExit(c.main(['demo']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == "warning: look here\n", proc.stderr


def test_committed_synthetic_file_matches_its_generator(tmp_path):
    """data/synthetic_small.h5ad is what data/README.md says wrote it, and it trains."""
    path = Path(__file__).resolve().parent.parent / "data" / "synthetic_small.h5ad"
    saved = ad.read_h5ad(path)
    again = svt.datasets.synthetic_counts(n_cells=600, n_genes=300, n_types=4, n_batches=2,
                                          seed=0, **svt.datasets.PBMC_LIKE)
    assert (saved.X != again.X).nnz == 0 and list(saved.var_names) == list(again.var_names)
    for key in ("cell_type", "batch"):
        assert list(saved.obs[key].astype(str)) == list(again.obs[key].astype(str))
    # With the defaults and the batch given, the types separate (k-means on PCA of the
    # log-normalised counts, which the batch effect confounds: ARI 0.28).
    rc = main(["fit", str(path), "-o", str(tmp_path / "fit.h5ad"), "--batch-key", "batch",
               "--quiet"])
    assert rc == 0
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    out = ad.read_h5ad(tmp_path / "fit.h5ad")
    found = KMeans(4, n_init=10, random_state=0).fit_predict(out.obsm["X_scvae"])
    assert adjusted_rand_score(out.obs["cell_type"], found) > 0.85  # 0.92


def test_apply_query_maps_new_batches(tmp_path, capsys):
    """Cells of an unseen batch: plain `apply` names `--query`; with it, only the new
    batch's weights are fitted, so reference cells keep their coordinates."""
    a = svt.datasets.synthetic_counts(n_cells=300, n_genes=50, n_batches=3, seed=0)
    ref, query = a[a.obs["batch"] != "batch2"].copy(), a[a.obs["batch"] == "batch2"].copy()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    assert main(["fit", str(tmp_path / "ref.h5ad"), "-o", str(tmp_path / "ref_out.h5ad"),
                 "--batch-key", "batch", "--epochs", "5", "--quiet",
                 "--save-model", str(tmp_path / "ref_model")]) == 0
    args = ["apply", str(tmp_path / "query.h5ad"), "--model", str(tmp_path / "ref_model"),
            "-o", str(tmp_path / "query_out.h5ad")]
    assert main(args) == 2 and "apply --query" in capsys.readouterr().err
    # fine-tuning flags without --query would be ignored: refused instead
    assert main([*args, "--epochs", "5"]) == 2
    assert "--epochs and --seed set the training of --query or --warm-start" in capsys.readouterr().err
    assert main([*args, "--query", "--warm-start"]) == 2
    assert "leave out --warm-start" in capsys.readouterr().err
    # saving the mapped model over the reference would lose it (and its history)
    assert main([*args, "--query", "--epochs", "5", "--quiet",
                 "--save-model", str(tmp_path / "ref_model")]) == 2
    assert "is the --model folder" in capsys.readouterr().err
    assert main([*args, "--query", "--epochs", "-5"]) == 2  # ran nothing, exit 0, before
    assert "max_epochs must be an integer >= 0" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["demo", "-o", str(tmp_path / "a_file"), "--epochs", "1", "--quiet"]) == 2
    assert "demo writes a folder" in capsys.readouterr().err
    assert main([*args, "--query", "--epochs", "5", "--quiet",
                 "--save-model", str(tmp_path / "query_model")]) == 0
    assert "trained 5 epochs" in capsys.readouterr().out  # the query's training, as fit says
    out = ad.read_h5ad(tmp_path / "query_out.h5ad")
    assert out.obsm["X_scvae"].shape == (query.n_obs, 10) and np.isfinite(out.obsm["X_scvae"]).all()
    mapped = svt.SCVAE.load(tmp_path / "query_model")
    # What was written is the fine-tuned model's latent (the one saved), with its new batch.
    assert mapped.query_info["new_categories"] == {"batch": ["batch2"]}
    assert out.uns["scvae"]["query"]["new_categories"]["batch"] == ["batch2"]
    np.testing.assert_allclose(out.obsm["X_scvae"], mapped.get_latent_representation(query),
                               rtol=1e-4, atol=1e-5)
    ref_out = ad.read_h5ad(tmp_path / "ref_out.h5ad")
    np.testing.assert_allclose(mapped.get_latent_representation(ref), ref_out.obsm["X_scvae"],
                               rtol=1e-4, atol=1e-5)


def test_save_model_never_deletes_other_files(tmp_path, capsys):
    """`--save-model` replaces a saved model, but refuses, before training, a folder holding
    anything else (here the input itself): saving there would have deleted it."""
    a = svt.datasets.synthetic_counts(n_cells=60, n_genes=20, seed=0)
    data = tmp_path / "data"
    data.mkdir()
    a.write_h5ad(data / "in.h5ad")
    rc = main(["fit", str(data / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"), "--epochs", "1",
               "--quiet", "--save-model", str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and "holds files that are not part of a saved model (in.h5ad)" in err, err
    assert sorted(p.name for p in data.iterdir()) == ["in.h5ad"]
    assert not (tmp_path / "o.h5ad").exists()  # refused before training
    # -o inside the --save-model folder: refused before training (saving after the results
    # were written there would be refused, and the model lost)
    rc = main(["fit", str(data / "in.h5ad"), "-o", str(tmp_path / "run" / "result.h5ad"),
               "--epochs", "1", "--quiet", "--save-model", str(tmp_path / "run")])
    assert rc == 2 and "would also hold" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    rc = main(["fit", str(data / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"), "--epochs", "1",
               "--quiet", "--save-model", str(tmp_path / "m2"),
               "--checkpoint-dir", str(tmp_path / "m2" / "ck")])  # the same for checkpoints
    assert rc == 2 and "would also hold" in capsys.readouterr().err
    for _ in range(2):  # a new folder, then the saved model replaced
        assert main(["fit", str(data / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"), "--epochs",
                     "1", "--quiet", "--save-model", str(tmp_path / "model")]) == 0
    svt.SCVAE.load(tmp_path / "model", a)


def test_output_problems_are_one_line_errors_before_training(tmp_path, capsys, monkeypatch):
    """Not an .h5ad, -o a folder or the input itself: one line and status 2, found before
    training. The results are written before the model is saved, so a failed save (here
    "--save-model ." in an empty folder works) never loses them."""
    a = svt.datasets.synthetic_counts(n_cells=60, n_genes=20, seed=0)
    a.write_h5ad(tmp_path / "in.h5ad")
    (tmp_path / "notes.h5ad").write_text("not hdf5")
    (tmp_path / "outdir").mkdir()
    trained = []
    monkeypatch.setattr(svt.SCVAE, "train", lambda self, **k: trained.append(1))
    for argv, message in (
            (["notes.h5ad", "-o", "o.h5ad"], "error: notes.h5ad cannot be read as an .h5ad"),
            (["in.h5ad", "-o", "outdir"], "-o outdir is a folder"),
            (["in.h5ad", "-o", "in.h5ad", "--backed"], "-o in.h5ad is the input file")):
        monkeypatch.chdir(tmp_path)
        assert main(["fit", *argv, "--epochs", "1", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # Two more, also before training: -o "results/" named a folder and wrote a file called
    # results; --save-model below a file failed with a bare errno after training.
    (tmp_path / "env.sh").write_text("export X=1")
    for argv, message in (
            (["in.h5ad", "-o", "results/"], "-o results/ names a folder"),
            (["in.h5ad", "-o", "o.h5ad", "--save-model", "env.sh/model"],
             "--save-model env.sh/model: cannot write into")):
        assert main(["fit", *argv, "--epochs", "1", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert "env.sh (a file, not a folder)" in err
    assert not trained and not (tmp_path / "results").exists()
    monkeypatch.undo()
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"),
                 "--epochs", "1", "--quiet", "--save-model", "."]) == 0
    svt.SCVAE.load(empty, a)
    assert (tmp_path / "o.h5ad").exists()
    assert oct(empty.stat().st_mode & 0o077) != "0o0"  # the umask's bits, not mkdtemp's 0700


@pytest.mark.parametrize("backed", [False, True])
def test_counts_only_in_a_layer_name_the_flag(tmp_path, capsys, backed):
    """X is None: the error names --layer (it said `layer=`, a Python argument)."""
    a = svt.datasets.synthetic_counts(n_cells=40, n_genes=10, seed=0)
    b = ad.AnnData(obs=a.obs, var=a.var)
    b.layers["counts"] = a.X.copy()
    b.write_h5ad(tmp_path / "in.h5ad")
    rc = main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad"), "--quiet",
               "--epochs", "1", *(["--backed"] if backed else [])])
    assert rc == 2
    assert "(on the command line: --layer LAYER)" in capsys.readouterr().err


def test_every_model_and_training_setting_has_a_flag():
    """The README says so: `fit` lacked --weight-decay and --eps."""
    import argparse
    import inspect

    from scvae_tools import cli

    parser = argparse.ArgumentParser()
    cli._add_model_args(parser)
    dests = {a.dest for a in parser._actions}
    renamed = {"max_epochs": "epochs", "early_stopping": "no_early_stopping",
               "progress_bar": "quiet", "use_batch_norm": "batch_norm"}
    wanted = (set(inspect.signature(svt.SCVAE.__init__).parameters)
              | set(inspect.signature(svt.SCVAE.train).parameters)) - {"self", "adata"}
    # strategy and checkpoints are flags of `fit` itself (torchrun and resume options);
    # warm_start continues a trained model, and `fit` trains a new one
    missing = {w for w in wanted if renamed.get(w, w) not in dests} - {
        "strategy", "checkpoint_dir", "checkpoint_every", "resume", "warm_start"}
    assert not missing, missing


def test_a_failed_write_keeps_the_previous_output(tmp_path, capsys, monkeypatch):
    """The in-memory output was written in place: a full disk left a truncated, unreadable
    file where the previous results had been. It is now written to a temporary sibling and
    renamed."""
    a = svt.datasets.synthetic_counts(n_cells=60, n_genes=20, seed=0)
    a.write_h5ad(tmp_path / "in.h5ad")
    argv = ["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"), "--epochs", "1",
            "--quiet"]
    assert main(argv) == 0
    before = (tmp_path / "o.h5ad").read_bytes()

    def full_disk(self, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"\x89HDF\r\n")  # a few bytes, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", full_disk)
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert (tmp_path / "o.h5ad").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "o.h5ad"]


def test_apply_layer_reads_counts_where_the_input_keeps_them(tmp_path, capsys, monkeypatch):
    """A model trained on layers['counts'], applied to a file with its counts in X (and the
    reverse): `apply` had no --layer, and its errors named a Python fix only. Same cells,
    same latent, wherever the counts are; SCVAE.load(layer=) underneath."""
    monkeypatch.chdir(tmp_path)
    a = svt.datasets.synthetic_counts(n_cells=120, n_genes=30, n_batches=2, seed=0)
    b = a.copy()
    b.layers["counts"] = b.X.copy()
    b.X = b.X.multiply(1e4 / b.X.sum(1)).tocsr().log1p()
    b.write_h5ad("layer.h5ad")
    a.write_h5ad("x.h5ad")
    assert main(["fit", "layer.h5ad", "-o", "o1.h5ad", "--layer", "counts", "--epochs", "2",
                 "--quiet", "--save-model", "lmodel", "--batch-key", "batch"]) == 0
    assert main(["apply", "x.h5ad", "--model", "lmodel", "-o", "o2.h5ad"]) == 2
    assert "(on the command line: --layer X if adata.X holds the counts)" in capsys.readouterr().err
    assert main(["apply", "x.h5ad", "--model", "lmodel", "-o", "o2.h5ad", "--layer", "X"]) == 0
    np.testing.assert_array_equal(ad.read_h5ad("o2.h5ad").obsm["X_scvae"],
                                  ad.read_h5ad("o1.h5ad").obsm["X_scvae"])
    assert main(["fit", "x.h5ad", "-o", "o3.h5ad", "--epochs", "2", "--quiet",
                 "--save-model", "xmodel"]) == 0
    assert main(["apply", "layer.h5ad", "--model", "xmodel", "-o", "o4.h5ad"]) == 2
    assert "(on the command line: --layer counts)" in capsys.readouterr().err
    assert main(["apply", "layer.h5ad", "--model", "xmodel", "-o", "o4.h5ad",
                 "--layer", "counts"]) == 0
    o4 = ad.read_h5ad("o4.h5ad")
    np.testing.assert_array_equal(o4.obsm["X_scvae"], ad.read_h5ad("o3.h5ad").obsm["X_scvae"])
    np.testing.assert_array_equal(o4.X.toarray(), b.X.toarray())  # the input's X is kept
    model = svt.SCVAE.load("lmodel", a, layer=None)  # the Python call underneath
    np.testing.assert_array_equal(model.get_latent_representation(),
                                  ad.read_h5ad("o1.h5ad").obsm["X_scvae"])
    with pytest.raises(TypeError, match="layer must be a layer name or None"):
        svt.SCVAE.load("lmodel", a, layer=0)
    with pytest.raises(KeyError, match=r"layer='raw' \(given to SCVAE.load\) is not a layer"):
        svt.SCVAE.load("lmodel", a, layer="raw")  # not "the model was trained on" it
