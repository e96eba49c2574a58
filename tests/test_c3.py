"""C3, the operand pointer (mycelium.c3_model) and its stage 05 wiring (tasks.train_c3).

Everything runs on real inputs: the first 120 problems of the embedded GSM8K sample, labelled
into stage 03's tables by the real splitter and `build_sets`, read by the real frozen MiniLM
backbone (loaded once for the module), a pointer really trained on them. Nothing is mocked.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mycelium import c3_model
from mycelium.c3_model import (
    Candidate,
    collate,
    decode,
    evaluate,
    gold_candidate,
    load_c3,
    read_problems,
    save_c3,
    slot_candidates,
    slot_examples,
    text_candidates,
    train_c3,
)
from mycelium.config import load_config
from mycelium.datasets import load_problems
from mycelium.encoder import load_encoder
from mycelium.provenance import (
    CONSTANT,
    END,
    IMPLICIT,
    NUMBER_WORDS,
    PRIOR,
    TEXT,
    ProvenanceSettings,
)
from mycelium.steps import StepSettings, split_rows
from tasks.train_c3 import build_examples, problems_from_tables, problems_to_tables
from tasks.training_data import TRAIN, VALIDATION, build_sets

SAMPLE = Path(__file__).resolve().parent.parent / "mycelium" / "data" / "sample" / "gsm8k_sample.jsonl"
N_PROBLEMS = 120
NO_NUMBERS = "Tom has some apples in a basket. He gives a few of them to his sister. How many apples does Tom have left?"
NO_NUMBERS_ID = "no-numbers"


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The pointer's batches are tiny: on a busy 2-core machine two intra-op threads spin
    (measured ~95 ms per training step against ~5 ms with one), so this module uses one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def config():
    return load_config(None)


@pytest.fixture(scope="module")
def c3_cfg(config):
    return config.c3


@pytest.fixture(scope="module")
def beam_width(config) -> int:
    return config.eval.beam_width


@pytest.fixture(scope="module")
def sets(config):
    """Stage 03's tables for the first N_PROBLEMS sample problems (as in test_provenance)."""
    settings = ProvenanceSettings(
        word_to_number=dict(config.c4.word_to_number),
        domain_constants=dict(config.c4.domain_constants),
        rel_tol=1e-6,
        context_words=6,
        timeout_s=2.0,
        max_length=500,
    )
    step_settings = StepSettings(
        timeout_s=2.0, max_length=500, rel_tol=1e-6, pow_subtypes=list(config.ib.pow_subtypes), labels=list(config.c2.labels)
    )
    problems = load_problems(config.dataset.model_copy(update={"source": str(SAMPLE)}), limit=N_PROBLEMS).frame
    step_rows = split_rows(problems.to_dicts(), step_settings).steps
    assignments = step_rows.select("problem_id", "step_index").with_columns(template_id=(pl.col("step_index") % 3).cast(pl.Int32))
    cfg = config.training_data.model_copy(update={"validation_fraction": 0.3})
    tables, _ = build_sets(problems, step_rows, assignments, {}, {}, cfg, list(config.c2.labels), settings, progress=False)
    return tables


@pytest.fixture(scope="module")
def encoder(c3_cfg):
    return load_encoder(c3_cfg.backbone, c3_cfg.max_length)


@pytest.fixture(scope="module")
def texts(sets) -> dict[str, str]:
    wanted = set(sets["c3_slots"]["problem_id"])
    return {p: t for p, t in sets["c2"].select("problem_id", "problem").iter_rows() if p in wanted}


@pytest.fixture(scope="module")
def problems(encoder, texts, config, c3_cfg) -> dict[str, c3_model.ProblemText]:
    """The sample's C3 problems and one problem without any number, read once by the backbone."""
    ids = [*texts, NO_NUMBERS_ID]
    read = read_problems(encoder, [*texts.values(), NO_NUMBERS], config.c4.word_to_number, c3_cfg.feature_batch_size,
                         c3_cfg.context_tokens, progress=False)
    return dict(zip(ids, read, strict=True))


