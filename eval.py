"""Measuring forgetting: general-ability benchmarks, chat QA, instruction following, general-text NLL and the
domain, before and after fine-tuning, each number with its 95% interval, and paired before/after comparisons.

    results = evaluate(model, tok)                          # the "full" level: what train.py runs before and after
    results = evaluate(model, tok, tasks=("hellaswag", "arc_easy"), limit=500, split="all")
    comparison = compare_forgetting(before, after)          # per metric: paired difference, interval, verdict
    print(format_report(comparison))

    python eval.py --model DIR [--adapter DIR] [--level full|quick] [--tasks T1,T2] [--split dev|test|all]
                   [--limit N] [--match strict|substring] --out OUT.json
    python eval.py --compare BEFORE.json AFTER.json
    python eval.py --compare runs/full/results.json runs/mine/results.json     # two runs: mine − baseline, paired

TASKS, below, is the one table of tasks: each names its data file, the fields its rows need, its scorer and
the metrics it reports. Adding a task is one entry there. The scorers and what they share (the log-likelihood
engine, answer matching, rows and splits) live in tasks/, one job a file (tasks/__init__.py says which).

  general_qa     data/general_qa.jsonl, asked as a chat turn, greedy, 24 new tokens; correct when the answer or
                 an alias matches (MATCH_RULES) in the answer span. Accuracy, and per category.
  instructions   data/instructions.jsonl: IFEval-style prompts (Zhou et al. 2023) with programmatic checks
                 (tasks/instruction_checks.py), greedy chat answers of at most 64 tokens; pass = every check passes.
  hellaswag, arc_easy, arc_challenge    multiple choice by log-likelihood, zero-shot, exactly as
                 lm-evaluation-harness builds and scores them (../shared/data/README.md). ARC-Easy and LAMBADA,
                 the default levels' benchmarks, ship with the project (data/benchmarks/); the others are read
                 from ../shared/data when asked for, and a report lists a task it could not read as "not
                 evaluated":
                     logprob(c) = Σ_j log p(c_j | context, c_<j)        (summed over the choice's tokens)
                     acc      = mean[argmax_c logprob(c) == gold]
                     acc_norm = mean[argmax_c logprob(c) / len(c) == gold]   (len in characters, no leading space)
  winogrande     partial scoring: the option fills the blank, only the text after it is scored; acc.
  lambada        greedy: correct when greedy decoding of the passage reproduces its last word's tokens exactly;
                 acc, and the word's mean NLL (perplexity = exp of it, the harness's definition).
  mmlu           ../shared/data/mmlu_val.jsonl as "Question: ...\\nAnswer:" + " choice", scored like ARC. The
                 default model is at chance on it: kept as a task, not in the default levels.
  ppl            token-weighted NLL of the general prose in data/general_text.jsonl (ppl = exp(nll)): usually
                 the first signal of forgetting to move.
  domain_recall  the trained drugs' facts asked in new words (data/domain_recall.jsonl): recall under
                 paraphrase, not generalization. Strict-match accuracy of greedy chat answers (48 tokens), and
                 the NLL of the reference answer (the training loss on these prompts).
  domain_unseen  the same on drugs never trained on, of drug classes that were (data/domain_unseen.jsonl):
                 what fine-tuning taught beyond the facts it saw.
  domain_heldout the rows of a training file that train.py keeps out of training (a tenth, by a hash of each
                 row: data.is_held_out): the token-weighted NLL of their answers. train.py measures a run on
                 your own --data with it; with --domain-eval FILE, FILE's rows replace the drug sets instead.

Splits. Every file has fixed, disjoint dev and test halves: the repository's rows carry a "split" field; the
public benchmarks are split by a hash of the item's id (sha256(id) even = dev). Choose hyper-parameters on dev,
report test. --limit N takes N items evenly spaced over the split (files are often sorted by subject).

Statistics (stats.py). Each accuracy has a Wilson interval, each NLL a bootstrap interval over items. Before vs
after pairs the same items: Newcombe's interval (and McNemar's exact p) for accuracies, a paired bootstrap for
NLLs. The verdict follows the interval of the difference ("forgot", "no detectable change", "improved"); a
metric whose intervals include chance on both sides is "at chance", never a change.

Every task keeps per-item records (prompt, response or log-probabilities, verdict), so each number in OUT.json
can be audited and paired.
"""
import math
import sys
import time
from pathlib import Path

