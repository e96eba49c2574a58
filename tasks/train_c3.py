"""Stage 05 — train C3, the operand pointer, on stage 03's C3 set.

Reads:  artifact `training_sets` (tables `c2` for the problem texts, `c3_slots`,
        `c3_operands`), the student's backbone (stage 04's tuned one when `c3.unfreeze` made
        one, else `c3.backbone`), the `c3`, `c4` and `eval` (beam_width) config sections.
Writes: artifact `c3_features` (tables `problems`: problem_id, pooled embedding; `candidates`:
        every TEXT/IMPLICIT candidate with its span and backbone feature, the backbone held
        fixed here), and artifact
        `c3_model` with `c3_pointer.safetensors`, `c3_config.json` (vocabulary included, and
        log P(k written numbers left unused) over the training chains), the step planner
        (`planner.safetensors`, `planner_config.json`: next skeleton or STOP, see
        mycelium/planner.py), `training_curve.png`, `summary.json` and table `history`.
Time:   full GSM8K train on 2 CPU cores: reading ~6k problems with the backbone ~2 min,
        ~70k pointer decisions per epoch a few seconds each. The shipped sample: seconds.
You should see: a line per epoch; then validation pointer accuracy (top-1 and within
`eval.beam_width`) per provenance type, the share of slots whose every operand is right at
top-1, each with a 95% Wilson interval, beside the accuracy of a uniform pick among the same
candidates; then the planner's epochs and its validation top-1 beside always guessing the most
common next step.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from prefect import get_run_logger, task

from mycelium import c3_model, onnx_read, planner, provenance, stats
from mycelium import encoder as encoder_module
from mycelium.config import C2Config, C3Config, C4Config
from mycelium.errors import MyceliumError
from mycelium.reports import ReportSection, format_rate
from mycelium.store import ArtifactRef, ArtifactStore, artifact_digest, source_code_version
from tasks.train_c2 import plot_training, student_encoder

FEATURES_STEP = "c3_features"
MODEL_STEP = "c3_model"
FEATURE_KEYS = ("backbone", "max_length", "context_tokens", "read_precision")


def _code_version() -> str:
    return source_code_version(sys.modules[__name__], c3_model, planner, provenance, encoder_module)


def features_ref(store: ArtifactStore, cfg: C3Config, c4_cfg: C4Config, training_sets: ArtifactRef, backbone: ArtifactRef | None = None) -> ArtifactRef:
    """`backbone`: stage 04's tuned student backbone, read with instead of `cfg.backbone`."""
    payload = {**{k: cfg.digest_payload()[k] for k in FEATURE_KEYS}, "word_to_number": c4_cfg.word_to_number}
    upstream = [training_sets] + ([backbone] if backbone is not None else [])
    return store.ref(FEATURES_STEP, artifact_digest(FEATURES_STEP, payload, upstream, source_code_version(c3_model, provenance, encoder_module, onnx_read)))


def model_ref(store: ArtifactStore, cfg: C3Config, c4_cfg: C4Config, labels: list[str], beam_width: int, max_steps: int, training_sets: ArtifactRef,
              features: ArtifactRef) -> ArtifactRef:
    payload = {"c3": {k: v for k, v in cfg.digest_payload().items() if k != "feature_batch_size"}, "c4": c4_cfg.digest_payload(), "labels": labels,
               "beam_width": beam_width, "max_steps": max_steps}
    return store.ref(MODEL_STEP, artifact_digest(MODEL_STEP, payload, [training_sets, features], _code_version()))


# --- features ---------------------------------------------------------------------------------------


