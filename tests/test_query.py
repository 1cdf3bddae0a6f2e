"""Reference mapping (SCVAE.load_query): architecture surgery, frozen reference, label transfer."""

from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import scvae_tools as svt

N_LATENT = 6


@pytest.fixture(scope="module")
def split():
    """Three batches with a strong batch effect; batch2 is held out as the query."""
    adata = svt.datasets.synthetic_counts(n_cells=600, n_genes=150, n_types=4, n_batches=3,
                                          batch_effect=0.8, seed=3)
    query_mask = (adata.obs["batch"] == "batch2").to_numpy()
    return adata[~query_mask].copy(), adata[query_mask].copy()


@pytest.fixture(scope="module")
def reference(split, tmp_path_factory):
    ref_adata, _ = split
    model = svt.SCVAE(ref_adata, batch_key="batch", n_latent=N_LATENT, dispersion="gene-batch")
    model.train(max_epochs=40, batch_size=64, progress_bar=False, seed=0)
    path = tmp_path_factory.mktemp("ref") / "model"
    model.save(path)
    return model, path


@pytest.fixture(scope="module")
def query_model(split, reference):
    _, query_adata = split
    return svt.SCVAE.load_query(reference[1], query_adata, max_epochs=40, batch_size=64,
                                progress_bar=False)


def test_surgery_adds_the_new_batch_and_keeps_reference_cells_fixed(split, reference, query_model):
    ref_adata, _ = split
    ref_model, _ = reference
    assert query_model.spec.batch_categories == ["batch0", "batch1", "batch2"]
    assert query_model.module_config.n_batch == 3
    assert query_model.query_info["new_categories"] == {"batch": ["batch2"]}
    # Every reference weight is unchanged; only the new batch's input columns moved.
    n_genes = ref_model.spec.n_genes
    ref_sd, q_sd = ref_model.module.state_dict(), query_model.module.state_dict()
    for name, old in ref_sd.items():
        new = q_sd[name].cpu()
        if name == "encoder.body.0.weight":
            assert torch.equal(new[:, : n_genes + 2], old.cpu())
            assert not torch.allclose(new[:, n_genes + 2], old[:, n_genes:].mean(1).cpu())
        elif name == "decoder.body.0.weight":
            assert torch.equal(new[:, : N_LATENT + 2], old.cpu())
        elif name == "log_theta":
            assert torch.equal(new[:, :2], old.cpu())
        else:
            assert torch.equal(new, old.cpu()), name
    # Hence reference cells keep exactly their latent coordinates in the query model, with
    # sparse or dense counts (the dense path summed genes and covariates in one product,
    # whose rounding changed with the number of columns: up to 5e-7 apart).
    dense = ref_adata.copy()
    dense.X = dense.X.toarray()
    for cells in (ref_adata, dense):
        for bs in (None, 7):
            np.testing.assert_array_equal(
                query_model.get_latent_representation(cells, batch_size=bs),
                ref_model.get_latent_representation(cells, batch_size=bs))


def test_query_cells_map_next_to_their_type(split, reference, query_model):
    ref_adata, query_adata = split
    ref_model, _ = reference
    knn = KNeighborsClassifier(n_neighbors=15).fit(
        ref_model.get_latent_representation(ref_adata), ref_adata.obs["cell_type"].astype(str))
    pred = knn.predict(query_model.get_latent_representation(query_adata))
    accuracy = float(np.mean(pred == query_adata.obs["cell_type"].astype(str).to_numpy()))
    assert accuracy >= 0.9, accuracy


def test_fine_tuning_improves_the_query_fit(split, reference, query_model):
    _, query_adata = split
    start = svt.SCVAE.load_query(reference[1], query_adata, max_epochs=0, progress_bar=False)
    assert start.history.empty
    assert query_model.get_elbo() > start.get_elbo() + 1.0
    assert len(query_model.history) > 0
    assert query_model.history["validation_elbo"].notna().all()


