"""Task streams for every method of a protocol, run resumably, and the report across them from the records alone.

    python scripts/streams.py --protocol configs/streams.json --results results/streams --jobs 2   # run, then report
    python scripts/streams.py --report results/streams                                              # rebuild the report

The protocol (JSON, copied into the results directory as protocol.json) names the benchmark, the task orders, the
seeds, the stream.py flags every run gets (stream_flags), and per method its flags (and, optionally, its own orders
and seeds: joint training has no order, so it runs over seeds instead). Every (method, order, seed) is one
`stream.py` run in runs/streams/<run>/ (its model and snapshots stay there); when it finishes, its records are
copied to <results>/runs/<run>/ (config.json, results.json, report.md, matrix.csv, matrix.png, and per stage
eval.json with the per-item records, train.json and metrics.jsonl), which is all the report reads. A killed
grid started again skips the finished runs and resumes the others (stream.py --resume). --jobs 2 runs two
streams side by side, one thread each.

The report (<results>/report.md, summary.csv, summary.png, and with a baseline paired.png):
    per run      ACC, BWT, FWT, forgetting and learning accuracy with their paired-bootstrap intervals over test
                 items, and the general ability after the last stage against the base model
    per method   the mean of each metric over its runs (orders, or seeds) with a Student t interval
    paired       with a "baseline" method in the protocol: every sequential method minus it on the orders both
                 ran, on the same test items, with a paired bootstrap over items and a t interval over orders
                 (stream_metrics.paired_difference); "compare": [[A, B], ...] adds A − B for further pairs
    summary.png  average accuracy against backward transfer, one point per method with its t intervals
    paired.png   ACC and BWT of every paired difference, with both intervals
"""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from errors import ArgumentParser, ForgetlabError, read_json_object, run_cli
from stats import clustered_rank_correlation
from stream_metrics import across_runs, paired_difference
from stream_outputs import correct_matrix

REPO = Path(__file__).resolve().parents[1]
RECORDS = ("config.json", "results.json", "report.md", "matrix.csv", "matrix.png")
STAGE_RECORDS = ("eval.json", "train.json", "metrics.jsonl")
METRICS = ("acc", "bwt", "fwt", "forgetting", "learning_acc")


def read_protocol(path) -> dict:
    """The protocol, checked before anything runs."""
    p = read_json_object(path, "stream protocol")
    for key, kind in (("benchmark", str), ("orders", list), ("seeds", list), ("stream_flags", list),
                      ("methods", dict)):
        if not isinstance(p.get(key), kind):
            raise ForgetlabError(f"{path}: {key!r} must be a {kind.__name__}")
    for name, m in p["methods"].items():
        if not (isinstance(m, dict) and isinstance(m.get("flags"), list)):
            raise ForgetlabError(f"{path}: method {name!r} needs {{\"flags\": [...]}}")
    # joint training has no order, so a paired comparison (order by order) cannot name it
    joint = {name for name, m in p["methods"].items() if "--joint" in m["flags"]}
    base = p.get("baseline")
    if base is not None and (not isinstance(base, str) or base not in p["methods"]):
        raise ForgetlabError(f"{path}: baseline {base!r} is not one of the methods")
    if base in joint:
        raise ForgetlabError(f"{path}: baseline {base!r} trains jointly, without an order to pair on")
    seen = set()
    for pair in p.get("compare", []):
        if not (isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1]):
            raise ForgetlabError(f"{path}: compare: {pair!r} is not a pair [A, B] of two methods")
        for name in pair:
            if not isinstance(name, str) or name not in p["methods"]:
                raise ForgetlabError(f"{path}: compare: {name!r} is not one of the methods")
            if name in joint:
                raise ForgetlabError(f"{path}: compare: {name!r} trains jointly, without an order to pair on")
        if base in pair or frozenset(pair) in seen:
            raise ForgetlabError(f"{path}: compare: {pair!r} is already compared (the baseline's pairs, or an "
                                 f"earlier pair)")
        seen.add(frozenset(pair))
    return p


