"""Fine-tune a Llama on a domain dataset with a forgetting mitigation, and measure what it forgot.

    python train.py --method ewc                       # end to end, on the default model and data
    python train.py --method lora --replay-fraction 0.15
    python train.py --method ewc --ewc.lambda 2        # a method's options: --NAME.OPTION, listed by --help
    python train.py --method-file my_method.py --method l1-init
    python train.py --method lora --out runs/a --save-every 50        # killed? run it again with --resume:
    python train.py --method lora --out runs/a --save-every 50 --resume
    torchrun --nproc_per_node 8 train.py --method ewc --fsdp     # several GPUs: DDP, or FSDP2 with --fsdp

The run: evaluate general capability -> method setup (e.g. Fisher on general data) -> fine-tune on --data ->
method finish -> evaluate again -> write the forgetting report; `main` at the bottom reads as these phases. The
loop, `train`, is plain PyTorch, top to bottom: AdamW, warmup then cosine/linear/constant decay, gradient
accumulation, clipping, bf16 autocast on CUDA with float32 master weights.

Output directory (--out, default runs/<method>-<timestamp>):
    config.json     every resolved argument, the method's options under their flag names ("ewc.lambda": 0.5)
    metrics.jsonl   one line per optimizer step (loss, lr, grad norm, tokens, tokens/s)
    adapter/        the LoRA adapter in PEFT's format, when the method trained adapters, else
    model/          the fine-tuned model in Hugging Face's format
    results.json    before / after evaluation and their comparison, plus the training summary (and
                    "after_variants": a method's further models, e.g. wise-ft's α, each compared with before)
    report.md       the same, readable
    before.json     the "before" evaluation alone, with its level, split and the base weights' sha256, so that
                    --resume, or another run on the same base model (--before FILE), need not evaluate it again
    checkpoints/    with --save-every: step-<N>/ resumable training states, the last 2 (see train_state.py)

Reliability: a run killed at any point and resumed with --resume ends with the same weights, bit for bit on
CPU, as one never interrupted (the data order is a function of (seed, epoch), and the weights, optimizer, method
and RNG states are restored). A non-finite loss or gradient stops the run with the step and the cause, leaving
the last checkpoint intact (--skip-nonfinite N skips up to N such batches instead); NaN or inf weights are never
saved. Outputs are written to a temporary name and renamed, so Ctrl-C never leaves a half-written file, and a
run that stops before its first checkpoint removes its directory (run_directory).

Several processes (torchrun, see distributed.py): --batch-size is the global micro-batch, each rank trains on
its own rows of it, and the per-step losses are those of one process; rank 0 evaluates and writes every output,
config.json records world_size, backend and fsdp.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

import distributed
from data import batches_by_length, create_replay_dataset, load_dataset, tokenize_dataset
from errors import ArgumentParser, ForgetlabError, finite_float, no_space_error, read_json_object, run_cli
from eval import compare_forgetting, evaluate, format_report
from lora import find_targets, lora_state_dict, save_adapter
from methods import REGISTRY, Method, get_method_class, load_method_file, make_options, option_keys
from model import IGNORE_INDEX, load_pretrained, save_pretrained
from model.checkpoint import weights_sha256, write_atomic_text
from train_state import Progress, find_resumable, resume, save_checkpoint

REPO = Path(__file__).resolve().parent
BEFORE_JSON = "before.json"  # in --out: the "before" evaluation, read back by --resume


def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    method: str = arg("full", "mitigation to use (see methods.py); its preset overrides the defaults below "
                              "unless the flag is given")
    method_file: str | None = arg(None, "Python file that @register()s a custom method, imported before --method "
                                        "is looked up")
    model: str | None = arg(None, "HF-format Llama directory (default: SmolLM2-135M-Instruct, prepared on first use)")
    data: str = arg(str(REPO / "data" / "drug_qa.jsonl"), "domain training set (JSONL: text, prompt/completion, "
                                                          "Alpaca or chat rows)")
    general_data: str = arg(str(REPO / "data" / "general_instructions.jsonl"),
                            "general-capability data for replay and for the EWC Fisher")
    out: str | None = arg(None, "output directory (default: runs/<method>-<timestamp>); must not hold files")
    epochs: int = arg(1, "passes over the training set")
    max_steps: int = arg(0, "optimizer steps; 0 = as many as --epochs gives (set, it overrides --epochs)")
    lr: float = arg(2e-4, "peak learning rate")
    schedule: str = arg("cosine", "learning-rate decay after warmup", choices=("cosine", "linear", "constant"))
    warmup: float = arg(0.05, "fraction of the steps spent warming the lr up linearly from 0")
    weight_decay: float = arg(0.0, "AdamW weight decay (decoupled), on matrices only, never on norms or biases")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.999, "AdamW beta2")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this value; 0 = off")
    batch_size: int = arg(8, "examples per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step (effective batch = batch_size x grad_accum)")
    max_len: int = arg(256, "truncate longer examples to this many tokens (the count is reported)")
    replay_fraction: float = arg(0.0, "mix int(len(data) x this) --general-data examples into the training set "
                                      "(a loop-level setting: it composes with every method)")
    seed: int = arg(0, "seed for data order, replay sampling, adapter init and dropout")
    eval: str = arg("full", "before/after evaluation: an eval.py --level (full, quick: see eval.LEVELS) on the test "
                            "split, or none",
                    choices=("full", "quick", "study", "none"))
    eval_split: str = arg("test", "the split of every evaluation set to evaluate: dev (to choose settings on), test "
                                  "(to report), or all (both in one pass; each item records its split)",
                          choices=("dev", "test", "all"))
    before: str | None = arg(None, "reuse this before.json (another run's, on the same base model, --eval and "
                                   "--eval-split) instead of evaluating the base model again")
    eval_batch_size: int = arg(64, "prompts per generation batch and contexts per log-likelihood batch in "
                                    "evaluation (64 generates about 1.5x as fast as 16 on a 2-core CPU)")
    device: str = arg("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    compile: bool = arg(False, "torch.compile the model for training")
    grad_ckpt: bool = arg(False, "activation checkpointing: recompute each block in backward (less memory)")
    fsdp: bool = arg(False, "under torchrun: shard weights, gradients, optimizer and EWC state over the ranks with "
                            "FSDP2 (fully_shard) instead of replicating them with DDP (see distributed.py)")
    backend: str = arg("auto", "torch.distributed backend under torchrun: auto = nccl on CUDA, gloo on CPU",
                       choices=("auto", "gloo", "nccl"))
    save_every: int = arg(0, "write a resumable checkpoint to <out>/checkpoints every N optimizer steps and at the "
                             "last one (the newest 2 are kept); 0 = off")
    resume: bool = arg(False, "continue the run in --out from its newest readable checkpoint; give the run's "
                              "flags again (only --max-steps/--epochs, --eval, --save-every, --skip-nonfinite, "
                              "--device and --compile may change); method options not given (--NAME.OPTION) are "
                              "restored from its config.json")
    skip_nonfinite: int = arg(0, "skip (no update) up to N optimizer steps whose loss or gradient is NaN or inf; "
                                 "the next one stops the run")


# Flags that may differ between a run and its --resume: they change neither the data nor the math of a step.
RESUME_MAY_CHANGE = ("resume", "out", "max_steps", "epochs", "eval", "eval_split", "before", "eval_batch_size", "save_every", "skip_nonfinite",
                     "device", "compile", "backend")



def describe_methods() -> str:
    """"full; lora (lr=0.001); ..." for --help: each registered method with its preset and the option groups of
    other methods it reads."""
    def preset(cls):
        items = [f"{k}={v}" for k, v in cls.defaults.items()]
        items += [f"reads {', '.join(g + '.*' for g in cls.uses)}"] if cls.uses else []
        return f" ({', '.join(items)})" if items else ""
    return "; ".join(name + preset(cls) for name, cls in REGISTRY.items())


def summary(doc: str | None) -> str:
    """A method docstring's first sentence (up to its first ': ' or '. ', an "et al." aside), for --help."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    return re.split(r"(?<! al)\. |: ", text, maxsplit=1)[0]


