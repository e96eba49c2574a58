"""Run reports: summary.json and report.md under <storage_root>/reports/<flow>/<run>/.

Every flow run ends here. The summary is flat and machine-readable (key numbers with their
counts and intervals); the markdown is the same for people, with the figures beside it.
Both are also published as Prefect artifacts so the UI shows them on the flow run page.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
import re
from datetime import datetime, timezone
from typing import Any

from mycelium.store import ArtifactStore


def run_folder(store: ArtifactStore, flow_name: str, run_name: str) -> str:
    return posixpath.join(store.root, "reports", flow_name, run_name)


def _artifact_key(text: str) -> str:
    # Prefect artifact keys allow lowercase letters, numbers and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def _table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"metric": key, "value": value} for key, value in summary.items() if not isinstance(value, (dict, list))]


def write_report(
    store: ArtifactStore,
    flow_name: str,
    run_name: str,
    summary: dict[str, Any],
    title: str,
    sections: list["ReportSection"],
    publish: bool = True,
) -> str:
    """Write summary.json, report.md and figures; publish them to Prefect; return report.md's path."""
    summary = dict(summary)
    figures: dict[str, bytes] = {}
    parts = [title]
    for section in sections:
        summary.update(section.summary)
        parts.append(section.markdown)
        figures.update(section.figures)
    markdown = "\n".join(parts)
    folder = run_folder(store, flow_name, run_name)
    for name, data in figures.items():
        _put(store, posixpath.join(folder, name), data)
    summary = {"flow": flow_name, "run": run_name, "written_at": datetime.now(timezone.utc).isoformat(), **summary}
    _put(store, posixpath.join(folder, "summary.json"), json.dumps(summary, indent=2, default=str).encode())
    report_path = posixpath.join(folder, "report.md")
    _put(store, report_path, markdown.encode())
    if publish:
        _publish(flow_name, summary, markdown, report_path, figures, folder)
    return report_path


def _put(store: ArtifactStore, path: str, data: bytes) -> None:
    if not store.is_remote:
        store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    store.fs.pipe_file(path, data)


def _publish(flow_name: str, summary: dict, markdown: str, report_path: str, figures: dict, folder: str) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    key = _artifact_key(f"{flow_name}-report")
    create_markdown_artifact(markdown=markdown, key=key, description=f"{flow_name} report ({report_path})")
    create_table_artifact(table=_table_rows(summary), key=_artifact_key(f"{flow_name}-summary"), description="key numbers")
    scheme = "" if "://" in report_path else "file://"
    create_link_artifact(link=f"{scheme}{report_path}", link_text="report.md", key=_artifact_key(f"{flow_name}-report-path"))
    for name in figures:
        create_link_artifact(
            link=f"{scheme}{posixpath.join(folder, name)}",
            link_text=name,
            key=_artifact_key(f"{flow_name}-figure-{name.rsplit('.', 1)[0]}"),
        )


@dataclass
class ReportSection:
    """One step's contribution to a run report: flat numbers, markdown and figures."""

    summary: dict[str, Any]
    markdown: str
    figures: dict[str, bytes] = field(default_factory=dict)


def steps_section(statuses: dict[str, str], refs: dict[str, Any], chunk_counts: dict[str, int]) -> ReportSection:
    """Which steps ran and which came from the cache, with their artifact digests."""
    lines = ["## Steps", "", "| step | artifact | status |", "|---|---|---|"]
    for step_name, status in statuses.items():
        lines.append(f"| {step_name} | `{refs[step_name].digest}` | {status} |")
    if chunk_counts:
        lines += ["", f"Extraction chunks: {chunk_counts['chunks']} ({chunk_counts['chunks_computed']} computed, "
                      f"{chunk_counts['chunks_cached']} from earlier runs)."]
    summary: dict[str, Any] = {
        "steps_computed": [s for s, status in statuses.items() if status == "computed"],
        "steps_cached": [s for s, status in statuses.items() if status == "cached"],
        **chunk_counts,
    }
    return ReportSection(summary, "\n".join(lines) + "\n")


def format_rate(rate: dict) -> str:
    """`0.660 [0.648, 0.672] (3967/6012)` from a `stats.rate_with_interval` dict."""
    return f"{rate['rate']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}] ({rate['count']}/{rate['n']})"