def planned_runs(p: dict) -> list[tuple[str, str, list[str]]]:
    """(run name, method name, stream.py flags) of every run of the protocol, in order."""
    runs = []
    for name, m in p["methods"].items():
        for order in m.get("orders", p["orders"]):
            for seed in m.get("seeds", p["seeds"]):
                run = f"{name}-order{order}-seed{seed}"
                flags = ["--benchmark", p["benchmark"], "--order", str(order), "--seed", str(seed),
                         *p["stream_flags"], *m["flags"]]
                runs.append((run, name, flags))
    return runs


def run_grid(protocol_file, results: Path, jobs: int, work: Path):
    p = read_protocol(protocol_file)
    results.mkdir(parents=True, exist_ok=True)
    saved = results / "protocol.json"
    if saved.is_file() and read_json_object(saved, "protocol")["methods"] != p["methods"]:
        raise ForgetlabError(f"{saved}: the results directory holds another protocol's runs")
    shutil.copyfile(protocol_file, saved)
    todo = [r for r in planned_runs(p) if not (results / "runs" / r[0] / "results.json").is_file()]
    todo.sort(key=lambda r: p["orders"].index(r[2][r[2].index("--order") + 1]))  # one order of every method first
    print(f"streams: {len(planned_runs(p)) - len(todo)} finished, {len(todo)} to run", file=sys.stderr)
    running: list[tuple[subprocess.Popen, str, float]] = []
    failed = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if jobs > 1 else dict(os.environ)
    while todo or running:
        while todo and len(running) < jobs:
            run, _, flags = todo.pop(0)
            out = work / run
            resume = ["--resume"] if (out / "config.json").is_file() else []
            log = open(work / f"{run}.log", "a")
            cmd = [sys.executable, str(REPO / "stream.py"), *flags, "--out", str(out), *resume]
            print(f"streams: start {run}: {' '.join(cmd[1:])}", file=sys.stderr)
            running.append((subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO), run, time.time()))
        time.sleep(0.5)  # a finished stream is noticed within half a second
        for proc, run, t0 in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, run, t0))
            if proc.returncode != 0:  # the others go on; a later start of the grid resumes this one
                failed.append(run)
                print(f"streams: {run} FAILED (exit {proc.returncode}; see {work / (run + '.log')})", file=sys.stderr)
                continue
            copy_records(work / run, results / "runs" / run)
            print(f"streams: {run} done in {time.time() - t0:.0f} s", file=sys.stderr)
    write_report(results)
    if failed:
        raise ForgetlabError(f"{len(failed)} streams failed ({', '.join(failed)}): see their logs in {work}")


def copy_records(src: Path, dst: Path):
    """The run's records (module docstring), into a temporary directory renamed when complete."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in RECORDS:
        shutil.copyfile(src / f, tmp / f)
    for stage in sorted(src.glob("stage-*")):
        (tmp / stage.name).mkdir()
        for f in STAGE_RECORDS:
            if (stage / f).is_file():
                shutil.copyfile(stage / f, tmp / stage.name / f)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


# ----------------------------------------------------------------------------- the report

def read_runs(results: Path) -> tuple[dict, list[tuple[str, str, dict]]]:
    """(protocol, [(run name, method name, results.json)]) of the finished runs, in the protocol's order."""
    p = read_protocol(results / "protocol.json")
    runs = []
    for run, name, _ in planned_runs(p):
        f = results / "runs" / run / "results.json"
        if f.is_file():
            runs.append((run, name, read_json_object(f, "stream results")))
    return p, runs


def general_change(r: dict) -> dict:
    """{task metric: (delta, [lo, hi], verdict)} of the general ability after the last stage against the base."""
    if not r["general"]:
        return {}
    return {f"{row['task']} {row['metric']}": (row["delta"], row["delta_ci"], row["verdict"])
            for row in r["general"][-1]["metrics"]}


