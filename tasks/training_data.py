"""Stage 03 — the C2 and C3 training sets, with a data card.

Reads:  the problems artifact (problem text, gold solution, answer), stage 02's `steps`
        (validated steps) and `templates` (each step's template), stage 01's heartbeats
        (per-problem count) and stage 00's traces (the focus columns, for the IAF tie-break),
        and the `training_data`, `c2` and `c4` config sections.
Writes: artifact `training_sets` with tables
        `c2`          one row per kept problem: problem_id, problem, labels (the set of C2
                      labels its steps use, in config order), n_steps, n_heartbeats (null
                      when stage 00 skipped the problem), split;
        `c3_slots`    one row per operation slot (a step of a C3 problem): template_id, label,
                      skeleton (`{0}/{1}`), expression, prior_values, n_operands, split;
        `c3_operands` one row per operand, then an END row per slot: provenance (TEXT / PRIOR /
                      IMPLICIT / CONSTANT / END), value, problem-text span, prior step, word,
                      constant, resolution (how a repeated number's occurrence was chosen);
        `drops`       problem_id, set (c2 | c3), reason — every problem left out, and why;
        files `data_card.png` and `summary.json` (the filter funnel and all counts).
Time:   full GSM8K train (7,473 problems, 23.7k steps): reading the traces ~20 s, labelling
        ~30 s, re-executing every chain ~30 s (one bounded sympy call per step).
You should see: the funnel of filters — problems → with validated steps → numeric gold
answer → chain re-executes to the gold answer (= the C2 set) → every operand explained (= the
C3 set) — with the yield of each; operand provenance counts (on GSM8K about half TEXT, a third
PRIOR); how often a repeated number was resolved by the gold text, by IAF, or by falling back
to the first occurrence; the most common unexplained operands.

Filters, in order (a problem leaves at the first it fails; each drop is counted):
  no_steps                stage 02 kept no step of its solution (only parseable, validated
                          expressions are steps);
  answer_not_numeric      the gold answer is not a number (e.g. a MATH interval);
  chain_not_executable    re-running the chain (PRIOR operands take the recomputed value of
                          the step they name) fails to evaluate some step;
  chain_answer_mismatch   the re-run chain's last value is not the gold answer;
  — the rest form the C2 set; C3 further drops —
  operand_unexplained     some operand has no provenance, so no pointer could produce it.

Splits: a problem is in validation when sha256("<split_seed>:<problem_id>") falls below
`validation_fraction`; the same problem is in the same split in both sets and in every run.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from prefect import get_run_logger, task

from mycelium import expressions, provenance, stats, steps
from mycelium.config import C2Config, C4Config, StepsConfig, TrainingDataConfig
from mycelium.reports import ReportSection
from mycelium.store import (
    ArtifactRef,
    ArtifactStore,
    artifact_digest,
    source_code_version,
)

STEP = "training_sets"
TRAIN, VALIDATION = "train", "validation"
FILTERS = ("no_steps", "answer_not_numeric", "chain_not_executable", "chain_answer_mismatch")
C3_FILTERS = ("operand_unexplained",)
HASH_SCALE = float(1 << 64)  # sha256's first 8 bytes as an unsigned integer, scaled to [0, 1)

C2_SCHEMA = {
    "problem_id": pl.Utf8,
    "problem": pl.Utf8,
    "labels": pl.List(pl.Utf8),
    "n_steps": pl.Int32,
    "n_heartbeats": pl.Int32,
    "split": pl.Utf8,
}
SLOT_SCHEMA = {
    "problem_id": pl.Utf8,
    "step_index": pl.Int32,
    "template_id": pl.Int32,
    "label": pl.Utf8,
    "skeleton": pl.Utf8,
    "expression": pl.Utf8,
    "prior_values": pl.List(pl.Float64),
    "n_operands": pl.Int32,
    "split": pl.Utf8,
}
OPERAND_SCHEMA = {
    "problem_id": pl.Utf8,
    "step_index": pl.Int32,
    "operand_index": pl.Int32,
    "provenance": pl.Utf8,
    "value": pl.Float64,
    "literal": pl.Utf8,
    "span_start": pl.Int32,
    "span_end": pl.Int32,
    "span_text": pl.Utf8,
    "prior_step": pl.Int32,
    "word": pl.Utf8,
    "constant": pl.Utf8,
    "resolution": pl.Utf8,
    "n_occurrences": pl.Int32,
    "prior_also_in_text": pl.Boolean,
    "split": pl.Utf8,
}
DROP_SCHEMA = {"problem_id": pl.Utf8, "set": pl.Utf8, "reason": pl.Utf8}


def _code_version() -> str:
    return source_code_version(sys.modules[__name__], provenance, steps, expressions)


def training_sets_ref(
    store: ArtifactStore,
    cfg: TrainingDataConfig,
    c2_cfg: C2Config,
    c4_cfg: C4Config,
    steps_cfg: StepsConfig,
    inputs: dict[str, ArtifactRef],
) -> ArtifactRef:
    payload = {"training_data": cfg.digest_payload(), "labels": c2_cfg.labels, "c4": c4_cfg.digest_payload(), "steps": steps_cfg.digest_payload()}
    return store.ref(STEP, artifact_digest(STEP, payload, [inputs[k] for k in sorted(inputs)], _code_version()))


# --- plain logic -------------------------------------------------------------------------------


def split_of(problem_id: str, seed: int, validation_fraction: float) -> str:
    """train or validation, from a hash of (seed, problem_id): no state, stable across runs."""
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    return VALIDATION if int.from_bytes(digest[:8], "big") / HASH_SCALE < validation_fraction else TRAIN


def answer_value(answer: str | None, settings: provenance.ProvenanceSettings) -> float | None:
    """The gold answer as a number: plain digits directly, else LaTeX arithmetic (`\\frac{3}{4}`)
    through the bounded parser. None when it is not a single number."""
    if answer is None:
        return None
    text = provenance.strip_number_text(answer)
    if provenance.is_plain_number(text):
        return float(text)  # validated digits only: float() here is not eval
    try:
        arithmetic = steps.latex_to_arithmetic(text)
        return expressions.evaluate_number(expressions.parse_expression(arithmetic, settings.timeout_s, settings.max_length), settings.timeout_s)
    except (steps.LatexUnsupported, expressions.ExpressionError):
        return None


def focus_by_problem(tokens: pl.DataFrame) -> dict[str, provenance.FocusRows]:
    """Stage 00's token rows grouped per problem (all heads stacked) for the IAF tie-break."""
    result = {}
    columns = ("char_end", "focus_start", "focus_end", "focus_attn")
    for (problem_id,), group in tokens.select("problem_id", *columns).drop_nulls().group_by("problem_id"):
        result[str(problem_id)] = provenance.FocusRows(*(group[c].to_numpy() for c in columns))
    return result


