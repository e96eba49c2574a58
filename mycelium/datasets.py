"""Problems from anywhere, in one schema.

`load_problems(cfg, storage_options, limit)` reads `cfg.source`, which is one of

- `embedded:sample` — the GSM8K + MATH sample shipped in `mycelium/data/sample/`: 300 GSM8K
  and 50 MATH train problems interleaved so that any prefix of those 350 holds both in about
  their overall proportion, with a MATH row by the fourth row, then 2,700 more GSM8K train
  problems; `embedded:gsm8k` / `embedded:math` for one part, `embedded:gsm8k-test` for the
  500 GSM8K test problems that `make run` evaluates on;
- a local `.jsonl`, `.json` (a list of objects, or JSON lines) or `.parquet` file;
- an `s3://bucket/key.ext` path (any fsspec URL works the same way), read with
  `storage_options` (s3fs keywords: key, secret, client_kwargs={"endpoint_url": ...});
- anything else is a hub name for `datasets.load_dataset(name, cfg.hub_config, split=cfg.split)`.

and returns `LoadedProblems(frame, malformed, source)`. `frame` has exactly these columns:

    problem_id  Utf8   first 16 hex digits of sha256(problem text, whitespace collapsed, stripped)
    problem     Utf8
    solution    Utf8   the gold worked solution, as in the source (GSM8K keeps its <<a*b=c>> notes)
    answer      Utf8   explicit answer column if distinct from the solution; else the text after
                       GSM8K's `####` (commas removed); else the last balanced \\boxed{...}
    level       Int8   MATH "Level 3" or 3 -> 3; null when absent or unreadable ("Level ?")
    subject     Utf8   null when absent
    source      Utf8   "gsm8k" / "math" for the embedded sample, a `source` column when the
                       file has one, else the file name or hub name

Column names come from `cfg.fields`, first present column wins. One twist: when a dataset has
a separate answer column and the solution candidates also list that name (config.yaml lists
`answer` first because GSM8K keeps its worked solution there), the other solution column is
used, so MATH's short `answer` is never mistaken for its solution.

Malformed rows (invalid JSON, not an object, missing or empty problem/solution, a field of the
wrong type, no extractable answer, a duplicate problem) are skipped and listed in `malformed`
(input, row_number — 1-based line or row —, reason); with `cfg.strict` the first one raises
DatasetError. Every failure to read the input at all is a one-line DatasetError naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl

from mycelium.config import DatasetConfig, DatasetFields
from mycelium.errors import DatasetError

PROBLEM_SCHEMA: dict[str, pl.DataType] = {
    "problem_id": pl.Utf8,
    "problem": pl.Utf8,
    "solution": pl.Utf8,
    "answer": pl.Utf8,
    "level": pl.Int8,
    "subject": pl.Utf8,
    "source": pl.Utf8,
}
MALFORMED_SCHEMA: dict[str, pl.DataType] = {"input": pl.Utf8, "row_number": pl.Int64, "reason": pl.Utf8}

PROBLEM_ID_HEX_DIGITS = 16
SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet")
# Suffixes that mark a name as a file path (so a missing file is reported as missing, not
# looked up on the hub); hub dataset names do not end in these.
FILE_LIKE_SUFFIXES = SUPPORTED_EXTENSIONS + (".csv", ".tsv", ".txt", ".gz", ".zip", ".arrow", ".xlsx", ".ndjson")
# Each embedded source is a list of groups of (file, source label); the files of a group are
# interleaved, and the groups follow one another. `sample` keeps its first 350 rows (the
# interleaved GSM8K + MATH pair) in the same order however much is appended after them.
EMBEDDED_SOURCES = {
    "sample": ((("gsm8k_sample.jsonl", "gsm8k"), ("math_sample.jsonl", "math")), (("gsm8k_more.jsonl", "gsm8k"),)),
    "gsm8k": ((("gsm8k_sample.jsonl", "gsm8k"),), (("gsm8k_more.jsonl", "gsm8k"),)),
    "math": ((("math_sample.jsonl", "math"),),),
    "gsm8k-test": ((("gsm8k_test_sample.jsonl", "gsm8k"),),),
}
GSM8K_ANSWER_MARKER = "####"
LEVEL_PATTERN = re.compile(r"^\s*(?:level\s*)?(\d+)\s*$", re.IGNORECASE)
INT8_MAX = 127
MESSAGE_DETAIL_CHARS = 200


@dataclass(frozen=True)
class LoadedProblems:
    """Normalised problems, the rows that were skipped and why, and where they came from."""

    frame: pl.DataFrame
    malformed: pl.DataFrame
    source: str

    def malformed_counts(self) -> dict[str, int]:
        """Skipped rows per reason, most common first."""
        return dict(Counter(self.malformed["reason"].to_list()).most_common())

    def describe(self) -> str:
        """One line for logs and reports, e.g. `data.jsonl: 98 problems, 2 malformed rows skipped (2 duplicate)`."""
        line = f"{self.source}: {self.frame.height} problems"
        if self.malformed.height:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.malformed_counts().items())
            line += f", {self.malformed.height} malformed rows skipped ({reasons})"
        return line


@dataclass
class _RawRow:
    row_number: int
    record: dict[str, Any] | None
    error: str | None = None


@dataclass
class _Batch:
    """Rows read from one input, before normalisation."""

    input_name: str
    source_label: str
    rows: list[_RawRow] = field(default_factory=list)
    group: int = 0  # batches of one group are interleaved; groups follow one another


def problem_id(problem_text: str) -> str:
    """Stable id of a problem: sha256 of its text with whitespace collapsed and stripped."""
    canonical = " ".join(problem_text.split())
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:PROBLEM_ID_HEX_DIGITS]


def extract_gsm8k_answer(solution: str) -> str | None:
    """The text after the last `####`, stripped, commas removed; None when absent or empty."""
    if GSM8K_ANSWER_MARKER not in solution:
        return None
    answer = solution.rsplit(GSM8K_ANSWER_MARKER, 1)[1].strip().replace(",", "")
    return answer or None


def extract_boxed_answer(solution: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; also `\\boxed 5`.

    A regular expression cannot match nested braces, hence the small scanner.
    """
    start = max(solution.rfind("\\boxed"), solution.rfind("\\fbox"))
    if start < 0:
        return None
    rest = solution[start:]
    command = "\\boxed" if rest.startswith("\\boxed") else "\\fbox"
    after = rest[len(command):]
    if after.startswith(" "):
        # "\boxed 5$" form used by a few MATH solutions: the answer runs to the next "$" or space.
        content = re.split(r"[\s$]", after.lstrip(" "), maxsplit=1)[0]
        return content.strip() or None
    if not after.startswith("{"):
        return None
    depth = 0
    for index, char in enumerate(after):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return after[1:index].strip() or None
    return None  # unbalanced braces


