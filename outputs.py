"""The files of a run's output directory, besides the model and the checkpoints: config.json and before.json
(written before training), results.json and report.md (after), and the rule for a run that stops early.

    config.json    every resolved flag and option, and how the run was made (device, world size)
    before.json    the base model's evaluation with its level, split and the weights' sha256 (read back by
                   --resume and by another run's --before)
    results.json   before / after evaluation and their comparison, the training summary, a method's variants
    report.md      the same, readable
"""
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import distributed
from diagnostics import geometry_figure, geometry_md, kl_md
from errors import REPO, ForgetlabError, no_space_error, read_json_object, recorded_path
from eval import compare_forgetting, format_report
from lora import lora_state_dict, save_adapter
from model import save_pretrained
from model.checkpoint import write_atomic_text
from train_config import recorded_config
from train_state import file_sha256

BEFORE_JSON = "before.json"


def write_config(cfg, method, device: str, backend, data, out: Path, before, provenance: dict) -> dict:
    """config.json (every resolved flag and option, and how the run was made) and before.json, from rank 0."""
    config = {**recorded_config(cfg), **method.option_values(), "device": device,
              "total_steps": data.total_steps, "warmup_steps": data.warmup_steps,
              "world_size": distributed.world_size(), "backend": backend, "provenance": provenance}
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_atomic_text(out / "config.json", json.dumps(config, indent=2))  # on --resume: the flags now in force
        if before is not None:
            write_atomic_text(out / BEFORE_JSON, json.dumps(before))
    distributed.barrier()  # --out exists before any rank writes a checkpoint into it
    return config


def provenance(command: list[str], files: dict, base_weights_sha256: str) -> dict:
    """What re-running a run needs beyond its flags: the command line (as given, files named as records name
    them), the commit and whether the tree had
    uncommitted changes, the Python, torch and NumPy versions, and the sha256 of the data files ({flag: path})
    and of the base weights. `train.py --config config.json` repeats the flags."""
    import platform

    import numpy
    import torch

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return dict(command=[recorded_path(a) for a in command],
                commit=git("rev-parse", "HEAD"), dirty=None if status is None else bool(status),
                python=platform.python_version(), torch=torch.__version__, numpy=numpy.__version__,
                files={k: dict(path=recorded_path(os.path.abspath(p)), sha256=file_sha256(Path(p)))
                       for k, p in files.items()},
                base_weights_sha256=base_weights_sha256)


def read_before(cfg, want: dict) -> dict | None:
    """The "before" record saved earlier, when it was made at the --eval level and split asked now on these very
    weights (`want`): --before FILE (another run's, which must match: an error otherwise), or on --resume the
    run's own before.json (evaluated again if it does not match)."""
    file = Path(cfg.before) if cfg.before else Path(cfg.out) / BEFORE_JSON
    if not (cfg.before or cfg.resume) or not file.is_file():
        return None
    saved = read_json_object(file, "saved before-evaluation")
    wrong = [k for k, v in want.items() if saved.get(k) != v]
    if wrong or not isinstance(saved.get("results"), dict):
        if cfg.before:
            what = ("its weights are not this model's" if wrong == ["weights_sha256"] else
                    "it holds no results" if not wrong else
                    f"it was made with {wrong[0]}={saved.get(wrong[0])!r}, this run asks {want[wrong[0]]!r}")
            raise ForgetlabError(f"--before {file}: {what}")
        return None
    print(f"[before] evaluation ({cfg.eval}, {cfg.eval_split} split) read back from {file}", file=sys.stderr)
    return {**saved, "read_from": str(file)}


