"""The Mycelium flow: problems → 00 attention traces → 01 heartbeats → 02 steps and
templates → 03 C2/C3 training sets → 04 C2 training → 05 C3 training and the chain verifier → 06 evaluation →
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
from mycelium.config import DatasetConfig, MyceliumConfig, load_config
from mycelium.errors import MyceliumError
from mycelium.orchestration import configure_result_storage, run_step
from mycelium.reports import ReportSection, steps_section, write_report
from mycelium.store import ArtifactRef, ArtifactStore
from tasks import (
    evaluate,
    extract_attention,
    heartbeats,
    problems,
    teacher_cot,
    templates,
    train_c2,
    train_c3,
    train_verifier,
    training_data,
    tune_backbone,
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


def eval_dataset_config(cfg: MyceliumConfig) -> DatasetConfig:
    """The problems stage 06 evaluates: the training dataset's held-out split, or `eval.dataset`."""
    if cfg.eval.dataset is None:
        return cfg.dataset
    return cfg.dataset.model_copy(update={"source": cfg.eval.dataset, "split": cfg.eval.split, "limit": None, "fields": cfg.eval.fields or cfg.dataset.fields})


def artifact_refs(store: ArtifactStore, cfg: MyceliumConfig) -> dict[str, ArtifactRef]:
    """Where every step's artifact lives for this config, keyed by step (the evaluated problems
    as "problems_eval"). A digest depends only on config, code and upstream digests, so this
    runs nothing; the flow and the benchmarks find the same artifacts through it."""
    refs: dict[str, ArtifactRef] = {}
    refs["problems"] = problems.problems_ref(store, cfg.dataset)
    refs["heads"] = extract_attention.heads_ref(store, cfg.teacher, cfg.extraction, refs["problems"])
    refs["traces"] = extract_attention.traces_ref(store, cfg.teacher, cfg.extraction, refs["problems"], refs["heads"])
    refs["heartbeats"] = heartbeats.heartbeats_ref(store, cfg.heartbeat, refs["traces"], refs["problems"])
    refs["steps"] = templates.steps_ref(store, cfg.steps, cfg.ib, cfg.c2, refs["problems"])
    refs["templates"] = templates.templates_ref(store, cfg.ib, refs["steps"])
    refs["training_sets"] = training_data.training_sets_ref(store, cfg.training_data, cfg.c2, cfg.c4, cfg.steps, training_inputs(refs))
    backbone = tune_backbone.backbone_ref(store, cfg.c3, cfg.c4, list(cfg.c2.labels), cfg.eval.max_steps, refs["training_sets"])
    if backbone is not None:  # C2 reads with the same tuned weights: the student reads each problem once
        if cfg.c2.backbone != cfg.c3.backbone:
            raise MyceliumError(f"c2.backbone ({cfg.c2.backbone}) and c3.backbone ({cfg.c3.backbone}) differ; a tuned backbone "
                                "(c3.unfreeze) serves both, so set them alike or c3.unfreeze=never")
        refs["student_backbone"] = backbone
    refs["c2_features"] = train_c2.features_ref(store, cfg.c2, refs["training_sets"], backbone, cfg.c3.read_precision, cfg.c3.int8_min_cosine)
    refs["c2_model"] = train_c2.model_ref(store, cfg.c2, refs["training_sets"], refs["c2_features"])
    refs["c3_features"] = train_c3.features_ref(store, cfg.c3, cfg.c4, refs["training_sets"], backbone)
    refs["c3_model"] = train_c3.model_ref(store, cfg.c3, cfg.c4, list(cfg.c2.labels), cfg.eval.beam_width, cfg.eval.max_steps,
                                          refs["training_sets"], refs["c3_features"])
    refs["verifier"] = train_verifier.verifier_ref(store, cfg, verifier_inputs(refs))
    refs["problems_eval"] = problems.problems_ref(store, eval_dataset_config(cfg))
    refs["teacher_cot"] = teacher_cot.teacher_ref(store, cfg, refs["problems_eval"], refs["training_sets"])
    refs["evaluation"] = evaluate.evaluation_ref(store, cfg, {**student_inputs(refs), "problems": refs["problems_eval"], "teacher": refs["teacher_cot"]})
    return refs


def training_inputs(refs: dict[str, ArtifactRef]) -> dict[str, ArtifactRef]:
    """The artifacts stage 03 builds the training sets from."""
    return {step: refs[step] for step in ("problems", "traces", "heartbeats", "steps", "templates")}


def student_inputs(refs: dict[str, ArtifactRef]) -> dict[str, ArtifactRef]:
    """The artifacts the trained student is loaded from (`evaluate.load_student`)."""
    return {step: refs[step] for step in ("training_sets", "c2_features", "c2_model", "c3_model", "student_backbone", "verifier") if step in refs}