def fmt(value, ci, digits: int = 3) -> str:
    if value is None:
        return "—"
    if ci is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def write_report(results: Path) -> str:
    p, runs = read_runs(results)
    methods = list(dict.fromkeys(name for _, name, _ in runs))
    per_method = {m: across_runs([r["metrics"] for _, name, r in runs if name == m]) for m in methods}
    lines = ["# Task streams", "", p.get("description", ""), "",
             "Made by `python scripts/streams.py --protocol configs/streams.json --results results/streams`; rebuilt "
             "from the records under runs/ by `python scripts/streams.py --report results/streams`.", "",
             f"{len(runs)} of {len(planned_runs(p))} planned runs finished.", "",
             "## Per method (mean over its runs, 95% Student t interval over orders or seeds; one run: no interval)",
             "", "| method | runs | ACC | BWT | FWT | forgetting | LA |", "|---|---:|---|---|---|---|---|"]
    for m in methods:
        s = per_method[m]
        lines.append(f"| {m} | {s['acc']['n']} | " + " | ".join(fmt(s[k]["value"], s[k]["ci"]) for k in METRICS) + " |")
    lines += ["", "ACC: average accuracy after the last stage; BWT: backward transfer (below 0: the earlier tasks lost "
                  "accuracy); FWT: accuracy on a task just before training it minus the base model's; forgetting: a "
                  "task's best accuracy after training it minus its final one; LA: accuracy on each task right after "
                  "training it. Definitions: stream_metrics.py.", "",
              "## Per run (95% paired bootstrap over test items)", "",
              "| run | ACC | BWT | FWT | forgetting | general ability after the last stage |",
              "|---|---|---|---|---|---|"]
    for run, _, r in runs:
        m = r["metrics"]
        general = "; ".join(f"{k} {fmt(d, ci, 3)} {v}" for k, (d, ci, v) in general_change(r).items())
        lines.append(f"| {run} | " + " | ".join(fmt(m[k], m[f"{k}_ci"]) for k in METRICS[:4]) + f" | {general} |")
    paired = paired_rows(p, results, runs)
    lines += paired_sections(p, paired)
    lines += kl_against_forgetting(runs)
    cost = sum(r["seconds"]["train"] + r["seconds"]["eval"] for _, _, r in runs)
    lines += ["", f"Compute: {cost / 3600:.1f} hours of training and evaluation in all (the runs' own seconds, "
                  "two runs side by side with one thread each).", ""]
    report = "\n".join(lines)
    (results / "report.md").write_text(report)
    (results / "summary.csv").write_text(summary_csv(runs))
    plot_summary(methods, per_method, results / "summary.png")
    if paired:
        plot_paired(paired, results / "paired.png")
    return report


def run_correct(results: Path, run: str, r: dict) -> list:
    """correct[i][j] of a finished run, from its stages' per-item records (stream_outputs.correct_matrix)."""
    stages = [read_json_object(results / "runs" / run / f"stage-{i}" / "eval.json", "stage evaluation")
              for i in range(2 if r["joint"] else len(r["tasks"]) + 1)]
    return correct_matrix(stages, r["tasks"])


def paired_rows(p: dict, results: Path, runs) -> list[tuple[str, str, int, dict]]:
    """[(A, B, pairs, stream_metrics.paired_difference)]: every sequential method minus the protocol's "baseline",
    then each of its "compare" pairs, on the orders (and seeds) both ran, on the same test items."""
    by_key = {(name, r["order"], r["seed"]): (run, r) for run, name, r in runs}
    base = p.get("baseline")
    wanted = [(m, base) for m in dict.fromkeys(name for _, name, r in runs if not r["joint"])
              if base and m != base] + [tuple(pair) for pair in p.get("compare", [])]
    rows = []
    for a, b in wanted:
        keys = [(o, s) for (name, o, s), (_, r) in by_key.items() if name == a and not r["joint"]
                and (b, o, s) in by_key]
        if keys:
            pairs = [tuple(run_correct(results, *by_key[(who, o, s)]) for who in (a, b)) for o, s in keys]
            rows.append((a, b, len(pairs), paired_difference(pairs)))
    return rows


