"""The student at inference: C2 → C3 → C4 in a search, no chain of thought.

Reads: a problem text, the trained C2 heads and C3 pointer (stages 04-05), the skeletons
each C2 label took in training, and the `eval`, `c4` and `steps` config sections. Writes
nothing. Time: p50 ~16 ms per GSM8K problem on 2 CPU cores after the backbone has read it
(one MiniLM pass shared by C2 and C3, ~12 ms; `bench/student_search.py`); the search is one
batched MLP pass per depth and float arithmetic.
You should see: for each problem the predicted labels, the chosen chain (skeleton and
operands per step), the answer and the ranked list of distinct candidate answers.

With `eval.step_choice: planner` (the default) stage 05's step planner proposes each next
skeleton and says when a chain stops (`planned_search`); `c2_labels` is the seed's loop below.
With `eval.prune_margin` the planned search stops growing a partial chain once it scores that
far below the best finished chain: every later term is a log-probability or a penalty, so
nothing it could become would carry more than exp(-margin) of the winner's vote, and the
winner itself never changes.

The search (a beam over partial chains, bounded by `eval.mcts_max_paths` finished chains):
  1. C2 gives label probabilities; the labels at or above its threshold must each be used by
     some step (the most probable label when none passes). Labels without any training
     skeleton cannot be executed and are left out, and at most `eval.max_steps` are kept.
  2. A partial chain is extended by one step: a skeleton of one of the predicted labels (the
     `eval.skeletons_per_label` most common in training for that label), its operands from
     C3's beam (which points only at the problem's numbers and words, earlier results,
     constants, and knows how often the chain already used each), and C4 evaluates it. Its
     score adds C3's log-probabilities and the log of C2's probability of that label;
     `eval.simplicity_penalty` is paid per step. C3 scores every option of every chain of a
     depth in one pass, and proposals are built lazily, best first.
  3. A chain is finished once every predicted label has been used and every earlier result
     has been consumed by a later step, at which point its last value is a candidate answer
     and, with `eval.coverage_prior`, it adds log P(k written numbers left unused) as counted on
     the training chains; chains longer than `eval.max_steps` are dropped. Order is
     greedy by score; other orders of the labels come through the beam (the fallback when
     the greedy order yields nothing).
  4. Voting over finished chains: `weighted` sums exp(score) per distinct answer, `majority`
     counts chains, `top1` takes the best chain; an answer that is a positive whole number
     gets `eval.numerical_consistency_boost` added to its log-weight (7,469 of GSM8K train's
     7,473 answers are; MATH's often are not, which the boost then leaves alone).
     With `eval.rerank` and a chain verifier from stage 05 (`mycelium/verifier.py`), the
     finished chains' scores are the verifier's logits instead of the search's before the vote.

C4 here runs compiled skeletons: each distinct skeleton is parsed once through the bounded
whitelist parser (`mycelium.expressions`) with its slots as symbols, and then evaluated by a
small walk over that sympy tree in Python floats — no eval, and arithmetic on floats cannot
hang (huge powers overflow and return None).
"""

from __future__ import annotations

import heapq
import itertools
import math
import string
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import sympy
import torch

from mycelium import c2_model, c3_model
from mycelium.expressions import ExpressionError, parse_expression
from mycelium.planner import PlannerVocabulary, StepPlanner, next_steps, state_vector
from mycelium.verifier import ChainVerifier, encode_pool, score_pool

SLOT_SYMBOLS = string.ascii_lowercase  # skeleton slot i is parsed as the i-th letter
MAX_FACTORIAL = 170  # the largest n whose factorial is a finite float
MAX_EXPONENT = 1024.0  # |exponent| beyond this is an overflow or underflow of a float anyway


# --- C4, compiled ------------------------------------------------------------------------------------


class _Unsupported(Exception):
    pass


