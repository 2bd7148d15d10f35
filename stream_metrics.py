"""Continual-learning metrics of a task stream, each with its interval.

A stream trains task 1, then task 2, ..., task T, and evaluates every task's test items after every stage. In code
tasks are 0-based (j = 0..T-1) and stages are rows i = 0..T: row 0 is the base model (zero-shot), row j+1 is the
model just after training task j. correct[i][j] lists the per-item verdicts of task j at stage i, the same items in
the same order at every stage. R[i][j] = mean(correct[i][j]), a (T+1) × T matrix. Then (Lopez-Paz & Ranzato 2017,
"Gradient Episodic Memory for Continual Learning"; Chaudhry et al. 2018, "Riemannian Walk for Incremental
Learning"):

    ACC  = 1/T     Σ_{j}         R[T][j]                        average accuracy at the end of the stream
    LA   = 1/T     Σ_{j}         R[j+1][j]                      learning accuracy (plasticity): just after training
    BWT  = 1/(T−1) Σ_{j<T−1}     R[T][j] − R[j+1][j]            backward transfer (< 0: forgetting)
    FWT  = 1/(T−1) Σ_{j≥1}       R[j][j] − R[0][j]              forward transfer: before training j, vs zero-shot
    F_j  = max_{l=j+1..T−1}      R[l][j] − R[T][j]   (j < T−1)  forgetting of task j: its best accuracy before
                                                                the last stage minus its final one
    F    = 1/(T−1) Σ_{j<T−1}     F_j                            average forgetting

BWT, FWT and F need a task before the last: None when T = 1 (and F_j is None for the last task). F_j's max runs over
the stages after task j was trained (Chaudhry et al. take it over all earlier stages; before training, the task's
accuracy is not knowledge that could be forgotten). A joint (multi-task) run has only two rows, zero-shot and after
training on all tasks at once (joint=True): only ACC is defined, the rest are None.

Intervals (stats.py for the pieces):
  one run    R[i][j] is a plain proportion: its Wilson interval. Every other metric: a paired bootstrap over test
             items (Efron & Tibshirani 1993), stratified by task: each task's items are resampled with replacement,
             independently of the other tasks, and the same resampled indices are used at every stage, so that a
             difference of two stages stays paired on its items; the metrics are recomputed on each resample and
             the (1−confidence)/2 and (1+confidence)/2 percentiles taken. Point estimates are the plain values on
             the data. The max in F_j makes its bootstrap biased upward (the expected max of noisy values is at
             least the max of their means), as for any max; it is reported as is, the standard practice.
  over runs  several task orders or seeds of one method: the mean of the per-run values with a Student t interval
             (stats.mean_interval). This is the run-to-run spread, not the item-sampling one; a single run has no
             such interval (None).
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

import stats

SCALARS = ("acc", "bwt", "fwt", "forgetting", "learning_acc")


# ---------------------------------------------------------------- the accuracy matrix
def _task_arrays(correct) -> list[np.ndarray]:
    """Per task j, its stages × items 0/1 matrix; ValueError for input that has no accuracy matrix."""
    if len(correct) < 2:
        raise ValueError(f"need at least 2 stages (zero-shot and one after training), got {len(correct)}")
    n_tasks = len(correct[0])
    if n_tasks == 0:
        raise ValueError("stage 0 has no tasks")
    for i, stage in enumerate(correct):
        if len(stage) != n_tasks:
            raise ValueError(f"stage {i} has {len(stage)} tasks, stage 0 has {n_tasks}")
    arrays = []
    for j in range(n_tasks):
        sizes = [len(stage[j]) for stage in correct]
        if sizes[0] == 0:
            raise ValueError(f"task {j} has no items")
        if len(set(sizes)) > 1:  # the same items at every stage, or the stages cannot be paired
            raise ValueError(f"task {j} has a different number of items across stages: {sizes}")
        c = np.asarray([stage[j] for stage in correct], dtype=float)
        if not np.isin(c, (0.0, 1.0)).all():
            raise ValueError(f"task {j}: items must be booleans (or 0/1)")
        arrays.append(c)
    return arrays


def accuracy_matrix(correct: list[list[list[bool]]]) -> list[list[float]]:
    """R[i][j] = fraction of task j's items correct at stage i. Refuses (ValueError) fewer than 2 stages, stages
    with different numbers of tasks, an empty task, and a task whose item count differs between stages."""
    return np.stack([c.mean(axis=1) for c in _task_arrays(correct)], axis=1).tolist()


# ---------------------------------------------------------------- the metrics
def _metrics(R: np.ndarray, joint: bool) -> dict:
    """The formulas of the module docstring on R of shape (..., stages, T), vectorized over the leading axes (the
    bootstrap resamples); each value has the leading shape, forgetting_per_task (..., T−1), undefined ones None."""
    n_stages, T = R.shape[-2:]
    expected = 2 if joint else T + 1
    if n_stages != expected:
        kind = "a joint run has 2 (zero-shot, after joint training)" if joint else f"{T} tasks need {T + 1}"
        raise ValueError(f"R has {n_stages} stages, {kind}")
    out = dict(acc=R[..., -1, :].mean(axis=-1), bwt=None, fwt=None, forgetting=None, forgetting_per_task=None,
               learning_acc=None)
    if joint:
        return out
    just_trained = np.diagonal(R[..., 1:, :], axis1=-2, axis2=-1)  # R[j+1][j]
    out["learning_acc"] = just_trained.mean(axis=-1)
    if T == 1:
        return out
    final = R[..., -1, :-1]  # R[T][j], j < T−1
    out["bwt"] = (final - just_trained[..., :-1]).mean(axis=-1)
    just_before = np.diagonal(R[..., :-1, :], axis1=-2, axis2=-1)[..., 1:]  # R[j][j], j >= 1
    out["fwt"] = (just_before - R[..., 0, 1:]).mean(axis=-1)
    # rows l = 1..T−1 of columns j < T−1, masked to l >= j+1: the stages after j was trained, before the last
    l, j = np.arange(1, T)[:, None], np.arange(T - 1)[None, :]
    best = np.where(l >= j + 1, R[..., 1:T, :T - 1], -np.inf).max(axis=-2)
    out["forgetting_per_task"] = best - final
    out["forgetting"] = out["forgetting_per_task"].mean(axis=-1)
    return out


def transfer_metrics(R: list[list[float]], joint: bool = False) -> dict:
    """{"acc", "bwt", "fwt", "forgetting", "forgetting_per_task" (length T, None for the last task),
    "learning_acc"} of R ((T+1) × T, or 2 × T with joint=True); see the module docstring. Undefined values
    (T = 1, or joint) are None. ValueError when R's number of rows does not fit."""
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[1] == 0:
        raise ValueError(f"R must be a stages × tasks matrix, got shape {R.shape}")
    m = _metrics(R, joint)
    per_task = m.pop("forgetting_per_task")
    out = {k: None if v is None else float(v) for k, v in m.items()}
    per_task = [] if per_task is None else per_task.tolist()
    out["forgetting_per_task"] = per_task + [None] * (R.shape[1] - len(per_task))
    return out


