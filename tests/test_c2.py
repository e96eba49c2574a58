"""C2 training: metrics, the joint loss, thresholding, early stopping, saving, unfreezing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mycelium import c2_model
from mycelium.config import load_config

LABELS = ["ADD", "SUB", "MUL"]


def c2_config(**update):
    cfg = load_config(None).c2
    return cfg.model_copy(update={"labels": LABELS, "num_labels": len(LABELS), **update})


def planted(n: int, seed: int, flip: bool = False) -> c2_model.C2Data:
    """Features whose first three coordinates say which labels a problem needs."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, len(LABELS))) < 0.4).astype(np.float32)
    features = rng.normal(0, 0.1, (n, 16)).astype(np.float32)
    features[:, : len(LABELS)] += np.where(targets > 0, 1.0, -1.0)
    heartbeats = targets.sum(axis=1).astype(np.float32)
    heartbeats[::4] = np.nan  # unknown for some problems, as when stage 00 skipped them
    if flip:
        targets = 1.0 - targets
    return c2_model.C2Data([f"problem {i}" for i in range(n)], targets, heartbeats, features)


def test_metrics_on_a_hand_counted_case():
    probabilities = np.array([[0.9, 0.1, 0.6], [0.2, 0.8, 0.1], [0.1, 0.1, 0.1]])
    targets = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=np.float32)
    scores = c2_model.metrics(probabilities, targets, 0.5, LABELS)
    assert scores["any_correct"] == 2  # rows 0 and 1 share a label with gold; row 2 predicts nothing
    assert scores["all_correct"] == 1  # only row 0 is exact
    add = scores["per_label"]["ADD"]
    assert (add["tp"], add["fp"], add["fn"]) == (1, 0, 1) and add["f1"] == pytest.approx(2 / 3)
    # A lower threshold predicts more labels.
    assert c2_model.metrics(probabilities, targets, 0.05, LABELS)["any_correct"] == 3
    assert c2_model.predict_labels(probabilities, 0.5, LABELS) == [["ADD", "MUL"], ["SUB"], []]


def test_joint_loss_ignores_unknown_heartbeats_and_weights_the_mse():
    logits = torch.zeros(2, 3)
    targets = torch.ones(2, 3)
    predicted = torch.tensor([1.0, 5.0])
    beats = torch.tensor([3.0, float("nan")])
    loss, bce, mse = c2_model.joint_loss(logits, predicted, targets, beats, 0.1)
    assert bce == pytest.approx(np.log(2), rel=1e-5)
    assert mse == pytest.approx(4.0)  # (1 - 3)^2 on the one known count; the nan row is ignored
    assert float(loss) == pytest.approx(np.log(2) + 0.4, rel=1e-5)


def test_training_learns_planted_labels_and_beats_the_label_prior():
    train, validation = planted(400, 0), planted(100, 1)
    cfg = c2_config(max_epochs=30, early_stopping_patience=5)
    result = c2_model.train_c2(train, validation, cfg, encoder=None, log=lambda _: None)
    probabilities, _ = c2_model.predict_probabilities(result.heads, validation, None, 64, False)
    learned = c2_model.metrics(probabilities, validation.targets, cfg.threshold, LABELS)
    prior = c2_model.metrics(np.tile(train.targets.mean(0), (100, 1)), validation.targets, cfg.threshold, LABELS)
    assert learned["all_correct"] >= 90 and learned["all_correct"] > prior["all_correct"] + 50
    assert result.history[-1]["validation_loss"] < result.history[0]["validation_loss"]


def test_early_stopping_keeps_the_best_epoch_when_validation_gets_worse():
    # Validation labels are the opposite of training's: every step of learning hurts it.
    train, validation = planted(200, 0), planted(60, 1, flip=True)
    cfg = c2_config(max_epochs=15, early_stopping_patience=2)
    result = c2_model.train_c2(train, validation, cfg, encoder=None, log=lambda _: None)
    assert len(result.history) == result.best_epoch + cfg.early_stopping_patience < cfg.max_epochs
    best = result.history[result.best_epoch - 1]["validation_loss"]
    assert best == min(h["validation_loss"] for h in result.history)
    # The weights kept are the best epoch's, not the last one's.
    loss, _, _ = c2_model.validation_loss(result.heads, validation, None, cfg, False)
    assert loss == pytest.approx(best, rel=1e-5)


def test_saved_model_loads_and_predicts_the_same():
    train, validation = planted(120, 0), planted(30, 1)
    cfg = c2_config(max_epochs=3)
    result = c2_model.train_c2(train, validation, cfg, encoder=None, log=lambda _: None)
    files = c2_model.save_c2(result, c2_model.model_config(cfg, 16, result))
    assert set(files) == {"c2_heads.safetensors", "c2_config.json"}
    heads, config = c2_model.load_c2(files)
    assert config["labels"] == LABELS and config["threshold"] == cfg.threshold
    before, _ = c2_model.predict_probabilities(result.heads, validation, None, 64, False)
    after, _ = c2_model.predict_probabilities(heads, validation, None, 64, False)
    np.testing.assert_allclose(before, after, atol=1e-6)


def test_unfreezing_fine_tunes_the_real_backbone_after_the_frozen_epochs():
    from mycelium.encoder import embed_texts, load_encoder

    encoder = load_encoder("embedded:all-minilm-l6-v2", 32)
    texts = [f"Tom has {i} apples and buys {i + 2} more." if i % 2 else f"Sara splits {i} cakes into {i + 1} parts." for i in range(12)]
    targets = np.array([[1, 0, 0] if i % 2 else [0, 0, 1] for i in range(12)], dtype=np.float32)
    beats = np.full(12, np.nan, dtype=np.float32)
    features = embed_texts(encoder, texts, 8, progress=False)
    train = c2_model.C2Data(texts[:8], targets[:8], beats[:8], features[:8])
    validation = c2_model.C2Data(texts[8:], targets[8:], beats[8:], features[8:])
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    cfg = c2_config(unfreeze="always", freeze_epochs=1, max_epochs=2, early_stopping_patience=5, min_improvement=-1.0, batch_size=4)
    result = c2_model.train_c2(train, validation, cfg, encoder, log=lambda _: None)
    assert [h["backbone"] for h in result.history] == ["frozen", "trained"]
    assert result.backbone_state is not None and result.best_epoch == 2
    changed = [k for k, v in encoder.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the backbone's weights did not move"
    assert "c2_backbone.safetensors" in c2_model.save_c2(result, c2_model.model_config(cfg, 384, result))
    # `auto` only unfreezes on a GPU.
    assert not c2_model.should_unfreeze(c2_config(unfreeze="auto"), "cpu")
    assert c2_model.should_unfreeze(c2_config(unfreeze="auto"), "cuda:0")
