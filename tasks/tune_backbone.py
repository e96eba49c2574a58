"""Stage 04, first step — fine-tune the student's backbone on C3's pointer objective.

Reads:  artifact `training_sets` (tables `c2` for the problem texts, `c3_slots`,
        `c3_operands`), the `c3` section (`backbone`, `unfreeze`, `fine_tune_*`, learning
        rates, early stopping) and `c4` (the words and constants a pointer may pick).
Writes: artifact `student_backbone`: the tuned backbone as an ordinary HF folder's files
        (`model.safetensors`, `config.json`, tokenizer files; listed in the manifest's
        `backbone_files`), `tuning_summary.json`, `tuning_curve.png` and table `history`.
        Only when `c3.unfreeze` is `always`, or `auto` on a GPU; otherwise the step does not
        exist and C2, C3 and the student read problems with `c3.backbone` as it is.
Time:   full GSM8K train (~4.7k training problems of the C3 set) on 2 CPU cores: ~3.2 min
        per epoch with all 6 layers of MiniLM-L6 trained (the default; ~2.4 with the top 3),
        ~10 min for the default 3 epochs; the shipped sample: ~1 min 20 s per epoch.
You should see: per epoch the training loss, the validation pointer and planner losses and
their top-1 (the pointer and planner here are fresh ones, trained jointly with the backbone
and then discarded; stage 05 trains the ones the student uses, on features cached from these
weights).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
from prefect import get_run_logger, task

from mycelium import backbone_tuning, c3_model, planner, provenance, stats
from mycelium import encoder as encoder_module
from mycelium.config import C3Config, C4Config
from mycelium.errors import MyceliumError
from mycelium.reports import ReportSection, format_rate
from mycelium.store import ArtifactRef, ArtifactStore, artifact_digest, source_code_version
from tasks import train_c3
from tasks.train_c2 import device, plot_training

STEP = "student_backbone"
TUNING_KEYS = ("backbone", "max_length", "context_tokens", "unfreeze", "fine_tune_epochs", "fine_tune_layers", "fine_tune_batch_problems", "fine_tune_planner_weight",
               "learning_rate", "head_learning_rate", "hidden_size", "dropout", "weight_decay", "min_improvement", "early_stopping_patience",
               "max_skeletons", "max_operands", "seed")


def should_tune(cfg: C3Config, run_device: str) -> bool:
    return cfg.unfreeze == "always" or (cfg.unfreeze == "auto" and run_device.startswith("cuda"))


def backbone_ref(store: ArtifactStore, cfg: C3Config, c4_cfg: C4Config, labels: list[str], max_steps: int, training_sets: ArtifactRef
                 ) -> ArtifactRef | None:
    """The tuned backbone's artifact, or None when this config reads with the frozen one."""
    if not should_tune(cfg, device()):
        return None
    payload = {"c3": {k: cfg.digest_payload()[k] for k in TUNING_KEYS}, "c4": c4_cfg.digest_payload(), "labels": labels, "max_steps": max_steps}
    code = source_code_version(sys.modules[__name__], backbone_tuning, c3_model, planner, provenance, encoder_module)
    return store.ref(STEP, artifact_digest(STEP, payload, [training_sets], code))


def tuning_problems(store: ArtifactStore, training_sets: ArtifactRef, encoder: encoder_module.Encoder, cfg: C3Config, c4_cfg: C4Config,
                    labels: list[str], max_steps: int) -> tuple[dict[str, list[backbone_tuning.TuningProblem]], int]:
    """The C3 set's problems per split, each with its gold pointer examples and its gold
    chain's step-planner states (stage 05's, built on placeholder features that the tuning
    loop fills in live), and the number of planner classes."""
    slots = store.read(training_sets, "c3_slots")
    operands = store.read(training_sets, "c3_operands")
    texts = dict(store.read(training_sets, "c2").select("problem_id", "problem").iter_rows())
    placeholders = {p: backbone_tuning.placeholder_problem(texts[p], c4_cfg.word_to_number, encoder.dim) for p in set(slots["problem_id"].to_list())}
    train_slots = slots.filter(pl.col("split") == "train")
    vocab = c3_model.build_vocabulary(labels, Counter(train_slots["skeleton"].to_list()), c4_cfg.word_to_number, c4_cfg.domain_constants, cfg)
    chains = {split: train_c3.gold_chains(slots.filter(pl.col("split") == split), operands) for split in ("train", "validation")}
    plan_vocab = planner.build_vocabulary(vocab.skeletons, [(s, label) for steps in chains["train"].values() for s, label, _ in steps], labels, max_steps)
    result = {}
    for split in ("train", "validation"):
        examples, keys, _ = train_c3.build_examples(slots.filter(pl.col("split") == split), operands, placeholders, vocab, c4_cfg)
        by_problem: dict[str, list] = {}
        for example, (problem_id, _) in zip(examples, keys, strict=True):
            by_problem.setdefault(problem_id, []).append(example)
        result[split] = []
        for p, made in by_problem.items():
            states = planner.gold_states({p: chains[split][p]}, {p: placeholders[p].pooled}, {p: c3_model.text_mentions(placeholders[p])}, plan_vocab)
            result[split].append(backbone_tuning.tuning_problem(encoder, texts[p], c4_cfg.word_to_number, cfg.context_tokens, made, states))
    return result, plan_vocab.stop + 1