def add_flag(p, flag: str, typ, choices=None, **kw):
    """One flag: a switch for a bool, else a typed value (float | None -> float)."""
    if typ is bool:
        p.add_argument(flag, action="store_true", **kw)
    else:
        p.add_argument(flag, type={int: int, float: finite_float}.get(typ, str), choices=choices, **kw)


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (--grad-accum for grad_accum), its help text and default from the field;
    then, in one group per registered method, its options as --NAME.OPTION (methods.option_keys). Option flags
    default to "not given" (argparse.SUPPRESS), so that parse_config knows which ones were typed."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        help = f.metadata["help"] + (f". Registered: {describe_methods()}" if f.name == "method" else "")
        typ = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        add_flag(p, "--" + f.name.replace("_", "-"), typ, f.metadata.get("choices"), default=f.default, help=help)
    types = {}
    for name, cls in REGISTRY.items():
        own = {k: v for k, v in option_keys(cls).items() if v[0] == name}
        if not own:
            continue
        group = p.add_argument_group(f"{name} options", summary(cls.__doc__))
        for key, (_, f, typ) in own.items():
            types[key] = (typ, f.metadata.get("choices"))
            add_flag(group, "--" + key, typ, f.metadata.get("choices"), dest=key, default=argparse.SUPPRESS,
                     **({} if f.metadata.get("choices") or typ is bool else dict(metavar=typ.__name__.upper())),
                     help=f.metadata["help"].replace("%", "%%") + f" (default: {f.default})")
    return p


