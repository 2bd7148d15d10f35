"""Train one method on a stream of tasks, one after another, and measure how much of each task survives the rest.

    python stream.py --order 1 --method full               # O-LoRA's order 1 (dbpedia, amazon, yahoo, agnews) on cl500
    python stream.py --order 1 --method lora               # sequential LoRA: one adapter trained on task after task
    python stream.py --order 1 --method o-lora             # a new adapter per task, orthogonal to the earlier ones
    python stream.py --order 1 --method online-ewc --online-ewc.gamma 0.9
    python stream.py --order 1 --method full --replay 50   # 50 examples of each earlier task mixed into every stage
    python stream.py --order 1 --method full --joint       # all tasks at once: the multi-task reference
    python stream.py --order agnews,yahoo --method l2-init # any tasks of the benchmark, in any order
    python stream.py --order 1 --method lora --out runs/s --save-every 20     # killed? the same command + --resume

The stream: evaluate the base model on every task's test rows and the general-ability level (stage 0, cached
like train.py's "before") -> for each task in order: train on it with the method, exactly as train.py trains one
fine-tune -> evaluate every task of the stream and the general level again -> the accuracy matrix R[i][j] (after
stage i, on task j), average accuracy, backward and forward transfer and forgetting with their intervals
(stream_metrics.py) -> results.json, matrix.csv, matrix.png, report.md (stream_outputs.py). After each stage its
diagnostics (diagnostics.py; --diagnostics none skips them) are taken against the stage's start: the update's
geometry and the KL on the stage's training prompts, read in the report against what the stage did to the tasks
before it. `main` reads as these
phases; the functions follow in the order it calls them.

Each stage is one train.py fine-tune of the stage's task: the same loop (train.train), a fresh AdamW and learning-
rate schedule per stage (the papers' protocol), and the method's hooks called again with `run.stage` telling it
where it is (methods/base.py, "Task streams"): l2-init pulls toward the previous task's weights, kl toward the
previous task's model; online-ewc and o-lora carry their state from task to task. Every train.py flag applies per
stage (--lr, --epochs, --batch-size, --max-len, --save-every, ...) except those that name one fine-tune's data or
evaluation (--data, --eval, --eval-split, --before, --replay-fraction); streams run on one process.

Tasks are the classification tasks of a benchmark folder (--benchmark, default ../shared/data/cl/cl500; see
tasks/classification.py for the prompt and the scoring). The loss is on the answer only.

Reliability: a stream killed at any point and resumed with --resume continues at the stage and step it reached
and ends with the same weights and records, bit for bit on CPU: each finished stage leaves a snapshot of the
model and the method's state (state/stage-<k>/, sha256-checked, nothing pickled), each stage's randomness is a
function of (seed, stage), and within a stage train.py's checkpoints (--save-every) hold the rest.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import train
from data import load_dataset, micro_batch_stream, tokenize_dataset
from diagnostics import diagnose
from errors import REPO, ArgumentParser, ForgetlabError, check_names, recorded_path, run_cli
from eval import LEVELS, evaluate
from lora import adapter_settings, apply_lora, lora_modules, merge_lora
from methods import Method
from methods.lora import check_lora_targets
from model import load_pretrained
from model.checkpoint import read_safetensors, weights_sha256, write_atomic_text
from outputs import cached_evaluation, provenance, run_directory, save_outputs
from stats import wilson_interval
from stream_outputs import write_stream_results
from tasks.classification import SCORINGS, load_benchmark, load_rows, resolve_order, score_classification, tokenize_rows
from train_config import parse_config, recorded_config, resolve_device, run_context
from train_state import (Progress, file_record, find_resumable, fsync_dir, read_state_json, resume, verify_files,
                         write_state_json)

DEFAULT_BENCHMARK = REPO.parent / "shared" / "data" / "cl" / "cl500"
# train.py flags that name a single fine-tune's data or evaluation: a stream has its own (--order, --general-eval)
NOT_IN_A_STREAM = ("--data", "--eval", "--eval-split", "--before", "--replay-fraction", "--fsdp", "--backend",
                   "--realign-steps")


@dataclass
class StreamConfig:
    order: str  # a standard order of the benchmark (1, order1) or task names, comma-separated
    benchmark: str
    train_rows: int  # per task, the first N of its training file (0: all)
    test_rows: int  # per task, the first N of its test file (0: all)
    replay: int  # examples of each earlier task kept and mixed into every later stage
    joint: bool  # train on all tasks at once, one stage: the multi-task reference
    scoring: str
    general_eval: str  # an eval.py level evaluated after every stage, or none


def build_stream_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="stream.py", add_help=False, description=__doc__.split("\n\n")[0],
                       epilog="Every train.py flag applies per stage, except " + ", ".join(NOT_IN_A_STREAM) +
                              " (python train.py --help lists them, and the methods' options).")
    p.add_argument("--order", required=True, help="a standard task order of the benchmark's orders.json (1, 2, ... or "
                                                  "order1), or task names separated by commas")
    p.add_argument("--benchmark", default=str(DEFAULT_BENCHMARK),
                   help="benchmark folder: tasks.json, orders.json and <task>/{train,test}.jsonl")
    p.add_argument("--train-rows", type=int, default=0, help="training rows per task, the first N (0: all)")
    p.add_argument("--test-rows", type=int, default=0, help="test rows per task, the first N (0: all)")
    p.add_argument("--replay", type=int, default=0, help="replay: N training examples of each earlier task, drawn "
                                                         "with the seed, mixed into every later stage")
    p.add_argument("--joint", action="store_true", help="multi-task training on every task at once (one stage): the "
                                                        "upper reference a stream is compared with")
    p.add_argument("--scoring", default="loglik", choices=SCORINGS,
                   help="loglik: the label of highest log-likelihood; generate: exact match of greedy text")
    p.add_argument("--general-eval", default="stream", choices=(*LEVELS, "none"),
                   help="eval.py level measured after every stage (the general ability the stream may erode)")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    scfg, cfg, method = parse_stream_config(argv)
    device = resolve_device(cfg.device)
    out = Path(cfg.out or f"runs/stream-{method.name}-{time.strftime('%Y%m%d-%H%M%S')}")

    # -- load: every input is checked here, before the first slow step
    tasks, order_name, names = load_stream_tasks(scfg)
    model, tok = load_pretrained(cfg.model, dtype=torch.float32, device=device)
    stages, test_sets, general = tokenize_stream(tok, cfg, scfg, method, tasks, names)
    ctx = dataclasses.replace(run_context(cfg, tok, stages[0][1], device), stages=len(stages), task=stages[0][0])
    method.check(model, ctx)
    check_lora_targets(method, model)
    base_sha = weights_sha256(model)
    with run_directory(out, model, cfg, kept=("state/stage-*", "stage-*/checkpoints/step-*")):
        config = write_stream_config(out, argv, cfg, scfg, method, device, tasks,
                                     order_name, names, stages, base_sha)
        evaluations = [evaluate_base(model, tok, cfg, scfg, tasks, names, test_sets, base_sha, out)]
        done = restore_snapshot(out, model, method, len(stages)) if cfg.resume else 0
        for k in range(1, done + 1):
            evaluations.append(read_or_evaluate(out, k, model, tok, cfg, scfg, tasks, names, test_sets))
        for k in range(done + 1, len(stages) + 1):
            train_stage(k, *stages[k - 1], model, method, tok, cfg, general, device, out, config)
            write_snapshot(out, k, model, method)
            evaluations.append(read_or_evaluate(out, k, model, tok, cfg, scfg, tasks, names, test_sets))
        save_final_model(model, tok, cfg, out)
        method.save(out)  # the method's own files (o-lora: every earlier adapter; online-ewc: its Fisher)
        results = write_stream_results(out, config, evaluations)
        shutil.rmtree(out / "state", ignore_errors=True)  # model/ and the records are the finished stream
        return results


def parse_stream_config(argv) -> tuple[StreamConfig, object, Method]:
    """(stream settings, train.py's TrainConfig, the method): the stream's own flags first, the rest as train.py
    reads them (parse_config: every value checked, presets applied, --resume against config.json)."""
    if "-h" in argv or "--help" in argv:
        build_stream_parser().print_help()
        raise SystemExit(0)
    for flag in NOT_IN_A_STREAM:
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise ForgetlabError(f"{flag}: not a stream flag (a stream's tasks come from --order, its general "
                                 f"evaluation from --general-eval)")
    known, rest = build_stream_parser().parse_known_args(argv)
    scfg = StreamConfig(**vars(known))
    checks = [(scfg.train_rows >= 0, "--train-rows must be >= 0"), (scfg.test_rows >= 0, "--test-rows must be >= 0"),
              (scfg.replay >= 0, "--replay must be >= 0"),
              (not (scfg.joint and scfg.replay), "--replay with --joint: joint training sees every task already")]
    for ok, msg in checks:
        if not ok:
            raise ForgetlabError(msg)
    cfg, method = parse_config(rest + ["--eval", "none"])
    if cfg.resume:
        check_stream_resumable(Path(cfg.out), scfg)
        if (Path(cfg.out) / "results.json").is_file():
            raise ForgetlabError(f"--resume: the stream in {cfg.out} is finished (results.json); nothing to resume")
    if type(method).replay_examples is not Method.replay_examples:
        raise ForgetlabError(f"--method {method.name}: it rewrites --replay-fraction's general examples, which a "
                             f"stream does not mix in (use --replay for earlier tasks)")
    return scfg, cfg, method


def check_stream_resumable(out: Path, scfg: StreamConfig):
    """--resume: the stream in --out was started with the same stream flags (train.py's are checked by
    parse_config)."""
    saved = json.loads((out / "config.json").read_text()).get("stream", {})
    for key, now in recorded_stream(scfg).items():
        value = getattr(scfg, key)
        if key in saved and saved[key] != now:
            raise ForgetlabError(f"--resume: --{key.replace('_', '-')} is {value!r} but the stream in {out} used "
                                 f"{saved[key]!r}")


def recorded_stream(scfg: StreamConfig) -> dict:
    """The stream's flags as config.json records them (the benchmark folder from the repository when beside it)."""
    return {k: recorded_path(os.path.abspath(v)) if k == "benchmark" else v
            for k, v in dataclasses.asdict(scfg).items()}


def load_stream_tasks(scfg: StreamConfig) -> tuple[dict, str, list[str]]:
    """The benchmark's tasks, the order's name and its task names, every task's files checked to exist."""
    tasks = load_benchmark(scfg.benchmark)
    order_name, names = resolve_order(scfg.order, scfg.benchmark, tasks)
    for name in names:
        for split in ("train", "test"):
            if not tasks[name].file(split).is_file():
                raise ForgetlabError(f"{tasks[name].file(split)}: not found (task {name!r} of --order {scfg.order})")
    return tasks, order_name, names


def tokenize_stream(tok, cfg, scfg: StreamConfig, method, tasks: dict, names: list[str]):
    """(one train.Data per stage, {task: test rows}, tokenized --general-data): every row read and checked (a label
    outside the task's label set is an error naming file and line), before anything slow. With --replay each
    stage after the first trains on its task plus the replay buffer of every earlier one (`replay_buffer`);
    --joint makes one stage of all tasks."""
    examples, test_sets = {}, {}
    for name in names:
        rows = load_rows(tasks[name], "train", scfg.train_rows or None)
        examples[name], _ = tokenize_rows(tok, tasks[name], rows, cfg.max_len)
        test_sets[name] = load_rows(tasks[name], "test", scfg.test_rows or None)
    general = []
    if method.needs_general_data:
        general, _ = tokenize_dataset(tok, load_dataset(cfg.general_data), cfg.max_len)
    if scfg.joint:
        plan = [("joint", [e for n in names for e in examples[n]], [])]
    else:
        plan = [(name, examples[name], [e for j in range(k) for e in replay_buffer(examples[names[j]], scfg.replay,
                                                                                     cfg.seed + j)])
                for k, name in enumerate(names)]
    stages = []
    for task, own, replayed in plan:  # (task, train.Data): the stage's examples and its step counts
        train_set = own + replayed
        n_batches = math.ceil(len(train_set) / cfg.batch_size)
        steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
        total = cfg.max_steps or cfg.epochs * steps_per_epoch
        data = train.Data(own, train_set, list(range(len(own), len(train_set))), general, len(own),
                          sum(e["truncated"] for e in own), 0, steps_per_epoch, total,
                          int(math.ceil(cfg.warmup * total)))
        stages.append((task, data))
    print(f"stream of {len(stages)} stage(s): " + ", ".join(f"{t} ({len(d.train_set)} examples, {d.total_steps} "
                                                            f"steps)" for t, d in stages), file=sys.stderr)
    return stages, test_sets, general


def replay_buffer(examples: list, n: int, seed: int) -> list:
    """Experience replay's memory of one task (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual
    Learning"): n of its training examples drawn without replacement with `seed`, kept for every later stage."""
    return random.Random(seed).sample(examples, min(n, len(examples))) if n else []


def write_stream_config(out: Path, argv: list, cfg, scfg: StreamConfig, method, device: str, tasks: dict,
                        order_name: str, names: list, stages: list, base_sha: str) -> dict:
    """config.json: train.py's flags and the method's options (so parse_config's --resume check reads it), the
    stream's own under "stream", and what the run is made of."""
    files = {f"{n}.{split}": tasks[n].file(split) for n in names for split in ("train", "test")}
    config = {**recorded_config(cfg), **method.option_values(), "device": device,
              "provenance": provenance(["python", "stream.py", *argv], files, base_sha),
              "stream": recorded_stream(scfg),
              "order_name": order_name, "tasks": names,
              "stages": [dict(task=t, examples=len(d.train_set), replayed=len(d.replayed), truncated=d.truncated,
                              total_steps=d.total_steps, warmup_steps=d.warmup_steps) for t, d in stages]}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic_text(out / "config.json", json.dumps(config, indent=2))
    return config


def evaluate_base(model, tok, cfg, scfg, tasks, names, test_sets, base_sha: str, out: Path) -> dict:
    """Stage 0: the base model on every task and the general level, read back from the evaluation cache when a
    stream on these weights, tasks and settings has evaluated it before (outputs.cached_evaluation)."""
    file = out / "stage-0" / "eval.json"
    if file.is_file():
        return json.loads(file.read_text())
    record = dict(eval=f"stream:{scfg.general_eval}", eval_split="test", weights_sha256=base_sha, tasks=names,
                  scoring=scfg.scoring, max_len=cfg.max_len, test_rows=scfg.test_rows)
    data_files = [tasks[n].file("test") for n in names]
    cache_cfg = dataclasses.replace(cfg, eval=scfg.general_eval)
    before = cached_evaluation(cache_cfg, record,
                               lambda: evaluate_stage(model, tok, cfg, scfg, tasks, names, test_sets),
                               data_files=data_files)
    result = dict(before["results"], stage=0, cached="read_from" in before)
    write_stage_eval(out, 0, result)
    return result


def evaluate_stage(model, tok, cfg, scfg, tasks, names, test_sets) -> dict:
    """Every task of the stream on its test rows (per-item records, accuracy with its Wilson interval), and the
    --general-eval level."""
    model.eval()
    results = {"tasks": {}, "general": None}
    for name in names:
        t0 = time.perf_counter()
        items = score_classification(model, tok, tasks[name], test_sets[name], cfg.max_len, scfg.scoring,
                                     cfg.eval_batch_size)
        k = sum(i["correct"] for i in items)
        lo, hi = wilson_interval(k, len(items))
        results["tasks"][name] = dict(accuracy=k / len(items), accuracy_ci=[lo, hi], n=len(items),
                                      chance=1 / len(tasks[name].label_set), items=items,
                                      seconds=round(time.perf_counter() - t0, 2))
        print(f"eval: {name}: accuracy {k / len(items):.3f} [{lo:.3f}, {hi:.3f}] "
              f"({results['tasks'][name]['seconds']:.1f}s)", file=sys.stderr)
    if scfg.general_eval != "none":
        results["general"] = evaluate(model, tok, level=scfg.general_eval, split="test",
                                      batch_size=cfg.eval_batch_size, progress=True)
    return results


def write_stage_eval(out: Path, k: int, result: dict):
    (out / f"stage-{k}").mkdir(parents=True, exist_ok=True)
    write_atomic_text(out / f"stage-{k}" / "eval.json", json.dumps(result))


# ----------------------------------------------------------------------------- the stage snapshots

def snapshot_dir(out: Path, k: int) -> Path:
    return out / "state" / f"stage-{k}"


def restore_snapshot(out: Path, model, method, n_stages: int) -> int:
    """--resume: load the newest finished stage's snapshot (model, adapters and method state) into the fresh model
    and method; returns its stage, 0 when none is readable (the stream starts over from the base model)."""
    found = sorted((int(p.name.removeprefix("stage-")), p) for p in (out / "state").glob("stage-*")
                   if p.name.removeprefix("stage-").isdigit()) if (out / "state").is_dir() else []
    for k, path in reversed(found):
        try:
            meta = read_state_json(path, ("stage", "files", "lora"))
            verify_files(path, meta["files"], ["model.safetensors", "method.safetensors"])
        except ForgetlabError as e:
            print(f"warning: skipping the snapshot {path}: {e}", file=sys.stderr)
            continue
        if meta["lora"]:
            s = meta["lora"]
            apply_lora(model, r=s["r"], alpha=s["alpha"], dropout=s["dropout"], targets=s["targets"],
                       rslora=s["rslora"])
        weights, _ = read_safetensors(path / "model.safetensors")
        params = dict(model.named_parameters())
        check_names(params, weights, f"{path / 'model.safetensors'}: does not fit this model", "weight")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
        method_state, _ = read_safetensors(path / "method.safetensors")
        method.load_state_dict(method_state)
        print(f"resuming the stream after stage {k} of {n_stages} ({path})", file=sys.stderr)
        return k
    return 0


def train_stage(k: int, task: str, data, model, method, tok, cfg, general, device: str, out: Path, config: dict):
    """Stage k (1-based): the method's per-run hooks again (methods/base.py, "Task streams") and train.py's loop on
    the stage's examples, its checkpoints and metrics.jsonl in stage-<k>/. The stage's randomness (data order,
    adapter initialization, dropout) is seeded with seed + k - 1, so stage 1 is train.py's run with --seed."""
    stage_dir = out / f"stage-{k}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed + k - 1
    random.seed(seed)
    torch.manual_seed(seed)
    stage_cfg = dataclasses.replace(cfg, seed=seed)
    run_ctx = dataclasses.replace(run_context(stage_cfg, tok, data, device), stage=k - 1, stages=len(config["stages"]),
                                  task=task, general=general)
    # the stage's start, for its diagnostics: a resumed stage starts from the previous stage's snapshot again
    start = copy.deepcopy(model).eval().requires_grad_(False) if cfg.diagnostics == "all" else None
    model.requires_grad_(True)
    found = find_resumable(stage_dir, len(data.train_set), data.total_steps) if cfg.resume else None
    print(f"[stage {k}/{len(config['stages'])}] {task}: {len(data.train_set)} examples, {data.total_steps} steps",
          file=sys.stderr)
    method.setup(model, run_ctx)
    train.use_train_examples(method, model, run_ctx, data)
    method.configure(model)
    forward, optimizer, _ = train.prepare_training(stage_cfg, model, method, device)
    run = Progress()
    if found is not None:
        run = resume(found, stage_dir, model, optimizer, method, data.total_steps, stage_dir / "metrics.jsonl")
    elif (stage_dir / "metrics.jsonl").exists():
        (stage_dir / "metrics.jsonl").unlink()  # a stage begun again from its start logs from step 1
    batches = micro_batch_stream(data.train_set, stage_cfg, tok.pad_id, start=run.step)
    seconds, tokens = train.train(stage_cfg, model, forward, optimizer, method, batches, data, run, stage_dir, config)
    method.finish(model)
    model.eval()
    record = dict(task=task, steps=run.step, tokens=run.tokens, final_loss=run.loss, seconds=round(seconds, 1))
    if start is not None:  # the stage's update against its start (diagnostics.py), the KL on the stage's prompts
        t0 = time.time()
        record["diagnostics"] = diagnose(model, start, data.domain, tok, seed)
        record["diagnostics"]["seconds"] = round(time.time() - t0, 1)
    write_atomic_text(stage_dir / "train.json", json.dumps(record))


def write_snapshot(out: Path, k: int, model, method):
    """state/stage-<k>/: every weight of the model (adapters included), the method's state, and state.json with
    the adapters' settings and each file's sha256; written under a temporary name and renamed. Then the previous
    snapshot and the stage's own checkpoints go: the new snapshot is all a resume needs."""
    final = snapshot_dir(out, k)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # named_parameters: a tied lm_head is the embedding, saved once
        save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}, tmp / "model.safetensors")
        save_file({n: t.detach().cpu().contiguous() for n, t in method.state_dict().items()},
                  tmp / "method.safetensors")
        lora = adapter_settings(model) if lora_modules(model) else None
        write_state_json(tmp, dict(stage=k, lora=lora, files={f: file_record(tmp / f) for f in
                                                              ("model.safetensors", "method.safetensors")}))
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in (out / "state").glob("stage-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(out / f"stage-{k}" / "checkpoints", ignore_errors=True)


def read_or_evaluate(out: Path, k: int, model, tok, cfg, scfg, tasks, names, test_sets) -> dict:
    """Stage k's evaluation: stage-<k>/eval.json when a resumed stream has it, else evaluated now and written."""
    file = out / f"stage-{k}" / "eval.json"
    if file.is_file():
        return json.loads(file.read_text())
    result = dict(evaluate_stage(model, tok, cfg, scfg, tasks, names, test_sets), stage=k)
    write_stage_eval(out, k, result)
    return result


def save_final_model(model, tok, cfg, out: Path):
    """model/: the final weights as an HF Llama directory (adapters folded in: an O-LoRA stream's earlier adapters
    live in its base weights already), loadable by train.py --model and eval.py --model."""
    save_outputs(merge_lora(model) if lora_modules(model) else model, tok, cfg, out)


def cli():
    """The console script (pip install: forgetlab-stream)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
