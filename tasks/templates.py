"""Stage 02 — computation steps and operation templates by Information Bottleneck.

Reads:  the problems artifact (gold solutions), the `steps` and `ib` config sections.
Writes: artifact `steps`     tables `steps` (one row per kept step: problem_id, step_index,
                             route, expression, result, value, operator, label, line text),
                             `drops` (problem_id, family, reason, text) and `embeddings`
                             (problem_id, step_index, embedding) — X, cached on its own so an
                             IB setting change does not re-embed.
        artifact `templates` tables `templates` (id, size, label counts, top label, coherence,
                             depth, exemplar steps), `assignments` (problem_id, step_index,
                             template_id, kmeans_id), `curve` (the annealing path), files
                             `elbow.png` and `summary.json`.
Time:   full GSM8K train (23.7k steps): parsing ~25 s, embedding a few minutes on 2 cores,
        IB ~20 s, k-means a few seconds. The shipped sample: seconds.
You should see: how many steps each route produced and how many were dropped (by reason);
then the number of templates at the elbow, I(T;Y) raw and null-corrected, and the same for
k-means at the same K beside it.

Steps come from the gold text (GSM8K calculator annotations; MATH LaTeX equations), kept only
when re-executing them reproduces their written result (mycelium/steps.py). Stage 01's JSD
boundaries are not used to cut steps: on the embedded default they found line-break steps
worse than random placement (see the stage 01 report), so they would add noise, not steps.

X is the sentence embedding of the solution line that holds the step, with calculator
annotations removed (the text as a reader sees it), from `ib.embedding_model` — by default
all-MiniLM-L6-v2: a 22M sentence encoder trained for semantic similarity, cheap on a CPU,
and independent of the teacher, so templates do not inherit the teacher's quirks. Y is the
step's top sympy operator with Pow split into the seed's subtypes.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile

import numpy as np
import polars as pl
from prefect import get_run_logger, task

from mycelium import encoder as encoder_module
from mycelium import expressions, information_bottleneck, steps
from mycelium.config import C2Config, IBConfig, StepsConfig
from mycelium.errors import MyceliumError
from mycelium.reports import ReportSection
from mycelium.store import ArtifactRef, ArtifactStore, artifact_digest, source_code_version

STEPS_STEP = "steps"
TEMPLATES_STEP = "templates"
ANNOTATION = re.compile(r"<<[^<>]*>>")
MIN_STEPS = 3  # fewest steps for which neighbours, a null and a split are defined at all


def _code_version() -> str:
    return source_code_version(sys.modules[__name__], steps, expressions, information_bottleneck, encoder_module)


def steps_ref(store: ArtifactStore, steps_cfg: StepsConfig, ib_cfg: IBConfig, c2_cfg: C2Config, problems: ArtifactRef) -> ArtifactRef:
    payload = {
        "steps": steps_cfg.digest_payload(),
        "encoder": {k: ib_cfg.digest_payload()[k] for k in ("embedding_model", "embedding_dim", "embedding_batch_size", "embedding_max_length", "pow_subtypes")},
        "labels": c2_cfg.labels,
    }
    return store.ref(STEPS_STEP, artifact_digest(STEPS_STEP, payload, [problems], _code_version()))


def templates_ref(store: ArtifactStore, ib_cfg: IBConfig, steps_artifact: ArtifactRef) -> ArtifactRef:
    return store.ref(TEMPLATES_STEP, artifact_digest(TEMPLATES_STEP, ib_cfg.digest_payload(), [steps_artifact], _code_version()))


def step_line_text(solution: str, line_index: int) -> str:
    """The solution line holding a step, calculator annotations removed."""
    lines = solution.splitlines()
    line = lines[line_index] if 0 <= line_index < len(lines) else solution
    return ANNOTATION.sub("", line).strip()


def build_steps(ref: ArtifactRef, problems: ArtifactRef, steps_cfg: StepsConfig, ib_cfg: IBConfig, c2_cfg: C2Config) -> dict:
    """Split every gold solution into validated steps, embed them, and store all three tables."""
    store = ArtifactStore.for_ref(ref)
    rows = store.read(problems, "problems")
    settings = steps.StepSettings(
        timeout_s=steps_cfg.expression_timeout_s,
        max_length=steps_cfg.max_expression_length,
        rel_tol=steps_cfg.result_rel_tol,
        pow_subtypes=list(ib_cfg.pow_subtypes),
        labels=list(c2_cfg.labels),
    )
    split = steps.split_rows(rows.iter_rows(named=True), settings)
    solutions = dict(zip(rows["problem_id"], rows["solution"]))
    table = split.steps.with_columns(
        pl.struct("problem_id", "line_index")
        .map_elements(lambda r: step_line_text(solutions[r["problem_id"]], r["line_index"]), return_dtype=pl.Utf8)
        .alias("text")
    )
    encoder = encoder_module.load_encoder(ib_cfg.embedding_model, ib_cfg.embedding_max_length)
    vectors = encoder_module.embed_texts(encoder, table["text"].to_list(), ib_cfg.embedding_batch_size)
    embeddings = table.select("problem_id", "step_index").with_columns(
        pl.Series("embedding", vectors, dtype=pl.Array(pl.Float32, encoder.dim))
    )
    routes = dict(table.group_by("route").len().iter_rows())
    drops = dict(split.drops.group_by("reason").len().iter_rows())
    metadata = {"n_steps": table.height, "by_route": routes, "drops_by_reason": drops, "n_problems": rows.height,
                "n_problems_with_steps": table["problem_id"].n_unique(), "encoder": ib_cfg.embedding_model}
    store.write_table(ref, {"steps": table, "drops": split.drops, "embeddings": embeddings}, metadata=metadata)
    return metadata


def build_templates(ref: ArtifactRef, steps_artifact: ArtifactRef, ib_cfg: IBConfig) -> dict:
    """IB templates over the stored steps, k-means at the same K beside them, figure and tables."""
    store = ArtifactStore.for_ref(ref)
    table = store.read(steps_artifact, "steps")
    embeddings = store.read(steps_artifact, "embeddings")
    X = embeddings["embedding"].to_numpy().astype(np.float32)
    Y = table["operator"].to_numpy()
    if len(Y) < MIN_STEPS:
        raise MyceliumError(f"stage 02: only {len(Y)} validated steps; templates need at least {MIN_STEPS} (use more problems)")
    # A tiny run (the smoke sample) has fewer steps than ib.knn neighbours: use all the others.
    knn = min(ib_cfg.knn, len(Y) - 1)
    result = information_bottleneck.discover_templates(
        X, Y, ib_cfg, n_betas=ib_cfg.n_betas, knn=knn, n_permutations=ib_cfg.n_permutations,
        seed=ib_cfg.seed, max_clusters=ib_cfg.max_clusters,
    )
    kmeans = information_bottleneck.kmeans_baseline(
        X, Y, result.n_clusters, seed=ib_cfg.seed, n_permutations=ib_cfg.n_permutations, n_init=ib_cfg.kmeans_n_init
    )
    # The elbow K can be 1 (no split pays the seed's threshold), where any comparison is
    # vacuous; so also compare at the largest K the annealing reached, on the same X.
    path = result.curve.filter(pl.col("on_elbow_path")).sort("k")
    widest = path.row(path.height - 1, named=True)
    kmeans_widest = information_bottleneck.kmeans_baseline(
        X, Y, int(widest["k"]), seed=ib_cfg.seed, n_permutations=ib_cfg.n_permutations, n_init=ib_cfg.kmeans_n_init
    )
    widest_summary = {
        "widest_k": int(widest["k"]),
        "widest_ib_i_ty_bits_raw": float(widest["i_ty_raw"]),
        "widest_ib_i_ty_bits_corrected": float(widest["i_ty_corrected"]),
        **kmeans_widest.summary("widest_kmeans"),
    }
    exemplars = information_bottleneck.cluster_exemplars(X, result.assignment, ib_cfg.n_exemplars)
    texts = table["text"].to_list()
    expressions_text = table["expression"].to_list()
    templates = result.clusters.with_columns(
        pl.Series("labels", [list(map(str, result.labels))] * result.clusters.height),
        pl.Series("exemplars", [[f"{expressions_text[i]} | {texts[i]}" for i in exemplars[int(c)]] for c in result.clusters["id"]]),
    )
    assignments = table.select("problem_id", "step_index", "operator", "label").with_columns(
        pl.Series("template_id", result.assignment.astype(np.int32)),
        pl.Series("kmeans_id", kmeans.assignment.astype(np.int32)),
    )
    with tempfile.TemporaryDirectory() as folder:
        figure = information_bottleneck.plot_elbow(result.curve, result.n_clusters, f"{folder}/elbow.png", ib_cfg.elbow_gain_threshold)
        store.write_file(ref, "elbow.png", figure.read_bytes())
    summary = {**result.summary(), **kmeans.summary("kmeans"), **widest_summary, "elbow_gain_threshold": ib_cfg.elbow_gain_threshold,
               **{f"ib_{k}": v for k, v in information_bottleneck.label_predictiveness(result.assignment, Y).items()}}
    store.write_file(ref, "summary.json", json.dumps(summary, indent=2, default=float).encode())
    store.write_table(ref, {"templates": templates, "assignments": assignments, "curve": result.curve}, metadata={"n_templates": result.n_clusters})
    return summary


@task(name="steps")
def steps_task(ref: ArtifactRef, problems: ArtifactRef, steps_cfg: StepsConfig, ib_cfg: IBConfig, c2_cfg: C2Config) -> ArtifactRef:
    meta = build_steps(ref, problems, steps_cfg, ib_cfg, c2_cfg)
    get_run_logger().info("steps: %d kept %s; dropped %s", meta["n_steps"], meta["by_route"], meta["drops_by_reason"])
    return ref


@task(name="templates")
def templates_task(ref: ArtifactRef, steps_artifact: ArtifactRef, ib_cfg: IBConfig) -> ArtifactRef:
    summary = build_templates(ref, steps_artifact, ib_cfg)
    get_run_logger().info(
        "templates: %d (I(T;Y) corrected %.3f bits); k-means at the same K: %.3f bits",
        summary["n_templates"], summary["i_ty_bits_corrected"], summary["kmeans_i_ty_bits_corrected"],
    )
    return ref


def _elbow_sentence(curve: pl.DataFrame, summary: dict) -> str:
    """Say plainly where the elbow fell, and whether the seed's threshold was ever met."""
    path = curve.filter(pl.col("on_elbow_path") & pl.col("gain_per_cluster").is_not_null())
    if path.is_empty():
        return "- The annealing never split the steps: one template."
    best = path.sort("gain_per_cluster", descending=True).row(0, named=True)
    sentence = (f"- Largest null-corrected gain per added cluster on the annealing path: {best['gain_per_cluster']:.3f} bits "
                f"(at K={best['k']}).")
    if summary["n_templates"] == 1:
        sentence += (f" It never reached the elbow threshold of {summary['elbow_gain_threshold']} bits, so the steps stay "
                     "**one template**: on this data the step embeddings do not separate operations strongly enough.")
    return sentence


