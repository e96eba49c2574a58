"""The Mycelium flow end to end with the real embedded teacher, on a few sample problems.

Runs under Prefect's test harness (a real, temporary Prefect server). Checks what a user
would notice: a report with figures, a second run that recomputes nothing, a config change
that recomputes only what depends on it, and a deleted or corrupted artifact that is
recomputed instead of used — on a local folder and on S3 (moto on loopback).
"""

from __future__ import annotations

import json
import posixpath

import polars as pl
import pytest
from prefect.testing.utilities import prefect_test_harness

from mycelium.config import Settings, load_config
from mycelium.store import ArtifactStore

# Four problems in two chunks, with named heads so the 270-head ranking is not needed here
# (test_auto_heads_ranking covers it).
FAST = [
    "dataset.limit=4",
    "extraction.chunk_size=2",
    "extraction.computing_heads=[L23H2, L18H6]",
]


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=90):
        yield


def run_flow(overrides=(), stages="00-01"):
    from flows.pipeline import mycelium

    report_path = mycelium(overrides=[*FAST, *overrides], stages=stages, smoke=True)
    store = ArtifactStore.from_settings(Settings())
    summary = json.loads(store.fs.cat_file(posixpath.join(posixpath.dirname(report_path), "summary.json")))
    return report_path, summary, store


def test_end_to_end_then_nothing_recomputed(storage_root):
    report_path, summary, store = run_flow()

    assert store.fs.exists(report_path)
    report = store.fs.cat_file(report_path).decode()
    assert "## Stage 01" in report and "random at same rate" in report
    folder = posixpath.dirname(report_path)
    for figure in ("iaf_trace.png", "heartbeats_by_level.png"):
        assert store.fs.size(posixpath.join(folder, figure)) > 1000
    assert summary["n_extracted"] == 4
    assert summary["heads"] == ["L23H2", "L18H6"]
    assert set(summary["steps_computed"]) == {"problems", "heads", "traces", "heartbeats"}
    assert summary["boundary_f1_n"] == 4
    assert 0 <= summary["boundary_f1"] <= 1 and summary["boundary_f1_low"] <= summary["boundary_f1"] <= summary["boundary_f1_high"]
    # Prefect's persisted results live in the same store (and so in the bucket for S3).
    assert store.fs.glob(posixpath.join(store.root, "prefect-results", "*"))

    _, again, _ = run_flow()
    assert again["steps_computed"] == []
    assert set(again["steps_cached"]) == {"problems", "heads", "traces", "heartbeats"}
    assert again["chunks_computed"] == 0 and again["chunks_cached"] == 2
    assert again["boundary_f1"] == summary["boundary_f1"]


@pytest.fixture
def local_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MYCELIUM_STORAGE_ROOT", str(tmp_path / "store"))


def test_config_change_recomputes_only_what_depends_on_it(local_root):
    run_flow()
    _, changed, _ = run_flow(["heartbeat.iaf_threshold=0.3"])
    assert changed["steps_computed"] == ["heartbeats"]
    assert set(changed["steps_cached"]) == {"problems", "heads", "traces"}

    _, changed_extraction, _ = run_flow(["extraction.sink_tokens=2"])
    assert set(changed_extraction["steps_computed"]) == {"heads", "traces", "heartbeats"}


def test_deleted_or_corrupted_artifact_is_recomputed(local_root):
    _, first, store = run_flow()
    traces_dir = store.fs.glob(posixpath.join(store.root, "artifacts", "traces", "*"))[0]

    store.fs.rm(traces_dir, recursive=True)
    _, after_delete, _ = run_flow()
    assert "traces" in after_delete["steps_computed"]
    assert after_delete["chunks_computed"] == 2
    assert after_delete["n_extracted"] == first["n_extracted"]

    part = posixpath.join(traces_dir, "tokens", "part-00001.parquet")
    store.fs.pipe_file(part, store.fs.cat_file(part)[:-10] + b"0123456789")
    _, after_corruption, _ = run_flow()
    assert "traces" in after_corruption["steps_computed"]
    assert after_corruption["chunks_computed"] == 1  # only the corrupted chunk's part is rewritten
    tokens = store.read(ArtifactStore.from_settings(Settings()).ref("traces", posixpath.basename(traces_dir)), "tokens")
    assert tokens.select("problem_id", "head", "token_index").is_duplicated().sum() == 0