import stats
from errors import (ArgumentParser, ForgetlabError, can_create, no_space_error, read_json_object, recorded_path,
                    run_cli)
from tasks.benchmarks import score_benchmark, score_mmlu
from tasks.common import Metric, Options, Task
from tasks.domain import held_out_rows, score_domain, score_heldout
from tasks.generation import score_general_qa, score_instructions
from tasks.instruction_checks import load_instructions
from tasks.matching import MATCH_RULES, MATCHERS
from tasks.perplexity import score_perplexity
from tasks.rows import SPLITS, load_rows, row_split

REPO = Path(__file__).resolve().parent
SHARED = REPO.parent / "shared" / "data"


# ----------------------------------------------------------------------------- the task table

ACC = Metric("acc", "correct")
ACC_NORM = Metric("acc_norm", "correct_norm")
ACCURACY = Metric("accuracy", "correct")
TOKEN_NLL = Metric("nll", "nll", higher_is_better=False, weight="tokens", binary=False)
WORD_NLL = Metric("nll", "nll", higher_is_better=False, binary=False)

BENCHMARK_FIELDS = ("id", "context", "choices", "gold", "scoring")
TASKS = {t.name: t for t in [
    Task("general_qa", REPO / "data" / "general_qa.jsonl", ("question", "answer"), score_general_qa, (ACCURACY,),
         uses_match=True),
    Task("instructions", REPO / "data" / "instructions.jsonl", ("id", "prompt", "checks"), score_instructions,
         (Metric("pass_rate", "passed"),), check_file=load_instructions),
    Task("hellaswag", SHARED / "hellaswag.jsonl", BENCHMARK_FIELDS, score_benchmark, (ACC, ACC_NORM)),
    Task("arc_easy", REPO / "data" / "benchmarks" / "arc_easy.jsonl", BENCHMARK_FIELDS, score_benchmark,
         (ACC, ACC_NORM)),
    Task("arc_challenge", SHARED / "arc_challenge.jsonl", BENCHMARK_FIELDS, score_benchmark, (ACC, ACC_NORM)),
    Task("winogrande", SHARED / "winogrande.jsonl", BENCHMARK_FIELDS + ("continuation",), score_benchmark, (ACC,)),
    Task("lambada", REPO / "data" / "benchmarks" / "lambada_openai.jsonl", BENCHMARK_FIELDS, score_benchmark,
         (ACC, WORD_NLL)),
    Task("mmlu", SHARED / "mmlu_val.jsonl", ("question", "choices", "answer"), score_mmlu, (ACC, ACC_NORM)),
    Task("ppl", REPO / "data" / "general_text.jsonl", ("text",), score_perplexity, (TOKEN_NLL,)),
    Task("domain_recall", REPO / "data" / "domain_recall.jsonl", ("prompt", "completion", "answer"), score_domain,
         (ACCURACY, TOKEN_NLL), uses_match=True),
    Task("domain_unseen", REPO / "data" / "domain_unseen.jsonl", ("prompt", "completion", "answer"), score_domain,
         (ACCURACY, TOKEN_NLL), uses_match=True),
    Task("domain_heldout", REPO / "data" / "drug_qa.jsonl", (), score_heldout, (TOKEN_NLL,), select=held_out_rows),
]}
DOMAIN_TASKS = ("domain_recall", "domain_unseen", "domain_heldout")

