"""The student's backbone read through ONNX Runtime: the float32 graph (stage 06's read of a
float32 student) and the int8 graph (the int8 student's only read).

Reads: an `Encoder` (the tuned backbone stage 04 left, or the embedded MiniLM),
`c3.read_precision` and `eval.backbone_runtime`. Writes: the exported graph, once per set of
weights and format, under `<cache_dir>/onnx/<key>/backbone.onnx` (like the converted teacher,
a local cache, not an artifact: it is derived from weights the store already holds).
Time: the export ~5-15 s on 2 CPU cores (the int8 one a few seconds more), once; a read
afterwards is the point of this file (`bench/student_read.py`, `bench/student_precision.py`).
You should see: float32 — the same hidden states as PyTorch to about 1e-5 and the same
answers, in less time; int8 — other features (mean token state at cosine ~0.99 to float32's)
that the heads were trained on, in about two thirds of the float32 read's time.

float32 (`c3.read_precision: float32`): only stage 06 reads through ONNX Runtime; training,
backbone tuning and the cached training features stay on PyTorch, and the heads read features
that differ from their training features by float rounding. On the 500 shipped GSM8K test
problems the graph read in 0.87 [0.86, 0.88] of PyTorch eager's time, same answer on all 500.

int8 (`c3.read_precision: int8`, the default): the tuned backbone's matrix products in int8
(`quantize_graph`), and every read of the student goes through it — C2's and C3's training
features, the verifier's pools, stage 06 — so the heads are trained on exactly what stage 06
hands them (quantising under heads trained on float32 features changed half the answers). On
the `make run` students and all 1,319 GSM8K test problems, each problem read and searched by
both in turn (`bench/student_precision.py`, the int8 read on `eval.int8_read_threads` 1): read
0.59 [0.59, 0.59] of the float32 ONNX read's time, read + search 0.78 [0.78, 0.79]; 122 right
against float32's 129 (McNemar p = 0.46).
Before an int8 graph is used it is checked against the float one on a few problem-like texts
(`int8_fidelity`, `c3.int8_min_cosine`): a backbone whose 8-bit graph is broken rather than
rounded (all-mpnet-base-v2 on an AVX2 CPU) gets a gentler recipe (`INT8_RECIPES`), or a
one-line error that points to `c3.read_precision=float32`. MiniLM passes with the first recipe,
so its graph computes what it always did (the same nodes and weights; the file's bytes
also carry the exporter's source paths, so they differ between checkout folders).

`onnx_encoder(encoder, cache_dir)` / `int8_encoder` return a copy of the encoder whose `model`
is an `OnnxBackbone`: called like the Hugging Face model (`model(**batch).last_hidden_state`),
so `c3_model.read_problems` and `encoder.embed_texts` use it unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mycelium.encoder import Encoder
from mycelium.errors import ModelError

GRAPH_FILE = "backbone.onnx"
RECIPE_FILE = "int8_recipe.json"  # beside an int8 graph: which recipe made it, and its fidelity
# Part of the cache key: the fused graph (bench/student_read.py measures it), the plain one
# stage 06 reads and the int8 one (`c3.read_precision: int8`) are cached apart.
FUSED_FORMAT, PLAIN_FORMAT, INT8_FORMAT = "dynamo+ort_fusions", "dynamo", "dynamo+int8_dynamic"


def weights_key(model: torch.nn.Module, graph_format: str = PLAIN_FORMAT) -> str:
    """A digest of the model's class, its weights, the torch version that exports it and the
    graph format: the cache folder's name."""
    digest = hashlib.sha256(f"{type(model).__name__}|torch {torch.__version__}|{graph_format}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


class _HiddenStates(torch.nn.Module):
    """The encoder's forward with keyword inputs, returning only the last hidden state (what the
    exporter needs: positional tensors in, one tensor out)."""

    def __init__(self, model: torch.nn.Module, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs, strict=True))).last_hidden_state


def fuse_for_onnxruntime(program: Any) -> None:
    """Rewrite the exported graph with ONNX Runtime's transformer fusions (onnxscript's
    `ort_fusions`: each layer's attention becomes one `Attention` op, residual + layer norm one
    `SkipLayerNormalization`, bias + GELU one `BiasGelu`), in place. ORT's own session optimiser
    does not recognise the dynamo exporter's attention, so unfused a MiniLM layer runs ~15 small
    ops where this makes one.
    Measured and not used: on 300 shipped GSM8K test problems, each read followed by the search
    as in stage 06, the fused read took 1.04 [1.01, 1.08] of the unfused one's time (median
    paired ratio; same answers 300/300). Reads timed back to back without the search, on a busy
    machine, had it at 0.95: the gain, if any, does not survive the search's interleaving.
    `bench/student_read.py` keeps measuring it (`onnx_encoder(..., fused=True)`)."""
    from onnxscript.rewriter import ort_fusions

    program.model, _ = ort_fusions.optimize_for_ort(program.model)  # (graph, count of each fusion)


