"""Stage 01 logic on hand-computed cases, then the whole stage on a small synthetic table."""

from __future__ import annotations

import math
import re

import numpy as np
import polars as pl
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.signal import savgol_filter

from mycelium.config import load_config
from mycelium.errors import ConfigError, MyceliumError
from tasks.heartbeats import (
    SEED_CLAIM_LABEL,
    aggregate_heads,
    boundary_scores,
    detect_heartbeats,
    find_heartbeat_runs,
    gold_boundaries,
    match_boundaries,
    plot_heartbeats_by_level,
    plot_iaf_trace,
    predict_boundaries,
    random_boundaries,
    render_markdown,
    smooth_jsd,
    write_figures,
)
from tasks.extract_attention import TOKENS_SCHEMA

# The schema stage 00 actually writes: stage 01's tests read exactly what stage 00 produces.
TOKEN_SCHEMA = TOKENS_SCHEMA


@pytest.fixture(scope="module")
def cfg():
    return load_config().heartbeat


def tokenise(text: str) -> list[tuple[int, int]]:
    """Whitespace-led word pieces, like a BPE tokenizer's "ĠWord" tokens; newlines their own token."""
    return [(m.start(), m.end()) for m in re.finditer(r"\n+|[ \t]*[^\s]+", text)]


def token_rows(problem_id: str, text: str, iaf, jsd, heads=("L1H1",), offsets=None):
    spans = offsets or tokenise(text)
    assert len(spans) == len(iaf) == len(jsd), (len(spans), len(iaf), len(jsd))
    rows = []
    for head in heads:
        for i, (start, end) in enumerate(spans):
            value = None if i == 0 or jsd[i] is None else float(jsd[i])
            rows.append((problem_id, head, i, text[start:end], start, end, float(iaf[i]), 0.5, 0.4, 0.1, value, 0, 1, 0.1))
    return rows


def tokens_frame(rows) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=TOKEN_SCHEMA, orient="row")


# --- Heartbeat runs ------------------------------------------------------------------------


def test_runs_below_threshold_with_min_length():
    iaf = [0.9, 0.1, 0.2, 0.3, 0.9, 0.1, 0.1, 0.9]
    assert find_heartbeat_runs(iaf, 0.5, 3) == [(1, 3)]  # the 2-token dip is too short
    assert find_heartbeat_runs(iaf, 0.5, 2) == [(1, 3), (5, 6)]


def test_run_exactly_min_length_and_at_the_edges():
    assert find_heartbeat_runs([0.1, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1], 0.5, 3) == [(0, 2), (4, 6)]
    assert find_heartbeat_runs([0.9, 0.1, 0.1, 0.1, 0.1], 0.5, 4) == [(1, 4)]  # run at the end
    assert find_heartbeat_runs([0.1] * 4, 0.5, 5) == []


def test_equal_to_threshold_is_not_below_and_nan_breaks_a_run():
    assert find_heartbeat_runs([0.1, 0.5, 0.1, 0.1], 0.5, 2) == [(2, 3)]
    assert find_heartbeat_runs([0.1, 0.1, float("nan"), 0.1, 0.1], 0.5, 3) == []
    assert find_heartbeat_runs([], 0.5, 1) == []


# --- Boundaries ---------------------------------------------------------------------------


def test_boundary_scores_with_tolerance():
    assert boundary_scores([3, 10], [4, 20], 2) == (0.5, 0.5, 0.5)
    assert match_boundaries(np.array([6]), np.array([4]), 2) == 1  # the tolerance is inclusive
    assert match_boundaries(np.array([7]), np.array([4]), 2) == 0
    assert match_boundaries(np.array([4, 5]), np.array([4]), 2) == 1  # one-to-one: a gold is used once
    assert match_boundaries(np.array([2, 4]), np.array([1, 3]), 1) == 2  # greedy must not waste gold 3
    precision, recall, f1 = boundary_scores([], [5], 2)
    assert math.isnan(precision) and recall == 0.0 and f1 == 0.0


def test_greedy_matching_is_a_maximum_matching():
    rng = np.random.default_rng(0)
    for _ in range(300):
        predicted = np.sort(rng.choice(30, size=rng.integers(0, 8), replace=False))
        gold = np.sort(rng.choice(30, size=rng.integers(0, 8), replace=False))
        tolerance = int(rng.integers(0, 4))
        if len(predicted) and len(gold):
            reachable = (np.abs(predicted[:, None] - gold[None, :]) <= tolerance).astype(int)
            rows, cols = linear_sum_assignment(reachable, maximize=True)
            best = int(reachable[rows, cols].sum())
        else:
            best = 0
        assert match_boundaries(predicted, gold, tolerance) == best