# The before/after evaluations of train.py (--eval) and eval.py (--level): {task: items (None = the whole test
# split)}, always on the test split. "full" keeps within the CPU time of the original five-task evaluation
# (docs/evaluation.md), so the benchmarks enter as evenly spaced subsets of the two the default model is
# clearly above chance on, ARC-Easy and LAMBADA (docs/evaluation.md gives their cost per item); HellaSwag,
# several times as costly per item and whose acc is at chance on 100 items, is left to --tasks. Whole sets:
# --split all.
LEVELS = {
    "full": {"general_qa": None, "instructions": None, "ppl": None, "domain_recall": None, "domain_unseen": None,
             "arc_easy": 200, "lambada": 200},
    "quick": {"general_qa": 64, "ppl": 32, "domain_recall": 32, "domain_unseen": 32},
    # the study (scripts/sweep.py --protocol): run with split "all", so that one evaluation gives the dev half
    # that settings are chosen on and the test half that is reported; instruction following since the study's
    # third amendment (the runs before it lack it)
    "study": {"general_qa": 200, "instructions": None, "ppl": None, "domain_recall": None, "domain_unseen": None,
              "arc_easy": 300, "lambada": 300},
    # after every stage of a task stream (stream.py): the benchmark that moved in the main job and the general
    # prose NLL, the first signal of forgetting to move, at a fraction of "full"'s cost
    "stream": {"arc_easy": 200, "ppl": None},
}


def load_task_rows(task: str, path, split: str = "all", limit: int | None = None) -> list[dict]:
    """The rows of TASKS[task] in the file `path`, checked, of `split`, `limit` of them evenly spaced
    (tasks.rows.load_rows)."""
    return load_rows(TASKS[task], path, split, limit)


# ----------------------------------------------------------------------------- running tasks

def summarize(task: Task, items: list[dict]) -> dict:
    """Each metric's value and 95% interval from the items: Wilson for a proportion, a bootstrap over items for a
    (weighted) mean; the mean chance level and whether each accuracy's interval includes it."""
    out = {}
    chances = [it["chance"] for it in items if "chance" in it]
    chance = sum(chances) / len(chances) if chances and len(chances) == len(items) else None
    for m in task.metrics:
        xs = [it[m.field] for it in items]
        if m.binary:
            k, n = sum(map(bool, xs)), len(xs)
            out[m.key], out[f"{m.key}_ci"] = (k / n if n else float("nan")), list(stats.wilson_interval(k, n))
            if chance is not None:
                out[f"{m.key}_at_chance"] = stats.at_chance(*out[f"{m.key}_ci"], chance)
        else:
            w = [it[m.weight] for it in items] if m.weight else None
            value, lo, hi = stats.paired_bootstrap([0.0] * len(xs), xs, weights=w)  # one sample: before = 0
            out[m.key], out[f"{m.key}_ci"] = value, [lo, hi]
    if chance is not None:
        out["chance"] = chance
    return out


