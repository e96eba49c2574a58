"""The Mycelium flow: problems → 00 attention traces → 01 heartbeats → 02 steps and
templates → report.

Stages 03-06 (training sets, C2/C3, evaluation) plug in here as later issues land. Every step is a cached Prefect task whose cache key is its artifact digest, so
rerunning with nothing changed recomputes nothing, and a failed or killed run resumes
where it stopped. Parameters are plain values so the flow can be triggered from the UI.
The report lists every step as computed or cached.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow
from prefect.runtime import flow_run

from flows.extraction import extraction, task_runner_for
from mycelium.config import load_config
from mycelium.errors import MyceliumError
from mycelium.orchestration import configure_result_storage, run_step
from mycelium.reports import ReportSection, steps_section, write_report
from mycelium.store import ArtifactRef, ArtifactStore
from tasks import extract_attention, heartbeats, problems, templates

KNOWN_STAGES = ["00", "01", "02"]
DEFAULT_STAGES = "00-02"


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
    elif "01" in selected:  # stage 02 reads gold solutions only, so it needs no traces
        _require(store, traces_ref, "00", "01")

    heartbeats_ref = heartbeats.heartbeats_ref(store, cfg.heartbeat, traces_ref, problems_ref)
    if "01" in selected:
        step(heartbeats.heartbeats_task, heartbeats_ref, traces_ref, problems_ref, cfg.heartbeat)

    steps_ref = templates.steps_ref(store, cfg.steps, cfg.ib, cfg.c2, problems_ref)
    templates_ref = templates.templates_ref(store, cfg.ib, steps_ref)
    if "02" in selected:
        step(templates.steps_task, steps_ref, problems_ref, cfg.steps, cfg.ib, cfg.c2)
        step(templates.templates_task, templates_ref, steps_ref, cfg.ib)

    all_refs = (problems_ref, heads_ref, traces_ref, heartbeats_ref, steps_ref, templates_ref)
    sections: list[ReportSection] = [
        steps_section(statuses, {r.step: r for r in all_refs}, chunk_counts),
        problems.report_section(store, problems_ref),
    ]
    if store.is_complete(traces_ref):
        sections.append(extract_attention.report_section(store, heads_ref, traces_ref))
    if "01" in selected:
        sections.append(heartbeats.report_section(store, heartbeats_ref))
    if "02" in selected:
        sections.append(templates.report_section(store, steps_ref, templates_ref))
    title = f"# Mycelium run — stages {stages}{' (smoke)' if smoke else ''}\n"
    run_name = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{flow_run.name or 'local'}"
    summary = {"stages": stages, "smoke": smoke, "storage_root": store.root}
    return write_report(store, "mycelium", run_name, summary, title, sections)
