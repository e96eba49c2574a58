"""The student's backbone read through ONNX Runtime: the same features as PyTorch (from the
plain graph stage 06 reads, and from the fused one the read bench measures), exported once per
set of weights, a damaged cache repaired, a bad setting refused in one line."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

from mycelium import c3_model, onnx_read
from mycelium.config import load_config
from mycelium.encoder import embed_texts, load_encoder
from mycelium.errors import ConfigError, ModelError

CONFIG = load_config(None, [])
PROBLEMS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Two thirds of 27 is what?",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def readers(cache_dir):
    reference = load_encoder(CONFIG.c3.backbone, CONFIG.c3.max_length)
    return reference, onnx_read.onnx_encoder(reference, cache_dir)


def test_the_onnx_read_gives_pytorch_features_in_a_padded_batch(readers):
    reference, fast = readers
    words = dict(CONFIG.c4.word_to_number)
    slow_read = c3_model.read_problems(reference, PROBLEMS, words, batch_size=3, context_tokens=CONFIG.c3.context_tokens, progress=False)
    fast_read = c3_model.read_problems(fast, PROBLEMS, words, batch_size=3, context_tokens=CONFIG.c3.context_tokens, progress=False)
    for slow, quick in zip(slow_read, fast_read, strict=True):
        assert [c.span_start for c in quick.candidates] == [c.span_start for c in slow.candidates]
        assert np.abs(quick.pooled - slow.pooled).max() < 1e-4
        assert np.abs(quick.features - slow.features).max() < 1e-4
    # the embeddings of the nearest-neighbour baseline too, one text at a time and batched
    assert np.abs(embed_texts(fast, PROBLEMS, 1, progress=False) - embed_texts(reference, PROBLEMS, 3, progress=False)).max() < 1e-4


def test_the_export_is_cached_per_set_of_weights(readers, cache_dir):
    reference, _ = readers
    graphs = list((os.path.join(cache_dir, "onnx", key, onnx_read.GRAPH_FILE) for key in os.listdir(os.path.join(cache_dir, "onnx"))))
    assert len(graphs) == 1
    written = os.stat(graphs[0]).st_mtime_ns
    onnx_read.onnx_encoder(reference, cache_dir)
    assert os.stat(graphs[0]).st_mtime_ns == written  # read again, not exported again

    changed = load_encoder(CONFIG.c3.backbone, CONFIG.c3.max_length)
    with torch.no_grad():
        changed.model.embeddings.LayerNorm.bias.add_(0.5)  # other weights (a tuned backbone): another graph
    assert onnx_read.weights_key(changed.model) != onnx_read.weights_key(reference.model)


def test_the_fused_graph_reads_the_same_features_and_is_cached_apart(readers, cache_dir):
    reference, plain = readers
    fused = onnx_read.onnx_encoder(reference, cache_dir, fused=True)
    graph = os.path.join(cache_dir, "onnx", onnx_read.weights_key(reference.model, onnx_read.FUSED_FORMAT), onnx_read.GRAPH_FILE)
    ops = [node.op_type for node in onnx.load(graph).graph.node]
    assert ops.count("Attention") == reference.model.config.num_hidden_layers and "SkipLayerNormalization" in ops
    words = dict(CONFIG.c4.word_to_number)
    for slow, quick in zip(*(c3_model.read_problems(e, PROBLEMS, words, 3, CONFIG.c3.context_tokens, progress=False) for e in (plain, fused)), strict=True):
        assert np.abs(quick.features - slow.features).max() < 1e-4 and np.abs(quick.pooled - slow.pooled).max() < 1e-4


def test_a_damaged_cached_graph_is_exported_again(tmp_path):
    reference = load_encoder(CONFIG.c3.backbone, CONFIG.c3.max_length)
    graph = tmp_path / "onnx" / onnx_read.weights_key(reference.model) / onnx_read.GRAPH_FILE
    graph.parent.mkdir(parents=True)
    graph.write_bytes(b"half a graph")
    fast = onnx_read.onnx_encoder(reference, str(tmp_path))
    assert graph.stat().st_size > 1_000_000
    problem = c3_model.read_problems(fast, PROBLEMS[:1], dict(CONFIG.c4.word_to_number), 1, CONFIG.c3.context_tokens, progress=False)[0]
    assert [c.value for c in problem.candidates if c.kind == c3_model.TEXT][:1] == [48.0]


def test_torch_runtime_is_the_encoder_itself_and_a_bad_runtime_is_one_line(readers, cache_dir):
    reference, _ = readers
    assert onnx_read.reading_encoder(reference, "torch", cache_dir) is reference
    with pytest.raises(ConfigError, match="eval.backbone_runtime"):
        load_config(None, ["eval.backbone_runtime=tensorrt"])


def test_the_int8_student_reads_a_problem_alike_alone_and_in_a_padded_batch(readers, cache_dir):
    reference, _ = readers
    int8 = onnx_read.int8_encoder(reference, cache_dir, CONFIG.c3.int8_min_cosine)
    folder = onnx_read.graph_folder(cache_dir, reference.model, onnx_read.INT8_FORMAT, CONFIG.c3.int8_min_cosine)
    assert "MatMulInteger" in {node.op_type for node in onnx.load(folder / onnx_read.GRAPH_FILE).graph.node}
    # MiniLM passes the fidelity check with the first (full 8-bit) recipe
    chosen = json.loads((folder / onnx_read.RECIPE_FILE).read_text())
    assert chosen["recipe"] == onnx_read.INT8_RECIPES[0].name and chosen["worst_cosine"] >= CONFIG.c3.int8_min_cosine
    words, context = dict(CONFIG.c4.word_to_number), CONFIG.c3.context_tokens
    batched = c3_model.read_problems(int8, PROBLEMS, words, batch_size=3, context_tokens=context, progress=False)
    floats = c3_model.read_problems(reference, PROBLEMS, words, batch_size=3, context_tokens=context, progress=False)
    for text, in_batch, exact in zip(PROBLEMS, batched, floats, strict=True):
        alone = c3_model.read_problems(int8, [text], words, batch_size=1, context_tokens=context, progress=False)[0]
        # what stage 06 reads (one problem) is bit for bit what the heads were trained on (batches)
        assert np.array_equal(alone.features, in_batch.features) and np.array_equal(alone.pooled, in_batch.pooled)
        # int8 moves the features well past float rounding, yet they point the same way
        assert np.abs(alone.features - exact.features).max() > 1e-3
        cosine = alone.pooled @ exact.pooled / (np.linalg.norm(alone.pooled) * np.linalg.norm(exact.pooled))
        assert cosine > 0.98
    assert np.array_equal(embed_texts(int8, PROBLEMS, 1, progress=False), embed_texts(int8, PROBLEMS, 3, progress=False))
    # the int8 reader is already stage 06's reader, whatever eval.backbone_runtime says, and
    # the thread count stage 06 gives it (eval.int8_read_threads) does not change a feature
    assert onnx_read.reading_encoder(int8, "torch", cache_dir) is int8
    other_threads = onnx_read.reading_encoder(int8, "onnxruntime", cache_dir, int8_threads=1 if int8.model.threads > 1 else 2)
    assert other_threads.model.threads != int8.model.threads
    again = c3_model.read_problems(other_threads, PROBLEMS, words, batch_size=3, context_tokens=context, progress=False)
    assert all(np.array_equal(a.features, b.features) and np.array_equal(a.pooled, b.pooled) for a, b in zip(again, batched, strict=True))
    assert onnx_read.student_reader(reference, "float32", cache_dir, CONFIG.c3.int8_min_cosine) is reference


def test_a_bad_read_precision_is_one_line():
    with pytest.raises(ConfigError, match="c3.read_precision"):
        load_config(None, ["c3.read_precision=int4"])


def _with_outlier_channels(scale: float):
    """MiniLM with one channel of every GELU output `scale` times larger (the next product's
    weights shrunk to match): the kind of activation outlier that broke all-mpnet-base-v2's int8
    graph. One int8 scale per tensor then flattens the other channels of those products."""
    model = load_encoder(CONFIG.c3.backbone, CONFIG.c3.max_length)
    with torch.no_grad():
        for layer in model.model.encoder.layer:
            layer.intermediate.dense.weight[0] *= scale
            layer.intermediate.dense.bias[0] *= scale
            layer.output.dense.weight[:, 0] /= scale
    return model


def test_an_int8_graph_that_reads_unlike_the_float_one_is_quantised_more_gently(tmp_path):
    doctored = _with_outlier_channels(1000.0)
    threshold = CONFIG.c3.int8_min_cosine
    int8 = onnx_read.int8_encoder(doctored, str(tmp_path), threshold)
    folder = onnx_read.graph_folder(str(tmp_path), doctored.model, onnx_read.INT8_FORMAT, threshold)
    chosen = json.loads((folder / onnx_read.RECIPE_FILE).read_text())
    # the full 8-bit graph and the 7-bit one fall below the threshold; keeping the GELU-fed
    # products in float32 passes it
    assert chosen["recipe"] == onnx_read.INT8_RECIPES[-1].name and chosen["worst_cosine"] >= threshold
    ops = [node.op_type for node in onnx.load(folder / onnx_read.GRAPH_FILE).graph.node]
    layers = doctored.model.config.num_hidden_layers
    assert ops.count("MatMulInteger") == 5 * layers and ops.count("MatMul") >= layers
    exact = c3_model.read_problems(doctored, PROBLEMS, dict(CONFIG.c4.word_to_number), 3, CONFIG.c3.context_tokens, progress=False)
    rounded = c3_model.read_problems(int8, PROBLEMS, dict(CONFIG.c4.word_to_number), 3, CONFIG.c3.context_tokens, progress=False)
    for a, b in zip(exact, rounded, strict=True):
        assert a.pooled @ b.pooled / (np.linalg.norm(a.pooled) * np.linalg.norm(b.pooled)) > threshold


def test_no_faithful_int8_graph_is_one_line_and_leaves_nothing_cached(tmp_path, caplog):
    reference = load_encoder(CONFIG.c3.backbone, CONFIG.c3.max_length)
    with pytest.raises(ModelError, match=r"c3.int8_min_cosine 1.0\); use --set c3.read_precision=float32") as caught:
        onnx_read.int8_encoder(reference, str(tmp_path), 1.0)  # no int8 graph reads exactly like the float one
    assert "\n" not in str(caught.value)
    # three recipes quantised, and none of ONNX Runtime's pre-processing advice reached the log
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert [p for p in (tmp_path / "onnx").rglob("*") if p.is_file()] == []
    # the same weights still read in float32
    assert onnx_read.student_reader(reference, "float32", str(tmp_path), 1.0) is reference