def build_sets(
    problems: pl.DataFrame,
    step_rows: pl.DataFrame,
    assignments: pl.DataFrame,
    heartbeat_counts: dict[str, int],
    focus: dict[str, provenance.FocusRows],
    cfg: TrainingDataConfig,
    labels: list[str],
    settings: provenance.ProvenanceSettings,
    progress: bool = True,
) -> tuple[dict[str, pl.DataFrame], dict[str, Any]]:
    """All four tables and the summary counts (see the module docstring)."""
    from tqdm.auto import tqdm

    templates_of = {(p, s): t for p, s, t in assignments.select("problem_id", "step_index", "template_id").iter_rows()}
    by_problem = {str(p): g.sort("step_index") for (p,), g in step_rows.group_by("problem_id")}
    c2_rows, slot_rows, operand_rows, drop_rows = [], [], [], []
    all_operands: list[provenance.Operand] = []
    funnel = Counter()
    for row in tqdm(problems.iter_rows(named=True), total=problems.height, desc="stage 03 labelling", disable=not progress):
        problem_id = str(row["problem_id"])
        split = split_of(problem_id, cfg.split_seed, cfg.validation_fraction)
        reason, labelled, rows = _check_problem(row, by_problem.get(problem_id), focus.get(problem_id), settings)
        if reason is not None:
            drop_rows.append({"problem_id": problem_id, "set": "c2", "reason": reason})
            funnel[reason] += 1
            continue
        step_labels = set(rows["label"].to_list())
        c2_rows.append({
            "problem_id": problem_id, "problem": row["problem"], "labels": [label for label in labels if label in step_labels],
            "n_steps": rows.height, "n_heartbeats": heartbeat_counts.get(problem_id), "split": split,
        })
        all_operands += labelled.operands
        if any(o.provenance == provenance.UNEXPLAINED for o in labelled.operands):
            drop_rows.append({"problem_id": problem_id, "set": "c3", "reason": "operand_unexplained"})
            funnel["operand_unexplained"] += 1
            continue
        slot_rows += _slots(problem_id, rows, labelled, templates_of, split)
        operand_rows += _operands(labelled, rows, str(row["problem"]), split)
    tables = {
        "c2": pl.DataFrame(c2_rows, schema=C2_SCHEMA),
        "c3_slots": pl.DataFrame(slot_rows, schema=SLOT_SCHEMA),
        "c3_operands": pl.DataFrame(operand_rows, schema=OPERAND_SCHEMA),
        "drops": pl.DataFrame(drop_rows, schema=DROP_SCHEMA),
    }
    return tables, summarise(problems.height, funnel, tables, all_operands, cfg)


