"""The records of a finished task stream (stream.py), every one rebuilt from the stages' files alone:

    config.json          the flags, the order and its tasks, the stages' step counts (written first)
    stage-<i>/eval.json  after stage i (0: the base model): per task, accuracy, Wilson interval and per-item records;
                         the general-ability level's evaluation
    stage-<i>/train.json the stage's steps, tokens, final loss and seconds, and its diagnostics (diagnostics.py:
                         the update's geometry and the KL, against the stage's start); metrics.jsonl its log
    results.json         the accuracy matrix R with its intervals, ACC / LA / BWT / FWT / forgetting with their
                         paired-bootstrap intervals (stream_metrics.py), the general ability after every stage
                         against the base model (paired by item), the stages' training, and, where the stages
                         have diagnostics, "diagnostics_by_stage": each stage's KL and geometry medians beside
                         what it did to the earlier tasks (stream_metrics.earlier_task_change)
    matrix.csv           R, one row per stage
    matrix.png           R as a heat map
    report.md            the same, readable, saying what the intervals support

`rebuild(out)` writes the last four again from the others, byte for byte (a test does).
"""
import csv
import io
import json
import sys
from pathlib import Path

import stats
from errors import ForgetlabError, read_json_object
from eval import compare_forgetting
from model.checkpoint import write_atomic_text
from diagnostics import geometry_medians
from stream_metrics import earlier_task_change, stream_metrics

METRIC_NAMES = {"acc": "average accuracy (ACC)", "learning_acc": "learning accuracy (LA)",
                "bwt": "backward transfer (BWT)", "fwt": "forward transfer (FWT)", "forgetting": "forgetting (F)"}


def correct_matrix(evaluations: list[dict], names: list[str]) -> list[list[list[bool]]]:
    """correct[i][j]: the per-item verdicts of task j after stage i; every stage must have scored the same items."""
    ids = [[it["id"] for it in evaluations[0]["tasks"][n]["items"]] for n in names]
    for i, ev in enumerate(evaluations):
        for j, n in enumerate(names):
            if [it["id"] for it in ev["tasks"][n]["items"]] != ids[j]:
                raise ForgetlabError(f"stage {i}: task {n!r} was evaluated on other items than at stage 0")
    return [[[bool(it["correct"]) for it in ev["tasks"][n]["items"]] for n in names] for ev in evaluations]


def stream_results(config: dict, evaluations: list[dict], trained: list[dict]) -> dict:
    """results.json's content (module docstring)."""
    names, joint = config["tasks"], config["stream"]["joint"]
    m = stream_metrics(correct_matrix(evaluations, names), seed=config["seed"], joint=joint)
    chance = [evaluations[0]["tasks"][n]["chance"] for n in names]
    general = []
    for i, ev in enumerate(evaluations[1:], start=1):
        if evaluations[0].get("general") and ev.get("general"):
            rows = compare_forgetting(evaluations[0]["general"], ev["general"])["metrics"]
            general.append(dict(stage=i, after=trained[i - 1]["task"], metrics=rows))
    options = {k: v for k, v in config.items() if "." in k}
    result = dict(method=config["method"], options=options, order=config["order_name"], tasks=names, joint=joint,
                  replay=config["stream"]["replay"], seed=config["seed"], scoring=config["stream"]["scoring"],
                  chance=chance, metrics=m, general=general, stages=trained,
                  seconds=dict(train=round(sum(t["seconds"] for t in trained), 1),
                               eval=round(sum(ev["tasks"][n]["seconds"] for ev in evaluations for n in names)
                                          + sum(r.get("seconds", 0) for ev in evaluations
                                                for r in (ev.get("general") or {}).values()), 1)))
    by_stage = diagnostics_by_stage(evaluations, names, trained, config["seed"], joint)
    if by_stage:
        result["diagnostics_by_stage"] = by_stage
    return result


def diagnostics_by_stage(evaluations: list[dict], names: list[str], trained: list[dict], seed: int,
                         joint: bool) -> list[dict]:
    """[{stage, task, kl, kl_ci, relative, effective_rank, overlap_ratio, earlier_change, earlier_change_ci}] for
    the stages whose train.json has diagnostics ([] when none has: streams made before they existed); the
    earlier-task change is None for the first stage and a joint run."""
    if not any("diagnostics" in t for t in trained):
        return []
    changes = {} if joint else {c["stage"]: c for c in earlier_task_change(correct_matrix(evaluations, names),
                                                                           seed=seed)}
    rows = []
    for i, t in enumerate(trained, start=1):
        d = t.get("diagnostics")
        if d is None:
            continue
        c = changes.get(i, {})
        rows.append(dict(stage=i, task=t["task"], kl=d["kl_to_base"]["kl"], kl_ci=d["kl_to_base"]["kl_ci"],
                         **geometry_medians(d["update_geometry"]), earlier_change=c.get("change"),
                         earlier_change_ci=c.get("change_ci")))
    return rows


