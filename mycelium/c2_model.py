"""C2, the operation classifier: problem text → which operation labels it needs (+ heartbeats).

Reads: problem texts with their gold label sets and heartbeat counts (stage 03's `c2` table),
and the `c2` config section. Writes nothing itself: `train_c2` returns the trained model and a
per-epoch history; `save_c2` / `load_c2` turn it into safetensors + a JSON config.
Time: on 2 CPU cores with the backbone frozen, embedding 6.7k GSM8K problems once (~2 min)
dominates; each epoch over the cached features then takes well under a second. With the
backbone unfrozen (a GPU by default) an epoch is a full fine-tuning pass.
You should see: one line per epoch with the training loss and the validation metrics
(any-correct, all-correct, macro F1 over the labels present); training stops when the
validation loss has not improved for `early_stopping_patience` epochs, and the best epoch's
weights are kept.

Model: the backbone (`c2.backbone`, mean-pooled like the sentence encoder it is) feeds two
heads on a shared hidden layer: head 1, one logit per label (sigmoid, BCE); head 2, the
heartbeat count (MSE, only on problems whose count is known). Loss = BCE +
`heartbeat_loss_weight` · MSE. For the first `freeze_epochs` the backbone is frozen and the
heads train on cached features; afterwards it is unfrozen when `c2.unfreeze` says so (`auto`:
only on a GPU — fine-tuning a transformer for an hour on 2 CPU cores buys little, and the
issue asks the full run to stay practical there). Frozen epochs use `head_learning_rate`;
unfrozen ones use the seed's `learning_rate` for the backbone.

Metrics: with the inference `threshold`, a problem is *any-correct* when at least one predicted
label is in its gold set, *all-correct* when the predicted set equals the gold set exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mycelium.config import C2Config
from mycelium.encoder import Encoder


class C2Heads(nn.Module):
    def __init__(self, input_dim: int, hidden_size: int, n_labels: int, dropout: float):
        super().__init__()
        self.shared = nn.Sequential(nn.Dropout(dropout), nn.Linear(input_dim, hidden_size), nn.GELU(), nn.Dropout(dropout))
        self.labels = nn.Linear(hidden_size, n_labels)
        self.heartbeats = nn.Linear(hidden_size, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.shared(features)
        return self.labels(hidden), self.heartbeats(hidden).squeeze(-1)


@dataclass
class C2Data:
    """One split: texts, a (n, n_labels) 0/1 matrix, heartbeat counts (nan = unknown)."""

    texts: list[str]
    targets: np.ndarray
    heartbeats: np.ndarray
    features: np.ndarray | None = None  # frozen-backbone embeddings, when cached

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class C2Result:
    heads: C2Heads
    backbone_state: dict[str, torch.Tensor] | None  # only when the backbone was fine-tuned
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    unfrozen: bool = False


def label_matrix(label_sets: list[list[str]], labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(label_sets), len(labels)), dtype=np.float32)
    for row, label_set in enumerate(label_sets):
        for label in label_set:
            matrix[row, index[label]] = 1.0
    return matrix


def should_unfreeze(cfg: C2Config, device: str) -> bool:
    return cfg.unfreeze == "always" or (cfg.unfreeze == "auto" and device.startswith("cuda"))


def pooled(encoder: Encoder, texts: list[str]) -> torch.Tensor:
    """Mean-pooled backbone output with gradients (the unfrozen path; see encoder.embed_texts)."""
    batch = encoder.tokenizer(texts, padding=True, truncation=True, max_length=encoder.max_length, return_tensors="pt").to(encoder.model.device)
    hidden = encoder.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)


def joint_loss(label_logits, heartbeat_pred, targets, heartbeats, heartbeat_weight: float) -> tuple[torch.Tensor, float, float]:
    """BCE over labels + weight · MSE over the problems whose heartbeat count is known."""
    bce = nn.functional.binary_cross_entropy_with_logits(label_logits, targets)
    known = ~torch.isnan(heartbeats)
    mse = nn.functional.mse_loss(heartbeat_pred[known], heartbeats[known]) if known.any() else label_logits.new_zeros(())
    return bce + heartbeat_weight * mse, float(bce.detach()), float(mse.detach())


def metrics(probabilities: np.ndarray, targets: np.ndarray, threshold: float, labels: list[str]) -> dict[str, Any]:
    """any-correct, all-correct (counts and rates) and per-label precision/recall/F1."""
    predicted = probabilities >= threshold
    gold = targets > 0.5
    n = len(gold)
    any_correct = int((predicted & gold).any(axis=1).sum())
    all_correct = int((predicted == gold).all(axis=1).sum())
    per_label = {}
    for i, label in enumerate(labels):
        tp = int((predicted[:, i] & gold[:, i]).sum())
        fp = int((predicted[:, i] & ~gold[:, i]).sum())
        fn = int((~predicted[:, i] & gold[:, i]).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
        per_label[label] = {"support": int(gold[:, i].sum()), "tp": tp, "fp": fp, "fn": fn, "f1": f1}
    present = [v["f1"] for v in per_label.values() if v["support"] > 0]
    return {
        "n": n,
        "any_correct": any_correct,
        "all_correct": all_correct,
        "any_correct_rate": any_correct / n if n else float("nan"),
        "all_correct_rate": all_correct / n if n else float("nan"),
        "macro_f1": float(np.nanmean(present)) if present else float("nan"),
        "per_label": per_label,
    }


def _batches(n: int, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def predict_probabilities(heads: C2Heads, data: C2Data, encoder: Encoder | None, batch_size: int, use_backbone: bool) -> tuple[np.ndarray, np.ndarray]:
    heads.eval()
    probabilities, beats = [], []
    with torch.inference_mode():
        for index in _batches(len(data), batch_size, None):
            features = pooled(encoder, [data.texts[i] for i in index]) if use_backbone else torch.from_numpy(data.features[index.numpy()])
            logits, heartbeat = heads(features.float())
            probabilities.append(torch.sigmoid(logits).cpu().numpy())
            beats.append(heartbeat.cpu().numpy())
    if not probabilities:
        return np.zeros((0, data.targets.shape[1]), np.float32), np.zeros(0, np.float32)
    return np.concatenate(probabilities), np.concatenate(beats)


def validation_loss(heads, data: C2Data, encoder, cfg: C2Config, use_backbone: bool) -> tuple[float, np.ndarray, np.ndarray]:
    probabilities, beats = predict_probabilities(heads, data, encoder, cfg.batch_size, use_backbone)
    eps = 1e-7
    p = np.clip(probabilities, eps, 1 - eps)
    bce = float(-(data.targets * np.log(p) + (1 - data.targets) * np.log(1 - p)).mean())
    known = ~np.isnan(data.heartbeats)
    mse = float(((beats[known] - data.heartbeats[known]) ** 2).mean()) if known.any() else 0.0
    return bce + cfg.heartbeat_loss_weight * mse, probabilities, beats


def train_c2(
    train: C2Data,
    validation: C2Data,
    cfg: C2Config,
    encoder: Encoder | None,
    device: str = "cpu",
    log=print,
) -> C2Result:
    """Train with early stopping on the validation loss; keeps the best epoch's weights."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    if train.features is None:
        raise ValueError("train.features: embed the texts first (frozen-backbone features)")
    heads = C2Heads(train.features.shape[1], cfg.hidden_size, train.targets.shape[1], cfg.dropout).to(device)
    head_optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.head_learning_rate, weight_decay=cfg.weight_decay)
    unfreeze = encoder is not None and should_unfreeze(cfg, device)
    backbone_optimizer = None
    result = C2Result(heads, None, unfrozen=unfreeze)
    best_loss, best_state, stale = math.inf, None, 0
    for epoch in range(1, cfg.max_epochs + 1):
        use_backbone = unfreeze and epoch > cfg.freeze_epochs
        if use_backbone and backbone_optimizer is None:
            encoder.model.train()
            backbone_optimizer = torch.optim.AdamW(encoder.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        heads.train()
        total, batches = 0.0, 0
        for index in _batches(len(train), cfg.batch_size, generator):
            if use_backbone:
                features = pooled(encoder, [train.texts[i] for i in index])
            else:
                features = torch.from_numpy(train.features[index.numpy()]).to(device)
            logits, beats = heads(features.float())
            loss, _, _ = joint_loss(logits, beats, torch.from_numpy(train.targets[index.numpy()]).to(device),
                                    torch.from_numpy(train.heartbeats[index.numpy()]).to(device), cfg.heartbeat_loss_weight)
            head_optimizer.zero_grad()
            if backbone_optimizer is not None and use_backbone:
                backbone_optimizer.zero_grad()
            loss.backward()
            head_optimizer.step()
            if backbone_optimizer is not None and use_backbone:
                backbone_optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
        if use_backbone:
            encoder.model.eval()
        val_loss, probabilities, _ = validation_loss(heads, validation, encoder, cfg, use_backbone)
        scores = metrics(probabilities, validation.targets, cfg.threshold, list(cfg.labels))
        record = {"epoch": epoch, "train_loss": total / max(batches, 1), "validation_loss": val_loss, "backbone": "trained" if use_backbone else "frozen",
                  **{k: v for k, v in scores.items() if k != "per_label"}, "per_label_f1": {k: v["f1"] for k, v in scores["per_label"].items()}}
        result.history.append(record)
        log(f"epoch {epoch}: train loss {record['train_loss']:.4f}, validation loss {val_loss:.4f}, "
            f"any-correct {scores['any_correct_rate']:.3f}, all-correct {scores['all_correct_rate']:.3f}, macro F1 {scores['macro_f1']:.3f}")
        if val_loss < best_loss - cfg.min_improvement:
            best_loss, stale, result.best_epoch = val_loss, 0, epoch
            best_state = ({k: v.detach().clone() for k, v in heads.state_dict().items()},
                          {k: v.detach().clone() for k, v in encoder.model.state_dict().items()} if use_backbone else None)
        else:
            stale += 1
            if stale >= cfg.early_stopping_patience:
                log(f"early stop: no validation improvement for {stale} epochs; best epoch {result.best_epoch}")
                break
    if best_state is not None:
        heads.load_state_dict(best_state[0])
        result.backbone_state = best_state[1]
        if best_state[1] is not None:
            encoder.model.load_state_dict(best_state[1])
    return result


def predict_labels(probabilities: np.ndarray, threshold: float, labels: list[str]) -> list[list[str]]:
    return [[labels[i] for i in np.flatnonzero(row >= threshold)] for row in probabilities]


def model_config(cfg: C2Config, input_dim: int, result: C2Result) -> dict[str, Any]:
    return {"backbone": cfg.backbone, "input_dim": input_dim, "hidden_size": cfg.hidden_size, "dropout": cfg.dropout,
            "labels": list(cfg.labels), "threshold": cfg.threshold, "max_length": cfg.max_length,
            "best_epoch": result.best_epoch, "backbone_fine_tuned": result.backbone_state is not None}


def save_c2(result: C2Result, config: dict[str, Any]) -> dict[str, bytes]:
    """Files to store: heads (and a fine-tuned backbone) as safetensors, the config as JSON."""
    from safetensors.torch import save

    files = {"c2_heads.safetensors": save({k: v.contiguous() for k, v in result.heads.state_dict().items()}),
             "c2_config.json": json.dumps(config, indent=2).encode()}
    if result.backbone_state is not None:
        files["c2_backbone.safetensors"] = save({k: v.contiguous() for k, v in result.backbone_state.items()})
    return files


def load_c2(files: dict[str, bytes]) -> tuple[C2Heads, dict[str, Any]]:
    from safetensors.torch import load

    config = json.loads(files["c2_config.json"])
    heads = C2Heads(config["input_dim"], config["hidden_size"], len(config["labels"]), config["dropout"])
    heads.load_state_dict(load(files["c2_heads.safetensors"]))
    return heads.eval(), config
