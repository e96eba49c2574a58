"""C3, the operand pointer: for each operand slot, which existing thing feeds it.

Reads: problem texts, stage 03's `c3_slots` / `c3_operands` (gold provenance), the `c3` and
`c4` config sections. Writes nothing itself: `train_c3` returns the model and its history;
`save_c3` / `load_c3` turn it into safetensors + JSON.
Time: on 2 CPU cores, reading ~6k GSM8K problems with the backbone (token states,
once) takes ~2 min; an epoch over ~70k pointer decisions a few seconds.
You should see: per epoch the loss and the validation pointer accuracy (top-1 and within the
beam), beside the accuracy of picking uniformly among the same candidates.

The pointer can only point at what exists. For a problem with some earlier steps, the
candidates of a slot are built from the problem and the chain so far (`candidates_for`):
  TEXT      every number written in the problem (each reading: "50%" is 50 and 0.5);
  IMPLICIT  every `c4.word_to_number` word present in the problem, as its value and reciprocal;
  PRIOR     every earlier step's result;
  CONSTANT  every `c4.domain_constants` entry;
  END       the stop marker (a slot's operands are followed by one END).
Each candidate has a feature vector: for TEXT/IMPLICIT, the backbone's token states (held
fixed here; stage 04 may have tuned it first, `mycelium/backbone_tuning.py`)
averaged over the span and over a few tokens of context either side; for every candidate, its
kind, its value's magnitude and integrality, where it sits in the text, how far back a PRIOR
step is, which word or constant it is, and how often the chain's earlier steps already took it
(in training: the gold chain's earlier steps; in the search: the partial chain's). The slot
is the query: the problem's pooled embedding, the slot's C2 label, its skeleton (the most
common `max_skeletons` of training; the rest share one id) and the operand's position. A small MLP scores every (query,
candidate) pair; a softmax over the slot's candidates is trained with cross-entropy on the
gold candidate. Decoding returns the top `beam_width` operand tuples with their log-scores;
`decode_slots` scores many slots against one candidate table in a single pass, and
`score_beam` does that for every chain of a search depth at once (the search).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mycelium.config import C3Config
from mycelium.provenance import CONSTANT, END, IMPLICIT, PRIOR, TEXT, _inflected, find_mentions

KINDS = (TEXT, IMPLICIT, PRIOR, CONSTANT, END)
N_NUMERIC = 8  # log-magnitude, integral, below one, relative position, prior distance, reciprocal, used before, log uses


@dataclass(frozen=True)
class Candidate:
    kind: str
    value: float | None = None
    span_start: int | None = None
    span_end: int | None = None
    prior_step: int | None = None
    word: str | None = None
    constant: str | None = None
    reciprocal: bool = False


def usage_key(kind: str, span_start: int | None = None, prior_step: int | None = None, constant: str | None = None) -> tuple:
    """What "the same thing used again" means: a text mention (either reading of "50%", the
    word's value or its reciprocal), an earlier step, or a constant."""
    if kind in (TEXT, IMPLICIT):
        return ("span", span_start)
    if kind == PRIOR:
        return ("prior", prior_step)
    return (kind, constant)


def candidate_usage_key(c: Candidate) -> tuple:
    return usage_key(c.kind, c.span_start, c.prior_step, c.constant)


@dataclass
class ProblemText:
    """One problem's text-side candidates with their backbone features, and its pooled embedding."""

    text: str
    pooled: np.ndarray  # (dim,)
    candidates: list[Candidate]  # TEXT and IMPLICIT only; PRIOR/CONSTANT/END depend on the slot
    features: np.ndarray  # (len(candidates), 2 * dim)


@dataclass
class Vocabulary:
    labels: list[str]
    skeletons: list[str]  # index len(skeletons) = any other skeleton
    words: list[str]
    constants: list[str]
    max_operands: int

    def __post_init__(self) -> None:
        # Positions by name for the one-hot features (list.index per candidate was a hot spot).
        self.word_index = {w: i for i, w in enumerate(self.words)}
        self.constant_index = {c: i for i, c in enumerate(self.constants)}
        self.label_index = {label: i for i, label in enumerate(self.labels)}
        self.skeleton_index = {s: i for i, s in enumerate(self.skeletons)}

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def text_candidates(text: str, word_to_number: Mapping[str, float]) -> list[Candidate]:
    result = []
    for mention in find_mentions(text):
        for value in mention.values:
            result.append(Candidate(TEXT, value, mention.start, mention.end))
    lowered = text.lower()
    for word, value in word_to_number.items():
        pattern = r"%|\bpercent\b" if word == "percent" else _inflected(word)
        match = re.search(pattern, lowered)
        if match:
            result.append(Candidate(IMPLICIT, float(value), match.start(), match.end(), word=word))
            result.append(Candidate(IMPLICIT, 1.0 / float(value), match.start(), match.end(), word=word, reciprocal=True))
    return result


def slot_candidates(problem: ProblemText, prior_steps: Sequence[int], prior_values: Sequence[float], domain_constants: Mapping[str, float]) -> list[Candidate]:
    """Everything a slot may point at: the text's candidates, earlier steps, constants, END."""
    return [
        *problem.candidates,
        *(Candidate(PRIOR, float(v), prior_step=int(s)) for s, v in zip(prior_steps, prior_values, strict=True)),
        *(Candidate(CONSTANT, float(v), constant=name) for name, v in domain_constants.items()),
        Candidate(END),
    ]


def gold_usage_key(operand: Mapping) -> tuple | None:
    """`usage_key` of a gold operand row (stage 03's c3_operands); None for END."""
    if operand["provenance"] == END:
        return None
    return usage_key(operand["provenance"], operand.get("span_start"), operand.get("prior_step"), operand.get("constant"))


def gold_candidate(candidates: Sequence[Candidate], operand: Mapping) -> int | None:
    """Index of the candidate a gold operand row (stage 03's c3_operands) points at."""
    kind = operand["provenance"]
    for i, c in enumerate(candidates):
        if c.kind != kind:
            continue
        if kind == END:
            return i
        if kind == PRIOR and c.prior_step == operand["prior_step"]:
            return i
        if kind == CONSTANT and c.constant == operand["constant"]:
            return i
        if kind in (TEXT, IMPLICIT) and c.span_start == operand["span_start"] and math.isclose(c.value, operand["value"], rel_tol=1e-9, abs_tol=1e-12):
            return i
    return None


# --- backbone features ------------------------------------------------------------------------------


def read_problems(encoder, texts: Sequence[str], word_to_number: Mapping[str, float], batch_size: int, context_tokens: int, progress: bool = True) -> list[ProblemText]:
    """Run the backbone once per problem (no gradients) and keep only candidate features."""
    from tqdm.auto import tqdm

    result = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="c3 read problems", unit="batch", disable=not progress):
            batch_texts = list(texts[start : start + batch_size])
            batch = encoder.tokenizer(batch_texts, padding=True, truncation=True, max_length=encoder.max_length,
                                      return_offsets_mapping=True, return_tensors="pt")
            offsets = batch.pop("offset_mapping").numpy()
            states = encoder.model(**batch.to(encoder.model.device)).last_hidden_state.float().cpu().numpy()
            mask = batch["attention_mask"].cpu().numpy().astype(bool)
            for row, text in enumerate(batch_texts):
                real = mask[row]
                token_states, token_offsets = states[row][real], offsets[row][real]
                pooled = token_states.mean(0)
                candidates = text_candidates(text, word_to_number)
                features = np.stack([_span_features(token_states, token_offsets, c.span_start, c.span_end, context_tokens) for c in candidates]) if candidates else np.zeros((0, 2 * states.shape[-1]), np.float32)
                result.append(ProblemText(text, pooled.astype(np.float32), candidates, features.astype(np.float32)))
    return result