def paired_sections(p: dict, rows: list[tuple[str, str, int, dict]]) -> list[str]:
    """The report's paired comparisons (paired_rows): each method minus the baseline, then the protocol's further
    pairs; no lines without a pair."""
    base = p.get("baseline")
    further = [tuple(pair) for pair in p.get("compare", [])]
    lines = []
    for title, part in ((f"Each method minus {base}, paired", [r for r in rows if (r[0], r[1]) not in further]),
                        ("The protocol's further comparisons, paired", [r for r in rows if (r[0], r[1]) in further])):
        if not part:
            continue
        lines += ["", f"## {title}", "",
                  "On the orders both ran, the same test items: the difference of each metric averaged over the "
                  "orders, with a 95% paired bootstrap over test items (each order's and task's items resampled alike "
                  "for both methods) and a 95% Student t interval over the orders (wide with few orders). A direction "
                  "is supported only where both intervals exclude zero.", "",
                  "| difference | orders | interval | ACC | BWT | FWT | forgetting | LA |", "|---|---:|---|---|---|---|---|---|"]
        for a, b, n, d in part:
            for ci, label in (("ci_items", "items"), ("ci_runs", "orders")):
                lines.append(f"| {a} − {b} | {n} | {label} | " + " | ".join(fmt(d[k]["value"], d[k][ci]) for k in METRICS)
                             + " |")
        lines += ["", "Verdicts (higher is better for ACC, BWT, FWT and LA; lower for forgetting):", ""]
        lines += [f"- {a} − {b} ({n} order{'s' * (n > 1)}): {verdicts(n, d)}" for a, b, n, d in part]
    return lines


def verdicts(n: int, d: dict) -> str:
    """What the two intervals of each paired difference allow."""
    if n == 1:
        return "no verdict, since one order has no interval over orders"
    said = []
    for k, label in zip(METRICS, ("ACC", "BWT", "FWT", "forgetting", "LA")):
        x = d[k]
        if x["value"] is None:
            continue
        if any(ci[0] <= 0 <= ci[1] for ci in (x["ci_items"], x["ci_runs"])):
            said.append(f"{label} no detectable difference")
        else:
            said.append(f"{label} {'higher' if x['value'] > 0 else 'lower'}")
    return "; ".join(said)


def kl_against_forgetting(runs) -> list[str]:
    """The report's section on RL's Razor's predictor in streams: over every stage after the first of the runs
    with stage diagnostics, Spearman's ρ between the stage's KL to its start (on its own task's prompts) and the
    change it made to the earlier tasks' accuracy, with an interval resampling whole runs. No lines when no run
    has the diagnostics (runs made before they existed)."""
    clusters = [[(d["kl"], d["earlier_change"]) for d in r.get("diagnostics_by_stage", [])
                 if d["earlier_change"] is not None] for _, _, r in runs]
    if not any(clusters):
        return []
    c = clustered_rank_correlation(clusters)
    if c["n_pairs"] < 3:
        return ["", "## Does a stage's KL predict its forgetting?", "",
                f"{c['n_pairs']} stage(s) with diagnostics after a first stage: too few for a correlation."]
    rho = fmt(c["rho"], c["ci"], 2)
    reading = ("no interval with fewer than 3 runs" if c["ci"] is None else
               "no detectable association" if c["ci"][0] <= 0 <= c["ci"][1] else
               "more KL, more forgetting" if c["ci"][1] < 0 else "more KL, less forgetting")
    return ["", "## Does a stage's KL predict its forgetting?", "",
            f"Spearman's ρ between each stage's KL to its start on its own task's prompts and the mean change of "
            f"the earlier tasks' accuracy it caused, over {c['n_pairs']} stages of {c['n_clusters']} runs (95% "
            f"bootstrap resampling whole runs; below 0: the stages that moved further forgot more): {rho}, "
            f"{reading}."]


