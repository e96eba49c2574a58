"""Extraction flow (stage 00 fan-out): one Prefect task per chunk of problems, then a commit.

Each chunk writes one Parquet part; a chunk whose part already exists is skipped (its
task shows as Cached), so a killed run resumes at the first unfinished chunk. The commit
task writes the manifest once every chunk is done. Chunks run on the local thread pool by
default, or on a Dask cluster when `extraction.dask_address` is set.
"""

from __future__ import annotations

import math

from prefect import flow
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel
from tqdm import tqdm

from mycelium.config import ExtractionConfig, StorageConfig, TeacherConfig
from mycelium.errors import MyceliumError
from mycelium.orchestration import cache_options, run_step
from mycelium.store import ArtifactRef, ArtifactStore
from tasks import extract_attention


class ExtractionOutcome(BaseModel):
    traces: ArtifactRef
    chunks: int
    chunks_computed: int
    chunks_cached: int


def task_runner_for(cfg: ExtractionConfig):
    if cfg.dask_address:
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise MyceliumError("extraction.dask_address is set but prefect-dask is not installed (pip install prefect-dask)") from None
        return DaskTaskRunner(address=cfg.dask_address)
    return ThreadPoolTaskRunner(max_workers=cfg.max_workers)


@flow(name="extraction")
def extraction(
    traces: ArtifactRef,
    problems: ArtifactRef,
    heads: ArtifactRef,
    teacher_cfg: TeacherConfig,
    extraction_cfg: ExtractionConfig,
    storage_cfg: StorageConfig,
    result_storage: str,
) -> ExtractionOutcome:
    store = ArtifactStore.for_ref(traces)
    n_problems = store.verify(problems).rows("problems")
    n_chunks = max(1, math.ceil(n_problems / extraction_cfg.chunk_size))
    futures = []
    already_done = 0
    for index in range(n_chunks):
        done = extract_attention.chunk_done(store, traces, index)
        already_done += done
        options = cache_options(f"{traces.cache_key}-chunk-{index:05d}", done, storage_cfg, result_storage)
        chunk_task = extract_attention.extract_chunk_task.with_options(**options, task_run_name=f"extract-chunk-{index:05d}")
        futures.append(chunk_task.submit(traces, problems, heads, index, teacher_cfg, extraction_cfg))
    for future in tqdm(as_completed(futures), total=n_chunks, desc="extraction chunks", unit="chunk"):
        future.result()  # re-raises a failed chunk's own error
    run_step(
        extract_attention.commit_traces_task, traces.cache_key, store.is_complete(traces), storage_cfg, result_storage,
        traces, problems, n_chunks,
    )
    # A chunk whose verified part existed before this run is reused, whether or not Prefect
    # still had a cache record for it (a kill can land between the part and the record).
    return ExtractionOutcome(traces=traces, chunks=n_chunks, chunks_computed=n_chunks - already_done, chunks_cached=already_done)