def parse_config(argv=None) -> tuple[TrainConfig, object]:
    """Flags -> (TrainConfig, method with its options). Method presets replace dataclass defaults; explicit flags
    win. --method-file is imported first, so that its method's options are flags too."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --method is not short for --method-file
    pre.add_argument("--method-file", default=None)
    if (method_file := pre.parse_known_args(argv)[0].method_file):
        load_method_file(method_file)
    parser = build_parser()
    args = parser.parse_args(argv)
    method_cls = get_method_class(args.method)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(method_cls.defaults) - fields
    if unknown:
        raise ForgetlabError(f"method {args.method!r}: defaults name unknown settings {sorted(unknown)}")
    parser.set_defaults(**method_cls.defaults)
    given = vars(parser.parse_args(argv))
    cfg = TrainConfig(**{k: v for k, v in given.items() if k in fields})
    keys = option_keys(method_cls)
    values = {k: v for k, v in given.items() if k not in fields}
    checks = [(cfg.lr > 0, "--lr must be > 0"),
              (cfg.batch_size >= 1, "--batch-size must be >= 1"),
              (cfg.grad_accum >= 1, "--grad-accum must be >= 1"),
              (cfg.max_len >= 2, "--max-len must be >= 2"),
              (cfg.epochs >= 1 or cfg.max_steps > 0, "--epochs must be >= 1 (or give --max-steps)"),
              (cfg.max_steps >= 0, "--max-steps must be >= 0"),
              (0 <= cfg.warmup < 1, "--warmup must be in [0, 1)"),
              (cfg.replay_fraction >= 0, "--replay-fraction must be >= 0"),
              (cfg.grad_clip >= 0, "--grad-clip must be >= 0"),
              (0 <= cfg.beta1 < 1, "--beta1 must be in [0, 1)"),
              (not 0 <= cfg.beta1 < 1 or cfg.lr / (1 - cfg.beta1) < torch.finfo(torch.float32).max,
               f"--lr {cfg.lr}: too large for float32 (AdamW's first step size, lr / (1 - beta1), overflows)"),
              (0 <= cfg.beta2 < 1, "--beta2 must be in [0, 1)"),
              (cfg.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
              (device_name_ok(cfg.device), f"--device {cfg.device}: not a device (cpu, cuda, cuda:N or auto)"),
              (cfg.weight_decay >= 0, "--weight-decay must be >= 0"),
              (cfg.save_every >= 0, "--save-every must be >= 0"),
              (cfg.skip_nonfinite >= 0, "--skip-nonfinite must be >= 0"),
              (not cfg.resume or cfg.out, "--resume needs --out, the directory of the run to continue"),
              (not cfg.before or Path(cfg.before).is_file(), f"--before {cfg.before}: file not found"),
              (not cfg.before or cfg.eval != "none", "--before reuses a before-evaluation: give an --eval level")]
    for ok, msg in checks:
        if not ok:
            raise ForgetlabError(msg)
    if cfg.resume:
        values = check_resumable(cfg, keys, values)
    elif cfg.out and Path(cfg.out).exists() and (not Path(cfg.out).is_dir() or any(Path(cfg.out).iterdir())):
        raise ForgetlabError(f"{cfg.out}: output directory already exists and is not empty (--resume continues it)")
    return cfg, method_cls(make_options(method_cls, values))


def check_resumable(cfg: TrainConfig, keys: dict, values: dict) -> dict:
    """--resume: --out holds a run started with the same flags (but RESUME_MAY_CHANGE and the options marked
    resume_may_change). Returns the method's option values: those given, and the run's for the others."""
    config_file = Path(cfg.out) / "config.json"
    if not config_file.is_file():
        raise ForgetlabError(f"{config_file}: not found: --resume continues a run that train.py started in --out")
    saved = read_json_object(config_file, "run config")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in RESUME_MAY_CHANGE and f.name in saved and saved[f.name] != getattr(cfg, f.name):
            raise ForgetlabError(f"--resume: --{f.name.replace('_', '-')} is {getattr(cfg, f.name)!r} but the run in "
                                 f"{cfg.out} used {saved[f.name]!r}")
    for key, (_, f, _) in keys.items():
        if key in values and key in saved and values[key] != saved[key] and not f.metadata.get("resume_may_change"):
            raise ForgetlabError(f"--resume: --{key} is {values[key]!r} but the run in {cfg.out} used {saved[key]!r}")
    return {**{k: saved[k] for k in keys if k in saved}, **values}


def get_lr(it: int, lr: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning rate of optimizer step `it` (0-based): linear warmup to lr over warmup_steps, then decay to 0 at
    total_steps, cosine (Loshchilov & Hutter 2017: lr/2 (1 + cos(pi t))), linear (lr (1 - t)) or constant."""
    if it < warmup_steps:
        return lr * (it + 1) / (warmup_steps + 1)
    t = min(1.0, (it - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return lr * (1.0 - t)
    return lr


def configure_optimizers(model, weight_decay: float, lr: float, betas, device_type: str, method=None):
    """AdamW (Loshchilov & Hutter 2019), or the method's optimizer (Method.optimizer, e.g. mofo), over trainable
    parameters: matrices and embeddings (dim >= 2) decay, norms and biases (dim < 2) do not, since shrinking a
    gain or an offset toward 0 is not a useful prior."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return (method or Method()).optimizer(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def count_targets(batch) -> int:
    """Labelled positions that the loss averages over (labels[:, 0] is never a target: nothing precedes it)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def accumulate_gradients(forward, micro_batches, device, autocast) -> tuple[float, int]:
    """Backward over one optimizer step's micro-batches so the gradient equals that of one big batch: each
    micro-batch's mean loss is weighted by its share of the step's labelled tokens (a plain 1/grad_accum would
    overweight short batches). Returns (the step's mean loss, the non-pad tokens processed).

    Under torchrun the micro-batches are the global ones and each rank backpropagates its own rows
    (distributed.rank_slice), weighted so that the gradients DDP / FSDP2 average over the ranks are the
    single-process ones (distributed.loss_weight; 1 process: n / n_total); gradients are synchronized once, on
    the last micro-batch."""
    n_total = sum(count_targets(b) for b in micro_batches)  # global: every rank holds the global batches
    active = [b for b in micro_batches if count_targets(b) > 0]
    loss_sum, tokens = 0.0, 0
    for i, b in enumerate(active):
        part = distributed.rank_slice(b)
        with distributed.gradient_sync(forward, enabled=i == len(active) - 1):
            with autocast:
                loss = forward(part["input_ids"].to(device), labels=part["labels"].to(device),
                               attention_mask=part["attention_mask"].to(device))
            (loss * distributed.loss_weight(part, n_total)).backward()
        loss_sum += loss.item() * distributed.local_targets(part)
        tokens += int(b["attention_mask"].sum())
    return distributed.all_reduce_sum(loss_sum) / max(1, n_total), tokens


def micro_batch_stream(examples, cfg, pad_id, start: int = 0):
    """Endless (epoch, micro-batches of one optimizer step) groups, from optimizer step `start` on; each epoch
    reshuffles with seed + epoch, so the data order is a function of (seed, epoch) and a resumed run skips exactly
    what it trained on."""
    epoch, step = 0, 0
    while True:
        batches = batches_by_length(examples, cfg.batch_size, pad_id, seed=cfg.seed + epoch)
        for s in range(0, len(batches), cfg.grad_accum):
            if step >= start:
                yield epoch, batches[s:s + cfg.grad_accum]
            step += 1
        epoch += 1


def nonfinite_cause(loss: float, extra, grad_norm: float) -> str | None:
    """What is not finite in an optimizer step, or None: a NaN/inf loss poisons every gradient, and a finite loss
    can still overflow in backward (an inf gradient norm)."""
    if not math.isfinite(loss):
        return f"loss ({loss})"
    if extra is not None and not torch.isfinite(extra.detach()).all():
        return f"method loss ({float(extra.detach())})"
    if not math.isfinite(grad_norm):
        return f"gradient norm ({grad_norm})"
    return None


def checked_extra_loss(method, extra, step: int):
    """A method's extra_loss: None or a one-element tensor; anything else stops the run at its first step."""
    if extra is None or (torch.is_tensor(extra) and extra.numel() == 1):
        return extra
    what = f"a tensor of shape {tuple(extra.shape)}" if torch.is_tensor(extra) else f"a {type(extra).__name__}"
    raise ForgetlabError(f"step {step + 1}: method {method.name!r}: extra_loss returned {what}; it must return a "
                         f"scalar tensor or None")


def count_nonfinite(model) -> int:
    """Trainable weights that are NaN or inf, over every rank's shards (every rank must call it)."""
    bad = sum(int((~torch.isfinite(distributed.local(p))).sum()) for p in model.parameters() if p.requires_grad)
    return int(distributed.all_reduce_sum(bad))


def checkpoint_note(path) -> str:
    return f"the last checkpoint, {path}, is intact" if path else "no checkpoint was written (see --save-every)"


def skip_or_stop(step: int, cause: str, run: Progress, cfg):
    """A non-finite optimizer step: drop its batch (no update; the schedule moves on) while --skip-nonfinite
    allows, else stop the run, naming the step, the cause and the checkpoint to resume from."""
    if run.skipped >= cfg.skip_nonfinite:
        raise ForgetlabError(f"step {step + 1}: non-finite {cause}: training stopped; "
                             f"{checkpoint_note(run.checkpoint)}; lower --lr, or skip such batches with "
                             f"--skip-nonfinite N")
    run.skipped += 1
    print(f"step {step + 1}: non-finite {cause}: batch skipped ({run.skipped} of --skip-nonfinite "
          f"{cfg.skip_nonfinite})", file=sys.stderr)


def write_checkpoint(out: Path, model, optimizer, method, run: Progress, data, epoch: int, config: dict) -> Path:
    """A resumable checkpoint of the state after step run.step (see train_state.py), never of a poisoned model."""
    if count_nonfinite(model):  # every rank stops, whichever holds the bad shard
        raise ForgetlabError(f"step {run.step}: non-finite weights after the update: training stopped; "
                             f"{checkpoint_note(run.checkpoint)}; lower --lr")
    counters = dict(tokens=run.tokens, skipped=run.skipped, loss=run.loss, examples=len(data.train_set),
                    epoch=epoch, steps_per_epoch=data.steps_per_epoch)
    return save_checkpoint(out, run.step, model, optimizer, method, counters, config)


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


def run_eval(model, tok, cfg, stage: str):
    """The --eval level of eval.py (eval.LEVELS): the same tasks, items and settings as `python eval.py --level`."""
    if cfg.eval == "none":
        return None
    print(f"[{stage}] evaluating ({cfg.eval}, {cfg.eval_split} split)", file=sys.stderr)
    return evaluate(model, tok, level=cfg.eval, split=cfg.eval_split, batch_size=cfg.eval_batch_size, progress=True)


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
    return saved


def device_name_ok(name: str) -> bool:
    """`name` is a device train.py can run on: auto, cpu, cuda or cuda:N (checked before anything loads)."""
    if name in ("auto", "cpu", "cuda"):
        return True
    kind, _, index = name.partition(":")
    return kind == "cuda" and index.isdigit()


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ForgetlabError(f"--device {name}: CUDA is not available on this machine")
    return name


def training_summary_md(s: dict) -> str:
    rows = [("method", s["method"]), ("steps", s["steps"]), ("epochs", f"{s['epochs']:.2f}"),
            ("training examples", f"{s['examples']} ({s['replay_examples']} replay, {s['truncated']} truncated)"),
            ("tokens processed", s["tokens"]), ("training time", f"{s['train_seconds']:.0f} s"),
            ("tokens/s", f"{s['tokens_per_second']:.0f}"), ("final loss", f"{s['final_loss']:.4f}"),
            ("trainable parameters", f"{s['trainable_params']:,} of {s['total_params']:,}"),
            ("total time", f"{s['total_seconds']:.0f} s ("
                           + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in s["seconds"].items()) + ")")]
    return "## Training\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def output_dir(cfg, method) -> Path:
    """--out, or runs/<method>-<timestamp>. Checked now, created only after the "before" evaluation and the
    method's setup: a run that fails or is interrupted before then leaves nothing behind."""
    out = Path(cfg.out or f"runs/{method.name}-{datetime.now():%Y%m%d-%H%M%S}")
    parent = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ForgetlabError(f"{out}: cannot create the output directory ({parent} is not a writable directory)")
    return out


@dataclass
class Data:
    """The tokenized training inputs and the step counts they give."""
    train_set: list  # domain examples, with the replayed general ones mixed in (--replay-fraction)
    replayed: list  # the positions in train_set of the replayed general examples, in order
    general: list  # tokenized --general-data for the method's setup; [] when neither the method nor replay uses it
    n_domain: int
    truncated: int
    truncated_general: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def load_inputs(cfg, method, device) -> tuple:
    """(model, tokenizer, Data): every input read and checked, before anything slow happens or anything is
    written. The data files are read first, so that a bad one fails before the model is even loaded."""
    needs_general = method.needs_general_data or cfg.replay_fraction > 0
    domain_rows = load_dataset(cfg.data)
    general_rows = load_dataset(cfg.general_data) if needs_general else []
    model, tok = load_pretrained(cfg.model, dtype=torch.float32, device=device)
    domain, n_trunc = tokenize_dataset(tok, domain_rows, cfg.max_len)
    general, n_trunc_general = tokenize_dataset(tok, general_rows, cfg.max_len)
    if not domain:
        raise ForgetlabError(f"{cfg.data}: no example has an answer token left within --max-len {cfg.max_len}")
    if needs_general and not general:
        raise ForgetlabError(f"{cfg.general_data}: no example has an answer token left within --max-len {cfg.max_len}")
    train_set = domain
    if cfg.replay_fraction > 0:
        train_set = create_replay_dataset(domain, general, cfg.replay_fraction, cfg.seed)
    in_domain = {id(e) for e in domain}
    replayed = [i for i, e in enumerate(train_set) if id(e) not in in_domain]
    n_batches = math.ceil(len(train_set) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = int(math.ceil(cfg.warmup * total_steps))
    if distributed.is_main():
        print(f"{len(domain)} domain examples ({n_trunc} truncated to {cfg.max_len} tokens), "
              f"{len(train_set) - len(domain)} replay; {total_steps} steps of {cfg.batch_size}x{cfg.grad_accum}",
              file=sys.stderr)
    return model, tok, Data(train_set, replayed, general, len(domain), n_trunc, n_trunc_general, steps_per_epoch,
                            total_steps, warmup_steps)


def train(cfg, model, forward, optimizer, method, stream, data: Data, run: Progress, out: Path, config: dict):
    """The training loop: optimizer steps run.step .. data.total_steps - 1, counted in `run`, one line each in
    metrics.jsonl, a checkpoint every --save-every steps. Returns (seconds, tokens processed) of this process."""
    device = config["device"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    trainable = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure the norm, clip nothing
    t0, tokens_before = time.time(), run.tokens
    model.train()
    main_rank = distributed.is_main()  # the one that logs
    bar = tqdm(total=data.total_steps, initial=run.step, desc=f"train {method.name}", unit="step",
               disable=not main_rank)
    with open(out / "metrics.jsonl", "a") if main_rank else contextlib.nullcontext() as log, bar:
        for step in range(run.step, data.total_steps):
            lr = get_lr(step, cfg.lr, data.warmup_steps, data.total_steps, cfg.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            epoch, micro = next(stream)
            loss, tokens = accumulate_gradients(forward, micro, device, autocast)
            extra = checked_extra_loss(method, method.extra_loss(model, step), step)
            if extra is not None and extra.requires_grad:  # else the method added its gradient to .grad itself
                extra.backward()
            grad_norm = distributed.clip_grad_norm_(trainable, max_norm)  # over every rank's shards
            cause = nonfinite_cause(loss, extra, grad_norm)
            if cause is None:
                optimizer.step()
                method.after_step(model, step)
            else:
                skip_or_stop(step, cause, run, cfg)  # drops the batch, or raises past --skip-nonfinite
            optimizer.zero_grad(set_to_none=True)
            run.step, run.loss, run.tokens = step + 1, loss, run.tokens + tokens
            tok_s = (run.tokens - tokens_before) / max(time.time() - t0, 1e-9)
            record = dict(step=run.step, epoch=epoch, loss=loss, lr=lr, grad_norm=grad_norm, tokens=run.tokens,
                          tokens_per_second=tok_s, time=time.time() - t0)
            if extra is not None:
                record["extra_loss"] = float(extra.detach())
            if cause is not None:
                record["skipped"] = cause
            if main_rank:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if cfg.save_every and (run.step % cfg.save_every == 0 or run.step == data.total_steps):
                run.checkpoint = write_checkpoint(out, model, optimizer, method, run, data, epoch, config)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
    return time.time() - t0, run.tokens - tokens_before


def write_results(out: Path, method, before, after, summary: dict, variants: dict | None = None) -> dict:
    """results.json and report.md: the before/after comparison (when evaluated) and the training summary.
    variants ({label: evaluation}, Method.variants, e.g. wise-ft's alpha=0.25): each compared with "before" in
    its own report section, and kept in results.json "after_variants" as {label: {after, comparison}}."""
    results = dict(training=summary)
    report = f"# forgetlab: {method.name}\n\n"
    if before is not None:
        comparison = compare_forgetting(before, after)
        results.update(before=before, after=after, comparison=comparison)
        report += format_report(comparison) + "\n\n"
        if variants:
            results["after_variants"] = {}
            for label, evaluation in variants.items():
                c = compare_forgetting(before, evaluation)
                results["after_variants"][label] = dict(after=evaluation, comparison=c)
                report += f"## {method.name} {label}\n\n" + format_report(c) + "\n\n"
    report += training_summary_md(summary)
    write_atomic_text(out / "results.json", json.dumps(results, indent=2))
    write_atomic_text(out / "report.md", report)
    print(report)
    print(f"wrote {out}", file=sys.stderr)
    return results


@contextlib.contextmanager
def timed(seconds: dict, phase: str):
    """seconds[phase] = the wall time the with-block took."""
    t = time.time()
    yield
    seconds[phase] = time.time() - t


def start(cfg, method) -> tuple[str, str | None, Path]:
    """Join the process group under torchrun (gloo on CPU, NCCL on CUDA: this rank's GPU; alone, nothing changes),
    check what distribution asks of the flags, and fix the output directory (rank 0's timestamp, if it is one)."""
    device, backend = distributed.init(resolve_device(cfg.device), cfg.fsdp, cfg.backend)
    distributed.check_batch_size(cfg.batch_size)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return device, backend, Path(distributed.broadcast_object(str(output_dir(cfg, method))))


def evaluate_before(model, tok, cfg) -> dict | None:
    """The base model's evaluation as the record before.json holds ({eval, eval_split, weights_sha256, results}):
    read back (--before, --resume), else evaluated by rank 0 while the others wait; None with --eval none."""
    if cfg.eval == "none":
        return None
    record = dict(eval=cfg.eval, eval_split=cfg.eval_split, weights_sha256=weights_sha256(model))
    before = read_before(cfg, record)
    if before is None and distributed.is_main():
        before = dict(record, results=run_eval(model, tok, cfg, "before"))
    return distributed.broadcast_object(before)


def set_up_method(method, model, tok, cfg, data: Data):
    """The method sees the untouched model (e.g. a Fisher estimate), may rewrite the replayed examples (e.g.
    self-replay: the base model's own answers), then decides what trains. Returns (trainable, all) parameters."""
    method.setup(model, tok, cfg, data.general)
    if data.replayed:
        replay = method.replay_examples(model, tok, cfg, [data.train_set[i] for i in data.replayed])
        for i, example in zip(data.replayed, replay, strict=True):
            data.train_set[i] = example
    method.configure(model)
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def write_config(cfg, method, device: str, backend, data: Data, out: Path, before) -> dict:
    """config.json (every resolved flag and option, and how the run was made) and before.json, from rank 0."""
    config = {**dataclasses.asdict(cfg), **method.option_values(), "device": device,
              "total_steps": data.total_steps, "warmup_steps": data.warmup_steps,
              "world_size": distributed.world_size(), "backend": backend}
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_atomic_text(out / "config.json", json.dumps(config, indent=2))  # on --resume: the flags now in force
        if before is not None:
            write_atomic_text(out / BEFORE_JSON, json.dumps(before))
    distributed.barrier()  # --out exists before any rank writes a checkpoint into it
    return config


def prepare_training(cfg, model, method, device: str):
    """(forward, optimizer, twin). Several processes: DDP around the model, or FSDP2 sharding it in place; then
    the method's per-parameter state (EWC's F and θ*) is sharded like the parameters, and a meta-device twin
    will receive the gathered weights for saving and evaluating."""
    model.gradient_checkpointing = cfg.grad_ckpt
    twin = distributed.meta_twin(model) if cfg.fsdp else None
    forward = distributed.wrap(model, cfg.fsdp, device)
    if cfg.fsdp:
        distributed.shard_method_state(method, model)
    forward = torch.compile(forward) if cfg.compile else forward  # hooks keep the raw model (its parameter names)
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device.split(":")[0],
                                     method)
    return forward, optimizer, twin


def save_and_evaluate_after(model, twin, tok, cfg, method, out: Path, device: str, seconds: dict):
    """Save the model or adapter, then evaluate it and each of the method's variants (e.g. WiSE-FT's alphas).
    Several processes: rank 0 works on the whole model (FSDP2's shards gathered) while the others wait."""
    with timed(seconds, "save"):
        if (bad := count_nonfinite(model)):  # e.g. --lr so large that the last update overflowed
            raise ForgetlabError(f"{bad:,} trainable weights are NaN or inf after the last step: nothing saved; "
                                 f"lower --lr")
        final = distributed.gathered(model, twin)
        if distributed.is_main():
            final = final.to(device)
            save_outputs(final, tok, cfg, out)
        method.save(out)  # on every rank: a sharded state is gathered first (EWC writes from rank 0)
    after, variants = None, {}
    with timed(seconds, "eval_after"):
        if distributed.is_main():
            after = run_eval(final, tok, cfg, "after")
            for label, apply in method.variants(final).items():  # after the save: the saved model is the final one
                apply()
                variants[label] = run_eval(final, tok, cfg, f"after, {label}")
        distributed.barrier()
    return after, variants


def run_summary(method, counts: tuple, data: Data, run: Progress, seconds: dict, tokens_now: int,
                t_start: float) -> dict:
    return dict(method=method.name, steps=data.total_steps, epochs=data.total_steps / data.steps_per_epoch,
                examples=len(data.train_set), replay_examples=len(data.train_set) - data.n_domain,
                truncated=data.truncated, truncated_general=data.truncated_general, tokens=run.tokens,
                train_seconds=seconds["train"], tokens_per_second=tokens_now / max(seconds["train"], 1e-9),
                final_loss=run.loss, trainable_params=counts[0], total_params=counts[1], seconds=seconds,
                total_seconds=time.time() - t_start)


def main(argv=None):
    t_start = time.time()
    cfg, method = parse_config(argv)  # flags, --method-file, and --resume's run directory, all checked
    device, backend, out = start(cfg, method)

    # -- load: every input is checked here, before the first slow step (the "before" evaluation)
    model, tok, data = load_inputs(cfg, method, device)
    method.check(model, cfg)  # the method's own inputs, e.g. EWC's --fisher file against this model
    check_lora_targets(method, model)
    found = find_resumable(out, len(data.train_set), data.total_steps) if cfg.resume else None
    seconds = dict(load=time.time() - t_start)
    with run_directory(out, model, cfg):  # a run that stops before its first checkpoint leaves nothing behind

        # -- before: evaluate the base model, then let the method set itself up on it
        with timed(seconds, "eval_before"):
            before = evaluate_before(model, tok, cfg)
        with timed(seconds, "setup"):
            counts = set_up_method(method, model, tok, cfg, data)
        config = write_config(cfg, method, device, backend, data, out, before)

        # -- train (resuming: from the checkpoint found above; resume() restores its RNG states, so nothing may
        # draw after it)
        forward, optimizer, twin = prepare_training(cfg, model, method, device)
        run = Progress()
        if cfg.resume:
            run = resume(found, out, model, optimizer, method, data.total_steps, out / "metrics.jsonl")
        stream = micro_batch_stream(data.train_set, cfg, tok.pad_id, start=run.step)
        seconds["train"], tokens_now = train(cfg, model, forward, optimizer, method, stream, data, run, out, config)
        method.finish(model)
        model.eval()

        # -- save, evaluate again, report
        after, variants = save_and_evaluate_after(model, twin, tok, cfg, method, out, device, seconds)
        if not distributed.is_main():
            return None
        summary = run_summary(method, counts, data, run, seconds, tokens_now, t_start)
        before = before["results"] if before else None
        return write_results(out, method, before, after, summary, variants if before is not None else None)


def check_lora_targets(method, model):
    """--lora.targets of a method that reads the lora options, against this model's layers, before anything slow
    (the adapters are added only after the "before" evaluation and the method's setup)."""
    if "lora" in method.groups:
        find_targets(model, tuple(t.strip() for t in method.groups["lora"].targets.split(",") if t.strip()))


def bytes_to_write(model) -> tuple[int, int]:
    """(the final model or adapter, one checkpoint) in bytes, roughly: what a run writes at most at once. A
    checkpoint holds the trainable weights and AdamW's two moments."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    return (trainable if lora_state_dict(model) else every), 3 * trainable


@contextlib.contextmanager
def run_directory(out: Path, model, cfg):
    """The run's output directory for the block. If the run stops (a user error, a non-finite step, a full disk,
    Ctrl-C) before any checkpoint exists in it, a fresh run's directory is removed: nothing is left that neither
    --resume nor a new run could use, and the same --out can be given again. A run with checkpoints keeps them,
    and its config.json and metrics.jsonl, for --resume. A full disk becomes one line naming the space needed."""
    existed = out.exists()  # then empty: parse_config refuses a fresh run's --out that holds anything
    try:
        yield
    except BaseException as e:
        if not cfg.resume and distributed.is_main() and out.is_dir() and not any(out.glob("checkpoints/step-*")):
            for p in (out.iterdir() if existed else [out]):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            model_bytes, checkpoint_bytes = bytes_to_write(model)
            need = model_bytes + (checkpoint_bytes if cfg.save_every else 0)
            if (full := no_space_error(out, e, need)) is not None:
                raise full from None
        raise


if __name__ == "__main__":
    run_cli(main)