def problems_to_tables(problem_ids: list[str], problems: list[c3_model.ProblemText]) -> dict[str, pl.DataFrame]:
    dim = len(problems[0].pooled) if problems else 0
    rows = []
    for problem_id, problem in zip(problem_ids, problems, strict=True):
        for index, (c, feature) in enumerate(zip(problem.candidates, problem.features, strict=True)):
            rows.append({"problem_id": problem_id, "index": index, "kind": c.kind, "value": c.value, "span_start": c.span_start,
                         "span_end": c.span_end, "word": c.word, "reciprocal": c.reciprocal, "feature": feature.tolist()})
    schema = {"problem_id": pl.Utf8, "index": pl.Int32, "kind": pl.Utf8, "value": pl.Float64, "span_start": pl.Int32, "span_end": pl.Int32,
              "word": pl.Utf8, "reciprocal": pl.Boolean, "feature": pl.Array(pl.Float32, 2 * dim)}
    return {
        "problems": pl.DataFrame({"problem_id": problem_ids, "pooled": [p.pooled.tolist() for p in problems]},
                                 schema={"problem_id": pl.Utf8, "pooled": pl.Array(pl.Float32, dim)}),
        "candidates": pl.DataFrame(rows, schema=schema),
    }


def problems_from_tables(tables: dict[str, pl.DataFrame], texts: dict[str, str]) -> dict[str, c3_model.ProblemText]:
    by_problem = {str(p): g.sort("index") for (p,), g in tables["candidates"].group_by("problem_id")}
    result = {}
    for problem_id, pooled in tables["problems"].iter_rows():
        group = by_problem.get(problem_id)
        pooled = np.asarray(pooled, np.float32)
        if group is None:
            result[problem_id] = c3_model.ProblemText(texts[problem_id], pooled, [], np.zeros((0, 2 * len(pooled)), np.float32))
            continue
        candidates = [c3_model.Candidate(r["kind"], r["value"], r["span_start"], r["span_end"], word=r["word"], reciprocal=r["reciprocal"])
                      for r in group.iter_rows(named=True)]
        result[problem_id] = c3_model.ProblemText(texts[problem_id], pooled, candidates, group["feature"].to_numpy().astype(np.float32))
    return result


def build_features(ref: ArtifactRef, training_sets: ArtifactRef, cfg: C3Config, c4_cfg: C4Config, backbone: ArtifactRef | None = None) -> dict:
    store = ArtifactStore.for_ref(ref)
    slots = store.read(training_sets, "c3_slots")
    c2 = store.read(training_sets, "c2")
    wanted = set(slots["problem_id"].to_list())
    rows = c2.filter(pl.col("problem_id").is_in(wanted)).select("problem_id", "problem")
    encoder = student_encoder(store, backbone, cfg.backbone, cfg.max_length, cfg.read_precision, cfg.int8_min_cosine)
    problems = c3_model.read_problems(encoder, rows["problem"].to_list(), c4_cfg.word_to_number, cfg.feature_batch_size, cfg.context_tokens)
    tables = problems_to_tables(rows["problem_id"].to_list(), problems)
    store.write_table(ref, tables, metadata={"n_problems": rows.height, "n_candidates": tables["candidates"].height})
    return {"n_problems": rows.height, "n_candidates": tables["candidates"].height}


# --- examples -----------------------------------------------------------------------------------------


def build_examples(
    slots: pl.DataFrame, operands: pl.DataFrame, problems: dict[str, c3_model.ProblemText], vocab: c3_model.Vocabulary, c4_cfg: C4Config
) -> tuple[list[c3_model.PointerExample], list[tuple[str, int]], int]:
    """Pointer examples in slot order, each example's slot key, and how many gold operands no
    candidate matched (they are skipped and counted)."""
    by_slot = {(str(p), int(s)): g.sort("operand_index").to_dicts() for (p, s), g in operands.group_by("problem_id", "step_index")}
    examples, keys, unmatched = [], [], 0
    for (problem_id,), group in slots.group_by("problem_id", maintain_order=True):
        group = group.sort("step_index")
        step_indices = group["step_index"].to_list()
        uses: Counter = Counter()  # what the gold chain's earlier steps took, as the search will see it
        for position, slot in enumerate(group.iter_rows(named=True)):
            gold = by_slot.get((problem_id, slot["step_index"]), [])
            made = c3_model.slot_examples(problems[problem_id], slot["label"], slot["skeleton"], slot["step_index"], position,
                                          step_indices[:position], slot["prior_values"], gold, len(gold), c4_cfg.domain_constants, vocab, uses)
            uses.update(key for key in map(c3_model.gold_usage_key, gold) if key is not None)
            unmatched += len(gold) - len(made)
            examples += made
            keys += [(problem_id, slot["step_index"])] * len(made)
    return examples, keys, unmatched


