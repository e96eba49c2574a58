"""C4 — the deterministic assembler: a skeleton plus operands becomes a number. No model.

Reads: a skeleton (an expression whose numeric literals are slots `{0}`, `{1}`, ...: the form
`mycelium.provenance.skeleton_of` writes, one of the C2 label defaults below, or one learned
from data such as `{0}*{1}/{2}`), the operands that fill it (each given by where its number
comes from: a span of the problem text, an earlier step, an implicit word, a domain constant
— what C3 points at), the problem text, the values of the steps computed so far, and the
`steps` and `c4` config sections. Writes nothing. Time: resolving an operand is a regex pass
over the problem text (microseconds); `assemble` and `execute` cost one round trip each to the
bounded sympy helper of `mycelium.expressions` (about a millisecond; a second more the first
time, while the helper starts, and again after a timeout).

What you should see: `execute("{0}/{1}", [48, 2], settings)` gives `24.0`;
`resolve_operand(text_operand(22, 24), problem, {}, settings)` on "Natalia sold clips to 48 of
her friends..." gives `48.0`; `implicit_operand("half")` gives 2.0 and
`implicit_operand("half", reciprocal=True)` 0.5; `default_skeletons("DIV")` is
`(Skeleton("{0}/{1}", 2),)`. Wrong arity, a span over no number, a PRIOR step not computed
yet, or an unknown word or constant raise a one-line `AssemblyError`; a skeleton that is not
arithmetic (`__import__('os')...`, `{0}.__class__`) is refused by the expression whitelist
(`ExpressionError`) and nothing of it runs; a result that is not a finite real number
(`{0}/{1}` with 1, 0; `sqrt({0})` of -4; `{0}**{1}**{2}` of 9, 9, 9) is None.

Operands (the assembler's input form; `provenance.Operand` is the labelled gold operand
that stage 03 writes, and `operand_from_label` turns one into this form):

  TEXT      a char span of the problem text; it reads the number written there with the rules
            of `provenance.find_mentions` (`1,250` is 1250, `$4.50` is 4.5, `3/4` is 0.75,
            "twenty-five" is 25). A percentage has two readings, "50%" as 50 or as 0.5: the
            operand says which (`percent_as_fraction`). The span may be wider or narrower than
            the number (a pointer works in tokens): an exact match wins, then the one number
            the span contains (a number inside a longer one, the 3 of `3/4`, does not count),
            then the one number it overlaps; no number, or several, is an error.
  PRIOR     the index of an earlier step (stage 02's step_index): that step's computed value.
  IMPLICIT  a word of `c4.word_to_number` ("half" → 2), or its reciprocal ("half" → 0.5).
  CONSTANT  a name of `c4.domain_constants` ("minutes_per_hour" → 60).
  END       C3's stop pointer, not a number: resolving it is an error.

Public API
----------
- `AssemblyError(MyceliumError)`
- `AssemblerSettings(timeout_s, max_length, word_to_number, domain_constants)`,
  `AssemblerSettings.from_config(cfg: MyceliumConfig) -> AssemblerSettings`
- `Operand(provenance, span_start, span_end, percent_as_fraction, prior_step, word,
  reciprocal, constant)`; shorthands `text_operand(span_start, span_end,
  percent_as_fraction=False)`, `prior_operand(step_index)`, `implicit_operand(word,
  reciprocal=False)`, `constant_operand(name)`, `end_operand()`
- `mention_at(problem_text, span_start, span_end) -> provenance.Mention`
- `resolve_operand(operand, problem_text, prior_values, settings) -> float`,
  `resolve_operands(operands, problem_text, prior_values, settings) -> list[float]`
- `operand_from_label(label: provenance.Operand, problem_text, settings) -> Operand`
- `Skeleton(text, arity)`, `DEFAULT_SKELETONS` (C2 label → tuple of Skeleton),
  `default_skeletons(label) -> tuple[Skeleton, ...]`, `skeleton_arity(skeleton) -> int`
- `assemble(skeleton, values, settings) -> sympy.Expr`
- `execute(skeleton, values, settings) -> float | None`
- `execute_slot(skeleton, operands, problem_text, prior_values, settings) -> float | None`
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import sympy

from mycelium.config import MyceliumConfig
from mycelium.errors import MyceliumError
from mycelium.expressions import ExpressionError, evaluate_number, parse_expression
from mycelium.provenance import (
    CONSTANT,
    END,
    IMPLICIT,
    PRIOR,
    TEXT,
    Mention,
    fill_skeleton,
    find_mentions,
)
from mycelium.provenance import Operand as LabelledOperand

PREVIEW_CHARS = 40  # how much of the problem text an error message quotes
# A slot of a skeleton; the same pattern `provenance.fill_skeleton` fills, so what is counted
# here is exactly what gets filled.
_PLACEHOLDER = re.compile(r"\{(\d+)\}")
# Evaluation failures that are about the helper, not the values: they are passed on.
_RESOURCE_FAILURES = ("timeout", "worker_failed")


class AssemblyError(MyceliumError):
    """A skeleton and its operands that cannot be put together: wrong arity, a malformed
    slot, or an operand that points at nothing. The message is one line."""


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AssemblerSettings:
    timeout_s: float  # steps.expression_timeout_s: hard limit per parse and per evaluation
    max_length: int  # steps.max_expression_length: longest filled expression parsed
    word_to_number: Mapping[str, float]  # c4.word_to_number
    domain_constants: Mapping[str, float]  # c4.domain_constants

    @classmethod
    def from_config(cls, cfg: MyceliumConfig) -> AssemblerSettings:
        return cls(
            timeout_s=cfg.steps.expression_timeout_s,
            max_length=cfg.steps.max_expression_length,
            word_to_number=dict(cfg.c4.word_to_number),
            domain_constants=dict(cfg.c4.domain_constants),
        )


# --- operands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Operand:
    """Where one operand's number comes from; only the fields of its provenance are read."""

    provenance: str  # TEXT, PRIOR, IMPLICIT, CONSTANT (or END, which has no value)
    span_start: int | None = None  # TEXT: chars [span_start, span_end) of the problem text
    span_end: int | None = None
    percent_as_fraction: bool = False  # TEXT: read "50%" as 0.5 instead of 50
    prior_step: int | None = None  # PRIOR: step_index of the earlier step
    word: str | None = None  # IMPLICIT: a key of c4.word_to_number
    reciprocal: bool = False  # IMPLICIT: 1 / the word's value ("half" as 0.5)
    constant: str | None = None  # CONSTANT: a key of c4.domain_constants


