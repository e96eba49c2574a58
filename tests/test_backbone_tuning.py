"""Tuning the student's backbone on the pointer objective (mycelium.backbone_tuning).

On the same real inputs as tests/test_c3.py: the first sample problems labelled into stage
03's tables, the real MiniLM backbone. The live features the tuning loop computes must be the
features stage 05 caches (else the tuned weights would be trained for inputs the pointer never
sees), tuning must move only the layers it is told to, and the tuned folder must round-trip
through the artifact store.
"""

from __future__ import annotations

import copy
import numpy as np
import polars as pl
import pytest
import torch

from mycelium import backbone_tuning, c3_model
from mycelium.backbone_tuning import load_student_encoder, save_encoder_files
from mycelium.encoder import load_encoder
from mycelium.store import ArtifactStore
from tasks import tune_backbone
from tasks.training_data import TRAIN, VALIDATION
from tests.test_c3 import c3_cfg, config, one_torch_thread, sets, texts  # noqa: F401 — shared fixtures


@pytest.fixture(scope="module")
def encoder(c3_cfg):  # noqa: F811
    return load_encoder(c3_cfg.backbone, c3_cfg.max_length)


@pytest.fixture(scope="module")
def tuning_set(sets, encoder, config, tmp_path_factory):  # noqa: F811
    """Stage 04's own tuning inputs (`tune_backbone.tuning_problems`), read from stage 03's
    tables written to a real artifact store."""
    store = ArtifactStore(str(tmp_path_factory.mktemp("store")))
    ref = store.ref("training_sets", "t" * 20)
    store.write_table(ref, dict(sets))
    return tune_backbone.tuning_problems(store, ref, encoder, config.c3, config.c4, list(config.c2.labels), config.eval.max_steps)


def test_live_features_are_the_features_stage_05_caches(encoder, texts, config, tuning_set):  # noqa: F811
    problems = tuning_set[0][TRAIN][:6]
    by_ids = {tuple(p.input_ids): t for t in texts.values() for p in problems if p.input_ids == encoder.tokenizer(t)["input_ids"]}
    assert len(by_ids) == len(problems)
    cached = c3_model.read_problems(encoder, [by_ids[tuple(p.input_ids)] for p in problems], config.c4.word_to_number, 4,
                                    config.c3.context_tokens, progress=False)
    encoder.model.eval()
    dim = encoder.dim
    for problem, frozen in zip(problems, cached, strict=True):
        with torch.inference_mode():
            batch = backbone_tuning.batch_tensors(encoder, [problem])
        # the planner's states carry the L2-normalised pooled embedding, as planner.state_vector does
        normalised = frozen.pooled / np.linalg.norm(frozen.pooled)
        np.testing.assert_allclose(batch["planner_states"][:, :dim].numpy(), np.tile(normalised, (len(problem.planner_targets), 1)), atol=2e-5)
        np.testing.assert_allclose(batch["planner_states"][:, dim:].numpy(), problem.planner_states[:, dim:])
        for row, example in enumerate(problem.examples):
            np.testing.assert_allclose(batch["query"][row, :dim].numpy(), frozen.pooled, atol=2e-5)
            np.testing.assert_allclose(batch["query"][row, dim:].numpy(), example.query[dim:])
            live_text = batch["text"][row, : len(frozen.candidates)].numpy()
            np.testing.assert_allclose(live_text, frozen.features, atol=2e-5)
            assert int(batch["gold"][row]) == example.gold


def test_tuning_moves_only_the_top_layers_and_lowers_the_losses(encoder, c3_cfg, tuning_set):  # noqa: F811
    tuned = copy.deepcopy(encoder)
    problems, n_classes = tuning_set
    before = {k: v.clone() for k, v in tuned.model.state_dict().items()}
    cfg = c3_cfg.model_copy(update={"fine_tune_epochs": 3, "fine_tune_layers": 2, "learning_rate": 1e-4, "early_stopping_patience": 3})
    result = backbone_tuning.tune(tuned, problems[TRAIN], problems[VALIDATION], cfg, log=lambda _: None, progress=False, n_planner_classes=n_classes)
    assert len(result.history) >= 1 and 1 <= result.best_epoch <= len(result.history)
    assert all(h["planner_n"] > 0 and h["n"] > 0 for h in result.history)  # both objectives were validated
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]  # the joint pointer learns on its own training problems
    after = tuned.model.state_dict()
    n_layers = len(tuned.model.encoder.layer)
    for name, value in after.items():
        moved = not torch.equal(value, before[name])
        top = any(name.startswith(f"encoder.layer.{i}.") for i in range(n_layers - 2, n_layers))
        if name.endswith("position_ids"):
            continue
        assert moved == top, name  # exactly the top two layers changed, embeddings and lower layers did not
    assert all(not p.requires_grad for p in tuned.model.parameters())  # handed back frozen, in eval mode
    assert not tuned.model.training


def test_tuned_backbone_round_trips_through_the_store(encoder, tmp_path, texts, config):  # noqa: F811
    tuned = copy.deepcopy(encoder)
    with torch.no_grad():
        weight = tuned.model.encoder.layer[-1].output.dense.weight
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))  # a change the copy must carry
    store = ArtifactStore(str(tmp_path / "store"))
    ref = store.ref("student_backbone", "d" * 20)
    files = save_encoder_files(tuned)
    assert "model.safetensors" in files and "config.json" in files
    for name, data in files.items():
        store.write_file(ref, name, data)
    store.write_table(ref, {"history": pl.DataFrame({"epoch": [1]})}, metadata={"backbone_files": sorted(files)})
    loaded = load_student_encoder(store, ref, config.c3.backbone, config.c3.max_length, str(tmp_path / "cache"))
    text = next(iter(texts.values()))
    read = [c3_model.read_problems(e, [text], config.c4.word_to_number, 1, config.c3.context_tokens, progress=False)[0]
            for e in (tuned, loaded, encoder)]
    np.testing.assert_allclose(read[0].pooled, read[1].pooled, atol=1e-6)
    assert not np.allclose(read[0].pooled, read[2].pooled, atol=1e-4)  # and it is not the untuned backbone
    assert load_student_encoder(store, None, config.c3.backbone, config.c3.max_length, str(tmp_path / "cache")).name == config.c3.backbone