def test_query_model_saves_and_reloads(split, query_model, tmp_path):
    _, query_adata = split
    query_model.save(tmp_path / "q")
    again = svt.SCVAE.load(tmp_path / "q", query_adata)
    np.testing.assert_allclose(again.get_latent_representation(),
                               query_model.get_latent_representation(), atol=1e-5)
    # How it was mapped survives the save and goes into uns, next to the reference's training
    info = query_model.query_info
    assert again.query_info == info and info["new_categories"] == {"batch": ["batch2"]}
    assert info["settings"]["max_epochs"] == 40 and info["settings"]["batch_size"] == 64
    a = query_adata.copy()
    again.write_to_adata(a, layers=False)
    assert a.uns["scvae"]["query"]["settings"]["seed"] == 0
    a.write_h5ad(tmp_path / "q.h5ad")
    assert ad.read_h5ad(tmp_path / "q.h5ad").uns["scvae"]["query"]["reference_dir"] == info[
        "reference_dir"]


def test_known_batches_only_need_no_fine_tuning(split, reference):
    ref_adata, _ = split
    ref_model, path = reference
    same = ref_adata[ref_adata.obs["batch"] == "batch0"].copy()
    model = svt.SCVAE.load_query(path, same, progress_bar=False)
    assert model.history.empty and model.query_info["new_categories"] == {}
    assert model.query_info["settings"]["max_epochs"] == 0  # nothing ran; it said 200
    assert model.query_info["reference_dir"] == os.path.abspath(path)
    np.testing.assert_allclose(model.get_latent_representation(),
                               ref_model.get_latent_representation(same), atol=1e-5)


def test_query_from_a_file_or_backed_equals_in_memory(split, reference, query_model, tmp_path):
    """load_query takes an .h5ad path or a backed AnnData (read into memory) as well."""
    _, query_adata = split
    query_adata.write_h5ad(tmp_path / "q.h5ad")
    z = query_model.get_latent_representation()
    for given in (tmp_path / "q.h5ad", ad.read_h5ad(tmp_path / "q.h5ad", backed="r")):
        m = svt.SCVAE.load_query(reference[1], given, max_epochs=40, batch_size=64,
                                 progress_bar=False)
        np.testing.assert_array_equal(m.get_latent_representation(), z)


def test_single_batch_reference_gets_a_zero_frozen_column(tmp_path):
    adata = svt.datasets.synthetic_counts(n_cells=300, n_genes=60, n_types=2, n_batches=2, seed=0)
    ref_adata = adata[adata.obs["batch"] == "batch0"].copy()
    ref = svt.SCVAE(ref_adata, batch_key="batch", n_latent=3)
    ref.train(max_epochs=3, progress_bar=False)
    ref.save(tmp_path / "ref")
    q = svt.SCVAE.load_query(tmp_path / "ref", adata[adata.obs["batch"] == "batch1"].copy(),
                             max_epochs=3, progress_bar=False)
    w = q.module.encoder.body[0].weight.detach().cpu()
    assert torch.all(w[:, 60] == 0)  # the reference batch's column: frozen at zero
    assert torch.any(w[:, 61] != 0)  # the new batch's column: trained
    np.testing.assert_allclose(q.get_latent_representation(ref_adata),
                               ref.get_latent_representation(ref_adata), atol=1e-5)


