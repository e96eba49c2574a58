"""The student's search and C4 on floats, and stage 06's statistics."""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter

import numpy as np
import polars as pl
import pytest

from mycelium import c3_model, solver
from mycelium.config import load_config
from tasks import evaluate
from tasks.training_data import settings_from

TIMEOUT, MAX_LENGTH = 2.0, 500


@pytest.mark.parametrize(
    ("skeleton", "values", "expected"),
    [
        ("{0}/{1}", [48, 2], 24.0),
        ("{0}+{1}*{2}", [1, 2, 3], 7.0),
        ("({0}-{1})/{2}", [10, 4, 3], 2.0),
        ("sqrt({0})", [16], 4.0),
        ("{0}**2", [1.5], 2.25),
        ("factorial({0})", [5], 120.0),
        ("Mod({0},{1})", [17, 5], 2.0),
        ("{0}*{1}/100", [20, 50], 10.0),
    ],
)
def test_compiled_skeletons_compute_what_they_say(skeleton, values, expected):
    assert solver.run_skeleton(skeleton, values, TIMEOUT, MAX_LENGTH) == pytest.approx(expected)


def test_undefined_or_huge_results_are_none_and_fast():
    started = time.perf_counter()
    assert solver.run_skeleton("{0}/{1}", [1, 0], TIMEOUT, MAX_LENGTH) is None
    assert solver.run_skeleton("sqrt({0})", [-4], TIMEOUT, MAX_LENGTH) is None
    assert solver.run_skeleton("{0}**{1}**{2}", [9, 9, 9], TIMEOUT, MAX_LENGTH) is None
    assert solver.run_skeleton("factorial({0})", [10**6], TIMEOUT, MAX_LENGTH) is None
    assert solver.run_skeleton("{0}+{1}", [1], TIMEOUT, MAX_LENGTH) is None  # wrong arity
    assert time.perf_counter() - started < 10 * TIMEOUT


def test_a_skeleton_that_is_not_arithmetic_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    for skeleton in (f"__import__('os').system('touch {marker}')", "{0}.__class__", "lambda: {0}"):
        assert solver.run_skeleton(skeleton, [1.0], TIMEOUT, MAX_LENGTH) is None
    assert not marker.exists()


def _candidate(kind, value, **where):
    return c3_model.Candidate(kind, value, **where)


def test_a_finished_chain_uses_every_earlier_result():
    first = solver.Step("MUL", "{0}*{1}", [_candidate("TEXT", 3.0, span_start=0, span_end=1), _candidate("TEXT", 4.0, span_start=2, span_end=3)], 12.0)
    uses = solver.Step("ADD", "{0}+{1}", [_candidate("PRIOR", 12.0, prior_step=0), _candidate("TEXT", 1.0, span_start=4, span_end=5)], 13.0)
    ignores = solver.Step("ADD", "{0}+{1}", [_candidate("TEXT", 3.0, span_start=0, span_end=1), _candidate("TEXT", 1.0, span_start=4, span_end=5)], 4.0)
    assert solver.every_result_used(solver.Chain([first, uses]))
    assert not solver.every_result_used(solver.Chain([first, ignores]))
    assert solver.every_result_used(solver.Chain([first]))


def _settings(voting: str, boost: float = 0.0) -> solver.SearchSettings:
    cfg = load_config(None)
    settings = evaluate.search_settings(cfg)
    settings.voting, settings.numerical_consistency_boost = voting, boost
    return settings


def _chain(value: float, score: float) -> solver.Chain:
    return solver.Chain([solver.Step("ADD", "{0}+{1}", [], value)], score)


def test_voting_rules():
    chains = [_chain(7.5, -1.0), _chain(8.0, -1.2), _chain(8.0, -1.3)]
    assert solver.vote(chains, _settings("top1"))[0][0] == 7.5
    assert solver.vote(chains, _settings("majority"))[0][0] == 8.0  # two chains against one
    weighted = dict(solver.vote(chains, _settings("weighted")))
    assert weighted[8.0] == pytest.approx(math.exp(-0.2) + math.exp(-0.3))
    # The whole-number boost can turn a close vote.
    assert solver.vote([_chain(7.5, -1.0), _chain(8.0, -1.1)], _settings("top1"))[0][0] == 7.5
    assert solver.vote([_chain(7.5, -1.0), _chain(8.0, -1.1)], _settings("weighted", boost=0.2))[0][0] == 8.0
    # ...but only a positive one: a negative or zero answer gets no boost.
    assert solver.vote([_chain(7.5, -1.0), _chain(-8.0, -1.1)], _settings("weighted", boost=0.2))[0][0] == 7.5
    assert solver.vote([_chain(7.5, -1.0), _chain(0.0, -1.1)], _settings("weighted", boost=0.2))[0][0] == 7.5


