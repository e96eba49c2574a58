"""Problems: read the configured dataset once and store it as the pipeline's first artifact.

Reads:  `dataset.source` — the embedded sample, a local JSONL/JSON/Parquet file, an s3://
        path or a hub name (see mycelium/datasets.py for the normalised schema).
Writes: artifact `problems` with tables `problems` (one row per problem) and `malformed`
        (row number and reason for every row that was skipped).
Time:   about a second for the sample; a few seconds for full GSM8K.
You should see: "problems: 350 loaded, 0 malformed" in the log.

The artifact's key covers a fingerprint of the source (the file's bytes, the S3 object's
ETag, or the hub name, config and split), so editing the file yields a new artifact.
"""

from __future__ import annotations

import hashlib
import os

import fsspec
from prefect import get_run_logger, task

from mycelium import datasets
from mycelium.config import DatasetConfig
from mycelium.errors import DatasetError
from mycelium.reports import ReportSection
from mycelium.store import ArtifactRef, ArtifactStore, artifact_digest, source_code_version

STEP = "problems"


def source_fingerprint(cfg: DatasetConfig, storage_options: dict) -> str:
    """What identifies the dataset's content without loading it."""
    source = cfg.source
    if source.startswith("embedded:"):
        folder = os.path.join(os.path.dirname(datasets.__file__), "data", "sample")
        digest = hashlib.sha256(source.encode())
        for name in sorted(os.listdir(folder)):
            if name.endswith(".jsonl"):
                with open(os.path.join(folder, name), "rb") as handle:
                    digest.update(handle.read())
        return digest.hexdigest()
    if source.startswith("s3://"):
        fs, path = fsspec.core.url_to_fs(source, **storage_options)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise DatasetError(f"{source}: no such object") from None
        except Exception as exc:
            raise DatasetError(f"{source}: cannot be read ({str(exc).splitlines()[0]})") from None
        return f"{source}:{info.get('ETag') or info.get('size')}"
    if os.path.exists(source):
        if os.path.isdir(source):
            raise DatasetError(f"{source}: is a folder, expected a .jsonl, .json or .parquet file")
        try:
            with open(source, "rb") as handle:
                return hashlib.sha256(handle.read()).hexdigest()
        except OSError as exc:
            raise DatasetError(f"{source}: cannot be read ({exc.strerror})") from None
    if source.endswith((".jsonl", ".json", ".parquet")) or source.startswith(("/", ".", "~")):
        raise DatasetError(f"{source}: no such file")
    return f"hub:{source}:{cfg.hub_config}:{cfg.split}"


def problems_ref(store: ArtifactStore, cfg: DatasetConfig) -> ArtifactRef:
    digest = artifact_digest(
        STEP,
        cfg.digest_payload(),
        [source_fingerprint(cfg, store.storage_options)],
        source_code_version(datasets),
    )
    return store.ref(STEP, digest)


def build_problems(ref: ArtifactRef, cfg: DatasetConfig) -> dict:
    """Load, normalise and store the problems; return counts for the report."""
    store = ArtifactStore.for_ref(ref)
    loaded = datasets.load_problems(cfg, storage_options=store.storage_options)
    reasons = {}
    if loaded.malformed.height:
        for row in loaded.malformed.group_by("reason").len().iter_rows(named=True):
            reasons[row["reason"]] = row["len"]
    store.write_table(
        ref,
        {"problems": loaded.frame, "malformed": loaded.malformed},
        metadata={"source": cfg.source, "n_problems": loaded.frame.height, "malformed_by_reason": reasons},
    )
    return {"n_problems": loaded.frame.height, "n_malformed": loaded.malformed.height, "malformed_by_reason": reasons}


@task(name="problems")
def problems_task(ref: ArtifactRef, cfg: DatasetConfig) -> ArtifactRef:
    counts = build_problems(ref, cfg)
    get_run_logger().info(
        "problems: %d loaded, %d malformed %s", counts["n_problems"], counts["n_malformed"], counts["malformed_by_reason"] or ""
    )
    return ref


def report_section(store: ArtifactStore, ref: ArtifactRef) -> ReportSection:
    manifest = store.verify(ref)
    frame = store.read(ref, "problems")
    by_source = frame.group_by("source").len().sort("source")
    lines = ["## Problems", "", f"Source: `{manifest.metadata.get('source')}` — {frame.height} problems.", ""]
    lines += ["| source | problems |", "|---|---|"]
    lines += [f"| {row['source']} | {row['len']} |" for row in by_source.iter_rows(named=True)]
    malformed = manifest.metadata.get("malformed_by_reason") or {}
    if malformed:
        lines += ["", "Rows skipped as malformed: " + ", ".join(f"{reason}: {count}" for reason, count in malformed.items())]
    summary = {"n_problems": frame.height, "n_malformed": sum(malformed.values())}
    return ReportSection(summary, "\n".join(lines) + "\n")
