"""train.py's command line: one flag per TrainConfig field, and one per option of every registered method.

    cfg, method = parse_config(argv)      # flags (and --method-file, --resume's run) -> TrainConfig, Method

Every value is checked here, before anything is loaded: a mistake costs a second, not an evaluation.
"""
import argparse
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from errors import (ArgumentParser, ForgetlabError, can_create, finite_float, read_json_object,
                    recorded_path)
import distributed
import loggers
from methods import REGISTRY, RunContext, get_method_class, load_method_file, make_options, option_keys

REPO = Path(__file__).resolve().parent


def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    method: str = arg("full", "mitigation to use (see methods/); its preset overrides the defaults below "
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
    realign_steps: int = arg(0, "spurious or real forgetting (Zheng et al. 2025): after the final evaluation, "
                                "fine-tune a copy of the model this many steps on --general-data and evaluate "
                                "it again, its own report section; 0 = off")
    diagnostics: str = arg("all", "after training: the update's geometry and the KL to the base model on training "
                                  "prompts (diagnostics.py), in results.json and the report; none = skip them",
                           choices=("all", "none"))
    domain_eval: str | None = arg(None, "JSONL rows like data/domain_recall.jsonl (prompt, completion, answer) that "
                                        "measure the domain in place of the drug sets; without it, a run on your "
                                        "own --data is measured on the tenth of it kept out of training")
    eval_split: str = arg("test", "the split of every evaluation set to evaluate: dev (to choose settings on), test "
                                  "(to report), or all (both in one pass; each item records its split)",
                          choices=("dev", "test", "all"))
    before: str | None = arg(None, "reuse this before.json (another run's, on the same base model, --eval and "
                                   "--eval-split) instead of evaluating the base model again")
    eval_cache: str = arg("auto", "directory of cached base-model evaluations, keyed by the weights, level, split, "
                                  "task data and code, so that a second run on the same base model skips its "
                                  "\"before\" evaluation: auto = $FORGETLAB_EVAL_CACHE or ~/.cache/forgetlab/"
                                  "evaluations; none = always evaluate")
    eval_batch_size: int = arg(64, "prompts per generation batch and contexts per log-likelihood batch in "
                                    "evaluation (the results do not depend on it)")
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
    log: str = arg("", "metric loggers besides metrics.jsonl, comma-separated: tensorboard, wandb (offline unless "
                       "WANDB_MODE says otherwise; see loggers.py)")
    skip_nonfinite: int = arg(0, "skip (no update) up to N optimizer steps whose loss or gradient is NaN or inf; "
                                 "the next one stops the run")


# The fields that name files or directories: recorded from their absolute path (errors.recorded_path: relative to
# the repository when inside it), so that a record means the same file whatever directory the run was started in.
PATH_FIELDS = ("method_file", "model", "data", "general_data", "out", "before", "domain_eval")


def recorded_config(cfg) -> dict:
    """The TrainConfig as config.json records it (PATH_FIELDS by their path from the repository when inside it)."""
    return {k: recorded_path(os.path.abspath(v) if k in PATH_FIELDS and isinstance(v, str) else v)
            for k, v in dataclasses.asdict(cfg).items()}


# Flags that may differ between a run and its --resume: they change neither the data nor the math of a step.
RESUME_MAY_CHANGE = ("resume", "out", "max_steps", "epochs", "eval", "eval_split", "before", "eval_cache",
                     "eval_batch_size", "save_every", "skip_nonfinite", "device", "compile", "backend", "log",
                     "realign_steps", "diagnostics")


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
    p.add_argument("--config", default=None, help="re-run the run a config.json records: its flags and method "
                                                  "options, those given here winning (give a new --out)")
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
    pre.add_argument("--config", default=None)
    known = pre.parse_known_args(argv)[0]
    recorded = read_recorded_flags(known.config) if known.config else {}
    if (method_file := known.method_file or recorded.get("method_file")):
        load_method_file(method_file)
    parser = build_parser()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    parser.set_defaults(**{k: v for k, v in recorded.items() if k in fields})  # a recorded run's; typed flags win
    args = parser.parse_args(argv)
    method_cls = get_method_class(args.method)
    unknown = set(method_cls.defaults) - fields
    if unknown:
        raise ForgetlabError(f"method {args.method!r}: defaults name unknown settings {sorted(unknown)}")
    reads = option_keys(method_cls)  # the recorded options this method reads (--config with another --method)
    parser.set_defaults(**{**method_cls.defaults, **{k: v for k, v in recorded.items() if k in fields or k in reads}})
    given = vars(parser.parse_args(argv))
    given.pop("config", None)
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
              (cfg.realign_steps >= 0, "--realign-steps must be >= 0"),
              (cfg.realign_steps == 0 or cfg.eval != "none", "--realign-steps needs an evaluation (--eval)"),
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
              (not cfg.before or cfg.eval != "none", "--before reuses a before-evaluation: give an --eval level"),
              (not cfg.domain_eval or Path(cfg.domain_eval).is_file(),
               f"--domain-eval {cfg.domain_eval}: file not found")]
    for ok, msg in checks:
        if not ok:
            raise ForgetlabError(msg)
    loggers.check_available(cfg.log)
    if cfg.resume:
        values = check_resumable(cfg, keys, values)
    elif cfg.out and Path(cfg.out).exists() and (not Path(cfg.out).is_dir() or any(Path(cfg.out).iterdir())):
        raise ForgetlabError(f"{cfg.out}: output directory already exists and is not empty (--resume continues it)")
    return cfg, method_cls(make_options(method_cls, values))


