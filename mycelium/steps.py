"""Split gold solutions into computation steps, keeping only the steps that execute.

Reads: problem rows (dicts with `problem_id`, `solution`; the loader's schema in
`mycelium.datasets`). Writes nothing: `steps_frame` / `split_rows` return polars frames that
stage 02 stores. Time: about 1 ms per step (each step is parsed and evaluated in the bounded
helper of `mycelium.expressions`): 0.9 s for the first 200 GSM8K train problems, 23 s for all
7,473, 1.6 s for the first 300 MATH train problems (one core, measured).

What you should see: on GSM8K every `<<expr=result>>` note becomes a step (route
`gsm8k_annotation`; on the full train set 23,716 of 23,716 notes validate); the drops are the
95 solutions (1.3%) written without notes. On MATH far fewer equations become steps (210 from
300 problems): most `=` in a solution relate variables (`a+b=10`) or have a symbolic right
side, and those are counted as drops with their reason, not kept.

Routes
------
- `gsm8k_annotation`: each calculator note `<<expr=result>>` is one step. The note's innermost
  `<<...>>` is taken (so a stray `<<` before it does not swallow text); the expression is
  everything before the `=`, the result everything after. The step is kept only when
  `parse_expression` + `evaluate_number` reproduce the annotated result (see `values_match`).
- `math_pattern`: LaTeX math segments (`$...$`, `$$...$$`, `\\[...\\]`, `\\(...\\)`, align-like
  environments) are split into clauses (at `\\\\`, top-level commas and `;`, `\\Rightarrow`,
  `\\implies`, `\\quad`, `\\text{...}`), and a clause with `=` whose last side is a plain number
  (`36`, `-1.5`, `\\frac{9}{7}`, `\\boxed{10}`) is a candidate. Its sides are tried left to
  right; the first side without variables that evaluates to the number is the step. A small
  converter turns the side into whitelist arithmetic (`\\frac`, `\\sqrt[n]`, `^`, `\\cdot`,
  `\\times`, `\\div`, `\\left(`, juxtaposition as `*`, `2\\frac{1}{2}` as a mixed number) for
  `parse_expression`.
- `math_latex_parser`: when the converter does not handle a side (an unknown command, a
  subscript, `|x|`) or its value does not match, latex2sympy2_extended parses that one side
  (`parse_latex`, bounded the same way); its output is printed back to text and must re-parse
  through `parse_expression`, so every kept step's `expression` is whitelist arithmetic.

Drop reasons (the `reason` of each drop): `no_annotations` (a GSM8K solution without notes),
`no_equals`, `several_equals`, `empty_side`,
`unclosed_annotation`, `result_unparseable`, `expression_<ExpressionError reason>` (unsafe,
syntax, too_long, not_expression, timeout, worker_failed), `not_a_number` (a symbol is left, a
division by zero, a complex value), `value_mismatch`, and for MATH `rhs_not_numeric`,
`no_arithmetic_side` (every side has variables or is a bare number: `x = 5`, `a+b = 10`),
`latex_unsupported` (neither route could read the side). Clauses without `=`, and relations
(`<`, `\\le`, `\\approx`, ...), are not equations and are not counted.

Public API
----------
- `StepSettings(timeout_s, max_length, rel_tol, pow_subtypes, labels)` — all from config.
- `Step`, `StepsResult(steps, drops)`; drops are `(reason, text)` pairs.
- `split_solution(problem_row, settings) -> StepsResult`
- `split_rows(rows, settings) -> SplitFrames(steps, drops)`; `steps_frame(rows, settings)`.
- `find_annotations(solution) -> (matches, unclosed_positions)`; `values_match(...)`;
  `latex_to_arithmetic(latex) -> str` (raises `LatexUnsupported`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import polars as pl
import sympy

from mycelium.datasets import problem_id as problem_id_of
from mycelium.expressions import (
    ExpressionError,
    evaluate_number,
    label_for_operator,
    parse_expression,
    parse_latex,
    top_operator,
)

ROUTE_GSM8K = "gsm8k_annotation"
ROUTE_MATH_PATTERN = "math_pattern"
ROUTE_MATH_PARSER = "math_latex_parser"

STEP_SCHEMA: dict[str, pl.DataType] = {
    "problem_id": pl.Utf8,
    "step_index": pl.Int32,
    "route": pl.Utf8,
    "expression": pl.Utf8,
    "result": pl.Utf8,
    "char_start": pl.Int32,
    "char_end": pl.Int32,
    "line_index": pl.Int32,
    "operator": pl.Utf8,
    "label": pl.Utf8,
    "value": pl.Float64,
}
DROP_SCHEMA: dict[str, pl.DataType] = {
    "problem_id": pl.Utf8,
    "family": pl.Utf8,  # gsm8k | math: which splitter saw the text
    "reason": pl.Utf8,
    "text": pl.Utf8,
}


@dataclass(frozen=True)
class StepSettings:
    """Everything the splitter needs from config; no defaults, callers pass config values."""

    timeout_s: float  # per parse / evaluation (expressions helper)
    max_length: int  # longest expression text accepted
    rel_tol: float  # relative tolerance between the computed and the written result
    pow_subtypes: Sequence[str]  # ib.pow_subtypes
    labels: Sequence[str]  # c2.labels


@dataclass(frozen=True)
class Step:
    index: int  # position among the problem's kept steps, in text order
    expression_text: str  # whitelist arithmetic that parse_expression accepts
    result_text: str  # the result as written (GSM8K note's right side, MATH's number)
    char_start: int  # span in the solution: the whole <<...>> note, or the LaTeX clause
    char_end: int
    line_index: int  # number of line breaks before char_start
    route: str
    value: float  # what the expression evaluates to
    operator: str  # fine operator (expressions.top_operator)
    label: str  # C2 label
    source_text: str = ""  # the note or LaTeX side as written


@dataclass
class StepsResult:
    steps: list[Step] = field(default_factory=list)
    drops: list[tuple[str, str]] = field(default_factory=list)  # (reason, text)


@dataclass(frozen=True)
class SplitFrames:
    steps: pl.DataFrame
    drops: pl.DataFrame


class LatexUnsupported(ValueError):
    """The pattern converter does not handle this LaTeX (the parser route may)."""


# --- result matching ---------------------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _decimals_shown(result_text: str) -> int:
    mantissa = re.split(r"[eE]", result_text.strip())[0]
    return len(mantissa.partition(".")[2])


def values_match(computed: float, written: float, written_text: str, rel_tol: float) -> bool:
    """Does the computed value reproduce the written result?

    Within `rel_tol` (relative, and absolute near zero), or — when the written result shows
    decimals — within one unit of its last shown decimal: GSM8K writes 10/3 as 3.33 and
    sometimes truncates (2/3 as 0.66). A written integer gets no such slack: `<<7/2=3>>` is a
    mismatch, not a rounding.
    """
    if math.isclose(computed, written, rel_tol=rel_tol, abs_tol=rel_tol):
        return True
    decimals = _decimals_shown(written_text)
    return decimals > 0 and abs(computed - written) <= 10.0 ** (-decimals) * (1 + rel_tol)


def _clean_number_text(text: str) -> str:
    """`$1,250.50` -> `1250.50`: currency signs and thousands separators are not arithmetic."""
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text.strip().replace("$", "")).strip()


def _number_value(text: str, settings: StepSettings) -> float | None:
    """A written result's value: a plain number directly, else bounded parsing (`3/4`)."""
    cleaned = _clean_number_text(text)
    if _PLAIN_NUMBER.fullmatch(cleaned):
        return float(cleaned)  # validated digits only: float() here is not eval
    try:
        return evaluate_number(parse_expression(cleaned, settings.timeout_s, settings.max_length), settings.timeout_s)
    except ExpressionError:
        return None


