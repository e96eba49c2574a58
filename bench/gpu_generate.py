"""Signal extraction overhead in generate mode on a 7B-sized teacher on a GPU.

Reads:  nothing: the model is a randomly initialised Qwen2 with Qwen2-7B's shapes (hidden
        3584, 28 layers, 28 query / 4 kv heads, intermediate 18944, vocab 152064), bf16 on
        cuda. Random weights cost the same FLOPs and memory traffic as trained ones; only
        the attention patterns (and so the signal values) are meaningless.
Writes: nothing; prints one table.
Time:   on one H100, ~2 minutes with the defaults (3 prompts × 2 arms × 256 new tokens after
        a warm-up); with --tiny on 2 CPU cores (10 prompts), ~40 s.
You see: generated tokens/s of plain sdpa `generate` and of the same generation with the
        signal attention function and a collector for --heads (default 4 heads in 4 layers),
        their ratio, and peak GPU memory of each arm. Target: overhead <= 25%. Qwen's own
        figure for Qwen2-7B-Instruct, HF bf16, batch 1 on an A100, is ~38 tokens/s.
Generation never stops early: the random model has no end-of-sequence token, so every arm
writes exactly --new-tokens tokens. Arms alternate prompt by prompt, order rotating; the
headline is the median over prompts of the paired per-token ratio, and the load average is
printed so a run disturbed by other work is visible.

    python bench/gpu_generate.py [--prompt-tokens 300] [--new-tokens 256] [--prompts 3]
    python bench/gpu_generate.py --tiny       # shrunk config on CPU, to check the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mycelium.config import load_config  # noqa: E402
from mycelium.teacher import Teacher  # noqa: E402
from tasks.extract_attention import (  # noqa: E402
    ROLE_PROBLEM,
    ROLE_SINK,
    ROLE_TEMPLATE,
    SIGNAL_ATTENTION,
    PreparedProblem,
    SignalCollector,
    parse_heads,
    register_signal_attention,
    run_teacher,
)

OVERHEAD_TARGET_PERCENT = 25.0
QWEN2_7B_SHAPE = dict(
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
    max_position_embeddings=32768,
)
TINY_SHAPE = dict(
    hidden_size=256,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=688,
    vocab_size=4096,
    max_position_embeddings=4096,
)
DEFAULT_HEADS = {"full": "L7H3,L14H10,L21H5,L27H20", "tiny": "L2H1,L4H3,L6H5,L7H7"}
# Share of the synthetic prompt that plays the problem text; the rest is template. A GSM8K
# chat prompt is about half problem text.
PROBLEM_SHARE = 0.5
BYTES_PER_GB = 1 << 30
# More, shorter-lived pairs on a shared CPU, where other work makes single timings noisy.
GPU_PROMPTS, TINY_PROMPTS = 3, 10


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    register_signal_attention()
    config = Qwen2Config(
        **(TINY_SHAPE if tiny else QWEN2_7B_SHAPE),
        attn_implementation="sdpa",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # never stop early: every arm writes the same count
    model.generation_config.pad_token_id = 0
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="shrunk config, runs on CPU (float32) to check the script")
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=None, help="default 3 on a GPU, 10 with --tiny (noisier)")
    parser.add_argument("--heads", default=None, help="comma-separated, e.g. L7H3,L14H10")
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    args = parser.parse_args()

    if args.prompts is None:
        args.prompts = TINY_PROMPTS if args.tiny else GPU_PROMPTS
    if args.tiny:
        device, dtype = "cpu", torch.float32
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
    else:
        sys.exit(
            "gpu_generate: no GPU visible to torch. Run it on a CUDA machine, or add --tiny to check the script on CPU."
        )

    cfg = load_config(args.config, ["extraction.mode=generate", f"teacher.max_new_tokens={args.new_tokens}"])
    model = build_model(args.tiny, device, dtype)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    teacher = Teacher(
        model=model,
        tokenizer=None,
        name="random Qwen2" + (" (tiny)" if args.tiny else "-7B shape"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=model.config.num_key_value_heads,
        device=device,
    )
    heads = parse_heads((args.heads or DEFAULT_HEADS["tiny" if args.tiny else "full"]).split(","), n_layers, n_heads)

    generator = np.random.default_rng(0)
    n_problem = int(args.prompt_tokens * PROBLEM_SHARE)
    roles = np.full(args.prompt_tokens, ROLE_TEMPLATE, dtype=np.int8)
    roles[: cfg.extraction.sink_tokens] = ROLE_SINK
    roles[args.prompt_tokens - n_problem - 1 : args.prompt_tokens - 1] = ROLE_PROBLEM
    prompts = [
        PreparedProblem(
            f"synthetic-{i}",
            generator.integers(1, model.config.vocab_size, args.prompt_tokens).tolist(),
            roles,
            None,
            None,
            None,
        )
        for i in range(args.prompts + 1)  # the first one warms up
    ]

    def plain(prompt: PreparedProblem) -> int:
        model.set_attn_implementation("sdpa")
        ids = torch.tensor([prompt.prompt_ids], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
        )
        return out.shape[1] - ids.shape[1]

    def signals(prompt: PreparedProblem) -> int:
        model.set_attn_implementation(SIGNAL_ATTENTION)
        collector = SignalCollector(heads, torch.from_numpy(prompt.prompt_roles), cfg.extraction.max_memory_mb << 20)
        text_ids = run_teacher(teacher, prompt, collector, "generate", cfg.teacher)
        collector.signals()  # brings the signals to the host, as extraction does
        return len(text_ids)

    arms = {"plain sdpa generate": plain, f"sdpa + signals ({len(heads)} heads)": signals}
    names = list(arms)
    seconds = dict.fromkeys(names, 0.0)
    tokens = dict.fromkeys(names, 0)
    ratios: list[float] = []
    peak_gb = dict.fromkeys(names, 0.0)

    def timed(name: str, prompt: PreparedProblem) -> tuple[float, int]:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        written = arms[name](prompt)
        if device == "cuda":
            torch.cuda.synchronize()
            peak_gb[name] = max(peak_gb[name], torch.cuda.max_memory_allocated() / BYTES_PER_GB)
        return time.perf_counter() - started, written

    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        for name in names:
            timed(name, prompts[0])
        for i, prompt in enumerate(prompts[1:]):
            order = names if i % 2 == 0 else names[::-1]
            this_prompt = {}
            for name in order:
                elapsed, written = timed(name, prompt)
                seconds[name] += elapsed
                tokens[name] += written
                this_prompt[name] = elapsed / written
            ratios.append(this_prompt[names[1]] / this_prompt[names[0]])

    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    n_params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"\n{teacher.name} ({n_params:.2f} B params, {str(dtype).removeprefix('torch.')}) on {where}")
    print(
        f"{args.prompts} prompts × {args.prompt_tokens} tokens, {args.new_tokens} new tokens each; "
        f"heads {', '.join(h.name for h in heads)}"
    )
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"{'arm':30} {'new tokens':>10} {'seconds':>8} {'tokens/s':>9} {'vs plain':>9} {'peak GPU GB':>12}")
    for name in names:
        peak = f"{peak_gb[name]:12.2f}" if device == "cuda" else f"{'-':>12}"
        print(
            f"{name:30} {tokens[name]:10d} {seconds[name]:8.2f} {tokens[name] / seconds[name]:9.1f} "
            f"{(seconds[name] / tokens[name]) / (seconds[names[0]] / tokens[names[0]]):8.3f}x {peak}"
        )
    overhead = 100.0 * (statistics.median(ratios) - 1.0)
    verdict = "OK" if overhead <= OVERHEAD_TARGET_PERCENT else "OVER TARGET"
    print(
        f"signal extraction overhead in generate mode (median paired, per token): {overhead:+.1f}% "
        f"(target <= {OVERHEAD_TARGET_PERCENT:.0f}%): {verdict}"
    )


if __name__ == "__main__":
    main()
