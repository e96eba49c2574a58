"""Does extraction's memory grow with the number of problems? Peak RSS for N vs 4N problems.

Reads:  GSM8K problems (default ../shared/data/gsm8k/train.jsonl, else the embedded GSM8K
        sample; or a path as the first argument), config.yaml (teacher, extraction).
Writes: nothing; prints one table.
Time:   ~40 s on 2 CPU cores with N = 10 (two fresh processes: load, then N or 4N problems).
You see: per run, RSS after loading the teacher and choosing heads, and the peak RSS while
        extracting (sampled every few ms from /proc, so a peak of the loading phase cannot
        hide it), and the growth of that peak from N to 4N problems. Target: <= 50 MB. The
        signals themselves are ~20 bytes per (head, token), so 4N GSM8K problems add well under
        a megabyte of table; anything more would be attention being kept.
Each size runs in its own fresh subprocess so allocator history does not carry over.

    python bench/extraction_memory.py [DATA] [--n 10] [--heads L15H6,L21H8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
FALLBACK_DATA = "embedded:gsm8k"
GROWTH_TARGET_MB = 50.0
SIZE_FACTOR = 4  # N and 4N
RSS_SAMPLE_SECONDS = 0.005
BYTES_PER_MB = 1 << 20


def current_rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples RSS in a background thread between start() and stop(); keeps the maximum."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(RSS_SAMPLE_SECONDS)

    def start(self) -> None:
        self.peak = current_rss_bytes()
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())
        return self.peak


def child(n_problems: int, data: str, heads_spec: str | None, config_path: str) -> None:
    """Extract n_problems in this process and print one JSON line with the memory figures."""
    from mycelium.config import Settings, load_config
    from mycelium.datasets import load_problems
    from tasks.extract_attention import choose_heads, extract_chunk, load_signal_teacher, parse_heads

    cfg = load_config(config_path, ["extraction.mode=teacher_forced"])
    problems = load_problems(cfg.dataset.model_copy(update={"source": data}), limit=n_problems).frame
    teacher = load_signal_teacher(cfg.teacher, Settings().cache_dir)
    if heads_spec:
        heads = parse_heads(heads_spec.split(","), teacher.n_layers, teacher.n_heads)
    else:
        heads, _ = choose_heads(teacher, problems, cfg.extraction, cfg.teacher, progress=False)
    after_load = current_rss_bytes()
    sampler = PeakRss()
    sampler.start()
    tokens, records = extract_chunk(teacher, problems, heads, cfg.extraction, cfg.teacher, progress=False)
    peak = sampler.stop()
    print(
        json.dumps(
            {
                "problems": records.height,
                "text_tokens": int(records["n_text_tokens"].fill_null(0).sum()),
                "token_rows": tokens.height,
                "table_mb": tokens.estimated_size() / BYTES_PER_MB,
                "after_load_mb": after_load / BYTES_PER_MB,
                "peak_mb": peak / BYTES_PER_MB,
                "heads": [h.name for h in heads],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA) if DEFAULT_DATA.exists() else FALLBACK_DATA)
    parser.add_argument("--n", type=int, default=10, help="problems in the small run (the large one has 4×)")
    parser.add_argument(
        "--heads", default=None, help="comma-separated, e.g. L15H6,L21H8; default: config (auto = ranked)"
    )
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.data, args.heads, args.config)
        return

    results = []
    for n in (args.n, SIZE_FACTOR * args.n):
        command = [sys.executable, __file__, args.data, "--child", str(n), "--config", args.config]
        if args.heads:
            command += ["--heads", args.heads]
        run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if run.returncode != 0:
            sys.exit(f"extraction_memory: the run with {n} problems failed:\n{run.stderr[-3000:]}")
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))

    print(f"\nheads {', '.join(results[0]['heads'])}; each run in a fresh process")
    print(
        f"{'problems':>8} {'text tokens':>11} {'token rows':>10} {'table MB':>9} "
        f"{'RSS after load MB':>18} {'peak RSS MB':>12} {'peak - load MB':>15}"
    )
    for r in results:
        print(
            f"{r['problems']:8d} {r['text_tokens']:11d} {r['token_rows']:10d} {r['table_mb']:9.2f} "
            f"{r['after_load_mb']:18.1f} {r['peak_mb']:12.1f} {r['peak_mb'] - r['after_load_mb']:15.1f}"
        )
    small, large = results
    growth = large["peak_mb"] - small["peak_mb"]
    verdict = "OK" if growth <= GROWTH_TARGET_MB else "OVER TARGET"
    print(
        f"peak RSS growth from {small['problems']} to {large['problems']} problems: {growth:+.1f} MB "
        f"(target <= {GROWTH_TARGET_MB:.0f} MB): {verdict}"
    )


if __name__ == "__main__":
    main()