@pytest.fixture(scope="module")
def vocab(sets, config, c3_cfg):
    train_slots = sets["c3_slots"].filter(pl.col("split") == TRAIN)
    return c3_model.build_vocabulary(list(config.c2.labels), Counter(train_slots["skeleton"].to_list()), config.c4.word_to_number,
                                     config.c4.domain_constants, c3_cfg)


@pytest.fixture(scope="module")
def examples(sets, problems, vocab, config):
    slots, operands = sets["c3_slots"], sets["c3_operands"]
    train = build_examples(slots.filter(pl.col("split") == TRAIN), operands, problems, vocab, config.c4)
    validation = build_examples(slots.filter(pl.col("split") == VALIDATION), operands, problems, vocab, config.c4)
    return train, validation


@pytest.fixture(scope="module")
def trained(examples, c3_cfg, beam_width):
    (train, _, _), (validation, _, _) = examples
    cfg = c3_cfg.model_copy(update={"max_epochs": 25, "early_stopping_patience": 2})
    logged: list[str] = []
    return train_c3(train, validation, cfg, beam_width, log=logged.append), cfg, logged


def inference_examples(problem, slot: dict, position: int, step_indices: list[int], config, vocab):
    """A slot's examples as at inference: no gold, one per operand position."""
    return slot_examples(problem, slot["label"], slot["skeleton"], slot["step_index"], position, step_indices[:position],
                         slot["prior_values"], None, slot["n_operands"], config.c4.domain_constants, vocab)


def slots_in_order(slots: pl.DataFrame):
    """(problem_id, position, slot row, the problem's step indices) for every slot."""
    for (problem_id,), group in slots.group_by("problem_id", maintain_order=True):
        group = group.sort("step_index")
        step_indices = group["step_index"].to_list()
        for position, slot in enumerate(group.iter_rows(named=True)):
            yield problem_id, position, slot, step_indices


# --- 1. the pointer can only emit what exists ---------------------------------------------------------


