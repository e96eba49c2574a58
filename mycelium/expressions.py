"""Safe arithmetic parsing, bounded evaluation, and the operator label of a step.

Reads: text (a GSM8K calculator note, a LaTeX fragment converted by `mycelium.steps`, a model's
output). Writes nothing. Time: about a millisecond per expression once the helper process is
up (about a second to start it, once per process and again after each timeout).

What you should see: `parse_expression("48/2", timeout_s, max_length)` gives the unevaluated
tree `Mul(48, Pow(2, -1))`, `evaluate_number` on it gives `24.0`, `top_operator` says `div` and
`operation_label` says `DIV`. Text that is not plain arithmetic (`__import__('os')...`,
`x.real`, `lambda: 0`, `[1]`, `f"..."`, `a = 1`) is refused with an `ExpressionError` before
anything is parsed, and nothing of it runs.

Public API
----------
- `parse_expression(text, timeout_s, max_length) -> sympy.Expr`
- `parse_latex(latex, timeout_s, max_length) -> sympy.Expr` (latex2sympy2_extended, same bounds)
- `evaluate_number(expr, timeout_s) -> float | None` (None: not a finite real number)
- `top_operator(expr, pow_subtypes) -> str` (a fine operator, see FINE_OPERATORS)
- `operation_label(expr, labels) -> str` and `label_for_operator(operator, labels) -> str`
- `ExpressionError(MyceliumError)` with `.reason` in ERROR_REASONS and a one-line message.

Safety, in three layers
-----------------------
1. The raw text is checked by a whitelist tokenizer: numbers, the operators + - * / // ** ^ % !,
   parentheses, commas inside function calls, the names in ALLOWED_FUNCTIONS/ALLOWED_CONSTANTS
   and single letters. Dunders, quotes, brackets, `;`, `=`, `\\`, attribute dots, `lambda`,
   `import` and every other name are refused with a reason. The text handed on is rebuilt from
   these tokens, never the raw string.
2. sympy's parse_expr pipeline (`stringify_expr` -> an evaluate=False AST transform ->
   `eval_expr`), with dictionaries that hold only the allowed names and an empty
   `__builtins__`. The generated Python AST is walked before it is compiled: only arithmetic
   nodes, calls of whitelisted names and number constants may appear. This is parse_expr's own
   code path; it is spelled out here only so that `%` and `factorial`/`Mod`/`floor`/... keep
   their structure too (parse_expr(evaluate=False) would fold `10 % 3` to `1`).
3. Everything sympy does — parsing, LaTeX conversion, evaluation — runs in one helper process
   with a hard per-call limit. A thread cannot be stopped: `9**9**9**9` spends its time in
   CPython's big-integer power, which holds the GIL and never checks for signals, so neither a
   thread nor SIGALRM can interrupt it. A process can be killed. It is one long-lived process
   (not one per expression) so a call costs a pipe round trip, not a sympy import; it is
   killed and replaced after a timeout. It is started with subprocess (fork+exec), not
   multiprocessing, so it works from threads, daemonic Dask/multiprocessing workers and
   processes that later fork (a forked child starts its own helper).

Trees come back from the helper pickled and are unpickled under `evaluate(False)`, so the
operator structure survives the trip (a plain unpickle would rebuild `Add(10, -4)` as `6`).

Fine operators and C2 labels
----------------------------
`top_operator` looks at the root of the tree (evaluate=False trees: `a - b` is
`Add(a, Mul(-1, b))`, `a/b` is `Mul(a, Pow(b, -1))`):

- Add: `sub` when at least one term is negative (a negative number, or a term with a negative
  coefficient such as `Mul(-1, b)`) and at least one is not; otherwise `add` (so `-3 + -4`,
  all terms negative, is an addition of negatives).
- Mul: a lone -1 times one factor is `neg` (unary minus). Otherwise `div` when some factor is a
  division: a Pow with a negative numeric exponent, or a non-integer Rational (latex2sympy
  folds `\\frac{1}{100}` to `1/100`); otherwise `mul`.
- Pow, by its exponent once folded to an exact rational (only + - * / of numbers are folded;
  anything else, e.g. `2**(2**2)` or `2**x`, is symbolic): 1/2 `sqrt`, 2 `square`, 3 `cube`,
  -1 `inverse`, integer >= 4 `high_pow`, integer <= -2 `neg_pow`, 1/n with n >= 3 `nth_root`,
  any other rational (3/2, -1/2, 2/3, a decimal like 1.5) `frac_pow`; a symbolic exponent, and
  the degenerate exponents 0 and 1, `pow_general`. A subtype missing from `pow_subtypes`
  becomes `pow_general` (or `pow` if that is missing too), so config decides the split.
- Functions: sin, cos, tan, log (log and ln), exp, factorial, mod (Mod and %), abs, floor,
  ceiling; other functions `function`. `a // b` is parsed as floor(a/b), and a floor whose
  argument is a division is `floor_div`.
- Leaves: an integer or float is `number`, a non-integer Rational `div` (p/q), a symbol
  `symbol`, pi/E `constant`.

`label_for_operator` maps these onto the C2 labels (config `c2.labels`): add ADD; sub, neg SUB;
mul MUL; div, inverse, floor_div DIV; sqrt SQRT; square SQUARE; cube CUBE; high_pow HIGH_POW; sin SIN;
cos COS; tan TAN; log LOG; factorial FACTORIAL; mod MOD; everything else (neg_pow, frac_pow,
nth_root — cube roots included —, pow_general, exp, abs, floor, ceiling, number, symbol,
constant, function) OTHER. A label missing from `labels` becomes OTHER.
"""

