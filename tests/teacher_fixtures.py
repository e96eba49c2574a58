"""Shared fixtures for the teacher and signal tests: the real embedded teacher, loaded once.

Loaded as a plugin by tests/test_teacher.py and tests/test_signals.py
(`pytest_plugins = ["tests.teacher_fixtures"]`), deliberately not a conftest: the suite's
conftest belongs to the rest of the project. The model cache is MYCELIUM_CACHE_DIR when
set (conversion then happens once per machine), else a temporary folder for this session
(the first test that needs the teacher pays ~15 s for the GGUF conversion).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import polars as pl
import pytest

from mycelium.config import MyceliumConfig, load_config

ROOT = Path(__file__).resolve().parent.parent

# Three GSM8K-style problems with gold solutions (the first two are GSM8K train rows 0 and 1).
PROBLEMS = pl.DataFrame(
    {
        "problem_id": ["gsm8k-train-0", "gsm8k-train-1", "inline-apples"],
        "problem": [
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
            "in May. How many clips did Natalia sell altogether in April and May?",
            "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
            "babysitting. How much did she earn?",
            "Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many apples are left?",
        ],
        "solution": [
            "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
            "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
            "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
            "Tom has 3 * 12 = <<3*12=36>>36 apples.\n"
            "After giving some away he has 36 - 7 = <<36-7=29>>29 apples.\n#### 29",
        ],
    }
)


@functools.cache
def session_cache_dir() -> Path:
    configured = os.environ.get("MYCELIUM_CACHE_DIR")
    if configured:
        return Path(configured)
    folder = Path(tempfile.mkdtemp(prefix="mycelium-test-cache-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


@functools.cache
def project_config() -> MyceliumConfig:
    return load_config(ROOT / "config.yaml")


@functools.cache
def signal_teacher():
    import torch

    from tasks.extract_attention import load_signal_teacher

    teacher = load_signal_teacher(project_config().teacher, session_cache_dir())
    # Warm-up pass. On the development machine (torch 2.13 CPU, AVX512/AMX) the first forward
    # pass in a process now and then differs from every later one by ~1e-3 in the logits,
    # traced to the rotary embedding's cos/sin on that first call; it is torch's, not ours,
    # and would make exact comparisons between two models flaky.
    with torch.inference_mode():
        teacher.model(input_ids=torch.tensor([[teacher.tokenizer.bos_token_id or 0] * 8]))
    return teacher


@pytest.fixture(scope="session")
def config() -> MyceliumConfig:
    return project_config()


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return session_cache_dir()


@pytest.fixture(scope="session")
def teacher():
    """The embedded SmolLM2-135M teacher with the signal attention function."""
    return signal_teacher()


@pytest.fixture(scope="session")
def problems() -> pl.DataFrame:
    return PROBLEMS
