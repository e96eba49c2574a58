"""Where each operand of a gold computation step comes from (the labels C3 learns).

Reads: one problem's text, its gold solution, its validated steps (stage 02's `steps` rows)
and, optionally, stage 00's focus rows (which problem token each solution token's row
attended to most). Writes nothing: `label_problem` returns the operands, and
`execute_chain` re-runs the steps from those operands. Time: well under a millisecond per
problem for the labelling; re-execution costs one bounded sympy call per step (~1 ms).

Every numeric literal of a step's expression is one operand, in the order written; the
step's expression with its literals replaced by `{0}`, `{1}`, ... is its *skeleton*, the form
the assembler (C4) fills back in. Each operand gets one provenance, tried in this order:

  PRIOR     it equals the result of an earlier step of the same problem (its computed value
            or its written, possibly rounded, result): a chain carries results forward, so
            this wins over a coincidental equal number in the text (counted as
            `prior_also_in_text`). Several earlier steps with that value: the latest.
  TEXT      it equals a number written in the problem (digits, `1,250`, `$4.50`, `50%` also as
            0.5, `3/4` also as 0.75, or an English number word such as "twenty-five").
  IMPLICIT  it equals the value of a word of `c4.word_to_number` present in the problem, or
            that value's reciprocal ("half" → 2 or 0.5, "%"/"percent" → 100 or 0.01).
  CONSTANT  it equals a `c4.domain_constants` value (60 → minutes_per_hour); when several
            share the value, the one whose unit words occur in the problem, else the first.
  UNEXPLAINED  none of the above (an operand such as the 1 in `1 - 0.2`): such a problem
            cannot be a C3 example — a pointer can only point at what exists.

A TEXT operand whose number is written several times in the problem needs one occurrence.
First the gold text decides when it can: the words of the step's solution line (4+ letters)
are compared with the words around each occurrence, and a unique best overlap wins. When
that ties, the teacher's attention decides (IAF tie-break): summed over the selected heads,
the attention weight of the solution-token rows that predict the literal's characters that
lands on each occurrence (stage 00 keeps each row's most-attended problem token). When
neither decides (no traces, or no row focused on any occurrence), the first occurrence not
yet used by this step is taken. `resolution` records which rule decided.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mycelium.expressions import ExpressionError, evaluate_number, parse_expression
from mycelium.steps import values_match

TEXT, PRIOR, IMPLICIT, CONSTANT, UNEXPLAINED, END = "TEXT", "PRIOR", "IMPLICIT", "CONSTANT", "UNEXPLAINED", "END"
# How a TEXT operand's occurrence was chosen.
SINGLE, GOLD_TEXT, IAF, FIRST_OCCURRENCE = "single", "gold_text", "iaf", "first_occurrence"

# A numeric literal of whitelist arithmetic (not part of a name such as x2).
_LITERAL = re.compile(r"(?<![A-Za-z_\d.])(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A number written in a problem: `1,250.50`, `48`, `.5`; a following `%` is part of it.
_MENTION = re.compile(r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?%)?|(?<![\w.])\.\d+(?:\s?%)?")
_FRACTION = re.compile(r"(?<![\w./])(\d+)\s*/\s*(\d+)(?![\w/])")
_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)?")
_LINE_WORD = re.compile(r"[a-z]{4,}")
_ANNOTATION = re.compile(r"<<[^<>]*>>")

# The English number words: the language's definition, not a tunable setting, so they live
# here and not in config.yaml (c4.word_to_number holds the implicit operands such as "half").
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
NUMBER_WORDS: dict[str, int] = {word: value for value, word in enumerate(_UNITS)} | _TENS | {"hundred": 100, "thousand": 1000, "million": 1_000_000}


@dataclass(frozen=True)
class Literal:
    """A numeric literal of a step's expression."""

    text: str
    value: float


@dataclass(frozen=True)
class Mention:
    """A number written in the problem text: its char span and every value it can stand for."""

    start: int
    end: int
    text: str
    values: tuple[float, ...]


@dataclass
class Operand:
    problem_id: str
    step_index: int
    operand_index: int
    value: float  # the value the operand contributes when the chain is re-executed
    literal: str  # as written in the gold expression
    provenance: str
    span_start: int | None = None  # TEXT / IMPLICIT: chars of the problem text
    span_end: int | None = None
    prior_step: int | None = None  # PRIOR: index of the earlier step
    word: str | None = None  # IMPLICIT
    constant: str | None = None  # CONSTANT
    resolution: str | None = None  # TEXT: single / gold_text / iaf / first_occurrence
    n_occurrences: int = 0  # TEXT: how many places in the problem write this number
    prior_also_in_text: bool = False


