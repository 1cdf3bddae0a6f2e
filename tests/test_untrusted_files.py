"""Untrusted model files: no code runs on load, configs are validated, saves are atomic."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import scvae_tools as svt
from scvae_tools import checkpoint as ck

TRAIN = dict(max_epochs=2, batch_size=32, progress_bar=False)


@pytest.fixture(scope="module")
def small():
    return svt.datasets.synthetic_counts(n_cells=80, n_genes=20, n_types=2, n_batches=2, seed=2)


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory):
    """A model with a batch key, saved once; tests copy what they tamper with."""
    model = svt.SCVAE(small, batch_key="batch", n_latent=2, n_hidden=8).train(**TRAIN, seed=0)
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save(path)
    return model, path


def _copy(path: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(path, dest)
    return dest


class _Payload:
    """Unpickling this calls ``open(path, "w")``: a stand-in for any code execution."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------- code execution
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_weights_are_refused_and_never_run(saved, tmp_path):
    model, path = saved
    # Control: the crafted file really does run code when unpickled without protection.
    control_marker = tmp_path / "control_ran"
    torch.save({"w": _Payload(control_marker)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control_marker.exists()

    bad = _copy(path, tmp_path / "bad")
    marker = tmp_path / "pwned"
    state = dict(model.module.state_dict())
    state["evil"] = _Payload(marker)
    torch.save(state, bad / "model.pt")
    with pytest.raises(ValueError, match="Refused to load model weights.*could run arbitrary code"):
        svt.SCVAE.load(bad)
    assert not marker.exists()
    # A raw pickle (not a torch zip file) with the same payload is refused too.
    (bad / "model.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="model weights"):
        svt.SCVAE.load(bad)
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_on_resume(small, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": ck.CHECKPOINT_FORMAT, "epoch": _Payload(marker)},
               tmp_path / ck.CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="Refused to load training checkpoint"):
        svt.SCVAE(small, n_latent=2, n_hidden=8).train(**TRAIN, checkpoint_dir=tmp_path,
                                                       resume=True)
    assert not marker.exists()


def test_bad_weights_files(saved, small, tmp_path):
    model, path = saved
    bad = _copy(path, tmp_path / "bad")
    (bad / "model.pt").write_bytes((path / "model.pt").read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match="truncated or not a torch file"):
        svt.SCVAE.load(bad)
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save(state, bad / "model.pt")
    with pytest.raises(ValueError, match="NaN or inf weights"):
        svt.SCVAE.load(bad)
    other = svt.SCVAE(small, batch_key="batch", n_latent=2, n_hidden=12).train(**TRAIN)
    torch.save(other.module.state_dict(), bad / "model.pt")
    with pytest.raises(ValueError, match="does not match config.json"):
        svt.SCVAE.load(bad)
    torch.save([1, 2, 3], bad / "model.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        svt.SCVAE.load(bad)


# ---------------------------------------------------------------------- config validation
def _set(path: str, value):
    def edit(cfg: dict) -> dict:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
        return cfg
    return edit


def _drop(key: str):
    def edit(cfg: dict) -> dict:
        del cfg[key]
        return cfg
    return edit


CONFIG_CASES = {
    "wrong type (str for int)": (_set("module.n_latent", "2"), r"'module\.n_latent' must be of type int, got '2'"),
    "bool for int": (_set("module.n_hidden", True), r"'module\.n_hidden' must be of type int"),
    "float for int": (_set("module.n_layers", 1.5), r"'module\.n_layers' must be of type int"),
    "out of range int": (_set("module.n_latent", 0), r"'module' is invalid: n_latent must be a positive integer"),
    "out of range float": (_set("module.dropout_rate", 1.5), r"dropout_rate must be in \[0, 1\)"),
    "unknown choice": (_set("module.likelihood", "gaussian"), r"likelihood must be one of"),
    "unknown field": (_set("module.exec", "import os"), r"'module' has unknown field\(s\) \['exec'\]"),
    "missing required": (lambda c: (c["module"].pop("n_genes"), c)[1], r"'module' lacks required field\(s\) \['n_genes'\]"),
    "missing section": (_drop("module"), r"'module' is missing"),
    "section not object": (_set("data", [1, 2]), r"'data' must be a JSON object"),
    "gene list wrong type": (_set("data.var_names", "GENE"), r"'data\.var_names' must be of type list\[str\]"),
    "gene count mismatch": (lambda c: (c["data"]["var_names"].pop(), c)[1], r"lists 19 genes but 'module.n_genes' is 20"),
    "duplicate genes": (lambda c: (c["data"]["var_names"].__setitem__(1, c["data"]["var_names"][0]), c)[1], r"duplicate gene names"),
    "batch mismatch": (_set("data.batch_categories", ["b0", "b1", "b2"]), r"batch settings disagree"),
    "negative beta": (_set("beta", -1.0), r"'beta' must be a finite number >= 0"),
    "nan beta": (_set("beta", float("nan")), r"'beta' must be a finite number >= 0"),
    "train out of range": (_set("train.max_epochs", 0), r"'train' is invalid: max_epochs must be at least 1"),
    "train wrong type": (_set("train.lr", "fast"), r"'train\.lr' must be of type float"),
    "infinite float": (_set("train.lr", float("inf")), r"'train\.lr' must be finite, got inf"),
    "foreign format": (_set("format", "someone.else/3"), r"not a scvae_tools model config"),
    "versions not strings": (_set("versions", {"torch": 2}), r"'versions' must map package names"),
    # a huge architecture was built (32 GB for n_latent = 10⁹) before the weights were read
    "huge architecture": (_set("module.n_latent", 10**9), r"describes a model of .* MB of weights, but model.pt holds"),
    "int beyond int64": (_set("module.n_latent", 10**400), r"'module\.n_latent' must be of type int"),
    "category twice": (_set("data.batch_categories", ["b0", "b0"]), r"'data\.batch_categories' lists a category twice"),
    "foreign query record": (_set("query", {"x": 1}), r"'query' is not the record of a reference mapping"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES), ids=list(CONFIG_CASES))
def test_invalid_config_gives_clear_error(saved, tmp_path, case):
    _, path = saved
    edit, message = CONFIG_CASES[case]
    bad = _copy(path, tmp_path / "bad")
    cfg = edit(json.loads((path / "config.json").read_text()))
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message) as err:
        svt.SCVAE.load(bad)
    assert "config.json" in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ("", "is not valid JSON"),
    ("[" * 200_000, r"is not valid JSON \(RecursionError"),  # a raw RecursionError before
    ("{\"beta\": " + "9" * 5000 + "}", "is not valid JSON"),  # Python's 4,300-digit limit
])
def test_unparsable_config(saved, tmp_path, text, message):
    _, path = saved
    bad = _copy(path, tmp_path / "bad")
    (bad / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        svt.SCVAE.load(bad)


def test_valid_config_round_trip_and_extra_top_level_keys(saved, small, tmp_path):
    model, path = saved
    ok = _copy(path, tmp_path / "ok")
    cfg = json.loads((path / "config.json").read_text())
    cfg["written_by_a_later_version"] = {"anything": 1}  # ignored, not an error
    (ok / "config.json").write_text(json.dumps(cfg))
    loaded = svt.SCVAE.load(ok, small)
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  model.get_latent_representation())
    assert loaded.train_config == model.train_config


# ---------------------------------------------------------------------- atomic saves
def test_crash_mid_save_keeps_previous_model(saved, small, tmp_path, monkeypatch):
    model, path = saved
    target = _copy(path, tmp_path / "model")
    z_old = model.get_latent_representation()
    newer = svt.SCVAE(small, batch_key="batch", n_latent=2, n_hidden=8).train(**TRAIN, seed=1)
    assert not np.allclose(newer.get_latent_representation(), z_old)

    def old_model_kept():
        """After a failed save: the previous model loads unchanged, and no temp dirs are left."""
        monkeypatch.undo()
        np.testing.assert_array_equal(
            svt.SCVAE.load(target, small).get_latent_representation(), z_old)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    def torn_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half of a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        newer.save(target, overwrite=True)
    old_model_kept()

    # A failure of the final rename (after the old model was moved aside) puts it back.
    real_rename = Path.rename

    def flaky_rename(self, dst):
        if Path(dst) == target and self.name != ".model.old":
            raise OSError("rename failed")
        return real_rename(self, dst)

    monkeypatch.setattr(Path, "rename", flaky_rename)
    with pytest.raises(OSError, match="rename failed"):
        newer.save(target, overwrite=True)
    old_model_kept()

    newer.save(target, overwrite=True)  # and a save that succeeds replaces it
    np.testing.assert_array_equal(svt.SCVAE.load(target, small).get_latent_representation(),
                                  newer.get_latent_representation())


def test_save_through_a_symlink_replaces_its_target(saved, small, tmp_path):
    """``latest -> run_1``: the link was renamed aside and replaced by a folder, leaving
    run_1 as it was; the leftover link then made every later save to ``latest`` fail."""
    model, path = saved
    target = _copy(path, tmp_path / "run_1")
    (tmp_path / "latest").symlink_to("run_1")
    newer = svt.SCVAE(small, batch_key="batch", n_latent=2, n_hidden=8).train(**TRAIN, seed=1)
    for _ in range(2):
        newer.save(tmp_path / "latest", overwrite=True)
        assert (tmp_path / "latest").is_symlink()
        np.testing.assert_array_equal(svt.SCVAE.load(target, small).get_latent_representation(),
                                      newer.get_latent_representation())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run_1"]


def test_kill_between_the_two_renames_is_recoverable(saved, small, tmp_path):
    """SIGKILL right after the old folder was moved aside: load says where the model is."""
    model, path = saved
    target = _copy(path, tmp_path / "model")
    target.rename(tmp_path / ".model.old")  # the state replace_dir leaves at that instant
    with pytest.raises(FileNotFoundError, match=r"save was interrupted.*\.model\.old; rename it"):
        svt.SCVAE.load(target)
    (tmp_path / ".model.old").rename(target)
    np.testing.assert_array_equal(svt.SCVAE.load(target, small).get_latent_representation(),
                                  model.get_latent_representation())


def test_foreign_or_incomplete_checkpoint_is_refused(small, tmp_path):
    torch.save({"epoch": 3}, tmp_path / ck.CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="not a scvae_tools training checkpoint"):
        svt.SCVAE(small, n_latent=2, n_hidden=8).train(**TRAIN, checkpoint_dir=tmp_path,
                                                       resume=True)
    torch.save({"format": ck.CHECKPOINT_FORMAT, "epoch": 3}, tmp_path / ck.CHECKPOINT_FILE)
    with pytest.raises(ValueError, match=r"incomplete training checkpoint \(missing \['stopped'"):
        svt.SCVAE(small, n_latent=2, n_hidden=8).train(**TRAIN, checkpoint_dir=tmp_path,
                                                       resume=True)


def test_weights_that_fit_no_module_are_refused_before_use(saved, tmp_path):
    """Float64 weights slipped past the NaN/inf check with values that overflow float32; a
    tensor expanded from one number to 10⁶ × 10⁶ (8 KB on disk) made that check allocate
    4 TB; a text file (or a Git LFS pointer) gave an IndexError from the unpickler."""
    model, path = saved
    bad = _copy(path, tmp_path / "bad")
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    wide = dict(state, **{name: state[name].double().fill_(1e300)})
    torch.save(wide, bad / "model.pt")
    with pytest.raises(ValueError, match=rf"does not match config.json: {name} is torch.float64"):
        svt.SCVAE.load(bad)
    bloated = dict(state, **{name: torch.zeros(1).expand(state[name].shape)})
    torch.save(bloated, bad / "model.pt")
    with pytest.raises(ValueError, match="larger than the data they hold"):
        svt.SCVAE.load(bad)
    (bad / "model.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(ValueError, match="not a torch file"):
        svt.SCVAE.load(bad)
    (bad / "model.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\n")
    with pytest.raises(ValueError, match="Git LFS pointer.*git lfs pull"):
        svt.SCVAE.load(bad)


def test_special_config_file_and_a_broken_history(saved, tmp_path):
    """config.json as a FIFO hung the load; an unreadable history.csv failed it."""
    import os

    _, path = saved
    bad = _copy(path, tmp_path / "bad")
    (bad / "config.json").unlink()
    os.mkfifo(bad / "config.json")
    with pytest.raises(ValueError, match="not a config.json that scvae_tools writes"):
        svt.SCVAE.load(bad)
    bad = _copy(path, tmp_path / "bad2")
    (bad / "history.csv").write_text('epoch,train_elbo\n1,"unterminated\n')
    with pytest.warns(UserWarning, match="loaded without its training history"):
        loaded = svt.SCVAE.load(bad)
    assert loaded.history.empty and loaded.get_latent_representation is not None


@pytest.mark.parametrize("field, value, message", [
    ("epoch", -5, r"holds values training does not write \(epoch\)"),
    ("lr_scale", -1.0, r"holds values training does not write \(lr_scale\)"),
    ("rows", 5, r"holds values training does not write \(rows\)"),
    ("best_state", "nan", r"\(best weights\) has NaN or inf weights"),
    ("train_idx", [1, 2], r"is corrupted \(AttributeError"),
])
def test_a_tampered_checkpoint_is_refused(small, tmp_path, field, value, message):
    """A negative epoch trained seven extra epochs, a negative learning-rate scale trained
    uphill, NaN best weights ended the resumed run with a NaN model, all silently; other
    fields of the wrong kind raised Python's own errors."""
    model = svt.SCVAE(small, n_latent=2, n_hidden=8)
    model.train(**TRAIN, seed=0, checkpoint_dir=tmp_path, checkpoint_every=1)
    state = torch.load(tmp_path / ck.CHECKPOINT_FILE, weights_only=True)
    if value == "nan":
        best = state["module"] if state["best_state"] is None else state["best_state"]
        value = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                 for k, v in best.items()}
    state[field] = value
    torch.save(state, tmp_path / ck.CHECKPOINT_FILE)
    with pytest.raises(ValueError, match=message):
        svt.SCVAE(small, n_latent=2, n_hidden=8).train(**(TRAIN | {"max_epochs": 4}), seed=0,
                                                        checkpoint_dir=tmp_path, resume=True)


def test_query_models_with_any_batch_key_and_new_covariates_load_again(tmp_path):
    """The saved query record's check compared "batch" / "cat:<key>" with the batch key's
    own name: a query model with batch_key="sample", or a new covariate category, was
    called corrupted when loaded again."""
    ref = svt.datasets.synthetic_counts(n_cells=120, n_genes=20, n_batches=2, seed=4)
    ref.obs["sample"] = ref.obs["batch"].astype(str)
    ref.obs["donor"] = np.where(np.arange(ref.n_obs) % 2, "d1", "d2")
    svt.SCVAE(ref, batch_key="sample", categorical_covariate_keys=["donor"], n_latent=2,
              n_hidden=8).train(**TRAIN, seed=0).save(tmp_path / "ref")
    query = svt.datasets.synthetic_counts(n_cells=40, n_genes=20, n_batches=1, seed=5)
    query.obs["sample"], query.obs["donor"] = "new_sample", "d9"
    mapped = svt.SCVAE.load_query(tmp_path / "ref", query, max_epochs=1, progress_bar=False)
    mapped.save(tmp_path / "q")
    again = svt.SCVAE.load(tmp_path / "q", query)
    assert again.query_info["new_categories"] == {"batch": ["new_sample"], "cat:donor": ["d9"]}
    np.testing.assert_array_equal(again.get_latent_representation(),
                                  mapped.get_latent_representation())


def test_a_checkpoint_of_another_architecture_names_the_fix(small, tmp_path):
    svt.SCVAE(small, n_latent=2, n_hidden=8).train(**TRAIN, seed=0, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="belongs to a different model.*resume=False"):
        svt.SCVAE(small, n_latent=3, n_hidden=8).train(**TRAIN, seed=0, checkpoint_dir=tmp_path,
                                                        resume=True)
