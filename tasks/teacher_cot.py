"""Stage 06, part one — the teacher's own chain of thought on the evaluation problems.

Reads:  the evaluation problems (see `select_problems`), the teacher, the `teacher` and `eval`
        config sections.
Writes: artifact `teacher_cot`, table `answers`: problem_id, the extracted final answer, the
        generated text, seconds (the per-problem latency, for the first
        `eval.teacher_latency_problems` only; null for the rest, which run batched). Cached on
        its own, apart from the student's evaluation: it is the slow part (SmolLM2-135M writes
        14-28 tokens/s on 2 CPU cores one problem at a time, 10-25 s per GSM8K problem; in
        batches of 16, 2.5-7.5 s a problem: the default 500, all of the shipped test set, took
        22 min on 2026-12-04; 200 took 10-28 min), and a change to the search must not redo it.
You should see: a progress bar over the teacher's subset, then the count and the wall time.
The subset is a seeded random sample of `eval.teacher_problems` of the evaluated problems;
decoding is greedy, at most `eval.teacher_max_new_tokens` tokens.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import polars as pl
import torch
from prefect import get_run_logger, task

from mycelium import answers
from mycelium import teacher as teacher_module
from mycelium.config import MyceliumConfig
from mycelium.errors import MyceliumError
from mycelium.store import (
    ArtifactRef,
    ArtifactStore,
    artifact_digest,
    source_code_version,
)

TEACHER_STEP = "teacher_cot"
TEACHER_KEYS = ("teacher_problems", "teacher_max_new_tokens", "teacher_batch_size", "teacher_latency_problems", "seed", "n_problems", "dataset")  # what changes the teacher's answers
TEACHER_SCHEMA = {"problem_id": pl.Utf8, "answer": pl.Utf8, "text": pl.Utf8, "seconds": pl.Float64}


def select_problems(store: ArtifactStore, eval_problems: ArtifactRef, training_sets: ArtifactRef, cfg: MyceliumConfig) -> pl.DataFrame:
    """The problems stage 06 evaluates: `eval.dataset`, or the held-out validation split when it is null."""
    problems = store.read(eval_problems, "problems")
    if cfg.eval.dataset is None:  # the held-out validation split of the training set
        held_out = store.read(training_sets, "c2").filter(pl.col("split") == "validation").select("problem_id")
        problems = problems.join(held_out, on="problem_id", how="semi", maintain_order="left")
    if cfg.eval.n_problems is not None:
        problems = problems.head(cfg.eval.n_problems)
    if problems.height == 0:
        raise MyceliumError("stage 06: no problems to evaluate (an empty validation split? set eval.dataset or more problems)")
    return problems


def teacher_ref(store: ArtifactStore, cfg: MyceliumConfig, eval_problems: ArtifactRef, training_sets: ArtifactRef) -> ArtifactRef:
    """The teacher's chain of thought is its own artifact: ~20-60 min for 500 problems on a CPU,
    so a change to the student's search must not redo it, and neither must retraining when the
    problems come from `eval.dataset` (only the held-out split depends on the training sets)."""
    payload = {"teacher": {k: v for k, v in cfg.teacher.digest_payload().items() if k not in ("device", "torch_threads")},
               "eval": {k: cfg.eval.digest_payload()[k] for k in TEACHER_KEYS}}
    code = source_code_version(sys.modules[__name__], answers, teacher_module)
    upstream = [eval_problems, training_sets] if cfg.eval.dataset is None else [eval_problems]
    return store.ref(TEACHER_STEP, artifact_digest(TEACHER_STEP, payload, upstream, code))


def teacher_subset(problem_ids: list[str], cfg: MyceliumConfig) -> list[str]:
    """A fixed random subset (seeded) of the evaluated problems for the teacher."""
    if not cfg.eval.teacher_problems:
        return []
    rng = np.random.default_rng(cfg.eval.seed)
    chosen = rng.choice(len(problem_ids), size=min(cfg.eval.teacher_problems, len(problem_ids)), replace=False)
    return [problem_ids[i] for i in sorted(chosen)]


def build_teacher(ref: ArtifactRef, eval_problems: ArtifactRef, training_sets: ArtifactRef, cfg: MyceliumConfig) -> dict[str, Any]:
    store = ArtifactStore.for_ref(ref)
    problems = select_problems(store, eval_problems, training_sets, cfg)
    chosen = set(teacher_subset(problems["problem_id"].to_list(), cfg))
    rows = problems.filter(pl.col("problem_id").is_in(chosen))
    started = time.perf_counter()
    outputs = teacher_answers(cfg, rows["problem"].to_list())
    wall = time.perf_counter() - started
    table = pl.DataFrame({"problem_id": rows["problem_id"].to_list(), "answer": [o[0] for o in outputs], "text": [o[1] for o in outputs],
                          "seconds": [o[2] for o in outputs]}, schema=TEACHER_SCHEMA)
    store.write_table(ref, {"answers": table}, metadata={"n": table.height})
    return {"n": table.height, "seconds": wall, "timed": table["seconds"].count()}


def teacher_answers(cfg: MyceliumConfig, problems: list[str], progress: bool = True) -> list[tuple[str | None, str, float | None]]:
    """(extracted answer, generated text, seconds or None) for each problem, greedy chain of thought.

    The first `eval.teacher_latency_problems` run one at a time and are timed: that is the
    teacher's per-problem latency as a user would see it, and the only seconds reported. The
    rest run in left-padded batches of `eval.teacher_batch_size` with seconds None: on 2 CPU
    cores a batch of 16 writes the same greedy text at ~4x the problems per second (measured on
    16 GSM8K test problems: 14.8 s a problem one at a time, 3.4 s in a batch of 16; every text
    identical at batch 8), and the accuracy baseline does not need each problem timed.
    """
    from tqdm.auto import tqdm

    from mycelium.config import Settings

    teacher = teacher_module.load_teacher(cfg.teacher, Settings().cache_dir)
    timed = min(cfg.eval.teacher_latency_problems, len(problems))
    batches = [problems[i:i + 1] for i in range(timed)]
    batches += [problems[i:i + cfg.eval.teacher_batch_size] for i in range(timed, len(problems), cfg.eval.teacher_batch_size)]
    result: list[tuple[str | None, str, float | None]] = []
    with tqdm(total=len(problems), desc="teacher chain of thought", unit="problem", disable=not progress) as bar:
        for batch in batches:
            started = time.perf_counter()
            texts = greedy_texts(teacher, batch, cfg)
            seconds = time.perf_counter() - started if len(result) < timed else None
            result += [(answers.extract_final_answer(text), text, seconds) for text in texts]
            bar.update(len(batch))
    return result


def greedy_texts(teacher: teacher_module.Teacher, problems: list[str], cfg: MyceliumConfig) -> list[str]:
    """The teacher's greedy continuation of each problem's prompt, one batch at once (left-padded,
    so every row's new tokens start at the same column)."""
    tokenizer, model = teacher.tokenizer, teacher.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [teacher_module.build_prompt(tokenizer, problem, cfg.teacher.use_chat_template) for problem in problems]
    # One prompt builder serves every row, so all rows agree on add_special_tokens.
    encoded = tokenizer([p.text for p in prompts], add_special_tokens=prompts[0].add_special_tokens, return_tensors="pt",
                        padding=True, padding_side="left").to(teacher.device)
    with torch.inference_mode():
        out = model.generate(**encoded, max_new_tokens=cfg.eval.teacher_max_new_tokens, do_sample=False, pad_token_id=pad)
    width = encoded["input_ids"].shape[1]
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


@task(name="teacher-cot")
def teacher_task(ref: ArtifactRef, eval_problems: ArtifactRef, training_sets: ArtifactRef, cfg: MyceliumConfig) -> ArtifactRef:
    meta = build_teacher(ref, eval_problems, training_sets, cfg)
    get_run_logger().info("teacher chain of thought: %d problems in %.0f s (%d of them timed one at a time)", meta["n"], meta["seconds"], meta["timed"])
    return ref


