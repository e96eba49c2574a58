"""The step planner: which skeleton comes next in a chain, or whether the chain stops.

Reads: the problem's pooled backbone embedding (the one C2 and C3 read), the chain built so
far, stage 03's gold chains (`c3_slots`, `c3_operands`) for training, the `c3` config section
for its training settings. Writes nothing itself; stage 05 saves it beside the C3 pointer.
Time: a few seconds per epoch on ~20k chain states on 2 CPU cores.
You should see: per epoch the loss and validation top-1, beside the most common next skeleton.

Why it exists: C3 scores operands and C2 which operations occur, but nothing scored which
operation comes next or when a chain is finished. A search scoring chains by C3 alone prefers
short chains (every step multiplies in operand probabilities below one): on GSM8K validation
the gold chain scored below the chain the search chose for 198 of 200 problems. The planner
is a softmax over the training skeletons plus OTHER and STOP, conditioned on the problem, the
step position, the previous skeleton, the labels used so far and how many written numbers
the chain has not used yet; its log-probabilities enter the chain score, and STOP's when a
chain ends.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mycelium.config import C3Config


@dataclass
class PlannerVocabulary:
    skeletons: list[str]  # the classes, then OTHER (index len) and STOP (index len + 1)
    labels: list[str]  # C2's labels, for the bag of labels used so far
    label_of: dict[str, str]  # the label each skeleton carries most often in training
    max_steps: int  # step positions with their own id (later ones share the last)

    def __post_init__(self) -> None:
        # Positions by name: the search builds a state per chain per depth, and list.index
        # walks the whole list each time.
        self.skeleton_index = {s: i for i, s in enumerate(self.skeletons)}
        self.label_index = {label: i for i, label in enumerate(self.labels)}

    @property
    def other(self) -> int:
        return len(self.skeletons)

    @property
    def stop(self) -> int:
        return len(self.skeletons) + 1

    def to_json(self) -> dict[str, Any]:
        return {"skeletons": self.skeletons, "labels": self.labels, "label_of": self.label_of, "max_steps": self.max_steps}


def build_vocabulary(skeletons: Sequence[str], labelled_skeletons: Sequence[tuple[str, str]], labels: Sequence[str], max_steps: int) -> PlannerVocabulary:
    counts = Counter(labelled_skeletons)
    label_of: dict[str, str] = {}
    for (skeleton, label), _ in counts.most_common():
        label_of.setdefault(skeleton, label)
    return PlannerVocabulary(list(skeletons), list(labels), {s: label_of[s] for s in skeletons if s in label_of}, max_steps)


def state_vector(pooled: np.ndarray, skeletons_so_far: Sequence[str], labels_so_far: Sequence[str], unused: int, n_mentions: int,
                 vocab: PlannerVocabulary) -> np.ndarray:
    """The chain's state as the planner reads it."""
    normalised = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
    position = np.zeros(vocab.max_steps + 1, np.float32)
    position[min(len(skeletons_so_far), vocab.max_steps)] = 1.0
    previous = np.zeros(vocab.stop + 1, np.float32)  # STOP's slot marks "no step yet"
    if skeletons_so_far:
        last = skeletons_so_far[-1]
        previous[vocab.skeleton_index.get(last, vocab.other)] = 1.0
    else:
        previous[vocab.stop] = 1.0
    used_labels = np.zeros(len(vocab.labels), np.float32)
    for label in labels_so_far:
        if (i := vocab.label_index.get(label)) is not None:
            used_labels[i] += 1.0
    numbers = np.array([unused, n_mentions, unused / max(n_mentions, 1), float(unused == 0)], np.float32)
    return np.concatenate([normalised.astype(np.float32), position, previous, used_labels, numbers])