from __future__ import annotations

import ast
import atexit
import math
import os
import pickle
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, ClassVar

import sympy
from sympy.core.parameters import evaluate as sympy_evaluate
from sympy.parsing.sympy_parser import (
    EvaluateFalseTransformer,
    auto_number,
    convert_xor,
    eval_expr,
    factorial_notation,
    stringify_expr,
)

from mycelium.errors import ConfigError, MyceliumError

# --- errors -----------------------------------------------------------------------------------

ERROR_REASONS = (
    "too_long",      # longer than max_length
    "unsafe",        # refused by the whitelist (dunder, attribute, lambda, import, quotes, ...)
    "syntax",        # allowed tokens that do not form an expression (or a tuple, or an equation)
    "not_expression",  # parsed, but not a sympy expression (e.g. a LaTeX set or relation)
    "timeout",       # the helper process ran past timeout_s and was killed
    "worker_failed",  # the helper process died (out of memory, crash)
)
PREVIEW_CHARS = 60  # how much of the offending text an error message shows


class ExpressionError(MyceliumError):
    """Text that cannot be parsed or evaluated safely; `reason` is one of ERROR_REASONS."""

    def __init__(self, reason: str, text: str, detail: str):
        self.reason = reason
        self.text = text
        self.detail = detail
        super().__init__(f"expression {_preview(text)}: {detail}")

    def __reduce__(self):
        # Picklable with its three fields (Prefect and Dask ship exceptions between processes).
        return (ExpressionError, (self.reason, self.text, self.detail))


def _preview(text: str) -> str:
    one_line = " ".join(str(text).split())
    if len(one_line) > PREVIEW_CHARS:
        one_line = one_line[:PREVIEW_CHARS] + "..."
    return repr(one_line)


# --- the whitelist ----------------------------------------------------------------------------

