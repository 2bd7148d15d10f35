"""The study's report: study.md, study.csv and the figures, rebuilt from a results directory's records alone
(the protocol, the per-run records and the selection rule: scripts/study.py, which describes the quantities).

    python scripts/sweep.py --report results/study      # write_report(results/study)
"""
import csv
import importlib
import io
import math
import sys
from pathlib import Path

import numpy as np

import stats


def sibling(name: str):
    """scripts/<name>.py: `scripts.<name>` when the tests import scripts as a package, `<name>` when the scripts
    run as scripts (scripts/ is then sys.path[0]); the project's own modules come from its install."""
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


study = sibling("study")
SPLITS, QUANTITIES, LEVELS_AFTER = study.SPLITS, study.QUANTITIES, study.LEVELS_AFTER
label, settings, quantities, split_metrics = study.label, study.settings, study.quantities, study.split_metrics
read_results_dir, select, test_groups, of_group = study.read_results_dir, study.select, study.test_groups, study.of_group


def rows_of(protocol: dict, base: dict, runs: list[dict]) -> list[dict]:
    """One row per run and split: its identity, its quantities, and its cost."""
    rows = []
    for r in sorted(runs, key=lambda r: (list(protocol["methods"]).index(r["method"])
                                         if r["method"] in protocol["methods"] else 99, r.get("control") or "",
                                         label(r["params"]), r["seed"])):
        for split in SPLITS:
            rows.append(dict(method=r["method"], params=r["params"], seed=r["seed"], split=split,
                             **quantities(r["items"], base, split), wall_s=r.get("wall_s"), cpu_s=r.get("cpu_s"),
                             **({"control": r["control"]} if r.get("control") else {})))
    return rows


def record_of(runs: list[dict], row: dict) -> dict:
    return next(x for x in runs if of_group(x, row["method"], row["params"], row.get("control"))
                and x["seed"] == row["seed"])


