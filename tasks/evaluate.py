"""Stage 06 — evaluate the student (C2 → C3 → C4, no chain of thought) against baselines.

Reads:  the evaluation problems (`eval.dataset`: by default the 500 GSM8K test problems
        shipped with the package; null: the held-out validation split of the training set; or
        any dataset: GSM8K test, MATH-500, a JSONL with question and answer fields), the tuned
        backbone and the C2 model (stage 04; the student reads each problem once with it), the
        C3 model, features and chain verifier (stage 05), the training sets (stage 03:
        skeletons per label, the nearest-neighbour pool), the teacher, and the `eval`, `c2`,
        `c3`, `c4`, `steps`, `teacher` config sections.
Writes: artifact `teacher_cot` (table `answers`: the teacher's generated text, extracted answer
        and, for its timed problems, seconds — cached apart, since it is the slow part) and
        artifact `evaluation` with table `results` (one row per problem: gold, every system's
        answer and correctness, the student's labels, chain and latency) and files
        `summary.json`, `accuracy.png`, `accuracy_by_length.png`.
Time:   the student: one MiniLM pass per problem (ONNX Runtime by default, `eval.backbone_runtime`;
        exported once, ~10 s) plus the search, ~10-100 ms on 2 CPU cores; the nearest-neighbour
        and gold-plan baselines each run one more (fixed-plan) search per problem, untimed —
        all 1,319 GSM8K test problems take 1-2 min in all.
        The teacher's chain of thought (tasks/teacher_cot.py): the `eval.teacher_problems`
        subset (500 by default, batched after the first 10) costs ~22 min on 2 CPU cores.
You should see: accuracy with count and 95% Wilson interval for the student, the teacher's own
chain of thought, the nearest-neighbour baseline, the gold plan with C3's operands and the oracle; McNemar p-values of the
student against each; correct-in-beam@k; the share of problems where the search found any
valid chain; latency p50 (with a bootstrap interval over problems) and p95 for easy and hard
problems, and the teacher / student latency ratio with its interval; per MATH level and subject; and by
the length of the gold solution (steps, the last group `eval.max_steps` or more — longer than
the search builds) each system's accuracy beside how often the student's pool held the gold
answer, as a table and `accuracy_by_length.png`.

Systems, on the same problem ids:
  student    C2 labels → beam search over chains (C3 operands, C4 arithmetic) → the chain
             verifier re-scores the finished chains (stage 05, when it beat the search on
             validation; `eval.rerank`) → voted answer.
  teacher    the teacher generates its chain of thought (greedy); its final answer is
             extracted (boxed, ####, "the answer is", else the last number).
  nearest    the most similar training problem (cosine of the same MiniLM embedding) lends
             its step sequence (label, skeleton per step); C3 fills the operands.
  gold_plan  the problem's own gold step sequence (label and skeleton per step, as the
             oracle reads them) with C3 filling the operands — the student given a perfect
             step planner, so that its gap to the student is what planning costs and its gap
             to the oracle what choosing operands costs. Defined where the oracle is.
  oracle     the problem's own gold steps (stage 02's splitter) and gold operands (stage
             03's provenance) through C4 — what the assembler can express at best. Defined
             only where the gold solution has annotated steps.
Answer checks: numbers within `eval.answer_rel_tol` (GSM8K style); for MATH rows also
math-verify and the Hendrycks normalised string check, reported side by side.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from prefect import get_run_logger, task
from scipy import stats as scipy_stats

from mycelium import (
    answers,
    c2_model,
    c3_model,
    onnx_read,
    planner,
    provenance,
    solver,
    stats,
    steps,
    verifier,
)
from mycelium.config import MyceliumConfig, Settings
from mycelium.reports import ReportSection
from mycelium.store import (
    ArtifactRef,
    ArtifactStore,
    artifact_digest,
    source_code_version,
)
from tasks.teacher_cot import select_problems

STEP = "evaluation"
SYSTEMS = ("student", "teacher", "nearest", "gold_plan", "oracle")
RESULTS_SCHEMA = {
    "problem_id": pl.Utf8, "level": pl.Int64, "subject": pl.Utf8, "source": pl.Utf8, "gold": pl.Utf8, "n_gold_steps": pl.Int32,
    "student_answer": pl.Utf8, "student_correct": pl.Boolean, "student_numeric": pl.Boolean, "student_math_verify": pl.Boolean,
    "student_hendrycks": pl.Boolean, "student_in_beam": pl.Boolean, "student_in_pool": pl.Boolean, "student_labels": pl.List(pl.Utf8), "student_expression": pl.Utf8,
    "student_chains": pl.Int32, "student_ms": pl.Float64, "nearest_problem": pl.Utf8, "nearest_answer": pl.Utf8,
    "nearest_correct": pl.Boolean, "gold_plan_answer": pl.Utf8, "gold_plan_correct": pl.Boolean, "oracle_answer": pl.Utf8, "oracle_correct": pl.Boolean, "teacher_answer": pl.Utf8,
    "teacher_correct": pl.Boolean, "teacher_ms": pl.Float64, "teacher_text": pl.Utf8,
}
MATH_SOURCE = "math"


def _code_version() -> str:
    return source_code_version(sys.modules[__name__], solver, c3_model, c2_model, planner, answers, provenance, verifier, onnx_read)


def evaluation_ref(store: ArtifactStore, cfg: MyceliumConfig, inputs: dict[str, ArtifactRef]) -> ArtifactRef:
    payload = {"eval": cfg.eval.digest_payload(), "teacher": {k: v for k, v in cfg.teacher.digest_payload().items() if k not in ("device", "torch_threads")},
               "c4": cfg.c4.digest_payload(), "steps": cfg.steps.digest_payload()}
    return store.ref(STEP, artifact_digest(STEP, payload, [inputs[k] for k in sorted(inputs)], _code_version()))


def is_math_row(row: dict) -> bool:
    """MATH-style rows (LaTeX answers) carry a level or subject; the shipped sample also says so."""
    return row.get("source") == MATH_SOURCE or row.get("level") is not None or bool(row.get("subject"))


def format_answer(value: float | None) -> str | None:
    if value is None:
        return None
    return str(int(round(value))) if float(value).is_integer() else repr(float(value))


# --- loading the student ---------------------------------------------------------------------------


def load_student(store: ArtifactStore, inputs: dict[str, ArtifactRef], cfg: MyceliumConfig) -> solver.Student:
    c2_files = {name: store.read_file(inputs["c2_model"], name) for name in ("c2_heads.safetensors", "c2_config.json")}
    heads, c2_config = c2_model.load_c2(c2_files)
    c3_files = {name: store.read_file(inputs["c3_model"], name) for name in ("c3_pointer.safetensors", "c3_config.json")}
    pointer, vocab, c3_config = c3_model.load_c3(c3_files)
    slots = store.read(inputs["training_sets"], "c3_slots").filter(pl.col("split") == "train")
    counts = slots.group_by("label", "skeleton").len().sort(["label", "len", "skeleton"], descending=[False, True, False])
    by_label: dict[str, list[str]] = {}
    for label, skeleton, _ in counts.iter_rows():
        by_label.setdefault(label, []).append(skeleton)
    files = store.manifest(inputs["c3_model"]).files
    plan_model, plan_vocab = (planner.load_planner({name: store.read_file(inputs["c3_model"], name) for name in ("planner.safetensors", "planner_config.json")})
                              if "planner.safetensors" in files else (None, None))
    chain_verifier = (verifier.load_verifier({name: store.read_file(inputs["verifier"], name) for name in ("verifier.safetensors", "verifier_config.json")})
                      if "verifier" in inputs else None)
    return solver.Student(heads, list(c2_config["labels"]), pointer, vocab, by_label, list(c3_config.get("unused_mentions_log_prior", [])),
                          plan_model, plan_vocab, chain_verifier)


def search_settings(cfg: MyceliumConfig) -> solver.SearchSettings:
    e = cfg.eval
    return solver.SearchSettings(cfg.c2.threshold, e.beam_width, e.mcts_max_paths, e.max_steps, e.skeletons_per_label, e.voting,
                                 e.numerical_consistency_boost, e.simplicity_penalty, cfg.steps.expression_timeout_s,
                                 cfg.steps.max_expression_length, dict(cfg.c4.domain_constants), e.answer_digits, e.require_all_labels,
                                 e.coverage_prior, e.step_choice, e.planner_top_k, e.planner_uses_c2, e.prune_margin, e.rerank,
                                 e.first_scored_pairs)


# --- checking answers ----------------------------------------------------------------------------------


def check(predicted: str | None, gold: str | None, is_math: bool, cfg: MyceliumConfig) -> dict[str, bool | None]:
    """numeric, and for MATH rows also math_verify and hendrycks (None where not applicable)."""
    if gold is None:
        return {"numeric": None, "math_verify": None, "hendrycks": None}
    if predicted is None:
        return {"numeric": False, "math_verify": False if is_math else None, "hendrycks": False if is_math else None}
    return {
        "numeric": answers.check_numeric(predicted, gold, cfg.eval.answer_rel_tol),
        "math_verify": answers.check_math_verify(predicted, gold, cfg.eval.check_timeout_s) if is_math else None,
        "hendrycks": answers.check_hendrycks(predicted, gold) if is_math else None,
    }


def correct(result: dict[str, bool | None], is_math: bool) -> bool:
    """The headline verdict: math-verify on MATH rows, the numeric check elsewhere."""
    return bool(result["math_verify"] if is_math else result["numeric"])


# --- baselines -----------------------------------------------------------------------------------------


def gold_step_settings(cfg: MyceliumConfig) -> steps.StepSettings:
    """How stage 06 splits a gold solution into steps (the oracle, and the easy / hard split)."""
    return steps.StepSettings(timeout_s=cfg.steps.expression_timeout_s, max_length=cfg.steps.max_expression_length,
                              rel_tol=cfg.steps.result_rel_tol, pow_subtypes=list(cfg.ib.pow_subtypes), labels=list(cfg.c2.labels))


def gold_steps(row: dict, step_settings: steps.StepSettings) -> list[steps.Step]:
    """The steps of the row's gold solution (none: it has no annotated step stage 02 can read)."""
    return steps.split_solution({"problem_id": row["problem_id"], "solution": row.get("solution") or ""}, step_settings).steps