def test_stage_range_needs_upstream_artifacts(local_root):
    from mycelium.errors import MyceliumError

    with pytest.raises(MyceliumError, match="needs stage 00's artifact"):
        run_flow(stages="01")
    run_flow(stages="00")
    _, summary, _ = run_flow(["heartbeat.min_run_length=3"], stages="01")
    assert summary["steps_computed"] == ["heartbeats"]


def test_auto_heads_ranking(local_root):
    _, summary, store = run_flow(["extraction.computing_heads=auto", "extraction.calibration_problems=1", "extraction.auto_top_k=3"])
    assert len(summary["heads"]) == 3
    ranking_dir = store.fs.glob(posixpath.join(store.root, "artifacts", "heads", "*"))[0]
    ranking = pl.read_parquet(posixpath.join(ranking_dir, "ranking", "part-00000.parquet"))
    assert ranking.height == 30 * 9  # every head of SmolLM2 scored
    assert ranking.sort("rank")["head"].head(3).to_list() == summary["heads"]


def test_report_is_published_as_prefect_artifacts(local_root):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    run_flow()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mycelium-report", "mycelium-summary"]))
        )
    kinds = {artifact.key: artifact.type for artifact in artifacts}
    assert kinds.get("mycelium-report") == "markdown"
    assert kinds.get("mycelium-summary") == "table"


def test_io_errors_are_retried_and_user_errors_are_not(local_root):
    from prefect import flow, task

    from mycelium.config import load_config
    from mycelium.errors import DatasetError
    from mycelium.orchestration import cache_options, configure_result_storage

    attempts = {"io": 0, "user": 0}

    @task
    def flaky_io() -> str:
        attempts["io"] += 1
        if attempts["io"] == 1:
            raise ConnectionError("connection reset by peer")
        return "ok"

    @task
    def bad_input() -> str:
        attempts["user"] += 1
        raise DatasetError("problems.jsonl: no such file")

    storage = load_config(overrides=["storage.io_retry_backoff_seconds=0"]).storage

    @flow
    def probe() -> str:
        result_storage = configure_result_storage(ArtifactStore.from_settings(Settings()))
        value = flaky_io.with_options(**cache_options("probe-io", False, storage, result_storage))()
        try:
            bad_input.with_options(**cache_options("probe-user", False, storage, result_storage))()
        except DatasetError:
            pass
        return value

    assert probe() == "ok"
    assert attempts == {"io": 2, "user": 1}


def test_stage_02_steps_and_templates_need_only_the_problems(local_root):
    report_path, summary, store = run_flow(stages="02")
    assert set(summary["steps_computed"]) == {"problems", "steps", "templates"}
    assert summary["steps_n"] >= 4  # at least one validated step per sample problem
    assert summary["steps_by_route"].get("gsm8k_annotation", 0) >= 1
    assert summary["templates_n_templates"] == summary["kmeans_k"] >= 1
    # Null correction is applied and reported beside the raw value, for both clusterings.
    assert summary["widest_k"] == summary["widest_kmeans_k"] >= summary["templates_n_templates"]
    for prefix in ("templates_i_ty_bits", "kmeans_i_ty_bits", "widest_kmeans_i_ty_bits"):
        assert abs(summary[f"{prefix}_raw"] - summary[f"{prefix}_null_mean"] - summary[f"{prefix}_corrected"]) < 1e-9
    report = store.fs.cat_file(report_path).decode()
    assert "## Stage 02" in report and "k-means, same K (no Y)" in report
    assert store.fs.size(posixpath.join(posixpath.dirname(report_path), "elbow.png")) > 1000

    _, again, _ = run_flow(stages="02")
    assert again["steps_computed"] == []