# ---------------------------------------------------------------- intervals of one run
def bootstrap_R(arrays: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, stages, T): R on each stratified paired resample of the test items (module docstring)."""
    rng = np.random.default_rng(seed)
    boot_R = np.empty((n_boot, arrays[0].shape[0], len(arrays)))
    for j, c in enumerate(arrays):
        n = c.shape[1]
        idx = rng.integers(0, n, size=(n_boot, n))  # one draw per task, shared by all its stages: the pairing
        # how often each item was drawn in each resample (a bincount per row); the resampled accuracies at every
        # stage are then one matrix product
        counts = np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
        boot_R[:, :, j] = counts.reshape(n_boot, n) @ c.T / n
    return boot_R


def _earlier_change(R: np.ndarray) -> np.ndarray:
    """(..., T−1): for stage i = 2..T, mean over the tasks trained before it, j < i−1, of R[i][j] − R[i−1][j]."""
    T = R.shape[-1]
    rows = []
    for i in range(2, T + 1):
        rows.append((R[..., i, :i - 1] - R[..., i - 1, :i - 1]).mean(axis=-1))
    return np.stack(rows, axis=-1)


def earlier_task_change(correct, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> list[dict]:
    """What each stage after the first did to the tasks trained before it: for stage i = 2..T (1-based, the row
    of R after training task i), Δ_i = 1/(i−1) Σ_{j<i−1} (R[i][j] − R[i−1][j]) (0-based tasks j), below 0 when
    stage i made the model forget; [{"stage": i, "change", "change_ci"}], the interval from the same stratified
    paired bootstrap as stream_metrics's (the same resamples for the same seed). The per-stage quantity a
    per-stage predictor (the stage's KL, its update's size) is read against. [] for fewer than 2 tasks."""
    arrays = _task_arrays(correct)
    R = np.stack([c.mean(axis=1) for c in arrays], axis=1)
    if R.shape[1] < 2:
        return []
    value = _earlier_change(R)
    boots = _earlier_change(bootstrap_R(arrays, n_boot, seed))
    q = [(1 - confidence) / 2, (1 + confidence) / 2]
    ci = np.quantile(boots, q, axis=0).T.tolist()
    return [dict(stage=i, change=float(v), change_ci=c) for i, v, c in zip(range(2, R.shape[1] + 1), value, ci)]


def stream_metrics(correct, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95,
                   joint: bool = False) -> dict:
    """R and the transfer metrics of one run with their intervals (module docstring): R_ci, (T+1) × T of Wilson
    [lo, hi]; for each key of transfer_metrics, "<key>" and "<key>_ci" ([lo, hi] from the stratified paired
    bootstrap, None where the value is None; forgetting_per_task_ci is a list with None for the last task);
    "n_items" per task and "n_boot". Deterministic in seed; ValueError for ragged input (accuracy_matrix)."""
    if n_boot < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got n_boot={n_boot}, confidence={confidence}")
    arrays = _task_arrays(correct)
    R = np.stack([c.mean(axis=1) for c in arrays], axis=1)
    out = transfer_metrics(R, joint)
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    R_ci = [[list(stats.wilson_interval(int(c[i].sum()), c.shape[1], z)) for c in arrays] for i in range(len(R))]

    boots = _metrics(bootstrap_R(arrays, n_boot, seed), joint)
    q = [(1 - confidence) / 2, (1 + confidence) / 2]

    def interval(samples):
        return np.quantile(samples, q, axis=0).T.tolist()

    result = dict(R=R.tolist(), R_ci=R_ci)
    for key in SCALARS:
        result[key] = out[key]
        result[f"{key}_ci"] = None if out[key] is None else interval(boots[key])
    per_task_ci = [] if boots["forgetting_per_task"] is None else interval(boots["forgetting_per_task"])
    result["forgetting_per_task"] = out["forgetting_per_task"]
    result["forgetting_per_task_ci"] = per_task_ci + [None] * (R.shape[1] - len(per_task_ci))
    result["n_items"] = [c.shape[1] for c in arrays]
    result["n_boot"] = n_boot
    return result


# ---------------------------------------------------------------- over runs
def across_runs(runs: list[dict], confidence: float = 0.95) -> dict:
    """Per scalar metric (acc, bwt, fwt, forgetting, learning_acc) over runs (stream_metrics outputs, or any dicts
    with those keys): {"value": mean, "ci": [lo, hi] (Student t, stats.mean_interval) or None when n < 2, "n"};
    None values (e.g. bwt of a joint run) are skipped, and a metric no run defines is {value None, ci None, n 0}."""
    if not runs:
        raise ValueError("across_runs needs at least one run")
    out = {}
    for key in SCALARS:
        xs = [r[key] for r in runs if r.get(key) is not None]
        if not xs:
            out[key] = dict(value=None, ci=None, n=0)
            continue
        mean, lo, hi = stats.mean_interval(xs, confidence)
        out[key] = dict(value=mean, ci=[lo, hi] if len(xs) >= 2 else None, n=len(xs))
    return out


# ---------------------------------------------------------------- two methods, paired
def paired_difference(pairs: list[tuple], n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Method A minus method B, each metric, over pairs [(correct_A, correct_B), ...] of sequential runs that
    trained the same tasks in the same order and evaluated the same test items (one pair per order, or per seed).

        d_k   = metric(A_k) − metric(B_k)          the difference on pair k
        value = 1/K Σ_k d_k

    Two intervals, as the study gives (a direction is supported only where both exclude zero):
      "ci_items"  a paired bootstrap over test items: in each resample every (pair, task) draws one set of item
                  indices, shared by A's and B's every stage (so the two runs stay paired on items, and the stages
                  within each run too), independently of the other tasks and pairs; `value` is recomputed on each
                  resample. It holds the sampling of the items, not the run-to-run variation.
      "ci_runs"   a Student t interval over the K differences (stats.mean_interval): the variation between orders
                  or seeds; None for K = 1.
    Returns {metric: {"value", "ci_items", "ci_runs", "per_pair": [d_k], "n": K}} for the SCALARS (value None
    where the metric is undefined, e.g. BWT with one task). ValueError when a pair's runs differ in their tasks'
    item counts (accuracy_matrix's checks apply to each run)."""
    if not pairs:
        raise ValueError("paired_difference needs at least one pair of runs")
    q = [(1 - confidence) / 2, (1 + confidence) / 2]
    per_pair, boots = [], []
    for k, (a, b) in enumerate(pairs):
        arrays_a, arrays_b = _task_arrays(a), _task_arrays(b)
        if [c.shape[1] for c in arrays_a] != [c.shape[1] for c in arrays_b]:
            raise ValueError(f"pair {k}: the two runs scored different numbers of items per task")
        n_a = arrays_a[0].shape[0]
        # one resample of each task's items for both runs: the stages of A and B stacked as rows of one matrix
        boot = bootstrap_R([np.concatenate([ca, cb]) for ca, cb in zip(arrays_a, arrays_b)], n_boot, seed + k)
        ma, mb = _metrics(boot[:, :n_a], False), _metrics(boot[:, n_a:], False)
        boots.append({key: None if ma[key] is None else ma[key] - mb[key] for key in SCALARS})
        ra, rb = (transfer_metrics(np.stack([c.mean(axis=1) for c in arrays], axis=1)) for arrays in (arrays_a, arrays_b))
        per_pair.append({key: None if ra[key] is None else ra[key] - rb[key] for key in SCALARS})
    out = {}
    for key in SCALARS:
        ds = [d[key] for d in per_pair]
        if any(d is None for d in ds):
            out[key] = dict(value=None, ci_items=None, ci_runs=None, per_pair=ds, n=len(ds))
            continue
        pooled = np.mean([b[key] for b in boots], axis=0)
        mean, lo, hi = stats.mean_interval(ds, confidence)
        out[key] = dict(value=float(np.mean(ds)), ci_items=np.quantile(pooled, q).tolist(),
                        ci_runs=[lo, hi] if len(ds) >= 2 else None, per_pair=ds, n=len(ds))
    return out