def _line_index(solution: str, position: int) -> int:
    return solution.count("\n", 0, position)


# --- GSM8K -------------------------------------------------------------------------------------

_GSM8K_ANSWER_LINE = re.compile(r"^####", re.MULTILINE)
# The innermost note: no `<` or `>` inside, so `<<a<<b=c>>` yields `b=c`.
_ANNOTATION = re.compile(r"<<([^<>]*)>>")


def find_annotations(solution: str) -> tuple[list[re.Match], list[int]]:
    """The calculator notes, and the positions of `<<` that open no complete note."""
    matches = list(_ANNOTATION.finditer(solution))
    opened = {match.start() for match in matches}
    unclosed = [position.start() for position in re.finditer(r"<<", solution) if position.start() not in opened]
    # `<<<` style runs: a `<<` that starts inside a matched note's opener is not a stray one.
    unclosed = [position for position in unclosed if position + 1 not in opened]
    return matches, unclosed


def _split_gsm8k(solution: str, settings: StepSettings) -> StepsResult:
    result = StepsResult()
    matches, unclosed = find_annotations(solution)
    for position in unclosed:
        result.drops.append(("unclosed_annotation", solution[position : position + 40]))
    for match in matches:
        note = match.group(1)
        if "=" not in note:
            result.drops.append(("no_equals", note))
            continue
        if note.count("=") > 1:
            result.drops.append(("several_equals", note))
            continue
        expression_text, _, result_text = (part.strip() for part in note.partition("="))
        if not expression_text or not result_text:
            result.drops.append(("empty_side", note))
            continue
        written = _number_value(result_text, settings)
        if written is None:
            result.drops.append(("result_unparseable", note))
            continue
        checked = _checked_expression(expression_text, written, result_text, settings)
        if isinstance(checked, str):
            result.drops.append((checked, note))
            continue
        expr, value = checked
        operator = top_operator(expr, settings.pow_subtypes)
        result.steps.append(
            Step(
                index=len(result.steps),
                expression_text=expression_text,
                result_text=result_text,
                char_start=match.start(),
                char_end=match.end(),
                line_index=_line_index(solution, match.start()),
                route=ROUTE_GSM8K,
                value=value,
                operator=operator,
                label=label_for_operator(operator, settings.labels),
                source_text=match.group(0),
            )
        )
    return result


