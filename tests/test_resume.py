"""Kill a real `mycelium run` in the middle of extraction, start it again: it resumes.

The run is a subprocess (its own process group, with the temporary Prefect server it
starts). It is killed with SIGKILL (nothing gets to clean up) or interrupted with SIGINT
(Ctrl-C) once some chunks are done and before all are. The second run must skip the
finished chunks, and the final traces must hold every problem exactly once.
"""

from __future__ import annotations

import json
import os
import posixpath
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mycelium.store import ArtifactStore

MYCELIUM = str(Path(sys.executable).with_name("mycelium"))
N_PROBLEMS = 10
ARGS = [
    "run", "--smoke", "--json", "--stages", "00-01",  # resume is about the chunked extraction
    "--set", f"dataset.limit={N_PROBLEMS}",
    "--set", "extraction.chunk_size=1",
    "--set", "extraction.computing_heads=[L23H2]",
]
START_TIMEOUT_S = 240


def finished_chunks(root: str) -> int:
    receipts = ArtifactStore(root).fs.glob(posixpath.join(root, "artifacts", "traces", "*", "problems", "part-*.json"))
    return len(receipts)


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_killed_run_resumes_at_first_unfinished_chunk(tmp_path, stop_signal):
    root = str(tmp_path / "store")
    env = {**os.environ, "MYCELIUM_STORAGE_ROOT": root}
    # Output goes to files: an unread pipe would fill up and stall the run.
    first_out, first_err = open(tmp_path / "first.out", "w"), open(tmp_path / "first.err", "w")
    first = subprocess.Popen([MYCELIUM, *ARGS], env=env, stdout=first_out, stderr=first_err, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while finished_chunks(root) < 2:
        assert first.poll() is None, (tmp_path / "first.err").read_text()[-2000:]
        assert time.monotonic() < deadline, "extraction did not start in time"
        time.sleep(0.05)
    os.killpg(first.pid, stop_signal)
    first.wait(timeout=120)
    if _group_alive(first.pid):  # the temporary Prefect server may outlive its parent
        os.killpg(first.pid, signal.SIGKILL)
    done_before = finished_chunks(root)
    assert 2 <= done_before < N_PROBLEMS, "the run must be stopped in the middle of extraction"
    if stop_signal == signal.SIGINT:
        assert first.returncode == 130
        stderr = (tmp_path / "first.err").read_text()
        assert "interrupted — run the same command again to resume" in stderr
        assert "Traceback" not in stderr

    second = subprocess.run([MYCELIUM, *ARGS], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)
    assert summary["chunks"] == N_PROBLEMS
    assert summary["chunks_cached"] >= done_before
    assert summary["chunks_computed"] == N_PROBLEMS - summary["chunks_cached"]

    store = ArtifactStore(root)
    traces = store.ref("traces", posixpath.basename(store.fs.glob(posixpath.join(root, "artifacts", "traces", "*"))[0]))
    problems = store.read(traces, "problems")
    assert problems.height == N_PROBLEMS
    assert problems["problem_id"].n_unique() == N_PROBLEMS
    tokens = store.read(traces, "tokens")
    assert tokens.select("problem_id", "head", "token_index").is_duplicated().sum() == 0
    assert set(tokens["problem_id"]) == set(problems["problem_id"])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