def fmt(x, digits: int = 4, sign: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    x = round(x, digits) + 0.0  # no "-0.0000" (-0.0 + 0.0 is +0.0)
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def over_seeds(values: list[float], digits: int = 4) -> str:
    """"mean [lo, hi]" (95% t interval over seeds), "mean (1 seed)" with one."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{fmt(values[0], digits)} (1 seed)"
    mean, lo, hi = stats.mean_interval(values)
    return f"{fmt(mean, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


# column -> (task, item field, token-weighted, sign): the per-item form of QUANTITIES, for paired item statistics
ITEM_COLUMNS = {"recall_gain": ("domain_recall", "nll", True, -1), "unseen_gain": ("domain_unseen", "nll", True, -1),
                "forgetting": ("ppl", "nll", True, +1), "lambada_nll": ("lambada", "nll", False, +1),
                "lambada": ("lambada", "correct", False, +1), "arc_easy": ("arc_easy", "correct", False, +1),
                "general_qa": ("general_qa", "correct", False, +1),
                "heldout_gain": ("domain_heldout", "nll", True, -1),
                "instructions": ("instructions", "passed", False, +1)}
OWN_DATA = "heldout_gain"  # a study on one's own --data: its tables gain the column only where runs have it
# the instruction-following pass rate: in the study level since its third amendment, so the runs made before it
# lack it; its column appears only where runs have it (the committed report stays what its records give)
INSTRUCTIONS = "instructions"
OPTIONAL = (OWN_DATA, INSTRUCTIONS)


def with_own_data(cols: list[str], rows: list[dict]) -> list[str]:
    """`cols`, and heldout_gain after them when any row has it (a study on the drug sets never does)."""
    return cols + [OWN_DATA] if any(r.get(OWN_DATA) is not None for r in rows) else cols


def with_instructions(cols: list[str], rows: list[dict]) -> list[str]:
    """`cols`, and the instruction-following column after them when any row has it."""
    return cols + [INSTRUCTIONS] if any(r.get(INSTRUCTIONS) is not None for r in rows) else cols


def seed_mean(items_of_runs: list[dict], task: str, field: str) -> dict:
    """{item id: (its value averaged over the runs, its token weight)} on the test half."""
    values, weight = {}, {}
    for items in items_of_runs:
        for it in items.get(task, []):
            if it["split"] == "test":
                values.setdefault(it["id"], []).append(float(it[field]))
                weight[it["id"]] = it.get("tokens", 1)
    return {i: (sum(v) / len(v), weight[i]) for i, v in values.items() if len(v) == len(items_of_runs)}


def item_interval(after: list[dict], before: list[dict], column: str) -> tuple | None:
    """(mean, lo, hi): the change from `before` to `after` (each a list of runs' items, averaged over them item by
    item), paired by item, with a 95% bootstrap interval over the test items (stats.paired_bootstrap). It holds
    the item sampling that an interval over seeds does not."""
    task, field, weighted, sign = ITEM_COLUMNS[column]
    a, b = seed_mean(after, task, field), seed_mean(before, task, field)
    ids = [i for i in a if i in b]
    if not ids:
        return None
    value, lo, hi = stats.paired_bootstrap([b[i][0] for i in ids], [a[i][0] for i in ids],
                                           weights=[a[i][1] for i in ids] if weighted else None)
    return (value, lo, hi) if sign > 0 else (-value, -hi, -lo)


def interval_text(iv, digits: int = 4) -> str:
    return "–" if iv is None else f"{fmt(iv[0], digits)} [{fmt(iv[1], digits)}, {fmt(iv[2], digits)}]"


def words(values: list[float], per_item, higher_is_worse: bool) -> str:
    """The verdict the intervals allow: a direction only when both the interval over seeds and the per-item
    interval exclude zero, on the same side."""
    values = [v for v in values if v is not None]
    if len(values) < 2 or per_item is None:
        return "not enough runs for an interval"
    _, lo, hi = stats.mean_interval(values)
    sides = {lo > 0 if not lo <= 0 <= hi else None, per_item[1] > 0 if not per_item[1] <= 0 <= per_item[2] else None}
    if None in sides or len(sides) > 1:
        return "no detectable change"
    return "worse" if sides.pop() == higher_is_worse else "better"


DEV_COLUMNS = ["recall_gain", "unseen_gain", "forgetting", "lambada_nll", "recall_acc_gain", "arc_easy", "lambada"]
TEST_LEARN = ["recall_gain", "unseen_gain", "recall_acc_gain", "unseen_acc_gain"]
TEST_FORGET = ["forgetting", "lambada_nll", "lambada", "arc_easy", "general_qa"]
WORSE_WHEN_HIGHER = {"forgetting", "lambada_nll"}  # the other forgetting columns are accuracies: lower is worse


def report_md(protocol: dict, base: dict, runs: list[dict], rows: list[dict]) -> str:
    """study.md from the records and their rows (rows_of: computed once for the tables, the csv and the figures)."""
    dev = [r for r in rows if r["split"] == "dev"]
    chosen = select(protocol, dev)
    first = protocol["seeds"][0]
    dev_columns, test_learn = with_own_data(DEV_COLUMNS, rows), with_own_data(TEST_LEARN, rows)
    out = ["# The study: results", "",
           f"Rebuilt by `python scripts/sweep.py --report DIR` from protocol.json, base.json and runs/*.json alone. "
           f"{len(runs)} runs; CPU time {sum(r.get('cpu_s') or 0 for r in runs) / 3600:.1f} h "
           f"(user + system seconds of the train.py processes).", "",
           f"## Dev: every setting, seed {first} (the selection rule reads this table)", "",
           "| method | setting | " + " | ".join(dev_columns) + " | chosen |",
           "|---|---|" + "---|" * len(dev_columns) + "---|"]
    for m in protocol["methods"]:
        for params in settings(protocol, m):
            r = next((x for x in dev if of_group(x, m, params) and x["seed"] == first), None)
            cells = [fmt(r[c]) if r else "not run" for c in dev_columns]
            mark = "**yes**" if m in chosen and chosen[m]["params"] == params else ""
            out.append(f"| {m} | {label(params)} | " + " | ".join(cells) + f" | {mark} |")
    out += ["", "Selection (" + protocol["selection"]["rule"] + "):", ""]
    out += [f"- {m}: {label(c['params'])}: {c['reason']}" for m, c in chosen.items()]
    missing = [m for m in protocol["methods"] if m not in chosen]
    out += [f"- {m}: not chosen yet (dev runs missing)" for m in missing]

    groups = test_groups(protocol, chosen)
    test = {name: [r for r in rows if r["split"] == "test" and of_group(r, m, params, own)]
            for name, m, params, own in groups}
    setting = {name: params for name, _, params, _ in groups}
    test_rows = [r for rs in test.values() for r in rs]  # an optional column appears once a compared run has it
    test_forget = with_instructions(TEST_FORGET, test_rows)
    ref = protocol["selection"]["reference"]
    for title, cols in (("learning (higher = learnt more)", test_learn),
                        ("forgetting (NLL: higher = forgot more; accuracies: lower = forgot more)", test_forget)):
        out += ["", f"## Test, chosen settings: {title}", "",
                "Mean over seeds with its 95% t interval; each value is after − before on the test split.", "",
                "| method | setting | seeds | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
        for m, rs in test.items():
            cells = [over_seeds([r[c] for r in rs]) for c in cols]
            out.append(f"| {m} | {label(setting[m])} | {len(rs)} | " + " | ".join(cells) + " |")
    cols = with_own_data(TEST_LEARN[:2], rows) + test_forget
    pairings = [(f"each method minus {ref}", [(m, ref) for m in test if m != ref and m in chosen])] if ref in test else []
    controls = [(name, c["like"]) for name, c in protocol.get("controls", {}).items() if name in test]
    pairings += [("each control minus the method it controls", [(c, like) for c, like in controls])] if controls else []
    extra = [(a, b) for a, b in protocol.get("compare", []) if a in test and b in test]
    pairings += [("the protocol's further comparisons", extra)] if extra else []
    for title, pairs_of in pairings:
        out += ["", f"## Test: {title}, paired by seed", "",
                "The difference at each seed both ran, then its mean and 95% t interval over those seeds.", "",
                "| difference | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for a_name, b_name in pairs_of:
            b_by_seed = {r["seed"]: r for r in test[b_name]}
            pairs = [(r, b_by_seed[r["seed"]]) for r in test[a_name] if r["seed"] in b_by_seed]
            cells = [over_seeds([None if a[c] is None or b[c] is None else a[c] - b[c] for a, b in pairs])
                     for c in cols]
            out.append(f"| {a_name} − {b_name} | {len(pairs)} | " + " | ".join(cells) + " |")
    items = {name: [record_of(runs, r)["items"] for r in rs] for name, rs in test.items()}
    cols = with_instructions(with_own_data([c for c in ITEM_COLUMNS if c not in OPTIONAL], rows), test_rows)
    out += ["", "## Test, per item: the change averaged over seeds, paired by item", "",
            "Each item's after − before averaged over the seeds (token-weighted for the NLLs), then the mean over the "
            "test items with a 95% paired bootstrap interval over items: it holds the sampling of the items.", "",
            "| method | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    per_item = {name: {c: item_interval(its, [base], c) for c in cols} for name, its in items.items() if its}
    for name, cells in per_item.items():
        out.append(f"| {name} | {len(items[name])} | " + " | ".join(interval_text(cells[c]) for c in cols) + " |")
    for title, pairs_of in pairings:
        out += ["", f"## Test, per item: {title}", "",
                "On the seeds both ran: each item's value averaged over them, the difference paired by item.", "",
                "| difference | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for a_name, b_name in pairs_of:
            seeds = sorted({r["seed"] for r in test[a_name]} & {r["seed"] for r in test[b_name]})
            a_items = [record_of(runs, r)["items"] for r in test[a_name] if r["seed"] in seeds]
            b_items = [record_of(runs, r)["items"] for r in test[b_name] if r["seed"] in seeds]
            cells = [interval_text(item_interval(a_items, b_items, c) if seeds else None) for c in cols]
            out.append(f"| {a_name} − {b_name} | {len(seeds)} | " + " | ".join(cells) + " |")

    out += ranking(items, base, rows)
    out += kl_against_forgetting(runs, [r for r in rows if r["split"] == "test"])
    out += ["", "## Verdicts on the test split", "",
            "A direction only where the interval over seeds and the per-item interval both exclude zero, on the same "
            "side; otherwise no detectable change.", ""]
    for m, rs in test.items():
        if m in per_item:
            f = {c: words([r[c] for r in rs], per_item[m][c], c in WORSE_WHEN_HIGHER) for c in test_forget
                 if any(r[c] is not None for r in rs)}  # a quantity its runs did not measure gets no verdict
            out.append(f"- {m}: " + "; ".join(f"{c}: {v}" for c, v in f.items()))
    return "\n".join(out) + "\n"


RANKED = ["recall_gain", "forgetting", "lambada_nll", "general_qa", "arc_easy", "lambada"]  # + instructions


def item_changes(items_of_runs: list[dict], base: dict, column: str, ids: list) -> np.ndarray:
    """runs × items: each run's signed change of `column` on the test items `ids` (after − before; before − after
    for a gain), ITEM_COLUMNS's per-item form of the study's quantities."""
    task, field, _, sign = ITEM_COLUMNS[column]
    before = {it["id"]: float(it[field]) for it in base[task]}
    return np.array([[sign * (float(a[i]) - before[i]) for i in ids]
                     for a in ({it["id"]: it[field] for it in items[task]} for items in items_of_runs)])


def ranking(test_items: dict, base: dict, rows: list[dict]) -> list[str]:
    """The study.md section that ranks every method and control on each quantity (stats.rank_intervals: items
    and seeds resampled together), so that the order the README gives is the one the intervals allow. A control
    that is a method's very runs is ranked once, under both names."""
    merged = {}
    for name, its in test_items.items():
        if its:  # a control that is a method's setting holds the very same record objects
            merged.setdefault(tuple(map(id, its)), ([], its))[0].append(name)
    groups = {" = ".join(names): its for names, its in merged.values()}
    if len(groups) < 2:
        return []
    cols = with_instructions(RANKED, rows)
    ranked = {}
    for c in cols:
        task, field, weighted, _ = ITEM_COLUMNS[c]
        having = {g: its for g, its in groups.items() if all(task in x for x in its)}
        if len(having) < 2:
            continue
        scored = [{y["id"] for y in x[task]} for its in having.values() for x in its]
        test = [it for it in base[task] if it["split"] == "test" and all(it["id"] in ids for ids in scored)]
        ids, weights = [it["id"] for it in test], [it.get("tokens", 1) for it in test] if weighted else None
        ranked[c] = stats.rank_intervals({g: item_changes(its, base, c, ids) for g, its in having.items()},
                                         weights, higher_is_better=c not in WORSE_WHEN_HIGHER and c != "forgetting")
    order = sorted(groups, key=lambda g: ranked["forgetting"][g]["rank"] if g in ranked.get("forgetting", {}) else 99)
    out = ["", "## Ranking on the test split", "",
           "Each method's change (seed-averaged, the test items' mean, token-weighted for the NLLs) and its rank "
           "among the methods, 1 = best (the most learnt; the least forgotten), with a 95% bootstrap interval "
           "that resamples the test items (alike for every method) and each method's seeds (stats.rank_intervals). "
           "Two methods whose rank intervals overlap are not ordered by these data. Sorted by the general-text "
           "forgetting.", "",
           "| method | seeds | " + " | ".join(c for c in cols if c in ranked) + " |",
           "|---|---|" + "---|" * len(ranked)]
    for g in order:
        cells = []
        for c in cols:
            if c not in ranked:
                continue
            r = ranked[c].get(g)
            lo, hi = r["rank_ci"] if r else (0, 0)
            cells.append("–" if r is None else f"{fmt(r['value'])}, {r['rank']:g} [{lo:g}–{hi:g}]")
        out.append(f"| {g} | {len(groups[g])} | " + " | ".join(cells) + " |")
    return out