ALLOWED_FUNCTIONS: dict[str, Callable] = {
    "sqrt": sympy.sqrt,
    "cbrt": sympy.cbrt,
    "root": sympy.root,
    "exp": sympy.exp,
    "log": sympy.log,
    "ln": sympy.log,
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "factorial": sympy.factorial,
    "Mod": sympy.Mod,
    "Abs": sympy.Abs,
    "floor": sympy.floor,
    "ceiling": sympy.ceiling,
    "Rational": sympy.Rational,
}
ALLOWED_CONSTANTS: dict[str, sympy.Expr] = {"pi": sympy.pi, "E": sympy.E}
# Every single letter is a plain Symbol (so `S`, `N`, `O`, `I`, `Q` never reach sympy's own
# objects of those names), except E, Euler's number.
SINGLE_LETTER_SYMBOLS: dict[str, sympy.Symbol] = {
    letter: sympy.Symbol(letter)
    for letter in "abcdefghijklmnopqrstuvwxyzABCDFGHIJKLMNOPQRSTUVWXYZ"
}
# Names the parse_expr transformations emit in the generated code.
_GENERATED_NAMES: dict[str, Any] = {
    "Integer": sympy.Integer,
    "Float": sympy.Float,
    "Add": sympy.Add,
    "Mul": sympy.Mul,
    "Pow": sympy.Pow,
}
# Calls that get evaluate=False, so that e.g. factorial(5) stays factorial(5), not 120, and
# factorial(10**9) is not computed while parsing. Rational has no evaluate switch.
_UNEVALUATED_CALLS = frozenset(ALLOWED_FUNCTIONS) - {"Rational"} | {"Add", "Mul", "Pow"}

_TOKEN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>\*\*|//|[-+*/^%(),!])"
)
# A thousands separator: a comma between a digit and exactly three digits ("1,250,000").
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A dot that is not part of a number: `x.real`, `(3).real`, `3.real`, `a . b`.
_ATTRIBUTE_DOT = re.compile(r"(?<!\d)\.(?!\d)|\.(?=[A-Za-z_])")
_FORBIDDEN_SNIPPETS = (
    ("__", "a double underscore"),
    ("'", "a quote"),
    ('"', "a quote"),
    ("`", "a backquote"),
    ("[", "a bracket"),
    ("]", "a bracket"),
    ("{", "a brace"),
    ("}", "a brace"),
    (";", "a semicolon"),
    ("=", "an '=' (equations and assignments are not expressions)"),
    ("\\", "a backslash"),
    ("@", "an '@'"),
    ("!!", "a double factorial"),
)
_FORBIDDEN_WORDS = re.compile(r"\b(lambda|import|exec|eval|open|getattr|globals|locals|builtins)\b")


def _strip_thousands_separators(text: str) -> str:
    """Drop commas that group digits in threes, except inside a function call's parentheses.

    `1,250*4` means 1250*4; `Mod(1000,300)` keeps its argument comma. A comma left over outside
    a call (`1,2`, `(3, 4)`) is refused later, so a tuple is never accepted silently.
    """
    call_depths = _call_paren_mask(text)
    kept = []
    for position, char in enumerate(text):
        if char == "," and not call_depths[position] and _THOUSANDS_COMMA.match(text, position):
            continue
        kept.append(char)
    return "".join(kept)


def _call_paren_mask(text: str) -> list[bool]:
    """For each character: is its innermost enclosing parenthesis a function call's?"""
    stack: list[bool] = []
    mask = []
    for position, char in enumerate(text):
        if char == "(":
            before = text[:position].rstrip()
            stack.append(bool(before) and (before[-1].isalnum() or before[-1] == "_") and not before[-1].isdigit())
        elif char == ")" and stack:
            stack.pop()
        mask.append(bool(stack) and stack[-1])
    return mask