def test_gold_boundaries_from_line_breaks():
    text = "Step one.\nStep two.\n\nStep three.\n"
    spans = tokenise(text)
    assert [text[s:e] for s, e in spans] == ["Step", " one.", "\n", "Step", " two.", "\n\n", "Step", " three.", "\n"]
    starts, ends = np.array([s for s, _ in spans]), np.array([e for _, e in spans])
    # Breaks after "one." and after "two." (a blank line is one break); the final one is ignored.
    assert gold_boundaries(text, starts, ends).tolist() == [3, 6]


def test_gold_boundary_on_a_token_that_carries_the_break():
    text = "\nA = 1\nB = 2"
    offsets = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]  # "\nA", " =", " 1", "\nB", " =", " 2"
    starts, ends = np.array([s for s, _ in offsets]), np.array([e for _, e in offsets])
    # The leading break is ignored; "\nB" holds the first character of the second line.
    assert gold_boundaries(text, starts, ends).tolist() == [3]


def test_gold_boundaries_ignore_breaks_past_the_last_token():
    text = "a\nb\nc"
    starts, ends = np.array([0, 1, 2]), np.array([1, 2, 3])  # the tokens stop at "b"
    assert gold_boundaries(text, starts, ends).tolist() == [2]


# --- JSD smoothing and peaks ---------------------------------------------------------------


def test_short_sequences_are_left_unsmoothed():
    assert smooth_jsd(np.array([0.1, 0.5, 0.2]), 5, 2).tolist() == [0.1, 0.5, 0.2]


def test_smoothing_matches_savgol_and_keeps_a_quadratic():
    spike = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert np.allclose(smooth_jsd(spike, 5, 2), savgol_filter(spike, 5, 2))
    x = np.arange(9, dtype=float)
    assert np.allclose(smooth_jsd(0.01 * x**2, 5, 2), 0.01 * x**2)  # polyorder 2 fits it exactly


def test_smoothing_fills_gaps():
    smoothed = smooth_jsd(np.array([0.1, np.nan, 0.3]), 5, 2)
    assert smoothed.tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_peaks_become_boundaries_at_the_token_after_the_shift(cfg):
    positions = np.arange(30)
    jsd = 0.05 + 0.5 * np.exp(-(((positions - 8) / 1.5) ** 2)) + 0.5 * np.exp(-(((positions - 20) / 1.5) ** 2))
    jsd[0] = np.nan  # token 0 has no predecessor
    boundaries, smoothed = predict_boundaries(jsd, cfg)
    assert boundaries.tolist() == [8, 20]
    assert math.isnan(smoothed[0]) and len(smoothed) == 30
    assert predict_boundaries(np.array([np.nan]), cfg)[0].tolist() == []


# --- Heads and the random baseline ------------------------------------------------------


def test_head_aggregation_mean_or_named():
    text = "a b c"
    rows = token_rows("p", text, [0.2, 0.4, 0.6], [None, 0.1, 0.3], heads=("L1H1",))
    rows += token_rows("p", text, [0.4, 0.8, 0.0], [None, 0.3, 0.1], heads=("L2H3",))
    tokens = tokens_frame(rows)
    mean = aggregate_heads(tokens, "mean")
    assert mean["iaf"].to_list() == pytest.approx([0.3, 0.6, 0.3])
    assert mean["jsd"].to_list()[1:] == pytest.approx([0.2, 0.2])
    assert mean["jsd"][0] is None
    assert aggregate_heads(tokens, "L2H3")["iaf"].to_list() == pytest.approx([0.4, 0.8, 0.0])
    with pytest.raises(ConfigError, match=r"head L9H9 is not in the stage 00 tokens \(heads there: L1H1, L2H3\)"):
        aggregate_heads(tokens, "L9H9")


def test_random_boundaries_have_the_predicted_count_and_stay_in_range():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        placed = random_boundaries(12, 4, rng)
        assert len(placed) == 4 and len(set(placed.tolist())) == 4
        seen.update(placed.tolist())
    assert seen == set(range(1, 12))  # uniform over tokens 1..n-1, never token 0
    assert len(random_boundaries(3, 10, rng)) == 2  # cannot place more than n-1
    assert len(random_boundaries(1, 1, rng)) == 0


# --- The whole stage -----------------------------------------------------------------------