def test_bad_input_is_explained(split, tmp_path):
    ref_adata, query_adata = split
    plain = svt.SCVAE(ref_adata, n_latent=3)
    plain.train(max_epochs=2, progress_bar=False)
    plain.save(tmp_path / "plain")
    with pytest.raises(ValueError, match="without batch_key"):
        svt.SCVAE.load_query(tmp_path / "plain", query_adata)
    batched = svt.SCVAE(ref_adata, batch_key="batch", n_latent=3)
    batched.train(max_epochs=2, progress_bar=False)
    batched.save(tmp_path / "batched")
    no_col = query_adata.copy()
    del no_col.obs["batch"]
    with pytest.raises(KeyError, match="batch"):
        svt.SCVAE.load_query(tmp_path / "batched", no_col)
    with pytest.raises(ValueError, match="genes"):
        svt.SCVAE.load_query(tmp_path / "batched", query_adata[:, :50].copy())
    # Settings as train() checks them: these ran 0 epochs, truncated, or failed deep inside.
    for bad, err, msg in (({"max_epochs": -1}, ValueError, "max_epochs must be an integer >= 0"),
                          ({"max_epochs": 2.7}, TypeError, "max_epochs must be a whole number"),
                          ({"max_epochs": True}, TypeError, "whole number"),
                          ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 2"),
                          ({"lr": 0.0}, ValueError, "lr must be a positive finite"),
                          ({"eps": float("nan")}, ValueError, "eps must be a positive finite"),
                          ({"early_stopping_patience": 2.5}, TypeError, "whole number"),
                          ({"seed": 1.5}, TypeError, "seed must be a whole number")):
        with pytest.raises(err, match=msg):
            svt.SCVAE.load_query(tmp_path / "batched", query_adata, **bad)
    # Loading draws no random numbers the caller would see (its weights are replaced).
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    svt.SCVAE.load(tmp_path / "batched")
    svt.SCVAE.load_query(tmp_path / "batched", query_adata, max_epochs=1, progress_bar=False,
                         eps=1e-8)
    torch.testing.assert_close(torch.rand(3), expected)


def test_transform_batch_encodes_with_the_observed_batch(split, reference):
    """Counterfactual expression: z from the cell's own batch, decoded as another batch."""
    ref_adata, _ = split
    model, _ = reference
    cells = ref_adata[ref_adata.obs["batch"] == "batch1"].copy()
    got = model.get_normalized_expression(cells, transform_batch="batch0")
    z = torch.as_tensor(model.get_latent_representation(cells))
    module = model.module.cpu().eval()
    as0 = torch.zeros(len(z), dtype=torch.long)
    with torch.no_grad():
        want = module.decode(z, torch.full((len(z), 1), 1e4), module.covariates(as0), as0)["mu"]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-6)
    # And it differs from decoding under the cell's own batch.
    assert not np.allclose(got, model.get_normalized_expression(cells), rtol=1e-2)