def write_stream_results(out: Path, config: dict, evaluations: list[dict]) -> dict:
    """results.json, matrix.csv, matrix.png and report.md from the stages' records."""
    trained = [read_json_object(out / f"stage-{i}" / "train.json", "stage training record")
               for i in range(1, len(evaluations))]
    results = stream_results(config, evaluations, trained)
    write_atomic_text(out / "results.json", json.dumps(results, indent=1))
    write_atomic_text(out / "matrix.csv", matrix_csv(results))
    plot_matrix(results, out / "matrix.png")
    report = format_stream_report(results)
    write_atomic_text(out / "report.md", report)
    print(report, file=sys.stderr)
    return results


def rebuild(out) -> dict:
    """Write a finished stream's results.json, matrix.csv, matrix.png and report.md again from its config.json
    and stage records."""
    out = Path(out)
    config = read_json_object(out / "config.json", "stream config")
    n = 2 if config["stream"]["joint"] else len(config["tasks"]) + 1
    evaluations = [read_json_object(out / f"stage-{i}" / "eval.json", "stage evaluation") for i in range(n)]
    return write_stream_results(out, config, evaluations)


def stage_labels(results: dict) -> list[str]:
    if results["joint"]:
        return ["zero-shot", "after joint training"]
    return ["zero-shot"] + [f"after {t['task']}" for t in results["stages"]]


def matrix_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["stage", *results["tasks"]])
    for label, row in zip(stage_labels(results), results["metrics"]["R"], strict=True):
        w.writerow([label, *(f"{x:.4f}" for x in row)])
    return buf.getvalue()


def plot_matrix(results: dict, path: Path) -> bool:
    """R as a heat map, each cell's accuracy written in it; False (and a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so matrix.png is skipped", file=sys.stderr)
        return False
    R, tasks, labels = results["metrics"]["R"], results["tasks"], stage_labels(results)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 1.0 + 0.5 * len(R)))
    ax.imshow(R, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(R):
        for j, x in enumerate(row):
            ax.text(j, i, f"{x:.2f}", ha="center", va="center", color="white" if x < 0.6 else "black", fontsize=9)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(R)), labels)
    ax.set_title(f"{results['method']}, {results['order']}: accuracy on each task (test)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version string: same records, same bytes
    plt.close(fig)
    return True


def transfer_verdict(key: str, value, ci) -> str:
    """What a transfer metric's interval supports: BWT and FWT are differences (0 = none), F a loss."""
    if value is None or ci is None:
        return ""
    lo, hi = ci
    if key in ("bwt", "fwt"):
        return {"forgot": "negative", "improved": "positive"}.get(stats.verdict(lo, hi, True), "no detectable transfer")
    if key == "forgetting":
        return "forgetting" if lo > 0 else "no detectable forgetting"
    return ""