def _written_values(text: str, start: int, end: int) -> set[float]:
    """What the characters of a span can stand for, read independently of find_mentions."""
    span = text[start:end]
    if m := re.fullmatch(r"(\d+)\s*/\s*(\d+)", span):
        return {int(m.group(1)) / int(m.group(2)), float(m.group(1))}
    if re.fullmatch(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+", span):
        value = float(span.replace(",", ""))
        followed_by_percent = re.match(r"\s?%", text[end:]) is not None
        return {value, value / 100.0} if followed_by_percent else {value}
    word = span.lower()
    if word in NUMBER_WORDS:
        return {float(NUMBER_WORDS[word])}
    tens, _, unit = word.partition("-")
    if tens in NUMBER_WORDS and unit in NUMBER_WORDS:
        return {float(NUMBER_WORDS[tens] + NUMBER_WORDS[unit])}
    return set()


def test_every_text_candidate_is_a_number_written_in_the_problem(problems, texts, config, encoder):
    word_to_number = config.c4.word_to_number
    n_text = n_implicit = 0
    for problem_id, text in texts.items():
        candidates = text_candidates(text, word_to_number)
        problem = problems[problem_id]
        assert problem.candidates == candidates  # read_problems keeps exactly these, in order
        assert problem.features.shape == (len(candidates), 2 * encoder.dim)
        assert problem.pooled.shape == (encoder.dim,)
        for c, feature in zip(candidates, problem.features, strict=True):
            assert 0 <= c.span_start < c.span_end <= len(text)
            assert np.abs(feature).sum() > 0  # the sample's problems fit max_length: every span has text evidence
            if c.kind == TEXT:
                n_text += 1
                written = _written_values(text, c.span_start, c.span_end)
                assert any(math.isclose(c.value, v, rel_tol=1e-12) for v in written), (text[c.span_start : c.span_end], c)
            else:
                assert c.kind == IMPLICIT
                n_implicit += 1
                span = text[c.span_start : c.span_end].lower()
                if c.word == "percent":
                    assert span in {"%", "percent"}
                else:
                    assert span.startswith(c.word.rstrip("fe"))
                word_value = float(word_to_number[c.word])
                assert c.value == pytest.approx(1.0 / word_value if c.reciprocal else word_value)
    assert n_text > 300 and n_implicit > 10


def test_text_candidates_of_natalia_with_percent_and_fraction(config):
    text = "Natalia sold 48 clips, half as many in May, 50% of them red, 3/4 of them small and twenty-five big."
    found = {(c.kind, text[c.span_start : c.span_end], c.value) for c in text_candidates(text, config.c4.word_to_number)}
    assert {(TEXT, "48", 48.0), (TEXT, "50", 50.0), (TEXT, "50", 0.5), (TEXT, "3/4", 0.75), (TEXT, "twenty-five", 25.0),
            (IMPLICIT, "half", 2.0), (IMPLICIT, "half", 0.5), (IMPLICIT, "%", 100.0), (IMPLICIT, "%", 0.01)} <= found


def test_prior_candidates_only_name_earlier_steps(sets, problems, config):
    constants = config.c4.domain_constants
    n_first = 0
    for problem_id, position, slot, step_indices in slots_in_order(sets["c3_slots"]):
        candidates = slot_candidates(problems[problem_id], step_indices[:position], slot["prior_values"], constants)
        prior = [c for c in candidates if c.kind == PRIOR]
        assert [c.prior_step for c in prior] == step_indices[:position]
        assert all(c.prior_step < slot["step_index"] for c in prior)
        assert [c.value for c in prior] == slot["prior_values"]
        assert [c.constant for c in candidates if c.kind == CONSTANT] == list(constants)
        assert candidates[-1] == Candidate(END) and sum(c.kind == END for c in candidates) == 1
        if position == 0:
            n_first += 1
            assert prior == []
    assert n_first == sets["c3_slots"]["problem_id"].n_unique()


def test_decode_emits_only_the_slots_own_candidates_best_first(sets, problems, trained, config, vocab, beam_width):
    result, _, _ = trained
    n_checked = 0
    validation = sets["c3_slots"].filter(pl.col("split") == VALIDATION)
    for problem_id, position, slot, step_indices in slots_in_order(validation):
        problem = problems[problem_id]
        made = inference_examples(problem, slot, position, step_indices, config, vocab)
        assert len(made) == slot["n_operands"]
        own = slot_candidates(problem, step_indices[:position], slot["prior_values"], config.c4.domain_constants)
        beams = decode(result.model, made, beam_width)
        assert 1 <= len(beams) <= beam_width
        scores = [score for _, score in beams]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(id(c) for c in chosen) for chosen, _ in beams}) == len(beams)  # no tuple twice
        with torch.inference_mode():
            batch = collate(made)
            log_probs = result.model(batch["query"], batch["text"], batch["numeric"], batch["mask"]).numpy()
        for chosen, score in beams:
            assert len(chosen) == slot["n_operands"]
            assert all(c.kind != END for c in chosen)
            assert all(c in own for c in chosen)  # equal to one of slot_candidates(...)
            assert all(any(c is x for x in made[0].candidates) for c in chosen)  # the very objects
            indices = [next(i for i, x in enumerate(made[0].candidates) if x is c) for c in chosen]
            assert score == pytest.approx(sum(float(log_probs[k, i]) for k, i in enumerate(indices)), abs=1e-5)
        # the best tuple overall (each position's best non-END candidate) is first whenever its
        # candidates are distinct; no returned tuple can beat the unconstrained rank-k tuple
        if slot["n_operands"] > 3:  # keep the brute force small
            continue
        best = [int(np.argmax(np.where([c.kind == END for c in made[0].candidates], -np.inf, row))) for row in log_probs]
        unconstrained = top_tuple_scores(log_probs, made[0].candidates, beam_width, distinct=False)
        assert all(s <= u + 1e-5 for s, u in zip(scores, unconstrained, strict=False))
        if len(set(best)) == len(best):
            n_checked += 1
            assert [id(c) for c in beams[0][0]] == [id(made[0].candidates[i]) for i in best]
            assert scores[0] == pytest.approx(unconstrained[0], abs=1e-5)
    assert n_checked > 20


