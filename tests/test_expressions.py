"""Safe parsing: unsafe text is refused and never runs, sympy work is time-bounded, and the
operator of each expression (Pow subtypes included) and its C2 label are right."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sympy

from mycelium.errors import ConfigError, MyceliumError
from mycelium.expressions import (
    POW_SUBTYPES,
    ExpressionError,
    evaluate_number,
    label_for_operator,
    operation_label,
    parse_expression,
    parse_latex,
    top_operator,
)

TIMEOUT_S = 5.0  # generous: the first call also starts the helper process
MAX_LENGTH = 500
LABELS = ["ADD", "SUB", "MUL", "DIV", "SQRT", "SQUARE", "CUBE", "HIGH_POW", "SIN", "COS", "TAN", "LOG", "FACTORIAL", "MOD", "OTHER"]


def parse(text: str) -> sympy.Expr:
    return parse_expression(text, TIMEOUT_S, MAX_LENGTH)


def value_of(text: str) -> float | None:
    return evaluate_number(parse(text), TIMEOUT_S)


# --- unsafe text -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload_template",
    [
        "__import__('os').system('touch {marker}')",
        "(1).__class__.__base__.__subclasses__()",
        "x.__class__",
        "sqrt.__globals__",
        "(lambda: __import__('os').system('touch {marker}'))()",
        "lambda: 0",
        "import os",
        "[c for c in ().__class__.__bases__]",
        "f'{{__import__(\"os\").system(\"touch {marker}\")}}'",
        "open('{marker}', 'w')",
        "exec('1')",
        "eval('1')",
        "getattr(x, 'real')",
        "x.real",
        "(3).real",
        "3.real",
        "x[0]",
        "{{1: 2}}",
        "a = 1",
        "1; 2",
        "Symbol('x')",
        "Integer(3)",
        "S(1)",
        "\\x41",
        "1 if 1 else 2",
    ],
)
def test_unsafe_text_is_rejected_and_not_run(payload_template, tmp_path: Path):
    marker = tmp_path / "pwned"
    payload = payload_template.format(marker=marker)
    with pytest.raises(ExpressionError) as caught:
        parse(payload)
    assert caught.value.reason in ("unsafe", "syntax")
    assert isinstance(caught.value, MyceliumError)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("expression ")
    assert not marker.exists()


def test_error_message_names_the_text_truncated():
    with pytest.raises(ExpressionError) as caught:
        parse("foo" + "+1" * 100)
    message = str(caught.value)
    assert "'foo+1+1" in message and "..." in message and len(message) < 200


def test_too_long_text_is_refused_before_parsing():
    with pytest.raises(ExpressionError) as caught:
        parse_expression("1+" * 300 + "1", TIMEOUT_S, 100)
    assert caught.value.reason == "too_long"


def test_huge_power_times_out_quickly_and_the_helper_recovers():
    expr = parse("9**9**9**9")  # parsing keeps the tree unevaluated: instant
    assert isinstance(expr, sympy.Pow)
    started = time.monotonic()
    with pytest.raises(ExpressionError) as caught:
        evaluate_number(expr, 0.5)
    elapsed = time.monotonic() - started
    assert caught.value.reason == "timeout"
    assert "0.5 s" in str(caught.value)
    assert elapsed < 3.0
    assert value_of("2+3") == 5.0  # a fresh helper answers the next call


def test_huge_factorial_is_not_computed_while_parsing():
    expr = parse("factorial(10**12)")
    assert isinstance(expr, sympy.factorial)
    with pytest.raises(ExpressionError) as caught:
        evaluate_number(expr, 0.5)
    assert caught.value.reason == "timeout"


def test_timeout_must_be_positive():
    with pytest.raises(ValueError):
        parse_expression("1+1", 0, MAX_LENGTH)


# --- numbers, commas, percent --------------------------------------------------------------------


def test_thousands_separators_are_stripped():
    assert value_of("1,000*2") == 2000.0
    assert value_of("1,250,000 / 2") == 625000.0
    assert value_of("Mod(1000,300)") == 100.0  # a call's argument comma is kept


@pytest.mark.parametrize("text", ["1,2", "(3, 4)", "1,0000", "12,34"])
def test_commas_that_are_not_separators_are_refused_not_made_tuples(text):
    with pytest.raises(ExpressionError) as caught:
        parse(text)
    assert caught.value.reason == "syntax"


def test_percent_is_modulo_and_keeps_its_structure():
    expr = parse("10 % 3")
    assert isinstance(expr, sympy.Mod)
    assert evaluate_number(expr, TIMEOUT_S) == 1.0
    assert top_operator(expr, POW_SUBTYPES) == "mod"
    assert operation_label(expr, LABELS) == "MOD"


def test_decimals_leading_zeros_and_caret():
    assert value_of(".5*4") == 2.0
    assert value_of("007+1") == 8.0
    assert value_of("2^10") == 1024.0
    assert value_of("5!") == 120.0


def test_non_numbers_evaluate_to_none():
    assert value_of("x+1") is None
    assert value_of("1/0") is None
    assert value_of("sqrt(-4)") is None


def test_latex_parser_is_bounded_and_typed():
    assert evaluate_number(parse_latex(r"\frac{48}{2}", TIMEOUT_S, MAX_LENGTH), TIMEOUT_S) == 24.0
    with pytest.raises(ExpressionError) as caught:
        parse_latex(r"\{1, 2\}", TIMEOUT_S, MAX_LENGTH)
    assert caught.value.reason in ("not_expression", "syntax")


# --- operators -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, operator, label",
    [
        ("3+4", "add", "ADD"),
        ("10-4", "sub", "SUB"),
        ("100-50-30-15", "sub", "SUB"),
        ("-3+-4", "add", "ADD"),
        ("6*7", "mul", "MUL"),
        ("48/2", "div", "DIV"),
        ("20/100*25", "div", "DIV"),
        ("-(3+4)", "neg", "SUB"),
        ("sin(x)", "sin", "SIN"),
        ("cos(0)", "cos", "COS"),
        ("tan(1)", "tan", "TAN"),
        ("log(100, 10)", "log", "LOG"),
        ("ln(E)", "log", "LOG"),
        ("factorial(5)", "factorial", "FACTORIAL"),
        ("exp(2)", "exp", "OTHER"),
        ("floor(2.5)", "floor", "OTHER"),
        ("7", "number", "OTHER"),
        ("x", "symbol", "OTHER"),
        ("pi", "constant", "OTHER"),
    ],
)
def test_top_operator_and_label(text, operator, label):
    expr = parse(text)
    assert top_operator(expr, POW_SUBTYPES) == operator
    assert operation_label(expr, LABELS) == label


@pytest.mark.parametrize(
    "text, subtype, label",
    [
        ("sqrt(16)", "sqrt", "SQRT"),
        ("16**(1/2)", "sqrt", "SQRT"),
        ("16**0.5", "sqrt", "SQRT"),
        ("5**2", "square", "SQUARE"),
        ("5^2", "square", "SQUARE"),
        ("2**3", "cube", "CUBE"),
        ("x**-1", "inverse", "DIV"),
        ("2**10", "high_pow", "HIGH_POW"),
        ("2**-2", "neg_pow", "OTHER"),
        ("8**(2/3)", "frac_pow", "OTHER"),
        ("4**1.5", "frac_pow", "OTHER"),
        ("16**(-1/2)", "frac_pow", "OTHER"),
        ("8**(1/3)", "nth_root", "OTHER"),
        ("cbrt(27)", "nth_root", "OTHER"),
        ("root(16, 4)", "nth_root", "OTHER"),
        ("2**x", "pow_general", "OTHER"),
        ("2**(2**2)", "pow_general", "OTHER"),
    ],
)
def test_pow_subtypes(text, subtype, label):
    expr = parse(text)
    assert top_operator(expr, POW_SUBTYPES) == subtype
    assert operation_label(expr, LABELS) == label


def test_evaluate_false_structure_as_documented():
    assert parse("10-4") == sympy.Add(10, sympy.Mul(-1, 4, evaluate=False), evaluate=False)
    assert parse("48/2") == sympy.Mul(48, sympy.Pow(2, -1, evaluate=False), evaluate=False)


def test_latex_parser_trees_get_operators_too():
    # latex2sympy folds \frac{1}{100} to a Rational factor; that factor still reads as division.
    expr = parse_latex(r"120\cdot30\cdot\frac{1}{100}", TIMEOUT_S, MAX_LENGTH)
    assert top_operator(expr, POW_SUBTYPES) == "div"
    assert top_operator(parse_latex(r"\dfrac{23}{7}", TIMEOUT_S, MAX_LENGTH), POW_SUBTYPES) == "div"


def test_pow_subtypes_from_config_decide_the_split():
    assert top_operator(parse("2**3"), ["sqrt", "square", "pow_general"]) == "pow_general"
    assert top_operator(parse("2**3"), ["sqrt"]) == "pow"
    with pytest.raises(ConfigError):
        top_operator(parse("2**3"), ["cubic"])


def test_label_mapping_falls_back_to_other():
    assert label_for_operator("sqrt", ["ADD", "OTHER"]) == "OTHER"
    assert label_for_operator("add", ["ADD", "OTHER"]) == "ADD"
    with pytest.raises(ConfigError):
        label_for_operator("add", ["ADD"])


def test_floor_division_is_a_division():
    expr = parse("560//10")
    assert evaluate_number(expr, TIMEOUT_S) == 56.0
    assert top_operator(expr, POW_SUBTYPES) == "floor_div"
    assert operation_label(expr, LABELS) == "DIV"


def test_expression_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(ExpressionError("timeout", "9**9**9", "took too long")))
    assert (error.reason, error.text, str(error)) == ("timeout", "9**9**9", "expression '9**9**9': took too long")
