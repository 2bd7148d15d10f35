"""The study: a protocol fixed in advance, run by `scripts/sweep.py --protocol`, reported from results/ alone.

    python scripts/sweep.py --protocol configs/study.json --results results/study   # run (resumes), then report
    python scripts/sweep.py --report results/study                                # rebuild tables and figures

The protocol (a JSON file, copied into the results directory as protocol.json) names:
    train_flags   the regime: train.py flags every run gets (data, epochs, the evaluation level, ...)
    description   free text (not compared when a study resumes)
    methods       {method: {grid key: [values]}}: every method gets the same number of settings
    controls      {name: {method, like, rename, params}}: run with every seed at the setting chosen for the
                  method it is `like` (keys renamed, params added), e.g. l2-init at EWC's λ (optional)
    compare       [[A, B], ...]: further differences A − B to report, paired (optional; not compared on resume)
    seeds         the seeds of the reported runs; the first one is also the seed of the dev stage
    selection     the rule that picks each method's setting on the dev split (select(), below)
Two stages:
    dev    every setting of every method, first seed. Each run is evaluated on all items (--eval-split all),
           and the rule reads only the dev half.
    test   each method's chosen setting with every seed (its dev run is the first seed's: it already holds the
           test half). The report gives the test half.
The base model is evaluated once (the first run; the others reuse its before.json through train.py --before).

results/ holds, and the report reads, nothing else than:
    protocol.json          the protocol as run
    base.json              the base model's per-item scores (what every "before" is)
    runs/<run>.json        one per run: flags, training summary, timings, CPU seconds, per-item scores (compact)
and writes study.md (the tables), study.csv (one row per run and split) and two figures.

Quantities (per run and split; "before" = the base model on the same items):
    recall_gain      domain_recall NLL before - after, nats/token: the trained facts, asked in new words
    unseen_gain      domain_unseen NLL before - after: drugs never trained on (what carries over)
    recall_acc, unseen_acc      strict-match accuracy after, and their gains (after - before)
    forgetting       general-text NLL (ppl) after - before, nats/token: higher = forgot more
    lambada_nll      LAMBADA target-word NLL after - before; lambada, arc_easy, general_qa: accuracy after - before
Over seeds: the mean and its 95% Student-t interval; against full fine-tuning: the difference at the same seed,
mean and t interval over the seeds (paired by seed).
"""
import csv
import io
import itertools
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import stats  # noqa: E402
from errors import ForgetlabError, read_json_object  # noqa: E402
from eval import TASKS, summarize  # noqa: E402

SPLITS = ("dev", "test")
# quantity -> (task, metric, sign): sign +1 = after - before, -1 = before - after
QUANTITIES = {
    "recall_gain": ("domain_recall", "nll", -1), "unseen_gain": ("domain_unseen", "nll", -1),
    "recall_acc_gain": ("domain_recall", "accuracy", +1), "unseen_acc_gain": ("domain_unseen", "accuracy", +1),
    "forgetting": ("ppl", "nll", +1), "lambada_nll": ("lambada", "nll", +1),
    "lambada": ("lambada", "acc", +1), "arc_easy": ("arc_easy", "acc", +1), "general_qa": ("general_qa", "accuracy", +1),
}
LEVELS_AFTER = {"recall_acc": ("domain_recall", "accuracy"), "unseen_acc": ("domain_unseen", "accuracy")}
SELECTION_RULES = ("least-forgetting-above-gain",)


# ----------------------------------------------------------------------------- the protocol