def top_tuple_scores(log_probs: np.ndarray, candidates, k: int, distinct: bool) -> list[float]:
    """Brute force: the k best summed log-probabilities over every non-END tuple."""
    allowed = [i for i, c in enumerate(candidates) if c.kind != END]
    combos = itertools.product(allowed, repeat=len(log_probs))
    sums = (sum(float(log_probs[p, i]) for p, i in enumerate(combo)) for combo in combos if not distinct or len(set(combo)) == len(combo))
    return sorted(sums, reverse=True)[:k]


def test_decode_beam_is_exactly_the_best_tuples(sets, problems, trained, config, vocab, beam_width):
    result, _, _ = trained
    validation = sets["c3_slots"].filter(pl.col("split") == VALIDATION)
    for problem_id, position, slot, step_indices in slots_in_order(validation):
        if slot["n_operands"] > 3:
            continue
        made = inference_examples(problems[problem_id], slot, position, step_indices, config, vocab)
        scores = [score for _, score in decode(result.model, made, beam_width)]
        with torch.inference_mode():
            batch = collate(made)
            log_probs = result.model(batch["query"], batch["text"], batch["numeric"], batch["mask"]).numpy()
        candidates = made[0].candidates
        # whichever rule decode follows (distinct candidates or not), its beam must be that rule's best tuples
        assert (scores == pytest.approx(top_tuple_scores(log_probs, candidates, beam_width, distinct=True), abs=1e-5)
                or scores == pytest.approx(top_tuple_scores(log_probs, candidates, beam_width, distinct=False), abs=1e-5)), slot["expression"]


def gold_tuples(sets, problems, config, split: str):
    """(problem_id, position, slot, step indices, gold candidate indices) of every slot of a split."""
    operands = sets["c3_operands"].filter(pl.col("provenance") != END)
    rows = {(str(p), int(s)): g.sort("operand_index").to_dicts() for (p, s), g in operands.group_by("problem_id", "step_index")}
    for problem_id, position, slot, step_indices in slots_in_order(sets["c3_slots"].filter(pl.col("split") == split)):
        own = slot_candidates(problems[problem_id], step_indices[:position], slot["prior_values"], config.c4.domain_constants)
        gold = [gold_candidate(own, row) for row in rows.get((problem_id, slot["step_index"]), [])]
        yield problem_id, position, slot, step_indices, gold


def test_some_gold_slots_use_one_candidate_twice(sets, problems, config):
    """`150+150` (an earlier result added to itself), `4+4+2+6+11` with one written 4: stage 03's
    gold points one candidate at two operands of a slot."""
    reused = [(p, slot["expression"]) for split in (TRAIN, VALIDATION) for p, _, slot, _, gold in gold_tuples(sets, problems, config, split)
              if len(set(gold)) < len(gold)]
    assert len(reused) == 8  # of 291 slots in the first 120 sample problems
    assert any(expression == "150+150" for _, expression in reused)


def test_decode_can_emit_every_gold_tuple_at_a_wide_enough_beam(sets, problems, trained, config, vocab):
    result, _, _ = trained
    n_checked = 0
    for split in (TRAIN, VALIDATION):
        for problem_id, position, slot, step_indices, gold in gold_tuples(sets, problems, config, split):
            if not 1 <= len(gold) <= 3 or len(set(gold)) == len(gold):
                continue
            made = inference_examples(problems[problem_id], slot, position, step_indices, config, vocab)
            everything = len(made[0].candidates) ** len(made)  # a beam as wide as every tuple
            emitted = {tuple(next(i for i, x in enumerate(made[0].candidates) if x is c) for c in chosen)
                       for chosen, _ in decode(result.model, made, everything)}
            n_checked += 1
            assert tuple(gold) in emitted, (slot["expression"], gold)
    assert n_checked > 0


