"""Operand provenance (mycelium.provenance) and the stage 03 training sets (tasks.training_data).

Everything runs on real inputs: GSM8K problems and solutions (the Natalia problem, the first 60
rows of the embedded GSM8K sample), steps from the real splitter, the real bounded expression
parser, the real config. Nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mycelium import provenance as prov
from mycelium.config import load_config
from mycelium.datasets import load_problems
from mycelium.expressions import evaluate_number, parse_expression
from mycelium.provenance import (
    CONSTANT,
    FIRST_OCCURRENCE,
    GOLD_TEXT,
    IAF,
    IMPLICIT,
    PRIOR,
    SINGLE,
    TEXT,
    UNEXPLAINED,
    FocusRows,
    ProvenanceSettings,
    choose_occurrence,
    execute_chain,
    fill_skeleton,
    find_literals,
    find_mentions,
    label_problem,
    skeleton_of,
)
from mycelium.steps import STEP_SCHEMA, StepSettings, split_rows, split_solution
from tasks.training_data import (
    TRAIN,
    VALIDATION,
    answer_value,
    build_sets,
    focus_by_problem,
    split_of,
)

SAMPLE = Path(__file__).resolve().parent.parent / "mycelium" / "data" / "sample" / "gsm8k_sample.jsonl"

NATALIA = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
NATALIA_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def config():
    return load_config(None)


@pytest.fixture(scope="module")
def settings(config) -> ProvenanceSettings:
    return ProvenanceSettings(
        word_to_number=dict(config.c4.word_to_number),
        domain_constants=dict(config.c4.domain_constants),
        rel_tol=1e-6,
        context_words=6,
        timeout_s=2.0,
        max_length=500,
    )


@pytest.fixture(scope="module")
def step_settings(config) -> StepSettings:
    return StepSettings(
        timeout_s=2.0, max_length=500, rel_tol=1e-6, pow_subtypes=list(config.ib.pow_subtypes), labels=list(config.c2.labels)
    )


def step_dicts(solution: str, step_settings: StepSettings) -> list[dict]:
    """A solution's validated steps (real splitter) in stage 02's column names."""
    result = split_solution({"problem_id": "p", "solution": solution}, step_settings)
    return [
        {
            "step_index": s.index,
            "expression": s.expression_text,
            "result": s.result_text,
            "value": s.value,
            "char_start": s.char_start,
            "char_end": s.char_end,
        }
        for s in result.steps
    ]


def label(problem: str, solution: str, settings, step_settings, focus=None):
    steps = step_dicts(solution, step_settings)
    labels = label_problem("p", problem, solution, steps, settings, focus)
    return labels, steps


def operand(labels, step_index: int, operand_index: int) -> prov.Operand:
    return next(o for o in labels.operands if o.step_index == step_index and o.operand_index == operand_index)


def span_text(problem: str, o: prov.Operand) -> str | None:
    return None if o.span_start is None else problem[o.span_start : o.span_end]


def evaluate(text: str) -> float:
    return evaluate_number(parse_expression(text, 2.0, 500), 2.0)


# --- 1. literals and skeletons --------------------------------------------------------------------


def test_literals_and_skeleton_of_a_gsm8k_expression():
    assert [(lit.text, lit.value) for lit in find_literals("48/2+3")] == [("48", 48.0), ("2", 2.0), ("3", 3.0)]
    assert skeleton_of("48/2+3") == "{0}/{1}+{2}"


def test_thousands_separator_is_one_literal():
    assert [lit.value for lit in find_literals("1,250*2")] == [1250.0, 2.0]
    assert skeleton_of("1,250*2") == "{0}*{1}"


def test_decimals_with_and_without_leading_zero():
    assert [lit.value for lit in find_literals(".5*40+0.25")] == [0.5, 40.0, 0.25]
    assert skeleton_of(".5*40+0.25") == "{0}*{1}+{2}"


def test_digits_inside_a_name_are_not_literals():
    assert [lit.value for lit in find_literals("x2*3+y10")] == [3.0]
    assert skeleton_of("x2*3+y10") == "x2*{0}+y10"


@pytest.mark.parametrize("expression", ["48/2+3", "1,250*2", ".5*40+0.25", "(12-4)*3/2", "100*20/100", "2**3-7"])
def test_fill_skeleton_round_trips_through_the_parser(expression):
    values = [lit.value for lit in find_literals(expression)]
    filled = fill_skeleton(skeleton_of(expression), values)
    assert evaluate(filled) == pytest.approx(evaluate(expression))


def test_fill_skeleton_parenthesises_negative_values():
    filled = fill_skeleton("{0}-{1}*{0}", [5, -3])
    assert filled == "5.0-(-3.0)*5.0"
    assert evaluate(filled) == pytest.approx(20.0)  # without the parentheses this would not parse as 5 - (-3)*5


def test_fill_skeleton_writes_large_and_small_values_the_parser_reads():
    filled = fill_skeleton("{0}*{1}", [1e20, 1e-7])
    assert evaluate(filled) == pytest.approx(1e13)


# --- 2. numbers written in a problem ---------------------------------------------------------------


def values_at(mentions, text: str) -> list[tuple[float, ...]]:
    return [m.values for m in mentions if m.text == text]


def test_find_mentions_digits_money_thousands_percent_fraction():
    text = "Tom has 7 cards, $4.50 in cash and 1,250 stamps; 50% of them are old and 3/4 are blue."
    mentions = find_mentions(text)
    assert values_at(mentions, "7") == [(7.0,)]
    assert values_at(mentions, "4.50") == [(4.5,)]
    assert values_at(mentions, "1,250") == [(1250.0,)]
    assert values_at(mentions, "50%") == [(50.0, 0.5)]
    assert values_at(mentions, "3/4") == [(0.75,)]
    # spans are positions in the text; the % sign is not part of the number's span
    for m in mentions:
        assert text[m.start : m.end] == m.text.rstrip("%")
    assert [m.start for m in mentions] == sorted(m.start for m in mentions)  # text order


def test_find_mentions_number_words():
    text = "Twenty-five kids brought three kites and forty balloons."
    found = {m.text: m.values for m in find_mentions(text)}
    assert found == {"Twenty-five": (25.0,), "three": (3.0,), "forty": (40.0,)}
    twenty_five = next(m for m in find_mentions(text) if m.text == "Twenty-five")
    assert (twenty_five.start, twenty_five.end) == (0, len("Twenty-five"))


def test_find_mentions_ignores_digits_inside_words():
    mentions = find_mentions("Room B12 costs 30 dollars")
    assert [m.values for m in mentions] == [(30.0,)]


# --- 3. the Natalia problem ------------------------------------------------------------------------------


def test_natalia_operands_with_hand_built_steps(settings):
    first, second = NATALIA_SOLUTION.index("<<48/2"), NATALIA_SOLUTION.index("<<48+24")
    steps = [
        {"step_index": 0, "expression": "48/2", "result": "24", "value": 24.0,
         "char_start": first, "char_end": NATALIA_SOLUTION.index(">>", first) + 2},
        {"step_index": 1, "expression": "48+24", "result": "72", "value": 72.0,
         "char_start": second, "char_end": NATALIA_SOLUTION.index(">>", second) + 2},
    ]
    labels = label_problem("natalia", NATALIA, NATALIA_SOLUTION, steps, settings)
    assert labels.skeletons == ["{0}/{1}", "{0}+{1}"]
    assert [(o.step_index, o.operand_index, o.provenance) for o in labels.operands] == [
        (0, 0, TEXT), (0, 1, IMPLICIT), (1, 0, TEXT), (1, 1, PRIOR),
    ]
    forty_eight = operand(labels, 0, 0)
    assert (forty_eight.span_start, forty_eight.span_end) == (NATALIA.index("48"), NATALIA.index("48") + 2)
    assert forty_eight.resolution == SINGLE and forty_eight.n_occurrences == 1
    half = operand(labels, 0, 1)
    assert half.word == "half" and half.value == 2.0 and span_text(NATALIA, half) == "half"
    prior = operand(labels, 1, 1)
    assert prior.prior_step == 0 and prior.value == 24.0 and prior.span_start is None
    assert all(o.problem_id == "natalia" for o in labels.operands)
    assert execute_chain(labels, steps, settings) == [24.0, 72.0]


def test_natalia_operands_with_the_real_splitter(settings, step_settings):
    labels, steps = label(NATALIA, NATALIA_SOLUTION, settings, step_settings)
    assert [s["expression"] for s in steps] == ["48/2", "48+24"]
    assert span_text(NATALIA, operand(labels, 0, 0)) == "48"
    assert span_text(NATALIA, operand(labels, 1, 0)) == "48"
    assert operand(labels, 0, 1).provenance == IMPLICIT and operand(labels, 0, 1).word == "half"
    assert operand(labels, 1, 1).provenance == PRIOR and operand(labels, 1, 1).prior_step == 0
    assert execute_chain(labels, steps, settings) == [24.0, 72.0]
    assert prov.provenance_counts(labels.operands) == {TEXT: 2, IMPLICIT: 1, PRIOR: 1}


def test_half_as_a_multiplier_is_the_reciprocal(settings, step_settings):
    solution = "Natalia sold 48*0.5 = <<48*0.5=24>>24 clips in May.\n#### 24"
    labels, steps = label(NATALIA, solution, settings, step_settings)
    half = operand(labels, 0, 1)
    assert (half.provenance, half.word, half.value) == (IMPLICIT, "half", 0.5)
    assert execute_chain(labels, steps, settings) == [24.0]


def test_percent_sign_explains_the_hundred(settings, step_settings):
    problem = "A $50 shirt is 20% off. How much is the discount in dollars?"
    solution = "The discount is 50*20/100 = <<50*20/100=10>>10 dollars.\n#### 10"
    labels, steps = label(problem, solution, settings, step_settings)
    assert [o.provenance for o in labels.operands] == [TEXT, TEXT, IMPLICIT]
    hundred = operand(labels, 0, 2)
    assert hundred.word == "percent" and span_text(problem, hundred) == "%"
    twenty = operand(labels, 0, 1)
    assert twenty.value == 20.0 and span_text(problem, twenty) == "20"
    assert execute_chain(labels, steps, settings) == [10.0]


def test_percent_written_as_a_decimal_points_at_the_percentage(settings, step_settings):
    problem = "A $50 shirt is 20% off. How much is the discount in dollars?"
    solution = "The discount is 50*0.2 = <<50*0.2=10>>10 dollars.\n#### 10"
    labels, steps = label(problem, solution, settings, step_settings)
    point_two = operand(labels, 0, 1)
    assert (point_two.provenance, point_two.value, span_text(problem, point_two)) == (TEXT, 0.2, "20")
    assert execute_chain(labels, steps, settings) == [10.0]


def test_number_word_in_the_problem_is_text(settings, step_settings):
    problem = "Sam has twenty-five marbles and buys three more bags of 4 marbles. How many marbles does he have?"
    solution = "He buys 3*4 = <<3*4=12>>12 marbles.\nHe has 25+12 = <<25+12=37>>37 marbles.\n#### 37"
    labels, steps = label(problem, solution, settings, step_settings)
    assert span_text(problem, operand(labels, 0, 0)) == "three"
    assert span_text(problem, operand(labels, 1, 0)) == "twenty-five"
    assert operand(labels, 1, 1).provenance == PRIOR
    assert execute_chain(labels, steps, settings) == [12.0, 37.0]


# --- PRIOR rules ---------------------------------------------------------------------------------------------


def test_prior_wins_over_an_equal_number_in_the_text(settings, step_settings):
    problem = "A box has 3 rows of 4 cans. Ann buys 2 boxes and a bag of 12 cans. How many cans does she buy?"
    solution = (
        "A box has 3*4 = <<3*4=12>>12 cans.\n"
        "Two boxes have 12*2 = <<12*2=24>>24 cans.\n"
        "She buys 24+12 = <<24+12=36>>36 cans.\n#### 36"
    )
    labels, steps = label(problem, solution, settings, step_settings)
    twelve = operand(labels, 1, 0)
    assert (twelve.provenance, twelve.prior_step, twelve.prior_also_in_text) == (PRIOR, 0, True)
    assert operand(labels, 2, 0).prior_step == 1
    assert execute_chain(labels, steps, settings) == [12.0, 24.0, 36.0]


def test_prior_takes_the_latest_earlier_step_with_that_value(settings, step_settings):
    problem = "Ann has 6 red and 6 blue beads. Bob has 3 bags of 4 beads and finds 1 more bead. How many beads does Bob have?"
    solution = "Ann has 6+6 = <<6+6=12>>12 beads.\nBob has 3*4 = <<3*4=12>>12 beads.\nBob has 12+1 = <<12+1=13>>13 beads.\n#### 13"
    labels, _ = label(problem, solution, settings, step_settings)
    assert operand(labels, 2, 0).provenance == PRIOR and operand(labels, 2, 0).prior_step == 1


def test_prior_matches_a_rounded_written_result_and_reexecutes_exactly(settings, step_settings):
    problem = "Three friends share 10 pies equally. Each friend eats 3 slices of each share. How much pie is that?"
    solution = "Each gets 10/3 = <<10/3=3.33>>3.33 pies.\nAll three get 3.33*3 = <<3.33*3=9.99>>9.99 pies.\n#### 9.99"
    labels, steps = label(problem, solution, settings, step_settings)
    rounded = operand(labels, 1, 0)
    assert (rounded.provenance, rounded.prior_step) == (PRIOR, 0)
    values = execute_chain(labels, steps, settings)
    # PRIOR takes the recomputed 10/3, not the written 3.33
    assert values[0] == pytest.approx(10 / 3) and values[1] == pytest.approx(10.0)


# --- 4. CONSTANT and UNEXPLAINED --------------------------------------------------------------------------


def test_minutes_per_hour_is_a_constant(settings, step_settings):
    problem = "John runs for 3 hours every morning. How many minutes does he run each morning?"
    solution = "He runs 3*60 = <<3*60=180>>180 minutes.\n#### 180"
    labels, steps = label(problem, solution, settings, step_settings)
    sixty = operand(labels, 0, 1)
    assert (sixty.provenance, sixty.constant, sixty.value) == (CONSTANT, "minutes_per_hour", 60.0)
    assert sixty.span_start is None
    assert execute_chain(labels, steps, settings) == [180.0]


def test_constant_shared_by_several_names_prefers_the_units_in_the_problem(settings, step_settings):
    shared = dataclasses.replace(settings, domain_constants={"hours_per_day": 24.0, "cans_per_case": 24.0})
    solution = "That is 2*24 = <<2*24=48>>48.\n#### 48"
    with_units = "A store sells 2 cases of soda. How many cans is that?"
    without_units = "Ann buys 2 packs. How many is that?"
    assert operand(label(with_units, solution, shared, step_settings)[0], 0, 1).constant == "cans_per_case"
    assert operand(label(without_units, solution, shared, step_settings)[0], 0, 1).constant == "hours_per_day"


def test_operand_found_nowhere_is_unexplained(settings, step_settings):
    problem = "A $50 shirt is on sale for 20% off. What fraction of the price does Mia pay?"
    solution = "She pays 1-0.2 = <<1-0.2=0.8>>0.8 of the price.\n#### 0.8"
    labels, steps = label(problem, solution, settings, step_settings)
    one, point_two = operand(labels, 0, 0), operand(labels, 0, 1)
    assert one.provenance == UNEXPLAINED and one.span_start is None and one.value == 1.0
    assert point_two.provenance == TEXT and span_text(problem, point_two) == "20"
    # an unexplained operand still re-executes with its literal value
    assert execute_chain(labels, steps, settings) == [pytest.approx(0.8)]


# --- 5. repeated numbers: gold text, IAF, first occurrence -------------------------------------------------

TWO_FIVES = "Tom has 5 red balls. Ann has 5 blue balls. Ann gives away 2 balls. How many are left?"
TWO_FIVES_SOLUTION = "Left: 5-2 = <<5-2=3>>3\n#### 3"
FIRST_FIVE, SECOND_FIVE = TWO_FIVES.index("5"), TWO_FIVES.index("5", TWO_FIVES.index("5") + 1)


def test_gold_text_picks_the_occurrence_whose_words_match_the_line(settings, step_settings):
    problem = "Tom has 5 apples in his basket. Mary has 5 oranges in her bag. How many oranges and pears does Mary have if she has 3 pears?"
    solution = "Mary has 5+3 = <<5+3=8>>8 oranges and pears.\n#### 8"
    labels, steps = label(problem, solution, settings, step_settings)
    five = operand(labels, 0, 0)
    assert (five.resolution, five.n_occurrences) == (GOLD_TEXT, 2)
    assert five.span_start == problem.index("5 oranges")
    assert execute_chain(labels, steps, settings) == [8.0]


def test_choose_occurrence_gold_text_directly():
    problem = "Tom has 5 apples. Mary has 5 oranges."
    candidates = [m for m in find_mentions(problem) if m.values == (5.0,)]
    # one context word either side: "apples" for the first 5, "mary"/"oranges" for the second
    chosen, rule = choose_occurrence(candidates, problem, "Mary gives away 5 oranges", None, None, set(), 1)
    assert rule == GOLD_TEXT and chosen.start == problem.index("5 oranges")
    chosen, rule = choose_occurrence(candidates, problem, "Tom eats 5 apples", None, None, set(), 1)
    assert rule == GOLD_TEXT and chosen.start == problem.index("5 apples")
    # with six words either side both occurrences see "mary" and "oranges": a tie, no gold-text decision
    chosen, rule = choose_occurrence(candidates, problem, "Mary gives away 5 oranges", None, None, set(), 6)
    assert rule == FIRST_OCCURRENCE and chosen.start == problem.index("5 apples")


def literal_span(solution: str, note_start_text: str) -> tuple[int, int]:
    """The first literal of the note: `<<5-2=...` → the `5` inside the note."""
    start = solution.index(note_start_text) + 2
    return start, start + 1


def test_iaf_decides_when_the_words_tie(settings, step_settings):
    lit_start, lit_end = literal_span(TWO_FIVES_SOLUTION, "<<5-2")
    focus = FocusRows(
        # rows whose token ends inside the literal predict it; the others must not count
        char_end=np.array([3, lit_start, lit_start, lit_end + 1]),
        focus_start=np.array([FIRST_FIVE, SECOND_FIVE, FIRST_FIVE, FIRST_FIVE]),
        focus_end=np.array([FIRST_FIVE + 1, SECOND_FIVE + 1, FIRST_FIVE + 1, FIRST_FIVE + 1]),
        focus_attn=np.array([0.99, 0.7, 0.2, 0.99]),
    )
    assert prov.focus_scores(focus, lit_start, lit_end, [m for m in find_mentions(TWO_FIVES) if m.text == "5"]) == [
        pytest.approx(0.2), pytest.approx(0.7),
    ]
    labels, steps = label(TWO_FIVES, TWO_FIVES_SOLUTION, settings, step_settings, focus)
    five = operand(labels, 0, 0)
    assert five.resolution == IAF
    assert (five.span_start, five.span_end) == (SECOND_FIVE, SECOND_FIVE + 1)
    assert execute_chain(labels, steps, settings) == [3.0]


def test_without_focus_the_first_occurrence_is_taken(settings, step_settings):
    labels, _ = label(TWO_FIVES, TWO_FIVES_SOLUTION, settings, step_settings, None)
    five = operand(labels, 0, 0)
    assert five.resolution == FIRST_OCCURRENCE and five.span_start == FIRST_FIVE


def test_focus_on_no_occurrence_falls_back_to_the_first(settings, step_settings):
    lit_start, _ = literal_span(TWO_FIVES_SOLUTION, "<<5-2")
    two = TWO_FIVES.index("2")
    focus = FocusRows(np.array([lit_start]), np.array([two]), np.array([two + 1]), np.array([0.9]))
    labels, _ = label(TWO_FIVES, TWO_FIVES_SOLUTION, settings, step_settings, focus)
    assert operand(labels, 0, 0).resolution == FIRST_OCCURRENCE and operand(labels, 0, 0).span_start == FIRST_FIVE


def test_a_number_used_twice_in_one_step_takes_both_occurrences(settings, step_settings):
    problem = "Tom has 5 red balls. Ann has 5 blue balls. How many in all?"
    solution = "In all 5+5 = <<5+5=10>>10\n#### 10"
    labels, _ = label(problem, solution, settings, step_settings)
    assert [(o.resolution, o.span_start) for o in labels.operands] == [
        (FIRST_OCCURRENCE, problem.index("5")), (FIRST_OCCURRENCE, problem.index("5", problem.index("5") + 1)),
    ]


def test_focus_by_problem_groups_token_rows_and_feeds_iaf(settings, step_settings):
    lit_start, _ = literal_span(TWO_FIVES_SOLUTION, "<<5-2")
    tokens = pl.DataFrame({
        "problem_id": ["p", "p", "p", "other"],
        "char_end": [lit_start, lit_start, 4, 1],
        "focus_start": [SECOND_FIVE, None, FIRST_FIVE, 0],  # a row without focus is ignored
        "focus_end": [SECOND_FIVE + 1, None, FIRST_FIVE + 1, 1],
        "focus_attn": [0.5, 0.9, 0.9, 0.1],
        "head": [0, 1, 1, 0],
    })
    focus = focus_by_problem(tokens)
    assert set(focus) == {"p", "other"}
    assert sorted(focus["p"].char_end.tolist()) == [4, lit_start]
    labels, _ = label(TWO_FIVES, TWO_FIVES_SOLUTION, settings, step_settings, focus["p"])
    assert operand(labels, 0, 0).resolution == IAF and operand(labels, 0, 0).span_start == SECOND_FIVE


# --- 6. splits ------------------------------------------------------------------------------------------------


def test_split_of_is_deterministic_and_seeded():
    ids = [f"problem-{i}" for i in range(1000)]
    first = [split_of(i, 0, 0.3) for i in ids]
    assert first == [split_of(i, 0, 0.3) for i in ids]
    assert set(first) == {TRAIN, VALIDATION}
    other_seed = [split_of(i, 1, 0.3) for i in ids]
    assert sum(a != b for a, b in zip(first, other_seed, strict=True)) > 100
    assert {split_of(i, 0, 0.0) for i in ids} == {TRAIN}
    assert {split_of(i, 0, 1.0) for i in ids} == {VALIDATION}


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_validation_share_matches_the_fraction(fraction):
    ids = [f"{i:016x}" for i in range(5000)]
    share = sum(split_of(i, 7, fraction) == VALIDATION for i in ids) / len(ids)
    assert abs(share - fraction) < 0.03


def test_a_larger_fraction_only_moves_problems_into_validation():
    ids = [f"id{i}" for i in range(2000)]
    small = {i for i in ids if split_of(i, 0, 0.1) == VALIDATION}
    large = {i for i in ids if split_of(i, 0, 0.2) == VALIDATION}
    assert small < large


@pytest.fixture(scope="module")
def sample_sets(config, settings, step_settings):
    problems = load_problems(config.dataset.model_copy(update={"source": str(SAMPLE)}), limit=60).frame
    step_rows = split_rows(problems.to_dicts(), step_settings).steps
    assignments = step_rows.select("problem_id", "step_index").with_columns(
        template_id=(pl.col("step_index") % 3).cast(pl.Int32)
    )
    natalia_id = problems.filter(pl.col("problem") == NATALIA)["problem_id"][0]
    cfg = config.training_data.model_copy(update={"validation_fraction": 0.5})
    tables, summary = build_sets(
        problems, step_rows, assignments, {natalia_id: 3}, {}, cfg, list(config.c2.labels), settings, progress=False
    )
    return problems, tables, summary, cfg, natalia_id


def test_train_and_validation_are_disjoint_and_agree_across_sets(sample_sets):
    _, tables, summary, cfg, _ = sample_sets
    c2, slots, operands = tables["c2"], tables["c3_slots"], tables["c3_operands"]
    assert c2.height > 20 and slots["problem_id"].n_unique() > 10
    for table in (c2, slots, operands):
        per_problem = table.group_by("problem_id").agg(pl.col("split").n_unique().alias("n"))
        assert per_problem["n"].max() == 1  # one split per problem within a table
    train = set(c2.filter(pl.col("split") == TRAIN)["problem_id"])
    validation = set(c2.filter(pl.col("split") == VALIDATION)["problem_id"])
    assert train and validation and not train & validation
    c2_split = dict(c2.select("problem_id", "split").iter_rows())
    for problem_id, split in slots.select("problem_id", "split").unique().iter_rows():
        assert c2_split[problem_id] == split  # a C3 problem is a C2 problem, in the same split
        assert split == split_of(problem_id, cfg.split_seed, cfg.validation_fraction)
    assert set(operands["problem_id"]) == set(slots["problem_id"])
    assert summary["c2_split"] == {TRAIN: len(train), VALIDATION: len(validation)}


def test_sample_tables_account_for_every_problem(sample_sets):
    problems, tables, summary, _, _ = sample_sets
    c2, drops = tables["c2"], tables["drops"]
    c2_drops = set(drops.filter(pl.col("set") == "c2")["problem_id"])
    c3_drops = set(drops.filter(pl.col("set") == "c3")["problem_id"])
    assert set(c2["problem_id"]) | c2_drops == set(problems["problem_id"])
    assert not set(c2["problem_id"]) & c2_drops
    assert set(tables["c3_slots"]["problem_id"]) == set(c2["problem_id"]) - c3_drops
    assert summary["n_problems"] == problems.height == 60
    funnel = {f["filter"]: f for f in summary["funnel"]}
    assert funnel["no_steps"]["in"] == 60
    assert funnel["operand_unexplained"]["kept"] == summary["c3_problems"]
    assert funnel["chain_answer_mismatch"]["kept"] == summary["c2_problems"] == c2.height
    for stage, following in zip(summary["funnel"], summary["funnel"][1:]):
        assert stage["kept"] == following["in"]
    # every C3 operand is explained; every slot closes with an END row
    provenances = set(tables["c3_operands"]["provenance"])
    assert UNEXPLAINED not in provenances and prov.END in provenances
    assert summary["c3_provenance"][prov.END] == summary["c3_slots"]


def test_natalia_rows_in_the_sample_tables(sample_sets, config):
    _, tables, _, _, natalia_id = sample_sets
    c2 = tables["c2"].filter(pl.col("problem_id") == natalia_id).to_dicts()
    assert len(c2) == 1
    assert c2[0]["labels"] == [label for label in config.c2.labels if label in {"ADD", "DIV"}]
    assert (c2[0]["n_steps"], c2[0]["n_heartbeats"]) == (2, 3)
    assert tables["c2"].filter(pl.col("problem_id") != natalia_id)["n_heartbeats"].null_count() == tables["c2"].height - 1
    slots = tables["c3_slots"].filter(pl.col("problem_id") == natalia_id).sort("step_index")
    assert slots["skeleton"].to_list() == ["{0}/{1}", "{0}+{1}"]
    assert slots["prior_values"].to_list() == [[], [24.0]]
    assert slots["n_operands"].to_list() == [2, 2]
    assert slots["template_id"].to_list() == [0, 1]
    ops = tables["c3_operands"].filter(pl.col("problem_id") == natalia_id).sort("step_index", "operand_index")
    assert ops.select("provenance", "span_text").rows() == [
        (TEXT, "48"), (IMPLICIT, "half"), (prov.END, None), (TEXT, "48"), (PRIOR, None), (prov.END, None),
    ]


# --- 7. gold answers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("72", 72.0), ("1,250", 1250.0), ("$1,250.50", 1250.5), ("-3", -3.0), ("0.75", 0.75), ("\\frac{3}{4}", 0.75)],
)
def test_answer_value_numbers(answer, expected, settings):
    assert answer_value(answer, settings) == pytest.approx(expected)


@pytest.mark.parametrize("answer", ["(1, 2)", "x+1", None, "[2, 5)"])
def test_answer_value_not_a_single_number(answer, settings):
    assert answer_value(answer, settings) is None


# --- 8. the filter funnel -------------------------------------------------------------------------------------


def natalia_step_rows(problem_id: str, step_settings) -> list[dict]:
    frame = split_rows([{"problem_id": problem_id, "problem": NATALIA, "solution": NATALIA_SOLUTION}], step_settings).steps
    return frame.to_dicts()


def test_funnel_drops_each_failing_problem_with_its_reason(config, settings, step_settings):
    broken_steps = [
        {"problem_id": "not_executable", "step_index": 0, "route": "gsm8k_annotation", "expression": "2-2", "result": "0",
         "char_start": 7, "char_end": 16, "line_index": 0, "operator": "sub", "label": "SUB", "value": 0.0},
        {"problem_id": "not_executable", "step_index": 1, "route": "gsm8k_annotation", "expression": "5/0", "result": "0",
         "char_start": 20, "char_end": 29, "line_index": 1, "operator": "div", "label": "DIV", "value": 0.0},
    ]
    rows = [
        *natalia_step_rows("good", step_settings),
        *natalia_step_rows("wrong_answer", step_settings),
        *natalia_step_rows("interval_answer", step_settings),
        *broken_steps,
    ]
    problems = pl.DataFrame([
        {"problem_id": "good", "problem": NATALIA, "solution": NATALIA_SOLUTION, "answer": "72"},
        {"problem_id": "wrong_answer", "problem": NATALIA, "solution": NATALIA_SOLUTION, "answer": "73"},
        {"problem_id": "interval_answer", "problem": NATALIA, "solution": NATALIA_SOLUTION, "answer": "(1, 2)"},
        {"problem_id": "no_notes", "problem": "Ann has 2 cats and 3 dogs. How many pets?", "solution": "She has 5 pets.\n#### 5", "answer": "5"},
        {"problem_id": "not_executable", "problem": "Ann has 2 cats and 5 dogs.", "solution": "x = <<2-2=0>>0\ny = <<5/0=0>>0\n#### 0", "answer": "0"},
    ])
    step_frame = pl.DataFrame(rows, schema=STEP_SCHEMA)
    assert step_frame.filter(pl.col("problem_id") == "no_notes").height == 0
    assignments = step_frame.select("problem_id", "step_index").with_columns(template_id=pl.lit(1, dtype=pl.Int32))
    tables, summary = build_sets(
        problems, step_frame, assignments, {}, {}, config.training_data, list(config.c2.labels), settings, progress=False
    )
    reasons = dict(tables["drops"].filter(pl.col("set") == "c2").select("problem_id", "reason").iter_rows())
    assert reasons == {
        "wrong_answer": "chain_answer_mismatch",
        "interval_answer": "answer_not_numeric",
        "no_notes": "no_steps",
        "not_executable": "chain_not_executable",
    }
    assert tables["c2"]["problem_id"].to_list() == ["good"]
    assert tables["c3_slots"]["problem_id"].unique().to_list() == ["good"]
    funnel = [(f["filter"], f["in"], f["dropped"], f["kept"]) for f in summary["funnel"]]
    assert funnel == [
        ("no_steps", 5, 1, 4),
        ("answer_not_numeric", 4, 1, 3),
        ("chain_not_executable", 3, 1, 2),
        ("chain_answer_mismatch", 2, 1, 1),
        ("operand_unexplained", 1, 0, 1),
    ]
    assert summary["c2_problems"] == summary["c3_problems"] == 1


def test_unexplained_operand_keeps_the_problem_in_c2_only(config, settings, step_settings):
    problem = "A $50 shirt is on sale for 20% off. What fraction of the price does Mia pay?"
    solution = "She pays 1-0.2 = <<1-0.2=0.8>>0.8 of the price.\n#### 0.8"
    problems = pl.DataFrame([{"problem_id": "frac", "problem": problem, "solution": solution, "answer": "0.8"}])
    step_frame = split_rows(problems.to_dicts(), step_settings).steps
    assignments = step_frame.select("problem_id", "step_index").with_columns(template_id=pl.lit(0, dtype=pl.Int32))
    tables, summary = build_sets(
        problems, step_frame, assignments, {}, {}, config.training_data, list(config.c2.labels), settings, progress=False
    )
    assert tables["c2"]["problem_id"].to_list() == ["frac"]
    assert tables["c3_slots"].height == 0 and tables["c3_operands"].height == 0
    assert tables["drops"].rows() == [("frac", "c3", "operand_unexplained")]
    assert summary["top_unexplained"] == [("1", 1)]
    assert summary["operands_all_kept_c2"] == {UNEXPLAINED: 1, TEXT: 1}


# --- regressions: bugs found while writing these tests ------------------------------------------------


def test_a_decimal_operand_points_at_the_equal_number_not_a_neighbouring_one(settings, step_settings):
    problem = "A pencil costs $0.4 and an eraser costs $0.5. How much do 2 erasers cost?"
    solution = "2 erasers cost 2*0.5 = <<2*0.5=1>>1 dollar.\n#### 1"
    labels, steps = label(problem, solution, settings, step_settings)
    half_dollar = operand(labels, 0, 1)
    assert span_text(problem, half_dollar) == "0.5" and half_dollar.value == 0.5
    assert execute_chain(labels, steps, settings) == [1.0]


def test_inflected_implicit_words_count(settings, step_settings):
    problem = "Tom had 7 marbles and then doubled them. How many now?"
    solution = "He has 7*2 = <<7*2=14>>14.\n#### 14"
    labels, _ = label(problem, solution, settings, step_settings)
    two = operand(labels, 0, 1)
    assert two.provenance == IMPLICIT and two.word == "double" and problem[two.span_start : two.span_end] == "doubled"
    # A name that shares a stem is not the word: "Hal" is not "half".
    assert re.search(prov._inflected("half"), "hal and hali") is None


def test_number_word_in_a_hyphenated_compound_is_text(settings, step_settings):
    problem = "She went on a three-day trip and spent $20 each day. How much did she spend?"
    solution = "She spent 3*20 = <<3*20=60>>60 dollars.\n#### 60"
    labels, _ = label(problem, solution, settings, step_settings)
    three = operand(labels, 0, 0)
    assert three.provenance == TEXT and span_text(problem, three) == "three"
    assert math.isclose(three.value, 3.0)
