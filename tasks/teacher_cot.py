"""Stage 06, part one — the teacher's own chain of thought on the evaluation problems.

Reads:  the evaluation problems (see `select_problems`), the teacher, the `teacher` and `eval`
        config sections.
Writes: artifact `teacher_cot`, table `answers`: problem_id, the extracted final answer, the
        generated text, seconds. Cached on its own, apart from the student's evaluation: it is
        the slow part (SmolLM2-135M writes ~28 tokens/s on 2 CPU cores, ~10 s per GSM8K
        problem, ~17 min for the default 100), and a change to the search must not redo it.
You should see: a progress bar over the teacher's subset, then the count and total seconds.
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
TEACHER_KEYS = ("teacher_problems", "teacher_max_new_tokens", "seed", "n_problems", "dataset")  # what changes the teacher's answers
TEACHER_SCHEMA = {"problem_id": pl.Utf8, "answer": pl.Utf8, "text": pl.Utf8, "seconds": pl.Float64}


def select_problems(store: ArtifactStore, eval_problems: ArtifactRef, training_sets: ArtifactRef, cfg: MyceliumConfig) -> pl.DataFrame:
    """The problems stage 06 evaluates: the held-out split by default, else the eval dataset."""
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
    """The teacher's chain of thought is its own artifact: ~17 min for 100 problems on a CPU,
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
    outputs = teacher_answers(cfg, rows["problem"].to_list())
    table = pl.DataFrame({"problem_id": rows["problem_id"].to_list(), "answer": [o[0] for o in outputs], "text": [o[1] for o in outputs],
                          "seconds": [o[2] for o in outputs]}, schema=TEACHER_SCHEMA)
    store.write_table(ref, {"answers": table}, metadata={"n": table.height})
    return {"n": table.height, "seconds": float(table["seconds"].sum()) if table.height else 0.0}


def teacher_answers(cfg: MyceliumConfig, problems: list[str], progress: bool = True) -> list[tuple[str | None, str, float]]:
    """(extracted answer, generated text, seconds) for each problem, greedy chain of thought."""
    from tqdm.auto import tqdm

    from mycelium.config import Settings

    teacher = teacher_module.load_teacher(cfg.teacher, Settings().cache_dir)
    tokenizer, model = teacher.tokenizer, teacher.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = []
    for problem in tqdm(problems, desc="teacher chain of thought", unit="problem", disable=not progress):
        prompt = teacher_module.build_prompt(tokenizer, problem, cfg.teacher.use_chat_template)
        ids = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens, return_tensors="pt")["input_ids"].to(teacher.device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.eval.teacher_max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        seconds = time.perf_counter() - started
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        result.append((answers.extract_final_answer(text), text, seconds))
    return result


@task(name="teacher-cot")
def teacher_task(ref: ArtifactRef, eval_problems: ArtifactRef, training_sets: ArtifactRef, cfg: MyceliumConfig) -> ArtifactRef:
    meta = build_teacher(ref, eval_problems, training_sets, cfg)
    get_run_logger().info("teacher chain of thought: %d problems in %.0f s", meta["n"], meta["seconds"])
    return ref


