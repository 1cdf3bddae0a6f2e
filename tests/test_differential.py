"""Differential expression: scvi-tools-style columns, sign convention, FDR control, scanpy format."""

from __future__ import annotations

import functools

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import scvae_tools as svt
from scvae_tools.differential import _fdr_calls, posterior_expected_fdr

SCVI_COLUMNS = [
    "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta",
    "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max", "raw_mean1", "raw_mean2",
    "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1",
    "raw_normalized_mean2", "is_de_fdr_0.05", "comparison", "group1", "group2",
]


@pytest.fixture(scope="module")
def fitted():
    adata = svt.datasets.synthetic_counts(n_cells=600, n_genes=150, n_types=3, seed=0)
    model = svt.SCVAE(adata, n_latent=5)
    model.train(max_epochs=40, batch_size=64, progress_bar=False, seed=0)
    return model, adata


def _null_split(adata, cell_type: str, seed: int = 0):
    """A copy with obs['half'] = A / B for random halves of one type, 'other' elsewhere."""
    out = adata.copy()
    idx = np.random.default_rng(seed).permutation(np.flatnonzero(out.obs["cell_type"] == cell_type))
    half = np.full(out.n_obs, "other", dtype=object)
    half[idx[: len(idx) // 2]] = "A"
    half[idx[len(idx) // 2:]] = "B"
    out.obs["half"] = pd.Categorical(half)
    return out


def test_raw_statistics_are_the_groups_own(fitted, monkeypatch):
    """raw_mean, non_zeros_proportion and raw_normalized_mean are plain per-group statistics
    of the counts (read in chunks of rows: the small chunk here crosses its boundaries)."""
    from scvae_tools import differential

    model, adata = fitted
    X = adata.X.toarray()
    lib = X.sum(1)
    g1, rest = adata.obs["cell_type"] == "type0", adata.obs["cell_type"] != "type0"
    sums = differential._group_sums
    for chunk in (None, 7):
        monkeypatch.setattr(differential, "_group_sums", functools.partial(sums, chunk=chunk))
        de = model.differential_expression(adata, "cell_type", "type0", n_samples=50)
        de = de.loc[adata.var_names]
        for i, cells in ((1, g1.to_numpy()), (2, rest.to_numpy())):
            np.testing.assert_allclose(de[f"raw_mean{i}"], X[cells].mean(0), rtol=1e-6)
            np.testing.assert_allclose(de[f"non_zeros_proportion{i}"], (X[cells] > 0).mean(0))
            np.testing.assert_allclose(de[f"raw_normalized_mean{i}"],
                                       (X[cells] / lib[cells, None] * 1e4).mean(0), rtol=1e-6)


def test_columns_order_and_sign(fitted):
    model, adata = fitted
    before = adata.copy()
    de = model.differential_expression(adata, "cell_type", "type0", "type1", n_samples=300)
    assert list(de.columns) == SCVI_COLUMNS
    assert sorted(de.index) == sorted(adata.var_names) and de.index.is_unique
    assert np.all(np.diff(de["proba_de"].to_numpy()) <= 0)  # strongest evidence first
    assert (de["comparison"] == "type0 vs type1").all()
    np.testing.assert_allclose(de["proba_de"] + de["proba_not_de"], 1.0)
    assert (de["lfc_min"] <= de["lfc_mean"]).all() and (de["lfc_mean"] <= de["lfc_max"]).all()
    # Positive LFC = higher in group1, and it agrees with the raw normalised means.
    emp = np.log2((de["raw_normalized_mean1"] + 0.5) / (de["raw_normalized_mean2"] + 0.5))
    strong = de["is_de_fdr_0.05"] & (emp.abs() > 1)
    assert strong.sum() >= 10
    assert (np.sign(de.loc[strong, "lfc_mean"]) == np.sign(emp[strong])).all()
    # adata is untouched without key_added.
    assert list(adata.uns) == list(before.uns) and adata.obs.equals(before.obs)


def _true_lfc(group1: str, group2: str) -> pd.Series:
    """Population log2 fold changes of mean proportions: synthetic_counts' profiles depend only
    on the seed, so 30,000 fresh cells from the same seed estimate them precisely."""
    big = svt.datasets.synthetic_counts(n_cells=30000, n_genes=150, n_types=3, seed=0)
    X = big.X.toarray()
    X = X / X.sum(1, keepdims=True)
    t = big.obs["cell_type"].astype(str).to_numpy()
    return pd.Series(np.log2(X[t == group1].mean(0) / X[t == group2].mean(0)), index=big.var_names)


def test_calls_match_the_truth(fitted):
    model, adata = fitted
    de = model.differential_expression(adata, "cell_type", "type0", "type1", n_samples=300)
    true = _true_lfc("type0", "type1").loc[de.index]
    called = de["is_de_fdr_0.05"].to_numpy()
    # Nearly every gene that truly changes more than 2-fold is called, in the right direction.
    big = (true.abs() > 1).to_numpy()
    assert called[big].mean() >= 0.95
    assert (np.sign(de["lfc_mean"][called & big]) == np.sign(true[called & big])).all()
    # Called genes truly change: most by more than delta. The posterior covers which cells
    # were sampled, their z and count noise, but not the decoder's own bias, so genes with a
    # true |LFC| just under delta can slip in (see the differential module's docstring).
    assert (true[called].abs() >= 0.25).mean() >= 0.85
    assert np.corrcoef(true, de["lfc_mean"])[0, 1] > 0.97


def test_null_split_calls_nothing(fitted):
    model, adata = fitted
    split = _null_split(adata, "type0")
    de = model.differential_expression(split, "half", "A", "B", n_samples=300)
    assert de["is_de_fdr_0.05"].sum() == 0
    assert de["proba_de"].max() < 0.9


def test_fdr_rule():
    p = np.array([1.0, 0.99, 0.97, 0.9, 0.6, 0.1])
    np.testing.assert_allclose(posterior_expected_fdr(p)[:3], [0.0, 0.005, 0.04 / 3])
    # Expected FDR of the top 4 is (0 + .01 + .03 + .1) / 4 = 0.035; of the top 5, 0.108.
    assert _fdr_calls(p, 0.05).tolist() == [True, True, True, True, False, False]
    assert _fdr_calls(p, 0.001).tolist() == [True, False, False, False, False, False]


def test_one_vs_rest_and_rank_genes_groups_format(fitted, tmp_path):
    model, adata = fitted
    adata = adata.copy()
    de = model.differential_expression(adata, "cell_type", n_samples=200, key_added="scvae_de")
    assert set(de["comparison"]) == {"type0 vs Rest", "type1 vs Rest", "type2 vs Rest"}
    assert len(de) == 3 * adata.n_vars
    uns = adata.uns["scvae_de"]
    assert uns["params"]["groupby"] == "cell_type" and uns["params"]["reference"] == "rest"
    assert uns["names"].dtype.names == ("type0", "type1", "type2")
    for g in ("type0", "type1", "type2"):
        scores = uns["scores"][g]
        assert np.all(np.diff(scores) <= 1e-7)  # up in the group first, down last
        sub = de[de["group1"] == g]
        top = uns["names"][g][0]
        assert sub.loc[top, "lfc_mean"] > 0 and sub.loc[top, "proba_de"] > 0.9
    df = sc.get.rank_genes_groups_df(adata, "type1", key="scvae_de")
    assert list(df.columns[:5]) == ["names", "scores", "logfoldchanges", "pvals", "pvals_adj"]
    assert df["pvals_adj"].between(0, 1).all()
    # scanpy's plots read it, and the AnnData still writes to h5ad.
    sc.pl.rank_genes_groups(adata, key="scvae_de", n_genes=5, show=False)
    sc.pl.rank_genes_groups_dotplot(adata, key="scvae_de", n_genes=3, show=False,
                                    values_to_plot="logfoldchanges", cmap="bwr",
                                    vmin=-4, vmax=4)
    adata.write_h5ad(tmp_path / "de.h5ad")


def test_vanilla_mode(fitted):
    model, adata = fitted
    de = model.differential_expression(adata, "cell_type", "type0", "type2", mode="vanilla",
                                       n_samples=200)
    assert {"proba_m1", "proba_m2", "bayes_factor"} <= set(de.columns)
    assert "proba_de" not in de.columns
    assert np.all(np.diff(de["bayes_factor"].to_numpy()) <= 0)
    # The Bayes factor saturates for clear markers: genes tied on it come largest effect
    # first (they came in gene order, the strongest markers anywhere among them).
    top = de[de["bayes_factor"] == de["bayes_factor"].max()]
    assert len(top) > 1 and np.all(np.diff(top["lfc_mean"].to_numpy()) <= 0)
    up = de["proba_m1"] > 0.99
    assert (de.loc[up, "lfc_mean"] > 0).all()
    # In scanpy's layout, pvals and pvals_adj agree in both directions: a gene far lower in
    # type0 is as significant as one far higher (pvals was 1 − proba_m1, so ~1.0 for it).
    a = adata.copy()
    model.differential_expression(a, "cell_type", "type0", "type2", mode="vanilla",
                                  n_samples=200, key_added="vanilla")
    df = sc.get.rank_genes_groups_df(a, "type0", key="vanilla")
    down = df["logfoldchanges"] < -1
    assert down.any() and (df.loc[down, "pvals"] < 0.05).mean() > 0.9
    kept = sc.get.rank_genes_groups_df(a, "type0", key="vanilla", pval_cutoff=0.05)
    assert (kept["pvals"] < 0.5).all() and (kept["logfoldchanges"] < 0).any()


def test_groups_as_scanpy_and_scvi_tools_name_them(fitted):
    """An integer label names one group; group1=None with group2 tests every other group
    against group2 (it was refused: "both contain group2")."""
    model, adata = fitted
    a = adata.copy()
    a.obs["type_id"] = a.obs["cell_type"].cat.codes.astype(int)  # 0, 1, 2
    by_int = model.differential_expression(a, "type_id", 0, 2, n_samples=50)
    by_name = model.differential_expression(a, "cell_type", "type0", "type2", n_samples=50)
    pd.testing.assert_series_equal(by_int["lfc_mean"], by_name["lfc_mean"])
    each = model.differential_expression(a, "cell_type", group2="type2", n_samples=50)
    assert sorted(set(each["comparison"])) == ["type0 vs type2", "type1 vs type2"]


def test_float_labels_numpy_delta_and_a_path(fitted, tmp_path):
    """Labels stored as floats (0.0) are named as integers, a NumPy delta is a number, and a
    path is read backed (all three were refused)."""
    model, adata = fitted
    a = adata.copy()
    a.obs["type_id"] = a.obs["cell_type"].cat.codes.astype(float)  # 0.0, 1.0, 2.0
    by_float = model.differential_expression(a, "type_id", 0, 2, n_samples=50, seed=3,
                                             delta=np.float32(0.25))
    by_name = model.differential_expression(a, "cell_type", "type0", "type2", n_samples=50,
                                            seed=3)
    pd.testing.assert_series_equal(by_float["lfc_mean"], by_name["lfc_mean"])
    assert set(by_float["group1"]) == {"0"}
    for spelling in ("0.0", "0", 0.0):  # every spelling of a whole number names the group
        again = model.differential_expression(a, "type_id", spelling, 2, n_samples=50, seed=3)
        pd.testing.assert_series_equal(again["lfc_mean"], by_name["lfc_mean"])
    a.obs["as_text"] = a.obs["type_id"].astype(str)  # "0.0", "1.0", "2.0"
    text = model.differential_expression(a, "as_text", 0, 2.0, n_samples=50, seed=3)
    assert set(text["group1"]) == {"0.0"} and set(text["group2"]) == {"2.0"}
    a.write_h5ad(tmp_path / "a.h5ad")
    by_path = model.differential_expression(str(tmp_path / "a.h5ad"), "cell_type", "type0",
                                            "type2", n_samples=50, seed=3)
    pd.testing.assert_series_equal(by_path["lfc_mean"], by_name["lfc_mean"])


def test_group_means_stay_positive_for_a_marker_of_a_small_group(monkeypatch):
    """A marker of a few cells, absent elsewhere: the model's θ for the gene is fitted over
    all cells and predicts count noise far wider than within the group. A Normal clipped at
    0 then made the group's mean exactly 0 in many replicates; the Gamma, capped at the
    group's own variance, keeps every replicate positive."""
    from scvae_tools import differential

    rng = np.random.default_rng(0)
    n, g = 400, 30
    X = rng.poisson(5.0, size=(n, g)).astype(np.float32)
    X[:, 0] = 0
    X[:8, 0] = rng.integers(20, 60, size=8)  # 8 cells carry the marker, every one of them
    adata = svt.datasets.synthetic_counts(n_cells=n, n_genes=g, seed=0)
    adata.X = X
    adata.obs["group"] = pd.Categorical(np.where(np.arange(n) < 8, "small", "rest"))
    model = svt.SCVAE(adata, n_latent=3)
    model.train(max_epochs=15, batch_size=64, progress_bar=False, seed=0)
    seen = []
    real = differential._bootstrap_means
    monkeypatch.setattr(differential, "_bootstrap_means",
                        lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    de = model.differential_expression(adata, "group", "small", "rest", n_samples=400)
    assert (seen[0] > 0).all()  # no replicate of the small group's mean is 0
    assert np.isfinite(de["lfc_mean"]).all()


def test_bad_input_is_explained(fitted):
    model, adata = fitted
    with pytest.raises(KeyError, match="not a column"):
        model.differential_expression(adata, "celltype", "type0")
    with pytest.raises(KeyError, match="type9"):
        model.differential_expression(adata, "cell_type", "type9")
    with pytest.raises(ValueError, match="delta"):
        model.differential_expression(adata, "cell_type", "type0", delta=0)
    with pytest.raises(ValueError, match="mode"):
        model.differential_expression(adata, "cell_type", "type0", mode="t-test")
    with pytest.raises(ValueError, match="differ"):
        model.differential_expression(adata, "cell_type", "type0", "type0")
    with pytest.raises(ValueError, match="adata"):
        model.differential_expression(None, "cell_type", "type0")
    a = adata.copy()
    for key, message in (("a/b", "must not contain '/'"), ("", "non-empty string"),
                         (5, "non-empty string")):  # '' wrote the fields into uns itself
        with pytest.raises(ValueError, match=message):
            model.differential_expression(a, "cell_type", "type0", n_samples=10, key_added=key)
    assert not a.uns


def test_a_group_named_twice_is_tested_once(fitted):
    """["type0", "type1", "type0"] computed type0 twice: its genes twice in the table, and
    key_added then failed after all the work ("All arrays must be of the same length")."""
    model, adata = fitted
    a = adata.copy()
    a.obs["type_id"] = a.obs["cell_type"].cat.codes.astype(int)
    de = model.differential_expression(a, "cell_type", ["type0", "type1", "type0"],
                                       n_samples=20, key_added="de")
    assert list(pd.unique(de["group1"])) == ["type0", "type1"] and len(de) == 2 * a.n_vars
    assert sc.get.rank_genes_groups_df(a, "type0", key="de")["names"].is_unique
    assert len(model.differential_expression(a, "type_id", [0, "0"], n_samples=20)) == a.n_vars


def test_padded_genes_do_not_set_the_pseudocount(fitted):
    """Genes prepare_query_anndata added as zeros were taken as 'never detected', so the
    model's prediction for them (here the five most expressed genes) set the estimated
    pseudocount: 1e-10 became 0.04 (a gene proportion) and 52 calls became 1."""
    model, adata = fitted
    drop = np.argsort(-np.asarray(adata.X.mean(0)).ravel())[:5]
    keep = adata.var_names.delete(drop)
    with pytest.warns(UserWarning, match="missing from the query"):
        query = svt.SCVAE.prepare_query_anndata(adata[:, keep].copy(), model)
    full = model.differential_expression(adata, "cell_type", "type0", "type1", n_samples=200)
    with pytest.warns(UserWarning, match=r"flags 5 of the model's genes .*pseudocount"):
        padded = model.differential_expression(query, "cell_type", "type0", "type1",
                                               n_samples=200)
    assert padded["pseudocounts"].iloc[0] == full["pseudocounts"].iloc[0]
    calls = full.loc[keep, "is_de_fdr_0.05"].sum()
    assert calls >= 20 and padded.loc[keep, "is_de_fdr_0.05"].sum() >= 0.7 * calls
    assert (padded.loc[adata.var_names[drop], "raw_mean1"] == 0).all()
    # Imputed genes are never called (the five dropped here are called on measured counts).
    assert full.loc[adata.var_names[drop], "is_de_fdr_0.05"].any()
    assert not padded.loc[adata.var_names[drop], "is_de_fdr_0.05"].any()


def test_padded_genes_are_not_called_in_rank_genes_groups(fitted):
    """key_added= wrote the expected FDR over every gene, padded ones included: a
    pval_cutoff on sc.get.rank_genes_groups_df kept a gene the DataFrame never calls."""
    model, adata = fitted
    drop = np.argsort(-np.asarray(adata.X.mean(0)).ravel())[:5]
    keep = adata.var_names.delete(drop)
    with pytest.warns(UserWarning, match="missing from the query"):
        query = svt.SCVAE.prepare_query_anndata(adata[:, keep].copy(), model)
    dropped = set(adata.var_names[drop])
    for mode in ("change", "vanilla"):
        with pytest.warns(UserWarning, match="flags 5 of the model's genes"):
            de = model.differential_expression(query, "cell_type", "type0", "type1",
                                               mode=mode, n_samples=200, key_added=mode)
        rgg = sc.get.rank_genes_groups_df(query, group="type0", key=mode).set_index("names")
        assert (rgg.loc[list(dropped), ["pvals", "pvals_adj"]] == 1).all().all()
        measured = rgg.drop(index=list(dropped))
        if mode == "change":  # the same calls as the DataFrame's
            called = set(de.index[de["is_de_fdr_0.05"]])
            assert len(called) >= 20
            assert set(measured.index[measured["pvals_adj"] <= 0.05]) == called
        # The measured genes' expected FDR is that of their own ranking.
        strength = 1 - measured["pvals"].to_numpy()
        ranked = np.sort(strength)[::-1]
        np.testing.assert_allclose(np.sort(measured["pvals_adj"].to_numpy()),
                                   np.cumsum(1 - ranked) / np.arange(1, len(ranked) + 1))


@pytest.mark.slow
def test_pbmc3k_markers_and_null_split(pbmc3k_nb_model, pbmc3k_hvg):
    model = pbmc3k_nb_model
    de = model.differential_expression(pbmc3k_hvg, "cell_type", "B", "CD14+ Mono")
    up = de[de["lfc_mean"] > 0].index[:25].tolist()
    down = de[de["lfc_mean"] < 0].index[:25].tolist()
    assert {"MS4A1", "CD79A"} <= set(up), up
    assert {"LYZ", "S100A8"} <= set(down), down
    assert de.loc[["MS4A1", "CD79A"], "is_de_fdr_0.05"].all()
    assert de.loc[["LYZ", "S100A8"], "is_de_fdr_0.05"].all()
    # FDR control: random halves of one cell type differ in no gene.
    split = _null_split(pbmc3k_hvg, "CD14+ Mono", seed=1)
    null = model.differential_expression(split, "half", "A", "B")
    assert null["is_de_fdr_0.05"].sum() == 0, null.head()


@pytest.mark.parametrize("likelihood", ["zinb", "poisson"])
def test_other_likelihoods_and_batch_correction(likelihood):
    adata = svt.datasets.synthetic_counts(n_cells=300, n_genes=60, n_types=2, n_batches=2, seed=2)
    model = svt.SCVAE(adata, batch_key="batch", likelihood=likelihood, n_latent=3,
                      dispersion="gene-batch" if likelihood == "zinb" else "gene")
    model.train(max_epochs=15, batch_size=64, progress_bar=False)
    for corrected in (False, True):
        de = model.differential_expression(adata, "cell_type", "type0", "type1", n_samples=200,
                                           batch_correction=corrected)
        assert np.isfinite(de[["proba_de", "lfc_mean", "lfc_std", "scale1", "scale2"]]).all().all()
        emp = np.log2((de["raw_normalized_mean1"] + 0.5) / (de["raw_normalized_mean2"] + 0.5))
        # Loose: a 15-epoch fit, and ZINB's ρ excludes the zero-inflation part of the mean.
        assert np.corrcoef(emp, de["lfc_mean"])[0, 1] > 0.6
