"""Dataset loader: every source type that runs offline, malformed rows, strict mode, stable ids,
answer extraction. The S3 test talks to a real moto server on loopback (the S3 wire protocol)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from mycelium.config import load_config
from mycelium.datasets import (
    PROBLEM_SCHEMA,
    extract_boxed_answer,
    extract_gsm8k_answer,
    load_problems,
    parse_level,
    problem_id,
)
from mycelium.errors import DatasetError

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 1,200 more. How many?", "answer": "3 + 1200 = <<3+1200=1203>>1203\n#### 1,203"},
    {"question": "A box holds 4 pens. How many pens in 2 boxes?", "answer": "4 * 2 = <<4*2=8>>8\n#### 8"},
]
MATH_ROWS = [
    {"problem": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "solution": "It is $\\boxed{1}$.", "level": "Level 1", "type": "Algebra"},
    {"problem": "Simplify $\\sqrt{8}$.", "solution": "We get $\\boxed{2\\sqrt{2}}$.", "level": "Level 3", "type": "Algebra"},
]


@pytest.fixture(scope="module")
def dataset_cfg():
    return load_config().dataset


def with_source(cfg, source, **changes):
    return cfg.model_copy(update={"source": str(source), **changes})


def write_jsonl(path: Path, rows) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_local_jsonl_gsm8k_normalised(tmp_path, dataset_cfg):
    loaded = load_problems(with_source(dataset_cfg, write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS)))
    frame = loaded.frame
    assert dict(frame.schema) == PROBLEM_SCHEMA
    assert frame["answer"].to_list() == ["1203", "8"]  # text after ####, comma removed
    assert frame["solution"][0] == GSM8K_ROWS[0]["answer"]
    assert frame["source"].to_list() == ["gsm.jsonl", "gsm.jsonl"]
    assert frame["level"].null_count() == 2
    assert loaded.malformed.height == 0


def test_local_parquet_math_with_levels_and_subject(tmp_path, dataset_cfg):
    path = tmp_path / "math.parquet"
    pl.DataFrame(MATH_ROWS).write_parquet(path)
    frame = load_problems(with_source(dataset_cfg, path)).frame
    assert frame["answer"].to_list() == ["1", "2\\sqrt{2}"]
    assert frame["level"].to_list() == [1, 3]
    assert frame.schema["level"] == pl.Int8
    assert frame["subject"].to_list() == ["Algebra", "Algebra"]  # from the `type` column


def test_explicit_answer_column_is_not_taken_for_the_solution(tmp_path, dataset_cfg):
    # config lists solution candidates [answer, solution]; MATH has both columns.
    row = {"problem": "What is 2+2?", "solution": "Add: $\\boxed{4}$.", "answer": "4.0", "level": 2, "subject": "Prealgebra"}
    frame = load_problems(with_source(dataset_cfg, write_jsonl(tmp_path / "m.jsonl", [row]))).frame
    assert frame["solution"][0] == row["solution"]
    assert frame["answer"][0] == "4.0"  # the explicit column wins over the boxed content


def test_json_array_and_json_lines_with_json_extension(tmp_path, dataset_cfg):
    array_file = tmp_path / "array.json"
    array_file.write_text(json.dumps(GSM8K_ROWS))
    lines_file = write_jsonl(tmp_path / "lines.json", GSM8K_ROWS)
    for path in (array_file, lines_file):
        assert load_problems(with_source(dataset_cfg, path)).frame.height == 2


def test_embedded_sample_interleaves_and_has_math_early(dataset_cfg):
    loaded = load_problems(with_source(dataset_cfg, "embedded:sample"))
    frame = loaded.frame
    assert loaded.malformed.height == 0
    counts = frame["source"].value_counts().sort("source")
    assert dict(zip(counts["source"], counts["count"])) == {"gsm8k": 3000, "math": 50}
    assert "math" in frame["source"].head(4).to_list()
    # Every prefix of the first 350 keeps about their 1:6 proportion; the 2,700 appended
    # GSM8K problems come after all of them, so that prefix is the old sample, unchanged.
    for prefix in (14, 70, 140, 350):
        share = (frame["source"].head(prefix) == "math").mean()
        assert abs(share - 50 / 350) <= 1 / 14
    assert frame["source"].slice(350).unique().to_list() == ["gsm8k"]
    math = frame.filter(pl.col("source") == "math")
    assert sorted(math["level"].value_counts()["count"].to_list()) == [10] * 5
    assert math["subject"].n_unique() >= 5
    assert frame["problem_id"].n_unique() == frame.height


def test_embedded_test_sample_is_gsm8k_test_and_shares_no_problem_with_training(dataset_cfg):
    test = load_problems(with_source(dataset_cfg, "embedded:gsm8k-test")).frame
    train = load_problems(with_source(dataset_cfg, "embedded:sample")).frame
    assert test.height == 500 and set(test["source"]) == {"gsm8k"}
    assert test.join(train, on="problem_id", how="semi").height == 0
    assert load_config().eval.dataset == "embedded:gsm8k-test"  # what `make run` evaluates on


def test_limit_keeps_the_first_rows(dataset_cfg):
    full = load_problems(with_source(dataset_cfg, "embedded:sample")).frame
    smoke_cfg = load_config(smoke=True).dataset  # what `mycelium run --smoke` reads
    smoke = load_problems(smoke_cfg).frame
    assert smoke.height == smoke_cfg.limit
    assert smoke["problem_id"].to_list() == full["problem_id"].head(smoke_cfg.limit).to_list()
    assert set(smoke["source"]) == {"gsm8k", "math"}
    assert load_problems(with_source(dataset_cfg, "embedded:sample"), limit=3).frame.height == 3


def test_problem_id_is_stable_and_whitespace_insensitive():
    assert problem_id("What is  2+2?\n") == problem_id(" What is 2+2?")
    assert problem_id("What is 2+2?") != problem_id("What is 2+3?")
    # Fixed value: the id must not change across runs, machines or Python versions.
    assert problem_id("What is 2+2?") == "52cb6b5e4a038af1"
    assert len(problem_id("x")) == 16


def test_malformed_rows_are_counted_with_reasons(tmp_path, dataset_cfg):
    rows = [
        GSM8K_ROWS[0],
        "{not json",
        "[1, 2]",
        {"question": "", "answer": "x\n#### 1"},
        {"question": "No solution here"},
        {"question": 42, "answer": "#### 1"},
        {"question": "No answer marker", "answer": "just text"},
        GSM8K_ROWS[0] | {"question": GSM8K_ROWS[0]["question"] + "  "},  # same problem, extra space
        GSM8K_ROWS[1],
    ]
    loaded = load_problems(with_source(dataset_cfg, write_jsonl(tmp_path / "bad.jsonl", rows)))
    assert loaded.frame.height == 2
    reasons = dict(zip(loaded.malformed["row_number"].to_list(), loaded.malformed["reason"].to_list()))
    assert reasons[2] == "invalid JSON"
    assert reasons[3] == "not a JSON object"
    assert reasons[4] == "empty problem"
    assert reasons[5] == "missing solution"
    assert reasons[6] == "problem is not text (got int)"
    assert reasons[7].startswith("no answer")
    assert reasons[8] == "duplicate"
    assert loaded.malformed_counts()["duplicate"] == 1
    assert "7 malformed rows skipped" in loaded.describe()


def test_strict_mode_names_file_row_and_reason(tmp_path, dataset_cfg):
    path = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], {"question": "Q?"}])
    with pytest.raises(DatasetError, match=r"bad\.jsonl: row 2: missing solution$"):
        load_problems(with_source(dataset_cfg, path, strict=True))
    duplicate = write_jsonl(tmp_path / "dup.jsonl", [GSM8K_ROWS[0], GSM8K_ROWS[0]])
    with pytest.raises(DatasetError, match=r"dup\.jsonl: row 2: duplicate of row 1$"):
        load_problems(with_source(dataset_cfg, duplicate, strict=True))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "nowhere.jsonl", r"nowhere\.jsonl: file not found"),
        (lambda tmp: (tmp / "x.csv").write_text("a,b\n") and tmp / "x.csv", r"x\.csv: unsupported file type \('\.csv'\)"),
        (lambda tmp: (tmp / "e.jsonl").write_text("\n") and tmp / "e.jsonl", r"e\.jsonl: empty dataset"),
        (lambda tmp: (tmp / "b.jsonl").write_bytes(b"\xff\xfe\x00bad") and tmp / "b.jsonl", r"b\.jsonl: unreadable file: not UTF-8"),
        (lambda tmp: (tmp / "p.parquet").write_bytes(b"not parquet") and tmp / "p.parquet", r"p\.parquet: unreadable file: not a valid Parquet"),
        (lambda tmp: tmp, r"is a folder"),
        (lambda tmp: write_jsonl(tmp / "all_bad.jsonl", [{"question": "Q"}]), r"all_bad\.jsonl: empty dataset \(no usable rows; 1 malformed: 1 missing solution\)"),
        (lambda tmp: "embedded:nope", r"embedded:nope: unknown embedded dataset"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, dataset_cfg, make, message):
    with pytest.raises(DatasetError, match=message) as caught:
        load_problems(with_source(dataset_cfg, make(tmp_path)))
    assert "\n" not in str(caught.value)


def test_unknown_hub_dataset_is_rephrased(dataset_cfg):
    """The real `datasets.load_dataset`, offline (this machine has no hub): one clear line."""
    code = (
        "from mycelium.config import load_config\n"
        "from mycelium.datasets import load_problems\n"
        "from mycelium.errors import DatasetError\n"
        "cfg = load_config(overrides=['dataset.source=someone/no-such-set']).dataset\n"
        "try:\n    load_problems(cfg)\nexcept DatasetError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    assert re.match(r"^someone/no-such-set: not a local file, and no hub dataset .*split='train'", lines[0])


def test_gsm8k_answer_extraction():
    assert extract_gsm8k_answer("a\nb\n#### 1,234,567") == "1234567"
    assert extract_gsm8k_answer("x #### 1 #### -3.5 ") == "-3.5"  # the last marker wins
    assert extract_gsm8k_answer("no marker") is None
    assert extract_gsm8k_answer("empty ####   ") is None


def test_boxed_extraction_with_nested_braces():
    assert extract_boxed_answer("so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert extract_boxed_answer("$\\boxed{1}$ then $\\boxed{\\sqrt{\\frac{a}{b}}}$") == "\\sqrt{\\frac{a}{b}}"
    assert extract_boxed_answer("$\\boxed 5$.") == "5"
    assert extract_boxed_answer("\\fbox{x^{2}}") == "x^{2}"
    assert extract_boxed_answer("unbalanced \\boxed{\\frac{1}{2}") is None
    assert extract_boxed_answer("no box") is None


def test_level_parsing():
    assert [parse_level(v) for v in ("Level 3", "level 5", "2", 4, 1.0)] == [3, 5, 2, 4, 1]
    assert [parse_level(v) for v in ("Level ?", None, True, 2.5, 1000)] == [None] * 5


# --- S3 through a real moto server on loopback -------------------------------------------


@pytest.fixture(scope="module")
def s3_bucket(moto_endpoint):
    """A bucket on the session's moto server (tests/conftest.py) holding a JSONL and a Parquet file."""
    import boto3

    client = boto3.client(
        "s3", endpoint_url=moto_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    client.create_bucket(Bucket="problems")
    client.put_object(Bucket="problems", Key="gsm/rows.jsonl", Body="\n".join(json.dumps(r) for r in GSM8K_ROWS).encode())
    buffer = __import__("io").BytesIO()
    pl.DataFrame(MATH_ROWS).write_parquet(buffer)
    client.put_object(Bucket="problems", Key="math/rows.parquet", Body=buffer.getvalue())
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"}}
    return options


def test_s3_jsonl_and_parquet(s3_bucket, dataset_cfg):
    gsm = load_problems(with_source(dataset_cfg, "s3://problems/gsm/rows.jsonl"), storage_options=s3_bucket)
    assert gsm.frame["answer"].to_list() == ["1203", "8"]
    assert gsm.frame["source"][0] == "rows.jsonl"
    math = load_problems(with_source(dataset_cfg, "s3://problems/math/rows.parquet"), storage_options=s3_bucket)
    assert math.frame["level"].to_list() == [1, 3]
    # Same problems, same ids, wherever they are read from.
    local_ids = [problem_id(r["question"]) for r in GSM8K_ROWS]
    assert gsm.frame["problem_id"].to_list() == local_ids


def test_s3_missing_key_is_a_clear_error(s3_bucket, dataset_cfg):
    with pytest.raises(DatasetError, match=r"^s3://problems/nothing\.jsonl: not found$"):
        load_problems(with_source(dataset_cfg, "s3://problems/nothing.jsonl"), storage_options=s3_bucket)
    with pytest.raises(DatasetError, match=r"^s3://no-such-bucket/x\.jsonl: (not found|cannot read)"):
        load_problems(with_source(dataset_cfg, "s3://no-such-bucket/x.jsonl"), storage_options=s3_bucket)