def _check_problem(row: dict, rows: pl.DataFrame | None, focus, settings) -> tuple[str | None, Any, pl.DataFrame | None]:
    if rows is None or rows.height == 0:
        return "no_steps", None, None
    gold = answer_value(row.get("answer"), settings)
    if gold is None:
        return "answer_not_numeric", None, None
    step_dicts = rows.to_dicts()
    labelled = provenance.label_problem(str(row["problem_id"]), str(row["problem"]), str(row["solution"]), step_dicts, settings, focus)
    values = provenance.execute_chain(labelled, step_dicts, settings)
    if any(v is None for v in values):
        return "chain_not_executable", None, None
    if not steps.values_match(values[-1], gold, provenance.strip_number_text(str(row["answer"])), settings.rel_tol):
        return "chain_answer_mismatch", None, None
    return None, labelled, rows


def _slots(problem_id, rows: pl.DataFrame, labelled: provenance.ProblemLabels, templates_of: dict, split: str) -> list[dict]:
    counts = Counter(o.step_index for o in labelled.operands)
    result, prior_values = [], []
    for step, skeleton in zip(rows.iter_rows(named=True), labelled.skeletons, strict=True):
        index = int(step["step_index"])
        result.append({
            "problem_id": problem_id, "step_index": index, "template_id": templates_of.get((problem_id, index)),
            "label": step["label"], "skeleton": skeleton, "expression": step["expression"],
            "prior_values": list(prior_values), "n_operands": counts.get(index, 0), "split": split,
        })
        prior_values.append(float(step["value"]))
    return result


def _operands(labelled: provenance.ProblemLabels, rows: pl.DataFrame, problem_text: str, split: str) -> list[dict]:
    result = []
    for o in labelled.operands:
        span_text = problem_text[o.span_start : o.span_end] if o.span_start is not None else None
        result.append({
            "problem_id": o.problem_id, "step_index": o.step_index, "operand_index": o.operand_index, "provenance": o.provenance,
            "value": o.value, "literal": o.literal, "span_start": o.span_start, "span_end": o.span_end, "span_text": span_text,
            "prior_step": o.prior_step, "word": o.word, "constant": o.constant, "resolution": o.resolution,
            "n_occurrences": o.n_occurrences, "prior_also_in_text": o.prior_also_in_text, "split": split,
        })
    counts = Counter(o.step_index for o in labelled.operands)
    problem_id = str(rows["problem_id"][0])
    for index in rows["step_index"].to_list():  # the end marker closes every slot
        result.append({"problem_id": problem_id, "step_index": index, "operand_index": counts.get(index, 0),
                       "provenance": provenance.END, "split": split})
    return result