def verifier_inputs(refs: dict[str, ArtifactRef]) -> dict[str, ArtifactRef]:
    """What the chain verifier trains from: the student before it, its cached problem reads, gold answers."""
    return {step: refs[step] for step in ("problems", "training_sets", "c2_features", "c2_model", "c3_features", "c3_model", "student_backbone")
            if step in refs}


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

    refs = artifact_refs(store, cfg)
    problems_ref, heads_ref, traces_ref, heartbeats_ref, steps_ref, templates_ref, training_ref = (
        refs[step] for step in ("problems", "heads", "traces", "heartbeats", "steps", "templates", "training_sets"))
    c2_features_ref, c2_model_ref, c3_features_ref, c3_model_ref = (refs[step] for step in ("c2_features", "c2_model", "c3_features", "c3_model"))
    eval_problems_ref, teacher_cot_ref, evaluation_ref = refs["problems_eval"], refs["teacher_cot"], refs["evaluation"]
    step(problems.problems_task, problems_ref, cfg.dataset)

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

    if "01" in selected:
        step(heartbeats.heartbeats_task, heartbeats_ref, traces_ref, problems_ref, cfg.heartbeat)
    elif "03" in selected:
        _require(store, heartbeats_ref, "01", "03")

    if "02" in selected:
        step(templates.steps_task, steps_ref, problems_ref, cfg.steps, cfg.ib, cfg.c2)
        step(templates.templates_task, templates_ref, steps_ref, cfg.ib)
    elif "03" in selected:
        _require(store, templates_ref, "02", "03")

    if "03" in selected:
        step(training_data.training_sets_task, training_ref, training_inputs(refs), cfg.training_data, cfg.c2, cfg.c4, cfg.steps)
    elif "04" in selected or "05" in selected:
        _require(store, training_ref, "03", "04" if "04" in selected else "05")

    backbone_ref = refs.get("student_backbone")
    if "04" in selected:
        if backbone_ref is not None:
            step(tune_backbone.tune_task, backbone_ref, training_ref, cfg.c3, cfg.c4, list(cfg.c2.labels), cfg.eval.max_steps)
        step(train_c2.features_task, c2_features_ref, training_ref, cfg.c2, backbone_ref, cfg.c3.read_precision, cfg.c3.int8_min_cosine)
        step(train_c2.train_task, c2_model_ref, training_ref, c2_features_ref, cfg.c2)

    if "05" in selected:
        if backbone_ref is not None and "04" not in selected:
            _require(store, backbone_ref, "04", "05")
        step(train_c3.features_task, c3_features_ref, training_ref, cfg.c3, cfg.c4, backbone_ref)
        step(train_c3.train_task, c3_model_ref, training_ref, c3_features_ref, cfg.c3, cfg.c4, cfg.c2, cfg.eval.beam_width, cfg.eval.max_steps)
        if "04" not in selected:
            _require(store, c2_model_ref, "04", "05")
        step(train_verifier.train_task, refs["verifier"], verifier_inputs(refs), cfg)

    if "06" in selected:
        for stage, ref in (("04", c2_model_ref), ("05", c3_model_ref), ("05", refs["verifier"])):
            if stage not in selected:
                _require(store, ref, stage, "06")
        if eval_problems_ref != problems_ref:
            statuses[eval_problems_ref.step + "_eval"] = run_step(
                problems.problems_task, eval_problems_ref.cache_key, store.is_complete(eval_problems_ref), cfg.storage, result_storage,
                eval_problems_ref, eval_dataset_config(cfg),
            )
        step(teacher_cot.teacher_task, teacher_cot_ref, eval_problems_ref, training_ref, cfg)
        step(evaluate.evaluate_task, evaluation_ref, eval_problems_ref, teacher_cot_ref, student_inputs(refs), cfg)

    sections: list[ReportSection] = [
        steps_section(statuses, refs, chunk_counts),
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
    if "04" in selected and backbone_ref is not None:
        sections.append(tune_backbone.report_section(store, backbone_ref))
    if "04" in selected:
        sections.append(train_c2.report_section(store, c2_model_ref, list(cfg.c2.labels)))
    if "05" in selected:
        sections.append(train_c3.report_section(store, c3_model_ref))
        sections.append(train_verifier.report_section(store, refs["verifier"]))
    if "06" in selected:
        sections.append(evaluate.report_section(store, evaluation_ref))
    title = f"# Mycelium run — stages {stages}{' (smoke)' if smoke else ''}\n"
    run_name = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{flow_run.name or 'local'}"
    summary = {"stages": stages, "smoke": smoke, "storage_root": store.root}
    return write_report(store, "mycelium", run_name, summary, title, sections)