def format_stream_report(r: dict) -> str:
    m = r["metrics"]
    opts = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k.split(".")[0] == r["method"])
    title = f"# Task stream: {r['method']}{' (joint)' if r['joint'] else ''} on {r['order']}"
    lines = [title, "", f"Tasks in order: {', '.join(r['tasks'])}; scoring: {r['scoring']}; seed {r['seed']}"
             + (f"; replay {r['replay']} per earlier task" if r["replay"] else "")
             + (f"; {opts}" if opts else "") + ".",
             "", summary(r), "", "## Accuracy matrix (test; 95% Wilson intervals)", "",
             "| after | " + " | ".join(r["tasks"]) + " |", "|---|" + "---|" * len(r["tasks"])]
    for label, row, cis in zip(stage_labels(r), m["R"], m["R_ci"], strict=True):
        cells = []
        for x, ci, c in zip(row, cis, r["chance"], strict=True):
            cells.append(stats.format_interval(x, *ci, digits=2) + (" (at chance)" if stats.at_chance(*ci, c) else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Chance: " + ", ".join(f"{t} {c:.3f}" for t, c in zip(r["tasks"], r["chance"], strict=True)) + ".",
              "", "## Transfer (95% intervals: paired bootstrap over test items, stratified by task)", "",
              "| metric | value | reading |", "|---|---|---|"]
    for key, name in METRIC_NAMES.items():
        if m[key] is not None:
            ci = m[f"{key}_ci"]
            lines.append(f"| {name} | {stats.format_interval(m[key], *ci)} | {transfer_verdict(key, m[key], ci)} |")
    if not r["joint"] and len(r["tasks"]) > 1:
        lines += ["", "Forgetting per task (its best accuracy after training it, before the last stage, minus the "
                      "final):", "", "| task | F | reading |", "|---|---|---|"]
        for t, f, ci in zip(r["tasks"][:-1], m["forgetting_per_task"], m["forgetting_per_task_ci"]):
            lines.append(f"| {t} | {stats.format_interval(f, *ci)} | {transfer_verdict('forgetting', f, ci)} |")
    if r["general"]:
        lines += ["", "## General ability after each stage, against the base model (paired by item)", "",
                  "| after | task | metric | base | now | now − base | verdict |", "|---|---|---|---|---|---|---|"]
        for g in r["general"]:
            for row in g["metrics"]:
                d = 3 if row["p"] is not None else 4
                lines.append(f"| {g['after']} | {row['task']} | {row['metric']} | "
                             f"{stats.format_interval(row['before'], *row['before_ci'], digits=d)} | "
                             f"{stats.format_interval(row['after'], *row['after_ci'], digits=d)} | "
                             f"{stats.format_interval(row['delta'], *row['delta_ci'], digits=d)} | {row['verdict']} |")
    if r.get("diagnostics_by_stage"):
        lines += ["", "## Diagnostics per stage, against the stage's start", "",
                  "KL(π_start ‖ π) on 32 of the stage's training prompts (nats per prompt, 95% t interval; "
                  "diagnostics.kl_to_base), the medians over weight matrices of the update's relative norm, effective "
                  "rank and overlap with W's top singular directions over its chance level, and what the stage did to "
                  "the tasks trained before it (the mean change of their accuracy; 95% paired bootstrap).", "",
                  "| stage | task | KL | relative ‖ΔW‖ | effective rank | overlap / chance | earlier tasks' change |",
                  "|---:|---|---|---:|---:|---:|---|"]
        for d in r["diagnostics_by_stage"]:
            kl = stats.format_interval(d["kl"], *d["kl_ci"], digits=2) if d["kl_ci"][0] is not None else \
                f"{d['kl']:.2f}"
            change = "—" if d["earlier_change"] is None else \
                stats.format_interval(d["earlier_change"], *d["earlier_change_ci"])
            lines.append(f"| {d['stage']} | {d['task']} | {kl} | {d['relative']:.2e} | {d['effective_rank']:.1f} | "
                         f"{d['overlap_ratio']:.2f} | {change} |")
    lines += ["", "## Training", "", "| stage | task | steps | tokens | final loss | seconds |",
              "|---:|---|---:|---:|---:|---:|"]
    for i, t in enumerate(r["stages"], start=1):
        lines.append(f"| {i} | {t['task']} | {t['steps']} | {t['tokens']} | {t['final_loss']:.4f} | "
                     f"{t['seconds']:.0f} |")
    lines += ["", f"Seconds: training {r['seconds']['train']:.0f}, evaluation {r['seconds']['eval']:.0f}.", ""]
    return "\n".join(lines)


def summary(r: dict) -> str:
    """One paragraph: the final average accuracy, and what BWT and the forgetting intervals say."""
    m = r["metrics"]
    text = f"After the last stage the average accuracy is {stats.format_interval(m['acc'], *m['acc_ci'])}."
    if m["bwt"] is not None:
        reading = transfer_verdict("bwt", m["bwt"], m["bwt_ci"])
        text += (f" Backward transfer {stats.format_interval(m['bwt'], *m['bwt_ci'])}: "
                 + {"negative": "the earlier tasks lost accuracy (the interval lies below zero).",
                    "positive": "the earlier tasks gained accuracy (the interval lies above zero).",
                    "no detectable transfer": "no detectable change of the earlier tasks (the interval includes "
                                              "zero)."}[reading])
        forgot = [t for t, ci in zip(r["tasks"], m["forgetting_per_task_ci"]) if ci is not None and ci[0] > 0]
        if forgot:
            text += f" Forgetting detected on: {', '.join(forgot)}."
    return text