def _checked_expression(
    expression_text: str, written: float, written_text: str, settings: StepSettings, *, require_closed: bool = False
) -> tuple[sympy.Expr, float] | str:
    """Parse, evaluate and compare; the (tree, value) pair, or a drop reason."""
    try:
        expr = parse_expression(expression_text, settings.timeout_s, settings.max_length)
    except ExpressionError as exc:
        return f"expression_{exc.reason}"
    if require_closed and expr.free_symbols:
        return "has_variables"
    try:
        value = evaluate_number(expr, settings.timeout_s)
    except ExpressionError as exc:
        return f"expression_{exc.reason}"
    if value is None:
        return "not_a_number"
    if not values_match(value, written, written_text, settings.rel_tol):
        return "value_mismatch"
    return expr, value


# --- MATH: finding equations in LaTeX -------------------------------------------------------------

_MATH_SEGMENT = re.compile(
    r"\$\$(?P<display>.+?)\$\$"
    r"|\\\[(?P<bracket>.+?)\\\]"
    r"|\\\((?P<paren>.+?)\\\)"
    r"|\\begin\{(?P<env>align|equation|eqnarray|gather|multline)(?P<star>\*?)\}(?P<envbody>.+?)\\end\{(?P=env)(?P=star)\}"
    r"|(?<!\\)\$(?P<inline>[^$]+?)(?<!\\)\$",
    re.DOTALL,
)
_SEGMENT_GROUPS = ("display", "bracket", "paren", "envbody", "inline")
# Clause separators at brace and parenthesis depth 0.
_CLAUSE_COMMANDS = re.compile(
    r"\\\\|\\(?:Rightarrow|Longrightarrow|implies|iff|quad|qquad|therefore|text|textrm|mbox|tag|intertext|hspace)(?![A-Za-z])"
)
_RELATIONS = re.compile(r"<|>|\\(?:le|ge|leq|geq|ne|neq|approx|equiv|sim|pmod|mod|lt|gt|in|subset|cong|propto)(?![A-Za-z])")


