"""Stage 01 — heartbeats and step boundaries from the teacher's attention signals.

Reads
    tokens    stage 00's table, one row per (problem_id, head, token): problem_id, head ("L15H6"),
              token_index (0-based in the text), token_text, char_start, char_end (offsets in the
              text), iaf in [0, 1], problem_attn, context_attn, sink_attn, jsd (null at token 0).
    problems  dataset rows joined with stage 00's per-problem rows: problem_id, text (the
              solution text the tokens index into), level, subject, source, n_text_tokens.
    config    the `heartbeat` section (HeartbeatConfig); every number below comes from it.

Writes (returned; the flow stores them)
    per_problem  problem_id, n_heartbeats, n_text_tokens, n_boundaries_pred, n_boundaries_gold,
                 tp, tp_random, level, subject, source, boundaries_pred, boundaries_gold (token
                 indices, List[Int32]).
    runs         one row per heartbeat: problem_id, run_index, start_token, end_token (inclusive),
                 length, mean_iaf, char_start, char_end, span_text.
    summary      flat dict, JSON-ready: every metric X (X_mean for means) with X_low, X_high (at
                 the configured confidence) and X_n; correlations also X_p. See `summarise`.
    figures      `plot_iaf_trace`, `plot_heartbeats_by_level` (PNG), `render_markdown` (report).

What it does
    1. Heads are combined per token: the mean over heads, or one named head.
    2. A heartbeat is a maximal run of IAF strictly below `iaf_threshold`, at least
       `min_run_length` tokens long (a null IAF breaks a run).
    3. JSD (from token 1 on) is Savitzky-Golay smoothed; its peaks (scipy find_peaks with the
       configured prominence and distance) are predicted step boundaries.
    4. Gold boundaries are the text's line breaks: the token holding the first non-space
       character after each break (a break at the very start or end is ignored).
    5. Boundary precision/recall/F1 with ±`boundary_tolerance` one-to-one matching,
       micro-averaged over problems, bootstrap intervals over problems — beside a random
       baseline that puts the same number of boundaries per problem uniformly at random
       (averaged over `random_baseline_seeds` draws), and the paired JSD − random difference.
    6. Heartbeats per MATH level (mean, t interval, n); correlation of heartbeat count with
       length in tokens; and the partial correlation of level with heartbeat count holding
       length fixed — the test of whether the heartbeat says more than "long solution".

Time: under a second for the shipped sample; about 8 s for all of GSM8K train (7.5k problems,
4 heads, 1.6M token rows) on one CPU core, mostly Savitzky-Golay edge fits, the random draws
and 7 bootstraps of `bootstrap_resamples`. Figures about a second.

What you should see: boundary F1 clearly above the random baseline (the difference's
interval above 0) if JSD peaks track steps; heartbeat counts rising with MATH level. If the
partial correlation's interval covers 0, the level effect is explained by length alone, and
the report says so.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from prefect import get_run_logger, task
from scipy.signal import find_peaks, savgol_filter

from mycelium import stats
from mycelium.config import HeartbeatConfig
from mycelium.errors import ConfigError, MyceliumError
from mycelium.reports import ReportSection
from mycelium.store import ArtifactRef, ArtifactStore, artifact_digest, source_code_version

TOKEN_COLUMNS = ("problem_id", "head", "token_index", "char_start", "char_end", "iaf", "jsd")
PROBLEM_COLUMNS = ("problem_id", "text")
OPTIONAL_PROBLEM_COLUMNS = {"level": pl.Int8, "subject": pl.Utf8, "source": pl.Utf8, "n_text_tokens": pl.Int32}

# Published reference values, not tunables: mean heartbeats per MATH level claimed in the seed
# notes for Qwen2-7B. Drawn beside our measurement in the by-level figure and report.
SEED_CLAIM_HEARTBEATS_BY_LEVEL = {1: 3.8, 2: 5.1, 3: 7.0, 4: 9.7, 5: 14.8}
SEED_CLAIM_LABEL = "seed claim (Qwen2-7B)"

# A whitespace run that holds at least one line break: one step break, however many blank lines.
LINE_BREAK = re.compile(r"\s*\n\s*")

PER_PROBLEM_SCHEMA: dict[str, pl.DataType] = {
    "problem_id": pl.Utf8,
    "n_heartbeats": pl.Int32,
    "n_text_tokens": pl.Int32,
    "n_boundaries_pred": pl.Int32,
    "n_boundaries_gold": pl.Int32,
    "tp": pl.Int32,
    "tp_random": pl.Float64,
    "level": pl.Int8,
    "subject": pl.Utf8,
    "source": pl.Utf8,
    "boundaries_pred": pl.List(pl.Int32),
    "boundaries_gold": pl.List(pl.Int32),
}
RUNS_SCHEMA: dict[str, pl.DataType] = {
    "problem_id": pl.Utf8,
    "run_index": pl.Int32,
    "start_token": pl.Int32,
    "end_token": pl.Int32,
    "length": pl.Int32,
    "mean_iaf": pl.Float32,
    "char_start": pl.Int32,
    "char_end": pl.Int32,
    "span_text": pl.Utf8,
}


# --- Per-token signals -------------------------------------------------------------------


def aggregate_heads(tokens: pl.DataFrame, head_aggregation: str) -> pl.DataFrame:
    """One row per (problem_id, token_index): iaf and jsd combined over heads.

    `head_aggregation` is "mean" (nulls ignored) or a head name such as "L15H6".
    """
    if head_aggregation != "mean":
        heads = tokens["head"].unique().sort().to_list()
        if head_aggregation not in heads:
            shown = ", ".join(heads[:8]) + (" ..." if len(heads) > 8 else "")
            raise ConfigError(f"heartbeat.head_aggregation: head {head_aggregation} is not in the stage 00 tokens (heads there: {shown})")
        tokens = tokens.filter(pl.col("head") == head_aggregation)
    return (
        tokens.group_by("problem_id", "token_index")
        .agg(
            pl.col("char_start").first(),
            pl.col("char_end").first(),
            pl.col("iaf").cast(pl.Float64).mean(),
            pl.col("jsd").cast(pl.Float64).mean(),
        )
        .sort("problem_id", "token_index")
    )


def find_heartbeat_runs(iaf: np.ndarray, threshold: float, min_run_length: int) -> list[tuple[int, int]]:
    """Maximal runs of iaf strictly below threshold, at least min_run_length long.

    Returns (start, end) token positions, end inclusive. NaN is not below anything, so it ends a run.
    """
    below = np.asarray(iaf, dtype=float) < threshold
    # Run edges from the difference of the padded boolean series: +1 starts a run, -1 ends it.
    edges = np.diff(np.concatenate(([0], below.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)  # exclusive
    return [(int(s), int(e) - 1) for s, e in zip(starts, stops) if e - s >= min_run_length]


def smooth_jsd(jsd: np.ndarray, window: int, polyorder: int) -> np.ndarray:
    """Savitzky-Golay smoothing; NaN gaps are filled by linear interpolation first.

    A sequence shorter than the window is returned unsmoothed (savgol needs a full window).
    """
    values = np.asarray(jsd, dtype=float).copy()
    finite = np.isfinite(values)
    if not finite.any():
        return values
    if not finite.all():
        positions = np.arange(len(values))
        values[~finite] = np.interp(positions[~finite], positions[finite], values[finite])
    if len(values) < window:
        return values
    return savgol_filter(values, window_length=window, polyorder=polyorder)


def predict_boundaries(jsd: np.ndarray, cfg: HeartbeatConfig) -> tuple[np.ndarray, np.ndarray]:
    """Step boundaries from JSD peaks: (token indices, smoothed JSD aligned with the tokens).

    Token 0 has no JSD (nothing before it), so smoothing starts at token 1 and a boundary at
    token t means the attention pattern shifted between t-1 and t: a new step starts at t.
    Savitzky-Golay with polyorder 2 rings around a one-token spike (side lobes of -3/35 of its
    height for window 5), so on a flat stretch between two spikes the dips can leave a small
    extra peak; `jsd_peak_prominence` has to sit above that and above the noise floor.
    """
    jsd = np.asarray(jsd, dtype=float)
    smoothed = np.full(len(jsd), np.nan)
    if len(jsd) < 2 or not np.isfinite(jsd[1:]).any():
        return np.array([], dtype=np.int64), smoothed
    smoothed[1:] = smooth_jsd(jsd[1:], cfg.jsd_smoothing_window, cfg.jsd_smoothing_polyorder)
    peaks, _ = find_peaks(smoothed[1:], prominence=cfg.jsd_peak_prominence, distance=cfg.jsd_peak_min_distance)
    return peaks.astype(np.int64) + 1, smoothed


def gold_boundaries(text: str, char_start: np.ndarray, char_end: np.ndarray) -> np.ndarray:
    """Token indices where the text's lines begin: for every line break (a whitespace run
    holding a newline), the first token that reaches the next non-space character.

    A token such as "\\nThe" that carries the break itself counts as the start of the new line.
    Breaks before the first or after the last non-space character are ignored, as are breaks
    past the last token (a truncated text).
    """
    ends = np.asarray(char_end)
    boundaries: list[int] = []
    for match in LINE_BREAK.finditer(text):
        if match.start() == 0 or match.end() >= len(text):
            continue
        next_char = match.end()
        reaching = np.flatnonzero(ends > next_char)
        if len(reaching) and reaching[0] > 0:
            boundaries.append(int(reaching[0]))
    return np.unique(np.asarray(boundaries, dtype=np.int64))


def match_boundaries(predicted: np.ndarray, gold: np.ndarray, tolerance: int) -> int:
    """True positives under one-to-one matching within ±tolerance tokens.

    Greedy over sorted positions: each prediction, left to right, takes the leftmost unmatched
    gold boundary within reach. On a line with equal-width windows this greedy is a maximum
    matching (an exchange argument: taking the leftmost candidate never blocks a later
    prediction, whose window starts no earlier), so no assignment solver is needed.
    """
    predicted = np.sort(np.asarray(predicted))
    gold = np.sort(np.asarray(gold))
    matched = 0
    g = 0
    for p in predicted:
        while g < len(gold) and gold[g] < p - tolerance:
            g += 1
        if g < len(gold) and gold[g] <= p + tolerance:
            matched += 1
            g += 1
    return matched


def boundary_scores(predicted, gold, tolerance: int) -> tuple[float, float, float]:
    """(precision, recall, F1) for one problem; NaN where a denominator is 0."""
    tp = match_boundaries(np.asarray(predicted), np.asarray(gold), tolerance)
    n_pred, n_gold = len(predicted), len(gold)
    precision = tp / n_pred if n_pred else math.nan
    recall = tp / n_gold if n_gold else math.nan
    f1 = 2 * tp / (n_pred + n_gold) if n_pred + n_gold else math.nan
    return precision, recall, f1


def random_boundaries(n_tokens: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct boundary positions drawn uniformly from tokens 1..n_tokens-1
    (token 0 cannot start a new step, the same as for JSD peaks)."""
    candidates = max(n_tokens - 1, 0)
    count = min(count, candidates)
    if count == 0:
        return np.array([], dtype=np.int64)
    return np.sort(rng.choice(candidates, size=count, replace=False) + 1)


