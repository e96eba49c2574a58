"""The artifact store: Parquet parts plus a manifest, on a local folder or S3.

Layout under the storage root (a local path or `s3://bucket/prefix`):

    artifacts/<step>/<digest>/<table>/part-00000.parquet   one part per chunk of work
    artifacts/<step>/<digest>/<table>/part-00000.json      the part's receipt: rows, bytes, sha256
    artifacts/<step>/<digest>/files/<name>                 figures, model weights, JSON
    artifacts/<step>/<digest>/manifest.json                written last

An artifact's key (`digest`) is a hash of the step name, the step's config section, the
digests of its upstream artifacts and the step's code version, so the same inputs always
map to the same place. Writers put parts first, each followed by its receipt, and the
manifest last: an artifact without a manifest does not exist, and a part without a
receipt is unfinished. That ordering is what lets a killed extraction resume at the first
missing chunk without losing or duplicating rows, on S3 (whose single-object PUTs are
atomic) as well as on disk.

Readers verify every part against the manifest (row count, size, sha256). A corrupt or
partial artifact raises `CorruptArtifactError`; `is_complete()` answers False for it, so
the pipeline recomputes it instead of using it.

All I/O goes through fsspec (s3fs for S3), with the endpoint and keys from the
environment (`mycelium.config.Settings`).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
from datetime import datetime, timezone
from typing import Any, Iterable

import fsspec
import polars as pl
from pydantic import BaseModel, ConfigDict

from mycelium.config import Settings
from mycelium.errors import CorruptArtifactError, StorageError

# Bump when the on-disk layout or manifest format changes: old artifacts then stop matching.
SCHEMA_VERSION = 1
DIGEST_LENGTH = 20  # hex characters kept from sha256: 80 bits, collision-free for our scale


class ArtifactRef(BaseModel):
    """Where an artifact lives. Small, JSON-serialisable: this is what Prefect persists."""

    model_config = ConfigDict(frozen=True)

    step: str
    digest: str
    root: str

    @property
    def path(self) -> str:
        return posixpath.join(self.root.rstrip("/"), "artifacts", self.step, self.digest)

    @property
    def cache_key(self) -> str:
        return f"{self.step}-{self.digest}"


class PartReceipt(BaseModel):
    table: str
    index: int
    file: str
    rows: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    schema_version: int
    step: str
    digest: str
    created_at: str
    tables: dict[str, list[PartReceipt]]
    files: dict[str, dict[str, Any]]
    metadata: dict[str, Any]

    def rows(self, table: str) -> int:
        return sum(part.rows for part in self.tables.get(table, []))


def artifact_digest(step: str, config: Any, upstream: Iterable[ArtifactRef | str], code_version: str) -> str:
    """Digest of everything that determines an artifact's content."""
    payload = {
        "schema_version": SCHEMA_VERSION,
        "step": step,
        "config": config,
        "upstream": sorted(u.digest if isinstance(u, ArtifactRef) else str(u) for u in upstream),
        "code_version": code_version,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_LENGTH]


