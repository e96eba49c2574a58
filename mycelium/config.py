"""Configuration: config.yaml validated by pydantic, plus site settings from the environment.

`load_config(path, overrides)` reads the YAML file, applies `--set section.key=value`
overrides (values parsed as YAML, so `--set extraction.chunk_size=10` gives an int), and
validates the result. Every section forbids unknown keys and bounds its numbers, so a typo
or an out-of-range value fails at once with one line naming the key, e.g.
`config.yaml: heartbeat.iaf_threshold: must be <= 1 (got 3)`.

`Settings` holds what differs per site and must never live in the repo: the storage root,
S3 endpoint and credentials, the model cache. They come from the environment (or a `.env`
file); `.env.example` lists them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mycelium.errors import ConfigError

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.yaml"

HEAD_PATTERN = re.compile(r"^L(\d+)H(\d+)$")


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest_payload(self) -> dict[str, Any]:
        """The section as plain JSON-able data, used in artifact keys."""
        return self.model_dump(mode="json")


class DatasetFields(Section):
    problem: list[str] = Field(min_length=1)
    solution: list[str] = Field(min_length=1)
    answer: list[str] = Field(min_length=1)
    level: list[str] = Field(default_factory=list)
    subject: list[str] = Field(default_factory=list)


class DatasetConfig(Section):
    source: str = Field(min_length=1)
    hub_config: str | None = None
    split: str = "train"
    limit: int | None = Field(default=None, ge=1)
    strict: bool = False
    fields: DatasetFields


class TeacherConfig(Section):
    model: str = Field(min_length=1)
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_new_tokens: int = Field(ge=1, le=32768)
    temperature: float = Field(ge=0.0, le=0.0)
    use_chat_template: bool = True
    torch_threads: int | None = Field(default=None, ge=1)


class ExtractionConfig(Section):
    mode: Literal["teacher_forced", "generate"]
    computing_heads: Literal["auto"] | list[str]
    auto_top_k: int = Field(ge=1)
    calibration_problems: int = Field(ge=1)
    sink_tokens: int = Field(ge=0)
    chunk_size: int = Field(ge=1)
    max_workers: int = Field(ge=1)
    dask_address: str | None = None
    max_memory_mb: int = Field(ge=1)
    max_prompt_tokens: int = Field(ge=8)

    @field_validator("computing_heads")
    @classmethod
    def _heads_look_like_LxHy(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("needs at least one head, or 'auto'")
            bad = [h for h in value if not HEAD_PATTERN.match(h)]
            if bad:
                raise ValueError(f"heads must look like L22H4, got {bad}")
        return value


class HeartbeatConfig(Section):
    iaf_threshold: float = Field(ge=0.0, le=1.0)
    min_run_length: int = Field(ge=1)
    head_aggregation: str = Field(min_length=1)
    jsd_smoothing_window: int = Field(ge=3)
    jsd_smoothing_polyorder: int = Field(ge=0)
    jsd_peak_prominence: float = Field(ge=0.0)
    jsd_peak_min_distance: int = Field(ge=1)
    boundary_tolerance: int = Field(ge=0)
    random_baseline_seeds: int = Field(ge=1)
    bootstrap_resamples: int = Field(ge=10)
    confidence: float = Field(gt=0.0, lt=1.0)
    trace_figures: int = Field(ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _window_is_odd_and_fits_polyorder(self):
        if self.jsd_smoothing_window % 2 == 0:
            raise ValueError(f"jsd_smoothing_window must be odd (got {self.jsd_smoothing_window})")
        if self.jsd_smoothing_polyorder >= self.jsd_smoothing_window:
            raise ValueError("jsd_smoothing_polyorder must be smaller than jsd_smoothing_window")
        if self.head_aggregation != "mean" and not HEAD_PATTERN.match(self.head_aggregation):
            raise ValueError(f"head_aggregation must be 'mean' or a head like L15H6 (got {self.head_aggregation!r})")
        return self


class StepsConfig(Section):
    expression_timeout_s: float = Field(gt=0.0)
    max_expression_length: int = Field(ge=1)
    result_rel_tol: float = Field(ge=0.0, lt=1.0)


class IBConfig(Section):
    embedding_model: str
    embedding_dim: int = Field(ge=1)
    embedding_batch_size: int = Field(ge=1)
    embedding_max_length: int = Field(ge=8)
    beta_start: float = Field(gt=0.0)
    beta_end: float = Field(gt=0.0)
    min_size: int = Field(ge=1)
    coherence_threshold: float = Field(ge=-1.0, le=1.0)
    elbow_gain_threshold: float = Field(ge=0.0)
    max_depth: int = Field(ge=1)
    pow_subtypes: list[str] = Field(min_length=1)
    n_betas: int = Field(ge=2)
    knn: int = Field(ge=1)
    n_permutations: int = Field(ge=1)
    max_clusters: int = Field(ge=2)
    kmeans_n_init: int = Field(ge=1)
    n_exemplars: int = Field(ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _betas_increase(self):
        if self.beta_end <= self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be larger than beta_start ({self.beta_start})")
        return self


class C2Config(Section):
    backbone: str
    num_labels: int = Field(ge=1)
    threshold: float = Field(gt=0.0, lt=1.0)
    freeze_epochs: int = Field(ge=0)
    learning_rate: float = Field(gt=0.0)
    batch_size: int = Field(ge=1)
    max_epochs: int = Field(ge=1)
    early_stopping_patience: int = Field(ge=1)
    heartbeat_loss_weight: float = Field(ge=0.0)
    head_learning_rate: float = Field(gt=0.0)
    hidden_size: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    min_improvement: float = Field(ge=0.0)
    unfreeze: Literal["auto", "always", "never"]
    max_length: int = Field(ge=8)
    feature_batch_size: int = Field(ge=1)
    seed: int
    labels: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _labels_match_count(self):
        if len(self.labels) != self.num_labels:
            raise ValueError(f"num_labels is {self.num_labels} but labels lists {len(self.labels)}")
        return self


class C3Config(Section):
    backbone: str
    learning_rate: float = Field(gt=0.0)
    batch_size: int = Field(ge=1)
    max_epochs: int = Field(ge=1)
    early_stopping_patience: int = Field(ge=1)
    provenance_types: list[str] = Field(min_length=1)
    head_learning_rate: float = Field(gt=0.0)
    hidden_size: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    min_improvement: float = Field(ge=0.0)
    max_length: int = Field(ge=8)
    feature_batch_size: int = Field(ge=1)
    context_tokens: int = Field(ge=0)
    max_skeletons: int = Field(ge=0)
    max_operands: int = Field(ge=1)
    seed: int
    unfreeze: Literal["auto", "always", "never"] = "never"
    read_precision: Literal["float32", "int8"] = "float32"
    int8_min_cosine: float = Field(default=0.97, ge=-1.0, le=1.0)
    fine_tune_epochs: int = Field(default=3, ge=1)
    fine_tune_layers: int = Field(default=3, ge=1)
    fine_tune_batch_problems: int = Field(default=8, ge=1)
    fine_tune_planner_weight: float = Field(default=1.0, ge=0.0)


class TrainingDataConfig(Section):
    validation_fraction: float = Field(gt=0.0, lt=1.0)
    split_seed: int
    context_words: int = Field(ge=1)
    top_unexplained: int = Field(ge=0)


class C4Config(Section):
    word_to_number: dict[str, float]
    domain_constants: dict[str, float]


class EvalConfig(Section):
    dataset: str | None = None
    split: str = "test"
    fields: DatasetFields | None = None
    n_problems: int | None = Field(default=None, ge=1)
    beam_width: int = Field(ge=1)
    mcts_max_paths: int = Field(ge=1)
    max_steps: int = Field(ge=1)
    skeletons_per_label: int = Field(ge=1)
    require_all_labels: bool
    coverage_prior: bool
    step_choice: Literal["planner", "c2_labels"]
    planner_top_k: int = Field(ge=1)
    planner_uses_c2: bool
    prune_margin: float | None = Field(default=None, ge=0.0)
    first_scored_pairs: int = Field(ge=1)
    voting: Literal["weighted", "majority", "top1"]
    numerical_consistency_boost: float = Field(ge=0.0)
    simplicity_penalty: float = Field(ge=0.0)
    answer_digits: int = Field(ge=1, le=15)
    answer_rel_tol: float = Field(gt=0.0)
    check_timeout_s: float = Field(gt=0.0)
    teacher_problems: int = Field(ge=0)
    teacher_max_new_tokens: int = Field(ge=1)
    teacher_batch_size: int = Field(ge=1)
    teacher_latency_problems: int = Field(ge=0)
    easy_max_steps: int = Field(ge=1)
    rerank: bool = False
    backbone_runtime: Literal["onnxruntime", "torch"] = "torch"
    int8_read_threads: int | None = Field(default=None, ge=1)
    bootstrap_resamples: int = Field(ge=10)
    seed: int


class VerifierConfig(Section):
    hidden_size: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    input_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    learning_rate: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)
    batch_problems: int = Field(ge=1)
    max_epochs: int = Field(ge=1)
    early_stopping_patience: int = Field(ge=1)
    seed: int
    pool_beam_width: int = Field(ge=1)


class StorageConfig(Section):
    io_retries: int = Field(ge=0)
    io_retry_backoff_seconds: float = Field(ge=0.0)
    io_retry_jitter: float = Field(ge=0.0)
    probe_timeout_seconds: float = Field(gt=0.0)


class MyceliumConfig(Section):
    """The whole config.yaml. `smoke` holds dotted overrides that `--smoke` applies."""

    dataset: DatasetConfig
    teacher: TeacherConfig
    extraction: ExtractionConfig
    heartbeat: HeartbeatConfig
    steps: StepsConfig
    ib: IBConfig
    training_data: TrainingDataConfig
    c2: C2Config
    c3: C3Config
    c4: C4Config
    eval: EvalConfig
    verifier: VerifierConfig
    storage: StorageConfig
    smoke: dict[str, Any] = Field(default_factory=dict)


class Settings(BaseSettings):
    """Site settings from the environment (and `.env`); never from the repo."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    storage_root: str = Field(default="./mycelium-data", validation_alias="MYCELIUM_STORAGE_ROOT")
    cache_dir: str = Field(default=str(Path.home() / ".cache" / "mycelium"), validation_alias="MYCELIUM_CACHE_DIR")
    aws_endpoint_url: str | None = Field(default=None, validation_alias="AWS_ENDPOINT_URL")
    aws_access_key_id: str | None = Field(default=None, validation_alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: str | None = Field(default=None, validation_alias="AWS_SECRET_ACCESS_KEY")
    aws_region: str | None = Field(default=None, validation_alias="AWS_DEFAULT_REGION")

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for the storage root (s3fs keywords for s3://, nothing locally)."""
        if not self.storage_root.startswith("s3://"):
            return {}
        options: dict[str, Any] = {}
        if self.aws_access_key_id:
            options["key"] = self.aws_access_key_id
        if self.aws_secret_access_key:
            options["secret"] = self.aws_secret_access_key
        client_kwargs: dict[str, Any] = {}
        if self.aws_endpoint_url:
            client_kwargs["endpoint_url"] = self.aws_endpoint_url
        if self.aws_region:
            client_kwargs["region_name"] = self.aws_region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return options


def _describe_validation_error(source: str, error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: {key}: unknown key"
    if kind == "missing":
        return f"{source}: {key}: required key is missing"
    message = first["msg"]
    for prefix in ("Value error, ", "Input should be "):
        if message.startswith(prefix):
            message = ("must be " if prefix == "Input should be " else "") + message[len(prefix):]
    got = first.get("input")
    shown = "" if isinstance(got, dict) or "got " in message else f" (got {got!r})"
    return f"{source}: {key}: {message}{shown}"


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    dotted, value_text = assignment.split("=", 1)
    path = [p for p in dotted.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        value = value_text
    node = raw
    for part in path[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"--set {assignment}: {'.'.join(path)}: unknown key")
        node = node[part]
    if path[-1] not in node:
        raise ConfigError(f"--set {assignment}: {'.'.join(path)}: unknown key")
    node[path[-1]] = value


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, smoke: bool = False
) -> MyceliumConfig:
    """Read, override and validate a config file; raise ConfigError with one line on any problem.

    With `smoke`, the file's `smoke` section is applied first, then `overrides` (so a user's
    --set still wins).
    """
    config_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = config_path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{config_path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot read config file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{config_path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: expected a mapping of sections at the top level")
    smoke_overrides = raw.get("smoke") or {}
    if smoke and not isinstance(smoke_overrides, dict):
        raise ConfigError(f"{config_path.name}: smoke: must be a mapping of dotted keys to values")
    assignments = [f"{key}={json.dumps(value)}" for key, value in smoke_overrides.items()] if smoke else []
    for assignment in assignments + list(overrides or []):
        _apply_override(raw, assignment)
    try:
        return MyceliumConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(config_path.name, exc)) from None