def _safe_tokens(text: str, max_length: int) -> str:
    """Check `text` against the whitelist; return it rebuilt from its tokens, or raise."""
    if len(text) > max_length:
        raise ExpressionError("too_long", text, f"longer than {max_length} characters")
    for snippet, what in _FORBIDDEN_SNIPPETS:
        if snippet in text:
            raise ExpressionError("unsafe", text, f"contains {what}")
    word = _FORBIDDEN_WORDS.search(text)
    if word:
        raise ExpressionError("unsafe", text, f"contains the keyword or builtin {word.group(1)!r}")
    if _ATTRIBUTE_DOT.search(text):
        raise ExpressionError("unsafe", text, "contains a '.' that is not part of a number (attribute access)")
    cleaned = _strip_thousands_separators(text)
    call_mask = _call_paren_mask(cleaned)
    pieces: list[str] = []
    position = 0
    while position < len(cleaned):
        match = _TOKEN.match(cleaned, position)
        if match is None:
            raise ExpressionError("unsafe", text, f"character {cleaned[position]!r} is not allowed")
        kind, token = match.lastgroup, match.group()
        if kind == "name" and token not in ALLOWED_FUNCTIONS and token not in ALLOWED_CONSTANTS and token not in SINGLE_LETTER_SYMBOLS:
            raise ExpressionError("unsafe", text, f"name {token!r} is not in the whitelist")
        if kind == "op" and token == "," and not call_mask[position]:
            raise ExpressionError("syntax", text, "a comma outside a function call (a tuple, or a misplaced thousands separator)")
        if kind == "number":
            token = _normalise_number(token)
        if kind != "space":
            # No space before '!': sympy's factorial notation needs `5!`, not `5 !`.
            if token == "!" and pieces:
                pieces[-1] += "!"
            else:
                pieces.append(token)
        position = match.end()
    if not pieces:
        raise ExpressionError("syntax", text, "is empty")
    # Tokens joined by spaces: juxtaposed tokens such as `3j` or `0x10` can never fuse into a
    # Python literal; they become a syntax error instead.
    return " ".join(pieces)


def _normalise_number(token: str) -> str:
    """`007` -> `7`, `00.5` -> `0.5`: Python refuses leading zeros on integers."""
    mantissa, marker, exponent = _split_exponent(token)
    whole, dot, fraction = mantissa.partition(".")
    if whole:
        whole = whole.lstrip("0") or "0"
    return f"{whole}{dot}{fraction}{marker}{exponent}"


def _split_exponent(token: str) -> tuple[str, str, str]:
    match = re.search(r"[eE]", token)
    if match is None:
        return token, "", ""
    return token[: match.start()], match.group(), token[match.end():]


class _KeepStructure(EvaluateFalseTransformer):
    """sympy's evaluate=False transform, also keeping `%` (Mod) and the whitelisted calls."""

    operators: ClassVar[dict] = {**EvaluateFalseTransformer.operators, ast.Mod: "Mod"}
    functions = tuple(sorted(_UNEVALUATED_CALLS))

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        """`a // b` (GSM8K writes `560//10`) becomes floor(a/b), unevaluated."""
        if not isinstance(node.op, ast.FloorDiv):
            return super().visit_BinOp(node)
        unevaluated = [ast.keyword(arg="evaluate", value=ast.Constant(value=False))]
        inverse = ast.Call(
            func=ast.Name(id="Pow", ctx=ast.Load()),
            args=[self.visit(node.right), ast.UnaryOp(op=ast.USub(), operand=ast.Constant(1))],
            keywords=list(unevaluated),
        )
        quotient = ast.Call(func=ast.Name(id="Mul", ctx=ast.Load()), args=[self.visit(node.left), inverse], keywords=list(unevaluated))
        return ast.Call(func=ast.Name(id="floor", ctx=ast.Load()), args=[quotient], keywords=list(unevaluated))

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        """`-(3+4)` stays Mul(-1, 3+4) instead of folding to -7; `-3` stays the number -3."""
        node = self.generic_visit(node)
        operand = node.operand
        is_number_literal = (
            isinstance(operand, ast.Call) and isinstance(operand.func, ast.Name) and operand.func.id in ("Integer", "Float")
        )
        if not isinstance(node.op, ast.USub) or is_number_literal:
            return node
        return ast.Call(
            func=ast.Name(id="Mul", ctx=ast.Load()),
            args=[ast.UnaryOp(op=ast.USub(), operand=ast.Constant(1)), operand],
            keywords=[ast.keyword(arg="evaluate", value=ast.Constant(value=False))],
        )


_ALLOWED_AST_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Mod, ast.USub, ast.UAdd,
)