def test_decode_emits_distinct_existing_candidates_best_first():
    cfg = load_config(None)
    rng = np.random.default_rng(0)
    problem = c3_model.ProblemText("Tom has 5 apples and buys 3 more.", rng.normal(size=8).astype(np.float32), [], np.zeros((0, 16), np.float32))
    problem.candidates = c3_model.text_candidates(problem.text, cfg.c4.word_to_number)
    problem.features = rng.normal(size=(len(problem.candidates), 16)).astype(np.float32)
    vocab = c3_model.Vocabulary(list(cfg.c2.labels), ["{0}+{1}"], list(cfg.c4.word_to_number), list(cfg.c4.domain_constants), 4)
    examples = c3_model.slot_examples(problem, "ADD", "{0}+{1}", 0, 0, [], [], None, 2, cfg.c4.domain_constants, vocab)
    import torch

    torch.manual_seed(0)
    model = c3_model.PointerScorer(len(examples[0].query), 16, examples[0].numeric.shape[1], 8, 0.0).eval()
    beams = c3_model.decode(model, examples, beam_width=5)
    allowed = c3_model.slot_candidates(problem, [], [], cfg.c4.domain_constants)
    assert 1 <= len(beams) <= 5
    assert [score for _, score in beams] == sorted((score for _, score in beams), reverse=True)
    for operands, _ in beams:
        assert len(operands) == 2
        assert all(o in allowed and o.kind != c3_model.END for o in operands)
        assert all(o.kind != c3_model.PRIOR for o in operands)  # nothing computed before the first step


def test_mcnemar_exact_on_hand_counts():
    # 10 pairs: the student alone right 6 times, the other alone right once.
    student = [True] * 6 + [False] * 1 + [True] * 2 + [False]
    other = [False] * 6 + [True] * 1 + [True] * 2 + [False]
    result = evaluate.mcnemar(student, other)
    assert (result["only_student"], result["only_other"]) == (6, 1)
    assert result["p_value"] == pytest.approx(2 * (1 + 7) / 2**7)  # two-sided binomial, 7 discordant
    assert evaluate.mcnemar([True, False], [True, False])["p_value"] == 1.0


def test_summary_counts_and_intervals():
    cfg = load_config(None)
    rows = []
    for i in range(10):
        rows.append({"problem_id": str(i), "n_gold_steps": 1 + i % 4, "student_correct": i < 6, "student_in_beam": i < 8, "student_in_pool": i < 9,
                     "student_chains": 0 if i == 9 else 3, "student_ms": float(i + 1), "nearest_correct": i < 2,
                     "gold_plan_correct": i < 7, "oracle_correct": True, "teacher_correct": (i < 1) if i < 5 else None, "teacher_ms": 1000.0 if i < 5 else None,
                     "source": "gsm8k"})
    results = pl.DataFrame(rows)
    summary = evaluate.summarise(results, cfg)
    assert summary["student_accuracy"]["correct"] == 6 and summary["student_accuracy"]["n"] == 10
    assert summary["student_accuracy"]["low"] < 0.6 < summary["student_accuracy"]["high"]
    assert summary["teacher_accuracy"]["n"] == 5 and summary["student_accuracy_on_teacher_subset"]["n"] == 5
    assert summary["student_valid_chain"]["correct"] == 9
    assert summary["student_in_beam"]["correct"] == 8 and summary["student_in_pool"]["correct"] == 9
    assert summary["latency_student_easy"]["n"] + summary["latency_student_hard"]["n"] == 10
    # Easy (1-2 gold steps) are problems 0, 1, 4, 5, 8, 9 at 1, 2, 5, 6, 9, 10 ms: median 5.5, and a
    # bootstrap interval over problems around it, inside the data's range.
    easy = summary["latency_student_easy"]
    assert easy["n"] == 6 and easy["p50_ms"] == 5.5
    assert 1 <= easy["p50_low"] < easy["p50_ms"] < easy["p50_high"] <= 10
    ratio = summary["teacher_over_student_latency_median"]
    assert summary["teacher_over_student_latency_low"] <= ratio <= summary["teacher_over_student_latency_high"]
    one = evaluate.summarise(results.head(1), cfg)["latency_student_all"]
    assert one["n"] == 1 and one["p50_low"] is None and one["p50_high"] is None  # no interval from one problem
    assert summary["mcnemar_student_vs_nearest"]["only_student"] == 4
    assert summary["gold_plan_accuracy"]["correct"] == 7 and summary["mcnemar_student_vs_gold_plan"]["only_other"] == 1
    # Gold lengths 1,2,3,4,1,2,3,4,1,2: the student is right on problems 0-5, its pool holds 0-8
    # (length 1: problems 0, 4, 8).
    lengths = summary["by_gold_steps"]
    assert list(lengths) == ["1", "2", "3", "4"] and sum(g["n"] for g in lengths.values()) == 10
    assert (lengths["1"]["n"], lengths["1"]["student"]["correct"], lengths["1"]["student_in_pool"]["correct"]) == (3, 2, 3)
    assert (lengths["4"]["student"]["correct"], lengths["4"]["gold_plan"]["correct"], lengths["4"]["oracle"]["correct"]) == (1, 1, 2)