def check_protocol(protocol: dict, where: str, grid_keys=None) -> dict:
    """The protocol, checked: a one-line ForgetlabError naming what is wrong. grid_keys(methods) -> {key: (type,
    readers)} (sweep.grid_keys) checks the grid keys when given."""
    def need(ok, msg):
        if not ok:
            raise ForgetlabError(f"{where}: {msg}")

    for key in ("train_flags", "methods", "seeds", "selection"):
        need(key in protocol, f"missing {key!r}")
    need(isinstance(protocol["train_flags"], list) and all(isinstance(f, str) for f in protocol["train_flags"]),
         "train_flags must be a list of strings")
    for flag in ("--method", "--seed", "--out", "--before", "--eval-split"):
        need(flag not in protocol["train_flags"], f"train_flags may not set {flag}: the study sets it per run")
    methods = protocol["methods"]
    need(isinstance(methods, dict) and methods, "methods must be a non-empty {method: {key: [values]}}")
    counts = {m: len(settings(protocol, m)) for m in methods}
    need(len(set(counts.values())) == 1, "every method gets the same number of settings, here "
         + ", ".join(f"{m} {n}" for m, n in counts.items()))
    seeds = protocol["seeds"]
    need(isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds),
         "seeds must be a list of distinct integers")
    rule = protocol["selection"]
    need(isinstance(rule, dict) and rule.get("rule") in SELECTION_RULES,
         f"selection.rule must be one of {SELECTION_RULES}")
    need(rule.get("reference") in methods, "selection.reference must be one of the methods")
    need(isinstance(rule.get("fraction"), (int, float)) and 0 < rule["fraction"] <= 1, "selection.fraction in (0, 1]")
    for q in ("gain", "forgetting"):
        need(rule.get(q) in QUANTITIES, f"selection.{q} must be one of {', '.join(QUANTITIES)}")
    controls = protocol.get("controls", {})
    need(isinstance(controls, dict), "controls must be {name: {method, like, params, rename}}")
    for name, c in controls.items():
        need(isinstance(c, dict) and c.get("method") and c.get("like") in methods,
             f"controls.{name} needs a method and 'like', one of the methods (whose chosen setting it takes)")
        need(name not in methods, f"controls.{name}: a control may not be named like a method")
    compare = protocol.get("compare", [])
    need(isinstance(compare, list) and all(isinstance(c, list) and len(c) == 2 and set(c) <= set(methods) | set(controls)
                                           for c in compare),
         "compare must be a list of [A, B] pairs of method or control names (A − B is reported, paired)")
    if grid_keys is not None:
        keys = grid_keys(list(methods))
        for m, axes in methods.items():
            for k in axes:
                need(k in keys and (keys[k][1] is None or m in keys[k][1]), f"{m}: {k!r} is not a key {m} reads")
    return protocol


def amendment_error(saved: dict, protocol: dict) -> str | None:
    """Why `protocol` may not take over a results directory made under `saved`, or None. The same essentials (what
    decides the runs and the selection: not the description or the compare list) may; so may an amendment that
    only adds methods or controls, since the runs already made and the settings already chosen stay valid."""
    for key in ("train_flags", "seeds", "selection"):
        if saved.get(key) != protocol.get(key):
            return f"its {key} differ"
    for key in ("methods", "controls"):
        old, new = saved.get(key) or {}, protocol.get(key) or {}
        changed = [name for name in old if old[name] != new.get(name)]
        if changed:
            return f"{key} {', '.join(changed)} changed or removed (an amendment may only add {key})"
    return None


def settings(protocol: dict, method: str) -> list[dict]:
    """Every setting of a method: the product of its axes, in the protocol's order ({key: value as a string})."""
    axes = protocol["methods"][method] or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise ForgetlabError(f"protocol: methods.{method} must be {{key: [values]}}")
    return [dict(zip(axes, (str(v) for v in combo))) for combo in itertools.product(*axes.values())] or [{}]


def label(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items()) or "preset"


# ----------------------------------------------------------------------------- per-run records

def compact(evaluation: dict) -> dict:
    """{task: [item]} keeping what the metrics read (id, split, chance, the metric fields and weights): the
    per-item scores of an evaluation without its prompts and responses."""
    out = {}
    for name, res in evaluation.items():
        if name not in TASKS or "items" not in res:
            continue
        keep = {"id", "split", "chance"} | {m.field for m in TASKS[name].metrics} | \
            {m.weight for m in TASKS[name].metrics if m.weight}
        out[name] = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in it.items() if k in keep}
                     for it in res["items"]]
    return out


def differences(a: dict, b: dict) -> tuple[int, int, float]:
    """Two compact evaluations of the same items, compared: (items compared, items whose scores differ, the
    largest absolute difference of a float score). An item in only one of them counts as differing."""
    compared = differ = 0
    largest = 0.0
    for task in set(a) | set(b):
        rows_a, rows_b = ({it["id"]: it for it in e.get(task, [])} for e in (a, b))
        for i in rows_a.keys() | rows_b.keys():
            x, y = rows_a.get(i), rows_b.get(i)
            compared += 1
            if x is None or y is None or x.keys() != y.keys():
                differ += 1
                continue
            gaps = [abs(x[k] - y[k]) for k in x if isinstance(x[k], float)]
            largest = max([largest, *gaps])
            differ += any(x[k] != y[k] for k in x)
    return compared, differ, largest


