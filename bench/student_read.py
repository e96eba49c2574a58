"""The student's backbone read in float32 against the same backbone with int8 dynamic
quantisation of its linear layers, side by side on the same problems in one run.

Reads:  config.yaml (+ `--set` overrides) and the trained student in the artifact store (by
        default trained on GSM8K train, evaluated on GSM8K test; run stages 00-05 on GSM8K
        train first). Writes nothing.
Time:   ~1-2 minutes for 300 problems on 2 CPU cores.
You see: each read's p50/p95 in ms and the int8 / float32 read time as a median paired ratio
        with a bootstrap 95% interval; then what the quantised features do to the answers:
        how often the two give the same answer, and each one's accuracy (Wilson 95%) with
        McNemar's exact p on the same problems. The C2/C3/planner heads were trained on
        float32 features, so the int8 column is the cost of reading with a model the heads
        never saw; it is a measurement, not a setting the pipeline uses.

    python bench/student_read.py [--n 300]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from mycelium import solver, stats
from mycelium.reports import format_rate
from tasks import evaluate
from trained_student import BOOTSTRAP_RESAMPLES, parse_arguments, percentiles, trained_student


def main() -> int:
    args = parse_arguments(__doc__.splitlines()[0], default_n=300)

    trained = trained_student(args.set)
    cfg, store, refs, student = trained.cfg, trained.store, trained.refs, trained.student
    settings = evaluate.search_settings(cfg)
    rows = store.read(refs["problems_eval"], "problems").head(args.n).to_dicts()
    full, quantised = trained.encoder(), trained.encoder()
    quantised.model = torch.ao.quantization.quantize_dynamic(quantised.model, {torch.nn.Linear}, dtype=torch.qint8)

    read_ms = {"float32": [], "int8": []}
    right = {"float32": [], "int8": []}
    same = 0
    for i, row in enumerate(rows):
        answers = {}
        # Alternate which read runs first, so neither always meets a warm cache.
        for name, encoder in [("float32", full), ("int8", quantised)][:: 1 if i % 2 else -1]:
            started = time.perf_counter()
            problem = trained.read(encoder, str(row["problem"]))
            read_ms[name].append(1000 * (time.perf_counter() - started))
            answers[name] = evaluate.format_answer(solver.solve(student, problem, settings).answer)
            right[name].append(bool(evaluate.check(answers[name], row.get("answer"), evaluate.is_math_row(row), cfg)["numeric"]))
        same += answers["float32"] == answers["int8"]

    n = len(rows)
    ratio = stats.bootstrap_interval(np.array(read_ms["int8"]) / np.array(read_ms["float32"]), statistic=np.median,
                                     resamples=BOOTSTRAP_RESAMPLES, seed=cfg.eval.seed)
    print(f"{n} problems of {cfg.eval.dataset}, backbone {trained.inputs.get('student_backbone', cfg.c3.backbone)}")
    for name in read_ms:
        accuracy = stats.rate_with_interval(sum(right[name]), n)
        print(f"read, {name:<8} {percentiles(read_ms[name])}   student accuracy {format_rate(accuracy)}")
    print(f"int8 / float32 read time: median paired ratio {ratio.estimate:.2f} [{ratio.low:.2f}, {ratio.high:.2f}] (bootstrap 95%, n={ratio.n})")
    test = evaluate.mcnemar(right["int8"], right["float32"])
    print(f"same answer: {same}/{n}; McNemar int8 vs float32 p = {test['p_value']:.3g} ({test['only_student']} vs {test['only_other']} discordant)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
