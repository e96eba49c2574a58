"""Prefect glue shared by every flow: result storage, cache options, I/O retries, error lines.

One mechanism gives both "resume a failed run" and "nothing changed, nothing recomputed":
a step's Prefect cache key *is* its artifact digest (`ArtifactRef.cache_key`), and the
cache is refreshed whenever the artifact itself is not complete in the store. So a rerun
shows the step as Cached, a changed config gives a new digest (a miss), and a deleted or
corrupted artifact forces a recompute even though Prefect still holds a record for it.

Prefect results (the small `ArtifactRef`s the tasks return) are persisted next to the
artifacts, under `<storage_root>/prefect-results`, through a saved storage block: Prefect
refuses unsaved blocks as result storage. For S3 the block holds only the endpoint and
region; keys stay in the environment, where s3fs reads them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from mycelium.config import StorageConfig
from mycelium.errors import MyceliumError, StorageError
from mycelium.store import ArtifactStore

# Quiet Prefect's anonymous telemetry: besides phoning home (which fails here), its
# session insert races the ephemeral server's SQLite and logs "database is locked".
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def configure_result_storage(store: ArtifactStore) -> str:
    """Save (idempotently) a storage block rooted at the store and return its slug."""
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    basepath = f"{store.root}/prefect-results"
    name = "mycelium-results-" + hashlib.sha256(basepath.encode()).hexdigest()[:12]
    if store.is_remote:
        settings = {k: v for k, v in store.storage_options.items() if k not in ("key", "secret")}
        block = RemoteFileSystem(basepath=basepath, settings=settings)
        slug = f"remote-file-system/{name}"
    else:
        block = LocalFileSystem(basepath=basepath)
        slug = f"local-file-system/{name}"
    block.save(name, overwrite=True)
    return slug


def retry_on_io_error(task, task_run, state) -> bool:
    """Retry storage and network hiccups; never retry a user's bad input."""
    try:
        state.result()
    except StorageError:
        return True
    except MyceliumError:
        return False
    except (OSError, TimeoutError, ConnectionError):
        return True
    except Exception:
        return False
    return False


def cache_options(key: str, complete: bool, storage: StorageConfig, result_storage: str) -> dict[str, Any]:
    """Task options that tie the Prefect cache to an artifact (or one part of it) and retry I/O.

    `key` is the artifact's digest (`ArtifactRef.cache_key`, or that plus a chunk index);
    `complete` says whether the artifact is verified complete in the store right now.
    """
    from prefect.tasks import exponential_backoff

    return {
        "cache_key_fn": lambda _context, _parameters: key,
        "refresh_cache": not complete,
        "persist_result": True,
        "result_storage": result_storage,
        "result_serializer": "json",
        "retries": storage.io_retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=storage.io_retry_backoff_seconds),
        "retry_jitter_factor": storage.io_retry_jitter,
        "retry_condition_fn": retry_on_io_error,
    }


def run_step(task, key: str, complete: bool, storage: StorageConfig, result_storage: str, *args, **options) -> str:
    """Run one cached step and say whether it was "computed" or "cached".

    Failures are re-raised as the task's own exception (a MyceliumError stays one line).
    """
    state = task.with_options(**cache_options(key, complete, storage, result_storage), **options)(*args, return_state=True)
    state.result()  # raises the task's exception when it failed
    return "cached" if state.name == "Cached" else "computed"


class OneLineUserErrors(logging.Filter):
    """Drop the traceback Prefect attaches when a task fails on a MyceliumError.

    Such errors are the user's input (a bad path, a bad model name): the console command
    prints them as one line, so the log should not bury that line under a stack trace.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], MyceliumError):
            record.msg = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def install_one_line_errors() -> None:
    one_line = OneLineUserErrors()
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        logger.addFilter(one_line)
        for handler in logger.handlers:
            handler.addFilter(one_line)