def report_section(store: ArtifactStore, steps_artifact: ArtifactRef, templates: ArtifactRef) -> ReportSection:
    steps_meta = store.verify(steps_artifact).metadata
    manifest = store.verify(templates)
    summary = json.loads(store.read_file(templates, "summary.json"))
    table = store.read(templates, "templates").sort("size", descending=True)
    lines = [
        "## Stage 02 — steps and templates",
        "",
        f"{steps_meta['n_steps']} steps from {steps_meta['n_problems_with_steps']} of {steps_meta['n_problems']} problems. "
        "By route: " + ", ".join(f"{k} {v}" for k, v in sorted(steps_meta["by_route"].items()))
        + ". Dropped: " + (", ".join(f"{k} {v}" for k, v in sorted(steps_meta["drops_by_reason"].items())) or "none") + ".",
        "",
        "I(T;Y) is in bits; the null is the mean over label shuffles with T fixed; corrected = raw − null.",
        "",
        "| clustering | K | I(T;Y) raw | null mean | null 95th pct | I(T;Y) corrected | purity | steps |",
        "|---|---|---|---|---|---|---|---|",
        f"| Information Bottleneck (uses Y) | {summary['n_templates']} | {summary['i_ty_bits_raw']:.3f} | {summary['i_ty_bits_null_mean']:.3f} | "
        f"{summary['i_ty_bits_null_p95']:.3f} | {summary['i_ty_bits_corrected']:.3f} | {summary.get('ib_purity', float('nan')):.3f} | {summary['n_steps']} |",
        f"| k-means, same K (no Y) | {summary['kmeans_k']} | {summary['kmeans_i_ty_bits_raw']:.3f} | {summary['kmeans_i_ty_bits_null_mean']:.3f} | "
        f"{summary['kmeans_i_ty_bits_null_p95']:.3f} | {summary['kmeans_i_ty_bits_corrected']:.3f} | {summary.get('kmeans_purity', float('nan')):.3f} | {summary['n_steps']} |",
        f"| IB at the largest K the annealing reached | {summary['widest_k']} | {summary['widest_ib_i_ty_bits_raw']:.3f} | — | — | "
        f"{summary['widest_ib_i_ty_bits_corrected']:.3f} | — | {summary['n_steps']} |",
        f"| k-means at that K | {summary['widest_kmeans_k']} | {summary['widest_kmeans_i_ty_bits_raw']:.3f} | "
        f"{summary['widest_kmeans_i_ty_bits_null_mean']:.3f} | {summary['widest_kmeans_i_ty_bits_null_p95']:.3f} | "
        f"{summary['widest_kmeans_i_ty_bits_corrected']:.3f} | {summary.get('widest_kmeans_purity', float('nan')):.3f} | {summary['n_steps']} |",
        "",
        _elbow_sentence(store.read(templates, "curve"), summary),
        "",
        f"H(Y) = {summary['h_y_bits']:.3f} bits. Largest templates:",
        "",
        "| template | steps | top operator | share | coherence | exemplar |",
        "|---|---|---|---|---|---|",
    ]
    for row in table.head(10).iter_rows(named=True):
        exemplar = (row["exemplars"][0] if row["exemplars"] else "").replace("|", "/")[:80]
        lines.append(f"| {row['id']} | {row['size']} | {row['top_label']} | {row['top_label_share']:.2f} | {row['coherence']:.2f} | {exemplar} |")
    figures = {"elbow.png": store.read_file(templates, "elbow.png")} if "elbow.png" in manifest.files else {}
    if figures:
        lines += ["", "![elbow](elbow.png)"]
    flat = {f"templates_{k}" if not k.startswith(("kmeans", "ib_", "templates", "widest")) else k: v for k, v in summary.items()}
    flat.update({"steps_n": steps_meta["n_steps"], "steps_by_route": steps_meta["by_route"], "steps_drops_by_reason": steps_meta["drops_by_reason"]})
    return ReportSection(flat, "\n".join(lines) + "\n", figures)
