"""The student's backbone read through ONNX Runtime instead of PyTorch eager.

Reads: an `Encoder` (the tuned backbone stage 04 left, or the embedded MiniLM) and
`eval.backbone_runtime`. Writes: the exported graph, once per set of weights, under
`<cache_dir>/onnx/<key>/backbone.onnx` (like the converted teacher, a local cache, not an
artifact: it is derived from weights the store already holds). Time: the export ~5-15 s on
2 CPU cores, once; a read afterwards is the point of this file (`bench/student_read.py`
measures it beside PyTorch on the same problems).
You should see: the same hidden states as PyTorch to about 1e-5 (float32 throughout, only the
kernels differ) and the same answers, in less time per problem.

Why not PyTorch: stage 06 reads one problem at a time and its latency is one of the issue's
targets. On the 500 shipped GSM8K test problems the same float32 graph in ONNX Runtime read in
0.87 [0.86, 0.88] of PyTorch eager's time (median paired ratio), with the same answer on all
500; the rest of a read is compute-bound matrix products that only lower precision would cut,
and int8 changed half the answers (`bench/student_read.py`). Only inference uses it:
training, backbone tuning and the cached training features stay on PyTorch, and the stage 06
heads read features that differ from their training features by float rounding only.

`onnx_encoder(encoder, cache_dir)` returns a copy of the encoder whose `model` is an
`OnnxBackbone`: called like the Hugging Face model (`model(**batch).last_hidden_state`), so
`c3_model.read_problems` and `encoder.embed_texts` use it unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
# Part of the cache key: the fused graph (bench/student_read.py measures it) and the plain one
# stage 06 reads are cached apart.
FUSED_FORMAT, PLAIN_FORMAT = "dynamo+ort_fusions", "dynamo"


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


def export_graph(encoder: Encoder, path: Path, fused: bool = False) -> None:
    """Export the encoder to ONNX with batch and sequence length dynamic (with `fused`, rewritten
    by `fuse_for_onnxruntime`)."""
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
            if fused:
                fuse_for_onnxruntime(program)
    finally:
        exporter_log.setLevel(level)
    program.save(str(path))


class OnnxBackbone:
    """An ONNX Runtime session that answers like the Hugging Face encoder at inference:
    `model(input_ids=..., attention_mask=..., ...)` → an object with `.last_hidden_state`."""

    device = torch.device("cpu")

    def __init__(self, path: Path, threads: int):
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

    def __call__(self, **inputs: Any) -> SimpleNamespace:
        feeds = {name: np.asarray(inputs[name].cpu().numpy() if isinstance(inputs[name], torch.Tensor) else inputs[name], dtype=np.int64)
                 for name in self.input_names}
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))


def _export_into(encoder: Encoder, folder: Path, fused: bool) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Exported beside and renamed into place, so a reader never sees half a graph.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        export_graph(encoder, staging / GRAPH_FILE, fused)
    except Exception as exc:  # the exporter raises many types; the user needs one line
        shutil.rmtree(staging, ignore_errors=True)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{encoder.name}: cannot export to ONNX ({first}); use --set eval.backbone_runtime=torch") from None
    try:
        os.rename(staging, folder)
    except OSError:  # another process put it there first
        shutil.rmtree(staging, ignore_errors=True)


def onnx_encoder(encoder: Encoder, cache_dir: str, fused: bool = False) -> Encoder:
    """A copy of `encoder` that reads through ONNX Runtime; exports once per set of weights (and
    again when the cached graph cannot be loaded). One-line ModelError when the backbone cannot
    be exported. `fused=True`: the graph rewritten by `fuse_for_onnxruntime` (only the benchmark
    that measures the fusions asks for it)."""
    folder = Path(cache_dir) / "onnx" / weights_key(encoder.model, FUSED_FORMAT if fused else PLAIN_FORMAT)
    for attempt in range(2):
        if not (folder / GRAPH_FILE).is_file():
            _export_into(encoder, folder, fused)
        try:
            model = OnnxBackbone(folder / GRAPH_FILE, torch.get_num_threads())
            break
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            if attempt:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ModelError(f"{folder / GRAPH_FILE}: cannot load the exported backbone ({first})") from None
            shutil.rmtree(folder, ignore_errors=True)  # a damaged cache entry: export it again
    return dataclasses.replace(encoder, model=model)


def reading_encoder(encoder: Encoder, runtime: str, cache_dir: str) -> Encoder:
    """The encoder stage 06 reads with: `encoder` itself for `torch`, its ONNX copy for `onnxruntime`."""
    return encoder if runtime == "torch" else onnx_encoder(encoder, cache_dir)
