"""`mycelium serve`: serve every deployment in deployments/prefect.yaml from this process.

This is the no-infrastructure way to get the flows into the Prefect UI: each deployment
(with its parameters and schedule) becomes runnable from the UI, and scheduled runs
execute here. For a work pool and separate workers, use infra/local-stack.sh instead.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mycelium.errors import MyceliumError

DEPLOYMENTS_FILE = Path(__file__).resolve().parent.parent / "deployments" / "prefect.yaml"


def load_deployments(path: Path = DEPLOYMENTS_FILE) -> list[dict]:
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MyceliumError(f"{path}: cannot read deployments ({exc})") from None
    return list(spec.get("deployments") or [])


def serve_all(path: Path = DEPLOYMENTS_FILE) -> None:
    from prefect import serve
    from prefect.flows import load_flow_from_entrypoint

    project_root = path.resolve().parent.parent
    runnable = []
    for spec in load_deployments(path):
        if spec["work_pool"]["name"] != "mycelium-local":
            continue  # GPU deployments need a GPU worker; serve only what runs here
        flow = load_flow_from_entrypoint(str(project_root / spec["entrypoint"]))
        cron = [schedule["cron"] for schedule in spec.get("schedules") or []]
        runnable.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                parameters=spec.get("parameters") or {},
                cron=cron[0] if cron else None,
            )
        )
    serve(*runnable)