def summary_csv(runs) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "method", "order", "seed", *METRICS, *(f"{k}_lo" for k in METRICS),
                *(f"{k}_hi" for k in METRICS)])
    for run, name, r in runs:
        m = r["metrics"]
        cis = [m[f"{k}_ci"] or [None, None] for k in METRICS]
        w.writerow([run, name, r["order"], r["seed"], *(m[k] for k in METRICS), *(c[0] for c in cis),
                    *(c[1] for c in cis)])
    return buf.getvalue()


def plot_paired(rows, path: Path) -> bool:
    """ACC and BWT of each paired difference (paired_rows): the point, the paired bootstrap's interval over items
    (thick) and the t interval over orders (thin), one row per pair."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so paired.png is skipped", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(8, 0.5 * len(rows) + 1.6), sharey=True)
    for ax, key, title in zip(axes, ("acc", "bwt"), ("ACC", "BWT")):
        for y, (_, _, n, d) in enumerate(rows):
            x = d[key]
            if x["ci_runs"]:
                ax.plot(x["ci_runs"], [y, y], color="grey", lw=1)
            ax.plot(x["ci_items"], [y, y], color=f"C{y}", lw=4, solid_capstyle="butt")
            ax.plot([x["value"]], [y], "o", color="black", ms=4)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{title} difference", fontsize=10)
        ax.set_xlabel("difference (thick: 95% over items; thin: over orders)", fontsize=8)
    axes[0].set_yticks(range(len(rows)), [f"{a} − {b} ({n})" for a, b, n, _ in rows])
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True


def plot_summary(methods, per_method, path: Path) -> bool:
    """Average accuracy against backward transfer, one point per method with its t intervals (joint training has
    no BWT: drawn as a horizontal line at its ACC)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so summary.png is skipped", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in methods:
        acc, bwt = per_method[m]["acc"], per_method[m]["bwt"]
        if bwt["value"] is None:
            ax.axhline(acc["value"], ls="--", lw=1, color="grey")
            ax.text(ax.get_xlim()[0], acc["value"], f" {m}", va="bottom", fontsize=8, color="grey")
            continue
        xerr = None if bwt["ci"] is None else [[bwt["value"] - bwt["ci"][0]], [bwt["ci"][1] - bwt["value"]]]
        yerr = None if acc["ci"] is None else [[acc["value"] - acc["ci"][0]], [acc["ci"][1] - acc["value"]]]
        ax.errorbar(bwt["value"], acc["value"], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=m)
    ax.axvline(0, lw=0.8, color="black")
    ax.set_xlabel("backward transfer (BWT)")
    ax.set_ylabel("average accuracy after the last stage (ACC)")
    ax.set_title("Task streams: methods, 95% t intervals over orders", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", help="the protocol to run (configs/streams.json)")
    ap.add_argument("--results", help="the results directory the records go to")
    ap.add_argument("--report", help="rebuild the report of this results directory and stop")
    ap.add_argument("--jobs", type=int, default=1, help="streams run side by side (one thread each when > 1)")
    ap.add_argument("--work", default=str(REPO / "runs" / "streams"), help="where the runs themselves go")
    args = ap.parse_args(argv)
    if args.report:
        print(write_report(Path(args.report)))
        return
    if not (args.protocol and args.results) or args.jobs < 1:
        raise ForgetlabError("give --protocol and --results (and --jobs >= 1), or --report DIR")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run_grid(args.protocol, Path(args.results), args.jobs, work)


if __name__ == "__main__":
    run_cli(main)