def _check_generated_ast(tree: ast.AST, names: dict[str, Any], text: str) -> None:
    """Defence in depth: the code about to run holds only arithmetic on whitelisted names."""
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_AST_NODES):
            raise ExpressionError("unsafe", text, f"generated code holds a {type(node).__name__} node")
        if isinstance(node, ast.Name) and node.id not in names:
            raise ExpressionError("unsafe", text, f"generated code names {node.id!r}")
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            raise ExpressionError("unsafe", text, "generated code calls something that is not a plain name")
        if isinstance(node, ast.keyword) and node.arg != "evaluate":
            raise ExpressionError("unsafe", text, f"generated code passes keyword {node.arg!r}")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool)):
            raise ExpressionError("unsafe", text, "generated code holds a non-numeric constant")


def _parse_unbounded(text: str, max_length: int) -> sympy.Expr:
    """The parse itself, without a time limit: runs inside the helper process."""
    rebuilt = _safe_tokens(text, max_length)
    local_names: dict[str, Any] = {**SINGLE_LETTER_SYMBOLS, **ALLOWED_CONSTANTS, **ALLOWED_FUNCTIONS}
    global_names: dict[str, Any] = {"__builtins__": {}, **_GENERATED_NAMES, "Mod": sympy.Mod, "factorial": sympy.factorial}
    all_names = {**global_names, **local_names}
    try:
        code = stringify_expr(rebuilt, local_names, global_names, (auto_number, factorial_notation, convert_xor))
        tree = ast.parse(code, mode="eval")
        transformed = ast.fix_missing_locations(_KeepStructure().visit(tree))
    except (SyntaxError, TypeError, ValueError) as exc:
        raise ExpressionError("syntax", text, f"is not an arithmetic expression ({type(exc).__name__})") from None
    _check_generated_ast(transformed, all_names, text)
    try:
        compiled = compile(transformed, "<expression>", "eval")
        result = eval_expr(compiled, local_names, global_names)
    except (SyntaxError, TypeError, ValueError, ZeroDivisionError, AttributeError, NameError, OverflowError) as exc:
        raise ExpressionError("syntax", text, f"is not an arithmetic expression ({type(exc).__name__}: {exc})") from None
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        result = sympy.sympify(result)  # a Python number (never text), e.g. from a bare `5`
    if not isinstance(result, sympy.Expr):
        raise ExpressionError("not_expression", text, f"is a {type(result).__name__}, not an expression")
    return result


def _latex_unbounded(latex: str, max_length: int) -> sympy.Expr:
    """latex2sympy2_extended on one extracted fragment: runs inside the helper process.

    Its ANTLR grammar builds sympy objects directly (it does not eval the text), but it does
    evaluate as it builds (`\\frac{48}{2}` becomes 24), so it is bounded like everything else.
    """
    if len(latex) > max_length:
        raise ExpressionError("too_long", latex, f"longer than {max_length} characters")
    if "__" in latex:
        raise ExpressionError("unsafe", latex, "contains a double underscore")
    from latex2sympy2_extended import latex2sympy

    try:
        result = latex2sympy(latex)
    except Exception as exc:  # noqa: BLE001 -- the ANTLR parser raises many kinds; all mean "not parseable"
        raise ExpressionError("syntax", latex, f"LaTeX parser failed ({type(exc).__name__})") from None
    if not isinstance(result, sympy.Expr):
        raise ExpressionError("not_expression", latex, f"LaTeX parsed to a {type(result).__name__}, not an expression")
    return result


def _evaluate_unbounded(expr: sympy.Expr) -> float | None:
    """A finite real float, or None; runs inside the helper process."""
    with sympy_evaluate(True):
        value = sympy.N(expr.doit())
    if not isinstance(value, sympy.Expr) or value.free_symbols or not value.is_number:
        return None
    real, imaginary = value.as_real_imag()
    try:
        imaginary_value = float(imaginary)
        real_value = float(real)
    except (TypeError, ValueError):
        return None
    if imaginary_value != 0.0 or not math.isfinite(real_value):
        return None
    return real_value