# What --config does not take from a recorded run: where it went, whether it resumed, and this machine's settings.
NOT_REPEATED = ("out", "resume", "before", "device", "backend", "eval_cache")


def read_recorded_flags(path) -> dict:
    """train.py --config FILE: the flags and method options of the run a config.json records, as parser defaults
    (the flags given with --config win). Files the record names relative to the repository are found from any
    directory."""
    saved = read_json_object(path, "run config")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if "method" not in saved or not fields & set(saved):
        raise ForgetlabError(f"{path}: not a train.py config.json (no method and flags)")
    flags = {}
    for k, v in saved.items():
        if k in fields and k not in NOT_REPEATED:
            if k in PATH_FIELDS and isinstance(v, str) and not os.path.isabs(v):
                v = str((REPO / v).resolve()) if (REPO / v).exists() else v
            flags[k] = v
        elif "." in k and not k.startswith("_"):  # a method option, "ewc.lambda"
            flags[k] = v
    return flags


def check_resumable(cfg: TrainConfig, keys: dict, values: dict) -> dict:
    """--resume: --out holds a run started with the same flags (but RESUME_MAY_CHANGE and the options marked
    resume_may_change). Returns the method's option values: those given, and the run's for the others."""
    config_file = Path(cfg.out) / "config.json"
    if not config_file.is_file():
        raise ForgetlabError(f"{config_file}: not found: --resume continues a run that train.py started in --out")
    saved = read_json_object(config_file, "run config")
    now_config = recorded_config(cfg)  # config.json names files inside the repository relative to it
    for f in dataclasses.fields(TrainConfig):
        now = now_config[f.name]
        if f.name not in RESUME_MAY_CHANGE and f.name in saved and saved[f.name] != now:
            raise ForgetlabError(f"--resume: --{f.name.replace('_', '-')} is {getattr(cfg, f.name)!r} but the run in "
                                 f"{cfg.out} used {saved[f.name]!r}")
    for key, (_, f, _) in keys.items():
        if key in values and key in saved and values[key] != saved[key] and not f.metadata.get("resume_may_change"):
            raise ForgetlabError(f"--resume: --{key} is {values[key]!r} but the run in {cfg.out} used {saved[key]!r}")
    return {**{k: saved[k] for k in keys if k in saved}, **values}


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


def output_dir(cfg, method) -> Path:
    """--out, or runs/<method>-<timestamp>. Checked now, created only after the "before" evaluation and the
    method's setup: a run that fails or is interrupted before then leaves nothing behind."""
    out = Path(cfg.out or f"runs/{method.name}-{datetime.now():%Y%m%d-%H%M%S}")
    ok, parent = can_create(out)
    if not ok:
        raise ForgetlabError(f"{out}: cannot create the output directory ({parent} is not a writable directory)")
    return out


def run_context(cfg, tok, data, device: str) -> RunContext:
    """What the method's hooks may know of this run (methods/base.py)."""
    return RunContext(seed=cfg.seed, batch_size=cfg.batch_size, max_len=cfg.max_len, total_steps=data.total_steps,
                      tokenizer=tok, device=device, domain=data.domain, general=data.general,
                      general_data=str(cfg.general_data), model_name=str(cfg.model or ""),
                      replay_fraction=cfg.replay_fraction, rank=distributed.rank(),
                      world_size=distributed.world_size(), fsdp=cfg.fsdp)
