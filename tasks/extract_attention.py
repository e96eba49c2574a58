"""Stage 00: per-token attention signals of the teacher, reduced while the teacher runs.

Reads:  normalised problems (a polars DataFrame with columns problem_id, problem, solution,
        ...; only those three are used) and the `teacher` and `extraction` config sections.
Writes: two tables per chunk of problems.
        `tokens`   one row per (problem, head, text token): problem_id, head ("L15H6"),
                   token_index, token_text, char_start, char_end (offsets inside the text),
                   iaf, problem_attn, context_attn, sink_attn, jsd (null for the first token),
                   focus_start/focus_end/focus_attn (the problem token this row attends to most:
                   its char span in the problem text and its weight; stage 03 uses it).
        `problems` one row per problem: problem_id, mode, text (gold solution or generated
                   text), n_prompt_tokens, n_problem_tokens, n_text_tokens, seconds,
                   skipped_reason (null when extracted).
        `rank_heads` writes a third, small table when `computing_heads: auto`: every
        (layer, head) with its retrieval score and mean IAF, ranked.
Time:   embedded SmolLM2-135M on 2 CPU cores: loading ~1 s (the first use on a machine also
        converts the GGUF, ~15 s). Teacher-forced GSM8K: ~0.2 s per problem, a chunk of 50 in
        ~11 s, within a few percent of a plain forward pass (bench/extraction_overhead.py).
        Generate: ~28 tokens/s, 4-8 s per GSM8K problem, up to ~40 s when a problem runs to
        max_new_tokens 1024. Ranking all 270 heads on 8 calibration problems: ~2.5 s.
You should see: a tqdm bar per chunk with tokens/s and the skipped count. On GSM8K gold
        solutions the auto-picked heads have mean IAF 0.4-0.8 (problem-reading heads such as
        L7H7 ~0.78) against ~0.3 over all heads; IAF drops on arithmetic tokens such as
        "<<48/2=24>>" and rises where the solution restates the problem; JSD is null for the
        first text token of each problem and head.

How: the teacher is loaded with attn_implementation="mycelium_signals", an attention function
registered with transformers that returns sdpa's output unchanged and, only in layers that
hold a selected head and only while a collector is active in this thread, recomputes the
softmax rows of the selected heads (float32) and reduces them at once to a handful of numbers
per (head, token). Full attention tensors are never kept, so memory does not grow with the
number of problems, and the teacher's own output (logits, generated text) is exactly sdpa's.

Memory: selected rows are recomputed in blocks of at most `extraction.max_memory_mb` (float32
heads × rows × keys), reduced at once and dropped; a warning is logged if one problem's kept
signals ever exceed the same figure. Only one problem is in flight per call (batch 1).

Token roles in the prompt + text sequence (from the tokenizer's offset mapping):
  sink      the first `extraction.sink_tokens` positions (attention sinks, StreamingLLM);
  problem   prompt tokens that overlap the problem text;
  template  every other prompt token (chat-template markup, the system prompt);
  text      the solution (teacher_forced) or the generated tokens (generate).
A text token's row is its own query row: attention from its position over positions <= it,
i.e. the row the teacher had while producing the *next* token. Signals per text token t, head h:
  problem_attn  attention mass on problem tokens;
  context_attn  problem_attn + mass on text tokens <= t (the IAF denominator);
  sink_attn     mass on sink tokens;
  iaf           problem_attn / context_attn: sinks and template tokens count in neither;
  jsd           Jensen-Shannon divergence (base 2, in [0, 1]) between the rows of t and t-1
                over positions <= t-1, both renormalised there; null for the first text token.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
from prefect import get_run_logger, task
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mycelium.config import HEAD_PATTERN, ExtractionConfig, TeacherConfig
from mycelium.errors import ConfigError, MyceliumError
from mycelium.reports import ReportSection
from mycelium.store import ArtifactRef, ArtifactStore, artifact_digest, source_code_version
from mycelium.teacher import Teacher, build_prompt, load_teacher

logger = logging.getLogger(__name__)

SIGNAL_ATTENTION = "mycelium_signals"

# Guards divisions by attention mass that softmax makes positive but float32 can round to 0.
MASS_EPSILON = 1e-12
# float32 bytes, to size the transient row blocks against extraction.max_memory_mb.
ROW_BYTES_PER_VALUE = 4
BYTES_PER_MB = 1 << 20

ROLE_SINK, ROLE_PROBLEM, ROLE_TEMPLATE, ROLE_TEXT = 0, 1, 2, 3
N_ROLES = 4
LN_2 = float(np.log(2.0))  # nats → bits

MODES = ("teacher_forced", "generate")

TOKENS_SCHEMA = {
    "problem_id": pl.Utf8,
    "head": pl.Utf8,
    "token_index": pl.Int32,
    "token_text": pl.Utf8,
    "char_start": pl.Int32,
    "char_end": pl.Int32,
    "iaf": pl.Float32,
    "problem_attn": pl.Float32,
    "context_attn": pl.Float32,
    "sink_attn": pl.Float32,
    "jsd": pl.Float32,
    "focus_start": pl.Int32,
    "focus_end": pl.Int32,
    "focus_attn": pl.Float32,
}
PROBLEMS_SCHEMA = {
    "problem_id": pl.Utf8,
    "mode": pl.Utf8,
    "text": pl.Utf8,
    "n_prompt_tokens": pl.Int32,
    "n_problem_tokens": pl.Int32,
    "n_text_tokens": pl.Int32,
    "seconds": pl.Float64,
    "skipped_reason": pl.Utf8,
}
RANKING_SCHEMA = {
    "head": pl.Utf8,
    "layer": pl.Int32,
    "head_index": pl.Int32,
    "retrieval_score": pl.Float64,
    "mean_iaf": pl.Float64,
    "rank": pl.Int32,
}
SIGNAL_NAMES = ("iaf", "problem_attn", "context_attn", "sink_attn", "jsd")
# Per text token and head, the problem token the row attends to most: its char span inside
# the problem text and its attention weight. Stage 03 reads it to tell apart several
# occurrences of one number in a problem (which one the teacher looked at while writing it).
FOCUS_NAMES = ("focus_start", "focus_end", "focus_attn")


# --- Heads ---------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class HeadRef:
    layer: int
    head: int

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"


def parse_heads(spec: list[str], n_layers: int, n_heads: int) -> list[HeadRef]:
    """`["L22H4", ...]` → HeadRefs checked against the teacher's shape (duplicates dropped)."""
    heads: list[HeadRef] = []
    for name in spec:
        match = HEAD_PATTERN.match(name)
        if not match:
            raise ConfigError(f"extraction.computing_heads: {name!r} does not look like L22H4")
        head = HeadRef(int(match.group(1)), int(match.group(2)))
        if head.layer >= n_layers or head.head >= n_heads:
            raise ConfigError(
                f"extraction.computing_heads: {name} is outside the teacher "
                f"({n_layers} layers L0-L{n_layers - 1}, {n_heads} heads H0-H{n_heads - 1})"
            )
        if head not in heads:
            heads.append(head)
    return heads