def source_code_version(*modules: Any) -> str:
    """Hash of the given modules' source files: editing a step's code invalidates its artifacts."""
    digest = hashlib.sha256()
    for module in modules:
        with open(module.__file__, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:DIGEST_LENGTH]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Parquet artifacts under one storage root, through fsspec."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.root = root.rstrip("/") if root.startswith("s3://") else _absolute_local(root)
        self.storage_options = storage_options or {}
        try:
            self.fs, _ = fsspec.core.url_to_fs(self.root, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"storage root {self.root}: {exc}") from None
        # Artifacts this instance already verified, by the sha256 of the manifest it checked.
        # A flow asks "is it complete?" several times per artifact; re-reading every part each
        # time is wasted I/O. read() still checks the bytes it actually returns.
        self._verified: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "ArtifactStore":
        settings = settings or Settings()
        return cls(settings.storage_root, settings.storage_options())

    @classmethod
    def for_ref(cls, ref: ArtifactRef) -> "ArtifactStore":
        """The store an artifact lives in, with credentials from the environment.

        Tasks rebuild their store this way instead of receiving credentials as parameters,
        so no secret ever travels through Prefect (and Dask workers read their own env).
        """
        return cls(ref.root, Settings().storage_options() if ref.root.startswith("s3://") else {})

    @property
    def is_remote(self) -> bool:
        return self.root.startswith("s3://")

    # ---- keys -------------------------------------------------------------------------
    def ref(self, step: str, digest: str) -> ArtifactRef:
        return ArtifactRef(step=step, digest=digest, root=self.root)

    def _part_file(self, ref: ArtifactRef, table: str, index: int) -> str:
        return posixpath.join(ref.path, table, f"part-{index:05d}.parquet")

    def _receipt_file(self, ref: ArtifactRef, table: str, index: int) -> str:
        return posixpath.join(ref.path, table, f"part-{index:05d}.json")

    def _manifest_file(self, ref: ArtifactRef) -> str:
        return posixpath.join(ref.path, "manifest.json")

    # ---- reachability -----------------------------------------------------------------
    def check_reachable(self) -> None:
        """Fail with one line if the root cannot be listed or written (after s3fs retries)."""
        probe = posixpath.join(self.root, ".mycelium-probe")
        try:
            if not self.is_remote:
                self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as exc:  # s3fs/aiobotocore raise many types; all mean "unreachable"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StorageError(f"storage root {self.root} is not reachable: {reason}") from None

    # ---- writing ----------------------------------------------------------------------
    def write_part(self, ref: ArtifactRef, table: str, index: int, frame: pl.DataFrame) -> PartReceipt:
        """Write one Parquet part, then its receipt. Rewrites any unfinished earlier attempt."""
        buffer = io.BytesIO()
        frame.write_parquet(buffer, compression="zstd", statistics=True)
        data = buffer.getvalue()
        receipt = PartReceipt(
            table=table,
            index=index,
            file=posixpath.basename(self._part_file(ref, table, index)),
            rows=frame.height,
            bytes=len(data),
            sha256=_sha256(data),
        )
        self._put(self._part_file(ref, table, index), data)
        self._put(self._receipt_file(ref, table, index), receipt.model_dump_json().encode())
        return receipt

    def write_file(self, ref: ArtifactRef, name: str, data: bytes) -> str:
        """Write a side file (figure, weights, JSON) into the artifact; returns its full path."""
        path = posixpath.join(ref.path, "files", name)
        self._put(path, data)
        return path

    def commit(self, ref: ArtifactRef, metadata: dict[str, Any] | None = None) -> Manifest:
        """Write the manifest over every finished part and side file: the artifact now exists."""
        tables: dict[str, list[PartReceipt]] = {}
        for table in self._tables_on_disk(ref):
            tables[table] = self.finished_parts(ref, table)
        files: dict[str, dict[str, Any]] = {}
        files_dir = posixpath.join(ref.path, "files")
        if self.fs.exists(files_dir):
            listed_root = self.fs._strip_protocol(files_dir)  # find() returns paths without s3://
            for path in sorted(self.fs.find(files_dir)):
                data = self.fs.cat_file(path)
                files[posixpath.relpath(path, listed_root)] = {"bytes": len(data), "sha256": _sha256(data)}
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            step=ref.step,
            digest=ref.digest,
            created_at=datetime.now(timezone.utc).isoformat(),
            tables=tables,
            files=files,
            metadata=metadata or {},
        )
        self._put(self._manifest_file(ref), manifest.model_dump_json(indent=2).encode())
        return manifest

    def write_table(self, ref: ArtifactRef, tables: dict[str, pl.DataFrame], metadata: dict[str, Any] | None = None) -> Manifest:
        """Write whole tables as single parts and commit: for steps that are not chunked."""
        for name, frame in tables.items():
            self.write_part(ref, name, 0, frame)
        return self.commit(ref, metadata)

    def _put(self, path: str, data: bytes) -> None:
        if not self.is_remote:
            # Write-then-rename so a local reader never sees a half-written file.
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            temporary = f"{path}.tmp-{time.time_ns()}"
            self.fs.pipe_file(temporary, data)
            self.fs.mv(temporary, path)
        else:
            self.fs.pipe_file(path, data)

    # ---- parts and completeness -------------------------------------------------------
    def _tables_on_disk(self, ref: ArtifactRef) -> list[str]:
        if not self.fs.exists(ref.path):
            return []
        names = []
        for entry in self.fs.ls(ref.path, detail=True):
            name = posixpath.basename(entry["name"].rstrip("/"))
            if entry["type"] == "directory" and name != "files":
                names.append(name)
        return sorted(names)

    def _read_receipt(self, ref: ArtifactRef, table: str, index: int) -> PartReceipt | None:
        try:
            return PartReceipt.model_validate_json(self.fs.cat_file(self._receipt_file(ref, table, index)))
        except (FileNotFoundError, ValueError):
            return None

    def part_done(self, ref: ArtifactRef, table: str, index: int, verify: bool = False) -> bool:
        """True when the part and its receipt exist and agree on size (and on sha256 with verify)."""
        receipt = self._read_receipt(ref, table, index)
        if receipt is None:
            return False
        try:
            if not verify:
                return self.fs.size(self._part_file(ref, table, index)) == receipt.bytes
            self._checked_bytes(ref, table, receipt)
            return True
        except (FileNotFoundError, CorruptArtifactError):
            return False

    def finished_parts(self, ref: ArtifactRef, table: str) -> list[PartReceipt]:
        table_dir = posixpath.join(ref.path, table)
        if not self.fs.exists(table_dir):
            return []
        receipts = []
        for path in sorted(self.fs.glob(posixpath.join(table_dir, "part-*.json"))):
            index = int(posixpath.basename(path)[len("part-"):-len(".json")])
            receipt = self._read_receipt(ref, table, index)
            if receipt is not None and self.part_done(ref, table, index):
                receipts.append(receipt)
        return receipts

    def _manifest_bytes(self, ref: ArtifactRef) -> bytes | None:
        try:
            return self.fs.cat_file(self._manifest_file(ref))
        except FileNotFoundError:
            return None

    @staticmethod
    def _parse_manifest(ref: ArtifactRef, data: bytes) -> Manifest:
        try:
            return Manifest.model_validate_json(data)
        except ValueError:
            raise CorruptArtifactError(f"{ref.path}: manifest.json is unreadable") from None

    def manifest(self, ref: ArtifactRef) -> Manifest | None:
        data = self._manifest_bytes(ref)
        return None if data is None else self._parse_manifest(ref, data)

    def verify(self, ref: ArtifactRef) -> Manifest:
        """Check every part and file against the manifest; raise CorruptArtifactError if any differ."""
        data = self._manifest_bytes(ref)
        if data is None:
            self._verified.pop(ref.path, None)
            raise CorruptArtifactError(f"{ref.path}: no manifest (artifact missing or unfinished)")
        manifest = self._parse_manifest(ref, data)
        if self._verified.get(ref.path) == _sha256(data):
            return manifest
        for table, parts in manifest.tables.items():
            for part in parts:
                self._checked_bytes(ref, table, part)
        for name, info in manifest.files.items():
            path = posixpath.join(ref.path, "files", name)
            try:
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                raise CorruptArtifactError(f"{path}: listed in the manifest but missing") from None
            if _sha256(data) != info["sha256"]:
                raise CorruptArtifactError(f"{path}: checksum does not match the manifest")
        self._verified[ref.path] = _sha256(data)
        return manifest

    def is_complete(self, ref: ArtifactRef) -> bool:
        """True only for an artifact whose manifest exists and whose parts all verify."""
        try:
            self.verify(ref)
            return True
        except CorruptArtifactError:
            return False

    def delete(self, ref: ArtifactRef) -> None:
        self._verified.pop(ref.path, None)
        if self.fs.exists(ref.path):
            self.fs.rm(ref.path, recursive=True)

    # ---- reading ----------------------------------------------------------------------
    def _checked_bytes(self, ref: ArtifactRef, table: str, part: PartReceipt) -> bytes:
        path = posixpath.join(ref.path, table, part.file)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise CorruptArtifactError(f"{path}: listed in the manifest but missing") from None
        if len(data) != part.bytes or _sha256(data) != part.sha256:
            raise CorruptArtifactError(f"{path}: checksum does not match the manifest")
        return data

    def read(self, ref: ArtifactRef, table: str) -> pl.DataFrame:
        """Read one table of a committed artifact, verifying every part."""
        manifest = self.manifest(ref)
        if manifest is None:
            raise CorruptArtifactError(f"{ref.path}: no manifest (artifact missing or unfinished)")
        if table not in manifest.tables:
            raise CorruptArtifactError(f"{ref.path}: has no table {table!r} (tables: {sorted(manifest.tables)})")
        frames = []
        for part in manifest.tables[table]:
            frame = pl.read_parquet(io.BytesIO(self._checked_bytes(ref, table, part)))
            if frame.height != part.rows:
                raise CorruptArtifactError(f"{ref.path}/{table}/{part.file}: {frame.height} rows, manifest says {part.rows}")
            frames.append(frame)
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames, how="vertical_relaxed")

    def read_part(self, ref: ArtifactRef, table: str, index: int) -> pl.DataFrame:
        """Read one finished part before the artifact is committed (used to assemble chunks)."""
        receipt = self._read_receipt(ref, table, index)
        if receipt is None:
            raise CorruptArtifactError(f"{self._part_file(ref, table, index)}: unfinished part")
        return pl.read_parquet(io.BytesIO(self._checked_bytes(ref, table, receipt)))

    def read_file(self, ref: ArtifactRef, name: str) -> bytes:
        path = posixpath.join(ref.path, "files", name)
        manifest = self.manifest(ref)
        data = self.fs.cat_file(path)
        if manifest is not None and name in manifest.files and _sha256(data) != manifest.files[name]["sha256"]:
            raise CorruptArtifactError(f"{path}: checksum does not match the manifest")
        return data


def _absolute_local(root: str) -> str:
    import os

    return os.path.abspath(os.path.expanduser(root))
