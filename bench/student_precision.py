"""Two students side by side, one problem at a time as stage 06 runs them: the float32 student
(`c3.read_precision: float32`, read by ONNX Runtime float32) and the int8 one (`int8`: C2, C3
and the verifier trained on the int8 graph's features, and read by it at stage 06).

Reads:  config.yaml (+ `--set` overrides, applied to both) and both trained students in the
        artifact store: run `mycelium run` once with each precision first (with
        `--set c3.read_precision=int8` for the second; stages 00-03 and the tuned backbone are
        shared, so the second run retrains only C2, C3 and the verifier, ~10 minutes on the
        embedded default). Writes nothing.
Time:   ~1-2 minutes for 500 problems on 2 CPU cores.
You see: for each student its accuracy (Wilson 95%), read, search and read + search p50/p95;
        int8 over float32 as median paired ratios with bootstrap 95% intervals (read, and read
        + search); read + search for the problems with 1-2 gold steps against the issue's
        15 ms target, with a bootstrap interval on each p50; how often the two answer alike,
        with McNemar's exact p on what each gets right; and the int8 student's read + search
        on `eval.int8_read_threads` over the same on torch's thread count (a third reader, the
        same features, so the same answers).

    python bench/student_precision.py [--n 500] [--set dataset.source=embedded:sample --set eval.dataset=embedded:gsm8k-test]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dataclasses

import numpy as np
import torch

from mycelium import solver, stats
from mycelium.reports import format_rate
from tasks import evaluate
from trained_student import BOOTSTRAP_RESAMPLES, parse_arguments, percentiles, trained_student

PRECISIONS = ("float32", "int8")
OTHER_THREADS = "int8, torch's threads"  # the int8 student read on torch.get_num_threads() threads


def paired_ratio(numerator: np.ndarray, denominator: np.ndarray, seed: int) -> str:
    ratio = stats.bootstrap_interval(numerator / denominator, statistic=np.median, resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    return f"{ratio.estimate:.2f} [{ratio.low:.2f}, {ratio.high:.2f}] (median paired ratio, bootstrap 95%, n={ratio.n})"


def median_with_interval(ms: np.ndarray, seed: int) -> str:
    median = stats.bootstrap_interval(ms, statistic=np.median, resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    return f"p50 {median.estimate:.1f} [{median.low:.1f}, {median.high:.1f}] ms"


def main() -> int:
    args = parse_arguments(__doc__.splitlines()[0], default_n=500)
    students = {precision: trained_student([*args.set, f"c3.read_precision={precision}"]) for precision in PRECISIONS}
    reference = students[PRECISIONS[0]]
    cfg = reference.cfg
    rows = reference.store.read(reference.refs["problems_eval"], "problems").head(args.n).to_dicts()
    encoders = {precision: trained.encoder() for precision, trained in students.items()}
    encoders[OTHER_THREADS] = dataclasses.replace(encoders["int8"], model=encoders["int8"].model.with_threads(torch.get_num_threads()))
    settings = {precision: evaluate.search_settings(trained.cfg) for precision, trained in students.items()}
    for precision, trained in students.items():  # one untimed problem each: first-call allocations are not a problem's cost
        solver.solve(trained.student, trained.read(encoders[precision], str(rows[0]["problem"])), settings[precision])

    readers = (*PRECISIONS, OTHER_THREADS)
    read_ms = {reader: [] for reader in readers}
    search_ms = {reader: [] for reader in readers}
    right = {reader: [] for reader in readers}
    same_answer = same_threads = 0
    for i, row in enumerate(rows):
        answers = {}
        # Rotate which reader goes first, so none always meets a warm cache.
        shift = i % len(readers)
        for reader in readers[shift:] + readers[:shift]:
            precision = "float32" if reader == "float32" else "int8"
            trained = students[precision]
            started = time.perf_counter()
            problem = trained.read(encoders[reader], str(row["problem"]))
            read = time.perf_counter()
            answers[reader] = evaluate.format_answer(solver.solve(trained.student, problem, settings[precision]).answer)
            search_ms[reader].append(1000 * (time.perf_counter() - read))
            read_ms[reader].append(1000 * (read - started))
            is_math = evaluate.is_math_row(row)
            right[reader].append(evaluate.correct(evaluate.check(answers[reader], row.get("answer"), is_math, cfg), is_math))
        same_answer += answers["float32"] == answers["int8"]
        same_threads += answers["int8"] == answers[OTHER_THREADS]

    n = len(rows)
    step_settings = evaluate.gold_step_settings(cfg)
    easy = np.array([0 < evaluate.gold_step_count(row, step_settings) <= cfg.eval.easy_max_steps for row in rows])
    total = {reader: np.array(read_ms[reader]) + np.array(search_ms[reader]) for reader in readers}
    print(f"{n} problems of {cfg.eval.dataset}; {int(easy.sum())} of them with 1-{cfg.eval.easy_max_steps} gold steps")
    for precision, trained in students.items():
        print(f"{precision} student (C3 {trained.refs['c3_model'].digest}): right {format_rate(stats.rate_with_interval(sum(right[precision]), n))}")
        print(f"  read {percentiles(read_ms[precision])}   search {percentiles(search_ms[precision])}   read + search {percentiles(list(total[precision]))}")
        if easy.any():
            print(f"  read + search, 1-{cfg.eval.easy_max_steps} gold steps: {median_with_interval(total[precision][easy], cfg.eval.seed)} "
                  f"(read {median_with_interval(np.array(read_ms[precision])[easy], cfg.eval.seed)}); issue target p50 <= 15 ms")
    print(f"int8 / float32 read: {paired_ratio(np.array(read_ms['int8']), np.array(read_ms['float32']), cfg.eval.seed)}")
    print(f"int8 / float32 read + search: {paired_ratio(total['int8'], total['float32'], cfg.eval.seed)}")
    test = evaluate.mcnemar(right["int8"], right["float32"])
    print(f"same answer {same_answer}/{n}; int8 vs float32 right: {test['only_student']} vs {test['only_other']} discordant, "
          f"McNemar p = {test['p_value']:.3g}")
    print(f"int8 read + search on eval.int8_read_threads={cfg.eval.int8_read_threads} over {torch.get_num_threads()} threads: "
          f"{paired_ratio(total['int8'], total[OTHER_THREADS], cfg.eval.seed)}; same answer {same_threads}/{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
