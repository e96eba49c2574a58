"""Extraction chunks fan out over a real Dask cluster when extraction.dask_address is set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import distributed  # from prefect-dask, pinned in the test extra

MYCELIUM = str(Path(sys.executable).with_name("mycelium"))


def test_chunks_run_on_dask_workers(tmp_path):
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            env = {**os.environ, "MYCELIUM_STORAGE_ROOT": str(tmp_path / "store")}
            result = subprocess.run(
                [MYCELIUM, "run", "--smoke", "--json", "--stages", "00-01", "--set", f"extraction.dask_address={cluster.scheduler_address}",
                 "--set", "dataset.limit=4", "--set", "extraction.chunk_size=2", "--set", "extraction.computing_heads=[L23H2]"],
                env=env, capture_output=True, text=True, timeout=600,
            )
            assert result.returncode == 0, result.stderr[-3000:]
            summary = json.loads(result.stdout)
            assert summary["chunks"] == 2 and summary["chunks_computed"] == 2 and summary["n_extracted"] == 4
            assert "Connecting to an existing Dask cluster" in result.stderr
            # The worker ran the chunk tasks: it now holds the teacher module loaded.
            loaded = client.run(lambda: "tasks.extract_attention" in sys.modules)
            assert list(loaded.values()) == [True]