def evaluate(model, tok, tasks=None, level: str = "full", limit: int | dict | None = None, split: str = "test",
             data_paths: dict | None = None, batch_size: int = 64, progress: bool = True, chat: bool = True,
             match: str = "strict") -> dict:
    """Run `tasks` (default: the level's tasks with its item limits) on the model as it is (a LoRA adapter
    applied to it is live in every forward pass).

    Returns {task: {metric: value, metric_ci: [lo, hi], ..., "n", "items": [...], "data", "split", "seconds"}};
    a task whose default data is absent (the benchmarks without ../shared) is {"skipped": reason}. data_paths
    overrides a task's file; limit caps the items of every task (an int) or of some ({"hellaswag": 100})."""
    if tasks is None:
        if level not in LEVELS:
            raise ForgetlabError(f"unknown evaluation level {level!r}: choose from {', '.join(LEVELS)}")
        tasks, limit = tuple(LEVELS[level]), {**LEVELS[level], **(limit if isinstance(limit, dict) else {})}
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ForgetlabError(f"unknown task {unknown[0]!r}: choose from {', '.join(TASKS)}")
    if split not in SPLITS or match not in MATCHERS:
        raise ForgetlabError(f"split must be one of {SPLITS} and match one of {tuple(MATCHERS)}")
    data_paths, opts = data_paths or {}, Options(batch_size, chat, match, progress)
    results = {}
    for name in tasks:
        task, t0 = TASKS[name], time.perf_counter()
        path = Path(data_paths.get(name) or task.data)
        if name not in data_paths and not path.is_file():
            results[name] = dict(skipped=f"{path} not found")
            print(f"eval: skipping {name}: {path} not found", file=sys.stderr)
            continue
        n_limit = limit.get(name) if isinstance(limit, dict) else limit
        rows = load_task_rows(name, path, split, n_limit)
        if not rows:  # e.g. the held-out rows of a small file, none of which fell in this split
            results[name] = dict(skipped=f"{path}: no {split} rows for {name}")
            print(f"eval: skipping {name}: {results[name]['skipped']}", file=sys.stderr)
            continue
        items, extra = task.score(model, tok, rows, opts)
        for row, item in zip(rows, items, strict=True):
            item["split"] = row_split(row)  # so that a split="all" evaluation can be summarized per split
        res = dict(**summarize(task, items), n=len(items), **extra, data=recorded_path(str(path)), split=split,
                   limit=n_limit, items=items, seconds=round(time.perf_counter() - t0, 2))
        results[name] = res
        if progress:
            print(f"eval: {name}: {summary_line(name, res)} ({res['seconds']:.1f}s)", file=sys.stderr)
    return results


def summary_line(name: str, res: dict) -> str:
    """'acc 0.412 [0.357, 0.469], acc_norm ... (n=300)'; an accuracy whose interval includes chance says so."""
    if "skipped" in res:
        return f"skipped ({res['skipped']})"
    parts = []
    for m in TASKS[name].metrics:
        digits = 3 if m.binary else 4
        text = f"{m.key} {stats.format_interval(res[m.key], *res[f'{m.key}_ci'], digits=digits)}"
        if res.get(f"{m.key}_at_chance"):
            text += f" (at chance, {res['chance']:.3f})"
        parts.append(text)
    return ", ".join(parts) + f" (n={res['n']})"


# ----------------------------------------------------------------------------- before / after

def _results(d: dict) -> dict:
    """Accept evaluate()'s dict or a whole OUT.json (which holds it under "results")."""
    return d["results"] if "results" in d else d


def compare_metric(metric: Metric, before: dict, after: dict) -> dict:
    """One metric of one task, before vs after on the same items: the paired difference after − before with its
    95% interval (Newcombe's for a proportion, with McNemar's exact p; a paired bootstrap for a mean) and the
    verdict that interval gives. Both sides at chance: "at chance", whatever the difference."""
    ib, ia = before["items"], after["items"]
    xb, xa = [it[metric.field] for it in ib], [it[metric.field] for it in ia]
    row = dict(metric=metric.key, n=len(ib), higher_is_better=metric.higher_is_better,
               before=before[metric.key], before_ci=before[f"{metric.key}_ci"],
               after=after[metric.key], after_ci=after[f"{metric.key}_ci"], p=None)
    if metric.binary:
        row["delta"], lo, hi = stats.paired_accuracy_difference(xb, xa)
        row["p"] = stats.mcnemar(xb, xa)["p"]
    else:
        w = [it[metric.weight] for it in ib] if metric.weight else None
        row["delta"], lo, hi = stats.paired_bootstrap(xb, xa, weights=w)
    row["delta_ci"] = [lo, hi]
    at_chance = before.get(f"{metric.key}_at_chance") and after.get(f"{metric.key}_at_chance")
    row["verdict"] = "at chance" if at_chance else stats.verdict(lo, hi, metric.higher_is_better)
    return row


