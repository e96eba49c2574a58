"""Two trained students on the same evaluated problems: accuracy side by side and McNemar's
exact test, from the stage 06 artifacts two configs already produced.

Reads:  config.yaml with two override lists (`--a`, `--b`, each repeatable), and the
        `evaluation` artifact each config's `mycelium run`/`mycelium eval` wrote (the flow's
        artifact addresses, `flows.pipeline.artifact_refs`, find them). Writes nothing.
Time:   seconds.
You see: per student its accuracy with count and Wilson 95% interval, the gold answer among
        its finished chains, and its latency p50 for easy and hard problems; then the
        discordant pairs and McNemar's p, both on the teacher's seeded subset, and the
        accuracy split by gold chain length.

    python bench/compare_students.py --a c3.unfreeze=never --b c3.unfreeze=always
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import polars as pl

from flows.pipeline import artifact_refs
from mycelium.config import load_config
from mycelium.store import ArtifactStore
from tasks import evaluate
from tasks.teacher_cot import select_problems, teacher_subset
from trained_student import GSM8K_DEFAULTS, percent

# Both students evaluated without the teacher (it does not depend on the student); the subset
# its chain of thought would run on is recomputed below with the configured teacher_problems.
DEFAULTS = [*GSM8K_DEFAULTS, "eval.teacher_problems=0"]
LENGTHS = {"2 steps or fewer": (0, 2), "3 steps": (3, 3), "4 or more": (4, 99)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", action="append", default=[], help="override for student A, dotted key=value (repeatable)")
    parser.add_argument("--b", action="append", default=[], help="override for student B (repeatable)")
    args = parser.parse_args()
    store = ArtifactStore.from_settings()
    results = {}
    for name, overrides in (("A", args.a), ("B", args.b)):
        ref = artifact_refs(store, load_config(None, [*DEFAULTS, *overrides]))["evaluation"]
        if not store.is_complete(ref):
            print(f"bench: no evaluation for student {name} ({' '.join(overrides) or 'defaults'}) in {store.root}; "
                  "run `mycelium eval` with the same --set first", file=sys.stderr)
            return 2
        results[name] = store.read(ref, "results").sort("problem_id")
    a, b = results["A"], results["B"]
    if a["problem_id"].to_list() != b["problem_id"].to_list():
        print("bench: the two evaluations are not on the same problems", file=sys.stderr)
        return 2
    for name, overrides in (("A", args.a), ("B", args.b)):
        r = results[name]
        easy = r.filter(pl.col("n_gold_steps").is_between(1, 2))["student_ms"]
        hard = r.filter(pl.col("n_gold_steps") > 2)["student_ms"]
        print(f"student {name} ({' '.join(overrides) or 'defaults'}): accuracy {percent(int(r['student_correct'].sum()), r.height)}; "
              f"gold among finished chains {percent(int(r['student_in_pool'].sum()), r.height)}; "
              f"latency p50 {easy.median():.1f} ms (1-2 steps, n={easy.len()}) / {hard.median():.1f} ms (more, n={hard.len()})")
    test = evaluate.mcnemar(b["student_correct"].to_list(), a["student_correct"].to_list())
    print(f"B right where A is wrong: {test['only_student']}; A right where B is wrong: {test['only_other']}; McNemar exact p = {test['p_value']:.3g}")
    # The teacher's chain of thought runs on a seeded subset (eval.teacher_problems; pass the
    # value the compared run used); both students on those ids, for a comparison with it.
    subset_cfg = load_config(None, [*GSM8K_DEFAULTS, *args.b])
    refs = artifact_refs(store, subset_cfg)
    evaluated = select_problems(store, refs["problems_eval"], refs["training_sets"], subset_cfg)["problem_id"].to_list()
    subset = set(teacher_subset(evaluated, subset_cfg))
    if subset:  # empty with eval.teacher_problems=0
        for name in ("A", "B"):
            on = results[name].filter(pl.col("problem_id").is_in(subset))
            print(f"student {name} on the teacher's {len(subset)}-problem subset (eval.seed {subset_cfg.eval.seed}): {percent(int(on['student_correct'].sum()), on.height)}")
    for label, (low, high) in LENGTHS.items():
        rows = pl.col("n_gold_steps").is_between(low, high)
        pa, pb = a.filter(rows), b.filter(rows)
        print(f"  {label:<17} A {percent(int(pa['student_correct'].sum()), pa.height)}   B {percent(int(pb['student_correct'].sum()), pb.height)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