# --- 2. every gold operand is one of the candidates -----------------------------------------------------


def test_gold_candidate_matches_every_gold_operand_of_every_kind(sets, examples, config):
    (train, train_keys, unmatched_train), (validation, validation_keys, unmatched_validation) = examples
    # every C3 operand of the sample is explained, and the pointer's candidates are built by the
    # same rules as the labels: no gold operand lacks a candidate
    assert (unmatched_train, unmatched_validation) == (0, 0)
    operands = sets["c3_operands"]
    assert len(train) + len(validation) == operands.height
    rows = {(str(p), int(s)): g.sort("operand_index").to_dicts() for (p, s), g in operands.group_by("problem_id", "step_index")}
    seen = Counter()
    position = Counter()
    for example, key in zip([*train, *validation], [*train_keys, *validation_keys], strict=True):
        row = rows[key][position[key]]
        position[key] += 1
        chosen = example.candidates[example.gold]
        assert chosen.kind == row["provenance"] == example.gold_kind
        seen[chosen.kind] += 1
        if chosen.kind in (TEXT, IMPLICIT):
            assert (chosen.span_start, chosen.span_end) == (row["span_start"], row["span_end"])
            assert chosen.value == pytest.approx(row["value"], rel=1e-12)
            if chosen.kind == IMPLICIT:
                assert chosen.word == row["word"]
        elif chosen.kind == PRIOR:
            assert chosen.prior_step == row["prior_step"] < row["step_index"]
        elif chosen.kind == CONSTANT:
            assert chosen.constant == row["constant"]
            assert chosen.value == config.c4.domain_constants[row["constant"]] == row["value"]
        else:
            assert row["operand_index"] == len(rows[key]) - 1  # END closes the slot
    assert set(seen) == {TEXT, PRIOR, IMPLICIT, CONSTANT, END}
    assert seen == Counter(operands["provenance"].to_list())


def test_gold_candidate_is_none_when_nothing_matches(sets, examples):
    (train, train_keys, _), _ = examples
    operands = sets["c3_operands"]
    text_row = operands.filter(pl.col("provenance") == TEXT).row(0, named=True)
    example = next(e for e, k in zip(train, train_keys, strict=True) if k == (text_row["problem_id"], text_row["step_index"]))
    assert gold_candidate(example.candidates, text_row) is not None
    assert gold_candidate(example.candidates, {**text_row, "span_start": text_row["span_start"] + 1000}) is None
    assert gold_candidate(example.candidates, {**text_row, "value": text_row["value"] + 0.5}) is None
    assert gold_candidate(example.candidates, {**text_row, "provenance": PRIOR, "prior_step": 10_000}) is None
    assert gold_candidate(example.candidates, {**text_row, "provenance": CONSTANT, "constant": "no_such_constant"}) is None


# --- 3. training on the sample --------------------------------------------------------------------------