def test_gold_lengths_at_the_search_limit_share_one_group_and_unreadable_solutions_none():
    rows = [{"n_gold_steps": n, "student_correct": n == 2, "student_in_pool": n <= 3, "nearest_correct": False,
             "gold_plan_correct": None if n == 0 else n < 3, "oracle_correct": None if n == 0 else True} for n in (0, 2, 2, 3, 5, 9)]
    groups = evaluate.by_gold_steps(pl.DataFrame(rows), longest=3)
    assert list(groups) == ["2", "3+"]  # the problem with no readable gold step is in no group
    assert groups["2"]["n"] == 2 and groups["2"]["student"]["correct"] == 2 and groups["2"]["gold_plan"]["correct"] == 2
    assert groups["3+"]["n"] == 3 and groups["3+"]["student_in_pool"]["correct"] == 1 and groups["3+"]["oracle"]["correct"] == 3
    assert groups["3+"]["student"]["high"] < 0.75  # 0 of 3, with its interval


def test_coverage_prior_charges_for_each_written_number_left_unused():
    cfg = load_config(None)
    problem = c3_model.ProblemText("Tom has 3 apples, buys 4 more and gives away 1 of every 2.", np.zeros(4, np.float32), [], np.zeros((0, 8), np.float32))
    problem.candidates = c3_model.text_candidates(problem.text, cfg.c4.word_to_number)
    written = c3_model.text_mentions(problem)
    assert len(written) == 4
    three, four = (c for c in problem.candidates if c.kind == c3_model.TEXT and c.value in (3.0, 4.0))
    student = solver.Student(None, [], None, None, {}, unused_log_prior=[-0.1, -1.0, -2.0, -5.0])
    settings = evaluate.search_settings(cfg)
    two_steps = solver.Chain([solver.Step("ADD", "{0}+{1}", [three, four], 7.0)])
    assert solver.coverage_logp(student, solver.unused_mentions(written, two_steps), settings) == -2.0  # "1" and "2" unused
    everything = [c for c in problem.candidates if c.kind == c3_model.TEXT and c.value in (1.0, 2.0)]
    full = solver.Chain([*two_steps.steps, solver.Step("DIV", "{0}/{1}", everything, 0.5)])
    assert solver.coverage_logp(student, solver.unused_mentions(written, full), settings) == -0.1
    nothing = solver.Chain([solver.Step("ADD", "{0}+{1}", [_candidate("CONSTANT", 60.0, constant="minutes_per_hour")] * 2, 120.0)])
    assert solver.coverage_logp(student, solver.unused_mentions(written, nothing), settings) == -5.0  # beyond the table: its last entry
    settings.coverage_prior = False
    assert solver.coverage_logp(student, solver.unused_mentions(written, nothing), settings) == 0.0
    assert solver.chain_uses(full)[c3_model.candidate_usage_key(three)] == 1


SKELETONS = {"ADD": ["{0}+{1}"], "SUB": ["{0}-{1}"], "MUL": ["{0}*{1}"], "DIV": ["{0}/{1}"]}


