import pytest
import torch

from tasks.models import Arch, build_model, load_checkpoint
from tasks.train.loop import TrainParams, accuracy, fit
from tasks.train.stage import TrainConfig, check_init_checkpoint, train_model


def test_fit_learns_and_restores_best_epoch(splits):
    torch.manual_seed(0)
    model = build_model(Arch("mlp", 10, (1, 8, 8), hidden=(32,)))
    result = fit(model, splits.train, splits.val, TrainParams(lr=0.01, optimizer="adam", epochs=8, patience=8))
    assert result.best_val_accuracy > 0.85  # chance is 0.10
    assert accuracy(model, *splits.val) == pytest.approx(result.best_val_accuracy)
    assert result.history[result.best_epoch - 1]["val_accuracy"] == result.best_val_accuracy


def test_early_stopping_stops(splits):
    model = build_model(Arch("mlp", 10, (1, 8, 8), hidden=(8,)))
    # lr 0 never improves on epoch 1, so patience 2 ends training at epoch 3.
    result = fit(model, splits.train, splits.val, TrainParams(lr=0.0, optimizer="sgd", epochs=50, patience=2))
    assert result.epochs_run == 3


def test_divergence_is_reported(splits):
    model = build_model(Arch("mlp", 10, (1, 8, 8), hidden=(8,)))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="diverged"):
        fit(model, splits.train, splits.val, TrainParams(lr=0.1, optimizer="sgd", epochs=2, patience=2))


def test_train_model_writes_checkpoint_and_finetunes(data_dir, tmp_path):
    best = {"family": "cnn", "depth": 1, "width": 16, "channels": 4, "lr": 0.01, "optimizer": "adam"}
    cfg = TrainConfig(max_epochs=3, patience=3)
    trained = train_model(cfg, best, data_dir, "md5.dir", tmp_path)
    _model, arch, meta = load_checkpoint(trained.checkpoint)
    assert arch.conv == (4,) and meta["data_version"] == "md5.dir"
    assert trained.test_accuracy > 0.5
    # Fine-tuning starts from the checkpoint's weights, not a fresh init.
    tuned = train_model(
        cfg.model_copy(update={"init_from": trained.checkpoint, "max_epochs": 1}),
        best,
        data_dir,
        "md5.dir",
        tmp_path / "ft",
    )
    assert tuned.val_accuracy >= trained.val_accuracy - 0.05


def test_refit_trains_again_on_train_and_val_for_the_end_of_the_best_plateau(data_dir, splits, tmp_path):
    import json

    best = {"family": "mlp", "depth": 1, "width": 32, "lr": 0.01, "optimizer": "adam"}
    trained = train_model(TrainConfig(max_epochs=6, patience=6, refit=True), best, data_dir, "md5.dir", tmp_path)
    model, _, meta = load_checkpoint(trained.checkpoint)
    history = json.loads((trained.checkpoint.parent / "train_history.json").read_text())
    plateau_end = max(r["epoch"] for r in history if r["val_accuracy"] == trained.val_accuracy)
    assert meta["refit"] == {"epochs": plateau_end, "samples": len(splits.train[1]) + len(splits.val[1])}
    assert meta["train"]["epochs"] == plateau_end
    assert trained.test_accuracy == accuracy(model, *splits.test) > 0.85  # the refit model is the one saved


def test_init_checkpoint_must_fit_the_data(tmp_path, mlp_checkpoint):
    assert check_init_checkpoint(TrainConfig(), 10, (1, 8, 8)) is None
    with pytest.raises(ValueError, match="does not exist"):
        check_init_checkpoint(TrainConfig(init_from=tmp_path / "missing.pt"), 10, (1, 8, 8))
    with pytest.raises(ValueError, match="12 classes"):
        check_init_checkpoint(TrainConfig(init_from=mlp_checkpoint), 12, (1, 8, 8))