def gold_step_count(row: dict, step_settings: steps.StepSettings) -> int:
    """The number of steps of the row's gold solution (0: none could be read)."""
    return len(gold_steps(row, step_settings))


def gold_plan(split: list[steps.Step]) -> list[tuple[str, str]]:
    """The gold solution's (label, skeleton) per step, in order: what a perfect planner proposes."""
    return [(step.label, provenance.skeleton_of(step.expression_text)) for step in split]


def oracle_answer(row: dict, split: list[steps.Step], prov_settings: provenance.ProvenanceSettings, search: solver.SearchSettings) -> float | None:
    """Gold steps (`split`, at least one) and gold operands through C4."""
    step_rows = [{"step_index": s.index, "expression": s.expression_text, "result": s.result_text, "value": s.value,
                  "char_start": s.char_start, "char_end": s.char_end} for s in split]
    labelled = provenance.label_problem(str(row["problem_id"]), str(row["problem"]), str(row["solution"]), step_rows, prov_settings)
    by_step: dict[int, list] = {}
    for operand in labelled.operands:
        by_step.setdefault(operand.step_index, []).append(operand)
    position = {s["step_index"]: i for i, s in enumerate(step_rows)}
    values, refs = [], []
    for step in step_rows:
        operands = sorted(by_step.get(step["step_index"], []), key=lambda o: o.operand_index)
        values.append([o.value for o in operands])
        refs.append([position[o.prior_step] if o.provenance == provenance.PRIOR else None for o in operands])
    return solver.solve_plan_values(labelled.skeletons, values, refs, search)[-1]


