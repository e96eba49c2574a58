"""The artifact store, run against a local folder and a real S3-protocol server (moto)."""

from __future__ import annotations

import posixpath
import time

import polars as pl
import pytest

from mycelium.config import Settings
from mycelium.errors import CorruptArtifactError, StorageError
from mycelium.store import ArtifactStore, artifact_digest


@pytest.fixture
def store(storage_root):
    return ArtifactStore.from_settings(Settings())


def _ref(store, config=None):
    return store.ref("traces", artifact_digest("traces", config or {"chunk_size": 2}, [], "code-v1"))


def test_parts_then_manifest_round_trip(store):
    ref = _ref(store)
    store.write_part(ref, "tokens", 0, pl.DataFrame({"problem_id": ["a", "a"], "iaf": [0.1, 0.9]}))
    store.write_part(ref, "tokens", 1, pl.DataFrame({"problem_id": ["b"], "iaf": [0.5]}))
    store.write_file(ref, "trace.png", b"\x89PNG fake bytes")
    assert not store.is_complete(ref), "an artifact without its manifest must not count as existing"

    manifest = store.commit(ref, metadata={"n_problems": 2})

    assert store.is_complete(ref)
    assert manifest.rows("tokens") == 3
    table = store.read(ref, "tokens")
    assert table.sort("problem_id")["problem_id"].to_list() == ["a", "a", "b"]
    assert store.read_file(ref, "trace.png") == b"\x89PNG fake bytes"
    assert store.manifest(ref).metadata == {"n_problems": 2}


def test_missing_artifact_is_not_complete_and_reading_it_fails(store):
    ref = _ref(store, {"other": True})
    assert not store.is_complete(ref)
    with pytest.raises(CorruptArtifactError, match="no manifest"):
        store.read(ref, "tokens")


def test_corrupted_part_is_detected(store):
    ref = _ref(store)
    store.write_part(ref, "tokens", 0, pl.DataFrame({"x": [1, 2, 3]}))
    store.commit(ref)
    part = posixpath.join(ref.path, "tokens", "part-00000.parquet")
    data = store.fs.cat_file(part)
    store.fs.pipe_file(part, data[:-8] + b"corrupt!")

    assert not store.is_complete(ref)
    with pytest.raises(CorruptArtifactError, match="checksum"):
        store.read(ref, "tokens")


def test_deleted_part_is_detected(store):
    ref = _ref(store)
    store.write_part(ref, "tokens", 0, pl.DataFrame({"x": [1]}))
    store.write_part(ref, "tokens", 1, pl.DataFrame({"x": [2]}))
    store.commit(ref)
    store.fs.rm_file(posixpath.join(ref.path, "tokens", "part-00001.parquet"))

    assert not store.is_complete(ref)
    with pytest.raises(CorruptArtifactError, match="missing"):
        store.read(ref, "tokens")


def test_part_without_receipt_counts_as_unfinished(store):
    """A writer killed after the Parquet bytes but before the receipt left an unfinished part."""
    ref = _ref(store)
    store.write_part(ref, "tokens", 0, pl.DataFrame({"x": [1]}))
    # The writer died after the Parquet bytes and before the receipt.
    store.fs.pipe_file(posixpath.join(ref.path, "tokens", "part-00001.parquet"), b"half a parquet file")

    assert store.part_done(ref, "tokens", 0)
    assert not store.part_done(ref, "tokens", 1)
    assert [p.index for p in store.finished_parts(ref, "tokens")] == [0]


def test_rewriting_an_unfinished_part_keeps_rows_exactly_once(store):
    ref = _ref(store)
    store.fs.makedirs(posixpath.join(ref.path, "tokens"), exist_ok=True)
    store.fs.pipe_file(posixpath.join(ref.path, "tokens", "part-00000.parquet"), b"garbage from a killed run")
    store.write_part(ref, "tokens", 0, pl.DataFrame({"x": [1, 2]}))
    store.commit(ref)
    assert store.read(ref, "tokens")["x"].to_list() == [1, 2]


def test_digest_changes_with_every_input():
    base = artifact_digest("heartbeats", {"iaf_threshold": 0.5}, ["up1"], "code1")
    assert base == artifact_digest("heartbeats", {"iaf_threshold": 0.5}, ["up1"], "code1")
    assert base != artifact_digest("heartbeats", {"iaf_threshold": 0.4}, ["up1"], "code1")
    assert base != artifact_digest("heartbeats", {"iaf_threshold": 0.5}, ["up2"], "code1")
    assert base != artifact_digest("heartbeats", {"iaf_threshold": 0.5}, ["up1"], "code2")
    assert base != artifact_digest("templates", {"iaf_threshold": 0.5}, ["up1"], "code1")


def test_reachable_root_passes_the_probe(store):
    store.check_reachable()


def test_unreachable_s3_endpoint_fails_in_one_line(monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MYCELIUM_STORAGE_ROOT", "s3://nobody-home/prefix")
    store = ArtifactStore.from_settings(Settings())
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        store.check_reachable()
    message = str(caught.value)
    assert "s3://nobody-home/prefix is not reachable" in message
    assert "\n" not in message
    assert time.monotonic() - started < 120


def test_same_size_corruption_of_a_part_is_caught_when_verifying(store):
    ref = _ref(store)
    store.write_part(ref, "tokens", 0, pl.DataFrame({"x": list(range(100))}))
    part = posixpath.join(ref.path, "tokens", "part-00000.parquet")
    data = store.fs.cat_file(part)
    store.fs.pipe_file(part, data[:-10] + b"0123456789")
    assert store.part_done(ref, "tokens", 0)  # the cheap check sees only the size
    assert not store.part_done(ref, "tokens", 0, verify=True)


def test_verification_is_remembered_but_reads_still_check_bytes(store):
    """One run verifies an artifact once; data it reads is still checked, and the next run re-verifies."""
    ref = _ref(store)
    store.write_part(ref, "tokens", 0, pl.DataFrame({"x": list(range(50))}))
    store.commit(ref)
    assert store.is_complete(ref)
    part = posixpath.join(ref.path, "tokens", "part-00000.parquet")
    data = store.fs.cat_file(part)
    store.fs.pipe_file(part, data[:-10] + b"0123456789")

    with pytest.raises(CorruptArtifactError, match="checksum"):
        store.read(ref, "tokens")
    assert not ArtifactStore.from_settings(Settings()).is_complete(ref)


def test_a_new_manifest_is_verified_afresh(store):
    ref = _ref(store)
    store.write_part(ref, "tokens", 0, pl.DataFrame({"x": list(range(50))}))
    store.commit(ref)
    assert store.is_complete(ref)
    part = posixpath.join(ref.path, "tokens", "part-00000.parquet")
    store.fs.pipe_file(part, store.fs.cat_file(part)[:-10] + b"0123456789")
    store.commit(ref, metadata={"recommitted": True})  # same receipts, a different manifest
    assert not store.is_complete(ref)