def compare_forgetting(before: dict, after: dict) -> dict:
    """Every metric of every task evaluated on both sides, paired item by item (compare_metric), plus
    forgot / improved lists, a one-line summary, and general QA's per-category accuracies (descriptive: a dozen
    questions each, too few for a verdict). Raises ForgetlabError if the two sides scored different items."""
    b, a = _results(before), _results(after)
    rows = []
    for name, task in TASKS.items():
        rb, ra = b.get(name), a.get(name)
        if not rb or not ra or "skipped" in rb or "skipped" in ra:
            continue
        if [it["id"] for it in rb["items"]] != [it["id"] for it in ra["items"]]:
            raise ForgetlabError(f"{name}: before and after were evaluated on different items (split or limit "
                                 "differ), so they cannot be paired")
        for m in task.metrics:
            rows.append(dict(task=name, **compare_metric(m, rb, ra)))
    forgot = [f"{r['task']} {r['metric']}" for r in rows if r["verdict"] == "forgot"]
    improved = [f"{r['task']} {r['metric']}" for r in rows if r["verdict"] == "improved"]
    qa_b, qa_a = b.get("general_qa") or {}, a.get("general_qa") or {}
    cats = {c: dict(before=v, after=qa_a["category_accuracy"][c])
            for c, v in (qa_b.get("category_accuracy") or {}).items() if c in (qa_a.get("category_accuracy") or {})}
    skipped = {name: (b.get(name) or {}).get("skipped") or (a.get(name) or {}).get("skipped")
               for name in TASKS if "skipped" in (b.get(name) or {}) or "skipped" in (a.get(name) or {})}
    return dict(metrics=rows, forgot=forgot, improved=improved, summary=summary_sentence(forgot, improved, rows),
                **({"not_evaluated": skipped} if skipped else {}),
                categories=cats, split=next((r.get("split") for r in b.values() if isinstance(r, dict)
                                              and "split" in r), None),
                match=next((r["match"] for r in b.values() if isinstance(r, dict) and "match" in r), None))


def summary_sentence(forgot: list[str], improved: list[str], rows: list[dict]) -> str:
    """One line: what got worse, what got better (each judged by its paired interval), or neither."""
    if not rows:
        return "No task was evaluated on both sides: nothing to compare."
    better = f" Improved: {', '.join(improved)}." if improved else ""
    if forgot:
        return (f"Forgetting detected (the 95% interval of the paired difference excludes zero) on: "
                f"{', '.join(forgot)}.{better} Mitigations: LoRA, a lower learning rate, fewer epochs, replay of "
                "general data, EWC.")
    return f"No detectable forgetting: no metric's interval of change lies on the worse side of zero.{better}"


def format_report(comparison: dict, title: str = "Forgetting report") -> str:
    """The comparison as markdown: the summary, one row per metric with both intervals, the paired difference,
    McNemar's p for accuracies and the verdict, and the rules used."""
    c = comparison
    lines = [f"## {title}", "", c["summary"], ""]
    rules = [f"split: {c['split']}"] if c.get("split") else []
    if c.get("match"):
        rules.append(f"answer matching: {c['match']} ({MATCH_RULES[c['match']]})")
    if rules:
        lines += ["; ".join(rules) + ". Intervals are 95%; differences are paired by item (after − before).", ""]
    if c["metrics"]:
        lines += ["| task | metric | n | before | after | after − before | p | verdict |",
                  "|---|---|---:|---|---|---|---:|---|"]
        for r in c["metrics"]:
            d = 3 if r["p"] is not None else 4
            p = f"{r['p']:.3f}" if r["p"] is not None else ""
            lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | "
                         f"{stats.format_interval(r['before'], *r['before_ci'], digits=d)} | "
                         f"{stats.format_interval(r['after'], *r['after_ci'], digits=d)} | "
                         f"{stats.format_interval(r['delta'], *r['delta_ci'], digits=d)} | {p} | {r['verdict']} |")
        lines.append("")
    for name, why in (c.get("not_evaluated") or {}).items():
        lines.append(f"{name}: not evaluated: {why}")
    if c.get("not_evaluated"):
        lines.append("")
    if c.get("categories"):
        lines += ["General QA by category (descriptive only: too few questions each for a verdict):", "",
                  "| category | before | after |", "|---|---:|---:|"]
        lines += [f"| {cat} | {v['before']:.3f} | {v['after']:.3f} |" for cat, v in sorted(c["categories"].items())]
        lines.append("")
    return "\n".join(lines)