def span_token_ranges(offsets: np.ndarray, start: int, end: int, context_tokens: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The tokens inside the character span [start, end), and the token range [lo, hi) that
    adds `context_tokens` either side; None when the span was truncated away."""
    inside = np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0]))
    if len(inside) == 0:
        return None
    return inside, (max(0, int(inside[0]) - context_tokens), min(len(offsets), int(inside[-1]) + 1 + context_tokens))


def _span_features(states: np.ndarray, offsets: np.ndarray, start: int, end: int, context_tokens: int) -> np.ndarray:
    ranges = span_token_ranges(offsets, start, end, context_tokens)
    if ranges is None:  # truncated away: no text evidence
        return np.zeros(2 * states.shape[-1], np.float32)
    inside, (lo, hi) = ranges
    return np.concatenate([states[inside].mean(0), states[lo:hi].mean(0)])


# --- turning slots into tensors -----------------------------------------------------------------------


def candidate_numeric(c: Candidate, text_length: int, step_index: int, vocab: Vocabulary, uses: int = 0) -> np.ndarray:
    """`uses`: how many earlier steps of the chain already took this candidate. Most GSM8K
    numbers are used exactly once (82% of used text mentions in the C3 training set), and an
    earlier result is normally consumed once, so the pointer needs to know."""
    row = np.zeros(numeric_width(vocab), np.float32)
    _fill_numeric(row, c, text_length, step_index, vocab, uses)
    return row


def numeric_width(vocab: Vocabulary) -> int:
    return len(KINDS) + N_NUMERIC + len(vocab.words) + len(vocab.constants)


def _fill_numeric(row: np.ndarray, c: Candidate, text_length: int, step_index: int, vocab: Vocabulary, uses: int) -> None:
    """Write `candidate_numeric` into a zeroed row: kind one-hot, N_NUMERIC scalars, word
    one-hot, constant one-hot (filled in place: the search builds thousands of rows per problem)."""
    row[KINDS.index(c.kind)] = 1.0
    value = c.value if c.value is not None else 0.0
    at = len(KINDS)
    row[at : at + N_NUMERIC] = (
        math.log10(1.0 + abs(value)),
        float(c.value is not None and float(value).is_integer()),
        float(c.value is not None and abs(value) < 1.0),
        (c.span_start / max(text_length, 1)) if c.span_start is not None else -1.0,
        1.0 / (step_index - c.prior_step) if c.prior_step is not None and step_index > c.prior_step else 0.0,
        float(c.reciprocal),
        float(uses > 0),
        math.log1p(uses),
    )
    at += N_NUMERIC
    if c.word is not None and (i := vocab.word_index.get(c.word)) is not None:
        row[at + i] = 1.0
    if c.constant is not None and (i := vocab.constant_index.get(c.constant)) is not None:
        row[at + len(vocab.words) + i] = 1.0


def query_vector(problem: ProblemText, label: str, skeleton: str, operand_index: int, step_position: int, n_prior: int, vocab: Vocabulary) -> np.ndarray:
    """The slot's query: the problem's pooled embedding, label / skeleton / operand-position
    one-hots, and where in the chain the step stands."""
    return query_matrix(problem, [(label, skeleton, operand_index)], step_position, n_prior, vocab)[0]


def query_matrix(problem: ProblemText, slots: Sequence[tuple[str, str, int]], step_position: int, n_prior: int, vocab: Vocabulary) -> np.ndarray:
    """`query_vector` of many (label, skeleton, operand index) slots of one step, one row each
    (filled in place: the search builds one per option per depth)."""
    n_labels, n_skeletons, dim = len(vocab.labels), len(vocab.skeletons) + 1, len(problem.pooled)
    rows = np.zeros((len(slots), dim + n_labels + n_skeletons + vocab.max_operands + 1 + 3), np.float32)
    rows[:, :dim] = problem.pooled
    for row, (label, skeleton, operand_index) in zip(rows, slots, strict=True):
        if (i := vocab.label_index.get(label)) is not None:
            row[dim + i] = 1.0
        row[dim + n_labels + vocab.skeleton_index.get(skeleton, len(vocab.skeletons))] = 1.0
        row[dim + n_labels + n_skeletons + min(operand_index, vocab.max_operands)] = 1.0
    rows[:, -3:] = (float(n_prior == 0), math.log1p(n_prior), math.log1p(step_position))
    return rows


@dataclass
class PointerExample:
    query: np.ndarray
    text_features: np.ndarray  # (n_text_candidates, 2*dim): the problem's own array, shared, not copied
                               # (text candidates come first; collate pads the rest with zeros)
    numeric: np.ndarray  # (n_candidates, n_numeric)
    gold: int
    candidates: list[Candidate] = field(repr=False, default_factory=list)
    gold_kind: str | None = None


def candidate_table(problem: ProblemText, step_index: int, prior_steps: Sequence[int], prior_values: Sequence[float],
                    domain_constants: Mapping[str, float], vocab: Vocabulary, uses: Mapping[tuple, int] | None = None
                    ) -> tuple[list[Candidate], np.ndarray, np.ndarray]:
    """A step's candidates, the text features of its TEXT/IMPLICIT ones (they come first) and
    every candidate's numeric features. Shared by all slots tried at one point of a chain."""
    uses = uses or {}
    candidates = slot_candidates(problem, prior_steps, prior_values, domain_constants)
    dim2 = problem.features.shape[1] if problem.features.ndim == 2 and problem.features.shape[1] else 2 * len(problem.pooled)
    text_features = problem.features if len(problem.candidates) else np.zeros((0, dim2), np.float32)
    numeric = np.zeros((len(candidates), numeric_width(vocab)), np.float32)
    for row, c in zip(numeric, candidates, strict=True):
        _fill_numeric(row, c, len(problem.text), step_index, vocab, uses.get(candidate_usage_key(c), 0))
    return candidates, text_features, numeric


def candidate_tables(problem: ProblemText, step_index: int, chains_prior_values: Sequence[Sequence[float]], domain_constants: Mapping[str, float],
                     vocab: Vocabulary, chains_uses: Sequence[Mapping[tuple, int]]) -> list[tuple[list[Candidate], np.ndarray, np.ndarray]]:
    """`candidate_table` for each of several chains at one depth of the search (earlier steps
    0..step_index-1; chain c's results `chains_prior_values[c]`, its uses `chains_uses[c]`).
    Equal to building each table alone; the rows no chain changes (the text's numbers and
    words, constants, END: most of a table) are built once and only each chain's PRIOR rows
    and the rows it already used are rewritten (the search builds a table per chain per depth:
    on the `make run` student the whole search takes 0.95x the time of building each table
    whole, `bench/student_search.py`)."""
    if not chains_prior_values:
        return []
    prior_steps = list(range(step_index))
    shared, text_features, shared_numeric = candidate_table(problem, step_index, prior_steps, chains_prior_values[0], domain_constants, vocab)
    first_prior = len(problem.candidates)
    rows_of_key: dict[tuple, list[int]] = {}
    for i, c in enumerate(shared):
        if c.kind not in (PRIOR, END):
            rows_of_key.setdefault(candidate_usage_key(c), []).append(i)
    tables = []
    for values, uses in zip(chains_prior_values, chains_uses, strict=True):
        candidates, numeric = list(shared), shared_numeric.copy()
        rewrite = [i for key, count in uses.items() if count for i in rows_of_key.get(key, ())]
        for k, (step, value) in enumerate(zip(prior_steps, values, strict=True)):
            candidates[first_prior + k] = Candidate(PRIOR, float(value), prior_step=step)
            rewrite.append(first_prior + k)
        for i in rewrite:
            numeric[i] = 0.0
            _fill_numeric(numeric[i], candidates[i], len(problem.text), step_index, vocab, uses.get(candidate_usage_key(candidates[i]), 0))
        tables.append((candidates, text_features, numeric))
    return tables


def slot_examples(problem: ProblemText, label: str, skeleton: str, step_index: int, step_position: int,
                  prior_steps: Sequence[int], prior_values: Sequence[float], gold_operands: Sequence[Mapping] | None,
                  n_operands: int, domain_constants: Mapping[str, float], vocab: Vocabulary,
                  uses: Mapping[tuple, int] | None = None) -> list[PointerExample]:
    """One example per operand position of a slot (plus END when gold is given). `uses` counts,
    per `usage_key`, how often the chain's earlier steps took each thing."""
    candidates, text_features, numeric = candidate_table(problem, step_index, prior_steps, prior_values, domain_constants, vocab, uses)
    examples = []
    positions = range(len(gold_operands)) if gold_operands is not None else range(n_operands)
    for k in positions:
        gold = gold_candidate(candidates, gold_operands[k]) if gold_operands is not None else -1
        if gold is None:
            continue
        query = query_vector(problem, label, skeleton, k, step_position, len(prior_steps), vocab)
        kind = gold_operands[k]["provenance"] if gold_operands is not None else None
        examples.append(PointerExample(query, text_features, numeric, gold, candidates, kind))
    return examples


def collate(examples: Sequence[PointerExample]) -> dict[str, torch.Tensor]:
    width = max(len(e.numeric) for e in examples)
    n = len(examples)
    text = np.zeros((n, width, examples[0].text_features.shape[1]), np.float32)
    numeric = np.zeros((n, width, examples[0].numeric.shape[1]), np.float32)
    mask = np.zeros((n, width), bool)
    for i, e in enumerate(examples):
        m = len(e.numeric)
        text[i, : len(e.text_features)], numeric[i, :m], mask[i, :m] = e.text_features, e.numeric, True
    return {
        "query": torch.from_numpy(np.stack([e.query for e in examples])),
        "text": torch.from_numpy(text),
        "numeric": torch.from_numpy(numeric),
        "mask": torch.from_numpy(mask),
        "gold": torch.tensor([e.gold for e in examples]),
    }


# --- the model ----------------------------------------------------------------------------------------


class PointerScorer(nn.Module):
    def __init__(self, query_dim: int, text_dim: int, numeric_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.query = nn.Sequential(nn.Linear(query_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.candidate = nn.Sequential(nn.Linear(text_dim + numeric_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.score = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def score_rows(self, query: torch.Tensor, text: torch.Tensor, numeric: torch.Tensor, chain_of_row: torch.Tensor,
                   query_of_row: torch.Tensor) -> torch.Tensor:
        """(R, N) log-probabilities, row r being query `query_of_row[r]` (of `query`, (Q, query_dim))
        against the candidates of chain `chain_of_row[r]`: `text` (N, text_dim) is shared by the
        chains, `numeric` (C, N, numeric_dim) is each chain's. The same numbers as `forward`
        with each row as its own example (eval mode), computed so that every query and every
        candidate passes through its layer once: the first layers are split by input block, and
        only the elementwise-product block of the score layer is applied per pair.

        The chains of one search depth share most candidates: only their PRIOR rows and the
        rows they already used differ. So a query meets the first chain's candidates once, and
        another chain's row is scored again only where that chain's candidate differs (the whole
        search then takes 0.92 [0.91, 0.93] of the time, `bench/student_search.py`)."""
        if self.training:
            raise RuntimeError("score_rows runs the model in eval mode only (it skips dropout)")
        w_text, w_numeric, w_query, w_candidate, w_product = self._weight_blocks(text.shape[1])
        candidate_layer, query_layer, score_layer = self.candidate[0], self.query[0], self.score[0]
        c = F.gelu(F.linear(text, w_text) + F.linear(numeric, w_numeric, candidate_layer.bias))  # (C, N, H); the text part once
        q = F.gelu(F.linear(query, query_layer.weight, query_layer.bias))  # (Q, H)
        query_term, candidate_term = F.linear(q, w_query), F.linear(c, w_candidate, score_layer.bias)
        # Each query against the first chain's N candidates, by broadcasting: (Q, N).
        first = query_term[:, None, :] + candidate_term[0] + F.linear(q[:, None, :] * c[0], w_product)
        scores = self.score[2](F.gelu(first)).squeeze(-1)[query_of_row]  # (R, N), a copy
        # Then each row r's candidates where its chain differs from the first chain.
        rows, columns = (numeric != numeric[:1]).any(dim=-1)[chain_of_row].nonzero(as_tuple=True)
        if len(rows):
            queries, chains = query_of_row[rows], chain_of_row[rows]
            pair = query_term[queries] + candidate_term[chains, columns] + F.linear(q[queries] * c[chains, columns], w_product)
            scores[rows, columns] = self.score[2](F.gelu(pair)).squeeze(-1)
        return torch.log_softmax(scores, dim=-1)

    def _weight_blocks(self, n_text: int) -> tuple[torch.Tensor, ...]:
        """The candidate layer's text and numeric blocks and the score layer's query, candidate
        and product blocks, each contiguous. A column slice of a weight is strided, and
        `F.linear` copied it on every call (~7% of `score_rows`' time on the GSM8K student's
        easy problems). Kept until the weights change (a training step or a loaded state
        bumps their version)."""
        candidate_weight, score_weight = self.candidate[0].weight, self.score[0].weight
        key = (n_text, candidate_weight.data_ptr(), candidate_weight._version, score_weight.data_ptr(), score_weight._version)
        if getattr(self, "_blocks_key", None) != key:
            hidden = score_weight.shape[0]
            blocks = (candidate_weight[:, :n_text], candidate_weight[:, n_text:], *score_weight.split(hidden, dim=1))
            self._blocks = tuple(block.detach().contiguous() for block in blocks)
            self._blocks_key = key
        return self._blocks

    def forward(self, query, text, numeric, mask) -> torch.Tensor:
        """Log-probabilities over each example's candidates (padding gets -inf)."""
        q = self.query(query).unsqueeze(1).expand(-1, text.shape[1], -1)
        c = self.candidate(torch.cat([text, numeric], dim=-1))
        logits = self.score(torch.cat([q, c, q * c], dim=-1)).squeeze(-1)
        return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


@dataclass
class C3Result:
    model: PointerScorer
    history: list[dict[str, Any]]
    best_epoch: int


def evaluate(model: PointerScorer, examples: Sequence[PointerExample], batch_size: int, beam_width: int) -> dict[str, float]:
    model.eval()
    loss, top1, in_beam, chance = 0.0, 0, 0, 0.0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk)
            log_probs = model(batch["query"], batch["text"], batch["numeric"], batch["mask"])
            loss -= float(log_probs.gather(1, batch["gold"][:, None]).sum())
            ranks = (log_probs > log_probs.gather(1, batch["gold"][:, None])).sum(1)
            top1 += int((ranks == 0).sum())
            in_beam += int((ranks < beam_width).sum())
            chance += float((1.0 / batch["mask"].sum(1)).sum())
    n = max(len(examples), 1)
    return {"n": len(examples), "loss": loss / n, "top1": top1, "in_beam": in_beam, "top1_rate": top1 / n, "in_beam_rate": in_beam / n, "chance_top1_rate": chance / n}


def train_c3(train: Sequence[PointerExample], validation: Sequence[PointerExample], cfg: C3Config, beam_width: int, log=print) -> C3Result:
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    first = train[0]
    model = PointerScorer(len(first.query), first.text_features.shape[1], first.numeric.shape[1], cfg.hidden_size, cfg.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.head_learning_rate, weight_decay=cfg.weight_decay)
    history, best, best_state, stale, best_epoch = [], math.inf, None, 0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            batch = collate([train[i] for i in order[start : start + cfg.batch_size]])
            log_probs = model(batch["query"], batch["text"], batch["numeric"], batch["mask"])
            loss = -log_probs.gather(1, batch["gold"][:, None]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch["gold"])
        scores = evaluate(model, validation, cfg.batch_size, beam_width)
        record = {"epoch": epoch, "train_loss": total / len(train), "validation_loss": scores["loss"], **{k: v for k, v in scores.items() if k != "loss"}}
        history.append(record)
        log(f"epoch {epoch}: train loss {record['train_loss']:.4f}, validation loss {scores['loss']:.4f}, "
            f"top-1 {scores['top1_rate']:.3f}, in beam {scores['in_beam_rate']:.3f} (chance {scores['chance_top1_rate']:.3f})")
        if scores["loss"] < best - cfg.min_improvement:
            best, stale, best_epoch = scores["loss"], 0, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.early_stopping_patience:
                log(f"early stop after epoch {epoch}; best epoch {best_epoch}")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return C3Result(model.eval(), history, best_epoch)


def decode_slots(model: PointerScorer, problem: ProblemText, candidates: Sequence[Candidate], text_features: np.ndarray, numeric: np.ndarray,
                 slots: Sequence[tuple[str, str, int]], step_position: int, n_prior: int, vocab: Vocabulary, beam_width: int
                 ) -> list[list[tuple[list[Candidate], float]]]:
    """`decode` for many slots (label, skeleton, arity) over one candidate table, in one pass
    (`score_beam` for a single chain)."""
    scored = score_beam(model, problem, [(candidates, text_features, numeric)], [slots], step_position, n_prior, vocab, beam_width)[0]
    return [[([candidates[i] for i in row], score) for row, score in zip(indices.tolist(), scores.tolist(), strict=True)]
            for indices, scores in scored]


def score_beam(model: PointerScorer, problem: ProblemText, tables: Sequence[tuple[Sequence[Candidate], np.ndarray, np.ndarray]],
               slots: Sequence[Sequence[tuple[str, str, int]]], step_position: int, n_prior: int, vocab: Vocabulary, beam_width: int
               ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The operand beams of every chain of one search depth: `tables[c]` is chain c's
    candidate table (`candidate_table`) and `slots[c]` its (label, skeleton, arity) options.
    Returns [chain][slot] → (candidate indices (K, arity) into that chain's table, scores (K,)),
    best first. Chains at one depth have the same number of candidates (only PRIOR values and
    usage differ), and a slot's query does not depend on the chain, so each distinct query and
    each chain's candidates pass through their layers once."""
    n_candidates = len(tables[0][0])
    if any(len(candidates) != n_candidates for candidates, _, _ in tables):
        raise ValueError("score_beam: chains of one depth must have the same number of candidates")
    query_row: dict[tuple[str, str, int], int] = {}
    for chain_slots in slots:
        for label, skeleton, arity in chain_slots:
            for k in range(arity):
                query_row.setdefault((label, skeleton, k), len(query_row))
    if not query_row:
        return [[(np.zeros((1, 0), np.int64), np.zeros(1)) for _ in chain_slots] for chain_slots in slots]
    queries = query_matrix(problem, list(query_row), step_position, n_prior, vocab)
    chain_of_row = [c for c, chain_slots in enumerate(slots) for _, _, arity in chain_slots for _ in range(arity)]
    query_of_row = [query_row[(label, skeleton, k)] for chain_slots in slots for label, skeleton, arity in chain_slots for k in range(arity)]
    text_features = tables[0][1]
    text = np.zeros((n_candidates, text_features.shape[1]), np.float32)
    text[: len(text_features)] = text_features
    with torch.inference_mode():
        log_probs = model.score_rows(torch.from_numpy(queries), torch.from_numpy(text), torch.from_numpy(np.stack([t[2] for t in tables])),
                                     torch.tensor(chain_of_row), torch.tensor(query_of_row)).numpy()
    masked, options = _ranked(log_probs, tables[0][0], beam_width)  # END sits at the same place in every table
    arities = [arity for chain_slots in slots for _, _, arity in chain_slots]
    starts = np.concatenate([[0], np.cumsum(arities)[:-1]]).astype(int)
    beams: list = [None] * len(arities)
    for arity in set(arities):  # every slot of one arity in one vectorised beam
        which = [i for i, a in enumerate(arities) if a == arity]
        rows = starts[which][:, None] + np.arange(arity)[None, :]
        chosen, scores = _best_tuples(masked[rows], options[rows], beam_width)
        for i, indices, tuple_scores in zip(which, chosen, scores, strict=True):
            possible = np.isfinite(tuple_scores)
            beams[i] = (indices[possible], tuple_scores[possible])
    result, slot = [], 0
    for chain_slots in slots:
        result.append(beams[slot : slot + len(chain_slots)])
        slot += len(chain_slots)
    return result


def _ranked(log_probs: np.ndarray, candidates: Sequence[Candidate], beam_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with END and padding at -inf, and each row's `beam_width` best candidates."""
    allowed = np.array([c.kind != END for c in candidates])
    rows = log_probs[:, : len(candidates)]
    masked = np.where(allowed[None, :] & np.isfinite(rows), rows, -np.inf)
    return masked, np.argsort(-masked, axis=1, kind="stable")[:, :beam_width]


def _tuple_beam(log_probs: np.ndarray, candidates: Sequence[Candidate], beam_width: int) -> list[tuple[list[Candidate], float]]:
    """The best `beam_width` operand tuples, one row of log-probabilities per operand position."""
    masked, options = _ranked(log_probs, candidates, beam_width)
    chosen, scores = _best_tuples(masked[None], options[None], beam_width)
    return [([candidates[i] for i in row], score) for row, score in zip(chosen[0].tolist(), scores[0].tolist(), strict=True) if score != -math.inf]


def _best_tuples(masked: np.ndarray, options: np.ndarray, beam_width: int) -> tuple[np.ndarray, np.ndarray]:
    """For S slots of one arity A at once — `masked` (S, A, N) log-probabilities, `options` (S, A, B)
    each position's best candidates — the `beam_width` best index tuples (S, K, A) and their
    scores (S, K), best first; tuples with an impossible position score -inf (callers drop them)."""
    n_slots = masked.shape[0]
    if masked.shape[1] == 0:  # no operands: one empty tuple
        return np.zeros((n_slots, 1, 0), np.int64), np.zeros((n_slots, 1))
    # The first position's beam is its own best candidates: `options` is sorted best first.
    chosen = options[:, 0, :beam_width, None].astype(np.int64)
    scores = np.take_along_axis(masked[:, 0, :], chosen[:, :, 0], axis=1).astype(np.float64)
    for position in range(1, masked.shape[1]):
        best_options = options[:, position, :]  # (S, B)
        values = np.take_along_axis(masked[:, position, :], best_options, axis=1)  # (S, B)
        # Positions are scored independently, so this beam is exactly the best tuples. A
        # candidate may fill two operands: gold does that (`150+150` from one earlier result).
        totals = (scores[:, :, None] + values[:, None, :]).reshape(n_slots, -1)  # (S, K*B)
        best = np.argsort(-totals, axis=1, kind="stable")[:, :beam_width]
        width = best_options.shape[1]
        previous = np.take_along_axis(chosen, (best // width)[:, :, None], axis=1)
        chosen = np.concatenate([previous, np.take_along_axis(best_options, best % width, axis=1)[:, :, None]], axis=2)
        scores = np.take_along_axis(totals, best, axis=1)
    return chosen, scores


def decode(model: PointerScorer, examples: Sequence[PointerExample], beam_width: int) -> list[tuple[list[Candidate], float]]:
    """Top `beam_width` operand tuples for one slot (one example per operand position): each a
    list of candidates (never END inside a tuple) with its summed log-probability."""
    if not examples:
        return [([], 0.0)]
    with torch.inference_mode():
        batch = collate(examples)
        log_probs = model(batch["query"], batch["text"], batch["numeric"], batch["mask"]).numpy()
    return _tuple_beam(log_probs, examples[0].candidates, beam_width)


def text_mentions(problem: ProblemText) -> set[int]:
    """The problem's written numbers, one per mention (a "50%" with two readings is one)."""
    return {c.span_start for c in problem.candidates if c.kind == TEXT}


def unused_mentions_log_prior(unused_counts: Sequence[int]) -> list[float]:
    """log P(k written numbers left unused by the whole chain), k = 0..K, from the training
    chains, add-one smoothed; the last entry stands for every k beyond the largest seen.
    The search adds it when a chain finishes: a chain that ignores most of the problem's
    numbers is rarely the solution (61% of GSM8K train chains use every number)."""
    counts = Counter(unused_counts)
    largest = max(counts, default=0)
    total = len(unused_counts) + largest + 2
    return [math.log((counts.get(k, 0) + 1) / total) for k in range(largest + 2)]


def build_vocabulary(labels: Sequence[str], skeleton_counts: Counter, word_to_number: Mapping, domain_constants: Mapping, cfg: C3Config) -> Vocabulary:
    return Vocabulary(list(labels), [s for s, _ in skeleton_counts.most_common(cfg.max_skeletons)], list(word_to_number), list(domain_constants), cfg.max_operands)


def save_c3(result: C3Result, vocab: Vocabulary, dims: dict[str, int], cfg: C3Config, unused_log_prior: Sequence[float] = ()) -> dict[str, bytes]:
    from safetensors.torch import save

    config = {"vocabulary": vocab.to_json(), "dims": dims, "hidden_size": cfg.hidden_size, "dropout": cfg.dropout,
              "backbone": cfg.backbone, "max_length": cfg.max_length, "context_tokens": cfg.context_tokens, "best_epoch": result.best_epoch,
              "unused_mentions_log_prior": list(unused_log_prior)}
    return {"c3_pointer.safetensors": save({k: v.contiguous() for k, v in result.model.state_dict().items()}),
            "c3_config.json": json.dumps(config, indent=2).encode()}


def load_c3(files: Mapping[str, bytes]) -> tuple[PointerScorer, Vocabulary, dict[str, Any]]:
    from safetensors.torch import load

    config = json.loads(files["c3_config.json"])
    dims = config["dims"]
    model = PointerScorer(dims["query"], dims["text"], dims["numeric"], config["hidden_size"], config["dropout"])
    model.load_state_dict(load(files["c3_pointer.safetensors"]))
    return model.eval(), Vocabulary(**config["vocabulary"]), config