def summarise(n_problems: int, funnel: Counter, tables: dict[str, pl.DataFrame], operands: list, cfg: TrainingDataConfig) -> dict[str, Any]:
    c2, slots, c3_operands = tables["c2"], tables["c3_slots"], tables["c3_operands"]
    stages, remaining = [], n_problems
    for reason in (*FILTERS, *C3_FILTERS):
        dropped = funnel.get(reason, 0)
        stages.append({"filter": reason, "in": remaining, "dropped": dropped, "kept": remaining - dropped})
        remaining -= dropped
    text_operands = [o for o in operands if o.provenance == provenance.TEXT]
    repeated = [o for o in text_operands if o.n_occurrences > 1]
    heartbeats = c2["n_heartbeats"].drop_nulls().to_numpy()
    beat_interval = stats.mean_interval(heartbeats) if len(heartbeats) else None
    iaf_decided = sum(o.resolution == provenance.IAF for o in repeated)
    iaf_share = stats.wilson_interval(iaf_decided, len(repeated))
    summary = {
        "n_problems": n_problems,
        "funnel": stages,
        "c2_problems": c2.height,
        "c2_split": dict(c2.group_by("split").len().iter_rows()),
        "c2_label_problems": {label: int(n) for label, n in c2.explode("labels").group_by("labels").len().drop_nulls().iter_rows()},
        "c2_heartbeats_known": len(heartbeats),
        "c2_heartbeats_mean": beat_interval.mean if beat_interval else None,
        "c2_heartbeats_low": beat_interval.low if beat_interval else None,
        "c2_heartbeats_high": beat_interval.high if beat_interval else None,
        "c3_problems": slots["problem_id"].n_unique(),
        "c3_slots": slots.height,
        "c3_split": dict(slots.unique("problem_id").group_by("split").len().iter_rows()),
        "c3_provenance": dict(c3_operands.group_by("provenance").len().iter_rows()),
        "operands_all_kept_c2": dict(Counter(o.provenance for o in operands)),
        "text_operands": len(text_operands),
        "text_operands_repeated": len(repeated),
        "repeated_resolution": dict(Counter(o.resolution for o in repeated)),
        "repeated_iaf_share": iaf_decided / len(repeated) if repeated else None,
        "repeated_iaf_share_low": iaf_share.low,
        "repeated_iaf_share_high": iaf_share.high,
        "prior_also_in_text": sum(o.prior_also_in_text for o in operands),
        "top_unexplained": Counter(o.literal for o in operands if o.provenance == provenance.UNEXPLAINED).most_common(cfg.top_unexplained),
    }
    return summary