def text_operand(span_start: int, span_end: int, percent_as_fraction: bool = False) -> Operand:
    return Operand(TEXT, span_start=span_start, span_end=span_end, percent_as_fraction=percent_as_fraction)


def prior_operand(step_index: int) -> Operand:
    return Operand(PRIOR, prior_step=step_index)


def implicit_operand(word: str, reciprocal: bool = False) -> Operand:
    return Operand(IMPLICIT, word=word, reciprocal=reciprocal)


def constant_operand(name: str) -> Operand:
    return Operand(CONSTANT, constant=name)


def end_operand() -> Operand:
    return Operand(END)


def _preview(text: str) -> str:
    one_line = " ".join(str(text).split())
    if len(one_line) > PREVIEW_CHARS:
        one_line = one_line[:PREVIEW_CHARS] + "..."
    return repr(one_line)


def _maximal(mentions: Sequence[Mention]) -> list[Mention]:
    """Drop mentions that lie inside another one (the 3 and the 4 of `3/4`)."""
    return [
        m for m in mentions
        if not any(o is not m and o.start <= m.start and m.end <= o.end and (o.end - o.start) > (m.end - m.start) for o in mentions)
    ]


def mention_at(problem_text: str, span_start: int, span_end: int) -> Mention:
    """The number written at chars [span_start, span_end) of the problem, with its readings.

    An exact match wins; else the one number the span contains; else the one number it
    overlaps (numbers inside a longer number do not count). Raises AssemblyError otherwise.
    """
    where = f"TEXT span {span_start}..{span_end}"
    if not (isinstance(span_start, int) and isinstance(span_end, int)) or isinstance(span_start, bool) or isinstance(span_end, bool):
        raise AssemblyError(f"{where}: the span must be two character offsets")
    if not 0 <= span_start < span_end <= len(problem_text):
        raise AssemblyError(f"{where}: not a non-empty span inside the {len(problem_text)}-character problem text")
    shown = _preview(problem_text[span_start:span_end])
    mentions = find_mentions(problem_text)
    exact = [m for m in mentions if (m.start, m.end) == (span_start, span_end)]
    if exact:
        return _maximal(exact)[0]
    for candidates in (
        [m for m in mentions if span_start <= m.start and m.end <= span_end],
        [m for m in mentions if m.start < span_end and span_start < m.end],
    ):
        candidates = _maximal(candidates)
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            written = ", ".join(repr(m.text) for m in candidates)
            raise AssemblyError(f"{where} ({shown}) covers several numbers ({written}); point at one")
    raise AssemblyError(f"{where} ({shown}) holds no number")


def _is_percentage(mention: Mention) -> bool:
    return mention.text.rstrip().endswith("%")