_HELPER_OPERATIONS: dict[str, Callable] = {
    "parse": _parse_unbounded,
    "latex": _latex_unbounded,
    "evaluate": _evaluate_unbounded,
}


# --- the helper process -------------------------------------------------------------------------


def _helper_main(request_fd: int, reply_fd: int) -> None:
    """Entry point of the helper process: answer requests until the parent goes away."""
    import signal

    # Ctrl-C is the parent's business; the helper ends when its request pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = Connection(request_fd, writable=False)
    replies = Connection(reply_fd, readable=False)
    replies.send(("ready",))
    while True:
        try:
            with sympy_evaluate(False):
                operation, args = requests.recv()
        except (EOFError, OSError):
            return
        try:
            replies.send(("ok", _HELPER_OPERATIONS[operation](*args)))
        except ExpressionError as exc:
            replies.send(("error", exc.reason, exc.text, str(exc).split(": ", 1)[-1]))
        except Exception as exc:  # noqa: BLE001 -- sympy raises anything on odd input; report, keep serving
            replies.send(("error", "syntax", str(args[0])[:1000], f"{type(exc).__name__}: {exc}"[:200]))


class _Helper:
    """One long-lived helper process; `call` runs an operation in it under a hard time limit.

    `entry` names the function the process starts on (`module:function`, taking the request
    and reply pipe descriptors); `what` names the helper in its one error message.
    """

    def __init__(self, entry: str = "mycelium.expressions:_helper_main", what: str = "the expression helper") -> None:
        self._entry_module, self._entry_function = entry.split(":")
        self._what = what
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._requests: Connection | None = None
        self._replies: Connection | None = None
        self._owner_pid: int | None = None

    def _start(self) -> None:
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        bootstrap = (
            f"import sys; sys.path[:0] = {[entry for entry in sys.path if entry]!r}; "
            f"from {self._entry_module} import {self._entry_function}; {self._entry_function}({request_read}, {reply_write})"
        )
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", bootstrap],
                pass_fds=(request_read, reply_write),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            os.close(request_read)
            os.close(reply_write)
        self._requests = Connection(request_write, readable=False)
        self._replies = Connection(reply_read, writable=False)
        self._owner_pid = os.getpid()
        # Wait for the import to finish, without a number: the helper either says "ready" or
        # dies (and then the pipe reports EOF), so this cannot hang on a broken helper.
        try:
            self._replies.recv()
        except (EOFError, OSError):
            self._stop()
            raise ExpressionError("worker_failed", "", f"{self._what} process failed to start") from None

    def _stop(self) -> None:
        if self._process is not None and self._owner_pid == os.getpid():
            self._process.kill()
            self._process.wait()
        for connection in (self._requests, self._replies):
            if connection is not None:
                try:
                    connection.close()
                except OSError:
                    pass
        self._process = self._requests = self._replies = None

    def call(self, operation: str, args: tuple, text: str, timeout_s: float) -> Any:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        with self._lock:
            if self._process is not None and self._owner_pid != os.getpid():
                # A forked copy of a parent that had a helper: the pipes are the parent's.
                self._process = self._requests = self._replies = None
            if self._process is None or self._process.poll() is not None:
                self._stop()
                self._start()
            try:
                self._requests.send((operation, args))
                ready = self._replies.poll(timeout_s)
            except (EOFError, OSError, BrokenPipeError):
                self._stop()
                raise ExpressionError("worker_failed", text, "the expression helper process died") from None
            if not ready:
                self._stop()
                raise ExpressionError("timeout", text, f"took longer than {timeout_s:g} s; stopped")
            try:
                with sympy_evaluate(False):
                    reply = self._replies.recv()
            except (EOFError, OSError, pickle.UnpicklingError):
                self._stop()
                raise ExpressionError("worker_failed", text, "the expression helper process died (out of memory?)") from None
        if reply[0] == "ok":
            return reply[1]
        _, reason, _, detail = reply
        raise ExpressionError(reason, text, detail)

    def close(self) -> None:
        with self._lock:
            self._stop()


