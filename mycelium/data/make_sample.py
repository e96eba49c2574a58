"""Regenerate the sample shipped in mycelium/data/sample/ from the full GSM8K and MATH files.

    python mycelium/data/make_sample.py [--data-root ../shared/data]

- gsm8k_sample.jsonl: 300 problems from gsm8k/train.jsonl at evenly spaced row numbers
  (row i*N//300 for i = 0..299), fields kept as in the source (question, answer).
- gsm8k_more.jsonl: 2,700 more GSM8K train problems, evenly spaced over the rows the first
  file did not take (the loader appends them after the interleaved 350, so every prefix of
  the first 350, `--smoke` included, is unchanged).
- gsm8k_test_sample.jsonl: 500 problems from gsm8k/test.jsonl at evenly spaced row numbers,
  the held-out set `make run` evaluates on (`eval.dataset: embedded:gsm8k-test`).
- math_sample.jsonl: 50 problems from math/train.jsonl, 10 per level 1-5. Within a level the
  subjects take turns (alphabetical order), each giving its shortest remaining solution, so the
  sample mixes subjects and stays cheap for a CPU teacher. Rows are written level 1,2,3,4,5,1,...
  so any prefix covers every level. Fields kept as in the source.

No randomness: the same source files always give byte-identical samples.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"
GSM8K_COUNT = 300
GSM8K_MORE_COUNT = 2700
GSM8K_TEST_COUNT = 500
MATH_PER_LEVEL = 10
MATH_LEVELS = (1, 2, 3, 4, 5)


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def pick_gsm8k(rows: list[dict], count: int) -> list[dict]:
    if len(rows) < count:
        raise SystemExit(f"gsm8k: need {count} rows, found {len(rows)}")
    return [rows[i * len(rows) // count] for i in range(count)]


def pick_more_gsm8k(rows: list[dict], already: list[dict], count: int) -> list[dict]:
    taken = {row["question"] for row in already}
    return pick_gsm8k([row for row in rows if row["question"] not in taken], count)


def pick_math(rows: list[dict], per_level: int) -> list[dict]:
    by_level: dict[int, list[list[dict]]] = {}
    for level in MATH_LEVELS:
        by_subject: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            if row.get("level") == level and "\\boxed" in row.get("solution", ""):
                by_subject[row["subject"]].append(row)
        queues = [sorted(by_subject[s], key=lambda r: (len(r["solution"]), r["problem"])) for s in sorted(by_subject)]
        chosen: list[dict] = []
        while len(chosen) < per_level and any(queues):
            for queue in queues:
                if queue and len(chosen) < per_level:
                    chosen.append(queue.pop(0))
        if len(chosen) < per_level:
            raise SystemExit(f"math: level {level} has only {len(chosen)} usable problems")
        # Inside a level, shortest first, so the earliest rows of the sample are the cheapest.
        by_level[level] = sorted(chosen, key=lambda r: (len(r["solution"]), r["problem"]))
    return [by_level[level][i] for i in range(per_level) for level in MATH_LEVELS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    args = parser.parse_args()
    SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    gsm8k_train = read_jsonl(args.data_root / "gsm8k" / "train.jsonl")
    gsm8k = pick_gsm8k(gsm8k_train, GSM8K_COUNT)
    more = pick_more_gsm8k(gsm8k_train, gsm8k, GSM8K_MORE_COUNT)
    test = pick_gsm8k(read_jsonl(args.data_root / "gsm8k" / "test.jsonl"), GSM8K_TEST_COUNT)
    math_rows = pick_math(read_jsonl(args.data_root / "math" / "train.jsonl"), MATH_PER_LEVEL)
    write_jsonl(gsm8k, SAMPLE_DIR / "gsm8k_sample.jsonl")
    write_jsonl(more, SAMPLE_DIR / "gsm8k_more.jsonl")
    write_jsonl(test, SAMPLE_DIR / "gsm8k_test_sample.jsonl")
    write_jsonl(math_rows, SAMPLE_DIR / "math_sample.jsonl")
    print(f"wrote {len(gsm8k)} + {len(more)} GSM8K train, {len(test)} GSM8K test and {len(math_rows)} MATH problems to {SAMPLE_DIR}")


if __name__ == "__main__":
    main()