def test_training_beats_the_uniform_pick_and_keeps_the_best_epoch(trained, examples, beam_width):
    result, cfg, logged = trained
    _, (validation, _, _) = examples
    history = result.history
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))
    assert len(logged) >= len(history)  # a line per epoch
    assert 1 <= result.best_epoch <= len(history)
    # early stopping: training ran to the end or stopped `patience` epochs after the best one
    assert len(history) == cfg.max_epochs or len(history) == result.best_epoch + cfg.early_stopping_patience
    losses = [row["validation_loss"] for row in history]
    best = history[result.best_epoch - 1]
    assert best["validation_loss"] <= min(losses) + cfg.min_improvement
    assert all(math.isfinite(row["train_loss"]) for row in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # the returned model is the best epoch's, not the last one's
    scores = evaluate(result.model, validation, cfg.batch_size, beam_width)
    assert scores["loss"] == pytest.approx(best["validation_loss"], rel=1e-6)
    assert scores["top1_rate"] == pytest.approx(best["top1_rate"])
    assert scores["n"] == len(validation)
    assert scores["top1_rate"] > scores["chance_top1_rate"] + 0.2
    assert scores["top1_rate"] <= scores["in_beam_rate"] <= 1.0
    assert 0.0 < scores["chance_top1_rate"] < 0.5


# --- 4. features round-trip through the tables --------------------------------------------------------


def test_problems_round_trip_through_the_feature_tables(problems):
    ids = list(problems)
    tables = problems_to_tables(ids, [problems[i] for i in ids])
    assert tables["candidates"].height == sum(len(p.candidates) for p in problems.values())
    back = problems_from_tables(tables, {i: p.text for i, p in problems.items()})
    assert set(back) == set(problems)
    for problem_id, original in problems.items():
        restored = back[problem_id]
        assert restored.text == original.text
        assert restored.candidates == original.candidates
        assert restored.features.dtype == np.float32 and restored.features.shape == original.features.shape
        assert np.array_equal(restored.features, original.features)
        assert np.array_equal(restored.pooled, original.pooled)
    assert back[NO_NUMBERS_ID].candidates == []


# --- 5. save and load ------------------------------------------------------------------------------------


def test_saved_and_loaded_model_scores_identically(trained, examples, vocab):
    result, cfg, _ = trained
    (train, _, _), (validation, _, _) = examples
    dims = {"query": len(train[0].query), "text": train[0].text_features.shape[1], "numeric": train[0].numeric.shape[1]}
    files = save_c3(result, vocab, dims, cfg)
    assert set(files) == {"c3_pointer.safetensors", "c3_config.json"}
    model, loaded_vocab, loaded_config = load_c3(files)
    assert not model.training
    assert loaded_vocab == vocab
    assert loaded_config["best_epoch"] == result.best_epoch and loaded_config["dims"] == dims
    batch = collate(validation[:64])
    with torch.inference_mode():
        before = result.model(batch["query"], batch["text"], batch["numeric"], batch["mask"])
        after = model(batch["query"], batch["text"], batch["numeric"], batch["mask"])
    assert torch.equal(before, after)
    assert torch.isinf(after).any()  # padding is -inf in both


# --- 6. a problem with no number in its text -----------------------------------------------------------


def test_problem_without_numbers_still_gets_prior_constant_end_and_decodes(problems, trained, config, vocab, beam_width):
    result, _, _ = trained
    problem = problems[NO_NUMBERS_ID]
    constants = config.c4.domain_constants
    assert problem.candidates == [] and problem.features.shape == (0, problem.features.shape[1])
    # the first step: constants and END only
    first = slot_examples(problem, "ADD", "{0}+{1}", 0, 0, [], [], None, 2, constants, vocab)
    assert [c.kind for c in first[0].candidates] == [CONSTANT] * len(constants) + [END]
    # a later step: the earlier results too
    later = slot_examples(problem, "ADD", "{0}+{1}", 2, 2, [0, 1], [3.0, 5.0], None, 2, constants, vocab)
    kinds = [c.kind for c in later[0].candidates]
    assert kinds == [PRIOR, PRIOR] + [CONSTANT] * len(constants) + [END]
    assert later[0].text_features.shape[1] == 2 * len(problem.pooled)
    for made in (first, later):
        beams = decode(result.model, made, beam_width)
        assert 1 <= len(beams) <= beam_width
        assert [s for _, s in beams] == sorted((s for _, s in beams), reverse=True)
        for chosen, score in beams:
            assert len(chosen) == 2 and all(c.kind in (PRIOR, CONSTANT) for c in chosen) and math.isfinite(score)
    # gold rows point into these candidates; an END-only slot is one example at END
    gold = [{"provenance": PRIOR, "prior_step": 1}, {"provenance": CONSTANT, "constant": "minutes_per_hour"}, {"provenance": END}]
    labelled = slot_examples(problem, "MUL", "{0}*{1}", 2, 2, [0, 1], [3.0, 5.0], gold, 2, constants, vocab)
    assert [e.candidates[e.gold] for e in labelled] == [
        Candidate(PRIOR, 5.0, prior_step=1), Candidate(CONSTANT, 60.0, constant="minutes_per_hour"), Candidate(END)]
    scores = evaluate(result.model, labelled, 8, beam_width)
    assert scores["n"] == 3 and math.isfinite(scores["loss"])


# --- 7. what the chain already used, and many slots at once --------------------------------------------

USED_COLUMN = len(c3_model.KINDS) + c3_model.N_NUMERIC - 2  # "used before" among the numeric features


def test_examples_know_what_the_gold_chain_used_before(sets, examples):
    """The 'used before' feature of each candidate is on exactly when an earlier gold step of
    the same problem took it (either reading of a mention counts as that mention)."""
    operands = sets["c3_operands"].filter(pl.col("provenance") != END)
    taken_at: dict[tuple[str, int], set] = {}
    for (problem_id,), group in operands.group_by("problem_id"):
        for step_index in group["step_index"].unique().to_list():
            earlier = group.filter(pl.col("step_index") < step_index).to_dicts()
            taken_at[(problem_id, step_index)] = {c3_model.gold_usage_key(row) for row in earlier}
    n_used = 0
    for made, keys, _ in examples:
        for example, key in zip(made, keys, strict=True):
            taken = taken_at.get(key, set())
            for candidate, flag in zip(example.candidates, example.numeric[:, USED_COLUMN], strict=True):
                expected = candidate.kind != END and c3_model.candidate_usage_key(candidate) in taken
                assert bool(flag) == expected, (key, candidate)
                n_used += int(flag)
    assert n_used > 50


def test_decode_slots_gives_each_slot_what_decode_gives_it_alone(sets, problems, trained, config, vocab, beam_width):
    result, _, _ = trained
    validation = sets["c3_slots"].filter(pl.col("split") == VALIDATION)
    other = ("MUL", "{0}*{1}", 2)
    n_checked = 0
    for problem_id, position, slot, step_indices in slots_in_order(validation):
        problem = problems[problem_id]
        candidates, text, numeric = c3_model.candidate_table(problem, slot["step_index"], step_indices[:position], slot["prior_values"],
                                                             config.c4.domain_constants, vocab)
        batched = c3_model.decode_slots(result.model, problem, candidates, text, numeric, [(slot["label"], slot["skeleton"], slot["n_operands"]), other],
                                        position, position, vocab, beam_width)
        alone = [decode(result.model, inference_examples(problem, slot, position, step_indices, config, vocab), beam_width),
                 decode(result.model, slot_examples(problem, other[0], other[1], slot["step_index"], position, step_indices[:position],
                                                    slot["prior_values"], None, 2, config.c4.domain_constants, vocab), beam_width)]
        for got, want in zip(batched, alone, strict=True):
            assert [chosen for chosen, _ in got] == [chosen for chosen, _ in want]
            assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-4)
        n_checked += 1
    assert n_checked > 20