@dataclass(frozen=True)
class _Part:
    text: str
    start: int  # offsets in the solution
    end: int


def _math_segments(solution: str) -> Iterable[tuple[str, int]]:
    """(content, offset of the content in the solution) of each math segment."""
    for match in _MATH_SEGMENT.finditer(solution):
        for group in _SEGMENT_GROUPS:
            if match.group(group) is not None:
                yield match.group(group), match.start(group)
                break


def _top_level_cuts(text: str, is_cut) -> list[tuple[int, int]]:
    """Spans [start, end) of separators found by is_cut(text, i) -> length, at depth 0."""
    cuts = []
    depth = 0
    position = 0
    while position < len(text):
        char = text[position]
        if char == "\\" and position + 1 < len(text) and text[position + 1] in "{}":
            position += 2  # escaped brace: not grouping
            continue
        if char in "{(":
            depth += 1
        elif char in "})":
            depth = max(depth - 1, 0)
        elif depth == 0:
            length = is_cut(text, position)
            if length:
                cuts.append((position, position + length))
                position += length
                continue
        position += 1
    return cuts


def _clause_cut(text: str, position: int) -> int:
    if text[position] in ";":
        return 1
    if text[position] == ",":
        # 1,000 is a number; "a, b" and "x=1,y=2" are two clauses.
        if re.match(r",\d{3}(?!\d)", text[position:]) and position > 0 and text[position - 1].isdigit():
            return 0
        return 1
    if text[position] == "\\":
        match = _CLAUSE_COMMANDS.match(text, position)
        if match:
            end = match.end()
            if match.group().startswith(("\\text", "\\mbox", "\\tag", "\\intertext", "\\hspace")):
                end = _skip_group(text, end)
            return end - position
    return 0


