"""The student's backbone read five ways, side by side on the same problems in one run:
PyTorch eager float32 (the reference: what trained the heads), ONNX Runtime float32 (stage
06's default, `eval.backbone_runtime: onnxruntime`), the same graph rewritten with ORT's
transformer fusions (`onnx_read.fuse_for_onnxruntime`: measured, not faster here, not used),
and two lower-precision reads that stage
06 does not offer, kept here because they were measured and lost: PyTorch under bfloat16
autocast (matrix products in bfloat16; this CPU multiplies bfloat16 natively) and PyTorch with
int8 dynamic quantisation of the linear layers. All of them read for the float32 student
(`c3.read_precision=float32`, whatever `--set` says): the int8 student, trained on its own int8
read, is compared with it by `bench/student_precision.py`.

Reads:  config.yaml (+ `--set` overrides) and the trained student in the artifact store (by
        default trained on GSM8K train, evaluated on GSM8K test; run stages 00-05 on GSM8K
        train first; `--set dataset.source=embedded:sample --set eval.dataset=embedded:gsm8k-test`
        measures the `make run` student). Writes nothing (the ONNX export goes to the cache
        folder, as in stage 06).
Time:   ~1-3 minutes for 300 problems on 2 CPU cores.
You see: each read's p50/p95 in ms and its time over the PyTorch float32 read as a median
        paired ratio with a bootstrap 95% interval; then what each read does to the answers:
        how often it gives the reference's answer, the largest difference in the features it
        hands the heads, and each one's accuracy (Wilson 95%) with McNemar's exact p against
        the reference on the same problems. The heads were trained on PyTorch float32
        features, so a read that changes them is a read the heads never saw.

    python bench/student_read.py [--n 300] [--set ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from mycelium import solver, stats
from mycelium.config import Settings
from mycelium.onnx_read import onnx_encoder
from mycelium.reports import format_rate
from tasks import evaluate
from trained_student import BOOTSTRAP_RESAMPLES, parse_arguments, percentiles, trained_student

REFERENCE = "torch float32"
UNFUSED, FUSED = "onnxruntime float32", "onnxruntime fused"


class AutocastRead:
    """The Hugging Face encoder under bfloat16 autocast, answering like it (float32 states out)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.device = model, model.device

    def __call__(self, **inputs) -> SimpleNamespace:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            hidden = self.model(**inputs).last_hidden_state
        return SimpleNamespace(last_hidden_state=hidden.float())


def main() -> int:
    args = parse_arguments(__doc__.splitlines()[0], default_n=300)

    # The reads compared here are float32 reads of a float32 student (the int8 student, whose
    # heads learn on int8 features, is bench/student_precision.py's).
    trained = trained_student([*args.set, "c3.read_precision=float32"])
    cfg, store, refs, student = trained.cfg, trained.store, trained.refs, trained.student
    settings = evaluate.search_settings(cfg)
    rows = store.read(refs["problems_eval"], "problems").head(args.n).to_dicts()
    quantised = trained.encoder("torch")
    quantised.model = torch.ao.quantization.quantize_dynamic(quantised.model, {torch.nn.Linear}, dtype=torch.qint8)
    half = trained.encoder("torch")
    half.model = AutocastRead(half.model)
    readers = {REFERENCE: trained.encoder("torch"), UNFUSED: onnx_encoder(trained.encoder("torch"), Settings().cache_dir),
               FUSED: onnx_encoder(trained.encoder("torch"), Settings().cache_dir, fused=True), "torch bfloat16": half, "torch int8": quantised}
    for encoder in readers.values():  # one untimed read each: first-call allocations are not a problem's cost
        trained.read(encoder, str(rows[0]["problem"]))

    read_ms = {name: [] for name in readers}
    right = {name: [] for name in readers}
    same = dict.fromkeys(readers, 0)
    fused_as_unfused = 0
    largest_difference = dict.fromkeys(readers, 0.0)
    for i, row in enumerate(rows):
        answers, problems = {}, {}
        # Rotate which read runs first, so none always meets a warm cache.
        order = list(readers.items())
        shift = i % len(order)
        for name, encoder in order[shift:] + order[:shift]:
            started = time.perf_counter()
            problems[name] = trained.read(encoder, str(row["problem"]))
            read_ms[name].append(1000 * (time.perf_counter() - started))
            answers[name] = evaluate.format_answer(solver.solve(student, problems[name], settings).answer)
            right[name].append(bool(evaluate.check(answers[name], row.get("answer"), evaluate.is_math_row(row), cfg)["numeric"]))
        reference = problems[REFERENCE]
        fused_as_unfused += answers[FUSED] == answers[UNFUSED]
        for name in readers:
            same[name] += answers[name] == answers[REFERENCE]
            difference = float(np.abs(problems[name].pooled - reference.pooled).max())
            if len(reference.features):
                difference = max(difference, float(np.abs(problems[name].features - reference.features).max()))
            largest_difference[name] = max(largest_difference[name], difference)

    n = len(rows)
    print(f"{n} problems of {cfg.eval.dataset}, backbone {trained.inputs.get('student_backbone', cfg.c3.backbone)}, {torch.get_num_threads()} threads")
    for name in readers:
        accuracy = stats.rate_with_interval(sum(right[name]), n)
        print(f"read, {name:<20} {percentiles(read_ms[name])}   student accuracy {format_rate(accuracy)}")
    for name in readers:
        if name == REFERENCE:
            continue
        ratio = stats.bootstrap_interval(np.array(read_ms[name]) / np.array(read_ms[REFERENCE]), statistic=np.median,
                                         resamples=BOOTSTRAP_RESAMPLES, seed=cfg.eval.seed)
        test = evaluate.mcnemar(right[name], right[REFERENCE])
        print(f"{name} / {REFERENCE} read time: median paired ratio {ratio.estimate:.2f} [{ratio.low:.2f}, {ratio.high:.2f}] "
              f"(bootstrap 95%, n={ratio.n}); same answer {same[name]}/{n}; largest feature difference {largest_difference[name]:.1e}; "
              f"McNemar p = {test['p_value']:.3g} ({test['only_student']} vs {test['only_other']} discordant)")
    ratio = stats.bootstrap_interval(np.array(read_ms[FUSED]) / np.array(read_ms[UNFUSED]), statistic=np.median,
                                     resamples=BOOTSTRAP_RESAMPLES, seed=cfg.eval.seed)
    print(f"{FUSED} / {UNFUSED} read time (what the transformer fusions save): median paired ratio {ratio.estimate:.2f} "
          f"[{ratio.low:.2f}, {ratio.high:.2f}] (bootstrap 95%, n={ratio.n}); same answer {fused_as_unfused}/{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