def test_prepare_query_anndata_pads_and_the_query_still_maps(split, reference, tmp_path):
    """A query with some of the reference's genes missing, others extra and the rest
    shuffled: padded with zeros, it maps onto the reference and keeps its labels."""
    import pandas as pd
    import scipy.sparse as sp

    ref_adata, query_adata = split
    ref_model, path = reference
    rng = np.random.default_rng(0)
    genes = query_adata.var_names.to_numpy()
    dropped = rng.choice(genes, 8, replace=False)  # ~5% of the 150 genes
    keep = rng.permutation([g for g in genes if g not in set(dropped)])
    sub = query_adata[:, keep]
    extra = sp.csr_matrix(rng.poisson(1.0, size=(sub.n_obs, 3)).astype(np.float32))
    q = ad.AnnData(X=sp.hstack([sub.X, extra], format="csr"), obs=sub.obs.copy(),
                   var=pd.DataFrame({"note": "x"}, index=[*keep, "EXTRA1", "EXTRA2", "EXTRA3"]))
    q.layers["counts"] = q.X.toarray()  # dense layers are padded as well
    q.obsm["X_other"] = rng.normal(size=(q.n_obs, 2))
    q.obsp["connectivities"] = sp.random(q.n_obs, q.n_obs, density=0.05, format="csr",
                                         random_state=0)  # cells, not genes: kept as it is
    q.var.index.name = "symbol"
    q.var["highly_variable"], q.var["n_cells"] = True, 7  # as scanpy leaves them
    before = q.copy()

    with pytest.warns(UserWarning, match=r"8 of the model's 150 genes \(5%\)"):
        prepared = svt.SCVAE.prepare_query_anndata(q, path)  # from the saved folder
    assert list(prepared.var_names) == list(ref_model.var_names)
    assert prepared.var["scvae_padded"].sum() == 8
    assert set(prepared.var_names[prepared.var["scvae_padded"]]) == set(dropped)
    # Present genes carry their counts; missing ones are zeros; X and layers agree.
    full = query_adata[:, ref_model.var_names].X.toarray()
    pad = prepared.var["scvae_padded"].to_numpy()
    np.testing.assert_array_equal(prepared.X.toarray()[:, ~pad], full[:, ~pad])
    assert prepared.X[:, np.flatnonzero(pad)].nnz == 0
    np.testing.assert_array_equal(prepared.layers["counts"], prepared.X.toarray())
    np.testing.assert_array_equal(prepared.obsm["X_other"], q.obsm["X_other"])
    assert (prepared.obsp["connectivities"] != q.obsp["connectivities"]).nnz == 0
    assert prepared.var.index.name == "symbol"
    # Padded genes have no annotation (<NA>), and the result can still be saved.
    assert prepared.var["highly_variable"].isna().sum() == 8
    prepared.write_h5ad(tmp_path / "prepared.h5ad")
    assert ad.read_h5ad(tmp_path / "prepared.h5ad").var["n_cells"].sum() == 7 * 142
    # The user's AnnData is untouched.
    assert (q.X != before.X).nnz == 0 and list(q.var_names) == list(before.var_names)

    # The padded query maps next to its types, as the complete one does.
    mapped = svt.SCVAE.load_query(path, prepared, max_epochs=40, batch_size=64,
                                  progress_bar=False)
    knn = KNeighborsClassifier(n_neighbors=15).fit(
        ref_model.get_latent_representation(ref_adata), ref_adata.obs["cell_type"].astype(str))
    pred = knn.predict(mapped.get_latent_representation())
    accuracy = float(np.mean(pred == prepared.obs["cell_type"].astype(str).to_numpy()))
    assert accuracy >= 0.9, accuracy

    # Without padding, the missing genes are named with the fix; with other identifiers
    # (almost nothing shared) padding is refused.
    with pytest.raises(ValueError, match="lacks 8 of the model's 150 genes.*prepare_query_anndata"):
        svt.SCVAE.load_query(path, q, progress_bar=False)
    renamed = q.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(q.n_vars)]
    with pytest.raises(ValueError, match="lacks 150 of the model's 150 genes.*identifiers"):
        svt.SCVAE.prepare_query_anndata(renamed, ref_model)  # from a model object
    with pytest.raises(ValueError, match="in memory"):
        q.write_h5ad(tmp_path / "q.h5ad")
        svt.SCVAE.prepare_query_anndata(ad.read_h5ad(tmp_path / "q.h5ad", backed="r"), path)


def test_preparing_a_prepared_query_keeps_its_padded_genes_flagged(split, reference, tmp_path):
    """A prepared query has every gene of the model, so preparing it again (a notebook cell
    run twice, or a prepared file read back) set var["scvae_padded"] to False everywhere:
    its zero-filled genes passed for measured ones (train() no longer refused them)."""
    _, query_adata = split
    ref_model, _ = reference
    kept = query_adata.var_names.delete([0, 7, 50, 99, 120])
    with pytest.warns(UserWarning, match="5 of the model's 150 genes"):
        once = svt.SCVAE.prepare_query_anndata(query_adata[:, kept].copy(), ref_model)
    assert once.var["scvae_padded"].sum() == 5
    once.write_h5ad(tmp_path / "once.h5ad")
    for again_from in (once, ad.read_h5ad(tmp_path / "once.h5ad")):
        with pytest.warns(UserWarning, match="5 of the model's 150 genes"):
            twice = svt.SCVAE.prepare_query_anndata(again_from, ref_model)
        np.testing.assert_array_equal(twice.var["scvae_padded"].to_numpy(),
                                      once.var["scvae_padded"].to_numpy())
    with pytest.raises(ValueError, match="scvae_padded"):
        svt.SCVAE(twice).train(max_epochs=1, progress_bar=False)