def test_unused_mentions_prior_is_a_distribution_shaped_like_its_data():
    counts = [0] * 60 + [1] * 25 + [2] * 10 + [4] * 5
    log_prior = c3_model.unused_mentions_log_prior(counts)
    assert len(log_prior) == 6  # k = 0..4, and one entry for anything beyond 4
    assert sum(math.exp(v) for v in log_prior) == pytest.approx(1.0)
    assert log_prior[0] > log_prior[1] > log_prior[2] > log_prior[3] and log_prior[3] == log_prior[5]  # unseen 3 and >4 share the floor
    assert c3_model.unused_mentions_log_prior([]) == pytest.approx([math.log(0.5), math.log(0.5)])


def test_candidate_tables_of_a_search_depth_equal_building_each_chain_alone(sets, problems, config, vocab):
    """The search builds one table per chain per depth through `candidate_tables`; chains differ
    in their earlier results and in what they already used, and each table must be exactly the
    one `candidate_table` builds for that chain alone."""
    rng = np.random.default_rng(0)
    n_checked = 0
    for problem_id, position, slot, _ in slots_in_order(sets["c3_slots"]):
        if position == 0:
            continue
        problem = problems[problem_id]
        chains_values = [list(slot["prior_values"]), [v * 2.5 for v in slot["prior_values"]], [-v for v in slot["prior_values"]]]
        everything = c3_model.slot_candidates(problem, list(range(position)), chains_values[0], config.c4.domain_constants)
        chains_uses = [Counter(), *(Counter(c3_model.candidate_usage_key(everything[i])
                                            for i in rng.integers(0, len(everything) - 1, size=3)) for _ in range(2))]
        together = c3_model.candidate_tables(problem, position, chains_values, config.c4.domain_constants, vocab, chains_uses)
        for values, uses, (candidates, text, numeric) in zip(chains_values, chains_uses, together, strict=True):
            alone = c3_model.candidate_table(problem, position, list(range(position)), values, config.c4.domain_constants, vocab, uses)
            assert candidates == alone[0]
            assert np.array_equal(text, alone[1]) and np.array_equal(numeric, alone[2])
        n_checked += 1
    assert n_checked > 20