def test_stage_03_training_sets_after_00_to_02(local_root):
    from mycelium.errors import MyceliumError

    # Stage 03 reads stage 01's heartbeat counts: alone on a fresh root it says what to run.
    with pytest.raises(MyceliumError, match=r"stage 03 needs stage 00's artifact.*--stages 00-03"):
        run_flow(stages="03")

    report_path, summary, store = run_flow(stages="00-03")
    assert "training_sets" in summary["steps_computed"]
    funnel = {row["filter"]: row for row in summary["training_funnel"]}
    assert funnel["no_steps"]["in"] == summary["training_n_problems"] == 4
    assert summary["training_c2_problems"] == funnel["chain_answer_mismatch"]["kept"] >= 1
    assert summary["training_c3_problems"] == funnel["operand_unexplained"]["kept"]
    assert summary["training_c2_heartbeats_known"] == summary["training_c2_problems"]  # every kept problem was extracted
    report = store.fs.cat_file(report_path).decode()
    assert "## Stage 03" in report and "| provenance |" in report
    assert store.fs.size(posixpath.join(posixpath.dirname(report_path), "data_card.png")) > 1000

    # Only stage 03 selected now: it reuses 00-02 and recomputes nothing.
    _, again, _ = run_flow(stages="03")
    assert again["steps_computed"] == []
    # A stage-03 setting recomputes only stage 03.
    _, changed, _ = run_flow(["training_data.validation_fraction=0.5"], stages="00-03")
    assert changed["steps_computed"] == ["training_sets"]


def test_stage_04_trains_c2_and_a_head_setting_reuses_the_features(local_root):
    # Seed 2 puts two of these four sample problems in each split (a hash split of four
    # problems can leave one side empty, which stage 04 refuses in one line).
    overrides = ["training_data.validation_fraction=0.5", "training_data.split_seed=2", "c2.max_epochs=3"]
    report_path, summary, store = run_flow(overrides, stages="00-04")
    assert {"student_backbone", "c2_features", "c2_model"} <= set(summary["steps_computed"])
    assert summary["backbone_tuning_validation_top1"]["n"] >= 1  # the tuned backbone's own pointer check
    assert summary["c2_n_train"] + summary["c2_n_validation"] == summary["training_c2_problems"]
    assert 1 <= summary["c2_epochs_run"] <= 3
    for key in ("c2_all_correct", "c2_label_prior_all_correct", "c2_most_common_set_any_correct"):
        rate = summary[key]
        assert rate["n"] == summary["c2_n_validation"] and rate["low"] <= rate["rate"] <= rate["high"]
    report = store.fs.cat_file(report_path).decode()
    assert "## Stage 04" in report and "label prior (no text)" in report
    folder = posixpath.dirname(report_path)
    assert store.fs.size(posixpath.join(folder, "training_curve.png")) > 1000
    model_folder = posixpath.join(store.root, "artifacts", "c2_model")
    assert store.fs.glob(posixpath.join(model_folder, "*", "files", "c2_heads.safetensors"))

    _, changed, _ = run_flow([*overrides, "c2.hidden_size=64"], stages="00-04")
    assert changed["steps_computed"] == ["c2_model"]
    # Without tuning there is no such step, and C2 reads with the backbone as shipped.
    _, frozen, _ = run_flow([*overrides, "c3.unfreeze=never"], stages="00-04")
    assert frozen["steps_computed"] == ["c2_features", "c2_model"] and "student_backbone" not in frozen["steps_cached"]
    # The other read precision re-reads the problems, but tunes nothing again (tuning is float32).
    other = "float32" if load_config(None, []).c3.read_precision == "int8" else "int8"
    _, precision, _ = run_flow([*overrides, f"c3.read_precision={other}"], stages="00-04")
    assert precision["steps_computed"] == ["c2_features", "c2_model"] and "student_backbone" in precision["steps_cached"]