def test_new_batch_dispersion_is_fitted(tmp_path):
    """With ``dispersion="gene-batch"`` a new batch gets its own θ column, started at the
    reference batches' mean and fitted at the training's faster θ rate: a query batch
    simulated with θ = 0.5 next to reference batches with θ = 5 ends near 0.5 (at the
    networks' rate it stopped at 2.0)."""
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n_genes = 150
    profiles = rng.normal(0, 1.5, (4, n_genes))

    def simulate(n, theta, batch):
        types = rng.integers(0, 4, n)
        p = np.exp(profiles[types])
        mu = p / p.sum(1, keepdims=True) * rng.lognormal(np.log(1500), 0.3, n)[:, None]
        x = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
        return ad.AnnData(sp.csr_matrix(x),
                          obs=pd.DataFrame({"batch": batch}, index=[f"{batch}{i}" for i in range(n)]),
                          var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))

    ref = ad.concat([simulate(500, 5.0, "a"), simulate(500, 5.0, "b")])
    model = svt.SCVAE(ref, batch_key="batch", dispersion="gene-batch", n_latent=4, n_hidden=64)
    model.train(progress_bar=False, seed=0)
    model.save(tmp_path / "ref")
    mapped = svt.SCVAE.load_query(tmp_path / "ref", simulate(500, 0.5, "c"), progress_bar=False)
    theta = np.median(np.exp(mapped.module.log_theta.detach().numpy()), axis=0)
    assert theta[0] > 3 and theta[1] > 3  # the reference columns, frozen
    assert 0.3 < theta[2] < 0.8, theta


def test_reference_cells_exact_with_dense_counts_and_many_genes(tmp_path):
    """With 2,000 genes the dense path's single genes-and-covariates product rounded
    differently once load_query had added columns (reference latents up to 5e-7 apart)."""
    adata = svt.datasets.synthetic_counts(n_cells=300, n_genes=2000, n_batches=3, seed=4)
    is_query = (adata.obs["batch"] == "batch2").to_numpy()
    ref_cells, query_cells = adata[~is_query].copy(), adata[is_query].copy()
    ref = svt.SCVAE(ref_cells, batch_key="batch")
    ref.train(max_epochs=2, progress_bar=False, seed=0)
    ref.save(tmp_path / "ref")
    query = svt.SCVAE.load_query(tmp_path / "ref", query_cells, max_epochs=2,
                                 progress_bar=False, device="cpu")
    ref_cells.X = ref_cells.X.toarray()
    for bs in (None, 7):
        np.testing.assert_array_equal(query.get_latent_representation(ref_cells, batch_size=bs),
                                      ref.get_latent_representation(ref_cells, batch_size=bs))
        np.testing.assert_array_equal(query.get_normalized_expression(ref_cells, batch_size=bs),
                                      ref.get_normalized_expression(ref_cells, batch_size=bs))


def test_training_a_query_model_warns_that_the_mapping_is_discarded(split, reference):
    """scvi-tools' habit, query_model.train(), continues the mapping there; ours fits a new
    model to the query cells alone (reference cells moved by up to 3 latent units), which
    must not pass silently."""
    _, query_adata = split
    model = svt.SCVAE.load_query(reference[1], query_adata, max_epochs=0, progress_bar=False)
    with pytest.raises(ValueError, match="ran no training epoch.*not fine-tuned"):
        svt.pl.training_history(model)
    with pytest.warns(UserWarning, match="mapping for longer, pass warm_start=True"):
        model.train(max_epochs=1, progress_bar=False)
    assert model.query_info is None


def test_training_a_loaded_model_warns_that_its_weights_are_discarded(reference, split,
                                                                      tmp_path):
    ref_model, path = reference
    loaded = svt.SCVAE.load(path, split[0])
    assert loaded.loaded_from == str(path)
    with pytest.warns(UserWarning, match="weights loaded from .* are discarded"):
        loaded.train(max_epochs=1, progress_bar=False)
    assert loaded.loaded_from is None
    with warnings.catch_warnings():  # trained here: training again is no surprise
        warnings.simplefilter("error")
        loaded.train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match=r"SCVAE.load\(path, adata\)"):
        svt.SCVAE.load(path).train(max_epochs=1, progress_bar=False)
    # Resuming an interrupted run of a loaded model starts from its checkpoint: no warning.
    svt.SCVAE.load(path, split[0]).train(max_epochs=2, progress_bar=False,
                                         checkpoint_dir=tmp_path / "ck")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svt.SCVAE.load(path, split[0]).train(max_epochs=3, progress_bar=False,
                                             checkpoint_dir=tmp_path / "ck", resume=True)


