"""Stage 04 — train C2, the operation classifier, on stage 03's C2 set.

Reads:  artifact `training_sets` (table `c2`: problem, labels, n_heartbeats, split), the
        `c2` config section, and the student's tuned backbone when stage 04 made one
        (`tasks/tune_backbone.py`, its first step; else `c2.backbone` as shipped).
Writes: artifact `c2_features` (table `features`: problem_id, embedding — the (tuned or
        shipped) backbone's mean-pooled problem embedding, cached so a head setting change
        does not re-embed) and artifact `c2_model` with files `c2_heads.safetensors`, `c2_config.json`
        (+ `c2_backbone.safetensors` when the backbone was fine-tuned), `training_curve.png`,
        `summary.json`, and tables `history` (one row per epoch) and `validation` (per
        validation problem: gold and predicted labels, label probabilities).
Time:   full GSM8K train on 2 CPU cores: embedding ~6.7k problems ~2-3 min, 15 epochs on the
        cached features a few seconds. The shipped sample: seconds.
You should see: a line per epoch (loss, any-correct, all-correct, macro F1 on validation),
then the validation numbers with 95% Wilson intervals beside two baselines that read no text:
the label prior (each label's training frequency, thresholded the same way) and the most
frequent label set.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from prefect import get_run_logger, task

from mycelium import c2_model, onnx_read, stats
from mycelium import encoder as encoder_module
from mycelium.config import C2Config, Settings
from mycelium.errors import MyceliumError
from mycelium.reports import ReportSection, format_rate
from mycelium.store import (
    ArtifactRef,
    ArtifactStore,
    artifact_digest,
    source_code_version,
)

FEATURES_STEP = "c2_features"
MODEL_STEP = "c2_model"
FEATURE_KEYS = ("backbone", "max_length")  # what changes the cached embeddings
MIN_VALIDATION = 1  # early stopping needs at least one validation problem


def _code_version() -> str:
    return source_code_version(sys.modules[__name__], c2_model, encoder_module)


def features_ref(store: ArtifactStore, cfg: C2Config, training_sets: ArtifactRef, backbone: ArtifactRef | None = None,
                 precision: str = "float32", int8_min_cosine: float | None = None) -> ArtifactRef:
    """`backbone`: stage 04's tuned student backbone, read with instead of `cfg.backbone`;
    `precision`: the student's read precision (`c3.read_precision`), and `int8_min_cosine` the
    fidelity its int8 graph must keep (`c3.int8_min_cosine`)."""
    payload = {**{k: cfg.digest_payload()[k] for k in FEATURE_KEYS}, "read_precision": precision}
    if precision == "int8":
        payload["int8_min_cosine"] = int8_min_cosine
    upstream = [training_sets] + ([backbone] if backbone is not None else [])
    return store.ref(FEATURES_STEP, artifact_digest(FEATURES_STEP, payload, upstream, source_code_version(encoder_module, onnx_read)))


def model_ref(store: ArtifactStore, cfg: C2Config, training_sets: ArtifactRef, features: ArtifactRef) -> ArtifactRef:
    payload = {k: v for k, v in cfg.digest_payload().items() if k != "feature_batch_size"}
    return store.ref(MODEL_STEP, artifact_digest(MODEL_STEP, payload, [training_sets, features], _code_version()))


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def student_encoder(store: ArtifactStore, tuned: ArtifactRef | None, name: str, max_length: int, precision: str = "float32",
                    int8_min_cosine: float | None = None) -> encoder_module.Encoder:
    """What C2, C3 and the student read problems with: stage 04's tuned backbone when there
    is one (`tasks/tune_backbone.py`), else `name` as it is; through its int8 ONNX copy when
    `precision` (`c3.read_precision`) is int8, checked to keep `int8_min_cosine`."""
    from mycelium.backbone_tuning import load_student_encoder

    encoder = load_student_encoder(store, tuned, name, max_length, Settings().cache_dir, device())
    return onnx_read.student_reader(encoder, precision, Settings().cache_dir, int8_min_cosine)


def build_features(ref: ArtifactRef, training_sets: ArtifactRef, cfg: C2Config, backbone: ArtifactRef | None = None, precision: str = "float32",
                   int8_min_cosine: float | None = None) -> dict:
    store = ArtifactStore.for_ref(ref)
    c2 = store.read(training_sets, "c2")
    encoder = student_encoder(store, backbone, cfg.backbone, cfg.max_length, precision, int8_min_cosine)
    vectors = encoder_module.embed_texts(encoder, c2["problem"].to_list(), cfg.feature_batch_size)
    table = c2.select("problem_id").with_columns(pl.Series("embedding", vectors, dtype=pl.Array(pl.Float32, encoder.dim)))
    store.write_table(ref, {"features": table}, metadata={"n": table.height, "dim": encoder.dim, "backbone": cfg.backbone})
    return {"n": table.height}


def split_data(c2: pl.DataFrame, features: pl.DataFrame, labels: list[str], split: str) -> tuple[c2_model.C2Data, pl.DataFrame]:
    rows = c2.filter(pl.col("split") == split).join(features, on="problem_id", how="left", maintain_order="left")
    beats = rows["n_heartbeats"].cast(pl.Float32).fill_null(float("nan")).to_numpy()
    data = c2_model.C2Data(
        texts=rows["problem"].to_list(),
        targets=c2_model.label_matrix(rows["labels"].to_list(), labels),
        heartbeats=beats.astype(np.float32),
        features=rows["embedding"].to_numpy().astype(np.float32) if rows.height else np.zeros((0, 1), np.float32),
    )
    return data, rows


def baselines(train: c2_model.C2Data, validation: c2_model.C2Data, threshold: float, labels: list[str]) -> dict[str, dict]:
    """Two text-blind predictors on the validation problems."""
    prior = train.targets.mean(axis=0)
    prior_scores = c2_model.metrics(np.tile(prior, (len(validation), 1)), validation.targets, threshold, labels)
    common = Counter(tuple(np.flatnonzero(row)) for row in train.targets).most_common(1)[0][0]
    fixed = np.zeros((len(validation), len(labels)), np.float32)
    fixed[:, list(common)] = 1.0
    set_scores = c2_model.metrics(fixed, validation.targets, threshold, labels)
    return {"label_prior": prior_scores, "most_common_set": set_scores | {"set": [labels[i] for i in common]}}


def build_model(ref: ArtifactRef, training_sets: ArtifactRef, features: ArtifactRef, cfg: C2Config, log=print) -> dict[str, Any]:
    store = ArtifactStore.for_ref(ref)
    c2 = store.read(training_sets, "c2")
    table = store.read(features, "features")
    labels = list(cfg.labels)
    train, _ = split_data(c2, table, labels, "train")
    validation, validation_rows = split_data(c2, table, labels, "validation")
    if len(train) == 0 or len(validation) < MIN_VALIDATION:
        raise MyceliumError(
            f"stage 04: the C2 set has {len(train)} training and {len(validation)} validation problems; "
            "both are needed (use more problems or raise training_data.validation_fraction)"
        )
    run_device = device()
    encoder = encoder_module.load_encoder(cfg.backbone, cfg.max_length, run_device) if c2_model.should_unfreeze(cfg, run_device) else None
    result = c2_model.train_c2(train, validation, cfg, encoder, run_device, log=log)
    probabilities, beats = c2_model.predict_probabilities(result.heads, validation, encoder, cfg.batch_size, result.backbone_state is not None)
    final = c2_model.metrics(probabilities, validation.targets, cfg.threshold, labels)
    base = baselines(train, validation, cfg.threshold, labels)
    config = c2_model.model_config(cfg, train.features.shape[1], result)
    for name, data in c2_model.save_c2(result, config).items():
        store.write_file(ref, name, data)
    predictions = validation_rows.select("problem_id", "labels").with_columns(
        pl.Series("predicted", c2_model.predict_labels(probabilities, cfg.threshold, labels), dtype=pl.List(pl.Utf8)),
        pl.Series("probabilities", probabilities.tolist(), dtype=pl.List(pl.Float32)),
        pl.Series("heartbeats_predicted", beats, dtype=pl.Float32),
    )
    history = pl.DataFrame([{k: v for k, v in h.items() if k != "per_label_f1"} for h in result.history])
    summary = _summary(final, base, result, len(train), validation, beats)
    with tempfile.TemporaryDirectory() as folder:
        figure = plot_training(result.history, Path(folder) / "training_curve.png", "C2", C2_CURVES)
        store.write_file(ref, "training_curve.png", figure.read_bytes())
    store.write_file(ref, "summary.json", json.dumps(summary, indent=2, default=float).encode())
    store.write_table(ref, {"history": history, "validation": predictions}, metadata={"best_epoch": result.best_epoch})
    return summary



def _summary(final: dict, base: dict, result: c2_model.C2Result, n_train: int, validation: c2_model.C2Data, beats: np.ndarray) -> dict[str, Any]:
    known = ~np.isnan(validation.heartbeats)
    errors = np.abs(beats[known] - validation.heartbeats[known])
    mae = stats.mean_interval(errors) if known.any() else None
    summary = {
        "n_train": n_train,
        "n_validation": final["n"],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "backbone_fine_tuned": result.backbone_state is not None,
        "macro_f1": final["macro_f1"],
        "per_label": final["per_label"],
        "heartbeat_mae": mae.mean if mae else None,
        "heartbeat_mae_low": mae.low if mae else None,
        "heartbeat_mae_high": mae.high if mae else None,
    }
    for name, scores in (("c2", final), ("label_prior", base["label_prior"]), ("most_common_set", base["most_common_set"])):
        for metric in ("any_correct", "all_correct"):
            summary[f"{name}_{metric}"] = stats.rate_with_interval(scores[metric], scores["n"])
        summary[f"{name}_macro_f1"] = scores["macro_f1"]
    summary["most_common_set"] = base["most_common_set"]["set"]
    return summary


C2_CURVES = {"any_correct_rate": "any-correct", "all_correct_rate": "all-correct", "macro_f1": "macro F1"}


def plot_training(history: list[dict], path: str | Path, title: str, curves: dict[str, str]) -> Path:
    """Loss per epoch (left) and validation metrics in [0, 1] per epoch (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    left.plot(epochs, [h["validation_loss"] for h in history], marker="o", label="validation")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.set_title(f"{title} loss")
    left.legend()
    for key, name in curves.items():
        right.plot(epochs, [h[key] for h in history], marker="o", label=name)
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.set_title(f"{title} on validation")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


@task(name="c2-features")
def features_task(ref: ArtifactRef, training_sets: ArtifactRef, cfg: C2Config, backbone: ArtifactRef | None = None, precision: str = "float32",
                  int8_min_cosine: float | None = None) -> ArtifactRef:
    meta = build_features(ref, training_sets, cfg, backbone, precision, int8_min_cosine)
    get_run_logger().info("c2 features: %d problems embedded with %s", meta["n"], cfg.backbone)
    return ref


@task(name="c2-train")
def train_task(ref: ArtifactRef, training_sets: ArtifactRef, features: ArtifactRef, cfg: C2Config) -> ArtifactRef:
    logger = get_run_logger()
    summary = build_model(ref, training_sets, features, cfg, log=logger.info)
    logger.info("c2: all-correct %.3f (label prior %.3f), best epoch %d",
                summary["c2_all_correct"]["rate"], summary["label_prior_all_correct"]["rate"], summary["best_epoch"])
    return ref



def report_section(store: ArtifactStore, ref: ArtifactRef, labels: list[str]) -> ReportSection:
    manifest = store.verify(ref)
    summary = json.loads(store.read_file(ref, "summary.json"))
    lines = [
        "## Stage 04 — C2 operation classifier",
        "",
        (f"{summary['n_train']} training and {summary['n_validation']} validation problems; best epoch {summary['best_epoch']} "
        f"of {summary['epochs_run']} run; backbone {'fine-tuned' if summary['backbone_fine_tuned'] else 'frozen (features cached)'}."),
        "",
        "| predictor | any-correct | all-correct (exact set) | macro F1 |",
        "|---|---|---|---|",
    ]
    for name, title in (("c2", "C2"), ("label_prior", "label prior (no text)"), ("most_common_set", f"most common set {summary['most_common_set']} (no text)")):
        lines.append(f"| {title} | {format_rate(summary[f'{name}_any_correct'])} | {format_rate(summary[f'{name}_all_correct'])} | {summary[f'{name}_macro_f1']:.3f} |")
    if summary["heartbeat_mae"] is not None:
        lines += ["", f"Heartbeat count, mean absolute error: {summary['heartbeat_mae']:.2f} [{summary['heartbeat_mae_low']:.2f}, {summary['heartbeat_mae_high']:.2f}]."]
    lines += ["", "| label | support | F1 |", "|---|---|---|"]
    for label in labels:
        entry = summary["per_label"][label]
        if entry["support"]:
            lines.append(f"| {label} | {entry['support']} | {entry['f1']:.3f} |")
    figures = {"training_curve.png": store.read_file(ref, "training_curve.png")} if "training_curve.png" in manifest.files else {}
    if figures:
        lines += ["", "![C2 training](training_curve.png)"]
    flat = {f"c2_{k}" if not k.startswith("c2_") else k: v for k, v in summary.items() if k != "per_label"}
    return ReportSection(flat, "\n".join(lines) + "\n", figures)
