"""Answer extraction and the three answer checkers, on the pairs a reader of the eval report
would notice: fractions, percents, currency, units, `10` vs `10.0`, thousands commas, signs,
intervals, the cases where math-verify and the Hendrycks check disagree, and hostile text."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import mycelium
from mycelium.answers import (
    check_hendrycks,
    check_math_verify,
    check_numeric,
    extract_final_answer,
    hendrycks_normal_form,
    numeric_value,
)
from mycelium.datasets import extract_boxed_answer, extract_gsm8k_answer

REL_TOL = 1e-6  # config steps.result_rel_tol
TIMEOUT_S = 10.0  # generous: the first call also starts the helper process
SAMPLE_DIR = Path(mycelium.__file__).parent / "data" / "sample"
MARKER = Path("/tmp/pwned_answers")
MALICIOUS = [
    "__import__('os').system('touch /tmp/pwned_answers')",
    # No dunder, so this one does reach math-verify (and its sympy parse_expr) in the helper.
    "exec(\"import os; os.system('touch /tmp/pwned_answers')\")",
    "\\boxed{__import__('os').system('touch /tmp/pwned_answers')}",
]


def _sample_rows(name: str) -> list[dict]:
    with open(SAMPLE_DIR / name, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --- extract_final_answer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),  # nested braces
        ("First \\boxed{3}, then corrected: \\boxed{4}.", "4"),  # the last box is the answer
        ("Total 5 + 3 = 8.\n#### 8\n\nQuestion: a new problem with 99 apples", "8"),  # model ran on
        ("... = 1,250 apples\n#### 1,250", "1250"),
        ("The box wins over the marker: \\boxed{7}\n#### 8", "7"),
        ("Adding them up, the answer is $\\frac{3}{4}$. Then 12 more words.", "\\frac{3}{4}"),
        ("The final answer is: **42**.", "42"),
        ("The answer is 3.5.", "3.5"),
        ("She has 1,250 apples and gives away 3-4", "4"),  # `3-4`: the minus is not 4's sign
        ("The temperature fell to -5", "-5"),
        ("No digits at all here.", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_final_answer_on_the_gold_solutions_of_the_sample():
    """Gold worked solutions are chains of thought too: each one's answer comes back out."""
    for row in _sample_rows("gsm8k_sample.jsonl"):
        assert extract_final_answer(row["answer"]) == extract_gsm8k_answer(row["answer"])
    for row in _sample_rows("math_sample.jsonl"):
        assert extract_final_answer(row["solution"]) == extract_boxed_answer(row["solution"])


# --- check_numeric (GSM8K) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ("10", "10.0"),
        ("10.00", "10"),
        ("1,000", "1000"),
        ("$1,000.00", "1000"),
        ("\\$5", "5"),
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac12", "1/2"),
        ("2\\frac{1}{2}", "2.5"),  # a mixed number
        ("50%", "50"),
        ("50\\%", "50"),
        ("10 dollars", "10"),
        ("10 \\text{ cm}", "10"),
        ("5 km/h", "5"),
        ("-3", "- 3"),
        ("−3", "-3"),  # a Unicode minus
        ("-$5", "-5"),
        ("x = 18", "18"),
        ("\\boxed{18}", "18"),
        ("0.3333333", "1/3"),  # within rel_tol
    ],
)
def test_check_numeric_equal(predicted, gold):
    assert check_numeric(predicted, gold, REL_TOL)
    assert check_numeric(gold, predicted, REL_TOL)


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ("2.24", "2.25"),  # no last-decimal slack between two answers
        ("0.33", "1/3"),  # outside rel_tol
        ("-3", "3"),
        ("10 or 12", "10"),  # a digit after the number: not one answer
        ("1,2", "12"),  # a list, not a thousands separator
        ("ten", "10"),
        ("x+1", "1"),
        ("1/0", "0"),
        ("", "0"),
        (None, "0"),
        (10, "10"),  # not text
        ("9" * 5000, "9"),  # more digits than int() reads: False, no ValueError
    ],
)
def test_check_numeric_not_equal_and_never_raises(predicted, gold):
    assert not check_numeric(predicted, gold, REL_TOL)


def test_numeric_value_reads_exact_numbers():
    assert numeric_value("0.1") * 3 == numeric_value("0.3")  # exact, not binary floats
    assert numeric_value("-\\frac{3}{4}") == numeric_value("-0.75")
    assert numeric_value("a" * 5000 + "!") is None  # long junk is rejected quickly


def test_gsm8k_sample_golds_match_themselves_with_formatting():
    for row in _sample_rows("gsm8k_sample.jsonl"):
        gold = extract_gsm8k_answer(row["answer"])
        value = numeric_value(gold)
        assert value is not None, gold
        assert check_numeric(f"${value.numerator / value.denominator:,.2f}", gold, REL_TOL), gold