_HELPER = _Helper()
atexit.register(_HELPER.close)


# --- public API ----------------------------------------------------------------------------------


def parse_expression(text: str, timeout_s: float, max_length: int) -> sympy.Expr:
    """Parse arithmetic text into an unevaluated sympy tree, refusing anything unsafe.

    Thousands separators (`1,250`) are removed first; any other comma outside a function call
    is refused. Raises ExpressionError (reason `unsafe`, `too_long`, `syntax`,
    `not_expression`, `timeout` or `worker_failed`).
    """
    if not isinstance(text, str):
        raise ExpressionError("syntax", str(text), f"is a {type(text).__name__}, not text")
    # Check in this process first: unsafe text never even crosses into the helper.
    _safe_tokens(text, max_length)
    return _HELPER.call("parse", (text, max_length), text, timeout_s)


def parse_latex(latex: str, timeout_s: float, max_length: int) -> sympy.Expr:
    """Convert one LaTeX fragment with latex2sympy2_extended, bounded like parse_expression."""
    return _HELPER.call("latex", (latex, max_length), latex, timeout_s)


def evaluate_number(expr: sympy.Expr, timeout_s: float) -> float | None:
    """The value of `expr` as a float; None when it is not a finite real number (a symbol is
    left, a division by zero, a complex value, an overflow). Raises ExpressionError on timeout."""
    if isinstance(expr, sympy.Number):
        value = float(expr)  # no work to bound, and it spares a round trip
        return value if math.isfinite(value) else None
    return _HELPER.call("evaluate", (expr,), str(expr)[:1000], timeout_s)


# --- operators -----------------------------------------------------------------------------------

POW_SUBTYPES = ("sqrt", "square", "cube", "inverse", "high_pow", "neg_pow", "frac_pow", "nth_root", "pow_general")
FINE_OPERATORS = (
    "add", "sub", "neg", "mul", "div", *POW_SUBTYPES, "pow",
    "sin", "cos", "tan", "log", "exp", "factorial", "mod", "abs", "floor", "floor_div", "ceiling", "function",
    "number", "symbol", "constant",
)
OPERATOR_TO_LABEL: dict[str, str] = {
    "add": "ADD",
    "sub": "SUB",
    "neg": "SUB",
    "mul": "MUL",
    "div": "DIV",
    "inverse": "DIV",
    "floor_div": "DIV",
    "sqrt": "SQRT",
    "square": "SQUARE",
    "cube": "CUBE",
    "high_pow": "HIGH_POW",
    "sin": "SIN",
    "cos": "COS",
    "tan": "TAN",
    "log": "LOG",
    "factorial": "FACTORIAL",
    "mod": "MOD",
}
FALLBACK_LABEL = "OTHER"
_FUNCTION_OPERATORS: dict[type, str] = {
    sympy.sin: "sin",
    sympy.cos: "cos",
    sympy.tan: "tan",
    sympy.log: "log",
    sympy.exp: "exp",
    sympy.factorial: "factorial",
    sympy.Mod: "mod",
    sympy.Abs: "abs",
    sympy.floor: "floor",
    sympy.ceiling: "ceiling",
}


def _is_negative_term(term: sympy.Basic) -> bool:
    """A negative number, or a product whose numeric coefficient is negative (`Mul(-1, b)`)."""
    if term.is_Number:
        return bool(term.is_negative)
    if isinstance(term, sympy.Mul):
        return any(factor.is_Number and factor.is_negative for factor in term.args)
    return False


def _is_division_factor(factor: sympy.Basic) -> bool:
    if isinstance(factor, sympy.Pow):
        exponent = _exact_rational(factor.exp)
        return exponent is not None and exponent < 0
    return bool(factor.is_Rational and not factor.is_Integer)