def _skip_group(text: str, position: int) -> int:
    """Position after the braced group starting at `position` (spaces skipped)."""
    while position < len(text) and text[position].isspace():
        position += 1
    if position >= len(text) or text[position] != "{":
        return position
    depth = 0
    for index in range(position, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index + 1
    return len(text)


def _split_by_cuts(text: str, offset: int, cuts: list[tuple[int, int]]) -> list[_Part]:
    parts = []
    start = 0
    for cut_start, cut_end in cuts + [(len(text), len(text))]:
        piece = text[start:cut_start]
        stripped = piece.strip()
        if stripped.replace("&", "").strip():  # an align marker alone is no side
            leading = len(piece) - len(piece.lstrip())
            parts.append(_Part(stripped, offset + start + leading, offset + start + leading + len(stripped)))
        start = cut_end
    return parts


def equation_clauses(solution: str) -> list[list[_Part]]:
    """Each clause with a top-level `=`, as its sides (`a = b = 36` -> three parts)."""
    clauses = []
    for content, offset in _math_segments(solution):
        previous_sides: list[_Part] | None = None
        for clause in _split_by_cuts(content, offset, _top_level_cuts(content, _clause_cut)):
            text = clause.text
            if _RELATIONS.search(text):
                previous_sides = None
                continue
            equals = _top_level_cuts(text, lambda t, i: 1 if t[i] == "=" else 0)
            if not equals:
                previous_sides = [clause]  # an align row `1002^2-502^2 \\` that the next row continues
                continue
            sides = _split_by_cuts(text, clause.start, equals)
            starts_with_equals = text.replace("&", "").lstrip().startswith("=")
            if starts_with_equals and previous_sides:
                # A row `&= 12` continues the row above: its left side is that row's last side
                # (`a &= 3\cdot 4 \\ &= 12` gives the step 3\cdot 4 = 12).
                sides = [previous_sides[-1], *sides]
            if len(sides) >= 2 and len(sides) >= len(equals) + (0 if starts_with_equals else 1):
                clauses.append(sides)
                previous_sides = sides
            else:
                clauses.append([clause])  # an empty side ("= 5" with nothing above); reported
                previous_sides = None
    return clauses


# --- MATH: LaTeX to whitelist arithmetic ----------------------------------------------------------

_NUMERIC_RHS = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+|\\[dt]?frac\{-?\d+\}\{\d+\}|\\[dt]?frac\d\d|\d+/\d+)")
_FUNCTION_COMMANDS = {"sin": "sin", "cos": "cos", "tan": "tan", "log": "log", "ln": "ln", "exp": "exp"}
_SKIPPED_COMMANDS = {
    "left", "right", "!", ",", ";", ":", " ", "displaystyle", "textstyle", "big", "Big", "bigg", "Bigg",
    "bigl", "bigr", "Bigl", "Bigr", "$", "limits", "nonumber", "notag",
}
_TEXT_COMMANDS = {"text", "textrm", "mbox", "mathrm", "textbf", "mathbf", "textit", "operatorname"}
_ARITHMETIC_TOKEN = re.compile(r"\s*(?:(?P<number>\d+\.?\d*|\.\d+)|(?P<name>[A-Za-z]+)|(?P<op>\*\*|[-+*/(),!]))")
_VARIABLE_LATEX = re.compile(
    r"\\(?:alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|rho|"
    r"sigma|tau|upsilon|phi|varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Xi|Sigma|Phi|Psi|Omega)(?![A-Za-z])"
    r"|[A-Za-z]_"
)
_FUNCTION_NAMES = {"sqrt", "root", "sin", "cos", "tan", "log", "ln", "exp"}


def _read_group(latex: str, position: int) -> tuple[str, int]:
    """The argument at `position`: a braced group, a command, or one character."""
    while position < len(latex) and latex[position].isspace():
        position += 1
    if position >= len(latex):
        raise LatexUnsupported("missing argument")
    if latex[position] == "{":
        end = _skip_group(latex, position)
        if end > len(latex) or latex[end - 1] != "}":
            raise LatexUnsupported("unbalanced braces")
        return latex[position + 1 : end - 1], end
    if latex[position] == "\\":
        match = re.match(r"\\(?:[A-Za-z]+|.)", latex[position:])
        return match.group(), position + len(match.group())
    return latex[position], position + 1


def _clean_latex(latex: str) -> str:
    latex = re.sub(r"(?<=\d)\{,\}(?=\d)", "", latex)  # 1{,}000
    latex = re.sub(r"(?<=\d),\\!\s*(?=\d)", "", latex)  # 1,\!000
    latex = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", latex)  # 1,000
    latex = re.sub(r"\\begin\{aligned\}|\\end\{aligned\}|&", " ", latex)
    # A mixed number: 2\frac{1}{2} is 2 + 1/2 (a proper fraction right after an integer).
    latex = re.sub(
        r"(?<![\d.])(\d+)\s*\\[dt]?frac\{(\d+)\}\{(\d+)\}",
        lambda m: f"({m.group(1)}+\\frac{{{m.group(2)}}}{{{m.group(3)}}})" if int(m.group(2)) < int(m.group(3)) else m.group(0),
        latex,
    )
    return latex.strip().rstrip(".").strip()