def kl_against_forgetting(runs: list[dict], test_rows: list[dict]) -> list[str]:
    """RL's Razor's question over the study's runs: does a run's KL to the base model on its training prompts
    (diagnostics.kl_to_base, in the records of runs made since) rank its forgetting? Spearman's ρ between the KL
    and each forgetting quantity of the test split over every run that has both, with a bootstrap interval over
    runs. No lines when fewer than 3 runs have the KL (the committed study's runs predate it)."""
    pairs = [(record_of(runs, r)["kl_to_base"]["kl"], r) for r in test_rows if "kl_to_base" in record_of(runs, r)]
    if len(pairs) < 3:
        return []
    out = ["", "## Does the KL to the base model predict forgetting?", "",
           f"Spearman's ρ between each run's KL(π₀ ‖ π) on 32 of its training prompts and its forgetting on the test "
           f"split, over the {len(pairs)} runs whose records have the KL (95% bootstrap over runs; above 0: the runs "
           f"that moved further from the base forgot more).", "", "| forgetting | ρ | reading |", "|---|---|---|"]
    for c in with_instructions(TEST_FORGET, test_rows):
        worse = 1 if c in WORSE_WHEN_HIGHER else -1  # oriented so that higher = forgot more
        xy = [[(kl, worse * r[c])] for kl, r in pairs if r[c] is not None]
        if len(xy) < 3:
            continue
        rho = stats.clustered_rank_correlation(xy)
        ci = rho["ci"]
        reading = ("no detectable association" if ci is None or ci[0] <= 0 <= ci[1] else
                   "more KL, more forgetting" if ci[0] > 0 else "more KL, less forgetting")
        cell = interval_text((rho["rho"], *ci), 2) if ci else fmt(rho["rho"], 2)
        out.append(f"| {c} | {cell} | {reading} |")
    return out