def _exact_rational(expr: sympy.Basic) -> sympy.Rational | None:
    """Fold + - * / of numbers to an exact Rational; None for anything else.

    Only these four operations are folded (division as a Pow with exponent -1), so the result
    never grows beyond the size of the input: no time bound is needed here.
    """
    if expr.is_Rational:
        return expr
    if expr.is_Float:
        return sympy.Rational(str(expr)) if math.isfinite(float(expr)) else None
    if isinstance(expr, (sympy.Add, sympy.Mul)):
        parts = [_exact_rational(arg) for arg in expr.args]
        if any(part is None for part in parts):
            return None
        total = sympy.Integer(0) if isinstance(expr, sympy.Add) else sympy.Integer(1)
        for part in parts:
            total = total + part if isinstance(expr, sympy.Add) else total * part
        return total
    if isinstance(expr, sympy.Pow) and expr.exp == -1:
        base = _exact_rational(expr.base)
        return None if base is None or base == 0 else 1 / base
    return None


def _pow_subtype(exponent: sympy.Basic) -> str:
    value = _exact_rational(exponent)
    if value is None or value in (0, 1):
        return "pow_general"
    if value == sympy.Rational(1, 2):
        return "sqrt"
    if value.is_Integer:
        if value == 2:
            return "square"
        if value == 3:
            return "cube"
        if value == -1:
            return "inverse"
        return "high_pow" if value >= 4 else "neg_pow"
    if value.p == 1 and value.q >= 3:
        return "nth_root"
    return "frac_pow"


def top_operator(expr: sympy.Basic, pow_subtypes: Sequence[str]) -> str:
    """The fine operator at the root of `expr` (see the module docstring for the rules)."""
    unknown = [name for name in pow_subtypes if name not in POW_SUBTYPES]
    if unknown:
        raise ConfigError(f"ib.pow_subtypes lists unknown subtype(s) {unknown}; known: {list(POW_SUBTYPES)}")
    if isinstance(expr, sympy.Add):
        negative = [_is_negative_term(term) for term in expr.args]
        return "sub" if any(negative) and not all(negative) else "add"
    if isinstance(expr, sympy.Mul):
        factors = list(expr.args)
        if len(factors) == 2 and any(factor == -1 for factor in factors):
            return "neg"
        return "div" if any(_is_division_factor(factor) for factor in factors) else "mul"
    if isinstance(expr, sympy.Pow):
        subtype = _pow_subtype(expr.exp)
        if subtype in pow_subtypes:
            return subtype
        return "pow_general" if "pow_general" in pow_subtypes else "pow"
    if isinstance(expr, sympy.floor) and isinstance(expr.args[0], sympy.Mul) and top_operator(expr.args[0], pow_subtypes) == "div":
        return "floor_div"
    for function_class, name in _FUNCTION_OPERATORS.items():
        if isinstance(expr, function_class):
            return name
    if isinstance(expr, sympy.Function):
        return "function"
    if expr.is_Rational and not expr.is_Integer:
        return "div"
    if expr.is_Number:
        return "number"
    if expr.is_Symbol:
        return "symbol"
    if expr.is_NumberSymbol or expr is sympy.E or isinstance(expr, sympy.core.numbers.ImaginaryUnit):
        return "constant"
    return "function"


def label_for_operator(operator: str, labels: Sequence[str]) -> str:
    """Map a fine operator onto the C2 labels (`c2.labels`); unmapped or unlisted -> OTHER."""
    if FALLBACK_LABEL not in labels:
        raise ConfigError(f"c2.labels must include {FALLBACK_LABEL!r}, the label for every other operation")
    label = OPERATOR_TO_LABEL.get(operator, FALLBACK_LABEL)
    return label if label in labels else FALLBACK_LABEL


def operation_label(expr: sympy.Basic, labels: Sequence[str]) -> str:
    """The C2 label of the root operation of `expr`, e.g. `DIV` for `48/2`."""
    return label_for_operator(top_operator(expr, POW_SUBTYPES), labels)