def evaluation_cache_file(cfg, record: dict, data_files=()) -> Path | None:
    """Where the base model's evaluation `record` ({eval, eval_split, weights_sha256, ...}) is cached, or None with
    --eval-cache none. The key is everything the scores are a function of: the record (the weights, the level and
    split, a stream's tasks and scoring), the bytes of every task file the level reads and of `data_files`, the
    evaluation and model code, and the torch version and device."""
    if cfg.eval_cache == "none":
        return None
    import eval as ev
    import torch

    h = hashlib.sha256(json.dumps([record, torch.__version__, cfg.device.split(":")[0]], sort_keys=True).encode())
    sources = [REPO / "eval.py", REPO / "stats.py", *sorted((REPO / "tasks").glob("*.py")),
               *sorted((REPO / "model").glob("*.py"))]
    level = [ev.TASKS[t].data for t in ev.LEVELS.get(cfg.eval, {})]
    for f in sources + level + [Path(f) for f in data_files]:
        h.update(f.name.encode() + (f.read_bytes() if f.is_file() else b"absent"))
    root = Path(cfg.eval_cache).expanduser() if cfg.eval_cache != "auto" else default_evaluation_cache()
    return root / f"{h.hexdigest()[:32]}.json"


def default_evaluation_cache() -> Path:
    """$FORGETLAB_EVAL_CACHE, else ~/.cache/forgetlab/evaluations."""
    root = os.environ.get("FORGETLAB_EVAL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "forgetlab" / "evaluations"


def cached_evaluation(cfg, record: dict, evaluate, data_files=()) -> dict:
    """The base model's evaluation record: read back from the cache (evaluation_cache_file) and marked with
    where it came from, else `evaluate()`d and cached for the next run on these weights. A cache entry that
    cannot be read is evaluated again, and a cache that cannot be written costs the next run an evaluation,
    not this run its result: a cache is derived data. data_files: files besides the level's that the evaluation
    reads (a stream's task files)."""
    file = evaluation_cache_file(cfg, record, data_files)
    if file is not None and file.is_file():
        try:
            saved = read_json_object(file, "cached evaluation")
            if all(saved.get(k) == v for k, v in record.items()) and isinstance(saved.get("results"), dict):
                print(f"[before] evaluation ({cfg.eval}, {cfg.eval_split} split) read back from the cache {file}",
                      file=sys.stderr)
                return {**saved, "read_from": str(file)}
        except ForgetlabError as e:
            print(f"warning: ignoring the unreadable cached evaluation ({e})", file=sys.stderr)
    before = dict(record, results=evaluate())
    if file is not None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic_text(file, json.dumps(before))  # atomic: a reader sees all of it or nothing
        except OSError as e:
            print(f"warning: the evaluation was not cached in {file} ({e.strerror or e})", file=sys.stderr)
    return before


def save_outputs(model, tok, cfg, out: Path):
    """The adapter (a LoRA run) or the whole model, written under a temporary name and renamed: an interrupted
    save leaves no half-written directory."""
    name = "adapter" if lora_state_dict(model) else "model"
    final, tmp = out / name, out / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if name == "adapter":
            save_adapter(model, tmp, base_model_name_or_path=str(cfg.model or ""))
        else:
            save_pretrained(model, tmp, copy_tokenizer_from=tok.source)
        shutil.rmtree(final, ignore_errors=True)  # a resumed run that had already saved
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_results(out: Path, method, before, after, summary: dict, variants: dict | None = None,
                  base: dict | None = None, diagnostics: dict | None = None) -> dict:
    """results.json and report.md: the before/after comparison (when evaluated) and the training summary.
    variants ({label: evaluation}, Method.variants, e.g. wise-ft's alpha=0.25): each compared with "before" in
    its own report section, and kept in results.json "after_variants" as {label: {after, comparison}}. base: the
    evaluation's level, split and base weights (eval.py --compare pairs two runs only when they agree).
    diagnostics: {"update_geometry": ..., "kl_to_base": ...} (diagnostics.py): their sections and
    update_geometry.png."""
    results = dict(training=summary)
    report = f"# forgetlab: {method.name}\n\n"
    if before is not None:
        comparison = compare_forgetting(before, after)
        results.update(base=base, before=before, after=after, comparison=comparison)
        report += format_report(comparison) + "\n\n"
        if variants:
            results["after_variants"] = {}
            for label, evaluation in variants.items():
                c = compare_forgetting(before, evaluation)
                results["after_variants"][label] = dict(after=evaluation, comparison=c)
                report += f"## {method.name} {label}\n\n" + format_report(c) + "\n\n"
    if diagnostics:
        results["diagnostics"] = diagnostics
        if diagnostics.get("kl_to_base"):
            report += kl_md(diagnostics["kl_to_base"])
        if diagnostics.get("update_geometry"):
            report += geometry_md(diagnostics["update_geometry"])
            geometry_figure(diagnostics["update_geometry"], out / "update_geometry.png")
    report += training_summary_md(summary)
    write_atomic_text(out / "results.json", json.dumps(results, indent=2))
    write_atomic_text(out / "report.md", report)
    print(report)
    print(f"wrote {out}", file=sys.stderr)
    return results


def run_summary(method, counts: tuple, data, run, seconds: dict, tokens_now: int, t_start: float,
                before: dict | None) -> dict:
    """results.json's "training": what the run did and what each phase took; before_read_from names the file the
    base model's evaluation was read back from (--before, --resume, the evaluation cache), None if evaluated."""
    return dict(before_read_from=recorded_path((before or {}).get("read_from")), method=method.name, steps=data.total_steps,
                epochs=data.total_steps / data.steps_per_epoch,
                examples=len(data.train_set), replay_examples=len(data.train_set) - data.n_domain,
                truncated=data.truncated, truncated_general=data.truncated_general, tokens=run.tokens,
                train_seconds=seconds["train"], tokens_per_second=tokens_now / max(seconds["train"], 1e-9),
                final_loss=run.loss, trainable_params=counts[0], total_params=counts[1], seconds=seconds,
                total_seconds=time.time() - t_start)


def training_summary_md(s: dict) -> str:
    rows = [("method", s["method"]), ("steps", s["steps"]), ("epochs", f"{s['epochs']:.2f}"),
            ("training examples", f"{s['examples']} ({s['replay_examples']} replay, {s['truncated']} truncated)"),
            ("tokens processed", s["tokens"]), ("training time", f"{s['train_seconds']:.0f} s"),
            ("tokens/s", f"{s['tokens_per_second']:.0f}"), ("final loss", f"{s['final_loss']:.4f}"),
            ("trainable parameters", f"{s['trainable_params']:,} of {s['total_params']:,}"),
            ("total time", f"{s['total_seconds']:.0f} s ("
                           + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in s["seconds"].items()) + ")")]
    return "## Training\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