def _convert(latex: str) -> str:
    out: list[str] = []
    position = 0
    while position < len(latex):
        char = latex[position]
        if char.isspace() or char == "&":
            position += 1
        elif char == "\\":
            match = re.match(r"\\(?:[A-Za-z]+|.)", latex[position:])
            command = match.group()[1:]
            position += len(match.group())
            if command in ("frac", "dfrac", "tfrac"):
                numerator, position = _read_group(latex, position)
                denominator, position = _read_group(latex, position)
                out.append(f"(({_convert(numerator)})/({_convert(denominator)}))")
            elif command == "sqrt":
                index = None
                if position < len(latex) and latex[position] == "[":
                    close = latex.find("]", position)
                    if close < 0:
                        raise LatexUnsupported("unclosed \\sqrt[")
                    index, position = latex[position + 1 : close], close + 1
                radicand, position = _read_group(latex, position)
                out.append(f"sqrt({_convert(radicand)})" if index is None else f"root({_convert(radicand)}, {_convert(index)})")
            elif command in ("cdot", "times", "ast"):
                out.append("*")
            elif command == "div":
                out.append("/")
            elif command == "pi":
                out.append("pi")
            elif command in _FUNCTION_COMMANDS:
                following = latex[position:].lstrip()
                if not following.startswith(("(", "{", "\\left(")):
                    raise LatexUnsupported(f"\\{command} without parentheses")
                out.append(_FUNCTION_COMMANDS[command])
            elif command == "boxed":
                inner, position = _read_group(latex, position)
                out.append(f"({_convert(inner)})")
            elif command in _TEXT_COMMANDS:
                _, position = _read_group(latex, position)  # units and words: not arithmetic
            elif command in ("left", "right"):
                if position < len(latex) and latex[position] == ".":
                    position += 1  # \left. is an invisible delimiter
            elif command in _SKIPPED_COMMANDS:
                pass
            else:
                raise LatexUnsupported(f"\\{command}")
        elif char == "^":
            exponent, position = _read_group(latex, position + 1)
            out.append(f"**({_convert(exponent)})")
        elif char == "{":
            inner, position = _read_group(latex, position)
            out.append(f"({_convert(inner)})")
        elif char == "[":
            out.append("(")
            position += 1
        elif char == "]":
            out.append(")")
            position += 1
        elif char.isdigit() or char == ".":
            match = re.match(r"\d*\.?\d+|\d+\.?", latex[position:])
            if match is None:  # a full stop that ends a sentence inside the math, not a number
                raise LatexUnsupported("a '.' that is not part of a number")
            number = match.group()
            out.append(number)
            position += len(number)
        elif char.isalpha():
            out.append(char)  # a single-letter variable
            position += 1
        elif char in "+-*/()!":
            out.append(char)
            position += 1
        else:
            raise LatexUnsupported(f"character {char!r}")
    return " ".join(out)


def _insert_implicit_products(text: str) -> str:
    """`2 (3)` -> `2*(3)`, `3 pi` -> `3*pi`, `) (` -> `)*(`; `sqrt (` stays a call."""
    tokens = []
    position = 0
    while position < len(text):
        match = _ARITHMETIC_TOKEN.match(text, position)
        if match is None or match.end() == position:
            if text[position:].strip() == "":
                break
            raise LatexUnsupported(f"cannot tokenise {text[position:position + 10]!r}")
        tokens.append((match.lastgroup, match.group(match.lastgroup)))
        position = match.end()
    pieces: list[str] = []
    previous: tuple[str, str] | None = None
    for kind, token in tokens:
        if previous is not None:
            ends_operand = previous[0] == "number" or (previous[0] == "name" and previous[1] not in _FUNCTION_NAMES) or previous[1] in (")", "!")
            starts_operand = kind in ("number", "name") or token == "("
            if ends_operand and starts_operand:
                pieces.append("*")
        pieces.append(token)
        previous = (kind, token)
    return "".join(pieces)


def latex_to_arithmetic(latex: str) -> str:
    """Whitelist arithmetic for a LaTeX side (`\\frac{1}{2}\\cdot 4` -> `((1)/(2))*4`).

    Raises LatexUnsupported for anything it does not know; the parser route takes those.
    """
    converted = _insert_implicit_products(_convert(_clean_latex(latex)))
    if not converted:
        raise LatexUnsupported("empty")
    return converted