# --- The stage ---------------------------------------------------------------------------


def _require_columns(frame: pl.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MyceliumError(f"stage 01: {what} is missing column(s) {', '.join(missing)}")


def _prepare_problems(problems: pl.DataFrame) -> pl.DataFrame:
    _require_columns(problems, PROBLEM_COLUMNS, "the problems table")
    additions = [pl.lit(None, dtype=dtype).alias(name) for name, dtype in OPTIONAL_PROBLEM_COLUMNS.items() if name not in problems.columns]
    problems = problems.with_columns(additions) if additions else problems
    return problems.select(
        pl.col("problem_id").cast(pl.Utf8),
        pl.col("text").cast(pl.Utf8),
        *[pl.col(name).cast(dtype) for name, dtype in OPTIONAL_PROBLEM_COLUMNS.items()],
    ).unique("problem_id", keep="first", maintain_order=True)


def detect_heartbeats(tokens: pl.DataFrame, problems: pl.DataFrame, cfg: HeartbeatConfig) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """Heartbeats, predicted and gold boundaries per problem, and the stage summary."""
    _require_columns(tokens, TOKEN_COLUMNS, "the stage 00 tokens table")
    if tokens.height == 0:
        raise MyceliumError("stage 01: the stage 00 tokens table is empty (no problem produced tokens)")
    problems = _prepare_problems(problems)
    unknown = set(tokens["problem_id"].unique().to_list()) - set(problems["problem_id"].to_list())
    if unknown:
        example = sorted(unknown)[0]
        raise MyceliumError(f"stage 01: {len(unknown)} problem ids in the tokens table are not in the problems table (e.g. {example})")

    per_token = aggregate_heads(tokens, cfg.head_aggregation)
    signals = per_token.group_by("problem_id").agg("token_index", "char_start", "char_end", "iaf", "jsd")
    signals_by_id = {row["problem_id"]: row for row in signals.iter_rows(named=True)}

    per_problem_rows: list[dict[str, Any]] = []
    run_rows: list[dict[str, Any]] = []
    for problem in problems.iter_rows(named=True):
        signal = signals_by_id.get(problem["problem_id"])
        if signal is None:
            continue  # stage 00 skipped it (too long, failed); counted in the summary
        iaf = np.asarray(signal["iaf"], dtype=float)
        char_start = np.asarray(signal["char_start"], dtype=np.int64)
        char_end = np.asarray(signal["char_end"], dtype=np.int64)
        text = problem["text"] or ""
        token_index = np.asarray(signal["token_index"])
        if not np.array_equal(token_index, np.arange(len(token_index))):
            gap = int(np.flatnonzero(token_index != np.arange(len(token_index)))[0])
            raise MyceliumError(f"stage 01: tokens of problem {problem['problem_id']} are not numbered 0..n-1 (position {gap} holds token {token_index[gap]})")
        heartbeat_runs = find_heartbeat_runs(iaf, cfg.iaf_threshold, cfg.min_run_length)
        for run_index, (start, end) in enumerate(heartbeat_runs):
            run_rows.append({
                "problem_id": problem["problem_id"],
                "run_index": run_index,
                "start_token": start,
                "end_token": end,
                "length": end - start + 1,
                "mean_iaf": float(np.mean(iaf[start : end + 1])),
                "char_start": int(char_start[start]),
                "char_end": int(char_end[end]),
                "span_text": text[char_start[start] : char_end[end]],
            })
        predicted, _ = predict_boundaries(np.asarray(signal["jsd"], dtype=float), cfg)
        gold = gold_boundaries(text, char_start, char_end)
        n_tokens = problem["n_text_tokens"] if problem["n_text_tokens"] is not None else len(iaf)
        per_problem_rows.append({
            "problem_id": problem["problem_id"],
            "n_heartbeats": len(heartbeat_runs),
            "n_text_tokens": n_tokens,
            "n_boundaries_pred": len(predicted),
            "n_boundaries_gold": len(gold),
            "tp": match_boundaries(predicted, gold, cfg.boundary_tolerance),
            "tp_random": math.nan,
            "level": problem["level"],
            "subject": problem["subject"],
            "source": problem["source"],
            "boundaries_pred": predicted.tolist(),
            "boundaries_gold": gold.tolist(),
            "_token_count": len(iaf),
        })

    _add_random_baseline(per_problem_rows, cfg)
    token_counts = [row.pop("_token_count") for row in per_problem_rows]
    per_problem = pl.DataFrame(per_problem_rows, schema=PER_PROBLEM_SCHEMA)
    runs = pl.DataFrame(run_rows, schema=RUNS_SCHEMA)
    summary = summarise(per_problem, runs, cfg)
    summary["n_problems_without_tokens"] = problems.height - per_problem.height
    summary["n_tokens"] = int(sum(token_counts))
    summary["n_heads"] = 1 if cfg.head_aggregation != "mean" else int(tokens["head"].n_unique())
    return per_problem, runs, summary


def _add_random_baseline(rows: list[dict[str, Any]], cfg: HeartbeatConfig) -> None:
    """tp_random: true positives of random boundaries at the JSD rate, mean over the draws."""
    totals = np.zeros(len(rows))
    for draw in range(cfg.random_baseline_seeds):
        rng = np.random.default_rng([cfg.seed, draw])
        for i, row in enumerate(rows):
            placed = random_boundaries(row["_token_count"], row["n_boundaries_pred"], rng)
            totals[i] += match_boundaries(placed, np.asarray(row["boundaries_gold"]), cfg.boundary_tolerance)
    for i, row in enumerate(rows):
        row["tp_random"] = float(totals[i] / cfg.random_baseline_seeds)


# --- Summary -----------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _put(summary: dict[str, Any], name: str, estimate, low, high, n, p_value=None, value_suffix: str = "") -> None:
    """name (+ value_suffix, "_mean" for means), name_low, name_high, name_n[, name_p]."""
    summary[name + value_suffix] = _clean(estimate)
    summary[f"{name}_low"] = _clean(low)
    summary[f"{name}_high"] = _clean(high)
    summary[f"{name}_n"] = _clean(n)
    if p_value is not None:
        summary[f"{name}_p"] = _clean(p_value)


def _count_mean_interval(counts: np.ndarray, confidence: float) -> stats.MeanInterval:
    """Mean of counts with its t interval; the lower end is clipped at 0 because a count cannot be negative."""
    mean, low, high, n = stats.mean_interval(counts, confidence)
    return stats.MeanInterval(mean, max(low, 0.0) if math.isfinite(low) else low, high, n)


def _ratio(numerator: float, denominator: float) -> float:
    # Inside bootstrap resamples a zero denominator counts as 0 (scikit-learn's convention);
    # the point estimate on the full data reports "no value" instead (see summarise).
    return float(numerator / denominator) if denominator else 0.0


def _micro(kind: str):
    def precision(tp, n_pred, n_gold):
        return _ratio(tp.sum(), n_pred.sum())

    def recall(tp, n_pred, n_gold):
        return _ratio(tp.sum(), n_gold.sum())

    def f1(tp, n_pred, n_gold):
        return _ratio(2 * tp.sum(), n_pred.sum() + n_gold.sum())

    return {"precision": precision, "recall": recall, "f1": f1}[kind]


def summarise(per_problem: pl.DataFrame, runs: pl.DataFrame, cfg: HeartbeatConfig) -> dict[str, Any]:
    """Flat summary: each metric X (X_mean for means) with X_low, X_high, X_n; correlations
    also X_p. Undefined values (too few problems, no boundaries) are None, never NaN."""
    confidence, resamples, seed = cfg.confidence, cfg.bootstrap_resamples, cfg.seed
    summary: dict[str, Any] = {
        "confidence": confidence,
        "boundary_tolerance": cfg.boundary_tolerance,
        "n_problems": per_problem.height,
        "heartbeats_total": runs.height,
    }
    heartbeats = per_problem["n_heartbeats"].to_numpy().astype(float)
    _put(summary, "heartbeats_per_problem", *_count_mean_interval(heartbeats, confidence), value_suffix="_mean")
    _put(summary, "heartbeat_run_length", *stats.mean_interval(runs["length"].to_numpy().astype(float), confidence), value_suffix="_mean")

    tp = per_problem["tp"].to_numpy().astype(float)
    tp_random = per_problem["tp_random"].to_numpy().astype(float)
    n_pred = per_problem["n_boundaries_pred"].to_numpy().astype(float)
    n_gold = per_problem["n_boundaries_gold"].to_numpy().astype(float)
    n = per_problem.height
    summary.update({
        "boundary_pred_total": int(n_pred.sum()),
        "boundary_gold_total": int(n_gold.sum()),
        "boundary_tp_total": int(tp.sum()),
        "boundary_tp_random_total": float(tp_random.sum()),
    })
    denominators = {"precision": n_pred.sum(), "recall": n_gold.sum(), "f1": n_pred.sum() + n_gold.sum()}
    for kind in ("precision", "recall", "f1"):
        statistic = _micro(kind)
        for suffix, hits in (("", tp), ("_random", tp_random)):
            if n == 0 or denominators[kind] == 0:
                _put(summary, f"boundary_{kind}{suffix}", None, None, None, n)
                continue
            result = stats.bootstrap_interval((hits, n_pred, n_gold), statistic, resamples, confidence, seed)
            _put(summary, f"boundary_{kind}{suffix}", *result)

    def f1_gain(hits, hits_random, pred, gold):
        return _micro("f1")(hits, pred, gold) - _micro("f1")(hits_random, pred, gold)

    if n and denominators["f1"]:
        _put(summary, "boundary_f1_diff", *stats.bootstrap_interval((tp, tp_random, n_pred, n_gold), f1_gain, resamples, confidence, seed))
    else:
        _put(summary, "boundary_f1_diff", None, None, None, n)

    levelled = per_problem.filter(pl.col("level").is_not_null())
    for level in sorted(levelled["level"].unique().to_list()):
        at_level = levelled.filter(pl.col("level") == level)
        counts = at_level["n_heartbeats"].to_numpy().astype(float)
        _put(summary, f"heartbeats_level_{level}", *_count_mean_interval(counts, confidence), value_suffix="_mean")
        summary[f"heartbeats_level_{level}_tokens_mean"] = _clean(float(at_level["n_text_tokens"].cast(pl.Float64).mean()))

    length = per_problem["n_text_tokens"].to_numpy().astype(float)
    _put(summary, "heartbeat_length_pearson", *stats.pearson_with_interval(heartbeats, length, confidence))
    _put(summary, "heartbeat_length_spearman", *stats.spearman(heartbeats, length, confidence))
    level_values = levelled["level"].to_numpy().astype(float)
    level_heartbeats = levelled["n_heartbeats"].to_numpy().astype(float)
    level_length = levelled["n_text_tokens"].to_numpy().astype(float)
    _put(summary, "heartbeat_level_pearson", *stats.pearson_with_interval(level_values, level_heartbeats, confidence))
    partial = stats.partial_correlation(level_values, level_heartbeats, level_length, confidence)
    _put(summary, "heartbeat_level_partial", *partial)
    # True only when the interval of the partial correlation lies above 0.
    summary["heartbeat_beyond_length"] = None if not math.isfinite(partial.low) else bool(partial.low > 0)
    return summary


# --- Report ------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _interval(summary: dict[str, Any], name: str) -> str:
    low, high = summary.get(f"{name}_low"), summary.get(f"{name}_high")
    if low is None or high is None:
        return "—"
    return f"[{_fmt(low)}, {_fmt(high)}]"


def render_markdown(summary: dict[str, Any]) -> str:
    """The stage's report section: one table (metric, value, CI, n, baseline) and plain verdicts."""
    percent = f"{round(100 * summary.get('confidence', 0.95))}%"
    tolerance = summary.get("boundary_tolerance")
    rows: list[tuple[str, str, str, str, str]] = []

    def add(label: str, name: str, baseline: str = "—", n_label: str = "") -> None:
        n = summary.get(f"{name}_n")
        value = summary.get(name, summary.get(f"{name}_mean"))
        rows.append((label, _fmt(value), _interval(summary, name), f"{_fmt(n)}{n_label}", baseline))

    def random_baseline(name: str) -> str:
        random_name = f"{name}_random"
        return f"random at same rate: {_fmt(summary.get(random_name))} {_interval(summary, random_name)}"

    for kind, label in (("f1", "F1"), ("precision", "precision"), ("recall", "recall")):
        add(f"Boundary {label} (JSD peaks vs line breaks, ±{tolerance} tokens)", f"boundary_{kind}", random_baseline(f"boundary_{kind}"), " problems")
    add("Boundary F1 gain over random (paired)", "boundary_f1_diff", "0 (no better than random)", " problems")
    add("Heartbeats per problem", "heartbeats_per_problem", n_label=" problems")
    levels = sorted(int(match.group(1)) for key in summary if (match := re.fullmatch(r"heartbeats_level_(\d+)_mean", key)))
    for level in levels:
        claim = SEED_CLAIM_HEARTBEATS_BY_LEVEL.get(level)
        baseline = f"{SEED_CLAIM_LABEL}: {claim}" if claim is not None else "—"
        tokens_mean = summary.get(f"heartbeats_level_{level}_tokens_mean")
        add(f"Heartbeats, MATH level {level} (mean length {_fmt(tokens_mean, 0)} tokens)", f"heartbeats_level_{level}", baseline, " problems")
    add("Heartbeats vs length in tokens (Pearson r)", "heartbeat_length_pearson", "0 (no relation)", " problems")
    add("Heartbeats vs length in tokens (Spearman ρ)", "heartbeat_length_spearman", "0 (no relation)", " problems")
    add("Level vs heartbeats (Pearson r)", "heartbeat_level_pearson", "0 (no relation)", " problems")
    add("Level vs heartbeats, length held fixed (partial r)", "heartbeat_level_partial", "0 (nothing beyond length)", " problems")

    lines = [
        "## Stage 01 — heartbeats and step boundaries",
        "",
        f"{summary.get('n_problems')} problems, {summary.get('heartbeats_total')} heartbeats, "
        f"{summary.get('boundary_pred_total')} predicted and {summary.get('boundary_gold_total')} gold boundaries "
        f"({summary.get('n_problems_without_tokens', 0)} problems had no tokens and are left out).",
        "",
        f"| metric | value | {percent} CI | n | baseline |",
        "|---|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for row in rows],
        "",
    ]
    gain_low, gain_high = summary.get("boundary_f1_diff_low"), summary.get("boundary_f1_diff_high")
    if gain_low is None or gain_high is None:
        lines.append("- Boundaries: too few problems or boundaries to compare JSD peaks with random placement.")
    elif gain_low > 0:
        lines.append("- Boundaries: JSD peaks find line-break steps better than random boundaries at the same rate.")
    elif gain_high < 0:
        lines.append("- Boundaries: JSD peaks find line-break steps **worse** than random boundaries at the same rate.")
    else:
        lines.append("- Boundaries: JSD peaks are **not** distinguishable from random boundaries at the same rate.")
    beyond = summary.get("heartbeat_beyond_length")
    if beyond is None:
        lines.append("- Heartbeats vs level: too few MATH problems with a level to test whether heartbeats say more than length.")
    elif beyond:
        lines.append("- Heartbeats vs level: with length held fixed, harder problems still have more heartbeats — the heartbeat is more than length.")
    else:
        lines.append("- Heartbeats vs level: with length held fixed, level and heartbeat count are **not** shown to be related — on this data the heartbeat count is explained by length.")
    return "\n".join(lines) + "\n"


# --- Figures -----------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    # Figure without pyplot: no global backend state, safe in worker threads (renders with Agg).
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _pick_trace_problems(per_problem: pl.DataFrame, count: int) -> list[str]:
    """Problems that show everything first (heartbeats and gold breaks), in table order."""
    if count == 0 or per_problem.height == 0:
        return []
    ranked = per_problem.with_row_index("_order").sort(
        (pl.col("n_heartbeats") > 0) & (pl.col("n_boundaries_gold") > 0), "_order", descending=[True, False]
    )
    return ranked["problem_id"].head(count).to_list()


def plot_iaf_trace(
    tokens: pl.DataFrame,
    per_problem: pl.DataFrame,
    runs: pl.DataFrame,
    cfg: HeartbeatConfig,
    out_dir: str | Path,
    problem_ids: list[str] | None = None,
) -> Path | None:
    """IAF per token (heartbeats shaded, threshold dashed) over the smoothed JSD, with predicted
    boundaries (solid) and gold line breaks (dotted), for `cfg.trace_figures` problems.
    Writes iaf_trace.png into out_dir; None when there is nothing to draw."""
    chosen = problem_ids if problem_ids is not None else _pick_trace_problems(per_problem, cfg.trace_figures)
    if not chosen:
        return None
    per_token = aggregate_heads(tokens.filter(pl.col("problem_id").is_in(chosen)), cfg.head_aggregation)
    figure = _new_figure(11, 3.6 * len(chosen))
    grid = figure.add_gridspec(2 * len(chosen), 1, height_ratios=[3, 1.3] * len(chosen))
    legend: dict[str, Any] = {}
    for i, pid in enumerate(chosen):
        signal = per_token.filter(pl.col("problem_id") == pid)
        info = per_problem.filter(pl.col("problem_id") == pid).row(0, named=True)
        positions = signal["token_index"].to_numpy()
        iaf = signal["iaf"].to_numpy()
        _, smoothed = predict_boundaries(signal["jsd"].to_numpy(), cfg)
        top = figure.add_subplot(grid[2 * i])
        bottom = figure.add_subplot(grid[2 * i + 1], sharex=top)
        for run in runs.filter(pl.col("problem_id") == pid).iter_rows(named=True):
            top.axvspan(run["start_token"] - 0.5, run["end_token"] + 0.5, color="tab:orange", alpha=0.25, lw=0,
                        label="heartbeat (IAF run below threshold)")
        top.plot(positions, iaf, color="tab:blue", lw=1.2, label="IAF (share of attention on the problem)")
        top.axhline(cfg.iaf_threshold, color="black", ls="--", lw=0.9, label=f"threshold {cfg.iaf_threshold}")
        bottom.plot(positions, smoothed, color="tab:purple", lw=1.1, label="JSD, smoothed")
        for axis in (top, bottom):
            for b in info["boundaries_pred"]:
                axis.axvline(b, color="tab:red", lw=1.0, alpha=0.8, label="predicted boundary (JSD peak)")
            for b in info["boundaries_gold"]:
                axis.axvline(b, color="tab:green", lw=1.6, ls=":", label="gold step break (line break)")
        level = f", level {info['level']}" if info["level"] is not None else ""
        top.set_title(
            f"{pid} ({info['source']}{level}): {info['n_heartbeats']} heartbeats, "
            f"{info['tp']}/{info['n_boundaries_pred']} predicted boundaries within ±{cfg.boundary_tolerance} of {info['n_boundaries_gold']} gold",
            fontsize=10, loc="left",
        )
        top.set_ylim(-0.02, 1.02)
        top.set_ylabel("IAF")
        bottom.set_ylabel("JSD")
        bottom.set_xlabel("token index in the solution")
        top.tick_params(labelbottom=False)
        for axis in (top, bottom):
            for handle, label in zip(*axis.get_legend_handles_labels()):
                legend.setdefault(label, handle)
    # One legend for all panels, above them, so it never hides the traces.
    figure.legend(list(legend.values()), list(legend), loc="outside upper center", ncol=3, fontsize=8, frameon=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "iaf_trace.png"
    figure.savefig(path, dpi=110)
    return path


def plot_heartbeats_by_level(per_problem: pl.DataFrame, cfg: HeartbeatConfig, out_dir: str | Path) -> Path:
    """Mean heartbeats per MATH level with interval bars and n on each bar, beside the seed's
    claimed values as a separate reference series. Writes heartbeats_by_level.png into out_dir."""
    figure = _new_figure(7, 4.5)
    axis = figure.add_subplot()
    levelled = per_problem.filter(pl.col("level").is_not_null())
    levels = sorted(levelled["level"].unique().to_list())
    percent = f"{round(100 * cfg.confidence)}%"
    for level in levels:
        counts = levelled.filter(pl.col("level") == level)["n_heartbeats"].to_numpy().astype(float)
        mean, low, high, n = _count_mean_interval(counts, cfg.confidence)
        has_interval = math.isfinite(low)
        axis.bar(level, mean, width=0.6, color="tab:blue", alpha=0.75, label=f"this run: mean, {percent} t interval" if level == levels[0] else None)
        if has_interval:
            axis.errorbar(level, mean, yerr=[[mean - low], [high - mean]], color="black", capsize=5, lw=1.2)
        top = high if has_interval else mean
        axis.annotate(f"n={n}" + ("" if has_interval else "\n(no interval)"), (level, top), textcoords="offset points", xytext=(0, 4),
                      ha="center", fontsize=8)
    claim_levels = sorted(SEED_CLAIM_HEARTBEATS_BY_LEVEL)
    axis.plot(claim_levels, [SEED_CLAIM_HEARTBEATS_BY_LEVEL[lv] for lv in claim_levels], color="tab:red", ls="--", marker="D", lw=1.2,
              label=SEED_CLAIM_LABEL)
    if not levels:
        axis.text(0.5, 0.9, "no problems with a MATH level in this run", transform=axis.transAxes, ha="center", fontsize=9)
    axis.set_xticks(sorted(set(levels) | set(claim_levels)))
    axis.set_xlabel("MATH level")
    axis.set_ylabel("heartbeats per problem")
    axis.set_title(f"Heartbeats by level (IAF < {cfg.iaf_threshold} for ≥ {cfg.min_run_length} tokens)", fontsize=10)
    axis.set_ylim(bottom=0)
    axis.margins(y=0.15)
    axis.legend(fontsize=8, loc="upper left")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "heartbeats_by_level.png"
    figure.savefig(path, dpi=110)
    return path


def write_figures(tokens: pl.DataFrame, per_problem: pl.DataFrame, runs: pl.DataFrame, cfg: HeartbeatConfig, out_dir: str | Path) -> list[Path]:
    """Both figures; returns the paths written."""
    paths = [plot_iaf_trace(tokens, per_problem, runs, cfg, out_dir), plot_heartbeats_by_level(per_problem, cfg, out_dir)]
    return [path for path in paths if path is not None]


# ---- Prefect wiring -----------------------------------------------------------------------
# Thin: the artifact key, the task that reads stage 00 and writes stage 01, the report section.

STEP = "heartbeats"


def heartbeats_ref(store: ArtifactStore, cfg: HeartbeatConfig, traces: ArtifactRef, problems: ArtifactRef) -> ArtifactRef:
    digest = artifact_digest(STEP, cfg.digest_payload(), [traces, problems], source_code_version(sys.modules[__name__]))
    return store.ref(STEP, digest)


def build_heartbeats(ref: ArtifactRef, traces: ArtifactRef, problems: ArtifactRef, cfg: HeartbeatConfig) -> dict[str, Any]:
    """Read traces and problems, detect heartbeats, store tables, figures and the summary."""
    store = ArtifactStore.for_ref(ref)
    tokens = store.read(traces, "tokens")
    extracted = store.read(traces, "problems").filter(pl.col("skipped_reason").is_null())
    dataset = store.read(problems, "problems").select("problem_id", "level", "subject", "source")
    joined = extracted.select("problem_id", "text", "n_text_tokens").join(dataset, on="problem_id", how="left")
    per_problem, runs, summary = detect_heartbeats(tokens, joined, cfg)
    with tempfile.TemporaryDirectory() as folder:
        for path in write_figures(tokens, per_problem, runs, cfg, folder):
            store.write_file(ref, path.name, path.read_bytes())
    store.write_file(ref, "summary.json", json.dumps(summary, indent=2).encode())
    store.write_table(ref, {"per_problem": per_problem, "runs": runs}, metadata={"n_problems": per_problem.height})
    return summary


@task(name="heartbeats")
def heartbeats_task(ref: ArtifactRef, traces: ArtifactRef, problems: ArtifactRef, cfg: HeartbeatConfig) -> ArtifactRef:
    summary = build_heartbeats(ref, traces, problems, cfg)
    get_run_logger().info(
        "heartbeats: %s problems, %.2f per problem; boundary F1 %s vs random %s",
        summary.get("n_problems"), summary.get("heartbeats_per_problem_mean") or float("nan"),
        summary.get("boundary_f1"), summary.get("boundary_f1_random"),
    )
    return ref


def report_section(store: ArtifactStore, ref: ArtifactRef) -> ReportSection:
    manifest = store.verify(ref)
    summary = json.loads(store.read_file(ref, "summary.json"))
    figures = {name: store.read_file(ref, name) for name in manifest.files if name.endswith(".png")}
    markdown = render_markdown(summary)
    if figures:
        markdown += "\n" + "\n".join(f"![{name}]({name})" for name in sorted(figures)) + "\n"
    return ReportSection({f"heartbeat_{k}" if not k.startswith(("heartbeat", "boundary")) else k: v for k, v in summary.items()}, markdown, figures)