@contextlib.contextmanager
def run_directory(out: Path, model, cfg, kept=("checkpoints/step-*",)):
    """The run's output directory for the block. If the run stops (a user error, a non-finite step, a full disk,
    Ctrl-C) before any checkpoint exists in it, a fresh run's directory is removed: nothing is left that neither
    --resume nor a new run could use, and the same --out can be given again. A run with checkpoints keeps them,
    and its config.json and metrics.jsonl, for --resume. `kept`: the patterns of what --resume continues from (a
    stream's stage snapshots too). A full disk becomes one line naming the space needed."""
    existed = out.exists()  # then empty: parse_config refuses a fresh run's --out that holds anything
    try:
        yield
    except BaseException as e:
        if not cfg.resume and distributed.is_main() and out.is_dir() and not any(p for k in kept for p in out.glob(k)):
            for p in (out.iterdir() if existed else [out]):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            model_bytes, checkpoint_bytes = bytes_to_write(model)
            need = model_bytes + (checkpoint_bytes if cfg.save_every else 0)
            if (full := no_space_error(out, e, need)) is not None:
                raise full from None
        raise


def bytes_to_write(model) -> tuple[int, int]:
    """(the final model or adapter, one checkpoint) in bytes, roughly: what a run writes at most at once. A
    checkpoint holds the trainable weights and AdamW's two moments."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    return (trainable if lora_state_dict(model) else every), 3 * trainable