@dataclasses.dataclass(frozen=True)
class Int8Recipe:
    """One way to quantise the graph: ONNX Runtime's dynamic quantisation with these options."""

    name: str
    reduce_range: bool = False  # 7-bit weights
    float_after: tuple[str, ...] = ()  # products whose input comes from these ops stay float32


# Tried in order until the int8 graph reads like the float one (`int8_fidelity` ≥
# c3.int8_min_cosine). The first is the one every MiniLM student here was built with; the other
# two exist because all-mpnet-base-v2's graph broke under it on an AVX2 CPU (mean token state at
# cosine 0.01 to float32's on 20 GSM8K test problems). Quantising one group of its products at a
# time found two causes. The products that read a LayerNorm's output gave cosine -0.01 with 8-bit
# weights and 0.99 with 7-bit ones: without VNNI, the u8 x s8 products are summed pairwise in
# int16, which saturates (ONNX Runtime's `reduce_range` exists for that). The products that
# read a GELU's output gave 0.87 at either width: a few channels there are far larger than the
# rest, and one activation scale for the whole tensor flattens the rest. Both fixes together:
# median 0.991 (worst 0.981). MiniLM gave 0.994 under the first recipe on the same CPU.
INT8_RECIPES = (
    Int8Recipe("8-bit per-channel weights"),
    Int8Recipe("7-bit per-channel weights", reduce_range=True),
    Int8Recipe("7-bit per-channel weights, GELU-fed products float32", reduce_range=True, float_after=("Gelu",)),
)
# Short problem-like texts the int8 graph is checked on before it is used.
FIDELITY_TEXTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins with four; she sells the rest for $2 each.",
    "The train left at 9:15 and covered 240 miles at 60 miles per hour; 3/4 of the seats were full.",
)


