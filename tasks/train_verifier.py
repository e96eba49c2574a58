"""Stage 05, last — train the chain verifier on the student's own search output.

Reads:  artifacts `problems` (gold answers), `training_sets` (problem texts and splits),
        `c3_features` (every C3 problem's candidates and pooled embedding, read in stage 05;
        the other training problems — no annotated gold chain, but a gold answer — are read
        here with the student's backbone), `c2_model` and `c3_model` (the student that
        searches), and the `verifier`, `eval`, `c2`, `c3`, `c4` and `steps` config sections.
Writes: artifact `verifier` with `verifier.safetensors`, `verifier_config.json` (vocabulary,
        and whether it beat the search's own ranking on validation — stage 06 uses it only
        then), `training_curve.png`, `summary.json` and table `history`.
Time:   full GSM8K train on 2 CPU cores: reading the ~1,700 problems without C3 slots ~1 min,
        the student's search over the ~6.3k training problems at `verifier.pool_beam_width` 20
        ~10 min and over the ~700 validation ones at stage 06's beam ~40 s, then ~30 s per
        epoch. The sample: seconds.
You should see: how many training pools hold both a right and a wrong chain (the only ones a
ranking can change), the validation problems answered right by the search's own ranking,
then per epoch the listwise loss and the validation count with the verifier's scores.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from prefect import get_run_logger, task
from tqdm.auto import tqdm

from mycelium import c3_model, solver, stats, verifier
from mycelium.config import MyceliumConfig
from mycelium.reports import ReportSection, format_rate
from mycelium.store import ArtifactRef, ArtifactStore, artifact_digest, source_code_version
from tasks import evaluate
from tasks.train_c2 import plot_training, student_encoder
from tasks.train_c3 import problems_from_tables

STEP = "verifier"


def _code_version() -> str:
    return source_code_version(sys.modules[__name__], verifier, solver, c3_model)


def verifier_ref(store: ArtifactStore, cfg: MyceliumConfig, inputs: dict[str, ArtifactRef]) -> ArtifactRef:
    search = {k: v for k, v in cfg.eval.digest_payload().items() if k not in ("dataset", "split", "fields", "n_problems", "teacher_problems",
                                                                               "teacher_max_new_tokens", "teacher_batch_size", "teacher_latency_problems",
                                                                               "easy_max_steps", "rerank", "backbone_runtime", "int8_read_threads",
                                                                               "bootstrap_resamples")}
    reading = {k: v for k, v in cfg.c3.digest_payload().items() if k in ("backbone", "max_length", "context_tokens", "max_operands", "read_precision")}
    payload = {"verifier": cfg.verifier.digest_payload(), "eval": search, "c2_threshold": cfg.c2.threshold, "c3": reading, "c4": cfg.c4.digest_payload(),
               "steps": cfg.steps.digest_payload()}
    return store.ref(STEP, artifact_digest(STEP, payload, [inputs[k] for k in sorted(inputs)], _code_version()))


def verifier_vocabulary(pools: list[dict], cfg: MyceliumConfig) -> verifier.VerifierVocabulary:
    skeletons = sorted({step.skeleton for entry in pools for chain in entry["chains"] for step in chain.steps})
    return verifier.VerifierVocabulary(skeletons, list(cfg.c4.domain_constants), cfg.eval.max_steps, cfg.c3.max_operands)


def search_pools(student: solver.Student, problems: dict[str, c3_model.ProblemText], gold: dict[str, str], ids: list[str],
                 cfg: MyceliumConfig, beam_width: int, desc: str) -> list[dict]:
    """The student's finished chains for each problem, from stage 06's search with `beam_width`,
    each marked right or wrong against the gold answer (the numeric check of stage 06)."""
    settings = dataclasses.replace(evaluate.search_settings(cfg), beam_width=beam_width)
    pools = []
    for problem_id in tqdm(ids, desc=desc, unit="problem"):
        problem = problems[problem_id]
        labels, probabilities = solver.problem_labels(student, problem, settings)
        chains = solver.find_chains(student, problem, labels, probabilities, settings)
        right = np.array([evaluate.correct(evaluate.check(evaluate.format_answer(c.steps[-1].value), gold[problem_id], False, cfg), False)
                          for c in chains], bool)
        pools.append({"problem_id": problem_id, "problem": problem, "chains": chains, "right": right})
    return pools


def right_after_vote(entry: dict, scores, settings: solver.SearchSettings) -> bool:
    """Whether the weighted vote over `scores` (one per chain) picks a right answer."""
    if not entry["chains"]:
        return False
    rescored = [solver.Chain(chain.steps, float(score)) for chain, score in zip(entry["chains"], scores, strict=True)]
    answer = solver.vote(rescored, settings)[0][0]
    return any(right for chain, right in zip(entry["chains"], entry["right"], strict=True)
               if solver.answer_key(chain.steps[-1].value, settings.answer_digits) == answer)


def build_verifier(ref: ArtifactRef, inputs: dict[str, ArtifactRef], cfg: MyceliumConfig, log=print) -> dict[str, Any]:
    store = ArtifactStore.for_ref(ref)
    student = evaluate.load_student(store, inputs, cfg)
    settings = evaluate.search_settings(cfg)
    c2 = store.read(inputs["training_sets"], "c2").select("problem_id", "problem", "split")
    texts = dict(c2.select("problem_id", "problem").iter_rows())
    problems = problems_from_tables({name: store.read(inputs["c3_features"], name) for name in ("problems", "candidates")}, texts)
    gold = dict(store.read(inputs["problems"], "problems").select("problem_id", "answer").iter_rows())
    unread = [p for p in texts if p not in problems and gold.get(p) is not None]
    if unread:  # problems stage 03 gave no C3 slots (no annotated gold chain) still have a gold answer to rank against
        encoder = student_encoder(store, inputs.get("student_backbone"), cfg.c3.backbone, cfg.c3.max_length, cfg.c3.read_precision, cfg.c3.int8_min_cosine)
        read = c3_model.read_problems(encoder, [texts[p] for p in unread], cfg.c4.word_to_number, cfg.c3.feature_batch_size, cfg.c3.context_tokens)
        problems.update(zip(unread, read, strict=True))
    split_of = dict(c2.select("problem_id", "split").iter_rows())
    ids = {split: sorted(p for p in problems if split_of.get(p) == split and gold.get(p) is not None) for split in ("train", "validation")}
    # Training pools come from a wider search than stage 06's (more of them hold a right chain, and
    # their wrong chains are more varied); validation pools from stage 06's own, since the epoch
    # and whether to use the verifier at all are chosen on what stage 06 will see.
    beam = {"train": cfg.verifier.pool_beam_width, "validation": cfg.eval.beam_width}
    pools = {split: search_pools(student, problems, gold, ids[split], cfg, beam[split], f"verifier: the student searches {split} problems (beam {beam[split]})")
             for split in ids}
    vocab = verifier_vocabulary(pools["train"], cfg)
    encoded = {split: [(verifier.encode_pool(e["problem"], e["chains"], vocab), e["right"]) if e["chains"] else None for e in pools[split]]
               for split in pools}

    def outcomes(model: verifier.ChainVerifier | None) -> list[bool]:
        """Per validation problem: right after the vote over the model's scores (None: the search's)."""
        return [item is not None and right_after_vote(entry, [c.score for c in entry["chains"]] if model is None else verifier.score_pool(model, item[0]), settings)
                for entry, item in zip(pools["validation"], encoded["validation"], strict=True)]

    dim = len(next(iter(problems.values())).pooled)
    train = [item for item in encoded["train"] if item is not None]
    validation = [item for item in encoded["validation"] if item is not None]
    log(f"verifier: {len(verifier.mixed(train))} of {len(ids['train'])} training pools hold a right and a wrong chain")
    result = verifier.train_verifier(train, validation, vocab, dim, cfg.verifier, lambda model: sum(outcomes(model)), log=log)
    n_validation = len(ids["validation"])
    summary = {
        "n_train_problems": len(ids["train"]), "n_train_mixed": len(verifier.mixed(train)), "n_validation_problems": n_validation,
        "validation_in_pool": stats.rate_with_interval(int(sum(bool(e["right"].any()) for e in pools["validation"])), n_validation),
        "search_right": stats.rate_with_interval(result.search_right, n_validation),
        "verifier_right": stats.rate_with_interval(result.verifier_right, n_validation),
        "beats_search": result.beats_search, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "pool_beam_width": beam["train"], "validation_beam_width": beam["validation"],
    }
    summary["mcnemar"] = evaluate.mcnemar(outcomes(result.model), outcomes(None))
    for name, data in verifier.save_verifier(result, vocab, dim, cfg.verifier).items():
        store.write_file(ref, name, data)
    with tempfile.TemporaryDirectory() as folder:
        history = [{**h, "validation_rate": h["validation_right"] / max(n_validation, 1)} for h in result.history]
        figure = plot_training(history, Path(folder) / "training_curve.png", "chain verifier", {"validation_rate": "validation answers right"})
        store.write_file(ref, "training_curve.png", figure.read_bytes())
    store.write_file(ref, "summary.json", json.dumps(summary, indent=2, default=float).encode())
    store.write_table(ref, {"history": pl.DataFrame(result.history)}, metadata={"best_epoch": result.best_epoch})
    return summary


@task(name="verifier-train")
def train_task(ref: ArtifactRef, inputs: dict[str, ArtifactRef], cfg: MyceliumConfig) -> ArtifactRef:
    logger = get_run_logger()
    summary = build_verifier(ref, inputs, cfg, log=logger.info)
    logger.info("verifier: validation right %d with it vs %d with the search's ranking", summary["verifier_right"]["count"], summary["search_right"]["count"])
    return ref


def report_section(store: ArtifactStore, ref: ArtifactRef) -> ReportSection:
    store.verify(ref)
    s = json.loads(store.read_file(ref, "summary.json"))
    used = "used by stage 06" if s["beats_search"] else "**not used**: it did not beat the search's own ranking on validation"
    lines = [
        "## Stage 05 — chain verifier",
        "",
        f"Trained on the student's finished chains for {s['n_train_problems']} training problems ({s['n_train_mixed']} with both a right and "
        f"a wrong chain; search beam {s['pool_beam_width']}, validation at stage 06's {s['validation_beam_width']}); "
        f"best epoch {s['best_epoch']} of {s['epochs_run']}; {used}.",
        "",
        "| validation | answers right |",
        "|---|---|",
        f"| gold answer among the finished chains (the bound of any ranking) | {format_rate(s['validation_in_pool'])} |",
        f"| the search's own ranking (weighted vote over its scores) | {format_rate(s['search_right'])} |",
        f"| the verifier's ranking | {format_rate(s['verifier_right'])} |",
        "",
        f"McNemar, verifier vs search on the same {s['n_validation_problems']} problems: p = {s['mcnemar']['p_value']:.3g} "
        f"({s['mcnemar']['only_student']} right only with the verifier, {s['mcnemar']['only_other']} only with the search). "
        "The epoch was chosen on these same problems, so read this as optimistic; stage 06 on held-out problems is the measure.",
        "",
        "![chain verifier training](verifier_training_curve.png)",
    ]
    flat = {"verifier_validation_right": s["verifier_right"], "verifier_search_right": s["search_right"], "verifier_used": s["beats_search"]}
    return ReportSection(flat, "\n".join(lines) + "\n", {"verifier_training_curve.png": store.read_file(ref, "training_curve.png")})
