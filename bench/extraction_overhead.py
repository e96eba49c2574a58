"""What signal extraction costs on top of the teacher's own forward pass (teacher-forced).

Reads:  GSM8K problems (default ../shared/data/gsm8k/train.jsonl, else the embedded GSM8K
        sample; or a path as the first argument), config.yaml (teacher, extraction).
Writes: nothing; prints one table.
Time:   ~30 s on 2 CPU cores with the defaults (20 problems × 3 rounds × 3 arms), plus the
        one-off GGUF conversion if the teacher is not cached yet.
You see: tokens/s (prompt + solution tokens per second) of
        plain     sdpa forward, no attentions (the teacher as it would run anyway);
        signals   the same model with the signal attention function and a collector for the
                  selected heads, including turning the signals into the tokens table;
        eager     eager attention with output_attentions=True (all heads' full rows kept),
                  the usual way to get attention out of transformers, for reference;
        and each arm's time relative to plain. Target: signals within +25% of plain.
The arms alternate problem by problem in a rotating order, so drift (thermal, other load)
hits all of them alike, and the headline overhead is the median over problems of the paired
ratio (each arm against the plain run of the same problem, moments apart), which a burst of
other work on a shared machine cannot skew the way it can skew a sum. The load average is
printed so a noisy run is visible.

    python bench/extraction_overhead.py [DATA] [--problems 20] [--rounds 3] [--heads L15H6,L21H8]
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

import torch  # noqa: E402

from mycelium.config import Settings, load_config  # noqa: E402
from mycelium.datasets import load_problems  # noqa: E402
from tasks.extract_attention import (  # noqa: E402
    SIGNAL_ATTENTION,
    SignalCollector,
    choose_heads,
    focus_columns,
    load_signal_teacher,
    parse_heads,
    prepare_problem,
    run_teacher,
    tokens_frame,
)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
FALLBACK_DATA = "embedded:gsm8k"
OVERHEAD_TARGET_PERCENT = 25.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA) if DEFAULT_DATA.exists() else FALLBACK_DATA)
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--heads", default=None, help="comma-separated, e.g. L15H6,L21H8; default: config (auto = ranked)"
    )
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--no-eager", action="store_true", help="skip the eager output_attentions arm")
    args = parser.parse_args()

    cfg = load_config(args.config, ["extraction.mode=teacher_forced"])
    problems = load_problems(cfg.dataset.model_copy(update={"source": args.data}), limit=args.problems).frame
    teacher = load_signal_teacher(cfg.teacher, Settings().cache_dir)
    if args.heads:
        heads = parse_heads(args.heads.split(","), teacher.n_layers, teacher.n_heads)
    else:
        heads, _ = choose_heads(teacher, problems, cfg.extraction, cfg.teacher, progress=False)
    model = teacher.model
    prepared = []
    for row in problems.iter_rows(named=True):
        problem, skip = prepare_problem(teacher, row, cfg.extraction, cfg.teacher, "teacher_forced")
        if skip is None:
            prepared.append(problem)
    n_tokens = sum(len(p.prompt_ids) + len(p.text_ids) for p in prepared)

    def plain(problem):
        model.set_attn_implementation("sdpa")
        ids = torch.tensor([problem.prompt_ids + problem.text_ids], device=teacher.device)
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def signals(problem):
        model.set_attn_implementation(SIGNAL_ATTENTION)
        collector = SignalCollector(heads, torch.from_numpy(problem.prompt_roles), cfg.extraction.max_memory_mb << 20)
        run_teacher(teacher, problem, collector, "teacher_forced", cfg.teacher)
        tokens_frame(
            problem.problem_id, heads, collector.signals(), problem.text, problem.text_spans,
            focus_columns(collector.focus(), problem.problem_char_spans),
        )

    def eager(problem):
        model.set_attn_implementation("eager")
        ids = torch.tensor([problem.prompt_ids + problem.text_ids], device=teacher.device)
        model(input_ids=ids, use_cache=False, logits_to_keep=1, output_attentions=True)

    arms = {"plain sdpa forward": plain, f"sdpa + signals ({len(heads)} heads)": signals}
    if not args.no_eager:
        arms["eager, output_attentions"] = eager
    seconds = dict.fromkeys(arms, 0.0)
    paired_ratios: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        for name in names:  # warm-up: first-call allocations and kernel selection
            arms[name](prepared[0])
        for round_index in range(args.rounds):
            for i, problem in enumerate(prepared):
                shift = (i + round_index) % len(names)
                this_problem = {}
                for name in names[shift:] + names[:shift]:
                    started = time.perf_counter()
                    arms[name](problem)
                    this_problem[name] = time.perf_counter() - started
                for name, elapsed in this_problem.items():
                    seconds[name] += elapsed
                    paired_ratios[name].append(elapsed / this_problem[names[0]])
    model.set_attn_implementation(SIGNAL_ATTENTION)

    total_tokens = n_tokens * args.rounds
    base = seconds[names[0]]
    print(
        f"\nteacher {teacher.name} on {teacher.device}, {torch.get_num_threads()} threads; "
        f"{len(prepared)} problems × {args.rounds} rounds, {n_tokens} tokens per round; "
        f"heads {', '.join(h.name for h in heads)}"
    )
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"{'arm':32} {'seconds':>8} {'tokens/s':>9} {'sum ratio':>10} {'median paired':>14}")
    for name in names:
        print(
            f"{name:32} {seconds[name]:8.2f} {total_tokens / seconds[name]:9.0f} "
            f"{seconds[name] / base:9.3f}x {statistics.median(paired_ratios[name]):13.3f}x"
        )
    overhead = 100.0 * (statistics.median(paired_ratios[names[1]]) - 1.0)
    verdict = "OK" if overhead <= OVERHEAD_TARGET_PERCENT else "OVER TARGET"
    print(
        f"signal extraction overhead (median paired): {overhead:+.1f}% "
        f"(target <= {OVERHEAD_TARGET_PERCENT:.0f}%): {verdict}"
    )


if __name__ == "__main__":
    main()