def seeded_student(seed: int, dim: int = 8) -> tuple[solver.Student, object]:
    """A whole student with untrained, seeded weights: what the search does with the scores
    (pruning, batching, bookkeeping) does not depend on the scores being good."""
    import torch

    from mycelium import c2_model, planner

    cfg = load_config(None)
    torch.manual_seed(seed)
    labels = list(SKELETONS)
    vocab = c3_model.Vocabulary(labels, [s for group in SKELETONS.values() for s in group], list(cfg.c4.word_to_number), list(cfg.c4.domain_constants), 4)
    plan_vocab = planner.build_vocabulary(vocab.skeletons, [(s, label) for label, group in SKELETONS.items() for s in group], labels, 4)
    query_dim = len(c3_model.query_vector(c3_model.ProblemText("", np.zeros(dim, np.float32), [], np.zeros((0, 2 * dim))), "ADD", "{0}+{1}", 0, 0, 0, vocab))
    state_dim = len(planner.state_vector(np.ones(dim, np.float32), [], [], 0, 0, plan_vocab))
    student = solver.Student(c2_model.C2Heads(dim, 8, len(labels), 0.0).eval(), labels,
                             c3_model.PointerScorer(query_dim, 2 * dim, c3_model.numeric_width(vocab), 16, 0.0).eval(), vocab, SKELETONS,
                             [-0.2, -1.5, -3.0], planner.StepPlanner(state_dim, 16, plan_vocab.stop + 1, 0.0).eval(), plan_vocab)
    with torch.no_grad():  # sharper than a fresh init, as trained models are: chains then differ in score
        for module in (student.c3, student.planner):
            for parameter in module.parameters():
                parameter.mul_(4.0)
    return student, cfg


def seeded_problem(text: str, seed: int, dim: int = 8) -> c3_model.ProblemText:
    cfg = load_config(None)
    rng = np.random.default_rng(seed)
    candidates = c3_model.text_candidates(text, cfg.c4.word_to_number)
    return c3_model.ProblemText(text, rng.normal(size=dim).astype(np.float32), candidates, rng.normal(size=(len(candidates), 2 * dim)).astype(np.float32))


PROBLEMS = ["Tom has 5 apples and buys 3 more bags of 4. He eats 2. How many are left?",
            "A shop sells 12 pens at 3 dollars each and 7 books at 9 dollars each. What is the total?",
            "Ann reads 20 pages a day for 6 days, then half as many for 2 days. How many pages?"]


def test_pruning_keeps_the_winner_and_drops_only_chains_far_below_it():
    cfg = load_config(None)
    settings = evaluate.search_settings(cfg)
    # No cap on finished chains (compare whole searches); a wide beam and no coverage term, so
    # that multi-step chains finish near the winner's score and a small margin has work to do.
    settings.max_paths, settings.beam_width, settings.max_steps, settings.coverage_prior = 10_000, 40, 4, False
    n_dropped = 0
    for seed, (i, text) in itertools.product(range(3), enumerate(PROBLEMS)):
        student, _ = seeded_student(seed)
        problem = seeded_problem(text, seed * 10 + i)
        _, probabilities = solver.predict_labels(student, problem.pooled, settings.threshold)
        settings.prune_margin = None
        everything = solver.planned_search(student, problem, probabilities, settings)
        settings.prune_margin = 0.5
        pruned = solver.planned_search(student, problem, probabilities, settings)
        assert pruned and pruned[0].steps == everything[0].steps and pruned[0].score == pytest.approx(everything[0].score)
        key = lambda c: (round(c.score, 9), tuple((s.skeleton, tuple(s.operands)) for s in c.steps))  # noqa: E731
        kept, full = {key(c) for c in pruned}, {key(c) for c in everything}
        assert kept <= full  # pruning never invents a chain
        dropped = [c for c in everything if key(c) not in kept]
        assert all(c.score < everything[0].score - settings.prune_margin for c in dropped)
        n_dropped += len(dropped)
    assert n_dropped > 0  # the margin did cut something on these problems


