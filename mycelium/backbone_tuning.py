"""Fine-tuning the student's backbone on C3's pointer objective.

Reads: problem texts and their gold pointer examples (built by `tasks.train_c3.build_examples`
from stage 03's `c3_slots` / `c3_operands`), the backbone named by `c3.backbone`, and the
`c3` config section (`fine_tune_*` keys, `learning_rate` for the backbone,
`head_learning_rate` for the pointer). Writes nothing itself: `tasks/tune_backbone.py` stores
the tuned weights as an artifact that C2, C3 and the student then read problems with.
Time: on 2 CPU cores ~3.2 min per epoch over ~4.7k GSM8K training problems with all 6 layers
trained (`fine_tune_layers`; ~2.4 min with 3); the shipped sample: ~1 min 20 s per epoch.
You should see: per epoch the training loss and the validation pointer loss and top-1, the
same numbers the frozen-feature pointer reports, so the two can be read side by side.

Why: with the backbone frozen, a written number's feature is the mean of sentence-embedding
token states over its span and a few neighbours, which says little about which operation
the number feeds; the pointer's top-1 on TEXT operands stayed below one half. Here the
backbone is trained end to end through the same span averaging and the same pointer module
(`c3_model.PointerScorer`), so every feature the frozen pipeline caches (pooled problem
embedding, span and context features) is computed by the tuned weights afterwards, and the
rest of the pipeline does not change. The pointer trained here is discarded: stage 05 trains
its own on features cached from the tuned backbone, exactly as it does on frozen ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from mycelium import c3_model
from mycelium.config import C3Config
from mycelium.encoder import Encoder, load_encoder
from mycelium.errors import ModelError
from mycelium.planner import StepPlanner


@dataclass
class TuningProblem:
    """One problem as the tuning loop reads it: its tokens once, the averaging weights that
    turn token states into its TEXT/IMPLICIT candidates' features, and its pointer examples
    (whose pooled part of the query and whose text features are replaced by live ones)."""

    input_ids: list[int]
    span_weights: np.ndarray  # (n_text_candidates, n_tokens): mean over the candidate's tokens
    context_weights: np.ndarray  # (n_text_candidates, n_tokens): mean over tokens and neighbours
    examples: list[c3_model.PointerExample] = field(default_factory=list)
    planner_states: np.ndarray | None = None  # (n_states, state_dim): the gold chain's planner states, pooled part left zero
    planner_targets: np.ndarray | None = None  # (n_states,): the gold next skeleton or STOP


def averaging_weights(offsets: np.ndarray, candidates: Sequence[c3_model.Candidate], context_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows that average token states exactly as `c3_model.read_problems` does (`span_token_ranges`) (zero rows for
    a candidate whose span was truncated away)."""
    span = np.zeros((len(candidates), len(offsets)), np.float32)
    context = np.zeros_like(span)
    for row, c in enumerate(candidates):
        ranges = c3_model.span_token_ranges(offsets, c.span_start, c.span_end, context_tokens)
        if ranges is None:
            continue
        inside, (lo, hi) = ranges
        span[row, inside] = 1.0 / len(inside)
        context[row, lo:hi] = 1.0 / (hi - lo)
    return span, context


def tuning_problem(encoder: Encoder, text: str, word_to_number, context_tokens: int, examples: list[c3_model.PointerExample],
                   planner_states: tuple[np.ndarray, np.ndarray] | None = None) -> TuningProblem:
    """`planner_states`: (states, targets) of `planner.gold_states` for this problem alone,
    built on a zero pooled embedding (the loop puts the live one in)."""
    tokens = encoder.tokenizer(text, truncation=True, max_length=encoder.max_length, return_offsets_mapping=True)
    offsets = np.asarray(tokens["offset_mapping"], np.int64).reshape(-1, 2)
    span, context = averaging_weights(offsets, c3_model.text_candidates(text, word_to_number), context_tokens)
    states, targets = planner_states if planner_states is not None else (None, None)
    return TuningProblem(list(tokens["input_ids"]), span, context, examples, states, targets)