@dataclass(frozen=True)
class ProvenanceSettings:
    word_to_number: Mapping[str, float]
    domain_constants: Mapping[str, float]
    rel_tol: float  # value matching, as for a step's written result
    context_words: int  # words either side of an occurrence compared with the step's line
    timeout_s: float  # bounded sympy work when a chain is re-executed
    max_length: int


@dataclass
class FocusRows:
    """Stage 00's focus of one problem, all selected heads stacked: per row, the row's token
    span in the solution and the problem-text span it attended to most, with the weight."""

    char_end: np.ndarray
    focus_start: np.ndarray
    focus_end: np.ndarray
    focus_attn: np.ndarray


@dataclass
class ProblemLabels:
    operands: list[Operand] = field(default_factory=list)
    skeletons: list[str] = field(default_factory=list)  # one per step, in step order


# --- literals and skeletons ---------------------------------------------------------------------


def _strip_commas(expression: str) -> str:
    return _THOUSANDS_COMMA.sub("", expression)


def find_literals(expression: str) -> list[Literal]:
    """The numeric literals of whitelist arithmetic, in the order written."""
    return [Literal(m.group(), float(m.group())) for m in _LITERAL.finditer(_strip_commas(expression))]


def skeleton_of(expression: str) -> str:
    """`48/2+3` → `{0}/{1}+{2}`: the expression with each literal replaced by its slot."""
    counter = iter(range(1 << 30))
    return _LITERAL.sub(lambda _: f"{{{next(counter)}}}", _strip_commas(expression))


def fill_skeleton(skeleton: str, values: Sequence[float]) -> str:
    """Put numbers back into a skeleton: the text `parse_expression` reads (no eval here).

    Values are written with repr (shortest round-trip form); negative values in parentheses.
    """
    def number(value: float) -> str:
        text = repr(float(value))
        return f"({text})" if value < 0 else text

    return re.sub(r"\{(\d+)\}", lambda m: number(values[int(m.group(1))]), skeleton)


# --- numbers written in the problem -----------------------------------------------------------


def find_mentions(text: str) -> list[Mention]:
    """Every number the problem writes, with the values it can stand for, in text order."""
    mentions: list[Mention] = []
    for match in _FRACTION.finditer(text):
        numerator, denominator = int(match.group(1)), int(match.group(2))
        if denominator:
            mentions.append(Mention(match.start(), match.end(), match.group(), (numerator / denominator,)))
    for match in _MENTION.finditer(text):
        raw = match.group()
        digits = raw.rstrip("% ").replace(",", "")
        value = float(digits)  # validated by the pattern: digits, one dot
        values = (value, value / 100.0) if raw.endswith("%") else (value,)
        mentions.append(Mention(match.start(), match.start() + len(raw.rstrip("% ")), raw, values))
    for match in _WORD.finditer(text):
        value = _number_word_value(match.group().lower())
        if value is not None:
            mentions.append(Mention(match.start(), match.end(), match.group(), (float(value),)))
            continue
        # "three-day", "four-fifths": the number word inside a hyphenated compound.
        offset = match.start()
        for part in match.group().split("-"):
            if part.lower() in NUMBER_WORDS and "-" in match.group():
                mentions.append(Mention(offset, offset + len(part), part, (float(NUMBER_WORDS[part.lower()]),)))
            offset += len(part) + 1
    return sorted(mentions, key=lambda m: (m.start, m.end))


def _number_word_value(word: str) -> int | None:
    if word in NUMBER_WORDS:
        return NUMBER_WORDS[word]
    tens, _, unit = word.partition("-")
    if tens in _TENS and unit in NUMBER_WORDS and NUMBER_WORDS[unit] < 10:
        return _TENS[tens] + NUMBER_WORDS[unit]
    return None


def _close(a: float, b: float, written: str, rel_tol: float) -> bool:
    """Equal up to the rounding of a written result (GSM8K writes 10/3 as 3.33): for PRIOR."""
    return values_match(a, b, written, rel_tol) or values_match(b, a, written, rel_tol)


def _equal(a: float, b: float, rel_tol: float) -> bool:
    """Equal as written: a number in the problem and a literal are both exact (0.4 is not 0.5)."""
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=rel_tol)


# --- choosing among several occurrences ---------------------------------------------------------


def _context_words(text: str, start: int, end: int, n_words: int) -> set[str]:
    before = _LINE_WORD.findall(text[:start].lower())[-n_words:]
    after = _LINE_WORD.findall(text[end:].lower())[:n_words]
    return set(before) | set(after)