def quantize_graph(float_graph: Path, path: Path, recipe: Int8Recipe = INT8_RECIPES[0]) -> None:
    """`float_graph` with its matrix products in int8 (ONNX Runtime's dynamic quantisation),
    written to `path`: each weight matrix int8 with one scale per output channel, each product's
    input quantised per run with one scale for the whole tensor. Per-channel weights because
    one scale per matrix lost too much: on 150 GSM8K test problems the shipped MiniLM's mean
    token state kept a median cosine of 0.960 (worst 0.908) to float32's with one scale per
    matrix, 0.995 (worst 0.987) per channel, in the same time (0.62× the float32 read).
    `recipe` may narrow the weights to 7 bits and keep some products in float32 (`INT8_RECIPES`).
    ORT's optional pre-processing is skipped: its symbolic shape inference gives up on the
    dynamo exporter's graph, and the session's own optimiser runs at load anyway."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = None
    if recipe.float_after:
        graph = onnx.load(str(float_graph), load_external_data=False).graph
        producer = {output: node.op_type for node in graph.node for output in node.output}
        excluded = [node.name for node in graph.node if node.op_type == "MatMul" and producer.get(node.input[0]) in recipe.float_after]
    root = logging.getLogger()
    root.addFilter(_skip_preprocessing_advice)
    try:
        quantize_dynamic(str(float_graph), str(path), weight_type=QuantType.QInt8, per_channel=True, reduce_range=recipe.reduce_range,
                         nodes_to_exclude=excluded)
    finally:
        root.removeFilter(_skip_preprocessing_advice)


def _skip_preprocessing_advice(record: logging.LogRecord) -> bool:
    """Drop ONNX Runtime's advice to pre-process before quantising (logged on the root logger
    for every graph): the docstring of `quantize_graph` says why it does not apply here."""
    return not record.getMessage().startswith("Please consider to run pre-processing")


def int8_fidelity(float_graph: Path, int8_graph: Path, tokenizer: Any) -> float:
    """The worst cosine, over `FIDELITY_TEXTS`, between the int8 and the float graph's mean
    token state: ~0.99 when the int8 graph merely rounds, near 0 when it is broken."""
    float_read, int8_read = OnnxBackbone(float_graph, 1), OnnxBackbone(int8_graph, 1)
    worst = 1.0
    for text in FIDELITY_TEXTS:
        batch = tokenizer([text], return_tensors="pt")
        exact, rounded = (read(**batch).last_hidden_state[0].mean(0).numpy() for read in (float_read, int8_read))
        worst = min(worst, float(exact @ rounded / (np.linalg.norm(exact) * np.linalg.norm(rounded))))
    return worst


def _quantize_faithfully(encoder: Encoder, float_graph: Path, path: Path, min_cosine: float) -> None:
    """Write to `path` the first of `INT8_RECIPES` whose graph keeps `min_cosine`; one-line
    ModelError when none does (the features would not be this backbone's)."""
    best = -1.0
    for recipe in INT8_RECIPES:
        quantize_graph(float_graph, path, recipe)
        cosine = int8_fidelity(float_graph, path, encoder.tokenizer)
        if cosine >= min_cosine:
            path.with_name(RECIPE_FILE).write_text(json.dumps({"recipe": recipe.name, "worst_cosine": round(cosine, 4)}) + "\n")
            return
        best = max(best, cosine)
    path.unlink()
    raise ModelError(f"{encoder.name}: no int8 graph reads like the float32 one (best worst-case cosine {best:.3f} < "
                     f"c3.int8_min_cosine {min_cosine}); use --set c3.read_precision=float32")


def export_graph(encoder: Encoder, path: Path, graph_format: str = PLAIN_FORMAT, int8_min_cosine: float | None = None) -> None:
    """Export the encoder to ONNX with batch and sequence length dynamic; `graph_format`
    FUSED_FORMAT rewrites it with `fuse_for_onnxruntime`, INT8_FORMAT quantises it with the
    first of `INT8_RECIPES` that keeps `int8_min_cosine`."""
    example = encoder.tokenizer(["Two apples cost 3 dollars.", "A short one."], padding=True, return_tensors="pt")
    names = [name for name in encoder.tokenizer.model_input_names if name in example]
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # forward(*inputs) has one parameter, the tuple of inputs: hence the nesting below.
    # The exporter warns about optional torchvision ops and axis names; none of it concerns a user.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(_HiddenStates(encoder.model, names).eval(), tuple(example[name] for name in names),
                                        input_names=names, output_names=["last_hidden_state"],
                                        dynamic_shapes=(tuple({0: batch, 1: length} for _ in names),), dynamo=True, optimize=True, verbose=False)
            if graph_format == FUSED_FORMAT:
                fuse_for_onnxruntime(program)
    finally:
        exporter_log.setLevel(level)
    if graph_format != INT8_FORMAT:
        program.save(str(path))
        return
    float_graph = path.with_name("float-" + path.name)
    program.save(str(float_graph))
    try:
        _quantize_faithfully(encoder, float_graph, path, int8_min_cosine if int8_min_cosine is not None else -1.0)
    finally:
        float_graph.unlink()


class OnnxBackbone:
    """An ONNX Runtime session that answers like the Hugging Face encoder at inference:
    `model(input_ids=..., attention_mask=..., ...)` → an object with `.last_hidden_state`.
    `rows_alone`: each row of a batch runs by itself on its real tokens (padding rows are
    zeros), so a problem's hidden states never depend on what it was batched with."""

    device = torch.device("cpu")

    def __init__(self, path: Path, threads: int, rows_alone: bool = False):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # By default ORT's workers spin for a while after each run, waiting for the next one.
        # The student's search runs right after the read on the same cores, and on 2 cores the
        # spinning workers took them from it: interleaved read → search, 200 GSM8K test
        # problems, search p50 56.8 ms with spinning against 22.2 ms without.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.path, self.threads, self.rows_alone = path, threads, rows_alone

    def with_threads(self, threads: int) -> OnnxBackbone:
        """The same graph in a session with `threads` intra-op threads (the same numbers: a
        thread count changes how the work is split, not what is computed)."""
        return self if threads == self.threads else OnnxBackbone(self.path, threads, self.rows_alone)

    def __call__(self, **inputs: Any) -> SimpleNamespace:
        feeds = {name: np.asarray(inputs[name].cpu().numpy() if isinstance(inputs[name], torch.Tensor) else inputs[name], dtype=np.int64)
                 for name in self.input_names}
        if not self.rows_alone or len(feeds["input_ids"]) == 1:
            (hidden,) = self.session.run(["last_hidden_state"], feeds)
            return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))
        mask = feeds["attention_mask"].astype(bool)
        rows = []
        for row, real in enumerate(mask):
            (states,) = self.session.run(["last_hidden_state"], {name: feed[row:row + 1, real] for name, feed in feeds.items()})
            rows.append(states[0])
        hidden = np.zeros((*mask.shape, rows[0].shape[-1]), np.float32)
        for row, (real, states) in enumerate(zip(mask, rows, strict=True)):
            hidden[row, real] = states
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))