# --- check_hendrycks (MATH) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
        ("\\frac12", "\\frac{1}{2}", True),
        ("1/2", "\\frac{1}{2}", True),
        ("0.5", "\\frac{1}{2}", True),  # the reference's one special case
        ("0.25", "\\frac{1}{4}", False),  # ... and no other decimal
        (".73", "0.73", True),
        ("50\\%", "50", True),
        ("\\$5", "5", True),
        ("10 \\text{ cm}", "10", True),
        ("210\\text{ ways}", "210", True),
        ("4 \\text{ inches}^2", "4", True),
        ("30^\\circ", "30", True),
        ("-3", "- 3", True),
        ("(1,2)", "(1, 2)", True),
        ("\\left( 1, 2 \\right)", "(1,2)", True),
        ("[-2, 0]", "[-2,0]", True),
        ("x = 5", "5", True),
        ("5.", "5", True),
        ("2\\sqrt3", "2\\sqrt{3}", True),
        ("-\\tfrac{5}{2}", "-\\frac52", True),
        ("\\text{(A)}", "\\text{(B)}", False),  # a choice is the answer, not a unit to drop
        ("\\text{even}", "\\text{odd}", False),
        ("(2,1)", "(1,2)", False),
        ("10", "10.0", False),  # strings, not values: see the disagreements below
        ("1,000", "1000", False),
        ("", "", False),  # two empty answers are not a match
        (None, "5", False),
    ],
)
def test_check_hendrycks(predicted, gold, expected):
    assert check_hendrycks(predicted, gold) is expected


def test_hendrycks_normal_form_shows_what_is_compared():
    assert hendrycks_normal_form("\\boxed{\\left( \\dfrac12, .5 \\right)}") == "(\\frac{1}{2},0.5)"
    assert hendrycks_normal_form("k = -3/4") == "-\\frac{3}{4}"


# --- check_math_verify (MATH) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "\\frac{1}{2}", True),
        ("$\\frac{1}{2}$", "0.5", True),
        ("50\\%", "50", True),
        ("\\$5", "5", True),
        ("10 \\text{ cm}", "10", True),
        ("10.0", "10", True),
        ("1,000", "1000", True),
        ("- 3", "-3", True),
        ("(1, 2)", "(1,2)", True),  # an open interval on both sides
        ("[1,2]", "(1,2)", False),  # closed vs open
        ("(2,1)", "(1,2)", False),
        ("2(2x^2-3x+2)", "4x^2 - 6x + 4", True),  # symbolic: sample gold, expanded form
        ("\\text{even}", "\\text{odd}", False),
        ("hello", "world", False),
        ("", "5", False),
        (None, "5", False),
    ],
)
def test_check_math_verify(predicted, gold, expected):
    assert check_math_verify(predicted, gold, TIMEOUT_S) is expected


def test_math_sample_golds_match_themselves_in_both_checkers():
    for row in _sample_rows("math_sample.jsonl"):
        gold = row["answer"]
        assert check_hendrycks(gold, gold), gold
        assert check_math_verify(gold, gold, TIMEOUT_S), gold


# Real pairs on which the two MATH checkers disagree. Golds are from the MATH sample rows
# (`8\sqrt{3}`, `-\tfrac{5}{2}`, `\frac{4036082}{4036081}`) or typical MATH answer forms.
DISAGREEMENTS = [
    # (predicted, gold, math-verify says, Hendrycks says) -- and which one is right
    ("\\sqrt{192}", "8\\sqrt{3}", True, False),  # math-verify is right: the same number
    ("-2.5", "-\\tfrac{5}{2}", True, False),  # math-verify is right
    ("10.0", "10", True, False),  # math-verify is right
    ("1,000", "1000", True, False),  # math-verify is right
    ("\\text{(C)}", "C", True, False),  # math-verify is right: the same choice
    ("3,1,2", "1,2,3", True, False),  # math-verify is right for "list all solutions" (a set)
    # Hendrycks is right: math-verify rounds floats to 6 decimals, so 1.0000004 passes for
    # 4036082/4036081 = 1.00000024777...; the closest 7-decimal answer would be 1.0000002.
    ("1.0000004", "\\frac{4036082}{4036081}", True, False),
    # Hendrycks drops any left side of at most two characters, so y=5 passes for x=5;
    # math-verify keeps the variables apart. Which is right depends on the question asked;
    # for "find x" math-verify is.
    ("y=5", "x=5", False, True),
]


@pytest.mark.parametrize(("predicted", "gold", "math_verify_says", "hendrycks_says"), DISAGREEMENTS)
def test_the_two_math_checkers_disagree(predicted, gold, math_verify_says, hendrycks_says):
    assert check_math_verify(predicted, gold, TIMEOUT_S) is math_verify_says
    assert check_hendrycks(predicted, gold) is hendrycks_says


def test_math_verify_is_bounded_by_the_timeout_and_recovers():
    """9^(9^9) is a big-integer power that ignores signals: only killing the helper stops it."""
    started = time.monotonic()
    assert check_math_verify("9^{9^{9}}", "3", timeout_s=1.0) is False
    assert time.monotonic() - started < 8.0
    assert check_math_verify("0.5", "\\frac{1}{2}", TIMEOUT_S)  # a fresh helper answers


def test_math_verify_works_from_worker_threads():
    """math-verify's own signal.alarm timeouts raise off the main thread; ours do not."""
    pairs = [("0.5", "\\frac{1}{2}"), ("(1, 2)", "(1,2)"), ("3", "4")] * 3
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda pair: check_math_verify(*pair, TIMEOUT_S), pairs))
    assert results == [True, True, False] * 3


# --- hostile text -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", MALICIOUS)
def test_malicious_text_is_false_and_never_runs(text):
    if MARKER.exists():
        os.remove(MARKER)
    assert check_numeric(text, "0", REL_TOL) is False
    assert check_hendrycks(text, "0") is False
    assert check_math_verify(text, "0", TIMEOUT_S) is False
    assert check_math_verify("0", text, TIMEOUT_S) is False  # as the gold too
    extract_final_answer(text)
    assert not MARKER.exists()