def _walk(node: sympy.Basic, values: Sequence[float]) -> float:
    if node.is_Symbol:
        return values[SLOT_SYMBOLS.index(node.name)]
    if node.is_Number:
        return float(node)
    if node is sympy.pi:
        return math.pi
    if node is sympy.E:
        return math.e
    args = [_walk(a, values) for a in node.args]
    if node.is_Add:
        return math.fsum(args)
    if node.is_Mul:
        return math.prod(args)
    if node.is_Pow:
        base, exponent = args
        if abs(exponent) > MAX_EXPONENT or (base == 0 and exponent < 0):
            raise _Unsupported
        result = base**exponent
        if isinstance(result, complex):
            raise _Unsupported
        return result
    name = type(node).__name__
    unary = {"sin": math.sin, "cos": math.cos, "tan": math.tan, "log": math.log, "exp": math.exp,
             "Abs": abs, "floor": math.floor, "ceiling": math.ceil}
    if name in unary:
        return float(unary[name](args[0]))
    if name == "factorial" and float(args[0]).is_integer() and 0 <= args[0] <= MAX_FACTORIAL:
        return float(math.factorial(int(args[0])))
    if name == "Mod" and args[1] != 0:
        return math.fmod(args[0], args[1]) if args[0] >= 0 else args[0] % args[1]
    raise _Unsupported


@lru_cache(maxsize=4096)
def compile_skeleton(skeleton: str, timeout_s: float, max_length: int) -> tuple[sympy.Basic, int] | None:
    """The skeleton's sympy tree with slot i as the i-th letter, and its arity; None when the
    skeleton is not whitelist arithmetic."""
    arity = len(set(_slots(skeleton)))
    if arity > len(SLOT_SYMBOLS):
        return None
    text = skeleton
    for i in range(arity):
        text = text.replace("{%d}" % i, f"({SLOT_SYMBOLS[i]})")  # noqa: UP031 — literal braces
    try:
        return parse_expression(text, timeout_s, max_length), arity
    except ExpressionError:
        return None


def _slots(skeleton: str) -> list[int]:
    import re

    return [int(m) for m in re.findall(r"\{(\d+)\}", skeleton)]