def all_heads(n_layers: int, n_heads: int) -> list[HeadRef]:
    return [HeadRef(layer, head) for layer in range(n_layers) for head in range(n_heads)]


# --- Signal math (pure functions over attention rows) --------------------------------------


def role_matrix(roles: torch.Tensor) -> torch.Tensor:
    """(keys, N_ROLES) float32 one-hot of each key position's role; column = role code."""
    return torch.nn.functional.one_hot(roles.long(), N_ROLES).float()


def signals_from_role_sums(role_sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four row signals from (..., N_ROLES) attention mass per role (column = role code).

    Causality already zeroes keys after the query, so the text mass is "text tokens <= t".
    """
    problem_attn = role_sums[..., ROLE_PROBLEM]
    context_attn = problem_attn + role_sums[..., ROLE_TEXT]
    return {
        "iaf": problem_attn / context_attn.clamp_min(MASS_EPSILON),
        "problem_attn": problem_attn,
        "context_attn": context_attn,
        "sink_attn": role_sums[..., ROLE_SINK],
    }


def row_signals(rows: torch.Tensor, roles: torch.Tensor) -> dict[str, torch.Tensor]:
    """IAF and raw sums for attention rows (..., keys) given each key position's role code."""
    return signals_from_role_sums(rows @ role_matrix(roles.to(rows.device)))


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS divergence in bits (base 2, in [0, 1]) between distributions along the last dim.

    With s = p + q = 2m:  JSD = (Σ p ln p + Σ q ln q - Σ s ln s) / 2 + ln 2   (nats),
    so one xlogy over the three stacked rows does it: this runs at every decode step for
    every selected layer, and each separate kernel there costs time.
    """
    stacked = torch.stack([p, q, p + q])
    plogp = torch.special.xlogy(stacked, stacked).sum(-1)
    nats = 0.5 * (plogp[0] + plogp[1] - plogp[2]) + LN_2
    return (nats / LN_2).clamp(0.0, 1.0)


def consecutive_jsd(rows: torch.Tensor, first_position: int, previous_row: torch.Tensor | None) -> torch.Tensor:
    """JSD between each row and the row before it, over the previous row's context.

    rows: (heads, n, keys) for the consecutive query positions first_position, ..., + n - 1;
    previous_row: (heads, keys') the row of position first_position - 1, or None (→ NaN first).
    Each row is cut to the keys before its own position and renormalised there; the previous
    row is a softmax row over exactly those keys already, so it sums to 1 as it is.
    """
    heads, n, n_keys = rows.shape
    if n == 1 and first_position == n_keys - 1 and previous_row is not None:
        # A decode step: the row's own key is the last one and the previous row covers the rest.
        current, previous = rows[..., :-1], previous_row.unsqueeze(1)
    else:
        current = rows.clone()
        # Row j sits at key position first_position + j: drop that one key (later keys are 0).
        current.diagonal(offset=first_position, dim1=-2, dim2=-1).zero_()
        if previous_row is None:
            first = torch.zeros(heads, 1, n_keys, dtype=rows.dtype, device=rows.device)
        else:
            first = torch.nn.functional.pad(previous_row, (0, n_keys - previous_row.shape[-1])).unsqueeze(1)
        previous = first if n == 1 else torch.cat([first, rows[:, :-1]], dim=1)
    current = current / current.sum(-1, keepdim=True).clamp_min(MASS_EPSILON)
    jsd = jensen_shannon(current, previous)
    if previous_row is None:
        jsd[:, 0] = float("nan")
    return jsd


@dataclass(frozen=True)
class HeadSelection:
    """Which query heads to recompute and the kv head of each: slices (views, no kernel) when
    contiguous, else index tensors."""

    query: slice | torch.Tensor
    key: slice | torch.Tensor


@functools.lru_cache(maxsize=256)
def head_selection(head_indices: tuple[int, ...], kv_groups: int, device: torch.device) -> HeadSelection:
    # Cached: an index tensor built on a GPU for every layer and step would copy (and stall)
    # host to device each time; slices avoid the gather kernel altogether.
    first, last = head_indices[0], head_indices[-1]
    contiguous = list(head_indices) == list(range(first, last + 1))
    query = slice(first, last + 1) if contiguous else torch.tensor(head_indices, device=device)
    kv_heads = [h // kv_groups for h in head_indices]
    if len(set(kv_heads)) == 1:
        key = slice(kv_heads[0], kv_heads[0] + 1)
    elif kv_groups == 1 and contiguous:
        key = query
    else:
        key = torch.tensor(kv_heads, device=device)
    return HeadSelection(query, key)


def selected_head_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    heads: HeadSelection,
    rows: range,
) -> torch.Tensor:
    """Softmax rows (heads, len(rows), keys) in float32 of some query heads.

    query (1, H, q, d) and key (1, KV, k, d) as the attention function receives them (RoPE
    applied, cache already appended); `rows` indexes the q queries; `heads` says which query
    heads and which kv head each reads (GQA: kv head h // (H // KV)). Query i sits at key
    position k - q + i (a dynamic cache appends; without a cache k == q). sdpa without a mask
    is causal; a given mask (bool = keep, or additive float) is applied on top.
    """
    n_queries, n_keys = query.shape[2], key.shape[2]
    block = slice(rows.start, rows.stop)
    q = query[0, heads.query, block].float()
    k = key[0, heads.key].float()  # (1, keys, d) broadcasts when every head reads one kv head
    scores = (q @ k.transpose(-1, -2)) * scaling
    offset = n_keys - n_queries
    if offset + rows.start < n_keys - 1:  # some row must not see later keys (not a decode step)
        positions = torch.arange(offset + rows.start, offset + rows.stop, device=query.device)
        later = torch.arange(n_keys, device=query.device)[None, :] > positions[:, None]
        scores = scores.masked_fill(later, float("-inf"))
    if attention_mask is not None:
        mask = attention_mask[0, :, block, :n_keys]
        if mask.shape[0] > 1:
            mask = mask[heads.query]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    return torch.softmax(scores, dim=-1)


# --- The attention function and the per-thread collector ----------------------------------

_active = threading.local()


class RowConsumer:
    """What the attention function hands rows to. `heads_by_layer`: layer → query heads."""

    heads_by_layer: dict[int, list[int]]
    first_position: int  # rows before this key position are not needed
    block_budget_bytes: int  # largest transient (heads, rows, keys) block

    def consume(self, layer: int, rows: torch.Tensor, first_position: int) -> None:
        """rows: (heads, n, keys) softmax rows of key positions first_position .. + n - 1."""
        raise NotImplementedError


@contextmanager
def collecting(consumer: RowConsumer) -> Iterator[RowConsumer]:
    """Route this thread's selected-head rows to `consumer` for the duration of the block."""
    previous = getattr(_active, "consumer", None)
    _active.consumer = consumer
    try:
        yield consumer
    finally:
        _active.consumer = previous


def signal_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
):
    """sdpa's output, plus the selected heads' rows handed to this thread's consumer."""
    output = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    consumer = getattr(_active, "consumer", None)
    if consumer is None:
        return output
    head_indices = consumer.heads_by_layer.get(module.layer_idx)
    if not head_indices:
        return output
    if query.shape[0] != 1:
        raise MyceliumError("signal extraction runs one problem at a time (batch size 1)")
    n_queries, n_keys = query.shape[2], key.shape[2]
    first_row = max(0, consumer.first_position - (n_keys - n_queries))
    if first_row >= n_queries:
        return output
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    heads = head_selection(tuple(head_indices), query.shape[1] // key.shape[1], query.device)
    # Bound the transient float32 block (heads × rows × keys) by extraction.max_memory_mb.
    row_bytes = len(head_indices) * n_keys * ROW_BYTES_PER_VALUE
    block = max(1, consumer.block_budget_bytes // row_bytes)
    for start in range(first_row, n_queries, block):
        rows = range(start, min(start + block, n_queries))
        probabilities = selected_head_rows(query, key, attention_mask, scale, heads, rows)
        consumer.consume(module.layer_idx, probabilities, n_keys - n_queries + start)
    return output


def register_signal_attention() -> None:
    """Make "mycelium_signals" a valid attn_implementation (idempotent).

    The mask function is sdpa's, so the model builds exactly the masks sdpa would get
    (None for one unpadded sequence: causal).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SIGNAL_ATTENTION, signal_attention_forward)
    AttentionMaskInterface.register(SIGNAL_ATTENTION, sdpa_mask)


def load_signal_teacher(teacher_cfg: TeacherConfig, cache_dir: str | os.PathLike) -> Teacher:
    """The teacher with the signal attention function in place (sdpa when nothing collects)."""
    register_signal_attention()
    return load_teacher(teacher_cfg, cache_dir, attn_implementation=SIGNAL_ATTENTION)


@dataclass
class SignalCollector(RowConsumer):
    """Reduces each selected head's rows to signals as they arrive; keeps only those vectors.

    prompt_roles: role code per prompt position; every position after the prompt is text.
    track_argmax: also keep each row's argmax key position (for the retrieval score), from the
    last prompt position on (that row predicts the first text token).
    Per (layer, row) it keeps the attention mass per role (N_ROLES floats) and the JSD; the
    IAF and sums are formed from those at the end.
    """

    heads: list[HeadRef]
    prompt_roles: torch.Tensor
    block_budget_bytes: int
    track_argmax: bool = False
    heads_by_layer: dict[int, list[int]] = field(init=False)
    first_position: int = field(init=False)
    _role_sums: dict[int, list[torch.Tensor]] = field(init=False, default_factory=dict)
    _jsd: dict[int, list[torch.Tensor]] = field(init=False, default_factory=dict)
    _argmax: dict[int, list[torch.Tensor]] = field(init=False, default_factory=dict)
    _focus: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(init=False, default_factory=dict)
    _previous: dict[int, tuple[int, torch.Tensor]] = field(init=False, default_factory=dict)
    _roles: torch.Tensor | None = field(init=False, default=None)
    _problem_mask: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.heads_by_layer = {}
        for head in sorted(self.heads):  # sorted, so a layer's heads are a slice when contiguous
            self.heads_by_layer.setdefault(head.layer, []).append(head.head)
        self.n_prompt = int(self.prompt_roles.shape[0])
        self.first_position = self.n_prompt - 1 if self.track_argmax else self.n_prompt

    def _role_matrix(self, n_keys: int, device: torch.device) -> torch.Tensor:
        # Built for twice the length needed and sliced: decode steps grow the keys by one each,
        # and a slice costs nothing where a rebuild per step would cost several kernels.
        if self._roles is None or self._roles.shape[0] < n_keys:
            length = max(2 * n_keys, self.n_prompt)
            roles = torch.full((length,), ROLE_TEXT, dtype=torch.int64)
            roles[: self.n_prompt] = self.prompt_roles
            self._roles = role_matrix(roles.to(device))
        return self._roles[:n_keys]

    def consume(self, layer: int, rows: torch.Tensor, first_position: int) -> None:
        # Positions are plain ints from the shapes, so nothing here waits for the device.
        if self.track_argmax:
            self._argmax.setdefault(layer, []).append(rows.argmax(-1))
        skip = max(0, self.n_prompt - first_position)
        if skip >= rows.shape[1]:
            return
        if skip:
            rows, first_position = rows[:, skip:], first_position + skip
        n_rows = rows.shape[1]
        self._role_sums.setdefault(layer, []).append(rows @ self._role_matrix(rows.shape[-1], rows.device))
        self._focus.setdefault(layer, []).append(self._problem_focus(rows))
        previous = self._previous.get(layer)
        previous_row = previous[1] if previous is not None and previous[0] == first_position - 1 else None
        self._jsd.setdefault(layer, []).append(consecutive_jsd(rows, first_position, previous_row))
        # A copy when several rows came: a view would keep the whole block alive.
        last = rows[:, -1] if n_rows == 1 else rows[:, -1].clone()
        self._previous[layer] = (first_position + n_rows - 1, last)

    def _problem_focus(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, prompt position) of the most-attended problem token of each row."""
        if self._problem_mask is None or self._problem_mask.device != rows.device:
            self._problem_mask = (self.prompt_roles == ROLE_PROBLEM).to(rows.device)
        weights, positions = rows[..., : self.n_prompt].masked_fill(~self._problem_mask, -1.0).max(-1)
        return weights, positions

    def focus(self) -> dict[HeadRef, tuple[np.ndarray, np.ndarray]]:
        """head → (weight, prompt position) arrays of the most-attended problem token per row."""
        result = {}
        for layer, head_indices in self.heads_by_layer.items():
            if layer in self._focus:
                weights = torch.cat([w for w, _ in self._focus[layer]], dim=1).float().cpu().numpy()
                positions = torch.cat([p for _, p in self._focus[layer]], dim=1).cpu().numpy()
            else:
                weights = np.zeros((len(head_indices), 0), np.float32)
                positions = np.zeros((len(head_indices), 0), np.int64)
            for i, head in enumerate(head_indices):
                result[HeadRef(layer, head)] = (weights[i], positions[i])
        return result

    def signals(self) -> dict[HeadRef, dict[str, np.ndarray]]:
        """head → signal name → (n_text,) float32 array."""
        result: dict[HeadRef, dict[str, np.ndarray]] = {}
        for layer, head_indices in self.heads_by_layer.items():
            if layer in self._role_sums:
                values = signals_from_role_sums(torch.cat(self._role_sums[layer], dim=1))
                values["jsd"] = torch.cat(self._jsd[layer], dim=1)
                values = {name: tensor.float().cpu().numpy() for name, tensor in values.items()}
            else:
                values = {name: np.zeros((len(head_indices), 0), np.float32) for name in SIGNAL_NAMES}
            for i, head in enumerate(head_indices):
                result[HeadRef(layer, head)] = {name: values[name][i] for name in SIGNAL_NAMES}
        return result

    def kept_bytes(self) -> int:
        kept = [*self._role_sums.values(), *self._jsd.values(), *self._argmax.values()]
        kept += [[t for pair in pairs for t in pair] for pairs in self._focus.values()]
        return sum(t.numel() * t.element_size() for tensors in kept for t in tensors)

    def argmax_positions(self) -> dict[HeadRef, np.ndarray]:
        """head → argmax key position of each row from the last prompt position on."""
        result = {}
        for layer, head_indices in self.heads_by_layer.items():
            stacked = torch.cat(self._argmax[layer], dim=1).cpu().numpy()
            for i, head in enumerate(head_indices):
                result[HeadRef(layer, head)] = stacked[i]
        return result


# --- Tokens and their roles ----------------------------------------------------------------


def prompt_token_roles(offsets: list[tuple[int, int]], problem_span: tuple[int, int], sink_tokens: int) -> np.ndarray:
    """Role code per prompt token: sink first, then problem (overlaps the span), else template."""
    start, end = problem_span
    roles = np.full(len(offsets), ROLE_TEMPLATE, dtype=np.int8)
    for i, (token_start, token_end) in enumerate(offsets):
        if i < sink_tokens:
            roles[i] = ROLE_SINK
        elif token_end > token_start and token_start < end and token_end > start:
            roles[i] = ROLE_PROBLEM
    return roles


def spans_from_offsets(offsets: list[tuple[int, int]], text_length: int) -> list[tuple[int, int]]:
    """Char spans that tile the text, one per token, from the tokenizer's offsets.

    Byte-level BPE can give several tokens the same offsets (one multi-byte character split
    in pieces); the character goes to the last of them, the others get an empty span, so
    the token texts always concatenate back to the text.
    """
    starts, boundary = [], 0
    for token_start, _ in offsets:
        boundary = max(boundary, min(token_start, text_length))
        starts.append(boundary)
    if starts:
        starts[0] = 0
    ends = starts[1:] + [text_length]
    return list(zip(starts, ends, strict=True))


def spans_from_decoding(tokenizer: Any, token_ids: list[int], text: str) -> list[tuple[int, int]]:
    """Char spans of generated tokens inside `text` (their decoding), by decoding prefixes.

    A prefix that ends inside a multi-byte character decodes to a replacement character, so
    each boundary is the longest prefix of `text` the decoded prefix agrees with.
    """
    boundaries = [0]
    for n in range(1, len(token_ids)):
        prefix = tokenizer.decode(token_ids[:n], skip_special_tokens=False)
        agree = 0
        limit = min(len(prefix), len(text))
        while agree < limit and prefix[agree] == text[agree]:
            agree += 1
        boundaries.append(max(boundaries[-1], agree))
    boundaries.append(len(text))
    return list(zip(boundaries[:-1], boundaries[1:], strict=True))


@dataclass
class PreparedProblem:
    problem_id: str
    prompt_ids: list[int]
    prompt_roles: np.ndarray
    text: str | None  # gold solution in teacher_forced mode
    text_ids: list[int] | None
    text_spans: list[tuple[int, int]] | None
    # (n_prompt, 2) char span of each prompt token inside the problem text, clipped to it
    # (meaningful only where prompt_roles is ROLE_PROBLEM).
    problem_char_spans: np.ndarray | None = None


def problem_char_spans(offsets: list[tuple[int, int]], problem_span: tuple[int, int]) -> np.ndarray:
    start, end = problem_span
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return (spans.clip(start, end) - start).astype(np.int32)


def prepare_problem(
    teacher: Teacher, problem_row: dict, cfg: ExtractionConfig, teacher_cfg: TeacherConfig, mode: str
) -> tuple[PreparedProblem, str | None]:
    """Tokenise prompt (and gold text in teacher_forced mode); second value = why to skip."""
    tokenizer = teacher.tokenizer
    prompt = build_prompt(tokenizer, str(problem_row["problem"]), teacher_cfg.use_chat_template)
    encoded = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens, return_offsets_mapping=True)
    roles = prompt_token_roles(encoded["offset_mapping"], (prompt.problem_start, prompt.problem_end), cfg.sink_tokens)
    prepared = PreparedProblem(
        str(problem_row["problem_id"]),
        list(encoded["input_ids"]),
        roles,
        None,
        None,
        None,
        problem_char_spans(encoded["offset_mapping"], (prompt.problem_start, prompt.problem_end)),
    )
    if len(prepared.prompt_ids) > cfg.max_prompt_tokens:
        return (
            prepared,
            f"prompt has {len(prepared.prompt_ids)} tokens > extraction.max_prompt_tokens {cfg.max_prompt_tokens}",
        )
    if mode == "teacher_forced":
        solution = problem_row.get("solution")
        if not solution:
            return prepared, "no gold solution for teacher_forced mode"
        text_encoded = tokenizer(solution, add_special_tokens=False, return_offsets_mapping=True)
        prepared.text = solution
        prepared.text_ids = list(text_encoded["input_ids"])
        prepared.text_spans = spans_from_offsets(text_encoded["offset_mapping"], len(solution))
        total = len(prepared.prompt_ids) + len(prepared.text_ids)
        limit = getattr(teacher.model.config, "max_position_embeddings", None)
        if limit is not None and total > limit:
            return prepared, f"prompt + solution has {total} tokens > the teacher's context {limit}"
    return prepared, None


def _eos_ids(teacher: Teacher) -> set[int]:
    eos = teacher.model.generation_config.eos_token_id
    if eos is None:
        eos = getattr(teacher.tokenizer, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def run_teacher(
    teacher: Teacher, prepared: PreparedProblem, collector: SignalCollector, mode: str, teacher_cfg: TeacherConfig
) -> list[int]:
    """One pass of the teacher with `collector` active; returns the text token ids."""
    model, device = teacher.model, teacher.device
    prompt = torch.tensor([prepared.prompt_ids], device=device)
    with torch.inference_mode(), collecting(collector):
        if mode == "teacher_forced":
            ids = torch.tensor([prepared.prompt_ids + prepared.text_ids], device=device)
            # logits_to_keep=1: the signals need no logits, so skip most of the LM head.
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            return prepared.text_ids
        eos_ids = _eos_ids(teacher)
        pad_id = model.generation_config.pad_token_id
        # A fresh greedy config rather than the model's own, whose sampling settings (e.g.
        # Qwen's temperature/top_p) would only be ignored with warnings (temperature 0 = greedy).
        greedy = GenerationConfig(
            do_sample=False,
            max_new_tokens=teacher_cfg.max_new_tokens,
            eos_token_id=sorted(eos_ids) or None,
            pad_token_id=pad_id if pad_id is not None else min(eos_ids, default=None),
            return_dict_in_generate=True,  # for the cache: see the last token's row below
        )
        output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy)
        generated = output.sequences[0, prompt.shape[1] :].tolist()
        if generated and generated[-1] in eos_ids:
            # The end-of-turn token is not text; every text token before it was fed back, so has its row.
            return generated[:-1]
        if generated:
            # Stopped at max_new_tokens: the last token was never fed back. One more decode
            # step over the cache gives its row (the logits are discarded).
            last = torch.tensor([[generated[-1]]], device=device)
            model(input_ids=last, past_key_values=output.past_key_values, use_cache=True, logits_to_keep=1)
        return generated


# --- Extraction ----------------------------------------------------------------------------


def _block_budget(cfg: ExtractionConfig) -> int:
    return cfg.max_memory_mb * BYTES_PER_MB


def _problem_record(problem_id: str, mode: str, text, n_prompt, n_problem, n_text, seconds, reason) -> dict:
    return {
        "problem_id": problem_id,
        "mode": mode,
        "text": text,
        "n_prompt_tokens": n_prompt,
        "n_problem_tokens": n_problem,
        "n_text_tokens": n_text,
        "seconds": seconds,
        "skipped_reason": reason,
    }


def extract_problem(
    teacher: Teacher, problem_row: dict, heads: list[HeadRef], cfg: ExtractionConfig, teacher_cfg: TeacherConfig
) -> tuple[pl.DataFrame, dict]:
    """Signals of one problem: (tokens rows as a DataFrame, the problem's record)."""
    mode = cfg.mode
    started = time.perf_counter()
    prepared, skip = prepare_problem(teacher, problem_row, cfg, teacher_cfg, mode)
    n_prompt = len(prepared.prompt_ids)
    n_problem = int((prepared.prompt_roles == ROLE_PROBLEM).sum())
    if skip is not None:
        return empty_tokens(), _problem_record(prepared.problem_id, mode, None, n_prompt, n_problem, None, 0.0, skip)
    collector = SignalCollector(heads, torch.from_numpy(prepared.prompt_roles), _block_budget(cfg))
    text_ids = run_teacher(teacher, prepared, collector, mode, teacher_cfg)
    if mode == "generate":
        text = teacher.tokenizer.decode(text_ids, skip_special_tokens=False)
        spans = spans_from_decoding(teacher.tokenizer, text_ids, text)
    else:
        text, spans = prepared.text, prepared.text_spans
    signals = collector.signals()
    if collector.kept_bytes() > _block_budget(cfg):
        logger.warning(
            "problem %s: signal buffers hold %.0f MB > extraction.max_memory_mb",
            prepared.problem_id,
            collector.kept_bytes() / BYTES_PER_MB,
        )
    seconds = time.perf_counter() - started
    record = _problem_record(prepared.problem_id, mode, text, n_prompt, n_problem, len(text_ids), seconds, None)
    if not text_ids:
        record["skipped_reason"] = "the teacher wrote no text"
        return empty_tokens(), record
    focus = focus_columns(collector.focus(), prepared.problem_char_spans)
    return tokens_frame(prepared.problem_id, heads, signals, text, spans, focus), record


def focus_columns(
    focus: dict[HeadRef, tuple[np.ndarray, np.ndarray]], char_spans: np.ndarray
) -> dict[HeadRef, dict[str, np.ndarray]]:
    """head → focus_start/focus_end (chars in the problem) and focus_attn per text token."""
    result = {}
    for head, (weights, positions) in focus.items():
        spans = char_spans[positions] if len(positions) else np.zeros((0, 2), np.int32)
        result[head] = {"focus_start": spans[:, 0], "focus_end": spans[:, 1], "focus_attn": weights.astype(np.float32)}
    return result


def tokens_frame(
    problem_id: str,
    heads: list[HeadRef],
    signals: dict,
    text: str,
    spans: list[tuple[int, int]],
    focus: dict[HeadRef, dict[str, np.ndarray]] | None = None,
) -> pl.DataFrame:
    """Rows of one problem; focus columns are null when `focus` is None."""
    n = len(spans)
    starts = np.array([s for s, _ in spans], dtype=np.int32)
    ends = np.array([e for _, e in spans], dtype=np.int32)
    token_texts = [text[s:e] for s, e in spans]
    parts = []
    for head in heads:
        head_signals = signals[head]
        if len(head_signals["iaf"]) != n:
            raise MyceliumError(
                f"problem {problem_id}: {head.name} has {len(head_signals['iaf'])} rows for {n} text tokens"
            )
        columns = {
            "problem_id": [problem_id] * n,
            "head": [head.name] * n,
            "token_index": np.arange(n, dtype=np.int32),
            "token_text": token_texts,
            "char_start": starts,
            "char_end": ends,
            **{name: head_signals[name] for name in SIGNAL_NAMES},
            **(focus[head] if focus is not None else {name: [None] * n for name in FOCUS_NAMES}),
        }
        parts.append(pl.DataFrame(columns, schema=TOKENS_SCHEMA).with_columns(pl.col("jsd").fill_nan(None)))
    return pl.concat(parts) if parts else empty_tokens()


def empty_tokens() -> pl.DataFrame:
    return pl.DataFrame(schema=TOKENS_SCHEMA)


def extract_chunk(
    teacher: Teacher,
    problems: pl.DataFrame,
    heads: list[HeadRef],
    cfg: ExtractionConfig,
    teacher_cfg: TeacherConfig,
    progress: bool = True,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Signals of every problem in `problems`, one at a time: (tokens, problems) tables."""
    token_parts, records = [], []
    bar = tqdm(total=problems.height, desc=f"extract {cfg.mode}", unit="problem", disable=not progress)
    n_tokens, seconds = 0, 0.0
    for row in problems.iter_rows(named=True):
        tokens, record = extract_problem(teacher, row, heads, cfg, teacher_cfg)
        token_parts.append(tokens)
        records.append(record)
        if record["skipped_reason"] is None:
            n_tokens += record["n_text_tokens"]
            seconds += record["seconds"]
        bar.update(1)
        bar.set_postfix(
            tok_s=f"{n_tokens / seconds:.0f}" if seconds else "-",
            skipped=sum(r["skipped_reason"] is not None for r in records),
        )
    bar.close()
    tokens_df = pl.concat(token_parts) if token_parts else empty_tokens()
    problems_df = pl.DataFrame(records, schema=PROBLEMS_SCHEMA) if records else pl.DataFrame(schema=PROBLEMS_SCHEMA)
    return tokens_df, problems_df


# --- Choosing heads ------------------------------------------------------------------------


def rank_heads(
    teacher: Teacher, problems: pl.DataFrame, cfg: ExtractionConfig, teacher_cfg: TeacherConfig, progress: bool = True
) -> pl.DataFrame:
    """Score every (layer, head) on the first `calibration_problems` usable problems.

    retrieval_score (after Wu et al., "Retrieval Head Mechanistically Explains Long-Context
    Factuality", ICLR 2025): over all text tokens t whose token id also occurs among the
    problem tokens (tokens the teacher could copy from the problem), the fraction for which
    the head's highest-attention key, in the row of the position that predicts t (position
    t-1; for the first text token the last prompt token), is a problem token with t's id.
    mean_iaf: IAF averaged over all text tokens of all calibration problems.
    Ranked by retrieval_score, then mean_iaf (both descending); rank 1 is best.
    Uses extraction.mode (teacher_forced: gold solutions; generate: the teacher's text).
    """
    heads = all_heads(teacher.n_layers, teacher.n_heads)
    hits = dict.fromkeys(heads, 0)
    copyable_total = 0
    iaf_sum = dict.fromkeys(heads, 0.0)
    n_text_total = 0
    used = 0
    bar = tqdm(total=cfg.calibration_problems, desc="rank heads", unit="problem", disable=not progress)
    for row in problems.iter_rows(named=True):
        if used >= cfg.calibration_problems:
            break
        prepared, skip = prepare_problem(teacher, row, cfg, teacher_cfg, cfg.mode)
        if skip is not None:
            continue
        collector = SignalCollector(
            heads, torch.from_numpy(prepared.prompt_roles), _block_budget(cfg), track_argmax=True
        )
        text_ids = run_teacher(teacher, prepared, collector, cfg.mode, teacher_cfg)
        if not text_ids:
            continue
        sequence = np.array(prepared.prompt_ids + text_ids)
        n_prompt = len(prepared.prompt_ids)
        problem_positions = prepared.prompt_roles == ROLE_PROBLEM
        problem_ids = set(sequence[:n_prompt][problem_positions].tolist())
        targets = sequence[n_prompt:]
        copyable = np.array([t in problem_ids for t in targets.tolist()])
        copyable_total += int(copyable.sum())
        is_problem = np.zeros(len(sequence), dtype=bool)
        is_problem[:n_prompt] = problem_positions
        for head, argmax in collector.argmax_positions().items():
            # Row i is position n_prompt - 1 + i, which predicts text token i.
            argmax = argmax[: len(targets)]
            hit = copyable & is_problem[argmax] & (sequence[argmax] == targets)
            hits[head] += int(hit.sum())
        for head, signals in collector.signals().items():
            iaf_sum[head] += float(signals["iaf"].astype(np.float64).sum())
        n_text_total += len(text_ids)
        used += 1
        bar.update(1)
    bar.close()
    if used == 0:
        raise MyceliumError(
            "rank_heads: no usable calibration problem (all skipped); set extraction.computing_heads explicitly"
        )
    ranking = pl.DataFrame(
        {
            "head": [h.name for h in heads],
            "layer": [h.layer for h in heads],
            "head_index": [h.head for h in heads],
            "retrieval_score": [hits[h] / copyable_total if copyable_total else 0.0 for h in heads],
            "mean_iaf": [iaf_sum[h] / n_text_total for h in heads],
        }
    ).sort(["retrieval_score", "mean_iaf"], descending=True)
    return (
        ranking.with_columns(pl.int_range(1, ranking.height + 1).alias("rank"))
        .cast(RANKING_SCHEMA)
        .select(list(RANKING_SCHEMA))
    )


def choose_heads(
    teacher: Teacher, problems: pl.DataFrame, cfg: ExtractionConfig, teacher_cfg: TeacherConfig, progress: bool = True
) -> tuple[list[HeadRef], pl.DataFrame | None]:
    """The heads to extract: the configured list, or the top `auto_top_k` of rank_heads.

    Returns (heads, ranking table or None when the heads were named in config).
    """
    if cfg.computing_heads == "auto":
        ranking = rank_heads(teacher, problems, cfg, teacher_cfg, progress=progress)
        names = ranking.filter(pl.col("rank") <= cfg.auto_top_k)["head"].to_list()
        return parse_heads(names, teacher.n_layers, teacher.n_heads), ranking
    return parse_heads(list(cfg.computing_heads), teacher.n_layers, teacher.n_heads), None


# ---- Prefect wiring -----------------------------------------------------------------------
# Thin: artifact keys, one teacher per process, the head-selection task, the per-chunk task,
# the commit that checks every problem landed exactly once, and the report section.

STEP_HEADS = "heads"
STEP_TRACES = "traces"
# Settings that change how fast or where the work runs, never what it produces: kept out
# of artifact keys so moving to a GPU or more workers reuses finished artifacts.
TEACHER_RUNTIME_KEYS = ("device", "torch_threads")
EXTRACTION_RUNTIME_KEYS = ("max_workers", "dask_address", "max_memory_mb")
HEADS_KEYS = ("mode", "computing_heads", "auto_top_k", "calibration_problems", "sink_tokens", "max_prompt_tokens")

_teacher_lock = threading.Lock()
_teachers: dict[TeacherConfig, Teacher] = {}


def _teacher_payload(teacher_cfg: TeacherConfig) -> dict:
    return {k: v for k, v in teacher_cfg.digest_payload().items() if k not in TEACHER_RUNTIME_KEYS}


def _code_version() -> str:
    from mycelium import teacher as teacher_module

    return source_code_version(sys.modules[__name__], teacher_module)


def heads_ref(store: ArtifactStore, teacher_cfg: TeacherConfig, cfg: ExtractionConfig, problems: ArtifactRef) -> ArtifactRef:
    payload = {"teacher": _teacher_payload(teacher_cfg), "extraction": {k: cfg.digest_payload()[k] for k in HEADS_KEYS}}
    return store.ref(STEP_HEADS, artifact_digest(STEP_HEADS, payload, [problems], _code_version()))


def traces_ref(
    store: ArtifactStore, teacher_cfg: TeacherConfig, cfg: ExtractionConfig, problems: ArtifactRef, heads: ArtifactRef
) -> ArtifactRef:
    extraction = {k: v for k, v in cfg.digest_payload().items() if k not in EXTRACTION_RUNTIME_KEYS}
    payload = {"teacher": _teacher_payload(teacher_cfg), "extraction": extraction}
    return store.ref(STEP_TRACES, artifact_digest(STEP_TRACES, payload, [problems, heads], _code_version()))


def shared_teacher(teacher_cfg: TeacherConfig) -> Teacher:
    """One loaded teacher per process, shared by the chunk tasks its threads run."""
    from mycelium.config import Settings

    with _teacher_lock:
        if teacher_cfg not in _teachers:
            _teachers[teacher_cfg] = load_signal_teacher(teacher_cfg, Settings().cache_dir)
        return _teachers[teacher_cfg]


def selected_heads(store: ArtifactStore, heads: ArtifactRef) -> list[HeadRef]:
    table = store.read(heads, "selected")
    return [HeadRef(layer, head) for layer, head in table.select("layer", "head_index").iter_rows()]


def build_heads(ref: ArtifactRef, problems: ArtifactRef, teacher_cfg: TeacherConfig, cfg: ExtractionConfig) -> list[str]:
    """Choose the heads (rank them when `computing_heads: auto`) and store the choice."""
    store = ArtifactStore.for_ref(ref)
    teacher = shared_teacher(teacher_cfg)
    heads, ranking = choose_heads(teacher, store.read(problems, "problems"), cfg, teacher_cfg)
    selected = pl.DataFrame(
        {"head": [h.name for h in heads], "layer": [h.layer for h in heads], "head_index": [h.head for h in heads]},
        schema={"head": pl.Utf8, "layer": pl.Int32, "head_index": pl.Int32},
    )
    tables = {"selected": selected}
    if ranking is not None:
        tables["ranking"] = ranking
        store.write_file(ref, "head_ranking.png", plot_head_ranking(ranking, teacher.n_layers, teacher.n_heads, heads))
    store.write_table(ref, tables, metadata={"heads": selected["head"].to_list(), "auto": ranking is not None})
    return selected["head"].to_list()


def plot_head_ranking(ranking: pl.DataFrame, n_layers: int, n_heads: int, chosen: list[HeadRef]) -> bytes:
    """Two layer × head maps (retrieval score, mean IAF) with the chosen heads boxed."""
    import io

    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    figure = Figure(figsize=(10, 6), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for axis, column, title in zip(axes, ("retrieval_score", "mean_iaf"), ("retrieval score", "mean IAF")):
        grid = np.full((n_layers, n_heads), np.nan)
        for layer, head, value in ranking.select("layer", "head_index", column).iter_rows():
            grid[layer, head] = value
        image = axis.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        for h in chosen:
            axis.add_patch(Rectangle((h.head - 0.5, h.layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        axis.set_title(f"{title} per head (chosen heads boxed)")
        axis.set_xlabel("head")
        figure.colorbar(image, ax=axis, shrink=0.8)
    axes[0].set_ylabel("layer")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def chunk_done(store: ArtifactStore, ref: ArtifactRef, index: int) -> bool:
    # The problems part is written after the tokens part: both present means the chunk finished.
    # Checksums are verified: a corrupted part must be recomputed, never committed.
    return store.part_done(ref, "tokens", index, verify=True) and store.part_done(ref, "problems", index, verify=True)


def build_chunk(
    ref: ArtifactRef, problems: ArtifactRef, heads: ArtifactRef, index: int, teacher_cfg: TeacherConfig, cfg: ExtractionConfig
) -> dict:
    """Extract one chunk of problems into its two Parquet parts (skipped if already there)."""
    store = ArtifactStore.for_ref(ref)
    if chunk_done(store, ref, index):
        return {"chunk": index, "skipped": True}
    chunk = store.read(problems, "problems").slice(index * cfg.chunk_size, cfg.chunk_size)
    tokens, records = extract_chunk(shared_teacher(teacher_cfg), chunk, selected_heads(store, heads), cfg, teacher_cfg)
    store.write_part(ref, "tokens", index, tokens)
    store.write_part(ref, "problems", index, records)
    return {"chunk": index, "skipped": False, "problems": records.height, "token_rows": tokens.height}


def commit_traces(ref: ArtifactRef, problems: ArtifactRef, n_chunks: int) -> dict:
    """Write the manifest once every chunk is done and every problem appears exactly once."""
    store = ArtifactStore.for_ref(ref)
    missing = [i for i in range(n_chunks) if not chunk_done(store, ref, i)]
    if missing:
        raise MyceliumError(f"{ref.path}: chunks {missing[:5]} are unfinished; rerun to resume")
    records = pl.concat([store.read_part(ref, "problems", i) for i in range(n_chunks)])
    expected = store.read(problems, "problems")["problem_id"]
    if records.height != expected.len() or set(records["problem_id"]) != set(expected):
        raise MyceliumError(f"{ref.path}: {records.height} problem rows for {expected.len()} problems; delete it and rerun")
    extracted = records.filter(pl.col("skipped_reason").is_null())
    seconds = float(extracted["seconds"].sum())
    n_text_tokens = int(extracted["n_text_tokens"].sum())
    skipped = {r["skipped_reason"]: r["len"] for r in records.filter(pl.col("skipped_reason").is_not_null()).group_by("skipped_reason").len().iter_rows(named=True)}
    metadata = {
        "n_problems": records.height,
        "n_extracted": extracted.height,
        "skipped_by_reason": skipped,
        "n_text_tokens": n_text_tokens,
        "teacher_seconds": seconds,
        "tokens_per_second": n_text_tokens / seconds if seconds else None,
    }
    store.commit(ref, metadata)
    return metadata


@task(name="select-heads")
def select_heads_task(ref: ArtifactRef, problems: ArtifactRef, teacher_cfg: TeacherConfig, cfg: ExtractionConfig) -> ArtifactRef:
    get_run_logger().info("heads: %s", ", ".join(build_heads(ref, problems, teacher_cfg, cfg)))
    return ref


@task(name="extract-chunk")
def extract_chunk_task(
    ref: ArtifactRef, problems: ArtifactRef, heads: ArtifactRef, index: int, teacher_cfg: TeacherConfig, cfg: ExtractionConfig
) -> ArtifactRef:
    build_chunk(ref, problems, heads, index, teacher_cfg, cfg)
    return ref


@task(name="commit-traces")
def commit_traces_task(ref: ArtifactRef, problems: ArtifactRef, n_chunks: int) -> ArtifactRef:
    metadata = commit_traces(ref, problems, n_chunks)
    get_run_logger().info("traces: %d problems, %d text tokens", metadata["n_extracted"], metadata["n_text_tokens"])
    return ref


def report_section(store: ArtifactStore, heads: ArtifactRef, traces: ArtifactRef) -> ReportSection:
    from mycelium.stats import mean_interval

    meta = store.verify(traces).metadata
    heads_manifest = store.verify(heads)
    tokens = store.read(traces, "tokens")
    per_problem = tokens.group_by("problem_id", "head").agg(pl.col("iaf").mean().alias("iaf"), pl.col("sink_attn").mean().alias("sink"))
    lines = [
        "## Stage 00 — attention extraction",
        "",
        f"{meta['n_extracted']} of {meta['n_problems']} problems extracted, {meta['n_text_tokens']} text tokens, "
        f"{meta['tokens_per_second'] or 0:.0f} tokens/s of teacher time"
        + (f"; skipped: {meta['skipped_by_reason']}" if meta["skipped_by_reason"] else "") + ".",
        "",
        "Heads " + ("ranked by retrieval score on the calibration problems (auto)" if heads_manifest.metadata.get("auto") else "named in config")
        + ". Mean IAF and sink share per head: mean of per-problem means, 95% interval over problems.",
        "",
        "| head | mean IAF | 95% CI | sink share | problems |",
        "|---|---|---|---|---|",
    ]
    summary = {"n_extracted": meta["n_extracted"], "n_text_tokens": meta["n_text_tokens"], "tokens_per_second": meta["tokens_per_second"],
               "heads": heads_manifest.metadata.get("heads")}
    for head in heads_manifest.metadata.get("heads", []):
        rows = per_problem.filter(pl.col("head") == head)
        iaf = mean_interval(rows["iaf"].to_numpy())
        sink = float(rows["sink"].mean()) if rows.height else float("nan")
        lines.append(f"| {head} | {iaf.mean:.3f} | [{iaf.low:.3f}, {iaf.high:.3f}] | {sink:.3f} | {iaf.n} |")
        summary[f"iaf_{head}_mean"], summary[f"iaf_{head}_low"], summary[f"iaf_{head}_high"], summary[f"iaf_{head}_n"] = iaf.mean, iaf.low, iaf.high, iaf.n
    figures = {}
    if "head_ranking.png" in heads_manifest.files:
        figures["head_ranking.png"] = store.read_file(heads, "head_ranking.png")
        lines += ["", "![head ranking](head_ranking.png)"]
    return ReportSection(summary, "\n".join(lines) + "\n", figures)
