"""The study: a protocol fixed in advance, run by `scripts/sweep.py --protocol`, reported from results/ alone.

    python scripts/sweep.py --protocol configs/study.json --results results/study   # run (resumes), then report
    python scripts/sweep.py --report results/study                                # rebuild tables and figures

The protocol (a JSON file, copied into the results directory as protocol.json) names:
    train_flags   the regime: train.py flags every run gets (data, epochs, the evaluation level, ...)
    description   free text (not compared when a study resumes)
    methods       {method: {grid key: [values]}}: every method gets the same number of settings
    controls      {name: {method, like, rename, params, own_runs}}: run with every seed at the setting chosen for
                  the method it is `like` (keys renamed, params added), e.g. l2-init at EWC's λ (optional). A
                  control that is a method's very setting shares that method's runs, unless "own_runs": true
                  gives it runs of its own, named after it: a setting made again in a later sitting, e.g. so that
                  it has the tasks a later evaluation level added
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
and the report (scripts/study_report.py) writes study.md (the tables), study.csv (one row per run and split)
and two figures.

Quantities (per run and split; "before" = the base model on the same items):
    recall_gain      domain_recall NLL before - after, nats/token: the trained facts, asked in new words
    heldout_gain     domain_heldout NLL before - after: a study on one's own --data (no drug sets) measures
                     what a run learnt on the held-out tenth of it (train.py); its column appears where the
                     runs have it, and `selection.gain` may name it
    unseen_gain      domain_unseen NLL before - after: drugs never trained on (what carries over)
    recall_acc, unseen_acc      strict-match accuracy after, and their gains (after - before)
    forgetting       general-text NLL (ppl) after - before, nats/token: higher = forgot more
    lambada_nll      LAMBADA target-word NLL after - before; lambada, arc_easy, general_qa: accuracy after - before
    instructions     the instruction-following pass rate after - before (the study level has it since the third
                     amendment; its column appears where the runs have it)
Over seeds: the mean and its 95% Student-t interval; against full fine-tuning: the difference at the same seed,
mean and t interval over the seeds (paired by seed).
"""
import itertools
from pathlib import Path

from errors import ForgetlabError, read_json_object
from eval import TASKS, summarize

SPLITS = ("dev", "test")
# quantity -> (task, metric, sign): sign +1 = after - before, -1 = before - after
QUANTITIES = {
    "recall_gain": ("domain_recall", "nll", -1), "unseen_gain": ("domain_unseen", "nll", -1),
    "recall_acc_gain": ("domain_recall", "accuracy", +1), "unseen_acc_gain": ("domain_unseen", "accuracy", +1),
    "forgetting": ("ppl", "nll", +1), "lambada_nll": ("lambada", "nll", +1),
    "lambada": ("lambada", "acc", +1), "arc_easy": ("arc_easy", "acc", +1), "general_qa": ("general_qa", "accuracy", +1),
    "heldout_gain": ("domain_heldout", "nll", -1), "instructions": ("instructions", "pass_rate", +1),
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
        need(isinstance(c.get("own_runs", False), bool), f"controls.{name}.own_runs must be true or false")
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


def later_base(saved: dict, evaluated: dict) -> tuple[dict, tuple[int, int, float], list[str]]:
    """A later sitting's evaluation of the base model (`evaluated`) against base.json's (`saved`), both
    {weights_sha256, eval, items}: (what base.json holds from now on, differences() on the tasks both have, the
    tasks added). The items base.json holds stay as they are, since every run so far was read against them; a task
    the later sitting's level has and base.json lacks is added (the study level gained instruction following in the
    third amendment). A ForgetlabError when the two evaluated other weights."""
    if saved.get("weights_sha256") != evaluated.get("weights_sha256"):
        raise ForgetlabError(f"the base model evaluated in this sitting has other weights "
                             f"({evaluated.get('weights_sha256')}) than base.json's ({saved.get('weights_sha256')})")
    shared = [t for t in saved["items"] if t in evaluated["items"]]
    compared = differences({t: saved["items"][t] for t in shared}, {t: evaluated["items"][t] for t in shared})
    added = [t for t in evaluated["items"] if t not in saved["items"]]
    return {**saved, "items": {**saved["items"], **{t: evaluated["items"][t] for t in added}}}, compared, added


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
            found = [r for r in dev_rows if of_group(r, m, params) and r["seed"] == seed]
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


def test_groups(protocol: dict, chosen: dict) -> list[tuple[str, str, dict, str | None]]:
    """(name, method, params, own) of everything the test stage runs with every seed: each method at its chosen
    setting, then each control at the setting chosen for the method it is `like` (keys renamed, its params added),
    e.g. l2-init at EWC's λ, or EWC with the true Fisher. `own` is the control's name when it has runs of its own
    ("own_runs"), else None: its runs are the ones of that method and setting, whoever made them."""
    groups = [(m, m, c["params"], None) for m, c in chosen.items()]
    for name, c in protocol.get("controls", {}).items():
        if c["like"] in chosen:
            rename = c.get("rename", {})
            params = {rename.get(k, k): v for k, v in chosen[c["like"]]["params"].items()}
            groups.append((name, c["method"], {**params, **{k: str(v) for k, v in c.get("params", {}).items()}},
                           name if c.get("own_runs") else None))
    return groups


def of_group(record: dict, method: str, params: dict, own: str | None = None) -> bool:
    """Whether a run record (or a report row) belongs to the group (method, params, own) of test_groups: a
    control's own runs carry its name ("control"), and only they belong to it."""
    return record["method"] == method and record["params"] == params and record.get("control") == own