def nearest_plans(eval_vectors: np.ndarray, train_vectors: np.ndarray, train_ids: list[str], plans: dict[str, list[tuple[str, str]]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """For each evaluation problem, the most similar training problem that has a plan."""
    keep = [i for i, pid in enumerate(train_ids) if plans.get(pid)]
    if not keep:
        return [("", [])] * len(eval_vectors)
    similarity = eval_vectors @ train_vectors[keep].T
    best = similarity.argmax(axis=1)
    return [(train_ids[keep[b]], plans[train_ids[keep[b]]]) for b in best]


# --- the run ---------------------------------------------------------------------------------------------


def evaluate(problems: pl.DataFrame, store: ArtifactStore, inputs: dict[str, ArtifactRef], cfg: MyceliumConfig,
             teacher: pl.DataFrame | None = None, progress: bool = True, log=print) -> tuple[pl.DataFrame, dict[str, Any]]:
    from tqdm.auto import tqdm

    from tasks.train_c2 import student_encoder
    from tasks.training_data import settings_from

    student = load_student(store, inputs, cfg)
    search = search_settings(cfg)
    prov_settings = settings_from(cfg.training_data, cfg.c4, cfg.steps)
    step_settings = gold_step_settings(cfg)
    encoder = onnx_read.reading_encoder(student_encoder(store, inputs.get("student_backbone"), cfg.c3.backbone, cfg.c3.max_length, cfg.c3.read_precision,
                                                                cfg.c3.int8_min_cosine),
                                        cfg.eval.backbone_runtime, Settings().cache_dir, cfg.eval.int8_read_threads)
    rows = problems.to_dicts()
    # The backbone reads every problem once; timed per problem inside the student's latency.
    texts, read_seconds = [], []
    for row in tqdm(rows, desc="student reads problems", unit="problem", disable=not progress):
        started = time.perf_counter()
        texts.append(c3_model.read_problems(encoder, [str(row["problem"])], cfg.c4.word_to_number, 1, cfg.c3.context_tokens, progress=False)[0])
        read_seconds.append(time.perf_counter() - started)
    pooled = np.stack([t.pooled / max(np.linalg.norm(t.pooled), 1e-12) for t in texts]) if texts else np.zeros((0, 1))

    training = store.read(inputs["training_sets"], "c2").filter(pl.col("split") == "train")
    train_features = store.read(inputs["c2_features"], "features").join(training.select("problem_id"), on="problem_id")
    slots = store.read(inputs["training_sets"], "c3_slots").filter(pl.col("split") == "train").sort("problem_id", "step_index")
    plans = {str(p): list(zip(g["label"], g["skeleton"], strict=True)) for (p,), g in slots.group_by("problem_id")}
    neighbours = nearest_plans(pooled, train_features["embedding"].to_numpy().astype(np.float32), train_features["problem_id"].to_list(), plans)

    teacher_out = {}
    if teacher is not None:
        for problem_id, answer, text, seconds in teacher.iter_rows():
            teacher_out[problem_id] = (answer, text, seconds)

    records = []
    for row, problem, read_s, (neighbour_id, plan) in tqdm(list(zip(rows, texts, read_seconds, neighbours, strict=True)), desc="student solves",
                                                          unit="problem", disable=not progress):
        is_math = is_math_row(row)
        started = time.perf_counter() - read_s
        solution = solver.solve(student, problem, search, started=started)
        student_answer = format_answer(solution.answer)
        student_check = check(student_answer, row.get("answer"), is_math, cfg)
        # where the gold answer sits among the distinct answers of every finished chain (-1: absent)
        gold_rank = next((rank for rank, (a, _) in enumerate(solution.ranked_answers)
                          if correct(check(format_answer(a), row.get("answer"), is_math, cfg), is_math)), -1) if row.get("answer") is not None else None
        in_beam = None if gold_rank is None else 0 <= gold_rank < cfg.eval.beam_width
        in_pool = None if gold_rank is None else gold_rank >= 0
        near = solver.solve(student, problem, search, plan=plan) if plan else None
        near_answer = format_answer(near.answer) if near else None
        split = gold_steps(row, step_settings)
        n_gold_steps = len(split)
        planned = format_answer(solver.solve(student, problem, search, plan=gold_plan(split)).answer) if split else None
        oracle = format_answer(oracle_answer(row, split, prov_settings, search)) if split else None
        record = {
            "problem_id": row["problem_id"], "level": row.get("level"), "subject": row.get("subject"), "source": row.get("source"),
            "gold": row.get("answer"), "n_gold_steps": n_gold_steps,
            "student_answer": student_answer, "student_correct": correct(student_check, is_math),
            "student_numeric": student_check["numeric"], "student_math_verify": student_check["math_verify"], "student_hendrycks": student_check["hendrycks"],
            "student_in_beam": in_beam, "student_in_pool": in_pool, "student_labels": solution.labels, "student_expression": solution.expression(),
            "student_chains": solution.n_chains, "student_ms": solution.seconds * 1000.0,
            "nearest_problem": neighbour_id or None, "nearest_answer": near_answer,
            "nearest_correct": correct(check(near_answer, row.get("answer"), is_math, cfg), is_math),
            "gold_plan_answer": planned,
            "gold_plan_correct": correct(check(planned, row.get("answer"), is_math, cfg), is_math) if n_gold_steps else None,
            "oracle_answer": oracle, "oracle_correct": correct(check(oracle, row.get("answer"), is_math, cfg), is_math) if n_gold_steps else None,
            "teacher_answer": None, "teacher_correct": None, "teacher_ms": None, "teacher_text": None,
        }
        if row["problem_id"] in teacher_out:
            t_answer, t_text, t_seconds = teacher_out[row["problem_id"]]
            record.update(teacher_answer=t_answer, teacher_correct=correct(check(t_answer, row.get("answer"), is_math, cfg), is_math),
                          teacher_ms=None if t_seconds is None else t_seconds * 1000.0, teacher_text=t_text)
        records.append(record)
    results = pl.DataFrame(records, schema=RESULTS_SCHEMA)
    return results, summarise(results, cfg)


def mcnemar(a: list[bool], b: list[bool]) -> dict[str, Any]:
    """Exact McNemar test on paired outcomes: a binomial test on the discordant pairs."""
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    p = float(scipy_stats.binomtest(only_a, n, 0.5).pvalue) if n else 1.0
    return {"n_pairs": len(a), "only_student": only_a, "only_other": only_b, "p_value": p}


def _accuracy(column: pl.Series) -> dict[str, Any]:
    values = column.drop_nulls()
    k, n = int(values.sum()), values.len()
    interval = stats.wilson_interval(k, n)
    return {"correct": k, "n": n, "accuracy": k / n if n else None, "low": interval.low if n else None, "high": interval.high if n else None}


def _median_interval(data: np.ndarray, cfg: MyceliumConfig) -> tuple[float | None, float | None]:
    """Percentile-bootstrap 95% interval of the median over problems (None when under two)."""
    if len(data) < 2:
        return None, None
    result = stats.bootstrap_interval(data, statistic=np.median, resamples=cfg.eval.bootstrap_resamples, seed=cfg.eval.seed)
    return result.low, result.high


def _percentiles(values: pl.Series, cfg: MyceliumConfig) -> dict[str, Any]:
    data = values.drop_nulls().to_numpy()
    if not len(data):
        return {"n": 0, "p50_ms": None, "p50_low": None, "p50_high": None, "p95_ms": None}
    low, high = _median_interval(data, cfg)
    return {"n": len(data), "p50_ms": float(np.percentile(data, 50)), "p50_low": low, "p50_high": high, "p95_ms": float(np.percentile(data, 95))}


LENGTH_SYSTEMS = ("student", "nearest", "gold_plan", "oracle")  # the teacher answers only a subset


def length_group(n_steps: int, longest: int) -> str:
    """The name of a gold-length group: the step count, or "`longest`+" for that many or more."""
    return f"{longest}+" if n_steps >= longest else str(n_steps)


def by_gold_steps(results: pl.DataFrame, longest: int) -> dict[str, dict[str, Any]]:
    """Per length of the gold solution (problems with readable gold steps; `longest` or more
    share the last group), shortest first: how many problems, each of LENGTH_SYSTEMS'
    accuracy and how often the gold answer was among the student's finished chains."""
    rows = results.filter(pl.col("n_gold_steps") > 0).with_columns(pl.col("n_gold_steps").clip(upper_bound=longest).alias("length"))
    groups = {}
    for (length,), group in sorted(rows.group_by("length"), key=lambda item: item[0][0]):
        groups[length_group(int(length), longest)] = {"n": group.height, "student_in_pool": _accuracy(group["student_in_pool"]),
                                                      **{system: _accuracy(group[f"{system}_correct"]) for system in LENGTH_SYSTEMS}}
    return groups


def summarise(results: pl.DataFrame, cfg: MyceliumConfig) -> dict[str, Any]:
    summary: dict[str, Any] = {"n_problems": results.height, "backbone_runtime": cfg.eval.backbone_runtime}
    for system in SYSTEMS:
        summary[f"{system}_accuracy"] = _accuracy(results[f"{system}_correct"])
    for system in SYSTEMS[1:]:
        paired = results.filter(pl.col(f"{system}_correct").is_not_null())
        summary[f"mcnemar_student_vs_{system}"] = mcnemar(paired["student_correct"].to_list(), paired[f"{system}_correct"].to_list())
    teacher_rows = results.filter(pl.col("teacher_correct").is_not_null())
    summary["student_accuracy_on_teacher_subset"] = _accuracy(teacher_rows["student_correct"])
    summary["student_in_beam"] = _accuracy(results["student_in_beam"]) | {"k": cfg.eval.beam_width}
    summary["student_in_pool"] = _accuracy(results["student_in_pool"])
    summary["student_valid_chain"] = _accuracy(results["student_chains"] > 0)
    easy = pl.col("n_gold_steps") <= cfg.eval.easy_max_steps
    summary["latency_student_easy"] = _percentiles(results.filter(easy & (pl.col("n_gold_steps") > 0))["student_ms"], cfg)
    summary["latency_student_hard"] = _percentiles(results.filter(~easy)["student_ms"], cfg)
    summary["latency_student_all"] = _percentiles(results["student_ms"], cfg)
    summary["latency_teacher_all"] = _percentiles(results["teacher_ms"], cfg)
    summary["by_gold_steps"] = by_gold_steps(results, cfg.eval.max_steps)
    ratio = (teacher_rows["teacher_ms"] / teacher_rows["student_ms"]).drop_nulls()  # only the teacher's timed problems
    if ratio.len():
        summary["teacher_over_student_latency_median"] = float(ratio.median())
        summary["teacher_over_student_latency_n"] = ratio.len()
        summary["teacher_over_student_latency_low"], summary["teacher_over_student_latency_high"] = _median_interval(ratio.to_numpy(), cfg)
    math_rows = results.filter([is_math_row(row) for row in results.select(c for c in ("source", "level", "subject") if c in results.columns).iter_rows(named=True)])
    if math_rows.height:
        summary["math_checkers"] = {name: _accuracy(math_rows[f"student_{name}"]) for name in ("math_verify", "hendrycks", "numeric")}
        summary["math_checkers_disagree"] = int((math_rows["student_math_verify"] != math_rows["student_hendrycks"]).sum())
        for key in ("level", "subject"):
            summary[f"student_by_{key}"] = {str(k): _accuracy(g["student_correct"]) for (k,), g in math_rows.group_by(key) if k is not None}
    return summary


SYSTEM_COLOURS = {"student": "#4c72b0", "teacher": "#dd8452", "nearest": "#55a868", "gold_plan": "#c44e52", "oracle": "#8172b3"}  # one per system, in every figure


def plot_accuracy(summary: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The teacher answers a subset, so the student's bar on that same subset stands beside it.
    bars = [("student", summary["student_accuracy"], SYSTEM_COLOURS["student"]),
            ("student on the\nteacher's subset", summary["student_accuracy_on_teacher_subset"], "#a6bddb"),
            ("teacher", summary["teacher_accuracy"], SYSTEM_COLOURS["teacher"]),
            ("nearest", summary["nearest_accuracy"], SYSTEM_COLOURS["nearest"]),
            ("gold plan\n+ C3 operands", summary["gold_plan_accuracy"], SYSTEM_COLOURS["gold_plan"]),
            ("oracle", summary["oracle_accuracy"], SYSTEM_COLOURS["oracle"])]
    bars = [(name, a, colour) for name, a, colour in bars if a["n"]]
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.bar([f"{name}\n(n={a['n']})" for name, a, _ in bars], [a["accuracy"] for _, a, _ in bars],
             yerr=[[a["accuracy"] - a["low"] for _, a, _ in bars], [a["high"] - a["accuracy"] for _, a, _ in bars]],
             capsize=6, color=[colour for *_, colour in bars])
    axis.set_ylabel("accuracy (95% Wilson interval)")
    axis.set_ylim(0, 1)
    axis.set_title("Stage 06: accuracy on the evaluated problems (the teacher on a seeded subset)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def plot_by_length(summary: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars per gold-solution length, one per system with its Wilson interval, and
    the share of problems whose gold answer the student's pool held as a black tick: the gap
    between tick and the student's bar is what ranking loses, between the student and the gold
    plan what planning loses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["by_gold_steps"]
    names = list(groups)
    figure, axis = plt.subplots(figsize=(9, 4.6))
    width = 0.8 / len(LENGTH_SYSTEMS)
    for k, system in enumerate(LENGTH_SYSTEMS):
        rates = [groups[g][system] for g in names]
        positions = [i - 0.4 + width * (k + 0.5) for i in range(len(names))]
        axis.bar(positions, [r["accuracy"] or 0.0 for r in rates], width,
                 yerr=[[(r["accuracy"] - r["low"]) if r["n"] else 0.0 for r in rates], [(r["high"] - r["accuracy"]) if r["n"] else 0.0 for r in rates]],
                 capsize=2, color=SYSTEM_COLOURS[system], label=system.replace("_", " "))
    pool = [groups[g]["student_in_pool"] for g in names]
    axis.scatter(range(len(names)), [r["accuracy"] or 0.0 for r in pool], marker="_", s=900, color="black", zorder=3,
                 label="gold answer in the student's pool")
    axis.set_xticks(range(len(names)), [f"{g} step{'' if g == '1' else 's'}\n(n={groups[g]['n']})" for g in names])
    axis.set_ylabel("accuracy (95% Wilson interval)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8, markerscale=0.3, ncol=len(LENGTH_SYSTEMS) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: the oracle's bars reach the top
    axis.set_title("Stage 06 by length of the gold solution")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def build_evaluation(ref: ArtifactRef, eval_problems: ArtifactRef, teacher: ArtifactRef, inputs: dict[str, ArtifactRef], cfg: MyceliumConfig,
                     log=print) -> dict[str, Any]:
    store = ArtifactStore.for_ref(ref)
    problems = select_problems(store, eval_problems, inputs["training_sets"], cfg)
    results, summary = evaluate(problems, store, inputs, cfg, store.read(teacher, "answers"), log=log)
    summary["dataset"] = cfg.eval.dataset or "the held-out validation split"
    with tempfile.TemporaryDirectory() as folder:
        store.write_file(ref, "accuracy.png", plot_accuracy(summary, Path(folder) / "accuracy.png").read_bytes())
        if summary["by_gold_steps"]:
            store.write_file(ref, "accuracy_by_length.png", plot_by_length(summary, Path(folder) / "accuracy_by_length.png").read_bytes())
    store.write_file(ref, "summary.json", json.dumps(summary, indent=2, default=float).encode())
    store.write_table(ref, {"results": results}, metadata={"n_problems": results.height})
    return summary


@task(name="evaluate")
def evaluate_task(ref: ArtifactRef, eval_problems: ArtifactRef, teacher: ArtifactRef, inputs: dict[str, ArtifactRef], cfg: MyceliumConfig) -> ArtifactRef:
    logger = get_run_logger()
    summary = build_evaluation(ref, eval_problems, teacher, inputs, cfg, log=logger.info)
    logger.info("evaluation: %s", ", ".join(f"{s} {_short(summary[f'{s}_accuracy'])}" for s in SYSTEMS))
    return ref


def _p_value(p: float | None) -> str:
    if p is None:
        return "—"
    return "< 1e-300" if p == 0.0 else f"{p:.3g}"  # 0.0 is a float underflow, not certainty


def _median_text(median: float | None, low: float | None, high: float | None, digits: int) -> str:
    """`12.3 [11.8, 13.0]`; the interval left out when there is none (under two problems)."""
    if median is None:
        return "None"
    text = f"{median:.{digits}f}"
    return text if low is None or high is None else f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


def _short(a: dict) -> str:
    return f"{a['accuracy']:.3f} [{a['low']:.3f}, {a['high']:.3f}] (n={a['n']})" if a["n"] else "not run"


def _rate(a: dict) -> str:
    """A table cell: count, share and 95% interval."""
    return f"{a['correct']} ({100 * a['accuracy']:.0f}% [{100 * a['low']:.0f}, {100 * a['high']:.0f}])" if a["n"] else "—"


def report_section(store: ArtifactStore, ref: ArtifactRef) -> ReportSection:
    manifest = store.verify(ref)
    s = json.loads(store.read_file(ref, "summary.json"))
    lines = [
        "## Stage 06 — evaluation",
        "",
        f"{s['n_problems']} problems of {s.get('dataset', 'the held-out validation split')}. Accuracy with its 95% Wilson interval; McNemar's exact test pairs each system with the student on the problems both answered.",
        "",
        "| system | accuracy | correct / n | McNemar p vs student |",
        "|---|---|---|---|",
    ]
    for system in SYSTEMS:
        a = s[f"{system}_accuracy"]
        p = s.get(f"mcnemar_student_vs_{system}", {}).get("p_value")
        lines.append(f"| {system} | {_short(a)} | {a['correct']} / {a['n']} | {'—' if system == 'student' else _p_value(p)} |")
    subset = s["student_accuracy_on_teacher_subset"]
    lines += [
        "",
        "gold_plan is the student's search held to the gold solution's steps (labels and skeletons in order), C3 choosing the operands: "
        "its gap to the student is what planning costs, its gap to the oracle what choosing operands costs.",
        "",
        f"Student on the teacher's subset: {_short(subset)}. Gold answer among the student's top {s['student_in_beam']['k']} answers: "
        f"{_short(s['student_in_beam'])}; among the answers of every chain the search finished: {_short(s['student_in_pool'])} "
        f"(the gap to the accuracy is what ranking the chains loses). A valid chain found: {_short(s['student_valid_chain'])}.",
        "",
        f"Latency: the student reads each problem with `{s.get('backbone_runtime', 'torch')}` and then searches, one problem at a time.",
        "",
        "| latency (ms) | n | p50 [95% bootstrap interval] | p95 |",
        "|---|---|---|---|",
    ]
    for key, title in (("latency_student_easy", "student, easy"), ("latency_student_hard", "student, hard"),
                       ("latency_student_all", "student, all"), ("latency_teacher_all", "teacher CoT")):
        v = s[key]
        lines.append(f"| {title} | {v['n']} | {_median_text(v['p50_ms'], v.get('p50_low'), v.get('p50_high'), 1)} | "
                     f"{v['p95_ms'] if v['p95_ms'] is None else round(v['p95_ms'], 1)} |")
    if "teacher_over_student_latency_median" in s:
        ratio = _median_text(s["teacher_over_student_latency_median"], s.get("teacher_over_student_latency_low"), s.get("teacher_over_student_latency_high"), 0)
        lines += ["", f"Teacher / student latency on the same problems (median ratio over the {s['teacher_over_student_latency_n']} "
                  f"the teacher answered one at a time, 95% bootstrap interval; the rest of its subset ran batched, untimed): {ratio}×."]
    if "math_checkers" in s:
        lines += ["", f"MATH rows, the student's answers under each checker (they disagree on {s['math_checkers_disagree']}):", "",
                  "| checker | accuracy |", "|---|---|"]
        lines += [f"| {k} | {_short(v)} |" for k, v in s["math_checkers"].items()]
        for key in ("level", "subject"):
            lines += ["", f"| {key} | student accuracy |", "|---|---|"]
            lines += [f"| {k} | {_short(v)} |" for k, v in sorted(s[f"student_by_{key}"].items())]
    groups = s.get("by_gold_steps") or {}
    if groups:
        lines += ["", "By length of the gold solution (its readable steps; the last group is as long as the longest chain the search "
                  "builds, or longer). \"In pool\": the gold answer was among the student's finished chains — the most any ranking "
                  "of them could get.", "",
                  "| gold steps | n | student | in pool | nearest | gold_plan | oracle |", "|---|---|---|---|---|---|---|"]
        for name, g in groups.items():
            lines.append(f"| {name} | {g['n']} | " + " | ".join(_rate(g[k]) for k in ("student", "student_in_pool", "nearest", "gold_plan", "oracle")) + " |")
    figures = {name: store.read_file(ref, name) for name in ("accuracy.png", "accuracy_by_length.png") if name in manifest.files}
    if "accuracy.png" in figures:
        lines += ["", "![accuracy](accuracy.png)"]
    if "accuracy_by_length.png" in figures:
        lines += ["", "![accuracy by gold length](accuracy_by_length.png)"]
    flat = {f"eval_{k}": v for k, v in s.items()}
    return ReportSection(flat, "\n".join(lines) + "\n", figures)