def _numeric_rhs(latex: str) -> str | None:
    """The right side as a plain number's LaTeX (boxes, units, `$` removed), or None."""
    text = latex
    for _ in range(3):
        boxed = re.fullmatch(r"\s*\\boxed\{(.*)\}\s*\.?\s*", text, re.DOTALL)
        if not boxed:
            break
        text = boxed.group(1)
    text = re.sub(r"\\(?:text|textrm|mbox|mathrm)\{[^{}]*\}", "", text)
    text = re.sub(r"\\[$!,;: ]|\\(?:quad|qquad)\b|\s", "", text)
    text = _clean_latex(text)
    return text if _NUMERIC_RHS.fullmatch(text) else None


def _split_math(solution: str, settings: StepSettings) -> StepsResult:
    result = StepsResult()
    for sides in equation_clauses(solution):
        clause_text = solution[sides[0].start : sides[-1].end]
        if len(sides) < 2:
            result.drops.append(("empty_side", clause_text))
            continue
        rhs_latex = _numeric_rhs(sides[-1].text)
        if rhs_latex is None:
            result.drops.append(("rhs_not_numeric", clause_text))
            continue
        try:
            written = _number_value(latex_to_arithmetic(rhs_latex), settings)
        except LatexUnsupported:
            written = None
        if written is None:
            result.drops.append(("result_unparseable", clause_text))
            continue
        step, reason = _first_matching_side(sides[:-1], written, rhs_latex, settings)
        if step is None:
            result.drops.append((reason, clause_text))
            continue
        side, route, expression_text, expr, value = step
        operator = top_operator(expr, settings.pow_subtypes)
        result.steps.append(
            Step(
                index=len(result.steps),
                expression_text=expression_text,
                result_text=rhs_latex,
                char_start=side.start,
                char_end=sides[-1].end,
                line_index=_line_index(solution, side.start),
                route=route,
                value=value,
                operator=operator,
                label=label_for_operator(operator, settings.labels),
                source_text=side.text,
            )
        )
    return result


def _first_matching_side(sides: list[_Part], written: float, written_text: str, settings: StepSettings):
    """The first side that is arithmetic and evaluates to the written number.

    Returns ((side, route, expression_text, expr, value), None) or (None, reason); the reason
    is the most informative one seen (a mismatch beats "has variables").
    """
    reasons: list[str] = []
    for side in sides:
        for route, attempt in ((ROUTE_MATH_PATTERN, _pattern_attempt), (ROUTE_MATH_PARSER, _parser_attempt)):
            outcome = attempt(side.text, written, written_text, settings)
            if isinstance(outcome, str):
                reasons.append(outcome)
                if outcome in ("has_variables", "bare_number"):
                    break  # the side itself is not a computation; the parser would agree
                continue
            expression_text, expr, value = outcome
            return (side, route, expression_text, expr, value), None
    for preferred in ("value_mismatch", "not_a_number", "expression_timeout", "expression_worker_failed"):
        if preferred in reasons:
            return None, preferred
    if reasons and all(reason in ("has_variables", "bare_number") for reason in reasons):
        return None, "no_arithmetic_side"
    return None, "latex_unsupported"


def _pattern_attempt(latex: str, written: float, written_text: str, settings: StepSettings):
    if _VARIABLE_LATEX.search(latex):
        return "has_variables"  # Greek letters and subscripted names are variables, not numbers
    try:
        expression_text = latex_to_arithmetic(latex)
    except LatexUnsupported:
        return "latex_unsupported"
    return _arithmetic_attempt(expression_text, written, written_text, settings)


