"""Deployments: a real Prefect server, `mycelium serve`, and a run triggered by name.

This is what a user does from the UI (or `prefect deployment run`): the served smoke
deployment runs on its own process, with parameters given at trigger time, and writes
its report into the storage root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.serve import load_deployments
from tests.conftest import PROJECT_ROOT, free_port

BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 90
RUN_TIMEOUT_S = 400


def test_every_deployment_points_at_a_flow_that_loads():
    from prefect.flows import load_flow_from_entrypoint

    specs = load_deployments()
    assert {"pipeline", "smoke", "retrain-weekly"} <= {spec["name"] for spec in specs}
    for spec in specs:
        flow = load_flow_from_entrypoint(str(PROJECT_ROOT / spec["entrypoint"]))
        assert set(spec.get("parameters", {})) <= set(flow.parameters.properties)
    weekly = next(spec for spec in specs if spec["name"] == "retrain-weekly")
    assert weekly["schedules"][0]["cron"]


def _wait_healthy(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "prefect server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail("prefect server did not become healthy")


def test_served_smoke_deployment_runs_when_triggered(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MYCELIUM_STORAGE_ROOT": str(tmp_path / "store"),
    }
    logs = open(tmp_path / "processes.log", "w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=logs, stderr=logs, start_new_session=True,
    )
    served = None
    try:
        _wait_healthy(api, server)
        served = subprocess.Popen([str(BIN / "mycelium"), "serve"], env=env, cwd=PROJECT_ROOT, stdout=logs, stderr=logs, start_new_session=True)
        params = {"overrides": ["dataset.limit=2", "extraction.computing_heads=[L23H2]"], "stages": "00-02"}  # two problems train no student
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:  # the deployment exists once `serve` has registered it
            trigger = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "mycelium/smoke", "--params", json.dumps(params), "--watch"],
                env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
            )
            if "not found" not in (trigger.stdout + trigger.stderr).lower() or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert trigger.returncode == 0, trigger.stdout[-2000:] + trigger.stderr[-2000:]
        assert "Completed" in trigger.stdout + trigger.stderr
        reports = list((tmp_path / "store" / "reports" / "mycelium").glob("*/summary.json"))
        assert len(reports) == 1
        summary = json.loads(reports[0].read_text())
        assert summary["smoke"] is True and summary["n_extracted"] == 2
    finally:
        for process in (served, server):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
