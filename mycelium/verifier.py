"""The chain verifier: a small network that re-scores the student's finished chains.

Why it exists: C3 and the planner are trained on gold chains one decision at a time, and
the chain they add up to is often not the best one they built — on GSM8K validation the
gold answer is among the finished chains for about 39% of problems but chosen for 14%.
The verifier is trained on the student's own search output instead: for each training
problem the pool of finished chains, some right, most wrong, and a listwise loss that puts
the probability mass on the right ones (the reranking idea of GSM8K verifiers, here without
a language model: it reads the features the student already computed).

How it reads a chain: bottom up, the way C4 computes it. Each step's vector is an MLP of its
skeleton's embedding, its operands' vectors and its result's shape (sign, log-magnitude,
whole or not); an operand is its text span's backbone feature (TEXT / IMPLICIT, projected),
a learned constant, or the vector of the earlier step it takes (PRIOR). The last step's
vector meets the problem's pooled embedding, with the search's own score (relative to the
pool's best) as one more input, and gives one logit. The answer is then chosen by the usual
weighted vote over those logits.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm.auto import tqdm

from mycelium import c3_model

OPERAND_KINDS = {c3_model.TEXT: 0, c3_model.IMPLICIT: 1, c3_model.PRIOR: 2, c3_model.CONSTANT: 3}
NO_OPERAND = -1
N_VALUE_FEATURES = 4


@dataclass
class VerifierVocabulary:
    skeletons: list[str]  # id 0 is any skeleton not seen in training
    constants: list[str]
    max_steps: int
    max_operands: int

    def to_json(self) -> dict:
        return {"skeletons": self.skeletons, "constants": self.constants, "max_steps": self.max_steps, "max_operands": self.max_operands}


def value_features(value: float) -> list[float]:
    """A step result's shape: signed log-magnitude, whole, strictly between -1 and 1, negative."""
    return [math.copysign(math.log10(abs(value) + 1.0), value), float(float(value).is_integer()), float(0 < abs(value) < 1), float(value < 0)]


@dataclass
class EncodedPool:
    """One problem's finished chains as arrays (chains × steps × operands)."""

    skeleton: np.ndarray      # (n, max_steps) skeleton id
    kind: np.ndarray          # (n, max_steps, max_operands) OPERAND_KINDS value or NO_OPERAND
    ref: np.ndarray           # candidate index (TEXT/IMPLICIT), earlier step (PRIOR) or constant id
    values: np.ndarray        # (n, max_steps, N_VALUE_FEATURES)
    length: np.ndarray        # (n,) steps per chain
    search_score: np.ndarray  # (n,) the search's score minus the pool's best
    pooled: np.ndarray        # (dim,) the problem's pooled embedding, L2-normalised
    features: np.ndarray      # (n_candidates, 2 * dim) the problem's candidate features


def encode_pool(problem: c3_model.ProblemText, chains: Sequence, vocab: VerifierVocabulary) -> EncodedPool:
    """Arrays for `chains` (solver.Chain, at least one). Every operand points at something the
    problem or the chain has: a TEXT/IMPLICIT operand at its own candidate row."""
    skeleton_id = {s: i + 1 for i, s in enumerate(vocab.skeletons)}
    constant_id = {c: i for i, c in enumerate(vocab.constants)}
    candidate_row = {c: i for i, c in enumerate(problem.candidates)}
    n, steps, slots = len(chains), vocab.max_steps, vocab.max_operands
    pool = EncodedPool(np.zeros((n, steps), np.int64), np.full((n, steps, slots), NO_OPERAND, np.int64), np.zeros((n, steps, slots), np.int64),
                       np.zeros((n, steps, N_VALUE_FEATURES), np.float32), np.zeros(n, np.int64), np.zeros(n, np.float32),
                       (problem.pooled / max(float(np.linalg.norm(problem.pooled)), 1e-12)).astype(np.float32),
                       problem.features.astype(np.float32) if len(problem.features) else np.zeros((1, 2 * len(problem.pooled)), np.float32))
    best = max(chain.score for chain in chains)
    for c, chain in enumerate(chains):
        pool.length[c] = min(len(chain.steps), steps)
        pool.search_score[c] = chain.score - best
        for s, step in enumerate(chain.steps[:steps]):
            pool.skeleton[c, s] = skeleton_id.get(step.skeleton, 0)
            pool.values[c, s] = value_features(step.value)
            for o, operand in enumerate(step.operands[:slots]):
                pool.kind[c, s, o] = OPERAND_KINDS.get(operand.kind, NO_OPERAND)
                if operand.kind in (c3_model.TEXT, c3_model.IMPLICIT):
                    pool.ref[c, s, o] = candidate_row[operand]
                elif operand.kind == c3_model.PRIOR:
                    pool.ref[c, s, o] = operand.prior_step
                elif operand.kind == c3_model.CONSTANT:
                    pool.ref[c, s, o] = constant_id.get(operand.constant, 0)
    return pool