def build_backbone(ref: ArtifactRef, training_sets: ArtifactRef, cfg: C3Config, c4_cfg: C4Config, labels: list[str], max_steps: int,
                   log=print) -> dict[str, Any]:
    store = ArtifactStore.for_ref(ref)
    encoder = encoder_module.load_encoder(cfg.backbone, cfg.max_length, device())
    n_layers = len(backbone_tuning.transformer_blocks(encoder.model))
    if cfg.fine_tune_layers > n_layers:
        raise MyceliumError(f"c3.fine_tune_layers: {cfg.fine_tune_layers}, but {cfg.backbone} has {n_layers} layers")
    problems, n_planner_classes = tuning_problems(store, training_sets, encoder, cfg, c4_cfg, labels, max_steps)
    if not problems["train"] or not problems["validation"]:
        raise MyceliumError(f"stage 04: {len(problems['train'])} training and {len(problems['validation'])} validation problems "
                            "in the C3 set; tuning the backbone needs both (use more problems)")
    result = backbone_tuning.tune(encoder, problems["train"], problems["validation"], cfg, log=log, n_planner_classes=n_planner_classes)
    files = backbone_tuning.save_encoder_files(encoder)
    for name, data in files.items():
        store.write_file(ref, name, data)
    best = next(h for h in result.history if h["epoch"] == result.best_epoch) if result.best_epoch else result.history[-1]
    summary = {"best_epoch": result.best_epoch, "epochs_run": len(result.history), "layers_tuned": cfg.fine_tune_layers,
               "n_train_problems": len(problems["train"]), "n_validation_problems": len(problems["validation"]),
               "validation_top1": stats.rate_with_interval(best["top1"], best["n"]),
               "validation_planner_top1": stats.rate_with_interval(best["planner_top1"], best["planner_n"]) if best["planner_n"] else None,
               "planner_weight": cfg.fine_tune_planner_weight, "history": result.history}
    with tempfile.TemporaryDirectory() as folder:
        figure = plot_training(result.history, Path(folder) / "tuning_curve.png", "backbone tuning",
                               {"top1_rate": "pointer top-1", "planner_top1_rate": "step planner top-1"})
        store.write_file(ref, "tuning_curve.png", figure.read_bytes())
    store.write_file(ref, "tuning_summary.json", json.dumps(summary, indent=2, default=float).encode())
    store.write_table(ref, {"history": pl.DataFrame(result.history)}, metadata={"best_epoch": result.best_epoch, "backbone_files": sorted(files)})
    return summary


@task(name="tune-backbone")
def tune_task(ref: ArtifactRef, training_sets: ArtifactRef, cfg: C3Config, c4_cfg: C4Config, labels: list[str], max_steps: int) -> ArtifactRef:
    logger = get_run_logger()
    summary = build_backbone(ref, training_sets, cfg, c4_cfg, labels, max_steps, log=logger.info)
    logger.info("backbone tuned: best epoch %d, validation pointer top-1 %.3f", summary["best_epoch"], summary["validation_top1"]["rate"])
    return ref


def report_section(store: ArtifactStore, ref: ArtifactRef) -> ReportSection:
    manifest = store.verify(ref)
    s = json.loads(store.read_file(ref, "tuning_summary.json"))
    lines = ["## Stage 04 — the student's backbone, tuned on the pointer objective", "",
             (f"Top {s['layers_tuned']} layers trained with a fresh pointer and step planner on {s['n_train_problems']} training problems; best epoch "
              f"{s['best_epoch']} of {s['epochs_run']}, validation pointer top-1 {format_rate(s['validation_top1'])} "
              f"({s['n_validation_problems']} problems)"
              + (f", step planner top-1 {format_rate(s['validation_planner_top1'])} (loss weight {s['planner_weight']})" if s.get("validation_planner_top1") else "")
              + ". Stage 05's pointer and planner, trained on features from these weights, are the ones the student uses."),
             ""]
    figures = {"tuning_curve.png": store.read_file(ref, "tuning_curve.png")} if "tuning_curve.png" in manifest.files else {}
    if figures:
        lines += ["![backbone tuning](tuning_curve.png)", ""]
    flat = {"backbone_tuned_best_epoch": s["best_epoch"], "backbone_tuning_validation_top1": s["validation_top1"],
            "backbone_tuning_validation_planner_top1": s.get("validation_planner_top1")}
    return ReportSection(flat, "\n".join(lines), figures)
