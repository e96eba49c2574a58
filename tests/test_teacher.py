"""Teacher loading: the embedded GGUF teacher, its cached conversion, prompts, and one-line
errors for models that cannot be loaded.

Time: ~22 s on 2 cores (the parallel-conversion test converts the GGUF in two fresh processes),
~16 s more when the session's teacher is not converted yet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mycelium.errors import ModelError
from mycelium.teacher import COMPLETE_MARKER, build_prompt, embedded_teacher_folder, load_teacher

# The embedded teacher and friends as session fixtures (not a conftest: that is the suite's).
pytest_plugins = ["tests.teacher_fixtures"]

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_teacher_has_the_documented_shape(teacher):
    assert (teacher.n_layers, teacher.n_heads, teacher.n_kv_heads) == (30, 9, 3)
    assert teacher.device == "cpu" and not teacher.model.training


def test_chat_prompt_knows_where_the_problem_is(teacher):
    problem = "Tom has 3 boxes with 12 apples each. How many apples?"
    prompt = build_prompt(teacher.tokenizer, problem, use_chat_template=True)
    assert prompt.text[prompt.problem_start : prompt.problem_end] == problem
    assert prompt.text.startswith("<|im_start|>") and prompt.text.endswith("<|im_start|>assistant\n")
    plain = build_prompt(teacher.tokenizer, problem, use_chat_template=False)
    assert plain.text == problem + "\n" and (plain.problem_start, plain.problem_end) == (0, len(problem))


def _one_line_model_error(teacher_cfg, cache_dir) -> str:
    with pytest.raises(ModelError) as error:
        load_teacher(teacher_cfg, cache_dir)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_or_wrong_models_raise_one_line_model_errors(config, cache_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    assert str(missing) in _one_line_model_error(config.teacher.model_copy(update={"model": str(missing)}), cache_dir)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"0")
    assert "not a .gguf" in _one_line_model_error(config.teacher.model_copy(update={"model": str(not_gguf)}), cache_dir)
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    assert "config.json" in _one_line_model_error(
        config.teacher.model_copy(update={"model": str(empty_folder)}), cache_dir
    )
    broken_gguf = tmp_path / "broken.gguf"
    broken_gguf.write_bytes(b"not a gguf file at all")
    assert str(broken_gguf) in _one_line_model_error(
        config.teacher.model_copy(update={"model": str(broken_gguf)}), cache_dir
    )
    unknown = config.teacher.model_copy(update={"model": "embedded:gpt-17"})
    assert "embedded:gpt-17" in _one_line_model_error(unknown, cache_dir)


def test_two_processes_converting_at_once_leave_one_usable_folder(tmp_path, config):
    fresh_cache = tmp_path / "cache"
    # Leftovers of a conversion that died half-way: a folder without its marker and a staging folder.
    half_written = fresh_cache / "teachers" / "smollm2-135m-instruct"
    half_written.mkdir(parents=True)
    (half_written / "config.json").write_text("{}")
    (fresh_cache / "teachers" / ".smollm2-135m-instruct.tmp-1-dead").mkdir()
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); "
        "from mycelium.teacher import embedded_teacher_folder; "
        "print(embedded_teacher_folder('smollm2-135m-instruct', sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(fresh_cache)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stderr[-2000:]
    folders = {stdout.strip() for stdout, _ in outputs}
    assert len(folders) == 1
    # One process converted; the other waited on the lock and reused its folder.
    assert sum("converting SmolLM2-135M-Instruct" in stderr for _, stderr in outputs) == 1
    teachers = fresh_cache / "teachers"
    # Only the finished folder and the lock file remain: no half-written staging folders.
    assert sorted(p.name for p in teachers.iterdir()) == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"]
    folder = teachers / "smollm2-135m-instruct"
    assert (folder / COMPLETE_MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "config.json").read_text() != "{}"
    # A later call reuses it without converting again.
    assert embedded_teacher_folder("smollm2-135m-instruct", fresh_cache) == folder
    loaded = load_teacher(config.teacher, fresh_cache)
    assert loaded.n_layers == 30


def _short_generation(config, **eval_settings):
    return config.model_copy(update={"eval": config.eval.model_copy(update={"teacher_max_new_tokens": 24, **eval_settings})})


def test_batched_chain_of_thought_writes_what_one_at_a_time_writes(teacher, config, problems):
    from tasks.teacher_cot import greedy_texts

    cfg = _short_generation(config)
    texts = problems["problem"].to_list()  # three prompts of different lengths: the batch is padded
    one_at_a_time = [greedy_texts(teacher, [text], cfg)[0] for text in texts]
    assert all(one_at_a_time)
    assert greedy_texts(teacher, texts, cfg) == one_at_a_time


def test_only_the_problems_run_one_at_a_time_carry_a_latency(config, cache_dir, problems, monkeypatch):
    from tasks.teacher_cot import teacher_answers

    monkeypatch.setenv("MYCELIUM_CACHE_DIR", str(cache_dir))
    cfg = _short_generation(config, teacher_latency_problems=1, teacher_batch_size=2)
    outputs = teacher_answers(cfg, problems["problem"].to_list(), progress=False)
    assert len(outputs) == 3 and all(text for _, text, _ in outputs)
    seconds = [s for *_, s in outputs]
    assert seconds[0] > 0 and seconds[1:] == [None, None]