def test_warm_start_fine_tunes_a_query_model_further(split, reference, tmp_path):
    """query_model.train(warm_start=True), scvi-tools' habit after load_query_data: only the
    new columns train (the masks rebuilt from query_info are load_query's), reference cells
    keep exactly their latent, the query's fit improves; it survives save/load, and the
    settings that load_query's fine-tuning has no use for are refused."""
    from scvae_tools import query as q

    ref_adata, query_adata = split
    ref_model, path = reference
    model = svt.SCVAE.load_query(path, query_adata, max_epochs=2, progress_bar=False)
    # The masks load_query made, from a fresh surgery, equal the ones rebuilt here.
    new_spec, added = q._extended_spec(ref_model.spec, query_adata)
    fresh = svt.module.VAE(model.module_config)
    made = q._transplant(ref_model.module, ref_model.spec, fresh, new_spec,
                         {(k, c) for k, cats in added.items() for c in cats})
    rebuilt = q.query_masks(model.module, model.spec, model.query_info["new_categories"])
    assert made.keys() == rebuilt.keys() and "log_theta" in made
    for name in made:
        torch.testing.assert_close(made[name], rebuilt[name], rtol=0, atol=0)
    z_ref, elbo = model.get_latent_representation(ref_adata), model.get_elbo()
    frozen = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    model.train(max_epochs=15, progress_bar=False, warm_start=True)
    np.testing.assert_array_equal(model.get_latent_representation(ref_adata), z_ref)
    assert model.get_elbo() > elbo + 1.0
    for n, p in model.module.named_parameters():  # only the masked-in entries moved
        moved = (p.detach() != frozen[n])
        assert not (moved & ~rebuilt.get(n, torch.zeros_like(p)).bool()).any(), n
    assert model.query_info["continued"]["runs"] == 1
    model.save(tmp_path / "q")
    again = svt.SCVAE.load(tmp_path / "q", query_adata)
    again.train(max_epochs=1, progress_bar=False, warm_start=True)
    assert again.query_info["continued"]["runs"] == 2
    np.testing.assert_array_equal(again.get_latent_representation(ref_adata), z_ref)
    with pytest.raises(ValueError, match="do not apply to a query model's fine-tuning: "
                                         "checkpoint_dir, lr_schedule"):
        model.train(max_epochs=1, warm_start=True, lr_schedule="plateau",
                    checkpoint_dir=tmp_path / "ck")
    same = ref_adata[ref_adata.obs["batch"] == "batch0"].copy()
    known = svt.SCVAE.load_query(path, same, progress_bar=False)
    with pytest.raises(ValueError, match="no new categories to fine-tune"):
        known.train(max_epochs=1, warm_start=True, progress_bar=False)


def test_query_fine_tuning_that_breaks_the_weights_on_its_last_step_raises(split, reference):
    """Only the training ELBO (summed before each step) was checked: weights made NaN by an
    epoch's last step were kept, without an error, when no epoch scored better. Now each
    such epoch is rolled back (as train() does), and after three a clear error."""
    _, query_adata = split
    model = svt.SCVAE.load_query(reference[1], query_adata, max_epochs=1, progress_bar=False)
    before = model.get_elbo()
    for early_stopping in (False, True):
        with pytest.warns(RuntimeWarning, match="rolled back to the initial weights") as rec:
            with pytest.raises(FloatingPointError, match=r"diverged.*after 3 rollback\(s\)"
                                                         r".*fine-tune with a lower lr\.$"):
                model.train(max_epochs=1, warm_start=True, lr=1e8, batch_size=1000,
                            early_stopping=early_stopping, progress_bar=False)
        assert sum("rolled back" in str(w.message) for w in rec) == 3
        assert model.get_elbo() == before  # the model kept its weights


