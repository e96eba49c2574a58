"""The step planner (mycelium.planner): its chain states, that it learns which step comes next
and when to stop, and that it survives saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mycelium import planner
from mycelium.config import load_config

LABELS = ["ADD", "SUB", "MUL", "DIV"]
SKELETONS = ["{0}+{1}", "{0}*{1}", "{0}/{1}", "{0}-{1}"]
LABELLED = [("{0}+{1}", "ADD"), ("{0}*{1}", "MUL"), ("{0}/{1}", "DIV"), ("{0}-{1}", "SUB"), ("{0}+{1}", "ADD")]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def head_settings(**changes):
    """The planner trains with C3's head settings; these tests pick small ones."""
    return load_config(None).c3.model_copy(update=changes)


def vocabulary(max_steps: int = 4) -> planner.PlannerVocabulary:
    return planner.build_vocabulary(SKELETONS[:3], LABELLED, LABELS, max_steps)


def test_vocabulary_keeps_the_top_skeletons_and_their_usual_label():
    vocab = vocabulary()
    assert vocab.skeletons == SKELETONS[:3] and vocab.other == 3 and vocab.stop == 4
    assert vocab.label_of == {"{0}+{1}": "ADD", "{0}*{1}": "MUL", "{0}/{1}": "DIV"}  # "{0}-{1}" is not a class: OTHER


def test_gold_states_walk_the_chain_and_end_with_stop():
    vocab = vocabulary()
    pooled = {"p": np.ones(8, np.float32)}
    mentions = {"p": {0, 10, 20}}
    chains = {"p": [("{0}*{1}", "MUL", {0, 10}), ("{0}-{1}", "SUB", {20}), ("{0}/{1}", "DIV", set())]}
    states, targets = planner.gold_states(chains, pooled, mentions, vocab)
    assert targets.tolist() == [1, vocab.other, 2, vocab.stop]
    assert states.shape[0] == 4
    unused = states[:, -4]  # the numbers block: unused, written, unused share, all used
    assert unused.tolist() == [3.0, 1.0, 0.0, 0.0]
    assert states[:, -1].tolist() == [0.0, 0.0, 1.0, 1.0]
    position = states[:, 8 : 8 + vocab.max_steps + 1]
    assert position.argmax(1).tolist() == [0, 1, 2, 3]
    previous = states[:, 8 + vocab.max_steps + 1 : 8 + vocab.max_steps + 1 + vocab.stop + 1]
    assert previous.argmax(1).tolist() == [vocab.stop, 1, vocab.other, 2]  # no step yet, MUL, OTHER, DIV


def planted(n: int, seed: int, vocab: planner.PlannerVocabulary):
    """Problems of two kinds told apart by their embedding: kind A is one addition then STOP,
    kind B a multiplication, a division, then STOP."""
    rng = np.random.default_rng(seed)
    chains, pooled, mentions = {}, {}, {}
    for i in range(n):
        kind_a = i % 2 == 0
        centre = np.r_[np.ones(4), np.zeros(4)] if kind_a else np.r_[np.zeros(4), np.ones(4)]
        pooled[str(i)] = (centre + 0.3 * rng.normal(size=8)).astype(np.float32)
        mentions[str(i)] = {0, 5} if kind_a else {0, 5, 9}
        chains[str(i)] = [("{0}+{1}", "ADD", {0, 5})] if kind_a else [("{0}*{1}", "MUL", {0, 5}), ("{0}/{1}", "DIV", {9})]
    return planner.gold_states(chains, pooled, mentions, vocab)


def trained(n_train: int, n_validation: int, **settings):
    """A planner trained on planted chains, with the given head settings over common defaults."""
    vocab = vocabulary()
    train, validation = planted(n_train, 0, vocab), planted(n_validation, 1, vocab)
    cfg = head_settings(**{"head_learning_rate": 1e-2, "weight_decay": 0.0, "early_stopping_patience": 3, "min_improvement": 1e-4, "seed": 0, **settings})
    return vocab, train, validation, planner.train_planner(train, validation, vocab, cfg, log=lambda _: None)


def test_the_planner_learns_the_next_step_and_when_to_stop_and_beats_the_most_common_guess():
    vocab, train, validation, result = trained(200, 60, hidden_size=32, dropout=0.0, batch_size=16, max_epochs=30)
    scores = planner.evaluate_planner(result.model, *validation, vocab.stop)
    most_common = np.bincount(train[1]).argmax()
    assert most_common == vocab.stop  # every chain ends once: STOP is the majority class
    baseline = float((validation[1] == most_common).mean())
    assert scores["top1_rate"] > 0.95 > baseline + 0.4
    assert scores["stop_right"] == scores["n"]
    best = result.history[result.best_epoch - 1]["validation_loss"]
    assert best <= min(h["validation_loss"] for h in result.history) + 1e-4  # gains under min_improvement do not count


def test_saved_planner_loads_and_scores_the_same():
    vocab, _, validation, result = trained(40, 10, hidden_size=16, dropout=0.1, batch_size=8, max_epochs=2)
    model, loaded = planner.load_planner(planner.save_planner(result, vocab, 16, 0.1))
    assert loaded == vocab and not model.training
    states = validation[0][:5]
    np.testing.assert_allclose(planner.next_steps(model, states), planner.next_steps(result.model, states), atol=1e-6)
    np.testing.assert_allclose(np.exp(planner.next_steps(model, states)).sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(planner.next_steps(model, states[2]), planner.next_steps(model, states)[2:3], atol=1e-6)  # one state, one row
