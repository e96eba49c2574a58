"""The teacher as a zero-shot ranker of the student's answers: does SmolLM2's likelihood of a
chain, written out as equations after the problem, pick the right answer more often than the
student's own ranking (search + chain verifier + weighted vote)?

Why it is measured: on GSM8K test the student's finished chains hold the gold answer for ~42%
of problems and it picks that answer for ~18%; every feature-level ranker tried on the CPU
stayed within seed noise (docs/results.md). The one reader not yet tried is a language model
that reads the problem's words against a chain. The teacher is the only one on this machine.

Reads:  the trained student of the config (`bench/trained_student.py`), the teacher of the
        config, and the first --n problems of the training set's validation split and of the
        evaluated dataset.
Writes: a Parquet of per-answer scores per split under <cache_dir>/teacher_ranker (a second run
        with the same --n and student only re-analyses, in seconds).
Time:   the student first (~15 ms a problem), then one teacher pass per problem over the
        prompt and its 8 best answers' chains (DEFAULT_ANSWERS): ~1.2-1.5 s a problem on 2
        cores. --n 300 (300 validation + 300 test problems) took 14 min; all 736 + 1,319 ~45 min.
You see: per split the student's own ranking beside the teacher-combined ranking for each
        setting (count, Wilson 95% interval, McNemar against the student) beside what a random
        pick among the same answers would get, the setting chosen on validation, and that one
        setting's result on test.

    python bench/teacher_ranker.py --n 300
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import polars as pl
import torch
from tqdm.auto import tqdm

from mycelium import c3_model, solver
from mycelium.config import Settings
from mycelium.teacher import build_prompt, load_teacher
from tasks import evaluate
from trained_student import parse_arguments, percent, trained_student

# How many of the student's answers (best first by its vote) the teacher re-scores: nearly
# every pool that holds the gold answer holds it among its first 8 (GSM8K test, stage 06:
# among the first 10 for 38.0% of problems, anywhere in the pool for 41.4%).
DEFAULT_ANSWERS = 8
# Weights of the teacher's score beside the log of the student's vote weight; "inf" ranks by
# the teacher alone (ties by the student's order).
WEIGHTS = [0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, math.inf]
NORMALISATIONS = ("sum", "mean")
# Binary operators get a space either side, as GSM8K solutions write them; `**` stays one
# operator. `-` is left alone: it also writes negative numbers.
SPACED_OPERATOR = re.compile(r"(\*\*|[*/+])")
# Part of the cache file's name: bump it when `written_chain` renders differently, so cached
# teacher scores of the old renderings are not re-read.
RENDERING_VERSION = 2


def written_chain(chain: solver.Chain) -> str:
    """A chain as the equations a GSM8K solution writes: one `a * b = c` per line, earlier
    results by their value, then the answer sentence."""
    lines = []
    for step in chain.steps:
        filled = step.skeleton
        for k, operand in enumerate(step.operands):
            value = chain.steps[operand.prior_step].value if operand.kind == c3_model.PRIOR else operand.value
            filled = filled.replace("{%d}" % k, f"{value:g}")  # noqa: UP031 — literal braces
        lines.append(SPACED_OPERATOR.sub(r" \1 ", filled) + f" = {step.value:g}")
    lines.append(f"The answer is {chain.steps[-1].value:g}.")
    return "\n".join(lines)


@torch.inference_mode()
def continuation_logprobs(teacher, prompt: str, add_special_tokens: bool, continuations: list[str]) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each continuation after `prompt`: the prompt
    runs once, its key/value cache is repeated for the continuations, which run as one batch."""
    tokenizer, model = teacher.tokenizer, teacher.model
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens, return_tensors="pt").input_ids
    out = model(prompt_ids, use_cache=True)
    last_logits = out.logits[0, -1].log_softmax(-1)
    encoded = [tokenizer(text, add_special_tokens=False).input_ids for text in continuations]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), prompt_ids.shape[1] + width), dtype=torch.long)
    mask[:, : prompt_ids.shape[1]] = 1
    for i, ids in enumerate(encoded):
        batch[i, : len(ids)] = torch.tensor(ids)
        mask[i, prompt_ids.shape[1]: prompt_ids.shape[1] + len(ids)] = 1
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(encoded))
    logits = model(batch, past_key_values=cache, attention_mask=mask, use_cache=False).logits.log_softmax(-1)
    scores = []
    for i, ids in enumerate(encoded):
        first = float(last_logits[ids[0]])
        rest = float(logits[i, torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()) if len(ids) > 1 else 0.0
        scores.append((first + rest, len(ids)))
    return scores


def score_split(name: str, rows: list[dict], trained, teacher, answers: int) -> pl.DataFrame:
    """One row per (problem, candidate answer): the student's vote weight, the teacher's
    log-likelihood of the answer's best chain, and whether the answer is right."""
    cfg = trained.cfg
    settings = evaluate.search_settings(cfg)
    encoder = trained.encoder()
    # The student first, for every problem, then the teacher, so that ONNX Runtime's worker
    # threads (which spin between runs) are gone before torch wants both cores for the teacher.
    pending = []
    for row in tqdm(rows, desc=f"{name}: student", unit="problem"):
        problem = trained.read(encoder, str(row["problem"]))
        labels, probabilities = solver.problem_labels(trained.student, problem, settings)
        chains = solver.rerank(trained.student, problem, solver.find_chains(trained.student, problem, labels, probabilities, settings))
        best = {}
        for chain in chains:
            best.setdefault(solver.answer_key(chain.steps[-1].value, settings.answer_digits), chain)
        pending.append((row, [(answer, weight, written_chain(best[answer])) for answer, weight in solver.vote(chains, settings)[:answers]]))
    del encoder
    records = []
    for row, ranked in tqdm(pending, desc=f"{name}: teacher", unit="problem"):
        if not ranked:
            records.append({"problem_id": row["problem_id"], "rank": 0, "answer": None, "log_vote": None, "lm_sum": None, "lm_tokens": None, "correct": False})
            continue
        prompt = build_prompt(teacher.tokenizer, str(row["problem"]), cfg.teacher.use_chat_template)
        lm = continuation_logprobs(teacher, prompt.text, prompt.add_special_tokens, [written for _, _, written in ranked])
        for rank, ((answer, weight, _), (lm_sum, n_tokens)) in enumerate(zip(ranked, lm, strict=True)):
            formatted = evaluate.format_answer(answer)
            records.append({"problem_id": row["problem_id"], "rank": rank, "answer": formatted, "log_vote": math.log(weight), "lm_sum": lm_sum,
                            "lm_tokens": n_tokens, "correct": evaluate.correct(evaluate.check(formatted, row.get("answer"), False, cfg), False)})
    return pl.DataFrame(records)


def picked_right(scores: pl.DataFrame, weight: float, normalisation: str) -> pl.DataFrame:
    """Per problem, whether the answer with the best combined score is right."""
    lm = pl.col("lm_sum") / (pl.col("lm_tokens") if normalisation == "mean" else 1)
    combined = lm if math.isinf(weight) else pl.col("log_vote") + weight * lm
    return (scores.with_columns(combined.fill_null(-math.inf).alias("combined"))
            .sort(["problem_id", "combined", "rank"], descending=[False, True, False])
            .group_by("problem_id", maintain_order=True).first().select("problem_id", "correct"))


def compare(scores: pl.DataFrame, weight: float, normalisation: str) -> tuple[int, str]:
    student = picked_right(scores, 0.0, "sum")
    combined = picked_right(scores, weight, normalisation).join(student, on="problem_id", suffix="_student")
    test = evaluate.mcnemar(combined["correct"].to_list(), combined["correct_student"].to_list())
    right = int(combined["correct"].sum())
    return right, f"{percent(right, combined.height)}   ({test['only_student']} vs {test['only_other']} discordant, p = {test['p_value']:.2g})"


def main() -> int:
    args = parse_arguments(__doc__.splitlines()[0] + " (--n: the first N problems of each split)", default_n=1319)
    trained = trained_student(args.set)
    cache = Path(Settings().cache_dir) / "teacher_ranker"
    cache.mkdir(parents=True, exist_ok=True)
    validation_ids = trained.store.read(trained.inputs["training_sets"], "c2").filter(pl.col("split") == "validation").select("problem_id")
    splits = {
        "validation": trained.store.read(trained.refs["problems"], "problems").join(validation_ids, on="problem_id", how="semi", maintain_order="left").head(args.n),
        "test": trained.store.read(trained.refs["problems_eval"], "problems").head(args.n),
    }
    teacher = None
    scores = {}
    for name, problems in splits.items():
        path = cache / f"{name}_{trained.refs['verifier'].digest[:12]}_{problems.height}_r{RENDERING_VERSION}.parquet"
        if not path.exists():
            teacher = teacher or load_teacher(trained.cfg.teacher, Settings().cache_dir)
            score_split(name, problems.to_dicts(), trained, teacher, DEFAULT_ANSWERS).write_parquet(path)
        scores[name] = pl.read_parquet(path)
        n = problems.height
        in_top = scores[name].group_by("problem_id").agg(pl.col("correct").any())["correct"].sum()
        # what picking one of those answers at random would get, for scale
        chance = scores[name].group_by("problem_id").agg(pl.col("correct").mean())["correct"].sum()
        print(f"{name}: gold answer among the student's first {DEFAULT_ANSWERS} answers {percent(int(in_top), n)}; "
              f"one of them picked at random: {chance:.1f} expected right")
    print("\nvalidation, the student's own ranking first:")
    results = {}
    for normalisation in NORMALISATIONS:
        for weight in WEIGHTS:
            right, line = compare(scores["validation"], weight, normalisation)
            results[(weight, normalisation)] = right
            print(f"  teacher weight {weight:>4} ({normalisation:<4}): {line}")
    chosen = max(results, key=lambda k: (results[k], -k[0]))
    print(f"\nchosen on validation: weight {chosen[0]} ({chosen[1]})")
    print(f"test, the student's own ranking: {compare(scores['test'], 0.0, 'sum')[1].split('   ')[0]}")
    print(f"test, with the teacher ({chosen[0]}, {chosen[1]}): {compare(scores['test'], *chosen)[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