def _text_value(operand: Operand, problem_text: str) -> float:
    if operand.span_start is None or operand.span_end is None:
        raise AssemblyError("TEXT operand without a span (span_start and span_end are needed)")
    mention = mention_at(problem_text, operand.span_start, operand.span_end)
    if not operand.percent_as_fraction:
        return mention.values[0]
    if not _is_percentage(mention):
        raise AssemblyError(f"TEXT span {operand.span_start}..{operand.span_end} ({mention.text!r}) is not a percentage; it has no fraction reading")
    # find_mentions lists a percentage's readings as (as written, as a fraction).
    return mention.values[-1]


def _prior_value(operand: Operand, prior_values: Mapping[int, float | None] | Sequence[float | None]) -> float:
    step = operand.prior_step
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise AssemblyError(f"PRIOR step index must be an integer >= 0, got {step!r}")
    computed = prior_values if isinstance(prior_values, Mapping) else dict(enumerate(prior_values))
    value = computed.get(step)
    if value is None or not math.isfinite(value):
        known = sorted(k for k, v in computed.items() if v is not None and math.isfinite(v))
        raise AssemblyError(f"PRIOR step {step} has no computed value yet (computed steps: {known})")
    return float(value)


def _implicit_value(operand: Operand, settings: AssemblerSettings) -> float:
    word = (operand.word or "").lower()
    if word not in settings.word_to_number:
        raise AssemblyError(f"IMPLICIT word {operand.word!r} is not in c4.word_to_number ({sorted(settings.word_to_number)})")
    value = float(settings.word_to_number[word])
    if not operand.reciprocal:
        return value
    if value == 0:
        raise AssemblyError(f"IMPLICIT word {word!r} has value 0; it has no reciprocal")
    return 1.0 / value


def _constant_value(operand: Operand, settings: AssemblerSettings) -> float:
    if operand.constant not in settings.domain_constants:
        raise AssemblyError(f"CONSTANT {operand.constant!r} is not in c4.domain_constants ({sorted(settings.domain_constants)})")
    return float(settings.domain_constants[operand.constant])


def resolve_operand(
    operand: Operand,
    problem_text: str,
    prior_values: Mapping[int, float | None] | Sequence[float | None],
    settings: AssemblerSettings,
) -> float:
    """The number an operand stands for. `prior_values` maps step_index to the value computed
    for that step (a list is indexed by position). Raises AssemblyError when it points at
    nothing."""
    if operand.provenance == TEXT:
        return _text_value(operand, problem_text)
    if operand.provenance == PRIOR:
        return _prior_value(operand, prior_values)
    if operand.provenance == IMPLICIT:
        return _implicit_value(operand, settings)
    if operand.provenance == CONSTANT:
        return _constant_value(operand, settings)
    if operand.provenance == END:
        raise AssemblyError("END marks the end of a slot's operands; it has no value")
    raise AssemblyError(f"unknown provenance {operand.provenance!r}; expected one of {[TEXT, PRIOR, IMPLICIT, CONSTANT]}")


def resolve_operands(
    operands: Sequence[Operand],
    problem_text: str,
    prior_values: Mapping[int, float | None] | Sequence[float | None],
    settings: AssemblerSettings,
) -> list[float]:
    return [resolve_operand(operand, problem_text, prior_values, settings) for operand in operands]


def operand_from_label(label: LabelledOperand, problem_text: str, settings: AssemblerSettings) -> Operand:
    """The pointer form of a labelled gold operand (stage 03's `c3_operands` row), with the
    reading its value says: "50%" labelled 0.5 is read as a fraction, "half" labelled 0.5 as
    the reciprocal. Raises AssemblyError for an UNEXPLAINED operand (it points at nothing)."""
    if label.provenance == TEXT:
        mention = mention_at(problem_text, label.span_start, label.span_end)
        as_fraction = _is_percentage(mention) and not math.isclose(label.value, mention.values[0])
        return text_operand(label.span_start, label.span_end, as_fraction)
    if label.provenance == PRIOR:
        return prior_operand(label.prior_step)
    if label.provenance == IMPLICIT:
        word_value = _implicit_value(implicit_operand(label.word), settings)
        return implicit_operand(label.word, reciprocal=not math.isclose(label.value, word_value))
    if label.provenance == CONSTANT:
        return constant_operand(label.constant)
    raise AssemblyError(f"operand {label.operand_index} of step {label.step_index} of problem {label.problem_id} is {label.provenance}: nothing to point at")


# --- skeletons -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skeleton:
    text: str  # e.g. `{0}/{1}`
    arity: int  # how many operands fill it