STUDENT = [
    "training_data.validation_fraction=0.5",
    "training_data.split_seed=2",  # two of the four problems in each split (see the stage 04 test)
    "c2.max_epochs=2",
    "c3.max_epochs=2",
    "eval.teacher_problems=2",
    "eval.teacher_latency_problems=1",  # one timed alone, one batched (untimed)
    "eval.teacher_max_new_tokens=8",
]


def test_stages_05_06_train_c3_and_evaluate_then_eval_another_dataset(local_root, tmp_path):
    report_path, summary, store = run_flow(STUDENT, stages="00-06")
    assert {"c3_features", "c3_model", "evaluation"} <= set(summary["steps_computed"])
    assert summary["c3_top1"]["n"] >= 1 and 0 <= summary["c3_chance_top1"] <= 1
    n = summary["eval_n_problems"]
    assert n == summary["c2_n_validation"] == 2  # the held-out split
    assert summary["eval_student_accuracy"]["n"] == summary["eval_nearest_accuracy"]["n"] == n
    assert summary["eval_teacher_accuracy"]["n"] == 2
    assert summary["eval_latency_teacher_all"]["n"] == summary["eval_teacher_over_student_latency_n"] == 1
    # The oracle (gold steps and operands through C4) gets GSM8K problems right by construction.
    assert summary["eval_oracle_accuracy"]["correct"] == summary["eval_oracle_accuracy"]["n"] == n
    assert summary["eval_gold_plan_accuracy"]["n"] == summary["eval_mcnemar_student_vs_gold_plan"]["n_pairs"] == n
    report = store.fs.cat_file(report_path).decode()
    assert "## Stage 05" in report and "## Stage 06" in report and "McNemar" in report and "| gold_plan |" in report
    assert "| latency (ms) | n | p50 [95% bootstrap interval] | p95 |" in report
    # both problems have readable gold steps, so both sit in the per-length table and its figure
    assert sum(g["n"] for g in summary["eval_by_gold_steps"].values()) == n
    assert "| gold steps | n | student | in pool |" in report and "accuracy_by_length.png" in report
    assert summary["planner_top1"]["n"] >= 2 and "Step planner" in report  # a state per gold step, and STOP
    assert "## Stage 05 — chain verifier" in report and summary["verifier_search_right"]["n"] == n
    defaults = load_config(None, [])  # the verifier learns from a wider search than stage 06 runs, and says so
    assert f"search beam {defaults.verifier.pool_beam_width}, validation at stage 06's {defaults.eval.beam_width}" in report

    # `mycelium eval --dataset` on a JSONL with its own field names: a text that must never
    # run, a gold solution whose arithmetic would never finish, and an ordinary problem.
    marker = tmp_path / "pwned"
    rows = [
        {"q": f"__import__('os').system('touch {marker}') apples cost 3 and 4. Total?", "a": "7", "sol": "3+4 = <<3+4=7>>7\n#### 7"},
        {"q": "A tower has 9 floors of 9 rooms. How many rooms?", "a": "81", "sol": "<<9**9**9**9=1>>\n#### 81"},
        {"q": "Tom has 5 apples and buys 3 more. How many apples does he have?", "a": "8", "sol": "5+3 = <<5+3=8>>8\n#### 8"},
    ]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from mycelium.cli import main

    fields = ["eval.fields={problem: [q], solution: [sol, a], answer: [a], level: [level], subject: [subject]}"]
    args = ["eval", "--smoke", "--dataset", str(data)]
    for override in [*FAST, *STUDENT, *fields]:
        args += ["--set", override]
    assert main(args) == 0
    assert not marker.exists()
    results_path = store.fs.glob(posixpath.join(store.root, "artifacts", "evaluation", "*", "results", "*.parquet"))
    tables = [pl.read_parquet(store.fs.cat_file(p)) for p in results_path]
    mine = next(t for t in tables if "81" in t["gold"].to_list())  # this dataset's artifact, not the validation one
    assert sorted(mine["gold"].to_list()) == ["7", "8", "81"] and mine["student_correct"].dtype == pl.Boolean
    assert mine.filter(pl.col("gold") == "81")["oracle_answer"][0] is None  # the hanging step was cut off, not run forever