def gold_states(chains: Mapping[str, Sequence[tuple[str, str, set[int]]]], pooled: Mapping[str, np.ndarray], mentions: Mapping[str, set[int]],
                vocab: PlannerVocabulary) -> tuple[np.ndarray, np.ndarray]:
    """(states, targets) along every gold chain: each step's skeleton, then STOP.
    `chains`: problem id → [(skeleton, label, text spans the step uses)] in order."""
    states, targets = [], []
    for problem_id, steps in chains.items():
        used: set[int] = set()
        skeletons: list[str] = []
        labels: list[str] = []
        written = mentions[problem_id]
        for skeleton, label, spans in steps:
            states.append(state_vector(pooled[problem_id], skeletons, labels, len(written - used), len(written), vocab))
            targets.append(vocab.skeletons.index(skeleton) if skeleton in vocab.skeletons else vocab.other)
            skeletons.append(skeleton)
            labels.append(label)
            used |= spans
        states.append(state_vector(pooled[problem_id], skeletons, labels, len(written - used), len(written), vocab))
        targets.append(vocab.stop)
    return (np.stack(states) if states else np.zeros((0, 0), np.float32)), np.array(targets, np.int64)


class StepPlanner(nn.Module):
    def __init__(self, state_dim: int, hidden: int, n_classes: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.net(states), dim=-1)


@dataclass
class PlannerResult:
    model: StepPlanner
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0


def evaluate_planner(model: StepPlanner, states: np.ndarray, targets: np.ndarray, stop: int) -> dict[str, float]:
    """Validation loss, top-1 and how often stop-or-continue is right."""
    model.eval()
    with torch.inference_mode():
        log_probs = model(torch.from_numpy(states))
    target = torch.from_numpy(targets)
    predicted = log_probs.argmax(1)
    n = max(len(targets), 1)
    return {"loss": float(-log_probs.gather(1, target[:, None]).mean()), "top1": int((predicted == target).sum()), "n": len(targets),
            "stop_right": int(((predicted == stop) == (target == stop)).sum()), "top1_rate": float((predicted == target).sum()) / n}


def train_planner(train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray], vocab: PlannerVocabulary,
                  cfg: C3Config, log=print) -> PlannerResult:
    """Cross-entropy on the gold next step, early stopping on the validation loss (best kept);
    the head settings (hidden size, dropout, learning rate, epochs, patience) are C3's."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    states, targets = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    model = StepPlanner(states.shape[1], cfg.hidden_size, vocab.stop + 1, cfg.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.head_learning_rate, weight_decay=cfg.weight_decay)
    result, best, best_state, stale = PlannerResult(model), math.inf, None, 0
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        order = torch.randperm(len(targets), generator=generator)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            index = order[start : start + cfg.batch_size]
            loss = -model(states[index]).gather(1, targets[index][:, None]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        scores = evaluate_planner(model, validation[0], validation[1], vocab.stop)
        record = {"epoch": epoch, "train_loss": total / max(len(targets), 1), "validation_loss": scores["loss"], "top1_rate": scores["top1_rate"]}
        result.history.append(record)
        log(f"planner epoch {epoch}: train loss {record['train_loss']:.4f}, validation loss {scores['loss']:.4f}, top-1 {scores['top1_rate']:.3f}")
        if scores["loss"] < best - cfg.min_improvement:
            best, stale, result.best_epoch = scores["loss"], 0, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.early_stopping_patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def next_steps(model: StepPlanner, states: np.ndarray) -> np.ndarray:
    """Log-probabilities of every skeleton, OTHER and STOP after each state (one row each)."""
    with torch.inference_mode():
        return model(torch.from_numpy(np.atleast_2d(states))).numpy()


def save_planner(result: PlannerResult, vocab: PlannerVocabulary, hidden: int, dropout: float) -> dict[str, bytes]:
    import json

    from safetensors.torch import save

    config = {"vocabulary": vocab.to_json(), "hidden_size": hidden, "dropout": dropout, "best_epoch": result.best_epoch,
              "state_dim": result.model.net[0].in_features}
    return {"planner.safetensors": save({k: v.contiguous() for k, v in result.model.state_dict().items()}),
            "planner_config.json": json.dumps(config, indent=2).encode()}


def load_planner(files: Mapping[str, bytes]) -> tuple[StepPlanner, PlannerVocabulary]:
    import json

    from safetensors.torch import load

    config = json.loads(files["planner_config.json"])
    vocab = PlannerVocabulary(**config["vocabulary"])
    model = StepPlanner(config["state_dim"], config["hidden_size"], vocab.stop + 1, config["dropout"])
    model.load_state_dict(load(files["planner.safetensors"]))
    return model.eval(), vocab