def unused_mentions(chains: dict[str, list[tuple[str, str, set[int]]]], problems: dict[str, c3_model.ProblemText]) -> list[int]:
    """Per gold chain (see `gold_chains`), how many of its problem's written numbers it never uses."""
    return [len(c3_model.text_mentions(problems[p]) - set().union(*(spans for _, _, spans in steps))) for p, steps in chains.items()]


def gold_chains(slots: pl.DataFrame, operands: pl.DataFrame) -> dict[str, list[tuple[str, str, set[int]]]]:
    """Per problem, its gold steps in order: (skeleton, label, the text spans the step uses)."""
    text = operands.filter(pl.col("provenance") == provenance.TEXT)
    spans = {(str(p), int(s)): set(g["span_start"].to_list()) for (p, s), g in text.group_by("problem_id", "step_index")}
    chains = {}
    for (problem_id,), group in slots.group_by("problem_id", maintain_order=True):
        chains[str(problem_id)] = [(r["skeleton"], r["label"], spans.get((str(problem_id), r["step_index"]), set()))
                                   for r in group.sort("step_index").iter_rows(named=True)]
    return chains


def train_step_planner(chains: dict[str, dict[str, list]], problems: dict[str, c3_model.ProblemText], vocab: c3_model.Vocabulary,
                       labels: list[str], max_steps: int, cfg: C3Config, log=print) -> tuple[planner.PlannerResult, planner.PlannerVocabulary, dict[str, Any]]:
    """The step planner on the gold chains of each split, with C3's head settings; validation
    top-1 beside always guessing the most common next step of training."""
    labelled = [(skeleton, label) for steps in chains["train"].values() for skeleton, label, _ in steps]
    plan_vocab = planner.build_vocabulary(vocab.skeletons, labelled, labels, max_steps)
    pooled = {p: problems[p].pooled for p in problems}
    mentions = {p: c3_model.text_mentions(problems[p]) for p in problems}
    sets = {split: planner.gold_states(chains[split], pooled, mentions, plan_vocab) for split in ("train", "validation")}
    result = planner.train_planner(sets["train"], sets["validation"], plan_vocab, cfg, log=log)
    scores = planner.evaluate_planner(result.model, *sets["validation"], plan_vocab.stop)
    most_common = int(np.bincount(sets["train"][1]).argmax())
    n = scores["n"]
    summary = {"top1": stats.rate_with_interval(scores["top1"], n), "stop_right": stats.rate_with_interval(scores["stop_right"], n),
               "most_common_top1": stats.rate_with_interval(int((sets["validation"][1] == most_common).sum()), n),
               "most_common": "STOP" if most_common == plan_vocab.stop else "OTHER" if most_common == plan_vocab.other else plan_vocab.skeletons[most_common],
               "n_train_states": len(sets["train"][1]), "best_epoch": result.best_epoch}
    return result, plan_vocab, summary