def _unique_best(scores: Sequence[float]) -> int | None:
    best = max(scores)
    if best <= 0 or sum(1 for s in scores if s == best) > 1:
        return None
    return int(np.argmax(scores))


def focus_scores(focus: FocusRows, literal_start: int, literal_end: int, mentions: Sequence[Mention]) -> list[float]:
    """Attention weight landing on each occurrence from the rows that predict the literal.

    A row predicts the token that starts where the row's token ends, so the rows predicting
    the literal's characters are those whose token ends inside [literal_start, literal_end).
    """
    rows = (focus.char_end >= literal_start) & (focus.char_end < literal_end)
    starts, ends, weights = focus.focus_start[rows], focus.focus_end[rows], focus.focus_attn[rows]
    return [float(weights[(starts < m.end) & (ends > m.start)].sum()) for m in mentions]


def _literal_spans(solution: str, step_start: int, step_end: int, literals: Sequence[Literal]) -> list[tuple[int, int] | None]:
    """Where each literal is written inside the step's span of the solution (in order)."""
    spans: list[tuple[int, int] | None] = []
    segment = solution[step_start:step_end]
    cursor = 0
    for literal in literals:
        found = None
        for match in re.finditer(r"\d[\d,]*\.?\d*|\.\d+", segment[cursor:]):
            try:
                written = float(match.group().replace(",", "").rstrip("."))
            except ValueError:
                continue
            if math.isclose(written, literal.value, rel_tol=1e-9, abs_tol=1e-12):
                found = (step_start + cursor + match.start(), step_start + cursor + match.end())
                cursor += match.end()
                break
        spans.append(found)
    return spans


def choose_occurrence(
    candidates: Sequence[Mention],
    problem_text: str,
    step_line: str,
    literal_span: tuple[int, int] | None,
    focus: FocusRows | None,
    used: set[int],
    context_words: int,
) -> tuple[Mention, str]:
    """Pick one occurrence of a number written several times; returns it and the rule used."""
    if len(candidates) == 1:
        return candidates[0], SINGLE
    line_words = set(_LINE_WORD.findall(step_line.lower()))
    overlap = [len(line_words & _context_words(problem_text, m.start, m.end, context_words)) for m in candidates]
    best = _unique_best(overlap)
    if best is not None:
        return candidates[best], GOLD_TEXT
    if focus is not None and literal_span is not None:
        best = _unique_best(focus_scores(focus, literal_span[0], literal_span[1], candidates))
        if best is not None:
            return candidates[best], IAF
    unused = [m for m in candidates if m.start not in used]
    return (unused or list(candidates))[0], FIRST_OCCURRENCE


# --- labelling one problem ------------------------------------------------------------------------


def _step_line(solution: str, step_start: int) -> str:
    line_start = solution.rfind("\n", 0, step_start) + 1
    line_end = solution.find("\n", step_start)
    line = solution[line_start : line_end if line_end >= 0 else len(solution)]
    return _ANNOTATION.sub(" ", line)


def _implicit(value: float, problem_text: str, settings: ProvenanceSettings) -> tuple[str, int, int] | None:
    lowered = problem_text.lower()
    found = []
    for word, word_value in settings.word_to_number.items():
        # "half" is ÷2 or ×0.5 and "percent" ÷100 or ×.01: the word's value or its reciprocal.
        if not any(math.isclose(value, v, rel_tol=settings.rel_tol) for v in (word_value, 1.0 / word_value)):
            continue
        # Inflections count too: "doubled", "doubles", "halves" (the stem before e/es/s/d/ed).
        pattern = r"%|\bpercent\b" if word == "percent" else _inflected(word)
        match = re.search(pattern, lowered)
        if match:
            found.append((match.start(), word, match.end()))
    if not found:
        return None
    start, word, end = min(found)
    return word, start, end


def _inflected(word: str) -> str:
    """A pattern for a word and its inflections: half/halves, double/doubled/doubles."""
    stem = word.rstrip("fe")
    ending = word[len(stem):]
    if not ending:
        return rf"\b{re.escape(word)}(?:s|es|d|ed)?\b"
    return rf"\b{re.escape(stem)}(?:{re.escape(ending)}|ves|es|s|d|ed)\b"


def _constant(value: float, problem_text: str, settings: ProvenanceSettings) -> str | None:
    names = [name for name, v in settings.domain_constants.items() if math.isclose(value, v, rel_tol=settings.rel_tol)]
    if not names:
        return None
    lowered = problem_text.lower()
    for name in names:
        units = [part.rstrip("s") for part in name.split("_per_")]
        if all(re.search(rf"\b{re.escape(unit)}", lowered) for unit in units):
            return name
    return names[0]