def plot_data_card(summary: dict[str, Any], labels: list[str], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    counts = [summary["c2_label_problems"].get(label, 0) for label in labels]
    left.bar(labels, counts, color="#4c72b0")
    left.set_title(f"C2: problems using each label (n={summary['c2_problems']})")
    left.tick_params(axis="x", rotation=60)
    left.set_yscale("symlog")
    provenance_counts = summary["c3_provenance"]
    names = [n for n in (provenance.TEXT, provenance.PRIOR, provenance.IMPLICIT, provenance.CONSTANT, provenance.END) if n in provenance_counts]
    middle.bar(names, [provenance_counts[n] for n in names], color="#55a868")
    middle.set_title(f"C3: operands by provenance ({summary['c3_slots']} slots)")
    funnel = summary["funnel"]
    right.barh([f["filter"] for f in funnel][::-1], [f["kept"] for f in funnel][::-1], color="#c44e52")
    right.axvline(summary["n_problems"], color="grey", linestyle=":", label=f"all problems ({summary['n_problems']})")
    right.set_title("problems left after each filter")
    right.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


# --- wiring ------------------------------------------------------------------------------------------


def settings_from(cfg: TrainingDataConfig, c4_cfg: C4Config, steps_cfg: StepsConfig) -> provenance.ProvenanceSettings:
    return provenance.ProvenanceSettings(
        word_to_number=dict(c4_cfg.word_to_number),
        domain_constants=dict(c4_cfg.domain_constants),
        rel_tol=steps_cfg.result_rel_tol,
        context_words=cfg.context_words,
        timeout_s=steps_cfg.expression_timeout_s,
        max_length=steps_cfg.max_expression_length,
    )


def build_training_sets(
    ref: ArtifactRef, inputs: dict[str, ArtifactRef], cfg: TrainingDataConfig, c2_cfg: C2Config, c4_cfg: C4Config, steps_cfg: StepsConfig
) -> dict[str, Any]:
    store = ArtifactStore.for_ref(ref)
    problems = store.read(inputs["problems"], "problems")
    step_rows = store.read(inputs["steps"], "steps")
    assignments = store.read(inputs["templates"], "assignments")
    per_problem = store.read(inputs["heartbeats"], "per_problem")
    heartbeat_counts = dict(zip(per_problem["problem_id"].to_list(), per_problem["n_heartbeats"].to_list(), strict=True))
    focus = focus_by_problem(store.read(inputs["traces"], "tokens"))
    tables, summary = build_sets(problems, step_rows, assignments, heartbeat_counts, focus, cfg, list(c2_cfg.labels), settings_from(cfg, c4_cfg, steps_cfg))
    with tempfile.TemporaryDirectory() as folder:
        figure = plot_data_card(summary, list(c2_cfg.labels), Path(folder) / "data_card.png")
        store.write_file(ref, "data_card.png", figure.read_bytes())
    store.write_file(ref, "summary.json", json.dumps(summary, indent=2, default=_json_default).encode())
    store.write_table(ref, tables, metadata={"c2_problems": summary["c2_problems"], "c3_slots": summary["c3_slots"]})
    return summary


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@task(name="training-sets")
def training_sets_task(
    ref: ArtifactRef, inputs: dict[str, ArtifactRef], cfg: TrainingDataConfig, c2_cfg: C2Config, c4_cfg: C4Config, steps_cfg: StepsConfig
) -> ArtifactRef:
    summary = build_training_sets(ref, inputs, cfg, c2_cfg, c4_cfg, steps_cfg)
    get_run_logger().info(
        "training sets: C2 %d problems, C3 %d slots from %d problems; dropped %s",
        summary["c2_problems"], summary["c3_slots"], summary["c3_problems"],
        {f["filter"]: f["dropped"] for f in summary["funnel"] if f["dropped"]},
    )
    return ref


# --- report ----------------------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    interval = stats.wilson_interval(part, whole)
    return f"{part}/{whole} = {part / whole:.1%} [{interval.low:.1%}, {interval.high:.1%}]" if whole else f"{part}/0"


def report_section(store: ArtifactStore, ref: ArtifactRef, labels: list[str]) -> ReportSection:
    manifest = store.verify(ref)
    summary = json.loads(store.read_file(ref, "summary.json"))
    n = summary["n_problems"]
    lines = [
        "## Stage 03 — training sets",
        "",
        "Filters in order; each row's yield is kept/in with a 95% Wilson interval.",
        "",
        "| filter | in | dropped | kept | yield |",
        "|---|---|---|---|---|",
    ]
    for f in summary["funnel"]:
        lines.append(f"| {f['filter']} | {f['in']} | {f['dropped']} | {f['kept']} | {_pct(f['kept'], f['in'])} |")
    lines += [
        "",
        f"**C2 set**: {summary['c2_problems']} of {n} problems ({_pct(summary['c2_problems'], n)}); split {summary['c2_split']}. "
        f"Heartbeat count known for {summary['c2_heartbeats_known']}"
        + (f", mean {summary['c2_heartbeats_mean']:.2f} [{summary['c2_heartbeats_low']:.2f}, {summary['c2_heartbeats_high']:.2f}]." if summary["c2_heartbeats_mean"] is not None else "."),
        "",
        "| label | problems using it |",
        "|---|---|",
        *[f"| {label} | {summary['c2_label_problems'].get(label, 0)} |" for label in labels],
        "",
        f"**C3 set**: {summary['c3_slots']} operation slots from {summary['c3_problems']} problems; split {summary['c3_split']}.",
        "",
        "| provenance | operands (C3 set) | operands (all C2 problems) |",
        "|---|---|---|",
    ]
    for name in (provenance.TEXT, provenance.PRIOR, provenance.IMPLICIT, provenance.CONSTANT, provenance.UNEXPLAINED, provenance.END):
        lines.append(f"| {name} | {summary['c3_provenance'].get(name, 0)} | {summary['operands_all_kept_c2'].get(name, 0) if name != provenance.END else '—'} |")
    repeated = summary["text_operands_repeated"]
    resolution = summary["repeated_resolution"]
    lines += [
        "",
        (f"A number written more than once in the problem: {_pct(repeated, summary['text_operands'])} of TEXT operands. "
        f"Resolved by the gold text {resolution.get(provenance.GOLD_TEXT, 0)}, by the teacher's attention (IAF) "
        f"{resolution.get(provenance.IAF, 0)} ({_pct(resolution.get(provenance.IAF, 0), repeated)}), first occurrence "
        f"(neither decided) {resolution.get(provenance.FIRST_OCCURRENCE, 0)}. An operand equal both to an earlier result "
        f"and to a number in the text was labelled PRIOR {summary['prior_also_in_text']} times."),
        "",
        "Most common unexplained operands (value: count): "
        + (", ".join(f"{value}: {count}" for value, count in summary["top_unexplained"]) or "none") + ".",
    ]
    figures = {"data_card.png": store.read_file(ref, "data_card.png")} if "data_card.png" in manifest.files else {}
    if figures:
        lines += ["", "![data card](data_card.png)"]
    flat = {f"training_{k}": v for k, v in summary.items() if not isinstance(v, (list, dict))}
    flat["training_funnel"] = summary["funnel"]
    return ReportSection(flat, "\n".join(lines) + "\n", figures)
