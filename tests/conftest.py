"""Shared fixtures: a real S3-protocol server on loopback, and storage roots of both kinds.

The moto server is started once per test session as a subprocess (`moto_server`), on a
free port of 127.0.0.1, and stopped at the end. Tests that want S3 get a fresh bucket.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MOTO_START_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    """URL of a moto S3 server running on loopback for the whole session."""
    executable = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    assert executable, "moto_server not found: install the test extra (pip install -e '.[test]')"
    port = free_port()
    process = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("moto_server did not start")
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    """Environment pointing Mycelium at a fresh bucket on the moto server; yields the root."""
    import boto3

    bucket = f"mycelium-test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/run"
    monkeypatch.setenv("MYCELIUM_STORAGE_ROOT", root)
    yield root


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path, monkeypatch):
    """A storage root of each kind: a local folder, and a bucket on the moto server."""
    if request.param == "local":
        root = str(tmp_path / "store")
        monkeypatch.setenv("MYCELIUM_STORAGE_ROOT", root)
        return root
    return request.getfixturevalue("s3_env")