def test_a_search_setting_reuses_the_cached_teacher_chain_of_thought(local_root):
    # the float32 student: the one whose stage 06 read has two runtimes to choose from
    float32 = [*STUDENT, "c3.read_precision=float32"]
    run_flow(float32, stages="00-06")
    _, changed, _ = run_flow([*float32, "eval.voting=majority"], stages="00-06")
    # the verifier keeps the epoch whose scores vote best, so it follows the voting rule too
    assert changed["steps_computed"] == ["verifier", "evaluation"]
    assert "teacher_cot" in changed["steps_cached"]

    # Reading the problems with PyTorch instead of ONNX Runtime redoes only stage 06, and the
    # student, reading the same features to float rounding, answers the same.
    _, eager, store = run_flow([*float32, "eval.voting=majority", "eval.backbone_runtime=torch"], stages="00-06")
    assert eager["steps_computed"] == ["evaluation"]
    manifests = sorted(store.fs.glob(posixpath.join(store.root, "artifacts", "evaluation", "*", "manifest.json")), key=store.fs.modified)
    onnx_read, torch_read = (pl.concat([pl.read_parquet(store.fs.cat_file(part)) for part in store.fs.glob(posixpath.join(posixpath.dirname(m), "results", "*.parquet"))]).sort("problem_id")
                             for m in manifests[-2:])
    for column in ("problem_id", "student_answer", "student_labels", "student_expression", "nearest_answer"):
        assert onnx_read[column].to_list() == torch_read[column].to_list(), column


def test_retraining_does_not_redo_the_teacher_on_an_external_dataset(tmp_path):
    """The teacher's answers on `eval.dataset` do not depend on the training sets; on the
    held-out split (eval.dataset unset) they do, since the split decides the problems."""
    from mycelium.config import load_config
    from tasks.teacher_cot import teacher_ref

    store = ArtifactStore(str(tmp_path / "store"))
    problems = store.ref("problems", "p" * 20)
    trained_once, trained_again = store.ref("training_sets", "a" * 20), store.ref("training_sets", "b" * 20)
    external = load_config(None, ["eval.dataset=../shared/data/gsm8k/test.jsonl"])
    assert teacher_ref(store, external, problems, trained_once) == teacher_ref(store, external, problems, trained_again)
    held_out = load_config(None, ["eval.dataset=null"])
    assert teacher_ref(store, held_out, problems, trained_once) != teacher_ref(store, held_out, problems, trained_again)


def test_teacher_only_settings_do_not_retrain_the_verifier(tmp_path):
    """The chain verifier learns from the student's searches; how the teacher's baseline is run
    (how many problems, batched or timed) must not cost its ~20 minutes again."""
    from tasks.train_verifier import verifier_ref

    store = ArtifactStore(str(tmp_path / "store"))
    inputs = {name: store.ref(name, name[0] * 20) for name in ("c3_model", "training_sets")}
    base = verifier_ref(store, load_config(None), inputs)
    teacher_only = ["eval.teacher_problems=7", "eval.teacher_batch_size=4", "eval.teacher_latency_problems=0", "eval.teacher_max_new_tokens=9",
                    "eval.backbone_runtime=torch", "eval.int8_read_threads=2"]  # stage 06's read only; the verifier's pools do not depend on it
    assert verifier_ref(store, load_config(None, teacher_only), inputs) == base
    assert verifier_ref(store, load_config(None, ["eval.beam_width=5"]), inputs) != base