def run_skeleton(skeleton: str, values: Sequence[float], timeout_s: float, max_length: int) -> float | None:
    """C4 on floats: the skeleton's value with `values` in its slots; None if undefined."""
    compiled = compile_skeleton(skeleton, timeout_s, max_length)
    if compiled is None or compiled[1] != len(values):
        return None
    try:
        value = _walk(compiled[0], values)
    except (_Unsupported, OverflowError, ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


# --- the search ---------------------------------------------------------------------------------------


@dataclass
class SearchSettings:
    threshold: float
    beam_width: int
    max_paths: int
    max_steps: int
    skeletons_per_label: int
    voting: str
    numerical_consistency_boost: float
    simplicity_penalty: float
    timeout_s: float
    max_length: int
    domain_constants: Mapping[str, float]
    answer_digits: int  # significant digits under which two answers count as the same
    require_all_labels: bool = True  # finish only chains that use every label C2 predicts
    coverage_prior: bool = True  # add log P(numbers left unused) from training when a chain finishes
    step_choice: str = "c2_labels"  # "planner": the step planner proposes and scores each next skeleton
    planner_top_k: int = 6  # skeletons the planner proposes per step
    planner_uses_c2: bool = False  # a planned chain also adds C2's log P(its label set)
    prune_margin: float | None = None  # drop partial chains this far below the best finished one; None: keep all
    rerank: bool = False  # the chain verifier (stage 05) re-scores the finished chains before the vote, when the student has one
    first_scored_pairs: int | None = None  # planned search: (chain, option) pairs C3 scores first per depth; None: all at once


@dataclass
class Student:
    c2_heads: c2_model.C2Heads
    c2_labels: list[str]
    c3: c3_model.PointerScorer
    vocab: c3_model.Vocabulary
    skeletons_by_label: dict[str, list[str]]  # label → most common training skeletons first
    unused_log_prior: list[float] = field(default_factory=list)  # log P(k written numbers unused), stage 05
    planner: StepPlanner | None = None  # next skeleton or STOP (stage 05), for step_choice "planner"
    planner_vocab: PlannerVocabulary | None = None
    verifier: ChainVerifier | None = None  # re-scores finished chains (stage 05), for settings.rerank


@dataclass
class Step:
    label: str
    skeleton: str
    operands: list[c3_model.Candidate]
    value: float


@dataclass
class Chain:
    steps: list[Step] = field(default_factory=list)
    score: float = 0.0

    def values(self) -> list[float]:
        return [s.value for s in self.steps]


@dataclass
class Solution:
    answer: float | None
    ranked_answers: list[tuple[float, float]]  # (answer, vote weight), best first
    chain: Chain | None
    labels: list[str]
    label_probabilities: list[float]
    n_chains: int
    seconds: float

    def expression(self) -> str | None:
        """The best chain as one readable line: each step's filled skeleton."""
        if self.chain is None:
            return None
        parts = []
        for i, step in enumerate(self.chain.steps):
            filled = step.skeleton
            for k, operand in enumerate(step.operands):
                shown = f"s{operand.prior_step}" if operand.kind == c3_model.PRIOR else f"{operand.value:g}"
                filled = filled.replace("{%d}" % k, shown)  # noqa: UP031
            parts.append(f"s{i}={filled}")
        return "; ".join(parts)


def answer_key(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


@dataclass
class Proposal:
    """One more step for a chain, scored but not yet computed."""

    chain: Chain
    label: str
    skeleton: str
    operands: list[c3_model.Candidate]
    score: float


def ranked_proposals(student: Student, problem: c3_model.ProblemText, chains: Sequence[Chain], options: Sequence[Sequence[tuple[str, float, str]]],
                     settings: SearchSettings) -> Iterator[Proposal]:
    """One more step for each of `chains` (all of one length), best first: `options[c]` are
    chain c's (label, label log-p, skeleton) choices, each filled by C3's operand beam. C3
    scores every option of every chain in one pass, each chain over its own candidates (what
    exists now, and how often that chain already used each). Proposals are built lazily, in
    score order: a depth has thousands and the planned search looks at the first few dozen."""
    if not chains:
        return
    n_prior = len(chains[0].steps)
    kept = [[(label, logp, skeleton, compiled[1]) for label, logp, skeleton in chain_options
             if (compiled := compile_skeleton(skeleton, settings.timeout_s, settings.max_length)) is not None] for chain_options in options]
    tables = c3_model.candidate_tables(problem, n_prior, [chain.values() for chain in chains], settings.domain_constants, student.vocab,
                                       [chain_uses(chain) for chain in chains])
    scored = c3_model.score_beam(student.c3, problem, tables, [[(label, skeleton, arity) for label, _, skeleton, arity in chain_options] for chain_options in kept],
                                 n_prior, n_prior, student.vocab, settings.beam_width)
    blocks, totals = [], []  # (chain, option) and its operand tuples' scores, in chain → option order
    for c, (chain, chain_options, per_slot) in enumerate(zip(chains, kept, scored, strict=True)):
        for o, ((_, label_logp, _, _), (_, scores)) in enumerate(zip(chain_options, per_slot, strict=True)):
            blocks.append((c, o))
            totals.append(chain.score + label_logp - settings.simplicity_penalty + scores)
    if not blocks:
        return
    totals_flat = np.concatenate(totals)
    block_starts = np.cumsum([0] + [len(t) for t in totals])
    order = np.argsort(-totals_flat, kind="stable")  # stable: ties keep chain → option → tuple order
    for i, block in zip(order.tolist(), (np.searchsorted(block_starts, order, side="right") - 1).tolist(), strict=True):
        (c, o), t = blocks[block], i - int(block_starts[block])
        label, _, skeleton, _ = kept[c][o]
        candidates = tables[c][0]
        yield Proposal(chains[c], label, skeleton, [candidates[j] for j in scored[c][o][0][t].tolist()], float(totals_flat[i]))


def compute(proposal: Proposal, settings: SearchSettings) -> Chain | None:
    """C4 on a proposal: the longer chain, or None when the step is undefined or degenerate."""
    value = run_skeleton(proposal.skeleton, [o.value for o in proposal.operands], settings.timeout_s, settings.max_length)
    if value is None or _degenerate(proposal.operands, value):
        return None
    return Chain([*proposal.chain.steps, Step(proposal.label, proposal.skeleton, proposal.operands, value)], proposal.score)


def best_computable(ranked: Iterable[Proposal], width: int, settings: SearchSettings, floor: float = -math.inf) -> list[Chain]:
    """The `width` best proposals (given best first) that C4 can compute and that score at
    least `floor`, computing no more than it must."""
    result = []
    for proposal in ranked:
        if proposal.score < floor or len(result) == width:
            break
        chain = compute(proposal, settings)
        if chain is not None:
            result.append(chain)
    return result


def best_computable_bounded(student: Student, problem: c3_model.ProblemText, chains: Sequence[Chain],
                            options: Sequence[Sequence[tuple[str, float, str]]], width: int, settings: SearchSettings,
                            floor: float = -math.inf) -> list[Chain]:
    """`best_computable(ranked_proposals(...))`, scoring operands only for the (chain, option)
    pairs that can place. A proposal scores its chain's score + the option's log-p - the
    simplicity penalty + C3's operand log-probability, and the last is never positive: so
    that sum without C3 bounds every proposal of the pair. Pairs are scored best bound first,
    `settings.first_scored_pairs` of them (then twice as many, ...), and a scored proposal is
    taken once it beats every bound not yet scored. The chains are the same as scoring every
    pair; C3 scores fewer pairs and C4 computes fewer proposals (C3 was half the search's time)."""
    penalty = settings.simplicity_penalty
    bounds = [(chain.score + logp - penalty, c, o) for c, chain in enumerate(chains) for o, (_, logp, _) in enumerate(options[c])]
    pending = [b for b in sorted(bounds, key=lambda b: -b[0]) if b[0] >= floor]  # sorted is stable: ties keep chain → option order
    result: list[Chain] = []
    waiting: Iterator[Proposal] = iter(())
    start, size = 0, settings.first_scored_pairs or max(len(pending), 1)
    while start < len(pending):
        batch, start, size = pending[start : start + size], start + size, 2 * size
        next_bound = pending[start][0] if start < len(pending) else -math.inf
        by_chain: dict[int, list[int]] = defaultdict(list)
        for _, c, o in batch:
            by_chain[c].append(o)
        fresh = ranked_proposals(student, problem, [chains[c] for c in by_chain], [[options[c][o] for o in os] for c, os in by_chain.items()], settings)
        waiting = heapq.merge(waiting, fresh, key=lambda p: -p.score)
        for proposal in waiting:
            if proposal.score < floor:
                return result  # the rest score lower still, scored or not
            if proposal.score <= next_bound:  # an unscored pair might beat it: score more pairs first
                waiting = itertools.chain([proposal], waiting)
                break
            chain = compute(proposal, settings)
            if chain is not None:
                result.append(chain)
                if len(result) == width:
                    return result
    return result


def chain_uses(chain: Chain) -> Counter:
    """How often the chain's steps took each thing (`c3_model.usage_key`)."""
    return Counter(c3_model.candidate_usage_key(o) for step in chain.steps for o in step.operands)


def unused_mentions(written: set[int], chain: Chain) -> int:
    """How many of the problem's written numbers (`c3_model.text_mentions`) the chain never takes."""
    return len(written - {o.span_start for step in chain.steps for o in step.operands if o.kind == c3_model.TEXT})


def coverage_logp(student: Student, unused: int, settings: SearchSettings) -> float:
    """log P(this many written numbers left unused) under the training chains' distribution."""
    prior = student.unused_log_prior
    if not settings.coverage_prior or not prior:
        return 0.0
    return prior[min(unused, len(prior) - 1)]


def _degenerate(operands: Sequence[c3_model.Candidate], value: float) -> bool:
    """x - x and x / x: one candidate twice giving 0 or 1 computes nothing from the problem."""
    return len(set(operands)) < len(operands) and value in (0.0, 1.0)


def predict_labels(student: Student, pooled: np.ndarray, threshold: float) -> tuple[list[str], np.ndarray]:
    """C2 on the problem's mean-pooled backbone output, L2-normalised as in training."""
    normalised = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
    with torch.inference_mode():
        logits, _ = student.c2_heads(torch.from_numpy(normalised[None, :]).float())
    probabilities = torch.sigmoid(logits)[0].numpy()
    chosen = [student.c2_labels[i] for i in np.flatnonzero(probabilities >= threshold)]
    if not chosen:
        chosen = [student.c2_labels[int(np.argmax(probabilities))]]
    return chosen, probabilities


def label_set_loglik(used: set[str], probabilities: np.ndarray, student: Student) -> float:
    """log P(the chain's label set) under C2's independent sigmoids, over the labels C4 can run."""
    total = 0.0
    for i, label in enumerate(student.c2_labels):
        if student.skeletons_by_label.get(label):
            p = min(max(float(probabilities[i]), 1e-6), 1 - 1e-6)
            total += math.log(p) if label in used else math.log(1 - p)
    return total


def search(student: Student, problem: c3_model.ProblemText, labels: Sequence[str], probabilities: np.ndarray,
           settings: SearchSettings, plan: Sequence[tuple[str, str]] | None = None) -> list[Chain]:
    """Finished chains, best first. With `plan` (label, skeleton) steps are fixed in order
    (the nearest-neighbour baseline); otherwise the beam chooses them.

    `settings.require_all_labels`: a chain finishes once it has used every label in `labels`
    (C2's thresholded set). Otherwise a chain may finish at any length, and its label set is
    scored by C2's probabilities instead (used labels log p, unused log(1-p))."""
    index = {label: i for i, label in enumerate(student.c2_labels)}
    cover = plan is not None or settings.require_all_labels
    written = c3_model.text_mentions(problem)
    log_p = {label: math.log(max(float(probabilities[index[label]]), 1e-6)) if label in index else 0.0 for label in labels}
    beam, finished = [Chain()], []
    for depth in range(settings.max_steps if plan is None else len(plan)):
        if plan is not None:
            options = [plan[depth]]
        else:
            options = [(label, s) for label in labels for s in student.skeletons_by_label.get(label, [])[: settings.skeletons_per_label]]
        scored = [(label, log_p.get(label, 0.0) if cover else 0.0, skeleton) for label, skeleton in options]
        expanded = [c for c in (compute(p, settings) for p in ranked_proposals(student, problem, beam, [scored] * len(beam), settings)) if c is not None]
        beam = []
        for chain in expanded:
            used = {s.label for s in chain.steps}
            if cover:
                done = len(chain.steps) == len(plan) if plan is not None else set(labels) <= used
                if not done:
                    beam.append(chain)
                elif every_result_used(chain):
                    finished.append(Chain(chain.steps, chain.score + coverage_logp(student, unused_mentions(written, chain), settings)))
            else:
                beam.append(chain)
                if every_result_used(chain):
                    finished.append(Chain(chain.steps, chain.score + label_set_loglik(used, probabilities, student)
                                          + coverage_logp(student, unused_mentions(written, chain), settings)))
        beam = beam[: settings.beam_width]
        if len(finished) >= settings.max_paths or not beam:
            break
    return sorted(finished, key=lambda c: -c.score)[: settings.max_paths]


def planned_search(student: Student, problem: c3_model.ProblemText, probabilities: np.ndarray, settings: SearchSettings) -> list[Chain]:
    """The search with the step planner: at each step it proposes its `planner_top_k` most
    probable skeletons (their log-probabilities join the score) and a chain that has used every
    earlier result may stop, paying log P(STOP). With `planner_uses_c2` a finished chain also
    adds C2's log-probability of its label set."""
    vocab, written = student.planner_vocab, c3_model.text_mentions(problem)
    beam, finished = [Chain()], []
    for depth in range(settings.max_steps + 1):
        unused = [unused_mentions(written, chain) for chain in beam]
        states = np.stack([state_vector(problem.pooled, [s.skeleton for s in chain.steps], [s.label for s in chain.steps], n_unused, len(written), vocab)
                           for chain, n_unused in zip(beam, unused, strict=True)])
        plans = next_steps(student.planner, states)  # the planner reads the whole beam at once
        for chain, n_unused, log_p in zip(beam, unused, plans, strict=True):
            if chain.steps and every_result_used(chain):
                c2_term = label_set_loglik({s.label for s in chain.steps}, probabilities, student) if settings.planner_uses_c2 else 0.0
                finished.append(Chain(chain.steps, chain.score + float(log_p[vocab.stop]) + c2_term + coverage_logp(student, n_unused, settings)))
        if depth == settings.max_steps or len(finished) >= settings.max_paths:
            break
        floor = max(c.score for c in finished) - settings.prune_margin if finished and settings.prune_margin is not None else -math.inf
        # Every later term of a score is a log-probability or a penalty, so a partial chain's
        # score bounds all its completions: one below the floor could add at most
        # exp(-prune_margin) of the best chain's vote.
        growing = [(chain, log_p) for chain, log_p in zip(beam, plans, strict=True) if chain.score >= floor]
        options = []
        for _, log_p in growing:
            proposed = list(itertools.islice((i for i in np.argsort(-log_p[: vocab.other]).tolist() if vocab.skeletons[i] in vocab.label_of),
                                             settings.planner_top_k))
            options.append([(vocab.label_of[vocab.skeletons[i]], float(log_p[i]), vocab.skeletons[i]) for i in proposed])
        # Only the beam goes on (finishing is decided for beam members), so C3 and C4 run only as
        # far down the ranking as it takes to fill it.
        beam = best_computable_bounded(student, problem, [chain for chain, _ in growing], options, settings.beam_width, settings, floor)
        if not beam:
            break
    return sorted(finished, key=lambda c: -c.score)[: settings.max_paths]


def every_result_used(chain: Chain) -> bool:
    """A finished chain uses every earlier step's result: a value computed and then ignored
    means the chain is not the computation that produced its answer."""
    consumed = {o.prior_step for step in chain.steps for o in step.operands if o.kind == c3_model.PRIOR}
    return all(i in consumed for i in range(len(chain.steps) - 1))


def vote(chains: Sequence[Chain], settings: SearchSettings) -> list[tuple[float, float]]:
    weights: dict[float, float] = defaultdict(float)
    best = max((c.score for c in chains), default=0.0)
    for rank, chain in enumerate(chains):
        key = answer_key(chain.steps[-1].value, settings.answer_digits)
        boost = settings.numerical_consistency_boost if key > 0 and float(key).is_integer() else 0.0
        if settings.voting == "weighted":
            weights[key] += math.exp(chain.score - best + boost)
        elif settings.voting == "majority":
            weights[key] += math.exp(boost)
        elif rank == 0:  # top1
            weights[key] = 1.0
    return sorted(weights.items(), key=lambda kv: -kv[1])


def executable_labels(student: Student, labels: Sequence[str], probabilities: np.ndarray, max_steps: int) -> list[str]:
    """The labels a chain must cover: those with a training skeleton (a label C4 has never
    seen cannot be executed), the most probable first, at most `max_steps` of them."""
    index = {label: i for i, label in enumerate(student.c2_labels)}
    usable = [label for label in labels if student.skeletons_by_label.get(label)]
    usable.sort(key=lambda label: -float(probabilities[index[label]]))
    if not usable:  # fall back to the most probable label that can be executed
        ranked = sorted((label for label in student.c2_labels if student.skeletons_by_label.get(label)), key=lambda label: -float(probabilities[index[label]]))
        usable = ranked[:1]
    return usable[:max_steps]


def problem_labels(student: Student, problem: c3_model.ProblemText, settings: SearchSettings) -> tuple[list[str], np.ndarray]:
    """C2's executable labels for the problem (at most `max_steps`, most probable first) and all
    its label probabilities."""
    labels, probabilities = predict_labels(student, problem.pooled, settings.threshold)
    return executable_labels(student, labels, probabilities, settings.max_steps), probabilities


def find_chains(student: Student, problem: c3_model.ProblemText, labels: Sequence[str], probabilities: np.ndarray, settings: SearchSettings,
                plan: Sequence[tuple[str, str]] | None = None) -> list[Chain]:
    """The finished chains, best first, of the search the settings choose (the planner's, or
    over `labels`), or of `plan`'s fixed steps (then `labels` are the plan's). Scores are the
    search's own; see `rerank`."""
    if plan is None and settings.step_choice == "planner" and student.planner is not None:
        return planned_search(student, problem, probabilities, settings)
    return search(student, problem, labels, probabilities, settings, plan)


def rerank(student: Student, problem: c3_model.ProblemText, chains: Sequence[Chain]) -> list[Chain]:
    """The same chains, each scored by the chain verifier instead of the search, best first."""
    if not chains or student.verifier is None:
        return list(chains)
    scores = score_pool(student.verifier, encode_pool(problem, chains, student.verifier.vocab))
    return sorted((Chain(chain.steps, float(score)) for chain, score in zip(chains, scores, strict=True)), key=lambda c: -c.score)


def solve(student: Student, problem: c3_model.ProblemText, settings: SearchSettings, plan=None, started: float | None = None) -> Solution:
    started = time.perf_counter() if started is None else started
    labels, probabilities = problem_labels(student, problem, settings)
    if plan is not None:
        labels = [label for label, _ in plan]
    chains = find_chains(student, problem, labels, probabilities, settings, plan)
    if plan is None and settings.rerank:
        chains = rerank(student, problem, chains)
    ranked = vote(chains, settings)
    answer = ranked[0][0] if ranked else None
    best_chain = next((c for c in chains if answer is not None and answer_key(c.steps[-1].value, settings.answer_digits) == answer), None)
    return Solution(answer, ranked, best_chain, list(labels), probabilities.tolist(), len(chains), time.perf_counter() - started)


def solve_plan_values(skeletons: Sequence[str], operand_values: Sequence[Sequence[float | None]], prior_refs: Sequence[Sequence[int | None]],
                      settings: SearchSettings) -> list[float | None]:
    """Run a fixed chain (the oracle): per step its skeleton, operand values, and for PRIOR
    operands the index of the step whose value they take (None otherwise)."""
    values: list[float | None] = []
    for skeleton, operands, refs in zip(skeletons, operand_values, prior_refs, strict=True):
        filled = [values[r] if r is not None else v for v, r in zip(operands, refs, strict=True)]
        values.append(None if any(v is None for v in filled) else run_skeleton(skeleton, filled, settings.timeout_s, settings.max_length))
    return values


def student_summary(solution: Solution) -> dict[str, Any]:
    return {"answer": solution.answer, "labels": solution.labels, "expression": solution.expression(), "n_chains": solution.n_chains}