def graph_folder(cache_dir: str, model: torch.nn.Module, graph_format: str, int8_min_cosine: float | None = None) -> Path:
    """Where the graph of `model`'s weights in `graph_format` is cached. An int8 graph chosen
    under one fidelity threshold is not reused under another."""
    key = graph_format if int8_min_cosine is None else f"{graph_format}|min cosine {int8_min_cosine}"
    return Path(cache_dir) / "onnx" / weights_key(model, key)


def _export_into(encoder: Encoder, folder: Path, graph_format: str, int8_min_cosine: float | None) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Exported beside and renamed into place, so a reader never sees half a graph.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        export_graph(encoder, staging / GRAPH_FILE, graph_format, int8_min_cosine)
    except ModelError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as exc:  # the exporter raises many types; the user needs one line
        shutil.rmtree(staging, ignore_errors=True)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{encoder.name}: cannot export to ONNX ({first}); use --set eval.backbone_runtime=torch") from None
    try:
        os.rename(staging, folder)
    except OSError:  # another process put it there first
        shutil.rmtree(staging, ignore_errors=True)


def onnx_encoder(encoder: Encoder, cache_dir: str, fused: bool = False, graph_format: str | None = None,
                 int8_min_cosine: float | None = None) -> Encoder:
    """A copy of `encoder` that reads through ONNX Runtime; exports once per set of weights (and
    again when the cached graph cannot be loaded). One-line ModelError when the backbone cannot
    be exported. `fused=True`: the graph rewritten by `fuse_for_onnxruntime` (only the benchmark
    that measures the fusions asks for it); `graph_format=INT8_FORMAT`: see `int8_encoder`."""
    graph_format = graph_format or (FUSED_FORMAT if fused else PLAIN_FORMAT)
    folder = graph_folder(cache_dir, encoder.model, graph_format, int8_min_cosine)
    for attempt in range(2):
        if not (folder / GRAPH_FILE).is_file():
            _export_into(encoder, folder, graph_format, int8_min_cosine)
        try:
            model = OnnxBackbone(folder / GRAPH_FILE, torch.get_num_threads(), rows_alone=graph_format == INT8_FORMAT)
            break
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            if attempt:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ModelError(f"{folder / GRAPH_FILE}: cannot load the exported backbone ({first})") from None
            shutil.rmtree(folder, ignore_errors=True)  # a damaged cache entry: export it again
    return dataclasses.replace(encoder, model=model)


def int8_encoder(encoder: Encoder, cache_dir: str, min_cosine: float) -> Encoder:
    """A copy of `encoder` that reads through ONNX Runtime with int8 matrix products
    (`c3.read_precision: int8`). Unlike the float32 read, this one changes the features, so it is
    not a stage 06 option but the student's backbone itself: C2's and C3's training features,
    the verifier's pools and stage 06 all read with it, and a problem's features are the same in
    all four. That is also why each problem runs alone (`OnnxBackbone.rows_alone`): the
    activations' int8 scale is taken over the whole input tensor, so in a padded batch a
    problem's features would depend on its batch-mates. The graph is checked against the float
    one first (`int8_fidelity` ≥ `min_cosine`, c3.int8_min_cosine), and quantised less
    aggressively, or refused, when it reads unlike it."""
    return onnx_encoder(encoder, cache_dir, graph_format=INT8_FORMAT, int8_min_cosine=min_cosine)


def student_reader(encoder: Encoder, precision: str, cache_dir: str, int8_min_cosine: float) -> Encoder:
    """The backbone every student read goes through: `encoder` itself (float32, PyTorch) or
    its int8 ONNX copy."""
    return int8_encoder(encoder, cache_dir, int8_min_cosine) if precision == "int8" else encoder


def reading_encoder(encoder: Encoder, runtime: str, cache_dir: str, int8_threads: int | None = None) -> Encoder:
    """The encoder stage 06 reads with: `encoder` itself for `torch`, its ONNX copy for
    `onnxruntime`; an encoder that already reads through ONNX Runtime (the int8 student) as it
    is, in a session of `int8_threads` threads when given (`eval.int8_read_threads`)."""
    if isinstance(encoder.model, OnnxBackbone):
        return encoder if int8_threads is None else dataclasses.replace(encoder, model=encoder.model.with_threads(int8_threads))
    return encoder if runtime == "torch" else onnx_encoder(encoder, cache_dir)
