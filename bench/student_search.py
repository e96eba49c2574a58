"""The student's per-problem latency, taken apart: the backbone read, and the search with and
without `eval.prune_margin`, measured side by side on the same problems in one run.

Reads:  config.yaml (+ `--set` overrides) and the trained student in the artifact store — the
        C2/C3/planner artifacts that `mycelium run` built for this config (by default: trained
        on GSM8K train, evaluated on GSM8K test; run stages 00-05 on GSM8K train first).
Writes: nothing.
Time:   ~1 minute for 300 problems on 2 CPU cores.
You see: for each part its p50/p95 in ms; the pruned / unpruned search time as a median paired
        ratio with a bootstrap 95% interval; how often the two searches give the same answer
        (pruning never changes the best chain, only how much the far-behind chains add to the
        vote); and read + search against the issue's 15 ms (1-2 step) target.

    python bench/student_search.py [--n 300] [--set eval.prune_margin=2.0]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

from mycelium import solver, stats
from tasks import evaluate
from trained_student import BOOTSTRAP_RESAMPLES, parse_arguments, percentiles, trained_student


def main() -> int:
    args = parse_arguments(__doc__.splitlines()[0], default_n=300)

    trained = trained_student(args.set)
    cfg, store, refs, student = trained.cfg, trained.store, trained.refs, trained.student
    if cfg.eval.prune_margin is None:
        print("bench: eval.prune_margin is null; set a margin to compare against the unpruned search", file=sys.stderr)
        return 2

    pruned = evaluate.search_settings(cfg)
    unpruned = evaluate.search_settings(cfg)
    unpruned.prune_margin = None
    texts = store.read(refs["problems_eval"], "problems")["problem"].head(args.n).to_list()
    encoder = trained.encoder()

    read_ms, pruned_ms, unpruned_ms, same = [], [], [], 0
    for text in texts:
        started = time.perf_counter()
        problem = trained.read(encoder, text)
        read_ms.append(1000 * (time.perf_counter() - started))
        # Alternate which search runs first, so neither always meets a warm cache.
        order = [(pruned, pruned_ms), (unpruned, unpruned_ms)]
        answers = []
        for settings, sink in order if len(read_ms) % 2 else order[::-1]:
            started = time.perf_counter()
            answers.append(solver.solve(student, problem, settings).answer)
            sink.append(1000 * (time.perf_counter() - started))
        same += answers[0] == answers[1]

    n = len(texts)
    # median of per-problem ratios, percentile bootstrap over problems
    ratio = stats.bootstrap_interval(np.array(pruned_ms) / np.array(unpruned_ms), statistic=np.median, resamples=BOOTSTRAP_RESAMPLES,
                                     seed=cfg.eval.seed)
    total = np.array(read_ms) + np.array(pruned_ms)
    print(f"{n} problems of {cfg.eval.dataset}, student from {refs['c3_model'].digest}, 2 x search per problem")
    print(f"backbone read (MiniLM, one problem)   {percentiles(read_ms)}")
    print(f"search, prune_margin={cfg.eval.prune_margin:<4g}          {percentiles(pruned_ms)}")
    print(f"search, no pruning                    {percentiles(unpruned_ms)}")
    print(f"pruned / unpruned search time: median paired ratio {ratio.estimate:.2f} [{ratio.low:.2f}, {ratio.high:.2f}] (bootstrap 95%, n={ratio.n})")
    print(f"same answer from both searches: {same}/{n}")
    print(f"read + pruned search: {percentiles(list(total))} (issue target for 1-2 step problems: p50 <= 15 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
