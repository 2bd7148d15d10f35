"""A sweep's results collected (scripts/sweep.py runs the grid): one row per finished run from its results.json,
then sweep.csv, the sweep.md table over seeds and the sweep.png plane with its Pareto front. The columns are
described in scripts/sweep.py.
"""
import csv
import importlib
import io
import json
import sys
from pathlib import Path


def sibling(name: str):
    """scripts/<name>.py: `scripts.<name>` when the tests import scripts as a package, `<name>` when the scripts
    run as scripts (scripts/ is then sys.path[0]); the project's own modules come from its install."""
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


sweep = sibling("sweep")
Run, READ, COLUMNS, METRICS, DECIMALS = sweep.Run, sweep.READ, sweep.COLUMNS, sweep.METRICS, sweep.DECIMALS


def metric(results: dict, stage: str, task: str, key: str):
    res = (results.get(stage) or {}).get(task) or {}
    value = res.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def diff(a, b):
    return None if a is None or b is None else a - b


def recorded_run(run_dir: Path) -> Run | None:
    """The grid point of a finished run an earlier sweep left in run_dir (read from its sweep.json), or None
    when run_dir is not such a run."""
    record = run_dir / "sweep.json"
    if not (record.is_file() and (run_dir / "results.json").is_file()):
        return None
    r = json.loads(record.read_text())
    if not {"method", "params", "seed"} <= set(r):
        return None
    return Run(r["method"], r["params"], int(r["seed"]))


def collect_row(run: Run, run_dir: Path) -> dict:
    """One CSV row from a finished run's results.json (and sweep.json, when the sweep made the run)."""
    results = json.loads((run_dir / "results.json").read_text())
    training = results.get("training", {})
    record = json.loads((run_dir / "sweep.json").read_text()) if (run_dir / "sweep.json").is_file() else {}
    row = dict(method=run.method, params=run.params_label, seed=run.seed, run=run.name,
               **{column: metric(results, *where) for column, where in READ.items()},
               tokens=training.get("tokens"), wall_s=record.get("wall_s", training.get("total_seconds")),
               peak_mem_mb=record.get("peak_rss_mb"))
    row["recall_gain"] = diff(metric(results, "before", "domain_recall", "nll"), row["recall_nll"])
    row["unseen_gain"] = diff(metric(results, "before", "domain_unseen", "nll"), row["unseen_nll"])
    row["forgetting"] = diff(row["general_nll"], metric(results, "before", "ppl", "nll"))
    row["qa_drop"] = diff(metric(results, "before", "general_qa", "accuracy"), row["general_qa_acc"])
    return row


def write_csv(rows: list[dict], path: Path):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r[k] is None else f"{r[k]:.6g}" if isinstance(r[k], float) else r[k] for k in COLUMNS})
    path.write_text(buf.getvalue())


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per (method, params), each metric as the mean over its seeds with the 95% Student-t
    interval of that mean (stats.mean_interval), "mean [lo, hi]"; a single seed gives the mean alone."""
    import stats

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["params"]), []).append(r)
    lines = ["| method | params | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|---:|" + "---:|" * len(METRICS)]
    for (method, params), rs in groups.items():
        cells = []
        for k in METRICS:
            xs = [r[k] for r in rs if r[k] is not None]
            cells.append(stats.format_interval(*stats.mean_interval(xs), digits=DECIMALS[k]) if xs else "")
        lines.append(f"| {method} | {params or '(preset)'} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def baseline_table(runs, out: Path, baseline: str) -> str:
    """sweep.md's section: every finished run of another method against `baseline`'s run of the same seed,
    metric by metric (eval.compare_runs: the difference of their changes, paired by item)."""
    import stats
    from eval import compare_runs

    def results(run):
        f = out / run.name / "results.json"
        return json.loads(f.read_text()) if f.is_file() else None

    base = {r.seed: r for r in runs if r.method == baseline}
    lines = []
    for run in runs:
        ref = base.get(run.seed)
        if run.method == baseline or ref is None or results(run) is None or results(ref) is None:
            continue
        mine, theirs = results(run), results(ref)
        if "before" not in mine or "before" not in theirs:
            continue  # --eval none: nothing to pair
        for row in compare_runs(theirs, mine, names=(ref.name, run.name))["metrics"]:
            d = 3 if row["metric"] != "nll" else 4
            lines.append(f"| {run.name} | {row['task']} {row['metric']} | {row['n']} | "
                         f"{stats.format_interval(row['delta'], *row['delta_ci'], digits=d)} | {row['verdict']} |")
    if not lines:
        return ""
    return (f"\n## Against {baseline}, paired by item (same seed)\n\nEach row: this run's change (after − before) "
            f"minus {baseline}'s, 95% paired bootstrap interval (eval.py --compare).\n\n"
            "| run | metric | n | run − baseline | verdict |\n|---|---|---:|---|---|\n" + "\n".join(lines) + "\n")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (gain higher or equal and forgetting lower or equal, one
    strictly), sorted by gain. Along the front, more gain always costs more forgetting."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front))


def plot(rows: list[dict], path: Path) -> bool:
    """sweep.png; False (and a note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so sweep.png is skipped (pip install matplotlib)", file=sys.stderr)
        return False
    pts = [r for r in rows if r["recall_gain"] is not None and r["forgetting"] is not None]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    labels = sorted({(r["method"], r["params"]) for r in pts})
    markers = "osD^v<>ph*"
    for i, (method, params) in enumerate(labels):
        group = [r for r in pts if (r["method"], r["params"]) == (method, params)]
        ax.scatter([r["recall_gain"] for r in group], [r["forgetting"] for r in group], marker=markers[i % 10],
                   s=36, label=f"{method} {params}".strip())
    front = pareto_front([(r["recall_gain"], r["forgetting"]) for r in pts])
    if front:
        ax.plot(*zip(*front), "k--", lw=1, marker="o", ms=11, mfc="none", label="Pareto front")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("domain gain: recall-set NLL drop (nats/token)  →  learns more")
    ax.set_ylabel("forgetting: general-text NLL rise (nats/token)  →  forgets more")
    ax.set_title("Learning vs forgetting, one point per run")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