def build_model(ref: ArtifactRef, training_sets: ArtifactRef, features: ArtifactRef, cfg: C3Config, c4_cfg: C4Config, labels: list[str], beam_width: int,
                max_steps: int, log=print) -> dict[str, Any]:
    store = ArtifactStore.for_ref(ref)
    slots = store.read(training_sets, "c3_slots")
    operands = store.read(training_sets, "c3_operands")
    texts = dict(store.read(training_sets, "c2").select("problem_id", "problem").iter_rows())
    problems = problems_from_tables({name: store.read(features, name) for name in ("problems", "candidates")}, texts)
    train_slots = slots.filter(pl.col("split") == "train")
    vocab = c3_model.build_vocabulary(labels, Counter(train_slots["skeleton"].to_list()), c4_cfg.word_to_number, c4_cfg.domain_constants, cfg)
    train, _, unmatched_train = build_examples(train_slots, operands, problems, vocab, c4_cfg)
    validation, keys, unmatched_validation = build_examples(slots.filter(pl.col("split") == "validation"), operands, problems, vocab, c4_cfg)
    if not train or not validation:
        raise MyceliumError(f"stage 05: {len(train)} training and {len(validation)} validation pointer examples; both are needed (use more problems)")
    result = c3_model.train_c3(train, validation, cfg, beam_width, log=log)
    chains = {split: gold_chains(slots.filter(pl.col("split") == split), operands) for split in ("train", "validation")}
    coverage = c3_model.unused_mentions_log_prior(unused_mentions(chains["train"], problems))
    summary = _summary(result, validation, keys, beam_width, cfg)
    summary["unused_mentions_log_prior"] = coverage
    planned, plan_vocab, summary["planner"] = train_step_planner(chains, problems, vocab, labels, max_steps, cfg, log)
    summary.update({"n_train_examples": len(train), "unmatched_gold": unmatched_train + unmatched_validation,
                    "n_train_slots": train_slots.height, "n_validation_slots": slots.height - train_slots.height})
    dims = {"query": len(train[0].query), "text": train[0].text_features.shape[1], "numeric": train[0].numeric.shape[1]}
    files = {**c3_model.save_c3(result, vocab, dims, cfg, coverage), **planner.save_planner(planned, plan_vocab, cfg.hidden_size, cfg.dropout)}
    for name, data in files.items():
        store.write_file(ref, name, data)
    with tempfile.TemporaryDirectory() as folder:
        curves = {"top1_rate": "top-1", "in_beam_rate": f"within top {beam_width}", "chance_top1_rate": "uniform pick, top-1"}
        figure = plot_training(result.history, Path(folder) / "training_curve.png", "C3 pointer", curves)
        store.write_file(ref, "training_curve.png", figure.read_bytes())
    store.write_file(ref, "summary.json", json.dumps(summary, indent=2, default=float).encode())
    store.write_table(ref, {"history": pl.DataFrame(result.history)}, metadata={"best_epoch": result.best_epoch})
    return summary



def _summary(result: c3_model.C3Result, validation, keys: list, beam_width: int, cfg: C3Config) -> dict[str, Any]:
    import torch

    kinds = [e.gold_kind for e in validation]
    ranks, chance = [], []
    with torch.inference_mode():
        for start in range(0, len(validation), cfg.batch_size):
            batch = c3_model.collate(validation[start : start + cfg.batch_size])
            log_probs = result.model(batch["query"], batch["text"], batch["numeric"], batch["mask"])
            ranks += (log_probs > log_probs.gather(1, batch["gold"][:, None])).sum(1).tolist()
            chance += (1.0 / batch["mask"].sum(1)).tolist()
    ranks = np.array(ranks)
    summary = {"best_epoch": result.best_epoch, "epochs_run": len(result.history), "beam_width": beam_width,
               "top1": stats.rate_with_interval(int((ranks == 0).sum()), len(ranks)), "in_beam": stats.rate_with_interval(int((ranks < beam_width).sum()), len(ranks)),
               "chance_top1": float(np.mean(chance)), "by_provenance": {}}
    for kind in sorted(set(kinds)):
        mask = np.array([k == kind for k in kinds])
        summary["by_provenance"][kind] = {"top1": stats.rate_with_interval(int((ranks[mask] == 0).sum()), int(mask.sum())),
                                          "chance_top1": float(np.mean(np.array(chance)[mask]))}
    slot_right = Counter()
    slot_total = Counter()
    for key, rank in zip(keys, ranks, strict=True):
        slot_total[key] += 1
        slot_right[key] += int(rank == 0)
    exact = sum(1 for key in slot_total if slot_right[key] == slot_total[key])
    summary["slots_exact"] = stats.rate_with_interval(exact, len(slot_total))
    return summary