def parse_level(value: Any) -> int | None:
    """MATH levels: 3, 3.0, "3" or "Level 3" -> 3; anything else (e.g. "Level ?") -> None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and (match := LEVEL_PATTERN.match(value)):
        number = int(match.group(1))
    else:
        return None
    return number if 0 <= number <= INT8_MAX else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else type(exc).__name__
    return detail[:MESSAGE_DETAIL_CHARS]


def _decode(data: bytes, input_name: str) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{input_name}: unreadable file: not UTF-8 text (byte {exc.start})") from None


def _json_lines(text: str) -> list[_RawRow]:
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines breaks on.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            rows.append(_RawRow(line_number, None, "invalid JSON"))
            continue
        if not isinstance(record, dict):
            rows.append(_RawRow(line_number, None, "not a JSON object"))
        else:
            rows.append(_RawRow(line_number, record))
    return rows


def _rows_from_bytes(data: bytes, extension: str, input_name: str) -> list[_RawRow]:
    if extension == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(f"{input_name}: unreadable file: not a valid Parquet file ({_one_line(exc)})") from None
        return [_RawRow(i, record) for i, record in enumerate(table.to_pylist(), start=1)]
    text = _decode(data, input_name)
    if extension == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            return _json_lines(text)  # many ".json" files (e.g. datasets' to_json) are JSON lines
        if isinstance(document, dict):
            return [_RawRow(1, document)]  # a one-line JSON lines file parses as one document
        if not isinstance(document, list):
            raise DatasetError(f"{input_name}: expected a list of objects or JSON lines, got a JSON {type(document).__name__}")
        return [
            _RawRow(i, item) if isinstance(item, dict) else _RawRow(i, None, "not a JSON object")
            for i, item in enumerate(document, start=1)
        ]
    return _json_lines(text)


def _extension(path_text: str, input_name: str) -> str:
    suffix = Path(path_text.split("?", 1)[0]).suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        shown = f"'{suffix}'" if suffix else "no extension"
        raise DatasetError(f"{input_name}: unsupported file type ({shown}); use {', '.join(SUPPORTED_EXTENSIONS)}")
    return suffix


def _read_local(path_text: str) -> _Batch:
    path = Path(path_text).expanduser()
    if path.is_dir():
        raise DatasetError(f"{path_text}: is a folder; give a {', '.join(SUPPORTED_EXTENSIONS)} file")
    if not path.exists():
        raise DatasetError(f"{path_text}: file not found")
    extension = _extension(path.name, path_text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path_text}: unreadable file ({exc.strerror or _one_line(exc)})") from None
    return _Batch(path_text, path.name, _rows_from_bytes(data, extension, path_text))


def _read_remote(url: str, storage_options: dict[str, Any]) -> _Batch:
    import fsspec

    extension = _extension(url, url)
    try:
        filesystem, path = fsspec.core.url_to_fs(url, **storage_options)
        if not filesystem.exists(path):
            raise DatasetError(f"{url}: not found")
        if filesystem.isdir(path):
            raise DatasetError(f"{url}: is a folder; give a {', '.join(SUPPORTED_EXTENSIONS)} file")
        data = filesystem.cat_file(path)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{url}: not found") from None
    except PermissionError as exc:
        raise DatasetError(f"{url}: access denied ({_one_line(exc)})") from None
    except ImportError as exc:
        raise DatasetError(f"{url}: no filesystem installed for this URL ({_one_line(exc)})") from None
    except Exception as exc:  # network, credentials, bad endpoint: all reach the user as one line
        raise DatasetError(f"{url}: cannot read ({type(exc).__name__}: {_one_line(exc)})") from None
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return _Batch(url, name, _rows_from_bytes(data, extension, url))


def _read_embedded(source: str) -> list[_Batch]:
    which = source.split(":", 1)[1]
    if which not in EMBEDDED_SOURCES:
        known = ", ".join(f"embedded:{name}" for name in EMBEDDED_SOURCES)
        raise DatasetError(f"{source}: unknown embedded dataset; choose one of {known}")
    folder = resources.files("mycelium").joinpath("data", "sample")
    batches = []
    for group, files in enumerate(EMBEDDED_SOURCES[which]):
        for file_name, label in files:
            try:
                data = folder.joinpath(file_name).read_bytes()
            except OSError:
                raise DatasetError(f"{source}: the package is missing mycelium/data/sample/{file_name}; reinstall mycelium") from None
            batches.append(_Batch(file_name, label, _rows_from_bytes(data, ".jsonl", file_name), group))
    return batches


def _read_hub(name: str, cfg: DatasetConfig) -> _Batch:
    try:
        import datasets as hf_datasets
    except ImportError:
        raise DatasetError(f"{name}: not a local file, and the 'datasets' package is not installed to load it from the hub") from None
    try:
        loaded = hf_datasets.load_dataset(name, cfg.hub_config, split=cfg.split)
        records = loaded.to_list() if hasattr(loaded, "to_list") else list(loaded)
    except Exception as exc:  # offline, unknown name, bad config or split: one line for the user
        where = f"config={cfg.hub_config!r}, split={cfg.split!r}"
        raise DatasetError(
            f"{name}: not a local file, and no hub dataset could be loaded under that name ({where}): {_one_line(exc)}"
        ) from None
    return _Batch(name, name, [_RawRow(i, record) for i, record in enumerate(records, start=1)])


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or "\\" in source or Path(source).suffix.lower() in FILE_LIKE_SUFFIXES


def _read_source(cfg: DatasetConfig, storage_options: dict[str, Any]) -> list[_Batch]:
    source = cfg.source.strip()
    if source.startswith("embedded:"):
        return _read_embedded(source)
    if "://" in source:
        return [_read_remote(source, storage_options)]
    if Path(source).expanduser().exists() or _looks_like_path(source):
        return [_read_local(source)]
    return [_read_hub(source, cfg)]


def _first_present(candidates: list[str], columns: set[str]) -> str | None:
    return next((name for name in candidates if name in columns), None)


@dataclass(frozen=True)
class _Columns:
    problem: str | None
    solution: str | None
    answer: str | None
    level: str | None
    subject: str | None


def _resolve_columns(fields: DatasetFields, columns: set[str]) -> _Columns:
    answer = _first_present(fields.answer, columns)
    solution_candidates = [name for name in fields.solution if name in columns]
    if answer in solution_candidates and len(solution_candidates) > 1:
        solution_candidates.remove(answer)  # a separate answer column is not the worked solution
    return _Columns(
        problem=_first_present(fields.problem, columns),
        solution=solution_candidates[0] if solution_candidates else None,
        answer=answer,
        level=_first_present(fields.level, columns),
        subject=_first_present(fields.subject, columns),
    )


def _as_answer_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _normalise_row(record: dict[str, Any], columns: _Columns, source_label: str) -> tuple[dict[str, Any] | None, str | None]:
    """One source row -> (normalised row, None) or (None, reason it is malformed)."""
    texts: dict[str, str] = {}
    for role in ("problem", "solution"):
        column = getattr(columns, role)
        value = record.get(column) if column else None
        if value is None:
            return None, f"missing {role}"
        if not isinstance(value, str):
            return None, f"{role} is not text (got {type(value).__name__})"
        if not value.strip():
            return None, f"empty {role}"
        texts[role] = value
    solution = texts["solution"]

    answer = None
    if columns.answer and columns.answer != columns.solution and record.get(columns.answer) is not None:
        raw_answer = record[columns.answer]
        answer = _as_answer_text(raw_answer)
        if answer is None and not isinstance(raw_answer, str):
            return None, f"answer is not text (got {type(raw_answer).__name__})"
    if answer is None:
        answer = extract_gsm8k_answer(solution) if GSM8K_ANSWER_MARKER in solution else extract_boxed_answer(solution)
    if answer is None:
        return None, "no answer (no answer column, '####' line or \\boxed{})"

    subject = record.get(columns.subject) if columns.subject else None
    row_source = record.get("source")
    return {
        "problem_id": problem_id(texts["problem"]),
        "problem": texts["problem"],
        "solution": solution,
        "answer": answer,
        "level": parse_level(record.get(columns.level)) if columns.level else None,
        "subject": None if subject is None else str(subject),
        "source": row_source if isinstance(row_source, str) and row_source else source_label,
    }, None


def _interleave(groups: list[list[tuple]]) -> list[tuple]:
    """Merge groups so each prefix holds every group in proportion to its size.

    Item i of a group of n sits at position (i + 0.5) / n on [0, 1); ties go to the earlier group.
    """
    if len(groups) == 1:
        return groups[0]
    keyed = [((i + 0.5) / len(group), g, i, item) for g, group in enumerate(groups) for i, item in enumerate(group)]
    return [item for *_, item in sorted(keyed, key=lambda k: k[:3])]


def load_problems(cfg: DatasetConfig, storage_options: dict | None = None, limit: int | None = None) -> LoadedProblems:
    """Read `cfg.source` into the normalised schema; see the module docstring."""
    batches = _read_source(cfg, storage_options or {})
    if not any(batch.rows for batch in batches):
        raise DatasetError(f"{cfg.source}: empty dataset (no rows)")

    # Normalise each input on its own (columns can differ), then merge in row order.
    per_group: dict[int, list[list[tuple]]] = {}
    for batch in batches:
        columns_seen = {key for raw in batch.rows if raw.record for key in raw.record}
        columns = _resolve_columns(cfg.fields, columns_seen)
        normalised = []
        for raw in batch.rows:
            if raw.error is not None:
                normalised.append((batch.input_name, raw.row_number, None, raw.error))
            else:
                row, reason = _normalise_row(raw.record, columns, batch.source_label)
                normalised.append((batch.input_name, raw.row_number, row, reason))
        per_group.setdefault(batch.group, []).append(normalised)
    merged = [row for group in sorted(per_group) for row in _interleave(per_group[group])]

    kept: list[dict[str, Any]] = []
    malformed: list[dict[str, Any]] = []
    first_seen: dict[str, tuple[str, int]] = {}
    for input_name, row_number, row, reason in merged:
        detail = reason
        if row is not None:
            if row["problem_id"] in first_seen:
                first_input, first_row = first_seen[row["problem_id"]]
                where = f"row {first_row}" if first_input == input_name else f"{first_input} row {first_row}"
                reason, detail = "duplicate", f"duplicate of {where}"
            else:
                first_seen[row["problem_id"]] = (input_name, row_number)
                kept.append(row)
                continue
        if cfg.strict:
            raise DatasetError(f"{input_name}: row {row_number}: {detail}")
        malformed.append({"input": input_name, "row_number": row_number, "reason": reason})

    frame = pl.DataFrame(kept, schema=PROBLEM_SCHEMA)
    malformed_frame = pl.DataFrame(malformed, schema=MALFORMED_SCHEMA)
    if frame.height == 0:
        counts = ", ".join(f"{n} {reason}" for reason, n in Counter(m["reason"] for m in malformed).most_common())
        raise DatasetError(f"{cfg.source}: empty dataset (no usable rows; {len(malformed)} malformed: {counts})")
    keep = limit if limit is not None else cfg.limit
    if keep is not None:
        if keep < 1:
            raise DatasetError(f"{cfg.source}: limit must be at least 1 (got {keep})")
        frame = frame.head(keep)
    return LoadedProblems(frame=frame, malformed=malformed_frame, source=cfg.source)