def label_problem(
    problem_id: str,
    problem_text: str,
    solution: str,
    steps: Sequence[Mapping],
    settings: ProvenanceSettings,
    focus: FocusRows | None = None,
) -> ProblemLabels:
    """Provenance of every operand of every step (steps in order, stage 02's columns:
    step_index, expression, result, value, char_start, char_end)."""
    mentions = find_mentions(problem_text)
    labels = ProblemLabels()
    earlier: list[Mapping] = []
    for step in steps:
        expression = str(step["expression"])
        literals = find_literals(expression)
        labels.skeletons.append(skeleton_of(expression))
        spans = _literal_spans(solution, int(step["char_start"]), int(step["char_end"]), literals)
        line = _step_line(solution, int(step["char_start"]))
        used: set[int] = set()
        for index, literal in enumerate(literals):
            operand = Operand(problem_id, int(step["step_index"]), index, literal.value, literal.text, UNEXPLAINED)
            text_matches = [m for m in mentions if any(_equal(v, literal.value, settings.rel_tol) for v in m.values)]
            prior = [
                s for s in earlier
                if _close(float(s["value"]), literal.value, literal.text, settings.rel_tol)
                or _close(_written(s), literal.value, literal.text, settings.rel_tol)
            ]
            if prior:
                operand.provenance, operand.prior_step = PRIOR, int(prior[-1]["step_index"])
                operand.prior_also_in_text = bool(text_matches)
            elif text_matches:
                chosen, rule = choose_occurrence(text_matches, problem_text, line, spans[index], focus, used, settings.context_words)
                used.add(chosen.start)
                value = next(v for v in chosen.values if _equal(v, literal.value, settings.rel_tol))
                operand.provenance, operand.value = TEXT, value
                operand.span_start, operand.span_end = chosen.start, chosen.end
                operand.resolution, operand.n_occurrences = rule, len(text_matches)
            elif (implicit := _implicit(literal.value, problem_text, settings)) is not None:
                operand.provenance = IMPLICIT
                operand.word, operand.span_start, operand.span_end = implicit
                word_value = float(settings.word_to_number[operand.word])
                operand.value = word_value if math.isclose(literal.value, word_value, rel_tol=settings.rel_tol) else 1.0 / word_value
            elif (constant := _constant(literal.value, problem_text, settings)) is not None:
                operand.provenance, operand.constant = CONSTANT, constant
                operand.value = float(settings.domain_constants[constant])
            labels.operands.append(operand)
        earlier.append(step)
    return labels


_PLAIN_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


def strip_number_text(text: str) -> str:
    """`$1,250.50` → `1250.50`: currency signs and thousands separators are not arithmetic."""
    return _THOUSANDS_COMMA.sub("", str(text)).replace("$", "").strip()


def is_plain_number(text: str) -> bool:
    return _PLAIN_NUMBER.fullmatch(text) is not None


def _written(step: Mapping) -> float:
    """A step's written result as a number (nan when it is not a plain number)."""
    text = strip_number_text(step.get("result") or "")
    return float(text) if is_plain_number(text) else math.nan  # validated digits: not eval


# --- re-executing the chain ---------------------------------------------------------------------------


def execute_chain(labels: ProblemLabels, steps: Sequence[Mapping], settings: ProvenanceSettings) -> list[float | None]:
    """Re-run the steps from their operands: PRIOR operands take the *recomputed* value of the
    step they point at, every other operand its own value. Returns each step's value (None
    where a step no longer evaluates to a number)."""
    by_step: dict[int, list[Operand]] = {}
    for operand in labels.operands:
        by_step.setdefault(operand.step_index, []).append(operand)
    computed: dict[int, float | None] = {}
    values: list[float | None] = []
    for step, skeleton in zip(steps, labels.skeletons, strict=True):
        index = int(step["step_index"])
        operands = sorted(by_step.get(index, []), key=lambda o: o.operand_index)
        inputs = [computed.get(o.prior_step) if o.provenance == PRIOR else o.value for o in operands]
        if any(v is None for v in inputs):
            value = None
        else:
            try:
                value = evaluate_number(parse_expression(fill_skeleton(skeleton, inputs), settings.timeout_s, settings.max_length), settings.timeout_s)
            except ExpressionError:
                value = None
        computed[index] = value
        values.append(value)
    return values


def provenance_counts(operands: Sequence[Operand]) -> dict[str, int]:
    return dict(Counter(o.provenance for o in operands))