def synthetic_problem(pid: str, n_steps: int, rng, level=None, source="gsm8k"):
    """A solution of n_steps lines; each line starts with reading tokens (IAF high), then a
    computing stretch (IAF low, one heartbeat per line), and JSD jumps at every line start."""
    lines = [f"Then we read {k} facts and compute {k} + 1 = {k + 1} now ok" for k in range(n_steps)]
    text = "\n".join(lines)
    spans = tokenise(text)
    line_starts = [i for i, (start, _) in enumerate(spans) if start > 0 and text[start - 1] == "\n"]
    iaf, jsd = [], []
    for i, (start, end) in enumerate(spans):
        computing = bool(re.search(r"compute|[\d+=]|now|ok", text[start:end]))
        iaf.append(0.15 if computing else 0.8)
        # A smooth bump (a few tokens wide) at each line start: a sharp one-token spike would make
        # the Savitzky-Golay filter ring, and the flat stretch between two ringing dips is a peak too.
        distance = min((abs(i - s) for s in line_starts), default=99)
        jsd.append(0.05 + 0.45 * math.exp(-((distance / 1.5) ** 2)) + 0.005 * rng.random())
    return text, iaf, jsd, {"problem_id": pid, "text": text, "level": level, "subject": None if level is None else "Algebra",
                            "source": source, "n_text_tokens": len(spans)}


@pytest.fixture(scope="module")
def stage_output(cfg):
    rng = np.random.default_rng(1)
    rows, problems = [], []
    for i in range(24):
        level = None if i < 12 else 1 + (i % 5)
        steps = 2 + (i % 4) if level is None else level
        text, iaf, jsd, problem = synthetic_problem(f"p{i:02d}", steps, rng, level=level, source="gsm8k" if level is None else "math")
        rows += token_rows(problem["problem_id"], text, iaf, jsd, heads=("L1H1", "L2H2"))
        problems.append(problem)
    problems.append({"problem_id": "skipped", "text": "no tokens for me", "level": 3, "subject": "Algebra", "source": "math",
                     "n_text_tokens": 4})
    tokens = tokens_frame(rows)
    per_problem, runs, summary = detect_heartbeats(tokens, pl.DataFrame(problems), cfg)
    return tokens, per_problem, runs, summary


def test_detect_heartbeats_per_problem(stage_output):
    _, per_problem, runs, summary = stage_output
    assert per_problem.height == 24 and summary["n_problems_without_tokens"] == 1
    assert set(per_problem.columns) >= {"problem_id", "n_heartbeats", "n_text_tokens", "n_boundaries_pred", "n_boundaries_gold",
                                         "tp", "level", "subject", "source"}
    first = per_problem.row(0, named=True)  # p00: 2 lines
    assert first["n_heartbeats"] == 2  # one computing stretch per line
    assert first["n_boundaries_gold"] == 1  # one line break
    assert first["boundaries_gold"] == first["boundaries_pred"]  # the JSD jump sits on the break
    assert first["tp"] == 1
    # Every heartbeat is at least min_run_length tokens, and its text is the computing stretch.
    assert runs["length"].min() >= 5
    assert runs["span_text"][0].strip().startswith("compute")
    math_rows = per_problem.filter(pl.col("level").is_not_null())
    assert math_rows["n_heartbeats"].to_list() == math_rows["level"].cast(pl.Int32).to_list()  # level L: L lines


def test_detect_heartbeats_summary(stage_output):
    _, per_problem, runs, summary = stage_output
    assert summary["boundary_f1"] == pytest.approx(1.0)
    assert summary["boundary_f1_random"] < 0.9
    assert summary["boundary_f1_diff_low"] > 0
    for name in ("boundary_precision", "boundary_recall", "boundary_f1", "boundary_f1_random", "boundary_f1_diff",
                 "heartbeats_per_problem", "heartbeat_length_pearson", "heartbeat_level_partial"):
        assert {f"{name}_low", f"{name}_high", f"{name}_n"} <= set(summary)
        assert summary[f"{name}_n"] == (12 if "level" in name else 24)
    # Level problems: level L has L lines, so L heartbeats exactly.
    for level in range(1, 6):
        assert summary[f"heartbeats_level_{level}_mean"] == pytest.approx(level)
        assert summary[f"heartbeats_level_{level}_n"] == (3 if level in (3, 4) else 2)
    assert summary["heartbeats_total"] == runs.height == per_problem["n_heartbeats"].sum()
    assert summary["n_heads"] == 2
    # Random boundaries are placed at the JSD rate: tp_random never exceeds the predicted count.
    assert (per_problem["tp_random"] <= per_problem["n_boundaries_pred"]).all()