def test_score_rows_over_chains_that_differ_equals_scoring_each_row_alone(sets, problems, trained, config, vocab):
    """The search scores every chain of a depth in one `score_rows` call, which scores a query
    against the first chain's candidates once and re-scores only the rows where another chain's
    candidate differs (its earlier results, what it already used): every row must still be what
    `forward` gives that (query, chain) on its own."""
    result, _, _ = trained
    rng = np.random.default_rng(1)
    n_checked = n_rescored = 0
    for problem_id, position, slot, _ in slots_in_order(sets["c3_slots"]):
        if position == 0:
            continue
        problem = problems[problem_id]
        chains_values = [list(slot["prior_values"]), [v * 3.0 for v in slot["prior_values"]], list(slot["prior_values"])]
        everything = c3_model.slot_candidates(problem, list(range(position)), chains_values[0], config.c4.domain_constants)
        chains_uses = [Counter(), Counter(), Counter(c3_model.candidate_usage_key(everything[i]) for i in rng.integers(0, len(everything) - 1, size=2))]
        tables = c3_model.candidate_tables(problem, position, chains_values, config.c4.domain_constants, vocab, chains_uses)
        queries = c3_model.query_matrix(problem, [(slot["label"], slot["skeleton"], 0), ("MUL", "{0}*{1}", 1)], position, position, vocab)
        chain_of_row, query_of_row = [0, 1, 2, 2, 1], [0, 1, 0, 1, 0]
        text = np.zeros((len(tables[0][0]), tables[0][1].shape[1]), np.float32)
        text[: len(tables[0][1])] = tables[0][1]
        numeric = np.stack([t[2] for t in tables])
        with torch.inference_mode():
            together = result.model.score_rows(torch.from_numpy(queries), torch.from_numpy(text), torch.from_numpy(numeric),
                                               torch.tensor(chain_of_row), torch.tensor(query_of_row)).numpy()
            for r, (c, q) in enumerate(zip(chain_of_row, query_of_row, strict=True)):
                alone = result.model(torch.from_numpy(queries[q][None]), torch.from_numpy(text[None]), torch.from_numpy(numeric[c][None]),
                                     torch.ones(1, len(text), dtype=torch.bool)).numpy()[0]
                assert together[r] == pytest.approx(alone, abs=1e-5)
        n_rescored += int((numeric[1:] != numeric[0]).any(-1).sum())
        n_checked += 1
    assert n_checked > 20 and n_rescored > n_checked  # chains 1 and 2 really differed from chain 0
