"""Step splitting on real GSM8K and MATH rows, the annotation regex's edge cases, the LaTeX
converter, and the drop reasons."""

from __future__ import annotations

import pytest

from mycelium.expressions import POW_SUBTYPES, parse_expression
from mycelium.steps import (
    DROP_SCHEMA,
    ROUTE_GSM8K,
    ROUTE_MATH_PARSER,
    ROUTE_MATH_PATTERN,
    STEP_SCHEMA,
    LatexUnsupported,
    StepSettings,
    equation_clauses,
    find_annotations,
    latex_to_arithmetic,
    split_rows,
    split_solution,
    steps_frame,
    values_match,
)

LABELS = ["ADD", "SUB", "MUL", "DIV", "SQRT", "SQUARE", "CUBE", "HIGH_POW", "SIN", "COS", "TAN", "LOG", "FACTORIAL", "MOD", "OTHER"]
SETTINGS = StepSettings(timeout_s=5.0, max_length=500, rel_tol=1e-6, pow_subtypes=POW_SUBTYPES, labels=LABELS)

# Real rows, copied from ../shared/data (GSM8K train rows 1-2, MATH train rows 2 and 5).
GSM8K_NATALIA = {
    "problem_id": "g1",
    "problem": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "solution": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    "answer": "72",
}
GSM8K_WENG = {
    "problem_id": "g2",
    "problem": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "solution": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    "answer": "10",
}
MATH_PERCENT = {
    "problem_id": "m1",
    "problem": "What is the positive difference between $120\\%$ of 30 and $130\\%$ of 20?",
    "solution": "One hundred twenty percent of 30 is $120\\cdot30\\cdot\\frac{1}{100}=36$, and $130\\%$ of 20 is $ 130\\cdot 20\\cdot\\frac{1}{100}=26$.  The difference between 36 and 26 is $\\boxed{10}$.",
    "answer": "10",
}
MATH_SEQUENCE = {
    "problem_id": "m2",
    "problem": "What is the 100th term of the arithmetic sequence 6, 10, 14, 18, ...?",
    "solution": "The common difference is $10 - 6 = 4$, so the 100th term is $6+99\\cdot 4=\\boxed{402}$.",
    "answer": "402",
}


# --- GSM8K ---------------------------------------------------------------------------------------


def test_gsm8k_rows_give_one_step_per_annotation():
    natalia = split_solution(GSM8K_NATALIA, SETTINGS)
    assert natalia.drops == []
    assert [(s.expression_text, s.result_text, s.operator, s.label) for s in natalia.steps] == [
        ("48/2", "24", "div", "DIV"),
        ("48+24", "72", "add", "ADD"),
    ]
    first, second = natalia.steps
    assert GSM8K_NATALIA["solution"][first.char_start : first.char_end] == "<<48/2=24>>"
    assert (first.index, first.line_index, second.index, second.line_index) == (0, 0, 1, 1)
    assert first.route == ROUTE_GSM8K and first.value == 24.0

    weng = split_solution(GSM8K_WENG, SETTINGS)
    assert [(s.expression_text, s.value, s.label) for s in weng.steps] == [("12/60", 0.2, "DIV"), ("0.2*50", 10.0, "MUL")]


def test_raw_gsm8k_row_with_solution_under_answer():
    raw = {"question": GSM8K_NATALIA["problem"], "answer": GSM8K_NATALIA["solution"]}
    assert len(split_solution(raw, SETTINGS).steps) == 2


def test_annotation_regex_edge_cases():
    matches, unclosed = find_annotations("a <<2+<<3*4=12>> b <<5*5=25>> c << d")
    assert [m.group(1) for m in matches] == ["3*4=12", "5*5=25"]
    assert len(unclosed) == 2  # the stray `<<` before the inner note, and the one at the end
    matches, _ = find_annotations("<<1,000*2=2,000>>")
    assert matches[0].group(1) == "1,000*2=2,000"


@pytest.mark.parametrize(
    "solution, reason",
    [
        ("x <<48/2>>24\n#### 24", "no_equals"),
        ("x <<1=1=1>>1\n#### 1", "several_equals"),
        ("x <<=24>>24\n#### 24", "empty_side"),
        ("x <<48/2=25>>25\n#### 25", "value_mismatch"),
        ("x <<7/2=3>>3\n#### 3", "value_mismatch"),  # a written integer gets no rounding slack
        ("x <<48/y=24>>24\n#### 24", "not_a_number"),
        ("x <<__import__('os')=0>>0\n#### 0", "expression_unsafe"),
        ("x <<(1,2)=3>>3\n#### 3", "expression_syntax"),
        ("x <<2*3=six>>6\n#### 6", "result_unparseable"),
        ("x <<2*3=6\n#### 6", "unclosed_annotation"),
        ("Let p be her income, 3p = $3000 so p = $1000\n#### 1000", "no_annotations"),
    ],
)
def test_gsm8k_drop_reasons(solution, reason):
    result = split_solution({"solution": solution}, SETTINGS)
    assert result.steps == []
    assert [drop[0] for drop in result.drops] == [reason]