CSV_COLUMNS = ["method", "setting", "seed", "split", *(q for q in QUANTITIES if q not in OPTIONAL), *LEVELS_AFTER,
               "wall_s", "cpu_s"]


def report_csv(rows: list[dict]) -> str:
    columns = with_instructions(with_own_data(CSV_COLUMNS, rows), rows)
    columns += ["control"] if any(r.get("control") for r in rows) else []  # a control's own runs, named
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k))
                    for k in columns if k != "setting"} | {"setting": label(r["params"])})
    return buf.getvalue()


def figures(protocol: dict, base: dict, runs: list[dict], rows: list[dict], out: Path) -> list[str]:
    """plane.png (recall gain vs forgetting: every test run, per-method means with 95% t bars, the Pareto front
    of the means) and benchmarks.png (accuracy before and after per method). Needs matplotlib; returns the
    files written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study: matplotlib is not installed: figures skipped", file=sys.stderr)
        return []
    groups = test_groups(protocol, select(protocol, [r for r in rows if r["split"] == "dev"]))
    drawn = {}  # a control that is a method's very setting (l2-init at ewc's λ = l2-init's) is drawn once
    for name, m, params, own in groups:
        drawn.setdefault((m, label(params), own), (m, params, own, []))[3].append(name)
    test = {" = ".join(names): [r for r in rows if r["split"] == "test" and of_group(r, m, params, own)]
            for m, params, own, names in drawn.values()}
    test = {m: rs for m, rs in test.items() if rs}
    if not test:
        return []
    meta = {"Software": None}  # no version string: the same inputs give the same bytes
    gain = protocol["selection"]["gain"]  # the protocol's learning axis: recall_gain on the drug sets
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    means = {}
    for i, (m, rs) in enumerate(test.items()):
        color = f"C{i}"
        xs, ys = [r[gain] for r in rs], [r["forgetting"] for r in rs]
        ax.scatter(xs, ys, s=12, alpha=0.4, color=color)
        if len(rs) >= 2:
            (mx, xlo, xhi), (my, ylo, yhi) = stats.mean_interval(xs), stats.mean_interval(ys)
            ax.errorbar([mx], [my], xerr=[[mx - xlo], [xhi - mx]], yerr=[[my - ylo], [yhi - my]], fmt="o",
                        color=color, capsize=3, label=f"{m} ({len(rs)} seeds)")
        else:
            mx, my = xs[0], ys[0]
            ax.plot([mx], [my], "o", color=color, label=f"{m} (1 seed)")
        means[m] = (mx, my)
    front = sorted(p for p in means.values() if not any(q[0] >= p[0] and q[1] <= p[1] and q != p
                                                        for q in means.values()))
    if len(front) > 1:
        ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto front (means)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("domain gain: recall NLL before − after (nats/token, test)" if gain == "recall_gain" else
                  f"domain gain: {gain} (test)")
    ax.set_ylabel("forgetting: general-text NLL after − before (nats/token, test)")
    ax.set_title("Learning vs forgetting (bottom right is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plane.png", dpi=100, metadata=meta)
    plt.close(fig)
    written.append("plane.png")

    benches = [("arc_easy", "acc"), ("lambada", "acc"), ("general_qa", "accuracy")]
    fig, axes = plt.subplots(1, len(benches), figsize=(4 * len(benches), 3.6))
    for ax, (task, metric) in zip(axes, benches):
        before = split_metrics(base, "test").get(task, {}).get(metric)
        names, vals, errs = ["base"], [before or 0], [[0], [0]]
        for m, rs in test.items():
            xs = [split_metrics(record_of(runs, r)["items"], "test").get(task, {}).get(metric) for r in rs]
            xs = [x for x in xs if x is not None]
            if not xs:
                continue
            mean, lo, hi = stats.mean_interval(xs) if len(xs) >= 2 else (xs[0], xs[0], xs[0])
            names.append(m)
            vals.append(mean)
            errs[0].append(mean - lo)
            errs[1].append(hi - mean)
        ax.bar(range(len(names)), vals, yerr=errs, capsize=3, color=["grey"] + [f"C{i}" for i in range(len(names) - 1)])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{task} {metric} (test)")
    fig.tight_layout()
    fig.savefig(out / "benchmarks.png", dpi=100, metadata=meta)
    plt.close(fig)
    written.append("benchmarks.png")
    return written


def write_report(results: Path) -> list[str]:
    """study.md, study.csv and the figures in `results`, from its protocol.json, base.json and runs/ alone."""
    results = Path(results)
    protocol, base, runs = read_results_dir(results)
    rows = rows_of(protocol, base, runs)  # every run's metrics per split: bootstraps, so computed once
    (results / "study.md").write_text(report_md(protocol, base, runs, rows))
    (results / "study.csv").write_text(report_csv(rows))
    return ["study.md", "study.csv", *figures(protocol, base, runs, rows, results)]