def split_metrics(items: dict, split: str) -> dict:
    """{task: {metric: value, metric_ci: ...}} of the items of one split."""
    return {task: summarize(TASKS[task], [it for it in rows if it["split"] == split])
            for task, rows in items.items() if any(it["split"] == split for it in rows)}


def quantities(run_items: dict, base_items: dict, split: str) -> dict:
    """The study's quantities of one run on one split (None where a task was not evaluated)."""
    after, before = split_metrics(run_items, split), split_metrics(base_items, split)
    out = {}
    for q, (task, metric, sign) in QUANTITIES.items():
        a, b = (after.get(task) or {}).get(metric), (before.get(task) or {}).get(metric)
        out[q] = None if a is None or b is None else sign * (a - b)
    for q, (task, metric) in LEVELS_AFTER.items():
        out[q] = (after.get(task) or {}).get(metric)
    return out


def read_results_dir(results: Path) -> tuple[dict, dict, list[dict]]:
    """(protocol, base items, run records) from a results directory, each checked enough to name what is wrong."""
    results = Path(results)
    protocol = check_protocol(read_json_object(results / "protocol.json", "study protocol"),
                              str(results / "protocol.json"))
    base = read_json_object(results / "base.json", "base-model scores")
    if not isinstance(base.get("items"), dict):
        raise ForgetlabError(f"{results / 'base.json'}: no per-item scores ('items')")
    runs = []
    for file in sorted((results / "runs").glob("*.json")):
        r = read_json_object(file, "run record")
        missing = [k for k in ("method", "params", "seed", "items") if k not in r]
        if missing:
            raise ForgetlabError(f"{file}: not a run record (missing {missing[0]!r})")
        runs.append(r)
    return protocol, base["items"], runs


# ----------------------------------------------------------------------------- the selection rule

def select(protocol: dict, dev_rows: list[dict]) -> dict:
    """The rule stated in the protocol, on the dev split of the first seed's runs. "least-forgetting-above-gain":
    among a method's settings whose gain is at least `fraction` x the best gain of any `reference` setting, the
    one with the least forgetting; a method with no such setting takes its largest gain (and is marked so).
    Ties go to the earlier setting in the protocol. Returns {method: {"params", "qualified", "reason"}}, only for
    methods whose every dev run is present."""
    rule, seed = protocol["selection"], protocol["seeds"][0]
    gain, forget = rule["gain"], rule["forgetting"]
    by_method = {}
    for m in protocol["methods"]:
        rows = []
        for params in settings(protocol, m):
            found = [r for r in dev_rows if r["method"] == m and r["params"] == params and r["seed"] == seed]
            rows.append(found[0] if found else None)
        by_method[m] = rows
    ref = by_method[rule["reference"]]
    if any(r is None for r in ref):
        return {}
    bar = rule["fraction"] * max(r[gain] for r in ref)
    chosen = {}
    for m, rows in by_method.items():
        if any(r is None for r in rows):
            continue
        ok = [r for r in rows if r[gain] >= bar]
        if ok:
            best = min(ok, key=lambda r: r[forget])  # min() keeps the first of equals
            reason = f"least {forget} ({best[forget]:+.4f}) among settings with {gain} >= {bar:.4f}"
        else:
            best = max(rows, key=lambda r: r[gain])
            reason = f"no setting reached {gain} {bar:.4f}: the largest {gain} ({best[gain]:.4f})"
        chosen[m] = dict(params=best["params"], qualified=bool(ok), reason=reason)
    return chosen


def test_groups(protocol: dict, chosen: dict) -> list[tuple[str, str, dict]]:
    """(name, method, params) of everything the test stage runs with every seed: each method at its chosen setting,
    then each control at the setting chosen for the method it is `like` (keys renamed, its params added), e.g.
    l2-init at EWC's λ, or EWC with the true Fisher."""
    groups = [(m, m, c["params"]) for m, c in chosen.items()]
    for name, c in protocol.get("controls", {}).items():
        if c["like"] in chosen:
            rename = c.get("rename", {})
            params = {rename.get(k, k): v for k, v in chosen[c["like"]]["params"].items()}
            groups.append((name, c["method"], {**params, **{k: str(v) for k, v in c.get("params", {}).items()}}))
    return groups


# ----------------------------------------------------------------------------- the report

