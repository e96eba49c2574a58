"""What the student benchmarks share: the config they run under, and the trained student that
stages 00-05 left in the artifact store for it.

Not a benchmark itself. `bench/student_search.py` and `bench/student_read.py` call
`parse_arguments` and `trained_student(overrides)`; the latter exits with a one-line message
when the store holds no student for that config, instead of training one behind the user's
back.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

from flows.pipeline import artifact_refs, student_inputs
from mycelium import c3_model, solver, stats
from mycelium.config import MyceliumConfig, Settings, load_config
from mycelium.encoder import Encoder
from mycelium.errors import MyceliumError
from mycelium.onnx_read import reading_encoder
from mycelium.store import ArtifactRef, ArtifactStore
from tasks import evaluate
from tasks.train_c2 import student_encoder

# Resamples for the bootstrap intervals of paired timing ratios (more than the pipeline's
# 1,000: a bench run is one-off and the ratios are skewed).
BOOTSTRAP_RESAMPLES = 2000
# The student benchmarks measure the full run: trained on GSM8K train, read on GSM8K test.
GSM8K_DEFAULTS = ["dataset.source=../shared/data/gsm8k/train.jsonl", "eval.dataset=../shared/data/gsm8k/test.jsonl"]


@dataclass
class TrainedStudent:
    cfg: MyceliumConfig
    store: ArtifactStore
    refs: dict[str, ArtifactRef]
    inputs: dict[str, ArtifactRef]   # the stage 04-05 artifacts stage 06 loads
    student: solver.Student          # C2, C3 and the planner, loaded as stage 06 loads them

    def encoder(self, runtime: str | None = None) -> Encoder:
        """A fresh copy of the backbone the student reads with (the tuned one when stage 04 made
        it), run by `runtime` (default: `eval.backbone_runtime`, as stage 06 runs it)."""
        encoder = student_encoder(self.store, self.inputs.get("student_backbone"), self.cfg.c3.backbone, self.cfg.c3.max_length, self.cfg.c3.read_precision,
                                  self.cfg.c3.int8_min_cosine)
        return reading_encoder(encoder, runtime or self.cfg.eval.backbone_runtime, Settings().cache_dir, self.cfg.eval.int8_read_threads)

    def read(self, encoder: Encoder, text: str) -> c3_model.ProblemText:
        """One problem read as stage 06 reads it: one text, no progress bar."""
        return c3_model.read_problems(encoder, [text], self.cfg.c4.word_to_number, 1, self.cfg.c3.context_tokens, progress=False)[0]


def parse_arguments(description: str, default_n: int, against: bool = False) -> argparse.Namespace:
    """--n (the first N problems of the evaluated dataset) and --set (config overrides);
    with `against`, also --against: overrides of a second configuration to measure beside it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=default_n, help="problems, the first N of the evaluated dataset")
    parser.add_argument("--set", action="append", default=[], help="config override, dotted key=value (repeatable)")
    if against:
        parser.add_argument("--against", action="append", default=[],
                            help="search settings to measure beside the default, as config overrides on top of --set (repeatable)")
    return parser.parse_args()


def config_with(overrides: list[str]) -> MyceliumConfig:
    """The benchmarks' config (GSM8K defaults + `overrides`), without looking for a student."""
    return load_config(None, [*GSM8K_DEFAULTS, *overrides])


def trained_student(overrides: list[str]) -> TrainedStudent:
    """The config (GSM8K defaults + `overrides`) and the refs of its trained student; exits
    with code 2 and a one-line message when any of them is missing from the store."""
    cfg = config_with(overrides)
    store = ArtifactStore.from_settings()
    try:
        refs = artifact_refs(store, cfg)
    except MyceliumError as exc:  # e.g. the GSM8K files are not where the config says (run from the repository root)
        print(f"bench: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    inputs = student_inputs(refs)
    missing = [step for step, ref in [*inputs.items(), ("problems_eval", refs["problems_eval"])] if not store.is_complete(ref)]
    if missing:
        print(f"bench: no trained student for this config in {store.root} (missing: {', '.join(missing)}); "
              "run `mycelium run` with the same --set first (`--stages 06 --set eval.teacher_problems=0` after stages 00-05 "
              "adds the evaluated problems in a minute)", file=sys.stderr)
        raise SystemExit(2)
    return TrainedStudent(cfg, store, refs, inputs, evaluate.load_student(store, inputs, cfg))


def percent(k: int, n: int) -> str:
    """`20.3% [16.2, 25.2] (61/300)`: a count as a percentage with its 95% Wilson interval."""
    r = stats.rate_with_interval(k, n)
    return f"{100 * r['rate']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}] ({k}/{n})"


def percentiles(ms: list[float]) -> str:
    return f"p50 {np.percentile(ms, 50):6.1f} ms   p95 {np.percentile(ms, 95):6.1f} ms"