def compare_runs(baseline: dict, mine: dict, names=("baseline", "mine")) -> dict:
    """Two train.py runs on the same base model, level and split (their results.json): per metric, mine's change
    (after − before) minus the baseline's, paired by item,

        d_i = (mine_after_i − mine_before_i) − (baseline_after_i − baseline_before_i),   Δ = mean_i d_i

    (token-weighted for an NLL), with a paired bootstrap interval over the items and the verdict it gives ("mine
    better", "mine worse", "no detectable difference"). Raises ForgetlabError for runs that cannot be paired."""
    for key in ("eval", "eval_split", "weights_sha256"):
        b, m = (baseline.get("base") or {}).get(key), (mine.get("base") or {}).get(key)
        if b is not None and m is not None and b != m:
            what = "base model" if key == "weights_sha256" else "evaluation level" if key == "eval" else "split"
            raise ForgetlabError(f"the two runs' {what} differ ({names[0]}: {b}, {names[1]}: {m}): their changes "
                                 "cannot be paired")
    rows = []
    for name, task in TASKS.items():
        sides = [r.get(name) for r in (baseline["before"], baseline["after"], mine["before"], mine["after"])]
        if not all(sides) or any("skipped" in x for x in sides):
            continue
        ids = [[it["id"] for it in x["items"]] for x in sides]
        if any(i != ids[0] for i in ids):
            raise ForgetlabError(f"{name}: the two runs were evaluated on different items (level, split or data "
                                 "differ), so they cannot be paired")
        for m in task.metrics:
            bb, ba, mb, ma = ([float(it[m.field]) for it in x["items"]] for x in sides)
            w = [it[m.weight] for it in sides[0]["items"]] if m.weight else None
            base_change = [a - b for a, b in zip(ba, bb)]
            mine_change = [a - b for a, b in zip(ma, mb)]
            delta, lo, hi = stats.paired_bootstrap(base_change, mine_change, weights=w)
            v = stats.verdict(lo, hi, m.higher_is_better)
            rows.append(dict(task=name, metric=m.key, n=len(ba), higher_is_better=m.higher_is_better,
                             baseline_change=sides[1][m.key] - sides[0][m.key], mine_change=sides[3][m.key] - sides[2][m.key],
                             delta=delta, delta_ci=[lo, hi],
                             verdict={"improved": "mine better", "forgot": "mine worse"}.get(v, "no detectable difference")))
    return dict(baseline=names[0], mine=names[1], metrics=rows)