def test_the_gold_plan_holds_the_search_to_the_gold_steps_while_c3_picks_the_operands():
    student, cfg = seeded_student(1)
    settings = evaluate.search_settings(cfg)
    settings.beam_width = 40  # untrained scores favour constants: a wide beam lets some chain take the first result
    row = {"problem_id": "g1", "problem": PROBLEMS[0],
           "solution": "3 bags of 4 are 3*4=<<3*4=12>>12. With his 5 he has <<12+5=17>>17.\n#### 17"}
    split = evaluate.gold_steps(row, evaluate.gold_step_settings(cfg))
    plan = evaluate.gold_plan(split)
    assert plan == [("MUL", "{0}*{1}"), ("ADD", "{0}+{1}")]
    assert evaluate.oracle_answer(row, split, settings_from(cfg.training_data, cfg.c4, cfg.steps), settings) == 17.0
    problem = seeded_problem(PROBLEMS[0], 1)
    _, probabilities = solver.predict_labels(student, problem.pooled, settings.threshold)
    chains = solver.find_chains(student, problem, [label for label, _ in plan], probabilities, settings, plan)
    assert chains and all([(s.label, s.skeleton) for s in chain.steps] == plan for chain in chains)
    assert all(solver.every_result_used(chain) for chain in chains)
    # the operands are C3's choices among what the problem offers, so they differ across chains
    assert len({tuple(tuple(s.operands) for s in chain.steps) for chain in chains}) > 1
    assert solver.solve(student, problem, settings, plan=plan).chain.steps[-1].skeleton == "{0}+{1}"


def test_one_pass_over_the_beam_proposes_what_each_chain_proposes_alone():
    student, cfg = seeded_student(3)
    settings = evaluate.search_settings(cfg)
    problem = seeded_problem(PROBLEMS[1], 3)
    first = [p for p in solver.ranked_proposals(student, problem, [solver.Chain()], [[("MUL", -0.1, "{0}*{1}")]], settings)]
    chains = [c for c in (solver.compute(p, settings) for p in first[:4]) if c is not None]  # four one-step chains, different values and uses
    options = [("ADD", -0.5, "{0}+{1}"), ("DIV", -1.0, "{0}/{1}")]
    together = list(solver.ranked_proposals(student, problem, chains, [options] * len(chains), settings))
    alone = [p for chain in chains for p in solver.ranked_proposals(student, problem, [chain], [options], settings)]
    describe = lambda p: (id(p.chain), p.skeleton, tuple(p.operands))  # noqa: E731
    assert Counter(map(describe, together)) == Counter(map(describe, alone))
    assert [p.score for p in together] == sorted((p.score for p in together), reverse=True)  # best first
    by_key = {describe(p): p.score for p in alone}
    assert all(p.score == pytest.approx(by_key[describe(p)], abs=1e-5) for p in together)


def test_bounded_scoring_fills_the_beam_with_what_scoring_every_option_gives():
    """The planned search scores C3 operands only for the (chain, option) pairs whose bound can
    still place; the beam it keeps must be the one scoring every pair keeps, at every width
    and floor, and it must have skipped pairs along the way."""
    settings = evaluate.search_settings(load_config(None))
    options = [("ADD", -0.2, "{0}+{1}"), ("MUL", -0.9, "{0}*{1}"), ("SUB", -2.5, "{0}-{1}"), ("DIV", -4.0, "{0}/{1}")]
    n_compared, n_skipped = 0, 0
    for seed, (i, text) in itertools.product(range(3), enumerate(PROBLEMS)):
        settings.first_scored_pairs = [1, 3, None][seed]  # a pair at a time, a few, all at once
        student, _ = seeded_student(seed)
        problem = seeded_problem(text, seed * 10 + i)
        beam = [solver.Chain()]
        for _ in range(3):
            chain_options = [options[(c + seed) % 2 :] for c in range(len(beam))]  # chains need not share their options
            for width, floor in [(1, -math.inf), (4, -math.inf), (10, -math.inf), (10, max(c.score for c in beam) - 3.0)]:
                everything = solver.best_computable(solver.ranked_proposals(student, problem, beam, chain_options, settings), width, settings, floor)
                scored = []
                original = solver.ranked_proposals
                solver.ranked_proposals = lambda *a, **k: (scored.append(sum(map(len, a[3]))), original(*a, **k))[1]  # noqa: E731 — count pairs scored
                try:
                    bounded = solver.best_computable_bounded(student, problem, beam, chain_options, width, settings, floor)
                finally:
                    solver.ranked_proposals = original
                assert [[(s.skeleton, s.operands) for s in c.steps] for c in bounded] == [[(s.skeleton, s.operands) for s in c.steps] for c in everything]
                # float32 sums over a different set of queries round differently in the last bits
                assert [c.score for c in bounded] == pytest.approx([c.score for c in everything], abs=1e-5)
                n_skipped += sum(map(len, chain_options)) - sum(scored)
                n_compared += 1
            beam = solver.best_computable_bounded(student, problem, beam, chain_options, 10, settings)
    assert n_compared == 3 * len(PROBLEMS) * 3 * 4 and n_skipped > 0  # seeds x problems x depths x (width, floor)