def collate(pools: Sequence[EncodedPool]) -> dict[str, torch.Tensor]:
    """Several problems' pools as one batch; candidate rows are offset per problem."""
    offsets, pooled, total = [], [], 0
    for pool in pools:
        offsets.append(np.full(len(pool.length), total))
        pooled.append(np.repeat(pool.pooled[None], len(pool.length), 0))
        total += len(pool.features)
    batch = {name: torch.from_numpy(np.concatenate([getattr(p, name) for p in pools])) for name in ("skeleton", "kind", "ref", "values", "length", "search_score")}
    batch["candidate_offset"] = torch.from_numpy(np.concatenate(offsets))
    batch["pooled"] = torch.from_numpy(np.concatenate(pooled))
    batch["features"] = torch.from_numpy(np.concatenate([p.features for p in pools]))
    return batch


class ChainVerifier(nn.Module):
    def __init__(self, vocab: VerifierVocabulary, dim: int, hidden: int, dropout: float, input_dropout: float = 0.0):
        super().__init__()
        self.vocab, self.hidden = vocab, hidden
        # Dropout on the backbone features themselves: 768-wide span features let a few thousand
        # training pools be memorised (validation peaks within a few epochs without it).
        self.input_dropout = nn.Dropout(input_dropout)
        self.skeleton = nn.Embedding(len(vocab.skeletons) + 1, hidden)
        self.constant = nn.Embedding(max(len(vocab.constants), 1), hidden)
        self.absent = nn.Parameter(torch.zeros(hidden))
        self.text = nn.Linear(2 * dim, hidden)
        self.implicit = nn.Linear(2 * dim, hidden)
        self.problem = nn.Linear(dim, hidden)
        self.step = nn.Sequential(nn.Linear(hidden * (2 + vocab.max_operands) + N_VALUE_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.out = nn.Sequential(nn.Linear(3 * hidden + 1, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n = batch["skeleton"].shape[0]
        problem = self.problem(self.input_dropout(batch["pooled"]))
        features = self.input_dropout(batch["features"])
        # Every operand that is not an earlier step is one row of a single table (text spans,
        # implicit words, constants, "no operand"), gathered once per depth: a handful of tensor
        # ops per depth instead of one per operand kind and slot (an epoch on full GSM8K went
        # from ~38 s to ~22 s with the same numbers).
        table = torch.cat([self.text(features), self.implicit(features), self.constant.weight, self.absent[None]])
        n_rows, n_constants = len(features), self.constant.num_embeddings
        kind, ref = batch["kind"], batch["ref"]
        at = batch["candidate_offset"][:, None, None] + ref
        row = torch.full_like(ref, 2 * n_rows + n_constants)
        row = torch.where(kind == 0, at, torch.where(kind == 1, n_rows + at, torch.where(kind == 3, 2 * n_rows + ref, row)))
        is_prior = kind == OPERAND_KINDS[c3_model.PRIOR]
        chains = torch.arange(n)[:, None]
        done: list[torch.Tensor] = []
        last = torch.zeros(n, self.hidden)
        for depth in range(int(batch["length"].max()) if n else 0):
            operands = table[row[:, depth]]  # (n, max_operands, hidden)
            if depth and bool(is_prior[:, depth].any()):
                earlier = torch.stack(done, 1)[chains, ref[:, depth].clamp(0, depth - 1)]
                operands = torch.where(is_prior[:, depth, :, None], earlier, operands)
            vector = self.step(torch.cat([self.skeleton(batch["skeleton"][:, depth]), operands.flatten(1), batch["values"][:, depth], problem], 1))
            done.append(vector)
            last = torch.where((batch["length"] > depth)[:, None], vector, last)
        return self.out(torch.cat([last, problem, last * problem, batch["search_score"][:, None]], 1)).squeeze(1)


def listwise_loss(logits: torch.Tensor, pools: Sequence[EncodedPool], correct: Sequence[np.ndarray]) -> torch.Tensor:
    """Mean over problems of -log(the softmax mass on the pool's right chains)."""
    total, start = logits.new_zeros(()), 0
    for pool, right in zip(pools, correct, strict=True):
        n = len(pool.length)
        log_p = torch.log_softmax(logits[start:start + n], 0)
        total = total - torch.logsumexp(log_p[torch.from_numpy(right)], 0)
        start += n
    return total / len(pools)


def score_pool(model: ChainVerifier, pool: EncodedPool) -> np.ndarray:
    with torch.inference_mode():
        return model(collate([pool])).numpy()


@dataclass
class VerifierResult:
    model: ChainVerifier
    history: list[dict]
    best_epoch: int
    search_right: int    # validation problems right with the search's own scores
    verifier_right: int  # ... with the best epoch's verifier scores

    @property
    def beats_search(self) -> bool:
        return self.verifier_right > self.search_right


def mixed(pools: Sequence[tuple[EncodedPool, np.ndarray]]) -> list[tuple[EncodedPool, np.ndarray]]:
    """The pools that hold both a right and a wrong chain: the only ones a ranking can change."""
    return [(pool, right) for pool, right in pools if right.any() and not right.all()]


def pools_loss(model: ChainVerifier, pools: Sequence[tuple[EncodedPool, np.ndarray]], batch_problems: int) -> float:
    with torch.inference_mode():
        total = sum(float(listwise_loss(model(collate([p for p, _ in chunk])), [p for p, _ in chunk], [r for _, r in chunk])) * len(chunk)
                    for chunk in (pools[i:i + batch_problems] for i in range(0, len(pools), batch_problems)))
    return total / max(len(pools), 1)


def train_verifier(train: Sequence[tuple[EncodedPool, np.ndarray]], validation: Sequence[tuple[EncodedPool, np.ndarray]],
                   vocab: VerifierVocabulary, dim: int, cfg, count_right: Callable[[ChainVerifier], int], log=print) -> VerifierResult:
    """Listwise training on the training pools that hold both a right and a wrong chain. After
    each epoch `count_right(model)` counts the validation problems the student answers right
    with the verifier's scores (`count_right(None)`: with the search's own); the best epoch's
    weights are kept, and training stops after `cfg.early_stopping_patience` epochs without a
    better count."""
    torch.manual_seed(cfg.seed)
    shuffle = random.Random(cfg.seed)
    model = ChainVerifier(vocab, dim, cfg.hidden_size, cfg.dropout, cfg.input_dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    useful, held_out = mixed(train), mixed(validation)
    search_right = count_right(None)
    log(f"verifier: the search's own ranking gets {search_right} validation problems right")
    if not useful:  # nothing to learn from: an untrained verifier that stage 06 will not use
        log("verifier: no training problem has both a right and a wrong finished chain; not trained")
        model.eval()
        return VerifierResult(model, [], 0, search_right, search_right)
    history, best, best_state, best_epoch, stale = [], -1, None, 0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        shuffle.shuffle(useful)
        total = 0.0
        for start in tqdm(range(0, len(useful), cfg.batch_problems), desc=f"verifier epoch {epoch}", unit="batch", leave=False):
            chunk = useful[start:start + cfg.batch_problems]
            loss = listwise_loss(model(collate([p for p, _ in chunk])), [p for p, _ in chunk], [r for _, r in chunk])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(chunk)
        model.eval()
        right = count_right(model)
        history.append({"epoch": epoch, "train_loss": total / len(useful), "validation_loss": pools_loss(model, held_out, cfg.batch_problems),
                        "validation_right": right})
        log(f"verifier epoch {epoch}: train loss {history[-1]['train_loss']:.4f}, validation loss {history[-1]['validation_loss']:.4f}, "
            f"validation right {right}")
        if right > best:
            best, best_epoch, stale = right, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.early_stopping_patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return VerifierResult(model, history, best_epoch, search_right, best)


def save_verifier(result: VerifierResult, vocab: VerifierVocabulary, dim: int, cfg) -> dict[str, bytes]:
    config = {"vocab": vocab.to_json(), "dim": dim, "hidden_size": cfg.hidden_size, "dropout": cfg.dropout, "best_epoch": result.best_epoch,
              "beats_search": result.beats_search}
    return {"verifier.safetensors": save_safetensors({k: v.contiguous() for k, v in result.model.state_dict().items()}),
            "verifier_config.json": json.dumps(config, indent=2).encode()}


def load_verifier(files: Mapping[str, bytes]) -> ChainVerifier | None:
    """The saved verifier, or None when it did not beat the search's own ranking on validation
    (then the student keeps the search's scores)."""
    config = json.loads(files["verifier_config.json"])
    if not config["beats_search"]:
        return None
    model = ChainVerifier(VerifierVocabulary(**config["vocab"]), config["dim"], config["hidden_size"], config["dropout"])
    model.load_state_dict(load_safetensors(files["verifier.safetensors"]))
    model.eval()
    return model