def format_run_comparison(c: dict) -> str:
    lines = [f"## {c['mine']} against {c['baseline']}", "",
             "Each run's change (after − before), and mine's minus the baseline's, paired by item; 95% paired "
             "bootstrap intervals.", "",
             "| task | metric | n | baseline change | mine change | mine − baseline | verdict |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in c["metrics"]:
        d = 3 if r["metric"] != "nll" else 4
        lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | {r['baseline_change']:+.{d}f} | "
                     f"{r['mine_change']:+.{d}f} | {stats.format_interval(r['delta'], *r['delta_ci'], digits=d)} | "
                     f"{r['verdict']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI

def read_results(path) -> dict:
    """An eval.py results file (a JSON object whose "results" maps tasks to results), checked by check_results."""
    d = read_json_object(path, "results file")
    if not isinstance(d.get("results"), dict):
        raise ForgetlabError(f"{path}: not an eval.py results file (no \"results\" object)")
    check_results(d["results"], path)
    return d


def check_results(results: dict, where) -> dict:
    """Checked enough that comparing cannot crash: each task's metrics are numbers with [lo, hi] intervals and
    its items a list of records with an id and the fields the metrics read. Problems name `where`."""
    for name, res in results.items():
        if not isinstance(res, dict):
            raise ForgetlabError(f"{where}: results.{name} is not an object")
        if name not in TASKS or "skipped" in res:
            continue
        items = res.get("items")
        if not isinstance(items, list) or not all(isinstance(it, dict) and "id" in it for it in items):
            raise ForgetlabError(f"{where}: results.{name}.items is not a list of per-item records with ids")
        if not items:
            raise ForgetlabError(f"{where}: results.{name}.items is empty: there is nothing to compare")
        for m in TASKS[name].metrics:
            ci = res.get(f"{m.key}_ci")
            if not isinstance(res.get(m.key), (int, float)) or not (
                    isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci)):
                raise ForgetlabError(f"{where}: results.{name}.{m.key} is not a number with a [lo, hi] interval")
            if not all(finite_number(it.get(m.field)) for it in items):
                raise ForgetlabError(f"{where}: results.{name}.items lack the finite number {m.field!r} "
                                     f"(item {next(it['id'] for it in items if not finite_number(it.get(m.field)))})")
            if m.weight and not all(finite_number(it.get(m.weight)) for it in items):
                raise ForgetlabError(f"{where}: results.{name}.items lack the finite weight {m.weight!r}")
    return results


def finite_number(x) -> bool:
    """A bool, an int or a finite float: a NaN per-item value would make every paired statistic NaN."""
    return isinstance(x, (bool, int)) or (isinstance(x, float) and math.isfinite(x))


def check_writable_file(path):
    """--out names a file that can be written: not a directory, inside a directory (or one that can be made).
    Checked before the evaluation, whose results would otherwise be lost at the end."""
    path = Path(path)
    if path.is_dir():
        raise ForgetlabError(f"--out {path}: is a directory; give a file name")
    ok, parent = can_create(path.parent)
    if not ok:
        raise ForgetlabError(f"--out {path}: cannot be written ({parent} is not a writable directory)")


def write_json(path, obj):
    import json

    from model.checkpoint import write_atomic_text

    path = Path(path)
    text = json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic_text(path, text)
    except OSError as e:
        raise (no_space_error(path, e, len(text.encode())) or
               ForgetlabError(f"--out {path}: cannot be written ({e.strerror or e})")) from None


