"""The student's per-problem latency, taken apart: the backbone read, and the search with and
without `eval.prune_margin` and with and without the chain verifier, measured side by side on
the same problems in one run.

Reads:  config.yaml (+ `--set` overrides) and the trained student in the artifact store — the
        C2/C3/planner artifacts that `mycelium run` built for this config (by default: trained
        on GSM8K train, evaluated on GSM8K test; run stages 00-05 on GSM8K train first).
Writes: nothing.
Time:   ~1-2 minutes for 300 problems on 2 CPU cores.
You see: for each part its p50/p95 in ms (the read runs as stage 06 runs it,
        `eval.backbone_runtime`); the pruned / unpruned search time and the search with /
        without the verifier's re-scoring as median paired ratios with bootstrap 95%
        intervals; the same for the search with each chain's candidate table built whole (as
        before `c3_model.candidate_tables`), with every (query, chain) row scored against all
        its chain's candidates (as before `PointerScorer.score_rows` shared the first chain's
        scores), with C3 scoring every (chain, option) pair of a depth (as before
        `solver.best_computable_bounded`), and with both (the search as it was before either);
        how often the variants give the default's answer and how many each gets right (pruning never changes the best chain, only how much the
        far-behind chains add to the vote; the verifier changes which chain wins; the tables,
        row scores and beams are the same either way); and read + search for all problems, and for
        those with 1-2 and with 3+ gold steps against the issue's 15 ms and 150 ms targets, each
        p50 with a bootstrap 95% interval.

`--against KEY=VALUE` (repeatable) adds one more search: the default's settings with those
overrides (the same trained student and verifier), e.g. the search settings before a change:

    python bench/student_search.py [--n 300] [--set eval.prune_margin=2.0] [--set eval.rerank=false]
    python bench/student_search.py --n 1319 --against eval.prune_margin=3 --against eval.planner_top_k=6
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from mycelium import c3_model, solver, stats
from mycelium.reports import format_rate
from tasks import evaluate
from trained_student import BOOTSTRAP_RESAMPLES, config_with, parse_arguments, percentiles, trained_student


TABLES_PER_CHAIN = "tables built per chain"
ROWS_PER_CHAIN = "every chain's rows scored"
EVERY_PAIR = "every (chain, option) scored"
BOTH = "every pair and every row scored"
# The latency targets (the seed's figures), per problem on CPU: what the bench reports against.
EASY_TARGET_MS, HARD_TARGET_MS = 15, 150


@contextlib.contextmanager
def every_pair_scored():
    """The planned search as it was before `solver.best_computable_bounded`: C3 scores every
    (chain, option) pair of a depth, then C4 walks the ranking (the same beam, more work)."""
    bounded = solver.best_computable_bounded

    def everything(student, problem, chains, options, width, settings, floor=-float("inf")):
        return solver.best_computable(solver.ranked_proposals(student, problem, chains, options, settings), width, settings, floor)

    solver.best_computable_bounded = everything
    try:
        yield
    finally:
        solver.best_computable_bounded = bounded


def score_every_row(model, query, text, numeric, chain_of_row, query_of_row):
    """`PointerScorer.score_rows` as it was before it shared the first chain's scores: every
    (query, chain) row against every candidate of its chain (the same numbers, more work)."""
    hidden = model.score[0].out_features
    candidate_layer = model.candidate[0]
    text_part = text @ candidate_layer.weight[:, : text.shape[1]].T
    c = torch.nn.functional.gelu(text_part[None] + numeric @ candidate_layer.weight[:, text.shape[1] :].T + candidate_layer.bias)
    q = model.query(query)
    w_query, w_candidate, w_product = model.score[0].weight.split(hidden, dim=1)
    pair = ((q @ w_query.T)[query_of_row][:, None, :] + (c @ w_candidate.T + model.score[0].bias)[chain_of_row]
            + (q[query_of_row][:, None, :] * c[chain_of_row]) @ w_product.T)
    return torch.log_softmax(model.score[2](torch.nn.functional.gelu(pair)).squeeze(-1), dim=-1)


@contextlib.contextmanager
def every_row_scored():
    shared = c3_model.PointerScorer.score_rows
    c3_model.PointerScorer.score_rows = score_every_row
    try:
        yield
    finally:
        c3_model.PointerScorer.score_rows = shared


@contextlib.contextmanager
def tables_built_per_chain():
    """The search as it was before `c3_model.candidate_tables`: every chain's candidate table
    built whole, on its own (the same tables; only the time differs)."""
    shared = c3_model.candidate_tables

    def one_by_one(problem, step_index, chains_prior_values, domain_constants, vocab, chains_uses):
        return [c3_model.candidate_table(problem, step_index, list(range(step_index)), values, domain_constants, vocab, uses)
                for values, uses in zip(chains_prior_values, chains_uses, strict=True)]

    c3_model.candidate_tables = one_by_one
    try:
        yield
    finally:
        c3_model.candidate_tables = shared


# What each variant swaps in for the length of its search (the others run the code as it is).
SWAPS = {TABLES_PER_CHAIN: [tables_built_per_chain], ROWS_PER_CHAIN: [every_row_scored], EVERY_PAIR: [every_pair_scored],
         BOTH: [every_pair_scored, every_row_scored]}


def main() -> int:
    args = parse_arguments(__doc__.splitlines()[0], default_n=300, against=True)

    trained = trained_student(args.set)
    cfg, store, refs, student = trained.cfg, trained.store, trained.refs, trained.student
    if cfg.eval.prune_margin is None:
        print("bench: eval.prune_margin is null; set a margin to compare against the unpruned search", file=sys.stderr)
        return 2

    pruned = evaluate.search_settings(cfg)
    unpruned = evaluate.search_settings(cfg)
    unpruned.prune_margin = None
    variants = {"unpruned": unpruned}
    if pruned.rerank and student.verifier is not None:
        variants["no verifier"] = evaluate.search_settings(cfg)
        variants["no verifier"].rerank = False
    if args.against:
        variants["--against " + " ".join(args.against)] = evaluate.search_settings(config_with([*args.set, *args.against]))
    variants[TABLES_PER_CHAIN] = pruned
    variants[ROWS_PER_CHAIN] = pruned
    variants[EVERY_PAIR] = pruned
    variants[BOTH] = pruned
    rows = store.read(refs["problems_eval"], "problems").head(args.n).to_dicts()
    encoder = trained.encoder()

    read_ms, default_ms = [], []
    variant_ms = {name: [] for name in variants}
    same = dict.fromkeys(variants, 0)
    right: dict[str, list[bool]] = {name: [] for name in ["default", *variants]}
    for row in rows:
        started = time.perf_counter()
        problem = trained.read(encoder, str(row["problem"]))
        read_ms.append(1000 * (time.perf_counter() - started))
        # Rotate which search runs first, so none always meets a warm cache.
        order = [("default", pruned, default_ms), *((name, settings, variant_ms[name]) for name, settings in variants.items())]
        shift = len(read_ms) % len(order)
        answers = {}
        for name, settings, sink in order[shift:] + order[:shift]:
            with contextlib.ExitStack() as stack:
                for swap in SWAPS.get(name, []):
                    stack.enter_context(swap())
                started = time.perf_counter()
                answers[name] = solver.solve(student, problem, settings).answer
                sink.append(1000 * (time.perf_counter() - started))
        for name in variants:
            same[name] += answers[name] == answers["default"]
        is_math = evaluate.is_math_row(row)
        for name, answer in answers.items():
            right[name].append(evaluate.correct(evaluate.check(evaluate.format_answer(answer), row.get("answer"), is_math, cfg), is_math))

    n = len(rows)
    print(f"{n} problems of {cfg.eval.dataset}, student from {refs['c3_model'].digest}, {1 + len(variants)} searches per problem")
    print(f"backbone read (one problem, {cfg.eval.backbone_runtime:<11})  {percentiles(read_ms)}")
    verifier_note = "with the verifier" if "no verifier" in variants else "no verifier in this student"
    print(f"search, prune_margin={cfg.eval.prune_margin:<4g} ({verifier_note})  {percentiles(default_ms)}   "
          f"right {format_rate(stats.rate_with_interval(sum(right['default']), n))}")
    for name in variants:
        # median of per-problem ratios, percentile bootstrap over problems
        ratio = stats.bootstrap_interval(np.array(default_ms) / np.array(variant_ms[name]), statistic=np.median, resamples=BOOTSTRAP_RESAMPLES,
                                         seed=cfg.eval.seed)
        print(f"search, {name:<29} {percentiles(variant_ms[name])}")
        print(f"  default / {name} search time: median paired ratio {ratio.estimate:.2f} [{ratio.low:.2f}, {ratio.high:.2f}] "
              f"(bootstrap 95%, n={ratio.n}); same answer as the default {same[name]}/{n}; right "
              f"{format_rate(stats.rate_with_interval(sum(right[name]), n))}, McNemar p = {evaluate.mcnemar(right['default'], right[name])['p_value']:.3g}")
    total = np.array(read_ms) + np.array(default_ms)
    print(f"read + default search, all problems: {percentiles(list(total))}")
    step_settings = evaluate.gold_step_settings(cfg)
    steps = np.array([evaluate.gold_step_count(row, step_settings) for row in rows])
    for name, subset, target_ms in [(f"1-{cfg.eval.easy_max_steps} gold steps", (steps > 0) & (steps <= cfg.eval.easy_max_steps), EASY_TARGET_MS),
                                    (f"{cfg.eval.easy_max_steps + 1}+ gold steps", steps > cfg.eval.easy_max_steps, HARD_TARGET_MS)]:
        if not subset.any():
            continue
        median = stats.bootstrap_interval(total[subset], statistic=np.median, resamples=BOOTSTRAP_RESAMPLES, seed=cfg.eval.seed)
        print(f"read + default search, the {int(subset.sum())} with {name}: {percentiles(list(total[subset]))}, "
              f"p50 {median.estimate:.1f} [{median.low:.1f}, {median.high:.1f}] ms (bootstrap 95%, n={median.n}; "
              f"read {percentiles(list(np.array(read_ms)[subset]))}); issue target p50 <= {target_ms:g} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
