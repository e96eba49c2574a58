"""C4 assembler: the default skeleton of every C2 label computes what Python computes and maps
back to its label; operands of each provenance resolve against real GSM8K problem texts (and
re-run labelled chains to the gold answer); wrong arity, dangling pointers and unsafe skeletons
are refused; a runaway power is bounded."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mycelium import assembler
from mycelium.assembler import (
    DEFAULT_SKELETONS,
    AssemblerSettings,
    AssemblyError,
    Skeleton,
    assemble,
    constant_operand,
    default_skeletons,
    end_operand,
    execute,
    execute_slot,
    implicit_operand,
    mention_at,
    operand_from_label,
    prior_operand,
    resolve_operand,
    skeleton_arity,
    text_operand,
)
from mycelium.config import load_config
from mycelium.errors import MyceliumError
from mycelium.expressions import ExpressionError, operation_label
from mycelium.provenance import (
    CONSTANT,
    IMPLICIT,
    PRIOR,
    TEXT,
    UNEXPLAINED,
    ProvenanceSettings,
    label_problem,
)
from mycelium.steps import StepSettings, split_solution

CONFIG = load_config()
SETTINGS = AssemblerSettings.from_config(CONFIG)
LABELS = CONFIG.c2.labels
REL_TOL = 1e-9  # sympy evaluates at double precision; this only absorbs last-digit rounding
EXAMPLES = settings(max_examples=25, deadline=None, database=None)

# Rows of the shipped GSM8K sample (mycelium/data/sample/gsm8k_sample.jsonl), verbatim.
NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}
PORCHE = {
    "question": "Porche has 3 hours to get all her homework done. Her math homework takes her 45 minutes. Her English homework takes her 30 minutes. Her science homework takes her 50 minutes. Her history homework takes her 25 minutes. She also has a special project due the next day. How much time does she have left to get that project done?",
    "answer": "She has 180 minutes to do work because 3 times 60 equals <<3*60=180>>180\nShe has already spent 150 minutes on homework because 45 plus 30 plus 50 plus 25 equals <<45+30+50+25=150>>150\nShe has 30 minutes to finish her project because 180 minus 150 equals <<180-150=30>>30.\n#### 30",
}
ALICE = {
    "question": "Alice had 10 dozens of watermelons. She sold 40% of it yesterday and 1/4 of the remaining today, How many watermelons are left to be sold tomorrow?",
    "answer": "Ten dozens of watermelons are equal to 10 x 12 = <<10*12=120>>120 watermelons.\nYesterday, Alice sold 120 x 40/100 = <<120*40/100=48>>48 watermelons.\nSo, there are only 120 - 48 = <<120-48=72>>72 watermelons left for today.\nToday, Alice sold 72 x 1/4 = <<72*1/4=18>>18 watermelons.\nHence, 72 - 18 = <<72-18=54>>54 watermelons are left to be sold tomorrow.\n#### 54",
}
JANET = {
    "question": "Janet wanted to move out of her parents' house and rent her own apartment.  She had $2,225 saved.  She found an apartment that cost $1,250 per month that was perfect for her.  The landlord said that she needed to be able to pay 2 months' rent in advance to rent the place and she would also need to put down a deposit of $500.  How much more money did Janet need in order to rent the apartment?",
    "answer": "To move in, Janet had to pay 2 months worth of rent so that would cost 2*1250 = $<<2*1250=2500>>2,500\nOn top of the rent she needed to pay a deposit of $500 so 2500+500 = $<<2500+500=3000>>3,000 total to rent the apartment\nIf it cost $3000 to move in and she had $2225 then she need 3000-2225 = $<<3000-2225=775>>775 more\n#### 775",
}
BRIAN = {
    "question": "Brian can only hold his breath underwater for 10 seconds.  He wants to get better, so he starts practicing.  After a week, he's doubled the amount of time he can do it.  After another week, he's doubled it again from the previous week.  The final week, he's increased it by 50% from the previous week.  How long can Brian hold his breath for now?",
}


def span_of(text: str, written: str, occurrence: int = 0) -> tuple[int, int]:
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(written, start + 1)
    return start, start + len(written)


# --- the table of default skeletons ------------------------------------------------------------

EXPECTED_ARITY = {
    "ADD": 2, "SUB": 2, "MUL": 2, "DIV": 2, "SQRT": 1, "SQUARE": 1, "CUBE": 1, "HIGH_POW": 2,
    "SIN": 1, "COS": 1, "TAN": 1, "LOG": 1, "FACTORIAL": 1, "MOD": 2,
}
positive = st.one_of(st.integers(1, 1000).map(float), st.floats(min_value=0.01, max_value=1000.0))
angle = st.floats(min_value=0.0, max_value=100.0)
# Each label's operands drawn from its operation's domain, and the same arithmetic in Python.
# HIGH_POW's exponent is an integer >= 4 (2 would be SQUARE): that is what the label means.
CASES = {
    "ADD": (st.tuples(positive, positive), lambda a, b: a + b),
    "SUB": (st.tuples(positive, positive), lambda a, b: a - b),
    "MUL": (st.tuples(positive, positive), lambda a, b: a * b),
    "DIV": (st.tuples(positive, positive), lambda a, b: a / b),
    "SQRT": (st.tuples(positive), math.sqrt),
    "SQUARE": (st.tuples(positive), lambda a: a**2),
    "CUBE": (st.tuples(positive), lambda a: a**3),
    "HIGH_POW": (st.tuples(st.floats(min_value=0.1, max_value=50.0), st.integers(4, 12).map(float)), lambda a, b: a**b),
    "SIN": (st.tuples(angle), math.sin),
    "COS": (st.tuples(angle), math.cos),
    "TAN": (st.tuples(angle), math.tan),
    "LOG": (st.tuples(positive), math.log),
    "FACTORIAL": (st.tuples(st.integers(0, 20).map(float)), lambda a: float(math.factorial(int(a)))),
    # Integers only: with binary fractions Python's % and sympy's decimal Mod disagree at the
    # seam (1.0 % 0.01 is 0.00999... in Python, 0 in sympy: 0.01 is not exact in binary).
    "MOD": (st.tuples(st.integers(0, 1000).map(float), st.integers(1, 1000).map(float)), lambda a, b: a % b),
}


def test_every_c2_label_has_an_entry_and_the_expected_arity():
    assert set(DEFAULT_SKELETONS) == set(LABELS)
    assert default_skeletons("OTHER") == ()
    for label, arity in EXPECTED_ARITY.items():
        skeletons = default_skeletons(label)
        assert skeletons and all(s.arity == arity == skeleton_arity(s.text) for s in skeletons)
    assert default_skeletons("DIV") == (Skeleton("{0}/{1}", 2),)
    with pytest.raises(AssemblyError, match="no default skeletons"):
        default_skeletons("DIVIDE")


@pytest.mark.parametrize("label", sorted(CASES))
def test_default_skeleton_computes_what_python_computes_and_keeps_its_label(label):
    strategy, python_arithmetic = CASES[label]

    @EXAMPLES
    @given(values=strategy)
    def check(values):
        for skeleton in default_skeletons(label):
            expression = assemble(skeleton.text, values, SETTINGS)
            assert operation_label(expression, LABELS) == label, (skeleton.text, values, expression)
            result = execute(skeleton.text, values, SETTINGS)
            assert result is not None
            assert math.isclose(result, python_arithmetic(*values), rel_tol=REL_TOL, abs_tol=REL_TOL)

    check()


def test_a_learned_skeleton_is_accepted_with_its_own_arity():
    assert skeleton_arity("{0}*{1}/{2}") == 3
    assert skeleton_arity("({0}+{1})/{0}") == 2  # a slot used twice counts once
    assert skeleton_arity("2**10") == 0
    assert execute("{0}*{1}/{2}", [6, 4, 3], SETTINGS) == 8.0
    assert execute("({0}+{1})/{0}", [2, 6], SETTINGS) == 4.0
    assert execute("{0}-{1}", [2, -3], SETTINGS) == 5.0  # negative operands are parenthesised
    assert execute("Mod({0},{1})", [7.5, 2], SETTINGS) == 1.5


@pytest.mark.parametrize("skeleton", ["{0}+{2}", "{1}*{2}", "{0}+{0.5}", "{0}+{x}", "{0}+{", "}{0}"])
def test_slots_must_be_zero_to_n_minus_one_and_every_brace_a_slot(skeleton):
    with pytest.raises(AssemblyError) as caught:
        skeleton_arity(skeleton)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("values", [[], [1.0], [1.0, 2.0, 3.0, 4.0]])
def test_wrong_arity_is_refused_before_anything_is_parsed(values, monkeypatch):
    def no_parsing(*args, **kwargs):
        raise AssertionError("parse_expression was called")

    monkeypatch.setattr(assembler, "parse_expression", no_parsing)
    with pytest.raises(AssemblyError, match="takes 3 operand"):
        execute("{0}*{1}/{2}", values, SETTINGS)


@pytest.mark.parametrize("bad_value", [math.inf, -math.inf, math.nan, "2", "1); x", True, None])
def test_only_finite_numbers_fill_a_slot(bad_value, monkeypatch):
    monkeypatch.setattr(assembler, "parse_expression", lambda *a, **k: pytest.fail("parsed"))
    with pytest.raises(AssemblyError, match="not a finite number"):
        assemble("{0}+{1}", [1.0, bad_value], SETTINGS)


@pytest.mark.parametrize(
    ("skeleton", "values"),
    [("{0}/{1}", [1, 0]), ("sqrt({0})", [-4]), ("log({0})", [0]), ("Mod({0},{1})", [7, 0]), ("factorial({0})", [-1]), ("{0}*{1}", [1e300, 1e300])],
)
def test_a_result_that_is_not_a_finite_real_number_is_none(skeleton, values):
    assert execute(skeleton, values, SETTINGS) is None


# --- unsafe and runaway skeletons -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "values"),
    [
        ("__import__('os').system('touch {marker}')", []),
        ("{{0}}.__class__", [1.0]),
        ("{{0}}.real", [1.0]),
        ("(lambda: __import__('os').system('touch {marker}'))()", []),
        ("open('{marker}', 'w')", []),
        ("{{0}}+exec('import os')", [1.0]),
        ("{{0}}; import os", [1.0]),
        ("{{0.__class__}}", [1.0]),
    ],
)
def test_a_malicious_skeleton_is_refused_and_nothing_runs(template, values, tmp_path: Path):
    marker = tmp_path / "pwned"
    skeleton = template.format(marker=marker)
    with pytest.raises((ExpressionError, AssemblyError)) as caught:
        execute(skeleton, values, SETTINGS)
    assert isinstance(caught.value, MyceliumError) and "\n" not in str(caught.value)
    assert not marker.exists()


def test_a_huge_power_is_bounded():
    # Slots are filled with floats, so 9**9**9 overflows to None at once instead of building a
    # 370-million-digit integer; a time-out is also acceptable.
    started = time.monotonic()
    try:
        assert execute("{0}**{1}**{2}", [9, 9, 9], SETTINGS) is None
    except ExpressionError as error:
        assert error.reason == "timeout"
    assert time.monotonic() - started < 3 * SETTINGS.timeout_s


def test_an_integer_power_in_the_skeleton_itself_times_out():
    quick = AssemblerSettings(1.0, SETTINGS.max_length, SETTINGS.word_to_number, SETTINGS.domain_constants)
    started = time.monotonic()
    with pytest.raises(ExpressionError) as caught:
        execute("{0}+9**9**9", [1], quick)
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 3 * quick.timeout_s + 1.0  # the limit, plus killing the helper
    assert execute("{0}+{1}", [1, 2], quick) == 3.0  # a fresh helper serves the next call


# --- operands of each provenance -----------------------------------------------------------------


def test_text_operands_read_the_number_at_their_span():
    text = JANET["question"]
    resolve = lambda operand: resolve_operand(operand, text, {}, SETTINGS)
    assert resolve(text_operand(*span_of(text, "2,225"))) == 2225.0  # thousands separator
    assert resolve(text_operand(*span_of(text, "$1,250"))) == 1250.0  # a wider span: the currency sign
    assert resolve(text_operand(*span_of(text, "$500."))) == 500.0
    start, _ = span_of(text, "1,250")
    assert resolve(text_operand(start, start + 3)) == 1250.0  # a token of the number points at all of it
    assert resolve(text_operand(*span_of(text, "2 months"))) == 2.0
    alice = ALICE["question"]
    assert resolve_operand(text_operand(*span_of(alice, "1/4")), alice, {}, SETTINGS) == 0.25  # the fraction, not its 1 or 4
    assert resolve_operand(text_operand(*span_of(alice, "1", 1)), alice, {}, SETTINGS) == 1.0  # its 1, pointed at exactly
    porche = PORCHE["question"]
    assert mention_at(porche, *span_of(porche, "45")).values == (45.0,)


def test_a_percentage_is_read_as_written_or_as_a_fraction_as_asked():
    text = BRIAN["question"]
    span = span_of(text, "50%")
    assert resolve_operand(text_operand(*span), text, {}, SETTINGS) == 50.0
    assert resolve_operand(text_operand(*span, percent_as_fraction=True), text, {}, SETTINGS) == 0.5
    with pytest.raises(AssemblyError, match="not a percentage"):
        resolve_operand(text_operand(*span_of(text, "10"), percent_as_fraction=True), text, {}, SETTINGS)


@pytest.mark.parametrize(
    ("written", "message"),
    [("Janet wanted", "holds no number"), ("$2,225 saved.  She found an apartment that cost $1,250", "several numbers")],
)
def test_a_span_over_no_number_or_several_is_refused(written, message):
    text = JANET["question"]
    with pytest.raises(AssemblyError, match=message) as caught:
        resolve_operand(text_operand(*span_of(text, written)), text, {}, SETTINGS)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("start", "end"), [(5, 5), (9, 3), (-1, 4), (0, 10_000), (None, 4)])
def test_a_span_outside_the_text_is_refused(start, end):
    with pytest.raises(AssemblyError, match="span"):
        resolve_operand(text_operand(start, end), JANET["question"], {}, SETTINGS)


def test_prior_operands_take_the_computed_value_of_an_earlier_step():
    assert resolve_operand(prior_operand(0), "", [24.0], SETTINGS) == 24.0
    assert resolve_operand(prior_operand(3), "", {1: 5.0, 3: 7.5}, SETTINGS) == 7.5
    for missing, computed in [(1, [24.0]), (2, {0: 1.0, 2: None}), (0, {0: math.nan}), (-1, [24.0])]:
        with pytest.raises(AssemblyError, match="PRIOR step"):
            resolve_operand(prior_operand(missing), "", computed, SETTINGS)


def test_implicit_operands_take_a_word_value_or_its_reciprocal():
    text = NATALIA["question"]
    assert resolve_operand(implicit_operand("half"), text, {}, SETTINGS) == 2.0
    assert resolve_operand(implicit_operand("half", reciprocal=True), text, {}, SETTINGS) == 0.5
    assert resolve_operand(implicit_operand("percent", reciprocal=True), text, {}, SETTINGS) == 0.01
    assert resolve_operand(implicit_operand("Dozen"), text, {}, SETTINGS) == 12.0
    with pytest.raises(AssemblyError, match="not in c4.word_to_number"):
        resolve_operand(implicit_operand("umpteen"), text, {}, SETTINGS)


def test_constant_operands_take_a_domain_constant():
    assert resolve_operand(constant_operand("minutes_per_hour"), PORCHE["question"], {}, SETTINGS) == 60.0
    with pytest.raises(AssemblyError, match="not in c4.domain_constants"):
        resolve_operand(constant_operand("seconds_per_fortnight"), PORCHE["question"], {}, SETTINGS)


def test_end_and_unknown_provenances_have_no_value():
    with pytest.raises(AssemblyError, match="END"):
        resolve_operand(end_operand(), "", {}, SETTINGS)
    with pytest.raises(AssemblyError, match="unknown provenance"):
        resolve_operand(assembler.Operand("GUESS"), "", {}, SETTINGS)


def test_execute_slot_resolves_then_computes():
    text = NATALIA["question"]
    forty_eight = text_operand(*span_of(text, "48"))
    assert execute_slot("{0}/{1}", [forty_eight, implicit_operand("half")], text, [], SETTINGS) == 24.0
    assert execute_slot("{0}*{1}", [forty_eight, implicit_operand("half", reciprocal=True)], text, [], SETTINGS) == 24.0
    assert execute_slot("{0}+{1}", [forty_eight, prior_operand(0)], text, [24.0], SETTINGS) == 72.0
    with pytest.raises(AssemblyError, match="takes 2 operand"):
        execute_slot("{0}+{1}", [forty_eight], text, [], SETTINGS)


# --- labelled gold chains re-run through the assembler ----------------------------------------


def labelled_chain(row: dict):
    step_settings = StepSettings(SETTINGS.timeout_s, SETTINGS.max_length, CONFIG.steps.result_rel_tol, CONFIG.ib.pow_subtypes, LABELS)
    steps = [
        {"step_index": s.index, "expression": s.expression_text, "result": s.result_text, "value": s.value, "char_start": s.char_start, "char_end": s.char_end}
        for s in split_solution({"problem": row["question"], "answer": row["answer"]}, step_settings).steps
    ]
    provenance_settings = ProvenanceSettings(
        SETTINGS.word_to_number, SETTINGS.domain_constants, CONFIG.steps.result_rel_tol, CONFIG.training_data.context_words,
        SETTINGS.timeout_s, SETTINGS.max_length,
    )
    return steps, label_problem("p", row["question"], row["answer"], steps, provenance_settings)


def test_labelled_gsm8k_chains_rerun_to_the_gold_answer_through_the_assembler():
    seen = set()
    for row in (NATALIA, PORCHE, ALICE, JANET):
        text = row["question"]
        steps, labels = labelled_chain(row)
        assert steps and all(o.provenance != UNEXPLAINED for o in labels.operands)
        computed: dict[int, float | None] = {}
        for step, skeleton in zip(steps, labels.skeletons, strict=True):
            step_labels = sorted((o for o in labels.operands if o.step_index == step["step_index"]), key=lambda o: o.operand_index)
            operands = [operand_from_label(o, text, SETTINGS) for o in step_labels]
            for label, operand in zip(step_labels, operands, strict=True):
                assert math.isclose(resolve_operand(operand, text, computed, SETTINGS), label.value, rel_tol=REL_TOL)
                seen.add(label.provenance)
            computed[step["step_index"]] = execute_slot(skeleton, operands, text, computed, SETTINGS)
            assert math.isclose(computed[step["step_index"]], step["value"], rel_tol=REL_TOL)
        gold = float(row["answer"].rsplit("####", 1)[1])
        assert computed[steps[-1]["step_index"]] == gold
    assert seen == {TEXT, PRIOR, IMPLICIT, CONSTANT}


def test_operand_from_label_refuses_an_unexplained_operand():
    _, labels = labelled_chain(NATALIA)
    unexplained = labels.operands[0]
    unexplained.provenance = UNEXPLAINED
    with pytest.raises(AssemblyError, match="UNEXPLAINED"):
        operand_from_label(unexplained, NATALIA["question"], SETTINGS)


# --- settings --------------------------------------------------------------------------------------


def test_settings_come_from_config():
    cfg = load_config(overrides=["steps.expression_timeout_s=3.5", "c4.domain_constants.days_per_year=366"])
    built = AssemblerSettings.from_config(cfg)
    assert built.timeout_s == 3.5
    assert built.max_length == cfg.steps.max_expression_length
    assert built.word_to_number["half"] == 2.0
    assert built.domain_constants["days_per_year"] == 366.0
    assert issubclass(AssemblyError, MyceliumError)