def placeholder_problem(text: str, word_to_number, dim: int) -> c3_model.ProblemText:
    """A ProblemText with zero features, for building examples whose backbone parts the tuning
    loop fills in live (`c3_model.slot_examples` needs the candidates and the shapes)."""
    candidates = c3_model.text_candidates(text, word_to_number)
    return c3_model.ProblemText(text, np.zeros(dim, np.float32), candidates, np.zeros((len(candidates), 2 * dim), np.float32))


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's stack of transformer layers, bottom first, whatever the architecture calls it
    (`encoder.layer` in BERT/MiniLM, `layers` in Llama/Qwen2/SmolLM2, `h` in GPT-2): the longest
    `ModuleList` in the model. Found by shape rather than by name so that any backbone
    `c3.backbone` names (the seed's Qwen2-0.5B included) can be tuned without a table of names."""
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not stacks:
        raise ModelError(f"{type(model).__name__}: no stack of transformer layers (torch.nn.ModuleList) to fine-tune")
    return list(max(stacks, key=len))


def trainable_parameters(model: torch.nn.Module, layers: int) -> list[torch.nn.Parameter]:
    """Freeze the embeddings and all but the top `layers` transformer layers; return the rest.
    The embeddings stay frozen because they are most of MiniLM's weights (30k × 384) and the
    optimiser step over them would cost more than the layers' backward pass on a CPU."""
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = transformer_blocks(model)
    for block in blocks[len(blocks) - layers:] if layers > 0 else []:
        for p in block.parameters():
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def batch_tensors(encoder: Encoder, problems: Sequence[TuningProblem]) -> dict[str, torch.Tensor]:
    """The batch's live pointer inputs: token states through the backbone (with gradients when
    the caller allows them), pooled into each example's query and averaged into its text
    candidates' features, beside the examples' fixed numeric features."""
    device = encoder.model.device
    padded = encoder.tokenizer.pad({"input_ids": [p.input_ids for p in problems]}, return_tensors="pt").to(device)
    states = encoder.model(**padded).last_hidden_state  # (B, T, d)
    examples = [(b, e) for b, p in enumerate(problems) for e in p.examples]
    width = max(len(e.numeric) for _, e in examples)
    dim = states.shape[-1]
    text_rows, pooled_rows = [], []
    for b, p in enumerate(problems):
        n = len(p.input_ids)
        real = states[b, :n]
        pooled_rows.append(real.mean(0))
        span = torch.from_numpy(p.span_weights).to(device)
        context = torch.from_numpy(p.context_weights).to(device)
        features = torch.cat([span @ real, context @ real], dim=-1) if len(span) else real.new_zeros((0, 2 * dim))
        text_rows.append(F.pad(features, (0, 0, 0, width - len(features))))
    owner = torch.tensor([b for b, _ in examples], device=device)
    numeric = np.zeros((len(examples), width, examples[0][1].numeric.shape[1]), np.float32)
    mask = np.zeros((len(examples), width), bool)
    for i, (_, e) in enumerate(examples):
        numeric[i, : len(e.numeric)] = e.numeric
        mask[i, : len(e.numeric)] = True
    static = torch.from_numpy(np.stack([e.query[dim:] for _, e in examples])).to(device)
    pooled = torch.stack(pooled_rows)
    planned = {}
    if all(p.planner_states is not None for p in problems):
        # The planner reads the L2-normalised pooled embedding (`planner.state_vector`).
        state_owner = torch.tensor([b for b, p in enumerate(problems) for _ in range(len(p.planner_targets))], device=device)
        rest = torch.from_numpy(np.concatenate([p.planner_states[:, dim:] for p in problems])).to(device)
        planned = {"planner_states": torch.cat([F.normalize(pooled, dim=-1)[state_owner], rest], dim=1),
                   "planner_targets": torch.from_numpy(np.concatenate([p.planner_targets for p in problems])).to(device)}
    return {
        **planned,
        "query": torch.cat([pooled[owner], static], dim=1),
        "text": torch.stack(text_rows)[owner],
        "numeric": torch.from_numpy(numeric).to(device),
        "mask": torch.from_numpy(mask).to(device),
        "gold": torch.tensor([e.gold for _, e in examples], device=device),
    }


def pointer_loss(pointer: c3_model.PointerScorer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the batch's pointer decisions, and each decision's gold rank."""
    log_probs = pointer(batch["query"], batch["text"], batch["numeric"], batch["mask"])
    gold = log_probs.gather(1, batch["gold"][:, None])
    return -gold.mean(), (log_probs > gold).sum(1)


def planner_loss(step_planner: StepPlanner | None, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the gold next step over the batch's planner states, and how many
    the planner gets right at top-1 (zero and nothing when there is no planner)."""
    if step_planner is None or "planner_states" not in batch:
        return batch["query"].new_zeros(()), batch["query"].new_zeros((0,), dtype=torch.bool)
    log_probs = step_planner(batch["planner_states"])
    target = batch["planner_targets"]
    return -log_probs.gather(1, target[:, None]).mean(), log_probs.argmax(1) == target


def validate(encoder: Encoder, pointer: c3_model.PointerScorer, step_planner: StepPlanner | None, problems: Sequence[TuningProblem],
             batch_problems: int, planner_weight: float) -> dict[str, float]:
    """Validation pointer and planner losses and top-1; `loss` is their weighted sum, the
    number early stopping watches."""
    encoder.model.eval()
    pointer.eval()
    if step_planner is not None:
        step_planner.eval()
    total, right, n, plan_total, plan_right, plan_n = 0.0, 0, 0, 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(problems), batch_problems):
            chunk = [p for p in problems[start : start + batch_problems] if p.examples]
            if not chunk:
                continue
            batch = batch_tensors(encoder, chunk)
            loss, ranks = pointer_loss(pointer, batch)
            total += float(loss) * len(ranks)
            right += int((ranks == 0).sum())
            n += len(ranks)
            plan, plan_hits = planner_loss(step_planner, batch)
            plan_total += float(plan) * len(plan_hits)
            plan_right += int(plan_hits.sum())
            plan_n += len(plan_hits)
    pointer_mean, planner_mean = total / max(n, 1), plan_total / max(plan_n, 1)
    return {"loss": pointer_mean + planner_weight * planner_mean, "pointer_loss": pointer_mean, "top1": right, "n": n,
            "top1_rate": right / max(n, 1), "planner_loss": planner_mean, "planner_top1": plan_right, "planner_n": plan_n,
            "planner_top1_rate": plan_right / max(plan_n, 1)}


@dataclass
class TuningResult:
    backbone_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    best_epoch: int


@contextlib.contextmanager
def repeatable_kernels():
    """Torch's deterministic kernels for the duration (`warn_only`: an op without one warns on a
    GPU instead of stopping the run). Why: on 2 CPU threads the tuning was not bitwise repeatable
    whenever another process competed for the cores — two `make run`s of the same code got
    backbones 6e-5 apart, which the int8 read turned into features 0.24 apart and 47 vs 44 right
    of 500. With these kernels, 160 problems tuned (2 threads) on a quiet machine and beside a busy
    process gave the same weights, where without them each loaded run gave others; a 320-problem
    run took the same time either way (~45 s)."""
    before, before_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def tune(encoder: Encoder, train: Sequence[TuningProblem], validation: Sequence[TuningProblem], cfg: C3Config, log=print,
         progress: bool = True, n_planner_classes: int = 0) -> TuningResult:
    """Train the backbone's top `cfg.fine_tune_layers` layers with a fresh pointer (and, when
    the problems carry planner states and `cfg.fine_tune_planner_weight` > 0, a fresh step
    planner over `n_planner_classes` classes: loss = pointer + weight · planner) for up to
    `cfg.fine_tune_epochs` epochs; early stopping on the validation loss with
    `cfg.early_stopping_patience`, the best epoch's backbone kept. Bitwise repeatable on a CPU
    (`repeatable_kernels`)."""
    with repeatable_kernels():
        return _tune(encoder, train, validation, cfg, log, progress, n_planner_classes)


def _tune(encoder: Encoder, train: Sequence[TuningProblem], validation: Sequence[TuningProblem], cfg: C3Config, log,
          progress: bool, n_planner_classes: int) -> TuningResult:
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    train = [p for p in train if p.examples]
    first = train[0].examples[0]
    pointer = c3_model.PointerScorer(len(first.query), first.text_features.shape[1], first.numeric.shape[1], cfg.hidden_size, cfg.dropout)
    pointer.to(encoder.model.device)
    with_planner = cfg.fine_tune_planner_weight > 0 and all(p.planner_states is not None for p in [*train, *validation])
    step_planner = (StepPlanner(train[0].planner_states.shape[1], cfg.hidden_size, n_planner_classes, cfg.dropout).to(encoder.model.device)
                    if with_planner else None)
    heads = list(pointer.parameters()) + (list(step_planner.parameters()) if step_planner is not None else [])
    backbone_params = trainable_parameters(encoder.model, cfg.fine_tune_layers)
    optimizer = torch.optim.AdamW([{"params": backbone_params, "lr": cfg.learning_rate},
                                   {"params": heads, "lr": cfg.head_learning_rate}], weight_decay=cfg.weight_decay)
    weight = cfg.fine_tune_planner_weight if with_planner else 0.0
    history, best, best_state, best_epoch, stale = [], math.inf, None, 0, 0
    for epoch in range(1, cfg.fine_tune_epochs + 1):
        encoder.model.train()
        pointer.train()
        if step_planner is not None:
            step_planner.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        total, n = 0.0, 0
        batches = range(0, len(order), cfg.fine_tune_batch_problems)
        for start in tqdm(batches, desc=f"tune backbone, epoch {epoch}", unit="batch", disable=not progress):
            batch = batch_tensors(encoder, [train[i] for i in order[start : start + cfg.fine_tune_batch_problems]])
            loss, _ = pointer_loss(pointer, batch)
            plan, _ = planner_loss(step_planner, batch)
            loss = loss + weight * plan
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch["gold"])
            n += len(batch["gold"])
        scores = validate(encoder, pointer, step_planner, validation, cfg.fine_tune_batch_problems, weight)
        record = {"epoch": epoch, "train_loss": total / max(n, 1), "validation_loss": scores.pop("loss"), **scores}
        history.append(record)
        log(f"tune backbone epoch {epoch}: train loss {record['train_loss']:.4f}, validation loss {record['validation_loss']:.4f} "
            f"(pointer {scores['pointer_loss']:.4f}, planner {scores['planner_loss']:.4f}); pointer top-1 {scores['top1_rate']:.3f} "
            f"of {scores['n']}, planner top-1 {scores['planner_top1_rate']:.3f} of {scores['planner_n']}")
        if record["validation_loss"] < best - cfg.min_improvement:
            best, best_epoch, stale = record["validation_loss"], epoch, 0
            best_state = {k: v.detach().clone() for k, v in encoder.model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.early_stopping_patience:
                log(f"tune backbone: early stop after epoch {epoch}; best epoch {best_epoch}")
                break
    if best_state is not None:
        encoder.model.load_state_dict(best_state)
    encoder.model.eval()
    for p in encoder.model.parameters():
        p.requires_grad_(False)
    return TuningResult({k: v for k, v in encoder.model.state_dict().items()}, history, best_epoch)


def save_encoder_files(encoder: Encoder) -> dict[str, bytes]:
    """The encoder as an ordinary HF folder's files (weights as safetensors), for the store."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        encoder.model.save_pretrained(folder, safe_serialization=True)
        encoder.tokenizer.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}


def load_student_encoder(store: Any, tuned: Any | None, name: str, max_length: int, cache_dir: str, device: str = "cpu") -> Encoder:
    """The backbone the student reads problems with: `name` as it is, or, when `tuned` (an
    artifact ref of stage 04's `student_backbone`) is given, its tuned weights, copied once
    from the store into `<cache_dir>/backbones/<digest>/` (from_pretrained reads folders).
    The artifact's manifest metadata lists the folder's files (`backbone_files`)."""
    if tuned is None:
        return load_encoder(name, max_length, device)
    import os
    import shutil
    import tempfile

    folder = Path(cache_dir) / "backbones" / tuned.digest
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed into place, so a reader never sees half a folder.
        staging = Path(tempfile.mkdtemp(prefix=f".{tuned.digest}-", dir=folder.parent))
        for file in store.manifest(tuned).metadata["backbone_files"]:
            (staging / file).write_bytes(store.read_file(tuned, file))
        try:
            os.rename(staging, folder)
        except OSError:  # another process put it there first
            shutil.rmtree(staging, ignore_errors=True)
    return load_encoder(str(folder), max_length, device)
