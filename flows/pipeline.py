"""The Mycelium flow: problems → 00 attention traces → 01 heartbeats → 02 steps and
templates → 03 C2/C3 training sets → 04 C2 training → 05 C3 training → 06 evaluation →
report. Every step is a cached Prefect task whose cache key is its
artifact digest, so
rerunning with nothing changed recomputes nothing, and a failed or killed run resumes
where it stopped. Parameters are plain values so the flow can be triggered from the UI.
The report lists every step as computed or cached.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow
from prefect.runtime import flow_run

from flows.extraction import extraction, task_runner_for
from mycelium.config import load_config
from mycelium.errors import MyceliumError
from mycelium.orchestration import configure_result_storage, run_step
from mycelium.reports import ReportSection, steps_section, write_report
from mycelium.store import ArtifactRef, ArtifactStore
from tasks import (
    extract_attention,
    heartbeats,
    problems,
    teacher_cot,
    templates,
    train_c2,
    evaluate,
    train_c3,
    training_data,
)

KNOWN_STAGES = ["00", "01", "02", "03", "04", "05", "06"]
DEFAULT_STAGES = "00-06"


def parse_stages(text: str) -> list[str]:
    """'00-02' → ['00', '01', '02']; '01' → ['01']."""
    first, _, last = text.partition("-")
    last = last or first
    if first not in KNOWN_STAGES or last not in KNOWN_STAGES or first > last:
        raise MyceliumError(f"--stages {text}: expected a range within {KNOWN_STAGES[0]}-{KNOWN_STAGES[-1]}, such as {DEFAULT_STAGES}")
    return [stage for stage in KNOWN_STAGES if first <= stage <= last]


def _require(store: ArtifactStore, ref: ArtifactRef, stage: str, needed_by: str) -> None:
    if not store.is_complete(ref):
        raise MyceliumError(
            f"stage {needed_by} needs stage {stage}'s artifact, which is not in {store.root}: run --stages {stage}-{needed_by}"
        )


@flow(name="mycelium")
def mycelium(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    stages: str = DEFAULT_STAGES,
    smoke: bool = False,
) -> str:
    """Run the pipeline stages in `stages` and return the path of the run's report.md."""
    cfg = load_config(config_path, overrides, smoke=smoke)
    selected = parse_stages(stages)
    store = ArtifactStore.from_settings()
    store.check_reachable()
    result_storage = configure_result_storage(store)
    statuses: dict[str, str] = {}

    def step(task, ref: ArtifactRef, *args) -> None:
        statuses[ref.step] = run_step(task, ref.cache_key, store.is_complete(ref), cfg.storage, result_storage, ref, *args)

    problems_ref = problems.problems_ref(store, cfg.dataset)
    step(problems.problems_task, problems_ref, cfg.dataset)

    heads_ref = extract_attention.heads_ref(store, cfg.teacher, cfg.extraction, problems_ref)
    traces_ref = extract_attention.traces_ref(store, cfg.teacher, cfg.extraction, problems_ref, heads_ref)
    chunk_counts = {}
    if "00" in selected:
        step(extract_attention.select_heads_task, heads_ref, problems_ref, cfg.teacher, cfg.extraction)
        outcome = extraction.with_options(task_runner=task_runner_for(cfg.extraction))(
            traces_ref, problems_ref, heads_ref, cfg.teacher, cfg.extraction, cfg.storage, result_storage
        )
        statuses[traces_ref.step] = "cached" if outcome.chunks_computed == 0 else "computed"
        chunk_counts = {"chunks": outcome.chunks, "chunks_computed": outcome.chunks_computed, "chunks_cached": outcome.chunks_cached}
    elif "01" in selected or "03" in selected:  # stage 02 reads gold solutions only: no traces
        _require(store, traces_ref, "00", "01" if "01" in selected else "03")

    heartbeats_ref = heartbeats.heartbeats_ref(store, cfg.heartbeat, traces_ref, problems_ref)
    if "01" in selected:
        step(heartbeats.heartbeats_task, heartbeats_ref, traces_ref, problems_ref, cfg.heartbeat)
    elif "03" in selected:
        _require(store, heartbeats_ref, "01", "03")

    steps_ref = templates.steps_ref(store, cfg.steps, cfg.ib, cfg.c2, problems_ref)
    templates_ref = templates.templates_ref(store, cfg.ib, steps_ref)
    if "02" in selected:
        step(templates.steps_task, steps_ref, problems_ref, cfg.steps, cfg.ib, cfg.c2)
        step(templates.templates_task, templates_ref, steps_ref, cfg.ib)
    elif "03" in selected:
        _require(store, templates_ref, "02", "03")

    training_inputs = {"problems": problems_ref, "traces": traces_ref, "heartbeats": heartbeats_ref, "steps": steps_ref, "templates": templates_ref}
    training_ref = training_data.training_sets_ref(store, cfg.training_data, cfg.c2, cfg.c4, cfg.steps, training_inputs)
    if "03" in selected:
        step(training_data.training_sets_task, training_ref, training_inputs, cfg.training_data, cfg.c2, cfg.c4, cfg.steps)
    elif "04" in selected or "05" in selected:
        _require(store, training_ref, "03", "04" if "04" in selected else "05")

    c2_features_ref = train_c2.features_ref(store, cfg.c2, training_ref)
    c2_model_ref = train_c2.model_ref(store, cfg.c2, training_ref, c2_features_ref)
    if "04" in selected:
        step(train_c2.features_task, c2_features_ref, training_ref, cfg.c2)
        step(train_c2.train_task, c2_model_ref, training_ref, c2_features_ref, cfg.c2)

    c3_features_ref = train_c3.features_ref(store, cfg.c3, cfg.c4, training_ref)
    c3_model_ref = train_c3.model_ref(store, cfg.c3, cfg.c4, list(cfg.c2.labels), cfg.eval.beam_width, cfg.eval.max_steps, training_ref, c3_features_ref)
    if "05" in selected:
        step(train_c3.features_task, c3_features_ref, training_ref, cfg.c3, cfg.c4)
        step(train_c3.train_task, c3_model_ref, training_ref, c3_features_ref, cfg.c3, cfg.c4, cfg.c2, cfg.eval.beam_width, cfg.eval.max_steps)

    eval_inputs = {"training_sets": training_ref, "c2_features": c2_features_ref, "c2_model": c2_model_ref, "c3_model": c3_model_ref}
    eval_dataset = cfg.dataset
    if cfg.eval.dataset is not None:
        eval_dataset = cfg.dataset.model_copy(
            update={"source": cfg.eval.dataset, "split": cfg.eval.split, "limit": None, "fields": cfg.eval.fields or cfg.dataset.fields}
        )
    eval_problems_ref = problems.problems_ref(store, eval_dataset)
    teacher_cot_ref = teacher_cot.teacher_ref(store, cfg, eval_problems_ref, training_ref)
    evaluation_ref = evaluate.evaluation_ref(store, cfg, {**eval_inputs, "problems": eval_problems_ref, "teacher": teacher_cot_ref})
    if "06" in selected:
        for stage, ref in (("04", c2_model_ref), ("05", c3_model_ref)):
            if stage not in selected:
                _require(store, ref, stage, "06")
        if eval_problems_ref != problems_ref:
            statuses[eval_problems_ref.step + "_eval"] = run_step(
                problems.problems_task, eval_problems_ref.cache_key, store.is_complete(eval_problems_ref), cfg.storage, result_storage,
                eval_problems_ref, eval_dataset,
            )
        step(teacher_cot.teacher_task, teacher_cot_ref, eval_problems_ref, training_ref, cfg)
        step(evaluate.evaluate_task, evaluation_ref, eval_problems_ref, teacher_cot_ref, eval_inputs, cfg)

    all_refs = (problems_ref, heads_ref, traces_ref, heartbeats_ref, steps_ref, templates_ref, training_ref,
                c2_features_ref, c2_model_ref, c3_features_ref, c3_model_ref, teacher_cot_ref, evaluation_ref)
    sections: list[ReportSection] = [
        steps_section(statuses, {r.step: r for r in all_refs} | {"problems_eval": eval_problems_ref}, chunk_counts),
        problems.report_section(store, problems_ref),
    ]
    if store.is_complete(traces_ref):
        sections.append(extract_attention.report_section(store, heads_ref, traces_ref))
    if "01" in selected:
        sections.append(heartbeats.report_section(store, heartbeats_ref))
    if "02" in selected:
        sections.append(templates.report_section(store, steps_ref, templates_ref))
    if "03" in selected:
        sections.append(training_data.report_section(store, training_ref, list(cfg.c2.labels)))
    if "04" in selected:
        sections.append(train_c2.report_section(store, c2_model_ref, list(cfg.c2.labels)))
    if "05" in selected:
        sections.append(train_c3.report_section(store, c3_model_ref))
    if "06" in selected:
        sections.append(evaluate.report_section(store, evaluation_ref))
    title = f"# Mycelium run — stages {stages}{' (smoke)' if smoke else ''}\n"
    run_name = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{flow_run.name or 'local'}"
    summary = {"stages": stages, "smoke": smoke, "storage_root": store.root}
    return write_report(store, "mycelium", run_name, summary, title, sections)