def skeleton_arity(skeleton: str) -> int:
    """The number of distinct slots; they must be exactly {0} .. {n-1}, and every brace must
    belong to a slot. Raises AssemblyError otherwise."""
    if not isinstance(skeleton, str):
        raise AssemblyError(f"a skeleton is text, got a {type(skeleton).__name__}")
    slots = sorted({int(index) for index in _PLACEHOLDER.findall(skeleton)})
    if slots != list(range(len(slots))):
        raise AssemblyError(f"skeleton {_preview(skeleton)} has slots {slots}; they must be 0..n-1 with none missing")
    if "{" in _PLACEHOLDER.sub("", skeleton) or "}" in _PLACEHOLDER.sub("", skeleton):
        raise AssemblyError(f"skeleton {_preview(skeleton)} has a brace that is not a slot like {{0}}")
    return len(slots)


def _skeletons(*texts: str) -> tuple[Skeleton, ...]:
    # The arity is counted from the text, never typed by hand, so the two cannot disagree.
    return tuple(Skeleton(text, skeleton_arity(text)) for text in texts)


# The default skeleton(s) of each C2 label (config `c2.labels`). Each one, filled with values
# of its operation's domain, parses to a tree whose root `expressions.operation_label` maps
# back to the label (tested); HIGH_POW's exponent must then be an integer >= 4, as that label
# means. OTHER (cube roots, floors, exponentials, ...) has no single form: only a skeleton
# learned from data can fill it.
DEFAULT_SKELETONS: dict[str, tuple[Skeleton, ...]] = {
    "ADD": _skeletons("{0}+{1}"),
    "SUB": _skeletons("{0}-{1}"),
    "MUL": _skeletons("{0}*{1}"),
    "DIV": _skeletons("{0}/{1}"),
    "SQRT": _skeletons("sqrt({0})"),
    "SQUARE": _skeletons("{0}**2"),
    "CUBE": _skeletons("{0}**3"),
    "HIGH_POW": _skeletons("{0}**{1}"),
    "SIN": _skeletons("sin({0})"),
    "COS": _skeletons("cos({0})"),
    "TAN": _skeletons("tan({0})"),
    "LOG": _skeletons("log({0})"),
    "FACTORIAL": _skeletons("factorial({0})"),
    "MOD": _skeletons("Mod({0},{1})"),
    "OTHER": (),
}


def default_skeletons(label: str) -> tuple[Skeleton, ...]:
    if label not in DEFAULT_SKELETONS:
        raise AssemblyError(f"C2 label {label!r} has no default skeletons; known labels: {list(DEFAULT_SKELETONS)}")
    return DEFAULT_SKELETONS[label]


# --- assembling and executing -------------------------------------------------------------------


def _checked_values(skeleton: str, values: Sequence[float]) -> list[float]:
    arity = skeleton_arity(skeleton)
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise AssemblyError(f"values for skeleton {_preview(skeleton)} must be a sequence of numbers, got a {type(values).__name__}")
    values = list(values)
    if len(values) != arity:
        raise AssemblyError(f"skeleton {_preview(skeleton)} takes {arity} operand(s), got {len(values)}")
    checked = []
    for index, value in enumerate(values):
        # Only real numbers are written into the text (never a string, which could smuggle
        # text past the slot); inf and nan have no arithmetic spelling.
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise AssemblyError(f"operand {index} of skeleton {_preview(skeleton)} is {value!r}, not a finite number")
        checked.append(float(value))
    return checked


def assemble(skeleton: str, values: Sequence[float], settings: AssemblerSettings) -> sympy.Expr:
    """Fill the skeleton's slots with `values` and parse the result (bounded, whitelisted).

    Raises AssemblyError (wrong arity, malformed slots, a value that is not a finite number:
    all checked before anything is parsed) or ExpressionError (the filled text is not safe
    arithmetic, or parsing ran past settings.timeout_s)."""
    checked = _checked_values(skeleton, values)
    return parse_expression(fill_skeleton(skeleton, checked), settings.timeout_s, settings.max_length)


def execute(skeleton: str, values: Sequence[float], settings: AssemblerSettings) -> float | None:
    """The value of the filled skeleton; None when it is not a finite real number (a division
    by zero, the square root of a negative, an overflow). Raises like `assemble`, and
    ExpressionError when evaluation runs past settings.timeout_s."""
    expression = assemble(skeleton, values, settings)
    try:
        return evaluate_number(expression, settings.timeout_s)
    except ExpressionError as error:
        if error.reason in _RESOURCE_FAILURES:
            raise
        # The skeleton parsed, so the failure is sympy's on these values (Mod by zero, the
        # factorial of a negative integer): the step has no number, like a division by zero.
        return None


def execute_slot(
    skeleton: str,
    operands: Sequence[Operand],
    problem_text: str,
    prior_values: Mapping[int, float | None] | Sequence[float | None],
    settings: AssemblerSettings,
) -> float | None:
    """Resolve the operands, then execute the skeleton with them (one step of a chain)."""
    skeleton_arity(skeleton)  # a malformed skeleton is reported before the operands
    return execute(skeleton, resolve_operands(operands, problem_text, prior_values, settings), settings)
