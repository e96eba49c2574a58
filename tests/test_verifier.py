"""The chain verifier: what it reads, that it learns to rank a pool, and how the student uses it."""

from __future__ import annotations

import types

import numpy as np

from mycelium import c3_model, solver, verifier
from tasks import train_verifier

DIM = 8
SUM, DIFF = "{0}+{1}", "{0}-{1}"
VOCAB = verifier.VerifierVocabulary([SUM, DIFF], ["minutes_per_hour"], max_steps=3, max_operands=2)
SETTINGS = solver.SearchSettings(threshold=0.5, beam_width=4, max_paths=10, max_steps=3, skeletons_per_label=1, voting="weighted",
                                 numerical_consistency_boost=0.0, simplicity_penalty=0.0, timeout_s=2.0, max_length=500,
                                 domain_constants={"minutes_per_hour": 60.0}, answer_digits=6)


def problem_with(values: list[float], rng: np.random.Generator) -> c3_model.ProblemText:
    candidates = [c3_model.Candidate(c3_model.TEXT, v, span_start=3 * i, span_end=3 * i + 2) for i, v in enumerate(values)]
    candidates.append(c3_model.Candidate(c3_model.IMPLICIT, 2.0, span_start=40, span_end=46, word="double"))
    return c3_model.ProblemText("a problem", rng.normal(size=DIM).astype(np.float32), candidates,
                                rng.normal(size=(len(candidates), 2 * DIM)).astype(np.float32))


def chain(problem: c3_model.ProblemText, skeletons: list[str], score: float) -> solver.Chain:
    """Step 0 combines the first two numbers; each later step the previous result and the next number."""
    a, b = problem.candidates[0], problem.candidates[1]
    steps = [solver.Step("X", skeletons[0], [a, b], solver.run_skeleton(skeletons[0], [a.value, b.value], 2.0, 500))]
    for i, skeleton in enumerate(skeletons[1:], start=1):
        prior = c3_model.Candidate(c3_model.PRIOR, steps[-1].value, prior_step=i - 1)
        nxt = problem.candidates[i + 1]
        steps.append(solver.Step("X", skeleton, [prior, nxt], solver.run_skeleton(skeleton, [prior.value, nxt.value], 2.0, 500)))
    return solver.Chain(steps, score)


def toy_pool(rng: np.random.Generator) -> tuple[c3_model.ProblemText, list[solver.Chain], np.ndarray]:
    """Four chains; the right one is the all-sum chain, and the search scores it lowest."""
    problem = problem_with([float(v) for v in rng.integers(1, 50, size=4)], rng)
    chains = [chain(problem, [DIFF, DIFF], 0.0), chain(problem, [SUM, DIFF], -0.5), chain(problem, [DIFF, SUM], -1.0), chain(problem, [SUM, SUM], -2.0)]
    return problem, chains, np.array([False, False, False, True])


def test_an_encoded_pool_points_only_at_what_exists():
    rng = np.random.default_rng(0)
    problem, chains, _ = toy_pool(rng)
    constant = c3_model.Candidate(c3_model.CONSTANT, 60.0, constant="minutes_per_hour")
    chains.append(solver.Chain([solver.Step("X", "{0}*{1}", [problem.candidates[-1], constant], 120.0)], -3.0))
    pool = verifier.encode_pool(problem, chains, VOCAB)
    for c, ch in enumerate(chains):
        assert pool.length[c] == len(ch.steps)
        for s, step in enumerate(ch.steps):
            for o, operand in enumerate(step.operands):
                kind, ref = pool.kind[c, s, o], pool.ref[c, s, o]
                if operand.kind in (c3_model.TEXT, c3_model.IMPLICIT):
                    assert problem.candidates[ref] == operand  # its own candidate row, so its own backbone feature
                elif operand.kind == c3_model.PRIOR:
                    assert kind == verifier.OPERAND_KINDS[c3_model.PRIOR] and ref < s  # only an earlier step
                else:
                    assert VOCAB.constants[ref] == "minutes_per_hour"
    assert pool.skeleton[-1, 0] == 0  # a skeleton never seen in training gets the shared unknown id
    assert pool.search_score.max() == 0.0 and pool.search_score.min() == -3.0
    past_the_end = np.arange(VOCAB.max_steps)[None, :] >= pool.length[:, None]
    assert (pool.kind[past_the_end] == verifier.NO_OPERAND).all()  # steps a chain does not have point at nothing


def test_the_verifier_learns_to_rank_a_pool_the_search_ranks_wrong(tmp_path):
    rng = np.random.default_rng(1)
    pools = [toy_pool(rng) for _ in range(120)]
    encoded = [(verifier.encode_pool(p, chains, VOCAB), right) for p, chains, right in pools]
    train, validation = encoded[:80], encoded[80:]
    entries = [{"chains": chains, "right": right} for _, chains, right in pools[80:]]

    def count_right(model):
        return sum(train_verifier.right_after_vote(entry, [c.score for c in entry["chains"]] if model is None else verifier.score_pool(model, item[0]), SETTINGS)
                   for entry, item in zip(entries, validation, strict=True))

    cfg = types.SimpleNamespace(hidden_size=32, dropout=0.0, input_dropout=0.0, learning_rate=3e-3, weight_decay=0.0, batch_problems=8, max_epochs=15,
                                early_stopping_patience=15, seed=0)
    result = verifier.train_verifier(train, validation, VOCAB, DIM, cfg, count_right, log=lambda _: None)
    assert result.search_right == 0  # the search's scores always prefer a wrong chain
    assert result.verifier_right >= 36 and result.beats_search  # of 40
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]

    files = verifier.save_verifier(result, VOCAB, DIM, cfg)
    loaded = verifier.load_verifier(files)
    pool = validation[0][0]
    assert np.allclose(verifier.score_pool(loaded, pool), verifier.score_pool(result.model, pool), atol=1e-6)

    # the student with it: the same chains, re-scored, and the vote now picks the right answer
    problem, chains, right = pools[100]
    student = types.SimpleNamespace(verifier=loaded)
    reranked = solver.rerank(student, problem, chains)
    assert sorted(c.steps[-1].value for c in reranked) == sorted(c.steps[-1].value for c in chains)
    assert reranked[0].steps[-1].value == chains[int(np.flatnonzero(right)[0])].steps[-1].value


def test_a_verifier_that_does_not_beat_the_search_is_not_loaded():
    rng = np.random.default_rng(2)
    pools = [toy_pool(rng) for _ in range(10)]
    # every pool right everywhere: nothing to learn, so it is not trained and not used
    encoded = [(verifier.encode_pool(p, chains, VOCAB), np.ones(len(chains), bool)) for p, chains, _ in pools]
    cfg = types.SimpleNamespace(hidden_size=8, dropout=0.0, input_dropout=0.0, learning_rate=1e-3, weight_decay=0.0, batch_problems=4, max_epochs=2,
                                early_stopping_patience=1, seed=0)
    result = verifier.train_verifier(encoded, encoded, VOCAB, DIM, cfg, lambda model: 10, log=lambda _: None)
    assert not result.beats_search and result.history == []
    assert verifier.load_verifier(verifier.save_verifier(result, VOCAB, DIM, cfg)) is None


def test_without_a_verifier_rerank_keeps_the_search_order():
    rng = np.random.default_rng(3)
    problem, chains, _ = toy_pool(rng)
    student = types.SimpleNamespace(verifier=None)
    assert solver.rerank(student, problem, chains) == chains