def rows_of(protocol: dict, base: dict, runs: list[dict]) -> list[dict]:
    """One row per run and split: its identity, its quantities, and its cost."""
    rows = []
    for r in sorted(runs, key=lambda r: (list(protocol["methods"]).index(r["method"])
                                         if r["method"] in protocol["methods"] else 99, label(r["params"]), r["seed"])):
        for split in SPLITS:
            rows.append(dict(method=r["method"], params=r["params"], seed=r["seed"], split=split,
                             **quantities(r["items"], base, split), wall_s=r.get("wall_s"), cpu_s=r.get("cpu_s")))
    return rows


def record_of(runs: list[dict], row: dict) -> dict:
    return next(x for x in runs if (x["method"], x["params"], x["seed"]) == (row["method"], row["params"], row["seed"]))


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
                "general_qa": ("general_qa", "correct", False, +1)}


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
    out = ["# The study: results", "",
           f"Rebuilt by `python scripts/sweep.py --report DIR` from protocol.json, base.json and runs/*.json alone. "
           f"{len(runs)} runs; CPU time {sum(r.get('cpu_s') or 0 for r in runs) / 3600:.1f} h "
           f"(user + system seconds of the train.py processes).", "",
           f"## Dev: every setting, seed {first} (the selection rule reads this table)", "",
           "| method | setting | " + " | ".join(DEV_COLUMNS) + " | chosen |",
           "|---|---|" + "---|" * len(DEV_COLUMNS) + "---|"]
    for m in protocol["methods"]:
        for params in settings(protocol, m):
            r = next((x for x in dev if x["method"] == m and x["params"] == params and x["seed"] == first), None)
            cells = [fmt(r[c]) if r else "not run" for c in DEV_COLUMNS]
            mark = "**yes**" if m in chosen and chosen[m]["params"] == params else ""
            out.append(f"| {m} | {label(params)} | " + " | ".join(cells) + f" | {mark} |")
    out += ["", "Selection (" + protocol["selection"]["rule"] + "):", ""]
    out += [f"- {m}: {label(c['params'])}: {c['reason']}" for m, c in chosen.items()]
    missing = [m for m in protocol["methods"] if m not in chosen]
    out += [f"- {m}: not chosen yet (dev runs missing)" for m in missing]

    groups = test_groups(protocol, chosen)
    test = {name: [r for r in rows if r["split"] == "test" and r["method"] == m and r["params"] == params]
            for name, m, params in groups}
    setting = {name: params for name, _, params in groups}
    ref = protocol["selection"]["reference"]
    for title, cols in (("learning (higher = learnt more)", TEST_LEARN),
                        ("forgetting (NLL: higher = forgot more; accuracies: lower = forgot more)", TEST_FORGET)):
        out += ["", f"## Test, chosen settings: {title}", "",
                "Mean over seeds with its 95% t interval; each value is after − before on the test split.", "",
                "| method | setting | seeds | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
        for m, rs in test.items():
            cells = [over_seeds([r[c] for r in rs]) for c in cols]
            out.append(f"| {m} | {label(setting[m])} | {len(rs)} | " + " | ".join(cells) + " |")
    cols = TEST_LEARN[:2] + TEST_FORGET
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
    cols = list(ITEM_COLUMNS)
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

    out += ["", "## Verdicts on the test split", "",
            "A direction only where the interval over seeds and the per-item interval both exclude zero, on the same "
            "side; otherwise no detectable change.", ""]
    for m, rs in test.items():
        if m in per_item:
            f = {c: words([r[c] for r in rs], per_item[m][c], c in WORSE_WHEN_HIGHER) for c in TEST_FORGET}
            out.append(f"- {m}: " + "; ".join(f"{c}: {v}" for c, v in f.items()))
    return "\n".join(out) + "\n"


CSV_COLUMNS = ["method", "setting", "seed", "split", *QUANTITIES, *LEVELS_AFTER, "wall_s", "cpu_s"]


def report_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k))
                    for k in CSV_COLUMNS if k != "setting"} | {"setting": label(r["params"])})
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
    for name, m, params in groups:
        drawn.setdefault((m, label(params)), (m, params, []))[2].append(name)
    test = {" = ".join(names):
            [r for r in rows if r["split"] == "test" and r["method"] == m and r["params"] == params]
            for m, params, names in drawn.values()}
    test = {m: rs for m, rs in test.items() if rs}
    if not test:
        return []
    meta = {"Software": None}  # no version string: the same inputs give the same bytes
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    means = {}
    for i, (m, rs) in enumerate(test.items()):
        color = f"C{i}"
        xs, ys = [r["recall_gain"] for r in rs], [r["forgetting"] for r in rs]
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
    ax.set_xlabel("domain gain: recall NLL before − after (nats/token, test)")
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