def parse_tasks(spec: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
    for t in tasks:
        if t not in TASKS:
            raise ForgetlabError(f"--tasks: unknown task {t!r}: choose from {', '.join(TASKS)}")
    if not tasks:
        raise ForgetlabError("--tasks: no task given")
    return tasks


def main(argv=None):
    p = ArgumentParser(description="Evaluate general capabilities and the domain, or compare two evaluations.")
    p.add_argument("--model", help="checkpoint directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="LoRA adapter directory to apply on top of the model")
    p.add_argument("--level", default="full", choices=tuple(LEVELS),
                   help="the tasks and item counts of train.py's --eval level of the same name: "
                        + "; ".join(f"{k}: " + ", ".join(f"{t}" + (f" {n}" if n else "") for t, n in v.items())
                                    for k, v in LEVELS.items()))
    p.add_argument("--tasks", help=f"comma-separated tasks instead of the level's: {', '.join(TASKS)}")
    p.add_argument("--split", default="test", choices=SPLITS, help="evaluate the dev or test half, or all items")
    p.add_argument("--data", help="JSONL file replacing the default data of the (single) task given")
    p.add_argument("--limit", type=int, help="evaluate N items per task, evenly spaced over the split")
    p.add_argument("--match", default="strict", choices=tuple(MATCH_RULES),
                   help="answer matching for general_qa and the domain tasks: "
                        + "; ".join(f"{k}: {v}" for k, v in MATCH_RULES.items()))
    p.add_argument("--no-chat", action="store_true", help="ask general_qa as a 'Question: ... Answer:' completion")
    p.add_argument("--batch-size", type=int, default=64,
                   help="prompts per generation batch and contexts per log-likelihood batch (the results do not "
                        "depend on it)")
    p.add_argument("--out", help="write the results (with per-item records) to this JSON file")
    p.add_argument("--compare", nargs="+", metavar="FILE",
                   help="compare two results files (BEFORE AFTER); two train.py runs' results.json (BASELINE MINE): "
                        "mine's change against the baseline's, paired by item; or one train.py results.json: its "
                        "forgetting report again")
    args = p.parse_args(argv)
    if args.out:
        check_writable_file(args.out)

    if args.compare:
        if len(args.compare) > 2:
            raise ForgetlabError("--compare takes BEFORE AFTER, or one train.py results.json")
        if len(args.compare) == 1:
            run = read_json_object(args.compare[0], "train.py results file")
            if not isinstance(run.get("before"), dict) or not isinstance(run.get("after"), dict):
                raise ForgetlabError(f"{args.compare[0]}: not a train.py results.json with a before and an after "
                                     "evaluation (was the run made with --eval none?)")
            sides = [check_results(run["before"], f"{args.compare[0]}: before"),
                     check_results(run["after"], f"{args.compare[0]}: after")]
        else:
            runs = [read_json_object(f, "results file") for f in args.compare]
            if all("training" in r for r in runs):  # two train.py runs: mine's change against the baseline's
                for f, r in zip(args.compare, runs):
                    if not isinstance(r.get("before"), dict) or not isinstance(r.get("after"), dict):
                        raise ForgetlabError(f"{f}: a train.py results.json without a before and an after "
                                             "evaluation (was the run made with --eval none?)")
                    check_results(r["before"], f"{f}: before")
                    check_results(r["after"], f"{f}: after")
                comparison = compare_runs(*runs, names=tuple(args.compare))
                print(format_run_comparison(comparison))
                if args.out:
                    write_json(args.out, comparison)
                return
            sides = [read_results(f) for f in args.compare]
        comparison = compare_forgetting(*sides)
        print(format_report(comparison))
        if args.out:
            write_json(args.out, comparison)
        return

    tasks = parse_tasks(args.tasks) if args.tasks else None
    data_paths = {}
    if args.data:
        if not tasks or len(tasks) != 1:
            raise ForgetlabError("--data replaces one task's data: give exactly one task in --tasks")
        if not Path(args.data).is_file():
            raise ForgetlabError(f"{args.data}: data file not found")
        data_paths[tasks[0]] = args.data
    if args.batch_size < 1:
        raise ForgetlabError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ForgetlabError(f"--limit must be >= 1, got {args.limit}")
    if args.model is not None and not Path(args.model).is_dir():
        raise ForgetlabError(f"{args.model}: model directory not found")
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise ForgetlabError(f"{args.adapter}: adapter directory not found")

    from model import load_pretrained

    model, tok = load_pretrained(args.model)
    if args.adapter:
        from lora import load_adapter

        load_adapter(model, args.adapter)
    limit = args.limit if tasks else ({t: args.limit for t in LEVELS[args.level]} if args.limit else None)
    results = evaluate(model, tok, tasks, level=args.level, limit=limit, split=args.split, data_paths=data_paths,
                       batch_size=args.batch_size, chat=not args.no_chat, match=args.match)
    for name, res in results.items():
        print(f"{name}: {summary_line(name, res)}")
    if args.out:
        write_json(args.out, dict(model=args.model or "default (SmolLM2-135M-Instruct)", adapter=args.adapter,
                                  level=None if tasks else args.level, tasks=list(results), split=args.split,
                                  limit=args.limit, match=args.match, chat=not args.no_chat,
                                  batch_size=args.batch_size, results=results))


def cli():
    """The console script (pip install: forgetlab-eval)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