@pytest.mark.parametrize("warm_start", [False, True], ids=["load_query", "warm_start"])
def test_query_fine_tuning_rolls_back_a_transient_nan(split, reference, monkeypatch, warm_start):
    """A NaN at one step of the query's fine-tuning raised at once (the run was lost), where
    train() rolls back to the last good epoch with a lower learning rate and goes on."""
    from scvae_tools.module import VAE

    ref_adata, query_adata = split
    ref_model, path = reference
    kw = dict(batch_size=64, progress_bar=False, early_stopping=False)
    model = (svt.SCVAE.load_query(path, query_adata, max_epochs=1, **kw) if warm_start
             else None)
    real, calls = VAE.loss, {"n": 0}

    def loss(self, *args, **kwargs):  # NaN at the 5th training step: epoch 2 of 3 steps each
        value = real(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 5:
                return value * torch.tensor(float("nan"))
        return value

    monkeypatch.setattr(VAE, "loss", loss)
    with pytest.warns(RuntimeWarning, match=r"epoch 2, step 2; rolled back to the end of "
                                            r"epoch 1 and lowered the learning rate to 0.00025"):
        if warm_start:
            model.train(max_epochs=4, warm_start=True, **kw)
        else:
            model = svt.SCVAE.load_query(path, query_adata, max_epochs=4, **kw)
    h = model.history
    assert h["epoch"].tolist() == [1, 2, 3, 4]
    assert h["lr"].tolist() == [1e-3] + [2.5e-4] * 3
    assert np.isfinite(h[["train_elbo", "validation_elbo"]].to_numpy()).all()
    assert all(torch.isfinite(p).all() for p in model.module.parameters())
    np.testing.assert_array_equal(model.get_latent_representation(ref_adata),
                                  ref_model.get_latent_representation(ref_adata))


def test_query_warm_start_takes_what_its_fine_tuning_does(split, reference, tmp_path):
    """lr_schedule="constant", weight_decay=0 and kl_warmup_epochs=0 describe the query's
    fine-tuning and are accepted; checkpoint_every was silently ignored and is refused; a
    split without validation cells warns; NumPy numbers save; loaded_from is cleared."""
    _, query_adata = split
    model = svt.SCVAE.load_query(reference[1], query_adata, max_epochs=1, progress_bar=False)
    model.save(tmp_path / "q")
    model = svt.SCVAE.load(tmp_path / "q", query_adata)
    model.train(max_epochs=1, warm_start=True, lr_schedule="constant", weight_decay=0.0,
                kl_warmup_epochs=0, lr=np.float32(1e-3), early_stopping=np.bool_(True),
                progress_bar=False)
    assert model.loaded_from is None
    model.save(tmp_path / "q2")  # NumPy scalars recorded as Python numbers (JSON)
    with pytest.raises(ValueError, match="fine-tuning: checkpoint_every"):
        model.train(max_epochs=1, warm_start=True, checkpoint_every=3, progress_bar=False)
    with pytest.warns(UserWarning, match="leaves no validation cell"):
        model.train(max_epochs=1, warm_start=True, train_size=0.999, progress_bar=False)


def test_numpy_settings_save(tmp_path):
    """train(lr=np.float32(...)) then save() failed: the config held a NumPy scalar."""
    a = svt.datasets.synthetic_counts(n_cells=100, n_genes=20, seed=0)
    m = svt.SCVAE(a, n_latent=2, n_hidden=8)
    m.train(max_epochs=1, lr=np.float32(1e-3), eps=np.float64(1e-2),
            early_stopping=np.bool_(False), progress_bar=False)
    m.save(tmp_path / "m")
    assert isinstance(m.train_config.lr, float) and m.train_config.early_stopping is False


def test_training_on_padded_genes_is_refused_but_query_fine_tuning_is_not(split, reference,
                                                                          tmp_path):
    """Genes padded by prepare_query_anndata are zeros, not measurements: training (fresh,
    or further with warm_start) learnt them as never expressed. A query model's fine-tuning,
    which trains covariate columns only, still runs on padded cells."""
    ref_adata, query_adata = split
    _, path = reference
    missing = [g for g in ref_adata.var_names[:3]]
    with pytest.warns(UserWarning, match="3 of the model's 150 genes"):
        padded_ref = svt.SCVAE.prepare_query_anndata(
            ref_adata[:, [g for g in ref_adata.var_names if g not in missing]].copy(), path)
    loaded = svt.SCVAE.load(path, padded_ref)
    weights = {n: p.detach().clone() for n, p in loaded.module.named_parameters()}
    for train in (lambda: loaded.train(max_epochs=1, warm_start=True, progress_bar=False),
                  lambda: svt.SCVAE(padded_ref).train(max_epochs=1, progress_bar=False)):
        with pytest.raises(ValueError, match=r"flags 3 of the model's genes \(gene0, gene1, "
                                             r"gene2\).*adata\[:, ~adata.var\['scvae_padded'\]\]"):
            train()
    for n, p in loaded.module.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
    padded_ref.write_h5ad(tmp_path / "padded.h5ad")  # out of core: the same check
    backed = ad.read_h5ad(tmp_path / "padded.h5ad", backed="r")
    with pytest.raises(ValueError, match="flags 3 of the model's genes"):
        svt.SCVAE.load(path, backed).train(max_epochs=1, warm_start=True, progress_bar=False)
    backed.file.close()
    # A query model: only its new batch's columns train.
    with pytest.warns(UserWarning, match="3 of the model's 150 genes"):
        padded_q = svt.SCVAE.prepare_query_anndata(
            query_adata[:, [g for g in query_adata.var_names if g not in missing]].copy(), path)
    model = svt.SCVAE.load_query(path, padded_q, max_epochs=2, progress_bar=False)
    model.train(max_epochs=2, warm_start=True, progress_bar=False)
    assert model.query_info["continued"]["runs"] == 1


def test_query_warm_start_without_cells_of_the_new_categories_is_refused(split, reference,
                                                                          tmp_path):
    """Only the new categories' columns train, so on reference cells alone warm_start
    reported epochs of training and changed nothing."""
    ref_adata, query_adata = split
    model = svt.SCVAE.load_query(reference[1], query_adata, max_epochs=1, progress_bar=False)
    model.save(tmp_path / "q")
    ref_only = svt.SCVAE.load(tmp_path / "q", ref_adata)
    with pytest.raises(ValueError, match=r"None of these training cells belongs to the "
                                         r"query's new categories \(\{'batch': \['batch2'\]\}\)"):
        ref_only.train(max_epochs=2, warm_start=True, progress_bar=False)


def test_warm_start_on_some_of_a_loaded_models_batches_warns(split, reference):
    """Training a loaded model further on cells of only some of its batches moves the
    others' cells too (every weight trains), with no word said; query models saved before
    config.json recorded 'query' load exactly like that. The warning names the batches and
    load_query; on cells of every batch it stays silent."""
    ref_adata, _ = split
    _, path = reference
    some = ref_adata[ref_adata.obs["batch"] == "batch0"].copy()
    loaded = svt.SCVAE.load(path, some)
    for _ in range(2):  # the second warm start too (loaded_from is cleared by the first)
        with pytest.warns(UserWarning, match=r"which have none of batch 'batch1': cells of "
                                             r"those will map differently.*load_query"):
            loaded.train(max_epochs=1, warm_start=True, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svt.SCVAE.load(path, ref_adata).train(max_epochs=1, warm_start=True, progress_bar=False)


def test_warm_start_on_some_categories_of_a_covariate_warns(tmp_path):
    """The same for the categories of a categorical covariate (a model without batch_key):
    old query models that mapped new donors were not warned about at all."""
    adata = svt.datasets.synthetic_counts(n_cells=240, n_genes=40, seed=2)
    adata.obs["donor"] = np.array(["d0", "d1", "d2"])[np.arange(240) % 3]
    model = svt.SCVAE(adata, categorical_covariate_keys=["donor"], n_latent=4)
    model.train(max_epochs=2, progress_bar=False)
    with warnings.catch_warnings():  # its own training cells have every donor
        warnings.simplefilter("error")
        model.train(max_epochs=1, warm_start=True, progress_bar=False)
    model.save(tmp_path / "m")
    some = adata[adata.obs["donor"] != "d2"].copy()
    with pytest.warns(UserWarning, match=r"which have none of donor 'd2'"):
        svt.SCVAE.load(tmp_path / "m", some).train(max_epochs=1, warm_start=True,
                                                   progress_bar=False)