@task(name="c3-features")
def features_task(ref: ArtifactRef, training_sets: ArtifactRef, cfg: C3Config, c4_cfg: C4Config, backbone: ArtifactRef | None = None) -> ArtifactRef:
    meta = build_features(ref, training_sets, cfg, c4_cfg, backbone)
    get_run_logger().info("c3 features: %d problems, %d text candidates", meta["n_problems"], meta["n_candidates"])
    return ref


@task(name="c3-train")
def train_task(ref: ArtifactRef, training_sets: ArtifactRef, features: ArtifactRef, cfg: C3Config, c4_cfg: C4Config, c2_cfg: C2Config, beam_width: int,
               max_steps: int) -> ArtifactRef:
    logger = get_run_logger()
    summary = build_model(ref, training_sets, features, cfg, c4_cfg, list(c2_cfg.labels), beam_width, max_steps, log=logger.info)
    logger.info("c3: top-1 %.3f (chance %.3f), in beam %.3f", summary["top1"]["rate"], summary["chance_top1"], summary["in_beam"]["rate"])
    return ref



def report_section(store: ArtifactStore, ref: ArtifactRef) -> ReportSection:
    manifest = store.verify(ref)
    s = json.loads(store.read_file(ref, "summary.json"))
    lines = [
        "## Stage 05 — C3 operand pointer",
        "",
        f"{s['n_train_slots']} training and {s['n_validation_slots']} validation slots ({s['n_train_examples']} training pointer decisions, "
        f"END included); best epoch {s['best_epoch']} of {s['epochs_run']}; {s['unmatched_gold']} gold operands had no candidate and were skipped.",
        "",
        "| validation | C3 | uniform pick among the same candidates |",
        "|---|---|---|",
        f"| pointer top-1 | {format_rate(s['top1'])} | {s['chance_top1']:.3f} |",
        f"| gold within the top {s['beam_width']} | {format_rate(s['in_beam'])} | — |",
        f"| slots with every operand right at top-1 | {format_rate(s['slots_exact'])} | — |",
        "",
        "| provenance | top-1 | chance |",
        "|---|---|---|",
        *[f"| {kind} | {format_rate(v['top1'])} | {v['chance_top1']:.3f} |" for kind, v in s["by_provenance"].items()],
    ]
    if "planner" in s:
        p = s["planner"]
        lines += ["", (f"Step planner (next skeleton or STOP; {p['n_train_states']} training chain states, best epoch {p['best_epoch']}): "
                       f"validation top-1 {format_rate(p['top1'])} against {format_rate(p['most_common_top1'])} for always `{p['most_common']}`; "
                       f"stop-or-continue right {format_rate(p['stop_right'])}.")]
    figures = {"c3_training_curve.png": store.read_file(ref, "training_curve.png")} if "training_curve.png" in manifest.files else {}
    if figures:
        lines += ["", "![C3 training](c3_training_curve.png)"]
    flat = {"c3_top1": s["top1"], "c3_in_beam": s["in_beam"], "c3_chance_top1": s["chance_top1"], "c3_slots_exact": s["slots_exact"],
            "c3_best_epoch": s["best_epoch"], "c3_unmatched_gold": s["unmatched_gold"], "c3_by_provenance": s["by_provenance"],
            "planner_top1": s.get("planner", {}).get("top1"), "planner_most_common_top1": s.get("planner", {}).get("most_common_top1")}
    return ReportSection(flat, "\n".join(lines) + "\n", figures)
