"""Operation templates by the Information Bottleneck: minimise I(X;T) - beta * I(T;Y).

X is a step's embedding, Y its label (the top sympy operator), T the template (cluster).
Plain functions, no Prefect; stage 02's task wraps `discover_templates`.

What p(y|x) is
--------------
Each step carries one label, so p(y|x) = onehot(y) would make X irrelevant (the optimum is
T = Y). We use the *leave-one-out k-nearest-neighbour label posterior*: p(y|x_i) is the label
histogram of the `knn` nearest other steps by cosine similarity (the step's own label
excluded). It is the label distribution a kNN classifier reads off the embedding at x_i, so
T can only hold the information about Y that X actually carries (what C2/C3 can recover
from text), and two steps are alike for IB when their embedding neighbourhoods carry the
same labels. Leaving the step itself out has a second benefit: T_i is a function of the
neighbours' labels, independent of y_i when Y is independent of X, so the permutation null
below (T fixed, Y shuffled) stays a valid null even though T was fitted using Y.
p(x) is uniform over steps. Steps with identical neighbour-label histograms have identical
p(y|x) and therefore identical IB assignments; they are collapsed into one weighted row
before annealing (exact, and much faster).

The optimiser: deterministic annealing (Tishby, Pereira & Bialek 1999; Rose 1998; Slonim's
thesis ch. 3), written here
--------------------------------------------------------------------------------------------
At each beta of a geometric schedule from `beta_start` to `beta_end`:
    p(t|x) ∝ p(t) exp(-beta * KL(p(y|x) || p(y|t)))
    p(t)   = sum_x p(x) p(t|x)
    p(y|t) = sum_x p(x) p(t|x) p(y|x) / p(t)
iterated to a fixed point. Before each beta every cluster is duplicated with a small random
perturbation of p(y|t); below the critical beta of that cluster the copies fall back together
and are merged, above it they separate: the number of clusters grows by phase transitions,
as beta crosses critical values. The cap `max_clusters` stops duplication.
Why our own code: no maintained PyPI package anneals IB over beta at this size. `embo` (GPL-3)
sweeps beta but took 32 s at |X|=200; `sib-clustering` (IBM's sequential IB, maintained, C++)
optimises the hard IB at a *fixed* K (the beta -> inf limit) with no beta path, so it cannot
give the annealing curve or the elbow. We use sIB as an independent check of the optimiser:
`sib_reference(...)` runs it at the same K, and the tests and bench compare I(T;Y).

The curve, surface tension and the elbow
----------------------------------------
After each beta the soft solution is hardened (argmax p(t|x)); clusters smaller than
`min_size` are reabsorbed (surface tension, `reabsorb_small_clusters`: the smallest tiny
cluster is merged into the cluster whose merge loses least I(T;Y), repeatedly). For that hard
T we record K, I(X;T) = H(T), raw plug-in I(T;Y), its permutation null (mean and 95th
percentile) and corrected = raw - null mean. Along the path, for every K the best corrected
value is kept; the gain of a K is (corrected(K) - corrected(K_prev)) / (K - K_prev), bits per
added cluster. The elbow is the last K before the first gain below `elbow_gain_threshold`.
Every threshold reads corrected values; raw values are reported beside them.

Coherence and max_depth (what exactly we do)
--------------------------------------------
A cluster's coherence is the mean cosine similarity of its (unit) members to their centroid
(= the norm of the mean unit vector). After the elbow, each cluster whose coherence is below
`coherence_threshold` and that holds at least 2 * min_size steps is *a candidate* for a
split: IB is annealed again on its members alone and its own elbow (local corrected I(T;Y)
gains, in bits about Y within the cluster, same threshold) decides. If the local elbow picks
more than one sub-cluster, the cluster is replaced by them, and each is checked again, down
to `max_depth` levels (level 1 = the top-level clustering). So coherence nominates and the
objective decides: an incoherent cluster whose parts carry the same labels stays whole
(splitting it would add I(X;T) and no I(T;Y)). This is a deliberate reading of the seed,
whose text does not say how it split; a pure geometric split would be k-means again.

Bias of I(T;Y)
--------------
The plug-in estimate is biased upward by about (|T|-1)(|Y|-1)/(2 N ln 2) bits (Miller-Madow):
0.08 bits on random labels at N=5000, K=30, |Y|=20, half the elbow gain. `permutation_null`
shuffles Y with T fixed; corrected = raw - mean(null). Measured: on labels independent of X,
T fitted by this annealer has raw 0.087 bits at K=32 (N=5000, |Y|=20) and corrected within
0.002 of 0 at every K of the path (tests). What the null cannot remove is *selection*: the
coherence refinement keeps a split when its local corrected gain clears the threshold, so with
a threshold near 0 it keeps noise splits (random labels, threshold 0: K=31, corrected 0.075
bits). At the configured 0.15 bits per cluster no noise split survives (random labels: K=1).

k-means comparison
------------------
`kmeans_baseline` clusters the same (unit) X with scikit-learn's KMeans at the same K and
returns the same raw / null / corrected numbers; `label_predictiveness` says how well a
clustering predicts Y (purity of the majority label, and I(T;Y)/H(Y)).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

from mycelium.config import IBConfig

LN2 = math.log(2.0)

# Solver internals (not tuning knobs: they decide when a fixed point counts as reached).
_MAX_ITER_PER_BETA = 300  # fixed-point iterations at one beta
_CONVERGENCE_TOL = 1e-5  # max |change| of p(y|t) that counts as converged
_SPLIT_PERTURBATION = 0.05  # relative perturbation of p(y|t) when a cluster is duplicated
_MERGE_TOL = 2e-3  # clusters whose p(y|t) differ by less than this (max abs) are one cluster
_LOG_FLOOR = 1e-300
_KNN_BLOCK_ROWS = 1024
_ELBOW_TAIL_KS = 3  # the top-level path anneals on for 3 new K values past the first drop (figure)


# --------------------------------------------------------------------------------------------
# Information measures
# --------------------------------------------------------------------------------------------


def _codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    uniques, inverse = np.unique(np.asarray(values), return_inverse=True)
    return inverse.astype(np.int64).ravel(), len(uniques)


def _contingency(t: np.ndarray, kt: int, y: np.ndarray, ky: int) -> np.ndarray:
    return np.bincount(t * ky + y, minlength=kt * ky).reshape(kt, ky).astype(np.float64)


def _mi_contributions(counts: np.ndarray) -> np.ndarray:
    """Per-row share of the plug-in I(T;Y) in bits: p(t) * KL(p(y|t) || p(y)). Sums to I(T;Y)."""
    n = counts.sum()
    if n <= 0:
        return np.zeros(counts.shape[0])
    p_ty = counts / n
    p_t = p_ty.sum(1, keepdims=True)
    p_y = p_ty.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_ty > 0, p_ty * np.log(p_ty / (p_t * p_y)), 0.0)
    return terms.sum(1) / LN2


def mutual_information_bits(t, y) -> float:
    """Plug-in I(T;Y) in bits from counts (equals sklearn's mutual_info_score / ln 2)."""
    tc, kt = _codes(t)
    yc, ky = _codes(y)
    if len(tc) != len(yc):
        raise ValueError(f"t has {len(tc)} entries but y has {len(yc)}")
    return float(max(_mi_contributions(_contingency(tc, kt, yc, ky)).sum(), 0.0))


def entropy_bits(t) -> float:
    """H(T) in bits; for a hard clustering this is I(X;T)."""
    _, counts = np.unique(np.asarray(t), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def permutation_null(t, y, n_permutations: int, seed: int) -> np.ndarray:
    """I(T;Y) in bits for `n_permutations` shuffles of y with t fixed (the estimator's null)."""
    return _permutation_null_detail(t, y, n_permutations, seed)[0]


def _permutation_null_detail(t, y, n_permutations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(total null values [P], per-cluster null contributions [P, K]) for sorted unique t."""
    if n_permutations < 1:
        raise ValueError("n_permutations must be >= 1")
    tc, kt = _codes(t)
    yc, ky = _codes(y)
    rng = np.random.default_rng(seed)
    per_cluster = np.empty((n_permutations, kt))
    for i in range(n_permutations):
        per_cluster[i] = _mi_contributions(_contingency(tc, kt, rng.permutation(yc), ky))
    return per_cluster.sum(1), per_cluster


class MIEstimate(NamedTuple):
    raw: float  # plug-in I(T;Y), bits
    null_mean: float  # mean of the permutation null, bits
    null_p95: float  # 95th percentile of the permutation null, bits
    corrected: float  # raw - null_mean, bits

    def as_dict(self, prefix: str = "i_ty") -> dict[str, float]:
        return {
            f"{prefix}_raw": self.raw,
            f"{prefix}_null_mean": self.null_mean,
            f"{prefix}_null_p95": self.null_p95,
            f"{prefix}_corrected": self.corrected,
        }


def corrected_mutual_information(t, y, n_permutations: int, seed: int) -> MIEstimate:
    """Raw plug-in I(T;Y), its permutation null (mean, 95th percentile) and raw - null mean."""
    raw = mutual_information_bits(t, y)
    null = permutation_null(t, y, n_permutations, seed)
    return MIEstimate(raw, float(null.mean()), float(np.quantile(null, 0.95)), raw - float(null.mean()))


def label_predictiveness(t, y) -> dict[str, float]:
    """How well clusters predict Y: purity (share of steps carrying their cluster's majority
    label, i.e. the accuracy of 'predict the cluster's majority label') and the uncertainty
    coefficient I(T;Y)/H(Y) (raw plug-in values; 1 = clusters determine Y)."""
    tc, kt = _codes(t)
    yc, ky = _codes(y)
    counts = _contingency(tc, kt, yc, ky)
    h_y = entropy_bits(yc)
    mi = float(max(_mi_contributions(counts).sum(), 0.0))
    return {
        "purity": float(counts.max(1).sum() / counts.sum()),
        "i_ty_over_h_y": mi / h_y if h_y > 0 else float("nan"),
        "h_y": h_y,
    }


# --------------------------------------------------------------------------------------------
# Embeddings: normalisation, kNN label posterior, coherence
# --------------------------------------------------------------------------------------------


def l2_normalise(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-d (n x d), got shape {X.shape}")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("X has zero or non-finite rows; every step needs a usable embedding")
    return X / norms


def knn_label_counts(Xn: np.ndarray, y_codes: np.ndarray, n_labels: int, knn: int) -> np.ndarray:
    """Leave-one-out neighbour label histogram: row i counts the labels of the `knn` most
    cosine-similar other rows of unit-norm `Xn`. Exact brute force in row blocks (BLAS)."""
    n = Xn.shape[0]
    if not 1 <= knn < n:
        raise ValueError(f"knn must be in [1, n-1] = [1, {n - 1}], got {knn}")
    counts = np.zeros((n, n_labels), dtype=np.int32)
    for start in range(0, n, _KNN_BLOCK_ROWS):
        stop = min(start + _KNN_BLOCK_ROWS, n)
        sims = Xn[start:stop] @ Xn.T
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # leave the step out
        neighbours = np.argpartition(-sims, knn - 1, axis=1)[:, :knn]
        rows = np.repeat(np.arange(stop - start), knn)
        np.add.at(counts[start:stop], (rows, y_codes[neighbours].ravel()), 1)
    return counts


def cluster_coherence(Xn: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Mean cosine similarity of each cluster's unit members to the cluster centroid, for
    t = 0..K-1. With unit rows this equals the norm of the members' mean vector."""
    k = int(t.max()) + 1
    sums = np.zeros((k, Xn.shape[1]), dtype=np.float64)
    _add_rows(sums, t, Xn)
    sizes = np.bincount(t, minlength=k).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.linalg.norm(sums / sizes[:, None], axis=1)


def _add_rows(sums: np.ndarray, t: np.ndarray, Xn: np.ndarray) -> None:
    order = np.argsort(t, kind="stable")
    bounds = np.searchsorted(t[order], np.arange(sums.shape[0] + 1))
    for c in range(sums.shape[0]):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members):
            sums[c] = Xn[members].sum(0, dtype=np.float64)


def cluster_exemplars(X, assignment, n_per_cluster: int) -> dict[int, list[int]]:
    """Row indices of the `n_per_cluster` members most cosine-similar to each cluster's centroid."""
    Xn = l2_normalise(X)
    t = np.asarray(assignment)
    out: dict[int, list[int]] = {}
    for c in np.unique(t):
        members = np.flatnonzero(t == c)
        centroid = Xn[members].mean(0)
        sims = Xn[members] @ centroid
        out[int(c)] = members[np.argsort(-sims, kind="stable")[:n_per_cluster]].tolist()
    return out


# --------------------------------------------------------------------------------------------
# Surface tension
# --------------------------------------------------------------------------------------------


def _merge_cost(counts: np.ndarray, a: int, b: int, n: float) -> float:
    """Loss in I(T;Y) (nats) when clusters a and b merge: (p_a + p_b) * JS_pi(p(y|a), p(y|b))."""
    ca, cb = counts[a], counts[b]
    merged = ca + cb

    def plogp_over(c: np.ndarray) -> float:
        tot = c.sum()
        nz = c[c > 0]
        return float((nz * np.log(nz / tot)).sum()) if tot > 0 else 0.0

    return (plogp_over(ca) + plogp_over(cb) - plogp_over(merged)) / n


def reabsorb_small_clusters(t, y, min_size: int) -> np.ndarray:
    """Merge every cluster smaller than `min_size` into the cluster whose merge costs least
    I(T;Y), smallest first, until all clusters have >= min_size members (or one is left).
    Returns labels renumbered 0..K-1 in order of first appearance of the sorted old ids."""
    tc, kt = _codes(t)
    yc, ky = _codes(y)
    counts = _contingency(tc, kt, yc, ky)
    n = counts.sum()
    alive = list(range(kt))
    target = np.arange(kt)
    sizes = counts.sum(1)
    while len(alive) > 1:
        small = [c for c in alive if sizes[c] < min_size]
        if not small:
            break
        c = min(small, key=lambda j: (sizes[j], j))
        others = [o for o in alive if o != c]
        best = min(others, key=lambda o: (_merge_cost(counts, c, o, n), o))
        counts[best] += counts[c]
        sizes[best] += sizes[c]
        counts[c] = 0
        sizes[c] = 0
        target[target == c] = best
        alive.remove(c)
    return _codes(target[tc])[0]


# --------------------------------------------------------------------------------------------
# Deterministic annealing
# --------------------------------------------------------------------------------------------


@dataclass
class _AnnealStep:
    beta: float
    hard_unique: np.ndarray  # argmax p(t|x) per unique row
    k_soft: int
    i_xt_soft: float  # bits
    i_ty_soft: float  # bits (w.r.t. p(y|x), not the observed labels)
    iterations: int


def geometric_betas(beta_start: float, beta_end: float, n_betas: int) -> np.ndarray:
    if n_betas < 2:
        raise ValueError("n_betas must be >= 2")
    return np.geomspace(beta_start, beta_end, n_betas)


def _anneal(P: np.ndarray, w: np.ndarray, betas: np.ndarray, max_clusters: int, seed: int):
    """Deterministic annealing of IB over unique rows P (p(y|x)) with weights w (p(x)).
    A generator: yields one `_AnnealStep` per beta, so the caller can stop the path early."""
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        neg_h = np.where(P > 0, P * np.log(P), 0.0).sum(1)  # sum_y p log p, per row
    p_y = w @ P
    pt = np.array([1.0])
    Q = p_y[None, :].copy()
    for beta in betas:
        k = len(pt)
        n_split = min(k, max_clusters - k)
        if n_split > 0:
            heavy = np.argsort(-pt, kind="stable")[:n_split]
            noise = rng.uniform(-1.0, 1.0, size=(n_split, Q.shape[1]))
            q_plus = Q[heavy] * (1 + _SPLIT_PERTURBATION * noise)
            q_minus = Q[heavy] * (1 - _SPLIT_PERTURBATION * noise)
            Q = np.vstack([Q, q_minus / q_minus.sum(1, keepdims=True)])
            Q[heavy] = q_plus / q_plus.sum(1, keepdims=True)
            pt = np.concatenate([pt, pt[heavy] / 2])
            pt[heavy] /= 2
        iterations = 0
        for iterations in range(1, _MAX_ITER_PER_BETA + 1):
            R = _responsibilities(P, neg_h, Q, pt, beta)
            pt_new = w @ R
            keep = pt_new > 1e-12
            R, pt_new = R[:, keep], pt_new[keep]
            Q_new = (R * w[:, None]).T @ P / pt_new[:, None]
            done = Q_new.shape == Q.shape and np.abs(Q_new - Q).max() < _CONVERGENCE_TOL
            Q, pt = Q_new, pt_new
            if done:
                break
        Q, pt = _merge_coincident(Q, pt)
        R = _responsibilities(P, neg_h, Q, pt, beta)
        with np.errstate(divide="ignore", invalid="ignore"):
            i_xt = float((w[:, None] * np.where(R > 0, R * np.log(R / pt[None, :]), 0.0)).sum() / LN2)
            i_ty = float((pt[:, None] * np.where(Q > 0, Q * np.log(Q / p_y[None, :]), 0.0)).sum() / LN2)
        yield _AnnealStep(float(beta), R.argmax(1), len(pt), i_xt, i_ty, iterations)


def _responsibilities(P, neg_h, Q, pt, beta) -> np.ndarray:
    kl = neg_h[:, None] - P @ np.log(np.maximum(Q, _LOG_FLOOR)).T
    logits = np.log(pt)[None, :] - beta * kl
    logits -= logits.max(1, keepdims=True)
    R = np.exp(logits)
    R /= R.sum(1, keepdims=True)
    return R


def _merge_coincident(Q: np.ndarray, pt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge clusters whose p(y|t) coincide (copies that did not separate)."""
    order = np.argsort(-pt, kind="stable")
    kept: list[int] = []
    Qm, ptm = Q.copy(), pt.copy()
    for c in order:
        for k in kept:
            if np.abs(Q[c] - Qm[k]).max() < _MERGE_TOL:
                total = ptm[k] + pt[c]
                Qm[k] = (Qm[k] * ptm[k] + Q[c] * pt[c]) / total
                ptm[k] = total
                break
        else:
            kept.append(int(c))
    kept.sort()
    return Qm[kept], ptm[kept]


# --------------------------------------------------------------------------------------------
# The path, the elbow, refinement
# --------------------------------------------------------------------------------------------


@dataclass
class PathResult:
    curve: pl.DataFrame
    assignment: np.ndarray  # chosen hard T over the given rows, 0..K-1
    chosen_k: int


def anneal_path(
    counts: np.ndarray,
    y: np.ndarray,
    betas: np.ndarray,
    *,
    min_size: int,
    gain_threshold: float,
    max_clusters: int,
    n_permutations: int,
    seed: int,
    tail_ks: int,
) -> PathResult:
    """Anneal IB over rows with neighbour-label histograms `counts` (from `knn_label_counts`),
    harden and reabsorb (min_size) at each beta, null-correct I(T;Y) against the observed label
    codes `y`, and pick the elbow. The path stops `tail_ks` new K values after the first gain
    below `gain_threshold` (a negative threshold anneals the whole schedule). The curve has one
    row per beta annealed; `assignment` is the hard T at the elbow."""
    n = counts.shape[0]
    uniq, inverse = np.unique(counts, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    w = np.bincount(inverse, minlength=len(uniq)).astype(np.float64) / n
    P = uniq.astype(np.float64)
    P /= P.sum(1, keepdims=True)
    rows = []
    assignments: list[np.ndarray] = []
    max_k, best_at_max, below = 0, -math.inf, 0
    for i, step in enumerate(_anneal(P, w, betas, max_clusters, seed)):
        t = reabsorb_small_clusters(step.hard_unique[inverse], y, min_size)
        est = corrected_mutual_information(t, y, n_permutations, seed + 1000 + i)
        assignments.append(t)
        k = int(t.max()) + 1
        rows.append(
            {
                "beta": step.beta,
                "k": k,
                "k_soft": step.k_soft,
                "i_xt": entropy_bits(t),
                "i_xt_soft": step.i_xt_soft,
                "i_ty_soft": step.i_ty_soft,
                **est.as_dict(),
                "iterations": step.iterations,
            }
        )
        # Early stop: once a new K's gain has fallen below the threshold, the elbow is known;
        # anneal on only for `tail_ks` further new K values (to draw the curve past the elbow).
        if k > max_k:
            if max_k > 0 and (est.corrected - best_at_max) / (k - max_k) < gain_threshold:
                below += 1
            max_k, best_at_max = k, est.corrected
            if below > tail_ks:
                break
        elif k == max_k:
            best_at_max = max(best_at_max, est.corrected)
    curve = pl.DataFrame(rows)

    # Best corrected value per K along the path; gains per added cluster; elbow.
    best: dict[int, int] = {}
    for i, row in enumerate(rows):
        k = row["k"]
        if k not in best or row["i_ty_corrected"] > rows[best[k]]["i_ty_corrected"]:
            best[k] = i
    ks = sorted(best)
    gains = {ks[0]: None}
    chosen_k = ks[0]
    stopped = False
    for prev, k in itertools.pairwise(ks):
        gain = (rows[best[k]]["i_ty_corrected"] - rows[best[prev]]["i_ty_corrected"]) / (k - prev)
        gains[k] = gain
        if not stopped:
            if gain < gain_threshold:
                stopped = True
            else:
                chosen_k = k
    on_path = [best.get(row["k"]) == i for i, row in enumerate(rows)]
    curve = curve.with_columns(
        pl.Series("on_elbow_path", on_path),
        pl.Series("gain_per_cluster", [gains[r["k"]] if p else None for r, p in zip(rows, on_path)], dtype=pl.Float64),
        pl.Series("chosen", [p and r["k"] == chosen_k for r, p in zip(rows, on_path)]),
    )
    return PathResult(curve, assignments[best[chosen_k]], chosen_k)


@dataclass
class IBResult:
    assignment: np.ndarray  # hard template id per step, 0..n_clusters-1
    n_clusters: int  # final number of templates (after coherence refinement)
    elbow_k: int  # K chosen by the top-level elbow, before refinement
    curve: pl.DataFrame  # top-level annealing path, one row per beta
    clusters: pl.DataFrame  # one row per template
    i_xt: float  # H(T), bits
    i_ty: MIEstimate  # final clustering: raw, null mean, null p95, corrected
    h_y: float
    labels: np.ndarray  # label value for each label code used in `clusters.label_counts`
    seconds: float
    refinements: list[dict] = field(default_factory=list)  # one entry per coherence candidate

    def summary(self) -> dict:
        return {
            "n_steps": len(self.assignment),
            "n_templates": self.n_clusters,
            "elbow_k": self.elbow_k,
            "i_xt_bits": self.i_xt,
            "h_y_bits": self.h_y,
            **self.i_ty.as_dict("i_ty_bits"),
            "seconds": self.seconds,
        }


def discover_templates(
    X,
    Y,
    cfg: IBConfig,
    *,
    n_betas: int,
    knn: int,
    n_permutations: int,
    seed: int,
    max_clusters: int,
) -> IBResult:
    """Cluster steps into templates by annealed IB; see the module docstring for every rule."""
    started = time.perf_counter()
    Xn = l2_normalise(X)
    y = np.asarray(Y).ravel()
    if len(y) != Xn.shape[0]:
        raise ValueError(f"X has {Xn.shape[0]} rows but Y has {len(y)} labels")
    if max_clusters < 1:
        raise ValueError("max_clusters must be >= 1")
    labels, y_codes = np.unique(y, return_inverse=True)
    y_codes = y_codes.ravel().astype(np.int64)
    counts = knn_label_counts(Xn, y_codes, len(labels), knn)
    betas = geometric_betas(cfg.beta_start, cfg.beta_end, n_betas)
    common = {
        "min_size": cfg.min_size,
        "gain_threshold": cfg.elbow_gain_threshold,
        "max_clusters": max_clusters,
        "n_permutations": n_permutations,
    }
    top = anneal_path(counts, y_codes, betas, seed=seed, tail_ks=_ELBOW_TAIL_KS, **common)

    # Coherence refinement, breadth-first, up to cfg.max_depth levels.
    groups: list[tuple[np.ndarray, int, str]] = [
        (np.flatnonzero(top.assignment == c), 1, str(c)) for c in range(top.chosen_k)
    ]
    final: list[tuple[np.ndarray, int, str, bool]] = []
    refinements: list[dict] = []
    while groups:
        members, depth, path = groups.pop(0)
        coherence = float(cluster_coherence(Xn[members], np.zeros(len(members), dtype=np.int64))[0])
        flagged = coherence < cfg.coherence_threshold
        if flagged and depth < cfg.max_depth and len(members) >= 2 * cfg.min_size:
            sub = anneal_path(
                counts[members],
                y_codes[members],
                betas,
                seed=seed + 7919 * (len(refinements) + 1),
                tail_ks=0,
                **common,
            )
            best = sub.curve.filter(pl.col("chosen")).row(0, named=True)
            refinements.append(
                {
                    "cluster_path": path,
                    "depth": depth,
                    "size": len(members),
                    "coherence": coherence,
                    "split_into": sub.chosen_k,
                    "local_i_ty_corrected": best["i_ty_corrected"],
                }
            )
            if sub.chosen_k > 1:
                for s in range(sub.chosen_k):
                    groups.append((members[sub.assignment == s], depth + 1, f"{path}.{s}"))
                continue
        final.append((members, depth, path, flagged))

    assignment = np.empty(len(y), dtype=np.int64)
    for cid, (members, _, _, _) in enumerate(final):
        assignment[members] = cid
    k = len(final)
    estimate = corrected_mutual_information(assignment, y_codes, n_permutations, seed)
    _, null_per_cluster = _permutation_null_detail(assignment, y_codes, n_permutations, seed)
    table = _contingency(assignment, k, y_codes, len(labels))
    contributions = _mi_contributions(table)
    coherence = cluster_coherence(Xn, assignment)
    clusters = pl.DataFrame(
        {
            "id": np.arange(k),
            "size": table.sum(1).astype(np.int64),
            "label_counts": [row.astype(np.int64).tolist() for row in table],
            # Labels may be numpy scalars (ints) or plain Python objects (operator names).
            "top_label": [getattr(labels[int(row.argmax())], "item", lambda v=labels[int(row.argmax())]: v)() for row in table],
            "top_label_share": table.max(1) / table.sum(1),
            "coherence": coherence,
            "below_coherence": [f[3] for f in final],
            "depth": [f[1] for f in final],
            "path": [f[2] for f in final],
            "i_ty_raw": contributions,
            "i_ty_corrected": contributions - null_per_cluster.mean(0),
            "null_p95": np.quantile(null_per_cluster, 0.95, axis=0),
        }
    )
    return IBResult(
        assignment=assignment,
        n_clusters=k,
        elbow_k=top.chosen_k,
        curve=top.curve,
        clusters=clusters,
        i_xt=entropy_bits(assignment),
        i_ty=estimate,
        h_y=entropy_bits(y_codes),
        labels=labels,
        seconds=time.perf_counter() - started,
        refinements=refinements,
    )


# --------------------------------------------------------------------------------------------
# Baselines and the figure
# --------------------------------------------------------------------------------------------


@dataclass
class BaselineResult:
    assignment: np.ndarray
    k: int
    i_xt: float
    i_ty: MIEstimate
    predictiveness: dict[str, float]
    seconds: float

    def summary(self, prefix: str) -> dict:
        return {
            f"{prefix}_k": self.k,
            f"{prefix}_i_xt_bits": self.i_xt,
            **self.i_ty.as_dict(f"{prefix}_i_ty_bits"),
            **{f"{prefix}_{key}": value for key, value in self.predictiveness.items() if key != "h_y"},
            f"{prefix}_seconds": self.seconds,
        }


def _baseline(assignment, Y, started, n_permutations, seed) -> BaselineResult:
    y = np.asarray(Y).ravel()
    t = _codes(assignment)[0]
    return BaselineResult(
        assignment=t,
        k=int(t.max()) + 1,
        i_xt=entropy_bits(t),
        i_ty=corrected_mutual_information(t, y, n_permutations, seed),
        predictiveness=label_predictiveness(t, y),
        seconds=time.perf_counter() - started,
    )


def kmeans_baseline(X, Y, K: int, *, seed: int, n_permutations: int, n_init: int) -> BaselineResult:
    """k-means (scikit-learn, on unit-normalised X, i.e. spherical-ish) at K clusters, Y unused
    for fitting; I(T;Y) raw / null / corrected and predictiveness computed as for IB."""
    from sklearn.cluster import KMeans

    started = time.perf_counter()
    Xn = l2_normalise(X)
    model = KMeans(n_clusters=K, n_init=n_init, random_state=seed).fit(Xn)
    return _baseline(model.labels_, Y, started, n_permutations, seed)


def sib_reference(X, Y, K: int, *, knn: int, seed: int, n_permutations: int, n_init: int) -> BaselineResult:
    """Hard sequential IB (sib-clustering) at a fixed K on the same leave-one-out kNN label
    histograms: the beta -> inf optimum of the same objective, used to check the annealer."""
    from sib import SIB

    started = time.perf_counter()
    Xn = l2_normalise(X)
    labels, y_codes = np.unique(np.asarray(Y).ravel(), return_inverse=True)
    counts = knn_label_counts(Xn, y_codes.ravel(), len(labels), knn)
    model = SIB(n_clusters=K, random_state=seed, n_init=n_init, n_jobs=1).fit(counts.astype(np.float64))
    return _baseline(model.labels_, Y, started, n_permutations, seed)


def plot_elbow(curve: pl.DataFrame, chosen_K: int, out_path, gain_threshold: float | None = None) -> Path:
    """PNG: raw and null-corrected I(T;Y) against K along the annealing path with the
    permutation-null band (mean to 95th percentile), and the gain per added cluster against
    K; the chosen K is marked. Uses the Figure API (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path_rows = curve.filter(pl.col("on_elbow_path")).sort("k") if "on_elbow_path" in curve.columns else curve
    k = path_rows["k"].to_numpy()
    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    ax, ax_gain = fig.subplots(1, 2)
    ax.plot(k, path_rows["i_ty_raw"].to_numpy(), "o-", label="I(T;Y) raw (plug-in)")
    ax.plot(k, path_rows["i_ty_corrected"].to_numpy(), "s-", label="I(T;Y) corrected (raw - null mean)")
    ax.fill_between(
        k,
        path_rows["i_ty_null_mean"].to_numpy(),
        path_rows["i_ty_null_p95"].to_numpy(),
        color="grey",
        alpha=0.35,
        label="permutation null (mean..95th pct)",
    )
    ax.axvline(chosen_K, color="red", linestyle="--", label=f"chosen K = {chosen_K}")
    ax.set_xlabel("number of clusters K")
    ax.set_ylabel("bits")
    ax.set_title("IB annealing path")
    ax.legend(fontsize=8)
    if "gain_per_cluster" in path_rows.columns:
        gains = path_rows["gain_per_cluster"].to_numpy()
        ax_gain.plot(k, gains, "o-")
        ax_gain.axvline(chosen_K, color="red", linestyle="--")
        if gain_threshold is not None:
            ax_gain.axhline(gain_threshold, color="grey", linestyle=":", label="elbow_gain_threshold")
            ax_gain.legend(fontsize=8)
        ax_gain.set_xlabel("number of clusters K")
        ax_gain.set_ylabel("corrected gain per added cluster (bits)")
        ax_gain.set_title("elbow")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=110)
    return out_path
