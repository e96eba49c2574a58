"""Final answers for evaluation: pull one out of a chain of thought, and check it against gold.

Reads: answer text — a model's generated solution for `extract_final_answer`, a predicted
and a gold answer string for the checkers. Writes nothing. Returns a string (or None) and
booleans; no checker ever raises on odd input, it says False.

Time: `check_numeric` and `check_hendrycks` are pure string work, microseconds per pair (a
whole eval set in well under a second). `check_math_verify` runs HuggingFace's math-verify
in a helper process: about a second once to start it, then a few milliseconds per pair
(more for symbolic answers); a pair that runs past `timeout_s` kills the helper, counts as
False, and the next call starts a fresh one.

What you should see: `extract_final_answer("... so the total is \\boxed{\\frac{1}{2}}.")` is
`\\frac{1}{2}`; `check_numeric("$1,000.00", "1000", rel_tol)` and
`check_numeric("0.5", "1/2", rel_tol)` are True. On MATH the two checkers agree on most
pairs and disagree where it matters: `check_math_verify("10.0", "10", ...)` and
`("\\sqrt{192}", "8\\sqrt{3}")` are True while `check_hendrycks` says False for both (it
compares normalised strings, not values); the other way round, `check_hendrycks("y=5",
"x=5")` is True (it drops any short `x=` prefix) while math-verify keeps the variables apart.
The evaluation report shows both columns.

Public API
----------
- `extract_final_answer(text) -> str | None`: the last `\\boxed{...}` (braces balanced), else
  the text after GSM8K's `####` (its first line), else what follows the last "The answer is",
  else the last number in the text; None when there is nothing.
- `numeric_value(text) -> fractions.Fraction | None`: a GSM8K-style answer as an exact number.
- `check_numeric(predicted, gold, rel_tol) -> bool`: GSM8K answers, compared as numbers.
- `hendrycks_normal_form(answer) -> str | None` and `check_hendrycks(predicted, gold) -> bool`:
  the MATH paper's normalised string comparison.
- `check_math_verify(predicted, gold, timeout_s) -> bool`: math-verify's parse + verify.

Safety
------
No answer text ever reaches Python's `eval`. `check_numeric` reads numbers with a fixed
regular grammar and `fractions.Fraction`; `check_hendrycks` only rewrites strings.
math-verify parses LaTeX with latex2sympy2_extended (an ANTLR grammar that builds sympy
objects, no eval) and plain-text arithmetic with sympy's `parse_expr`, which does eval — but
only on spans its own regular expression has matched, made of digits, `.`, spaces and
`+ - * / ^ × ÷ ( )`, which cannot name anything. On top of that, text holding a double
underscore is refused before it crosses into the helper, and the helper is a separate process
that can be killed, so `9^{9^{9}}` (a big-integer power that holds the GIL and ignores
signals) costs `timeout_s`, not the run.

math-verify's own timeouts use `signal.alarm`, which only works on a process's main thread
(it raises from a worker thread, e.g. under Prefect or Dask). They are switched off here
(`parsing_timeout=None`, `timeout_seconds=None`) and the helper process is the bound instead,
so `check_math_verify` is safe to call from any thread.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import re
from fractions import Fraction

from mycelium.datasets import extract_boxed_answer, extract_gsm8k_answer
from mycelium.expressions import (
    _HELPER_OPERATIONS,
    ExpressionError,
    _Helper,
    _helper_main,
)

# --- extracting the final answer ------------------------------------------------------------

_ANSWER_IS = re.compile(r"\b(?:the\s+)?(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
# The end of a sentence: a period followed by a space or the end (not the dot of `3.5`).
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
# A number as a model writes it: `1,250`, `-3`, `0.75`, `.5`. The sign is checked separately:
# the `-` of `5-3` is an operator, not part of `3`.
_WRITTEN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _strip_inline_math(text: str) -> str:
    """`$\\frac{1}{2}$.` -> `\\frac{1}{2}`: delimiters and markdown bold are not the answer."""
    text = text.strip().strip("*").strip()
    for opening, closing in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(opening) and text.endswith(closing) and len(text) > len(opening) + len(closing):
            text = text[len(opening) : -len(closing)].strip()
            break
    return text


def _answer_after_phrase(text: str) -> str | None:
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].lstrip()
    rest = rest.split("\n", 1)[0]
    rest = _SENTENCE_END.split(rest, maxsplit=1)[0]
    answer = _strip_inline_math(rest).rstrip(".").strip()
    return answer or None


def _last_number(text: str) -> str | None:
    matches = list(_WRITTEN_NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    number = last.group()
    before = text[last.start() - 1] if last.start() > 0 else ""
    if number.startswith("-") and (before.isalnum() or before in ")]}"):
        number = number[1:]  # `5-3`: the minus is subtraction, the number is 3
    return _THOUSANDS_COMMA.sub("", number)


def extract_final_answer(text: str) -> str | None:
    """The final answer of a generated solution, as written (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = extract_boxed_answer(text)
    if boxed:
        return boxed
    marked = extract_gsm8k_answer(text)
    if marked:
        # A model often keeps generating after `#### 72` (a new "Question: ..."): one line only.
        first_line = marked.splitlines()[0].strip().rstrip(".").strip()
        if first_line:
            return first_line
    phrased = _answer_after_phrase(text)
    if phrased:
        return phrased
    return _last_number(text)


# --- GSM8K: numbers ----------------------------------------------------------------------------

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_SIGNED = rf"-?{_NUMBER}"
# The number forms an answer may take once `_numeric_core` has cleaned it and its sign is off.
_MIXED_NUMBER = re.compile(r"(?P<whole>\d+)\\frac\{(?P<num>\d+)\}\{(?P<den>\d+)\}")  # 2\frac{1}{2}
_FRACTION_FORMS = (
    re.compile(rf"(?P<num>{_NUMBER})/(?P<den>{_SIGNED})"),
    re.compile(rf"\\frac\{{(?P<num>{_SIGNED})\}}\{{(?P<den>{_SIGNED})\}}"),
    re.compile(r"\\frac(?P<num>\d)(?P<den>\d)"),  # \frac12
)
_PLAIN = re.compile(_NUMBER)
_NUMBER_THEN_UNITS = re.compile(
    r"(?P<value>\d+\\frac\{\d+\}\{\d+\}|\\frac\{[^{}]*\}\{[^{}]*\}|\\frac\d\d"
    rf"|{_NUMBER}\s*/\s*{_SIGNED}|{_NUMBER})(?P<units>.*)",
    re.DOTALL,
)
# Words after the number are units ("10 dollars", "5 km/h", "12 m^2", "3 hours."), as long as
# no digit follows: "10 or 12" is not the answer 10. Words are separated by at least one space
# or slash, so the pattern cannot split one long word in exponentially many ways.
_UNIT_WORD = r"[A-Za-z][A-Za-z'’.]*(?:\^\{?[23]\}?|[²³])?"
_UNITS = re.compile(rf"\s*(?:{_UNIT_WORD}(?:[\s/]+{_UNIT_WORD})*)?\s*")
_TEXT_COMMAND = re.compile(r"\\(?:text|textrm|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_LATEX_SPACING = re.compile(r"\\[,!;: ]|\\q?quad\b|~")
_VARIABLE_PREFIX = re.compile(r"^[A-Za-z]\s*=\s*")  # "x = 5"


def _numeric_core(text: str) -> str:
    """Strip what is not the number: boxes, `$`, `%`, degrees, spacing, `x =`, thousands commas."""
    if "\\boxed" in text or "\\fbox" in text:
        text = extract_boxed_answer(text) or ""
    text = _TEXT_COMMAND.sub(lambda match: f" {match.group(1)} ", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.replace("−", "-")  # a Unicode minus, as chat models write it
    text = re.sub(r"\\\$|\$|€|£|¥|\\\(|\\\)", "", text)
    text = re.sub(r"\\?%|\^\{?\\circ\}?|°", "", text)
    text = _LATEX_SPACING.sub(" ", text)
    text = text.replace("{,}", "")  # 1{,}000
    text = _VARIABLE_PREFIX.sub("", text.strip())
    text = _THOUSANDS_COMMA.sub("", text)
    text = re.sub(r"^([-+])\s+", r"\1", text)  # "- 3" is -3
    text = text.lstrip("+")
    return text.strip().rstrip(".").strip()


def _fraction_of(number_text: str) -> Fraction:
    # The text has matched _SIGNED (digits, one dot, an optional minus): Fraction reads it
    # exactly, and nothing is evaluated. "10." is "10".
    return Fraction(number_text.rstrip(".") or "0")


def numeric_value(text: str) -> Fraction | None:
    """A GSM8K-style answer as an exact number, or None when it is not one number.

    `$1,000.00` -> 1000, `50%` -> 50 (the sign is dropped, not divided: GSM8K golds write
    percentages as the number), `10 dollars` -> 10, `\\frac{1}{2}`, `1/2`, `0.5` -> 1/2,
    `2\\frac{1}{2}` -> 5/2, `- 3` -> -3; `1,2`, `x+1`, `ten` -> None.
    """
    if not isinstance(text, str):
        return None
    core = _numeric_core(text)
    sign = -1 if core.startswith("-") else 1
    match = _NUMBER_THEN_UNITS.fullmatch(core[1:] if sign < 0 else core)
    if match is None or not _UNITS.fullmatch(match.group("units")):
        return None
    value_text = re.sub(r"\s+", "", match.group("value"))
    try:
        mixed = _MIXED_NUMBER.fullmatch(value_text)
        if mixed:
            return sign * (int(mixed["whole"]) + Fraction(int(mixed["num"]), int(mixed["den"])))
        for form in _FRACTION_FORMS:
            fraction = form.fullmatch(value_text)
            if fraction:
                return sign * _fraction_of(fraction["num"]) / _fraction_of(fraction["den"])
        if _PLAIN.fullmatch(value_text):
            return sign * _fraction_of(value_text)
    except (ZeroDivisionError, ValueError):
        # 1/0; or more digits than int() converts (Python caps it at 4300): not an answer.
        return None
    return None


def check_numeric(predicted: str, gold: str, rel_tol: float) -> bool:
    """Do the two answers hold the same number, within `rel_tol` (absolute near zero)?

    Not `steps.values_match`: that one grants a written result one unit of its last shown
    decimal (a note's `3.33` for 10/3), which between two answers would accept 2.24 for 2.25.
    """
    predicted_value = numeric_value(predicted)
    gold_value = numeric_value(gold)
    if predicted_value is None or gold_value is None:
        return False
    if predicted_value == gold_value:
        return True
    # Exact arithmetic on Fractions: no float overflow on a 300-digit answer.
    tolerance = Fraction(rel_tol)
    difference = abs(predicted_value - gold_value)
    return difference <= tolerance * max(abs(predicted_value), abs(gold_value)) or difference <= tolerance


# --- MATH: the Hendrycks normalised string comparison -------------------------------------------

_TRAILING_UNITS = re.compile(r"\\(?:text|textrm|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z\s.]*\}\s*(?:\^\{?[23]\}?)?\s*$")
_SQRT_SHORT = re.compile(r"\\sqrt\s*([^{\\\s\[])")  # \sqrt3 -> \sqrt{3}
_FRAC_TWO_SHORT = re.compile(r"\\frac([^{\\])([^{\\])")  # \frac12 -> \frac{1}{2}
_FRAC_SHORT_DENOMINATOR = re.compile(r"\\frac(\{[^{}]*\})([^{\\])")  # \frac{1}2
_FRAC_SHORT_NUMERATOR = re.compile(r"\\frac([^{\\])(\{)")  # \frac1{2}
_INTEGER_RATIO = re.compile(r"(-?)(\d+)/(\d+)")


def hendrycks_normal_form(answer: str) -> str | None:
    """The answer rewritten as in the MATH paper's equivalence check; None for no answer.

    Spaces, `\\left`/`\\right`, `\\!`, `\\$`, `\\%`, degrees and a trailing unit
    (`10 \\text{ cm}`) go; `\\dfrac`/`\\tfrac` become `\\frac`; `\\frac12` and `\\sqrt3` get
    their braces; `.5` becomes `0.5`; a whole answer `a/b` of integers becomes `\\frac{a}{b}`;
    a short `x=` prefix and a trailing `.` go. Like the paper's version, exactly the string
    `0.5` becomes `\\frac{1}{2}` (and no other decimal does), so its scores stay comparable.
    """
    if not isinstance(answer, str):
        return None
    text = answer.strip()
    if text.startswith(("\\boxed", "\\fbox")):
        text = extract_boxed_answer(text) or ""
    text = text.replace("\n", " ").replace("\\!", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = re.sub(r"\^\{\\circ\}|\^\\circ", "", text)
    text = text.replace("\\$", "").replace("$", "")
    text = text.strip().rstrip(".").strip()
    # A unit after a value (`10 \text{ cm}`, `4 \text{ inches}^2`); a lone `\text{odd}` or a
    # choice `\text{(A)}` is the answer itself and stays.
    while True:
        unit = _TRAILING_UNITS.search(text)
        if unit is None or not text[: unit.start()].strip():
            break
        text = text[: unit.start()].rstrip()
    text = text.replace("\\%", "").replace("%", "")
    text = re.sub(r"(?<!\d)\.(?=\d)", "0.", text)  # .5 -> 0.5, {.5} -> {0.5}
    # `x = 5` and `k=5`: the paper drops a left side of at most two characters.
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        text = sides[1]
    text = _SQRT_SHORT.sub(r"\\sqrt{\1}", text)
    text = re.sub(r"\s+", "", text)
    text = _FRAC_TWO_SHORT.sub(r"\\frac{\1}{\2}", text)
    text = _FRAC_SHORT_DENOMINATOR.sub(r"\\frac\1{\2}", text)
    text = _FRAC_SHORT_NUMERATOR.sub(r"\\frac{\1}\2", text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    ratio = _INTEGER_RATIO.fullmatch(text)
    if ratio:
        sign, numerator, denominator = ratio.groups()
        text = f"{sign}\\frac{{{numerator}}}{{{denominator}}}"
    text = text.rstrip(".")
    return text or None


def check_hendrycks(predicted: str, gold: str) -> bool:
    """Are the two answers the same string after `hendrycks_normal_form`? (Two empty answers
    are not a match.)"""
    predicted_form = hendrycks_normal_form(predicted)
    return predicted_form is not None and predicted_form == hendrycks_normal_form(gold)


# --- MATH: math-verify, in a killable helper process ----------------------------------------------

MATH_VERIFY_OPERATION = "math_verify"


def _as_boxed(answer: str) -> str:
    """math-verify finds LaTeX by its anchors; a bare answer goes into a box so that
    `\\frac{1}{2}` and `(1, 2)` are read as LaTeX (an interval), not skipped or read as `2`."""
    if "\\boxed" in answer or "\\fbox" in answer:
        return answer
    return f"\\boxed{{{_strip_inline_math(answer)}}}"


def _math_verify_unbounded(predicted: str, gold: str) -> bool:
    """parse + verify with math-verify's defaults; runs inside the helper process."""
    from math_verify import parse, verify

    # Timeouts off: the helper's kill is the bound (see the module docstring).
    gold_parsed = parse(_as_boxed(gold), parsing_timeout=None)
    predicted_parsed = parse(_as_boxed(predicted), parsing_timeout=None)
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=None))


def _math_verify_helper_main(request_fd: int, reply_fd: int) -> None:
    """Entry point of the math-verify helper: the expression helper's loop, one more operation."""
    # math-verify warns once per process that its timeouts are off; here that is on purpose.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Imported before "ready", so the first call's time is its own.
    importlib.import_module("math_verify")

    _HELPER_OPERATIONS[MATH_VERIFY_OPERATION] = _math_verify_unbounded
    _helper_main(request_fd, reply_fd)


# The expression helper's process (same protocol, time limit, fork handling), started on its
# own entry point: math-verify is not one of its operations, and importing it should not slow
# every expression helper down.
_MATH_VERIFY_HELPER = _Helper("mycelium.answers:_math_verify_helper_main", "the math-verify helper")
atexit.register(_MATH_VERIFY_HELPER.close)


def check_math_verify(predicted: str, gold: str, timeout_s: float) -> bool:
    """Does math-verify judge `predicted` equal to `gold`? False when it cannot tell, when
    either side is not text, and when the pair takes longer than `timeout_s` (the helper is
    then killed and restarted on the next call). Safe from any thread."""
    if not isinstance(predicted, str) or not isinstance(gold, str) or not predicted.strip() or not gold.strip():
        return False
    if "__" in predicted or "__" in gold:
        return False  # a dunder is never mathematics; such text does not even reach the helper
    try:
        return bool(_MATH_VERIFY_HELPER.call(MATH_VERIFY_OPERATION, (predicted, gold), predicted, timeout_s))
    except ExpressionError:
        return False
