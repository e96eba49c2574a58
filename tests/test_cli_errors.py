"""Bad input: one clear line naming the input, a non-zero exit, no stack trace, nothing lost.

Each case runs the real `mycelium` command in a subprocess against a storage root that
already holds a committed artifact, and checks that artifact is intact afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from mycelium.store import ArtifactStore, artifact_digest
from tests.conftest import free_port

MYCELIUM = str(Path(sys.executable).with_name("mycelium"))


@pytest.fixture
def committed_store(tmp_path):
    root = str(tmp_path / "store")
    store = ArtifactStore(root)
    ref = store.ref("problems", artifact_digest("problems", {"earlier": "run"}, [], "v"))
    store.write_table(ref, {"problems": pl.DataFrame({"problem_id": ["a", "b"]})})
    return root, store, ref


def run_cli(args: list[str], root: str, extra_env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "MYCELIUM_STORAGE_ROOT": root, **(extra_env or {})}
    return subprocess.run([MYCELIUM, *args], capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("mycelium: error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_missing_dataset_path(committed_store, tmp_path):
    root, store, ref = committed_store
    missing = str(tmp_path / "nowhere" / "gsm8k.jsonl")
    result = run_cli(["run", "--smoke", "--set", f"dataset.source={missing}"], root)
    assert_one_line_error(result, missing, "no such file")
    assert store.is_complete(ref)


def test_unreadable_dataset_file(committed_store, tmp_path):
    root, store, ref = committed_store
    garbage = tmp_path / "problems.parquet"
    garbage.write_bytes(b"this is not parquet at all")
    result = run_cli(["run", "--smoke", "--set", f"dataset.source={garbage}"], root)
    assert_one_line_error(result, str(garbage))
    assert store.is_complete(ref)


def test_unknown_model(committed_store, tmp_path):
    root, store, ref = committed_store
    missing_model = str(tmp_path / "no-such-model")
    result = run_cli(["run", "--smoke", "--set", f"teacher.model={missing_model}"], root)
    assert_one_line_error(result, missing_model)
    assert store.is_complete(ref)


def test_bad_config_value(committed_store):
    root, store, ref = committed_store
    result = run_cli(["run", "--smoke", "--set", "heartbeat.iaf_threshold=2"], root)
    assert_one_line_error(result, "heartbeat.iaf_threshold")
    assert store.is_complete(ref)


def test_bad_config_file(committed_store, tmp_path):
    root, store, ref = committed_store
    result = run_cli(["run", "--config", str(tmp_path / "absent.yaml")], root)
    assert_one_line_error(result, "absent.yaml", "not found")


def test_bad_stage_range(committed_store):
    root, _, _ = committed_store
    assert_one_line_error(run_cli(["run", "--stages", "07-09"], root), "--stages 07-09")


def test_s3_unreachable(committed_store):
    _, store, ref = committed_store
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = run_cli(["run", "--smoke"], "s3://unreachable-bucket/prefix", env)
    assert_one_line_error(result, "s3://unreachable-bucket/prefix", "not reachable")
    assert store.is_complete(ref)
