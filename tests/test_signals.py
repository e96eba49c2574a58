"""Stage 00 signals: hand-computed math, the attention hook against eager attention, and
extraction on real GSM8K-style problems with the real embedded teacher (no mocks).

Reads: the embedded teacher (converted into MYCELIUM_CACHE_DIR or a temporary cache).
Time: ~8 s on 2 cores when the teacher is already converted (MYCELIUM_CACHE_DIR), ~16 s
more when this session has to convert it first.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import polars as pl
import pytest
import torch

from mycelium.errors import MyceliumError
from tasks.extract_attention import (
    PROBLEMS_SCHEMA,
    RANKING_SCHEMA,
    ROLE_PROBLEM,
    ROLE_SINK,
    ROLE_TEMPLATE,
    ROLE_TEXT,
    TOKENS_SCHEMA,
    HeadRef,
    RowConsumer,
    SignalCollector,
    choose_heads,
    collecting,
    consecutive_jsd,
    extract_chunk,
    focus_columns,
    jensen_shannon,
    parse_heads,
    prepare_problem,
    prompt_token_roles,
    rank_heads,
    row_signals,
    run_teacher,
    spans_from_offsets,
)

# The embedded teacher and friends as session fixtures (not a conftest: that is the suite's).
pytest_plugins = ["tests.teacher_fixtures"]

HEADS = ["L15H6", "L3H1"]
# Every way the hook picks heads: one head (slices), scattered heads in different kv groups
# (index tensors), contiguous heads sharing one kv head (a broadcast slice).
EAGER_HEADS = ["L15H6", "L3H1", "L3H5", "L3H8", "L20H3", "L20H4"]


# --- Signal math by hand -------------------------------------------------------------------


def test_row_signals_on_a_hand_computed_row():
    # positions: sink, template, problem, problem, text
    row = torch.tensor([[0.4, 0.1, 0.2, 0.1, 0.2]])
    roles = torch.tensor([ROLE_SINK, ROLE_TEMPLATE, ROLE_PROBLEM, ROLE_PROBLEM, ROLE_TEXT])
    signals = row_signals(row, roles)
    assert signals["problem_attn"].item() == pytest.approx(0.3)
    assert signals["context_attn"].item() == pytest.approx(0.5)  # 0.3 problem + 0.2 text
    assert signals["sink_attn"].item() == pytest.approx(0.4)
    assert signals["iaf"].item() == pytest.approx(0.6)  # 0.3 / 0.5: sink and template excluded


def test_jensen_shannon_bounds_and_a_hand_computed_value():
    p = torch.tensor([0.2, 0.3, 0.5])
    assert jensen_shannon(p, p).item() == pytest.approx(0.0, abs=1e-7)
    disjoint = jensen_shannon(torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.3, 0.7]))
    assert disjoint.item() == pytest.approx(1.0, abs=1e-6)
    # p = [1, 0], q = [1/2, 1/2], m = [3/4, 1/4]:
    # KL(p||m) = log2(4/3); KL(q||m) = 1/2 log2(2/3) + 1/2 log2(2)
    expected = 0.5 * (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5 * math.log2(2))
    assert jensen_shannon(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])).item() == pytest.approx(
        expected, abs=1e-6
    )


def test_consecutive_jsd_cuts_to_the_common_context_and_renormalises():
    previous = torch.tensor([[0.5, 0.5]])  # row of position 1
    rows = torch.tensor([[[0.2, 0.2, 0.6, 0.0], [0.1, 0.3, 0.2, 0.4]]])  # positions 2 and 3
    jsd = consecutive_jsd(rows, 2, previous)
    # position 2 cut to positions 0..1 is [0.5, 0.5]: the same as the previous row
    assert jsd[0, 0].item() == pytest.approx(0.0, abs=1e-7)
    # position 3 cut to 0..2 is [1/6, 1/2, 1/3]; previous row is [0.2, 0.2, 0.6]
    p, q = [1 / 6, 1 / 2, 1 / 3], [0.2, 0.2, 0.6]
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    expected = 0.5 * sum(a * math.log2(a / c) for a, c in zip(p, m, strict=True)) + 0.5 * sum(
        b * math.log2(b / c) for b, c in zip(q, m, strict=True)
    )
    assert jsd[0, 1].item() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(consecutive_jsd(rows, 2, None)[0, 0].item())


def test_prompt_roles_and_text_spans_from_offsets():
    # "<s>" special token (0,0), "Q:" template, " 12 apples" problem span 2..12, "\n" template
    offsets = [(0, 0), (0, 2), (2, 5), (5, 12), (12, 13)]
    roles = prompt_token_roles(offsets, (2, 12), sink_tokens=1)
    assert roles.tolist() == [ROLE_SINK, ROLE_TEMPLATE, ROLE_PROBLEM, ROLE_PROBLEM, ROLE_TEMPLATE]
    # a 4-byte character split over three tokens with the same offsets (byte-level BPE)
    text = "ab 😀 c"
    spans = spans_from_offsets([(0, 2), (2, 4), (3, 4), (3, 4), (4, 6)], len(text))
    assert "".join(text[s:e] for s, e in spans) == text
    assert spans == [(0, 2), (2, 3), (3, 3), (3, 4), (4, 6)]


def test_parse_heads_rejects_a_head_outside_the_model_in_one_line():
    assert parse_heads(["L22H4", "L0H0", "L22H4"], 30, 9) == [HeadRef(22, 4), HeadRef(0, 0)]
    with pytest.raises(MyceliumError) as error:
        parse_heads(["L99H0"], 30, 9)
    assert "L99H0" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(MyceliumError):
        parse_heads(["L1H9"], 30, 9)
    with pytest.raises(MyceliumError):
        parse_heads(["layer1"], 30, 9)


# --- The attention hook against eager attention --------------------------------------------


class RowRecorder(RowConsumer):
    """Keeps every row it is handed (only for this test: extraction never keeps rows)."""

    def __init__(self, heads: list[HeadRef], first_position: int, block_budget_bytes: int):
        self.heads_by_layer = {}
        for head in sorted(heads):
            self.heads_by_layer.setdefault(head.layer, []).append(head.head)
        self.first_position = first_position
        self.block_budget_bytes = block_budget_bytes
        self.rows: dict[int, list[torch.Tensor]] = {}

    def consume(self, layer, rows, first_position):
        self.rows.setdefault(layer, []).append(rows.clone())


def test_signal_attention_reproduces_eager_rows_and_sdpa_logits(teacher, config, cache_dir, problems):
    from mycelium.teacher import load_teacher

    row = problems.row(0, named=True)
    prepared, _ = prepare_problem(teacher, row, config.extraction, config.teacher, "teacher_forced")
    ids = torch.tensor([prepared.prompt_ids + prepared.text_ids])
    heads = parse_heads(EAGER_HEADS, teacher.n_layers, teacher.n_heads)
    # A tiny block budget splits the rows into several blocks, as a long sequence would.
    recorder = RowRecorder(heads, first_position=0, block_budget_bytes=64 * 1024)
    with torch.inference_mode(), collecting(recorder):
        signal_logits = teacher.model(input_ids=ids).logits

    reference = load_teacher(config.teacher, cache_dir, attn_implementation="eager").model
    with torch.inference_mode():
        eager = reference(input_ids=ids, output_attentions=True)
        reference.set_attn_implementation("sdpa")
        sdpa_logits = reference(input_ids=ids).logits
    for head in heads:
        index = recorder.heads_by_layer[head.layer].index(head.head)
        ours = torch.cat(recorder.rows[head.layer], dim=1)[index]
        theirs = eager.attentions[head.layer][0, head.head]
        assert ours.shape == theirs.shape == (ids.shape[1], ids.shape[1])
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(signal_logits, sdpa_logits, atol=1e-4, rtol=0)

    # The focus columns name the problem token each text row attends to most (eager's argmax
    # over problem positions), as a char span of the problem text.
    collector = SignalCollector(heads, torch.from_numpy(prepared.prompt_roles), 64 * 1024)
    run_teacher(teacher, prepared, collector, "teacher_forced", config.teacher)
    focus = focus_columns(collector.focus(), prepared.problem_char_spans)
    n_prompt = len(prepared.prompt_ids)
    problem_positions = torch.from_numpy(prepared.prompt_roles == ROLE_PROBLEM)
    problem_text = str(row["problem"])
    for head in heads:
        text_rows = eager.attentions[head.layer][0, head.head][n_prompt:, :n_prompt]
        weights, positions = text_rows.masked_fill(~problem_positions, -1.0).max(-1)
        np.testing.assert_allclose(focus[head]["focus_attn"], weights.numpy(), atol=1e-4)
        expected_spans = prepared.problem_char_spans[positions.numpy()]
        agree = (focus[head]["focus_start"] == expected_spans[:, 0]).mean()
        assert agree > 0.95  # near-ties may flip between eager and the recomputed rows
        for start, end in zip(focus[head]["focus_start"], focus[head]["focus_end"], strict=True):
            assert 0 <= start < end <= len(problem_text)


# --- Extraction on real problems -----------------------------------------------------------


def _check_tables(tokens: pl.DataFrame, records: pl.DataFrame, heads: list[str]):
    assert dict(tokens.schema) == TOKENS_SCHEMA
    assert dict(records.schema) == PROBLEMS_SCHEMA
    for record in records.iter_rows(named=True):
        assert record["skipped_reason"] is None
        mine = tokens.filter(pl.col("problem_id") == record["problem_id"])
        assert mine.height == record["n_text_tokens"] * len(heads)
        for head in heads:
            rows = mine.filter(pl.col("head") == head).sort("token_index")
            assert rows["token_index"].to_list() == list(range(record["n_text_tokens"]))
            assert "".join(rows["token_text"]) == record["text"]
            assert rows["jsd"][0] is None and rows["jsd"][1:].null_count() == 0
    assert tokens["iaf"].is_between(0.0, 1.0).all()
    assert tokens["focus_start"].null_count() == 0 and (tokens["focus_start"] < tokens["focus_end"]).all()
    assert (tokens["focus_attn"] <= tokens["problem_attn"] + 1e-5).all()
    assert tokens["jsd"].drop_nulls().is_between(0.0, 1.0).all()
    assert (tokens["context_attn"] + tokens["sink_attn"] <= 1.0 + 1e-5).all()


def test_extract_chunk_teacher_forced_on_gsm8k_problems(teacher, config, problems):
    heads = parse_heads(HEADS, teacher.n_layers, teacher.n_heads)
    tokens, records = extract_chunk(teacher, problems, heads, config.extraction, config.teacher, progress=False)
    assert records["problem_id"].to_list() == problems["problem_id"].to_list()
    assert records["text"].to_list() == problems["solution"].to_list()
    assert (records["mode"] == "teacher_forced").all()
    assert (records["n_problem_tokens"] > 0).all() and (records["n_prompt_tokens"] > records["n_problem_tokens"]).all()
    _check_tables(tokens, records, HEADS)
    # L15H6 reads the problem: most of its non-sink attention lands there (0.7 on GSM8K).
    assert tokens.filter(pl.col("head") == "L15H6")["iaf"].mean() > 0.5


def test_generate_mode_rows_equal_teacher_forced_rows_on_the_generated_text(teacher, config, problems):
    extraction = config.extraction.model_copy(update={"mode": "generate"})
    teacher_cfg = config.teacher.model_copy(update={"max_new_tokens": 12})
    heads = parse_heads(HEADS, teacher.n_layers, teacher.n_heads)
    tokens, records = extract_chunk(teacher, problems[:1], heads, extraction, teacher_cfg, progress=False)
    assert records["mode"][0] == "generate" and 0 < records["n_text_tokens"][0] <= 12
    _check_tables(tokens, records, HEADS)

    # Teacher-force exactly the generated ids: every text token's row must be the same.
    row = problems.row(0, named=True)
    prepared, _ = prepare_problem(teacher, row, extraction, teacher_cfg, "generate")
    generated = teacher.tokenizer(records["text"][0], add_special_tokens=False)["input_ids"]
    prepared.text_ids = generated
    collector = SignalCollector(heads, torch.from_numpy(prepared.prompt_roles), 1 << 20)
    run_teacher(teacher, prepared, collector, "teacher_forced", teacher_cfg)
    forced = collector.signals()
    for head in heads:
        decoded = tokens.filter(pl.col("head") == head.name).sort("token_index")
        assert decoded.height == len(generated)
        for name in ("iaf", "problem_attn", "sink_attn"):
            np.testing.assert_allclose(decoded[name].to_numpy(), forced[head][name], atol=1e-4)
        np.testing.assert_allclose(decoded["jsd"].to_numpy()[1:], forced[head]["jsd"][1:], atol=1e-4)


def test_prompts_over_the_limit_are_skipped_and_counted(teacher, config, problems):
    extraction = config.extraction.model_copy(update={"max_prompt_tokens": 8})
    heads = parse_heads(HEADS, teacher.n_layers, teacher.n_heads)
    tokens, records = extract_chunk(teacher, problems[:2], heads, extraction, config.teacher, progress=False)
    assert tokens.height == 0 and dict(tokens.schema) == TOKENS_SCHEMA
    assert records["skipped_reason"].str.contains("max_prompt_tokens").all()
    assert records["n_text_tokens"].null_count() == 2


def test_two_threads_extracting_at_once_do_not_mix(teacher, config, problems):
    heads = parse_heads(HEADS, teacher.n_layers, teacher.n_heads)
    alone = [
        extract_chunk(teacher, problems[i : i + 1], heads, config.extraction, config.teacher, progress=False)[0]
        for i in (1, 2)
    ]
    together: dict[int, pl.DataFrame] = {}

    def work(i):
        together[i] = extract_chunk(
            teacher, problems[i : i + 1], heads, config.extraction, config.teacher, progress=False
        )[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, expected in zip((1, 2), alone, strict=True):
        got = together[i]
        assert got.height == expected.height
        np.testing.assert_allclose(got["iaf"].to_numpy(), expected["iaf"].to_numpy(), atol=1e-5)


def test_rank_heads_scores_every_head_and_auto_picks_the_top_k(teacher, config, problems):
    extraction = config.extraction.model_copy(update={"calibration_problems": 2, "auto_top_k": 3})
    ranking = rank_heads(teacher, problems, extraction, config.teacher, progress=False)
    assert dict(ranking.schema) == RANKING_SCHEMA
    assert ranking.height == teacher.n_layers * teacher.n_heads == 270
    assert ranking["rank"].to_list() == list(range(1, 271))
    assert ranking["retrieval_score"].is_between(0.0, 1.0).all() and ranking["mean_iaf"].is_between(0.0, 1.0).all()
    assert ranking["retrieval_score"].max() > 0.0  # some head points at the problem tokens it copies
    heads, table = choose_heads(teacher, problems, extraction, config.teacher, progress=False)
    assert [h.name for h in heads] == ranking["head"][:3].to_list() == table["head"][:3].to_list()