def _parser_attempt(latex: str, written: float, written_text: str, settings: StepSettings):
    try:
        parsed = parse_latex(_clean_latex(latex), settings.timeout_s, settings.max_length)
    except ExpressionError as exc:
        return "latex_unsupported" if exc.reason in ("syntax", "not_expression") else f"expression_{exc.reason}"
    if parsed.free_symbols:
        return "has_variables"
    # Printed back and re-parsed: a kept step's expression is always whitelist arithmetic.
    return _arithmetic_attempt(sympy.sstr(parsed, order="none"), written, written_text, settings)


def _arithmetic_attempt(expression_text: str, written: float, written_text: str, settings: StepSettings):
    try:
        expr = parse_expression(expression_text, settings.timeout_s, settings.max_length)
    except ExpressionError as exc:
        return "latex_unsupported" if exc.reason in ("unsafe", "syntax") else f"expression_{exc.reason}"
    if expr.free_symbols:
        return "has_variables"
    if expr.is_Number:
        return "bare_number"
    checked = _checked_expression(expression_text, written, written_text, settings)
    if isinstance(checked, str):
        return checked
    return (expression_text, *checked)


# --- public entry points ------------------------------------------------------------------------


def _solution_text(problem_row: dict) -> str:
    # Loader rows carry `solution`; a raw GSM8K row keeps its worked solution under `answer`.
    solution = problem_row.get("solution")
    if not solution and "<<" in str(problem_row.get("answer") or ""):
        solution = problem_row["answer"]
    return str(solution or "")


def _is_gsm8k(problem_row: dict, solution: str) -> bool:
    """GSM8K-style: calculator notes, the `#### answer` line, or a gsm8k source label."""
    return "<<" in solution or bool(_GSM8K_ANSWER_LINE.search(solution)) or str(problem_row.get("source") or "").lower() == "gsm8k"


def split_solution(problem_row: dict, settings: StepSettings) -> StepsResult:
    """The computation steps of one problem's gold solution, and what was dropped and why.

    GSM8K-style solutions take the annotation route, any other the MATH (LaTeX) route. A
    GSM8K solution without notes (about 1% of GSM8K train: algebra written in prose, with `$`
    as currency, not LaTeX) yields no steps and one `no_annotations` drop.
    """
    solution = _solution_text(problem_row)
    if _is_gsm8k(problem_row, solution):
        if "<<" not in solution:
            return StepsResult(steps=[], drops=[("no_annotations", solution[:200])])
        return _split_gsm8k(solution, settings)
    return _split_math(solution, settings)


def split_rows(rows: Iterable[dict], settings: StepSettings) -> SplitFrames:
    """Steps and drops of many problems as two frames (STEP_SCHEMA, DROP_SCHEMA)."""
    step_records: list[dict] = []
    drop_records: list[dict] = []
    for row in rows:
        pid = row.get("problem_id") or problem_id_of(str(row.get("problem") or row.get("question") or ""))
        family = "gsm8k" if _is_gsm8k(row, _solution_text(row)) else "math"
        outcome = split_solution(row, settings)
        for step in outcome.steps:
            step_records.append(
                {
                    "problem_id": pid,
                    "step_index": step.index,
                    "route": step.route,
                    "expression": step.expression_text,
                    "result": step.result_text,
                    "char_start": step.char_start,
                    "char_end": step.char_end,
                    "line_index": step.line_index,
                    "operator": step.operator,
                    "label": step.label,
                    "value": step.value,
                }
            )
        for reason, text in outcome.drops:
            drop_records.append({"problem_id": pid, "family": family, "reason": reason, "text": text})
    return SplitFrames(
        steps=pl.DataFrame(step_records, schema=STEP_SCHEMA),
        drops=pl.DataFrame(drop_records, schema=DROP_SCHEMA),
    )


def steps_frame(rows: Iterable[dict], settings: StepSettings) -> pl.DataFrame:
    """One row per kept step: problem_id, step_index, route, expression, result, char_start,
    char_end, line_index, operator (fine), label (C2), value."""
    return split_rows(rows, settings).steps