def test_commas_and_rounded_results_are_accepted():
    result = split_solution({"solution": "a <<1,000*2=2,000>>2,000 b <<10/3=3.33>>3.33 c <<2/3=.66>>.66\n#### 1"}, SETTINGS)
    assert result.drops == []
    assert [s.value for s in result.steps] == [2000.0, pytest.approx(10 / 3), pytest.approx(2 / 3)]


def test_values_match_rules():
    assert values_match(24.0, 24.0, "24", 1e-6)
    assert values_match(3.3333, 3.33, "3.33", 1e-6)
    assert not values_match(3.5, 3.0, "3", 1e-6)
    assert values_match(1e-17, 0.0, "0", 1e-6)


# --- MATH ----------------------------------------------------------------------------------------


def test_math_rows_give_validated_steps():
    percent = split_solution(MATH_PERCENT, SETTINGS)
    assert [(s.expression_text, s.result_text, s.label, s.route) for s in percent.steps] == [
        ("120*30*((1)/(100))", "36", "DIV", ROUTE_MATH_PATTERN),
        ("130*20*((1)/(100))", "26", "DIV", ROUTE_MATH_PATTERN),
    ]
    first = percent.steps[0]
    assert MATH_PERCENT["solution"][first.char_start : first.char_end] == "120\\cdot30\\cdot\\frac{1}{100}=36"

    sequence = split_solution(MATH_SEQUENCE, SETTINGS)
    assert [(s.expression_text, s.value, s.operator) for s in sequence.steps] == [("10-6", 4.0, "sub"), ("6+99*4", 402.0, "add")]
    for step in percent.steps + sequence.steps:
        parse_expression(step.expression_text, SETTINGS.timeout_s, SETTINGS.max_length)  # always whitelist text


def test_latex_parser_route_takes_what_the_converter_cannot():
    result = split_solution({"solution": r"So $\lfloor \frac{100}{3} \rfloor = 33$."}, SETTINGS)
    assert [(s.route, s.expression_text, s.operator) for s in result.steps] == [(ROUTE_MATH_PARSER, "floor(100/3)", "floor_div")]


def test_align_continuation_rows():
    solution = "\\begin{align*}\n1002^2&-502^2 \\\\\n&= (500)(1600) \\\\\n&= \\boxed{800000}.\n\\end{align*}"
    result = split_solution({"solution": solution}, SETTINGS)
    assert [(s.expression_text, s.value) for s in result.steps] == [("(500)*(1600)", 800000.0)]
    assert [drop[0] for drop in result.drops] == ["rhs_not_numeric"]


@pytest.mark.parametrize(
    "solution, reason",
    [
        ("Then $a+b=10$.", "no_arithmetic_side"),
        ("So $x = 5$.", "no_arithmetic_side"),
        ("So $h(x)=\\frac{x+2}{7}$.", "rhs_not_numeric"),
        ("We get $\\frac{100000}{1.06^5} = \\boxed{74726}$.", "value_mismatch"),
        ("Thus $2\\clubsuit 3 = 11$.", "latex_unsupported"),
    ],
)
def test_math_drop_reasons(solution, reason):
    result = split_solution({"solution": solution}, SETTINGS)
    assert result.steps == []
    assert [drop[0] for drop in result.drops] == [reason]


def test_relations_and_plain_math_are_not_equations():
    assert equation_clauses("$x < 3$, $\\sqrt{2}$, $a \\le b$ and $2+2$") == []


def test_latex_converter():
    assert latex_to_arithmetic(r"\frac{1}{2}\cdot 4") == "((1)/(2))*4"
    assert latex_to_arithmetic(r"\sqrt[3]{27} + \sqrt{16}") == "root(27,3)+sqrt(16)"
    assert latex_to_arithmetic(r"2^{10} \times 3") == "2**(10)*3"
    assert latex_to_arithmetic(r"1000\left(1+2\right)") == "1000*(1+2)"
    assert latex_to_arithmetic(r"1{,}000 \div 4") == "1000/4"
    assert latex_to_arithmetic(r"2\frac{1}{2}") == "(2+((1)/(2)))"  # a mixed number
    with pytest.raises(LatexUnsupported):
        latex_to_arithmetic(r"\binom{5}{2}")
    # A full stop inside the math is not a number (MATH-500 has such sentences): refused, not a crash.
    with pytest.raises(LatexUnsupported):
        latex_to_arithmetic(r"x . 2")
    assert split_solution({"problem_id": "dot", "solution": "Hence $a . b = 5$ and $2+3 = 5$."}, SETTINGS).steps[0].expression_text == "2+3"


# --- frames --------------------------------------------------------------------------------------


def test_frames_have_the_documented_columns():
    rows = [GSM8K_NATALIA, GSM8K_WENG, MATH_PERCENT, MATH_SEQUENCE, {"problem_id": "m3", "solution": "So $x = 5$."}]
    frames = split_rows(rows, SETTINGS)
    assert frames.steps.schema == STEP_SCHEMA
    assert frames.drops.schema == DROP_SCHEMA
    assert frames.steps.height == 8
    assert frames.steps["problem_id"].to_list() == ["g1", "g1", "g2", "g2", "m1", "m1", "m2", "m2"]
    assert frames.drops.rows() == [("m3", "math", "no_arithmetic_side", "x = 5")]
    assert steps_frame(rows, SETTINGS).equals(frames.steps)