def test_summary_is_json_ready(stage_output):
    import json

    summary = stage_output[3]
    json.loads(json.dumps(summary, allow_nan=False))


def test_markdown_table_has_values_intervals_and_baselines(stage_output):
    text = render_markdown(stage_output[3])
    assert "| metric | value | 95% CI | n | baseline |" in text
    assert "random at same rate" in text
    assert f"{SEED_CLAIM_LABEL}: 7.0" in text
    assert "24 problems" in text


def test_markdown_says_plainly_when_heartbeats_are_only_length():
    summary = {"confidence": 0.95, "heartbeat_level_partial": 0.05, "heartbeat_level_partial_low": -0.2,
               "heartbeat_level_partial_high": 0.3, "heartbeat_level_partial_n": 40, "heartbeat_beyond_length": False,
               "boundary_f1_diff_low": -0.01, "boundary_f1_diff_high": 0.02}
    text = render_markdown(summary)
    assert "explained by length" in text
    assert "**not** distinguishable from random" in text


def test_markdown_says_worse_than_random_when_the_whole_interval_is_below_zero():
    text = render_markdown({"confidence": 0.95, "boundary_f1_diff_low": -0.03, "boundary_f1_diff_high": -0.01})
    assert "**worse** than random" in text


def test_bad_inputs_are_one_line_errors(cfg, stage_output):
    tokens = stage_output[0]
    problems = pl.DataFrame({"problem_id": ["p00"], "text": ["x"]})
    with pytest.raises(MyceliumError, match=r"tokens table is missing column\(s\) iaf"):
        detect_heartbeats(tokens.drop("iaf"), problems, cfg)
    with pytest.raises(MyceliumError, match=r"problem ids in the tokens table are not in the problems table"):
        detect_heartbeats(tokens, problems, cfg)
    with pytest.raises(MyceliumError, match=r"tokens table is empty"):
        detect_heartbeats(tokens.head(0), problems, cfg)
    gappy = tokens.filter((pl.col("problem_id") == "p00") & (pl.col("token_index") != 3))
    with pytest.raises(MyceliumError, match=r"tokens of problem p00 are not numbered 0..n-1"):
        detect_heartbeats(gappy, pl.DataFrame({"problem_id": ["p00"], "text": ["x"]}), cfg)


def test_named_head_and_missing_optional_columns(cfg, stage_output):
    tokens = stage_output[0].filter(pl.col("problem_id").is_in(["p00", "p01"]))
    problems = stage_output[1].select("problem_id").head(2).join(
        pl.DataFrame({"problem_id": ["p00", "p01"], "text": [synthetic_problem("p", n, np.random.default_rng(1))[0] for n in (2, 3)]}),
        on="problem_id",
    )
    named = cfg.model_copy(update={"head_aggregation": "L2H2"})
    per_problem, _, summary = detect_heartbeats(tokens, problems, named)
    assert per_problem["level"].null_count() == 2 and summary["n_heads"] == 1
    assert per_problem["n_text_tokens"].to_list() == tokens.group_by("problem_id").agg(pl.col("token_index").n_unique()).sort("problem_id")["token_index"].to_list()
    assert summary["heartbeat_beyond_length"] is None  # no levels: nothing to test, and it says so


# --- Figures -------------------------------------------------------------------------------


def is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_written(tmp_path, cfg, stage_output):
    tokens, per_problem, runs, _ = stage_output
    paths = write_figures(tokens, per_problem, runs, cfg, tmp_path / "figures")
    assert [p.name for p in paths] == ["iaf_trace.png", "heartbeats_by_level.png"]
    assert all(is_png(p) for p in paths)


def test_figures_with_nothing_to_show(tmp_path, cfg, stage_output):
    tokens, per_problem, runs, _ = stage_output
    no_levels = per_problem.with_columns(pl.lit(None, dtype=pl.Int8).alias("level"))
    assert is_png(plot_heartbeats_by_level(no_levels, cfg, tmp_path))
    assert plot_iaf_trace(tokens, per_problem, runs, cfg.model_copy(update={"trace_figures": 0}), tmp_path) is None
    assert is_png(plot_iaf_trace(tokens, per_problem, runs, cfg, tmp_path, problem_ids=["p05"]))


def test_one_problem_per_level_draws_without_intervals(tmp_path, cfg, stage_output):
    per_problem = stage_output[1].filter(pl.col("level").is_not_null()).unique("level", keep="first")
    assert is_png(plot_heartbeats_by_level(per_problem, cfg, tmp_path))
