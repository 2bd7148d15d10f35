'''Forgetting mitigations as plug-ins to the training loop in train.py.

A mitigation is a `Method` subclass registered under a name; `python train.py --method NAME` runs it. The loop
calls its hooks in this order:

    method.check(model, cfg)                          once, before anything slow: reject inputs that do not fit
    method.setup(model, tok, cfg, general_examples)   once, on the model before fine-tuning (e.g. a Fisher estimate)
    method.replay_examples(model, tok, cfg, examples) once, with --replay-fraction: the replayed general examples,
                                                      returned as they are or replaced (self-replay)
    method.configure(model)                           once: decide what trains (requires_grad), e.g. add LoRA
    method.optimizer(param_groups, lr, betas, fused)  once: the optimizer (AdamW unless the method brings its own)
    for step in range(total_steps):
        loss = task loss (gradient-accumulated over cfg.grad_accum micro-batches)
        extra = method.extra_loss(model, step)        a regularizer added once per optimizer step, or None
        optimizer.step()
        method.after_step(model, step)                e.g. project or clamp weights
    method.finish(model)                              once, before the final evaluation (e.g. interpolate weights)
    method.save(out)                                  write the method's own artifacts beside the model
    method.variants(model)                            more models to evaluate after the final one (wise-ft's α)

Options. A method's settings are a dataclass, `Options`, whose fields (`option(default, help)`) become the flags
`--NAME.FIELD` (underscores as dashes, a trailing underscore dropped: `lambda_` is `--ewc.lambda`), listed by
`train.py --help` under the method's name, saved in config.json under the same key ("ewc.lambda") and restored
by `--resume`. The method reads them as `self.options`; `uses = ("lora",)` also gives it the option group of the
method registered as "lora" (`self.groups["lora"]`), so that, e.g., ewc-lora and ewc share --ewc.lambda.
`Options.__post_init__` validates (raise ForgetlabError naming the flag): it runs before anything is loaded.
`option_keys(cls)` lists a method's option keys; `make_options(cls, {key: value})` builds its groups.

`defaults` holds TrainConfig overrides, a preset: they replace the dataclass defaults, but any flag the user
types wins. `state_dict()` / `load_state_dict()` carry the method's own state (a Fisher, an anchor) for
resumable checkpoints. Replay is a loop-level setting, not a method option: any method composes with
`--replay-fraction`, which mixes general examples into the training set before the loop starts.

A new mitigation, in a file passed with `--method-file` (README.md's example, `l1_init.py`), runs as
`python train.py --method-file l1_init.py --method l1-init --l1-init.strength 1e-3`:

    """L1-to-init: lambda * sum |theta - theta_0|, which lets a few weights move far rather than many a little."""
    from dataclasses import dataclass

    from methods import Method, option, register


    @register("l1-init")
    class L1Init(Method):
        defaults = {"lr": 1e-4}

        @dataclass
        class Options:
            strength: float = option(1e-4, "lambda in lambda * sum |theta - theta_0|")

        def configure(self, model):
            self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def extra_loss(self, model, step):
            return self.options.strength * sum((p - self.theta0[n]).abs().sum()
                                               for n, p in model.named_parameters() if n in self.theta0)
'''
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import random
import sys
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from errors import ForgetlabError
from ewc import EWC, estimate_fisher, full, is_dtensor, like, local
from lora import apply_lora, find_targets, lora_disabled, lora_modules
from model.llama import IGNORE_INDEX

REGISTRY: dict[str, type] = {}


def option(default, help: str, **kw):
    """A field of a method's Options dataclass: its default and --help text. kw: choices=(...), or
    resume_may_change=True for an option that only acts after the last step (may differ on --resume)."""
    return field(default=default, metadata=dict(help=help, **kw))


class Method:
    """Base class: every hook is a no-op, so `Method` itself is plain full fine-tuning."""

    name = "full"
    defaults: dict = {}
    uses: tuple = ()  # names of other registered methods whose option groups this method reads
    needs_general_data = False  # True: train.py loads --general-data and passes it to setup()

    @dataclass
    class Options:
        pass

    def __init__(self, groups: dict | None = None):
        """groups: {group name: Options instance} from `make_options`; every option at its default when None."""
        self.groups = groups if groups is not None else make_options(type(self), {})
        self.options = self.groups[self.name]

    def option_values(self) -> dict:
        """{"ewc.lambda": 0.5, ...}: every option of the method's groups, as config.json records them."""
        return {f"{g}.{flag_name(f)}": getattr(opts, f.name) for g, opts in self.groups.items()
                for f in dataclasses.fields(opts)}

    def check(self, model, cfg):
        """Before anything slow (the "before" evaluation, setup), on the unmodified model: raise ForgetlabError
        if an input the method reads (e.g. a file named in an option) does not fit, so a mistake costs seconds."""

    def setup(self, model, tok, cfg, general_examples):
        """Before training, on the unmodified model. general_examples: tokenized --general-data rows
        (dicts with input_ids and labels) when needs_general_data or replay is on, else []."""

    def replay_examples(self, model, tok, cfg, examples: list) -> list:
        """With --replay-fraction: `examples` are the general examples mixed into the training set, in order;
        return what to train on in their place (the same number). Called after setup, on the unmodified model."""
        return examples

    def configure(self, model):
        """Set requires_grad on what should train (all parameters are trainable when this is called)."""

    def optimizer(self, param_groups: list, lr: float, betas, fused: bool) -> torch.optim.Optimizer:
        """The optimizer over train.configure_optimizers' parameter groups (matrices with weight decay, norms and
        biases without). Its state must be tensors and numbers: train_state.py checkpoints it."""
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)

    def extra_loss(self, model, step: int):
        """A scalar tensor added to the loss of optimizer step `step` (its gradient is added once per step,
        not once per micro-batch), or None. Called after the task loss's backward: a method may instead add its
        gradient to each `p.grad` itself and return a tensor without grad, which is only logged."""
        return None

    def after_step(self, model, step: int):
        """Called after each optimizer step."""

    def finish(self, model):
        """Called once after the last step, before the final evaluation and the save."""

    def save(self, out: Path):
        """Write the method's own artifacts (e.g. the EWC Fisher) into the run's output directory `out`."""

    def variants(self, model) -> dict:
        """{label: function()}: further models to evaluate after the final one, each function putting `model`
        in that state (called in order, after the save). train.py reports each in its own section and in
        results.json "after_variants". wise-ft: one per α of --wise-ft.alphas."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


def register(name: str):
    """Class decorator: make a Method subclass available as `--method name`."""
    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register({name!r}) must decorate a Method subclass")
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"@register({name!r}): {cls.__name__}.Options must be a @dataclass")
        for f in dataclasses.fields(cls.Options):
            if f.default is dataclasses.MISSING or "help" not in f.metadata:
                raise TypeError(f"@register({name!r}): option {f.name} needs option(default, help)")
            if option_type(cls.Options, f) is bool and f.default is not False:
                raise TypeError(f"@register({name!r}): boolean option {f.name} must default to False (a switch)")
        taken = REGISTRY.get(name)
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            caller = sys._getframe(1)  # the line of the @register(...) being applied
            raise ForgetlabError(f"{caller.f_code.co_filename}:{caller.f_lineno}: @register({name!r}): the name is "
                                 f"taken by {taken.__module__}.{taken.__qualname__}; choose another name")
        cls.name = name
        REGISTRY[name] = cls  # the same class defined again (its file imported twice) replaces itself
        return cls
    return wrap


def get_method(name: str, values: dict | None = None) -> Method:
    """A fresh instance of the method registered as `name`, its options set from {key: value} (the rest at
    their defaults)."""
    cls = get_method_class(name)
    return cls(make_options(cls, values or {}))


def get_method_class(name: str) -> type:
    if name not in REGISTRY:
        raise ForgetlabError(f"--method {name!r} is unknown; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def load_method_file(path):
    """Import a Python file for its @register side effect (`--method-file my_method.py`). A file that does not
    import (a syntax error, an exception at import) is one ForgetlabError naming the file and line of the fault;
    FORGETLAB_TRACEBACK=1 shows the whole traceback (errors.run_cli)."""
    path = Path(path)
    if not path.is_file():
        raise ForgetlabError(f"{path}: method file not found")
    if path.suffix != ".py":
        raise ForgetlabError(f"{path}: a method file is a Python file ending in .py")
    spec = importlib.util.spec_from_file_location(f"forgetlab_user_method_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except ForgetlabError:
        sys.modules.pop(spec.name, None)
        raise
    except SyntaxError as e:
        sys.modules.pop(spec.name, None)
        raise ForgetlabError(f"{e.filename or path}:{e.lineno}: {type(e).__name__}: {e.msg}") from e
    except Exception as e:  # the user's code raised while importing: name the deepest line of their file
        sys.modules.pop(spec.name, None)
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        line = f":{frames[-1].lineno}" if frames else ""
        raise ForgetlabError(f"{path}{line}: {type(e).__name__} while importing the method file: {e}") from e
    return module


# ----------------------------------------------------------------------------- options

def flag_name(f: dataclasses.Field) -> str:
    """The option's name on the command line and in config.json: fisher_samples -> fisher-samples, lambda_ ->
    lambda (a trailing underscore only dodges a Python keyword)."""
    return f.name.rstrip("_").replace("_", "-")


def option_type(options_cls, f: dataclasses.Field) -> type:
    """int, float, str or bool: the field's annotation, with `X | None` read as X."""
    hint = typing.get_type_hints(options_cls)[f.name]
    return next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))


def option_groups(cls) -> dict[str, type]:
    """{group name: Options class} of a method class: its own, then those of `uses`."""
    groups = {cls.name: cls.Options}
    for name in cls.uses:
        groups[name] = get_method_class(name).Options
    return groups


def option_keys(cls) -> dict[str, tuple]:
    """{"ewc.lambda": (group, field, type), ...}: every option a method class reads, by its key. The sweep's
    `--grid ewc.lambda=0.1,0.5` and train.py's `--ewc.lambda` flags use these keys."""
    return {f"{g}.{flag_name(f)}": (g, f, option_type(o, f)) for g, o in option_groups(cls).items()
            for f in dataclasses.fields(o)}


def make_options(cls, values: dict) -> dict:
    """{group: Options instance} of a method class, each option from `values` ({key: value}) or its default.
    A key the method does not read is an error; Options.__post_init__ validates the values."""
    keys = option_keys(cls)
    for key in values:
        if key not in keys:
            group = key.split(".", 1)[0]
            reads = ", ".join(sorted({g for g, _, _ in keys.values()})) or "no options"
            raise ForgetlabError(f"--{key}: not an option of --method {cls.name} (it reads: {reads})"
                                 if group in REGISTRY else f"--{key}: unknown option")
    for key, value in values.items():  # from the command line, a config.json (--resume) or a sweep grid
        if keys[key][2] is float and isinstance(value, float) and not math.isfinite(value):
            raise ForgetlabError(f"--{key} {value}: not a finite number")
    groups = {}
    for g, options_cls in option_groups(cls).items():
        kw = {f.name: values[f"{g}.{flag_name(f)}"] for f in dataclasses.fields(options_cls)
              if f"{g}.{flag_name(f)}" in values}
        groups[g] = options_cls(**kw)
    return groups


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ForgetlabError(f"{flag} {text!r}: expected comma-separated numbers") from None


# ----------------------------------------------------------------------------- built-ins

register("full")(Method)


@register("lora")
class LoRA(Method):
    """Train low-rank adapters on frozen weights (Hu et al. 2021). Biderman et al. 2024, "LoRA Learns Less
    and Forgets Less": a constrained update forgets less at a similar target-domain gain."""

    defaults = {"lr": 1e-3}

    @dataclass
    class Options:
        r: int = option(16, "LoRA rank")
        alpha: float = option(32.0, "LoRA alpha (the update is scaled by alpha / r)")
        dropout: float = option(0.1, "dropout on the LoRA path's input")
        targets: str = option("q_proj,v_proj", "comma-separated module names that get LoRA adapters")

        def __post_init__(self):
            if self.r < 1:
                raise ForgetlabError("--lora.r must be >= 1")
            if not 0 <= self.dropout < 1:
                raise ForgetlabError("--lora.dropout must be in [0, 1)")

    def configure(self, model):
        apply_lora_options(model, self.groups["lora"])


def apply_lora_options(model, o):
    """apply_lora with the lora.* options `o` (a LoRA.Options)."""
    targets = tuple(t.strip() for t in o.targets.split(",") if t.strip())
    apply_lora(model, r=o.r, alpha=o.alpha, dropout=o.dropout, targets=targets)


@register("ewc")
class ElasticWeightConsolidation(Method):
    """Elastic weight consolidation (Kirkpatrick et al. 2017): estimate the diagonal Fisher F of the general-data
    log-likelihood at the pretrained weights θ*, then add λ/2 Σ_i F_i (θ_i - θ*_i)² to the domain loss, so weights
    that matter for general data move little."""

    needs_general_data = True

    @dataclass
    class Options:
        lambda_: float = option(0.5, "EWC strength lambda in lambda/2 * sum F (theta - theta*)^2")
        fisher_samples: int = option(64, "general examples used to estimate the Fisher")
        fisher_estimator: str = option("empirical", "Fisher estimator (see ewc.py)",
                                       choices=("empirical", "batch", "true"))
        fisher_normalize: str = option("mean", "Fisher normalization (see ewc.py)", choices=("none", "mean", "max"))
        fisher: str | None = option(None, "EWC state file (a previous ewc run's ewc.safetensors): use its Fisher and "
                                          "anchor instead of estimating them (the trainable parameters must match)")
        gamma: float | None = option(None, "online EWC (Schwarz et al. 2018), with --ewc.fisher: F <- gamma * F_file "
                                           "+ F_new (F_new estimated now on --general-data), anchor <- the starting "
                                           "weights")
        dtype: str = option("float32", "dtype of the stored Fisher and anchor (bfloat16 halves their memory)",
                            choices=("float32", "bfloat16"))

        def __post_init__(self):
            checks = [(self.lambda_ >= 0, "--ewc.lambda must be >= 0"),
                      (self.fisher_samples >= 1, "--ewc.fisher-samples must be >= 1"),
                      (self.gamma is None or 0 <= self.gamma <= 1, "--ewc.gamma must be in [0, 1]"),
                      (self.gamma is None or self.fisher,
                       "--ewc.gamma needs --ewc.fisher: the previous task's EWC state to decay"),
                      (not self.fisher or Path(self.fisher).is_file(), f"--ewc.fisher {self.fisher}: file not found")]
            for ok, msg in checks:
                if not ok:
                    raise ForgetlabError(msg)

    def check(self, model, cfg):
        o = self.options
        if o.fisher:  # read (again) in setup; a file that does not fit the model fails here, in seconds
            EWC.load(o.fisher, model, lam=o.lambda_, gamma=o.gamma)

    def setup(self, model, tok, cfg, general_examples):
        o = self.options
        dtype = getattr(torch, o.dtype)
        if o.fisher:  # one expensive estimate reused across runs; its anchor stays where it was estimated
            self.ewc = EWC.load(o.fisher, model, lam=o.lambda_, gamma=o.gamma, dtype=dtype)
            if o.gamma is None:
                return
        fisher = estimate_general_fisher(model, tok, cfg, o, general_examples)
        if o.fisher:  # online EWC: this run's weights are the last task's solution
            self.ewc.consolidate(model, fisher)
            self.ewc.metadata["consolidated_from"] = str(o.fisher)
        else:
            self.ewc = EWC(model, fisher, lam=o.lambda_, dtype=dtype)
        self.ewc.metadata.update(estimator=o.fisher_estimator, normalize=o.fisher_normalize,
                                 data=str(cfg.general_data), n_examples=str(min(o.fisher_samples, len(general_examples))),
                                 model=str(cfg.model or "SmolLM2-135M-Instruct (default)"))

    def extra_loss(self, model, step):
        # the gradient λ·F·(θ − θ*) written into .grad in place: backpropagating penalty() allocates a fresh
        # gradient for every parameter each step, which measured 1.35x a plain step on CPU against 1.11x
        return self.ewc.add_penalty_grad_(model)

    def save(self, out):
        """ewc.safetensors: the Fisher and anchor this run used, with metadata; `--ewc.fisher` reads it back."""
        self.ewc.save(Path(out) / "ewc.safetensors")

    def state_dict(self):
        return self.ewc.state_dict()

    def load_state_dict(self, state):
        self.ewc.load_state_dict(state)


def estimate_general_fisher(model, tok, cfg, o, general_examples) -> dict:
    """The diagonal Fisher of the model's trainable parameters on --ewc.fisher-samples general examples drawn
    with --seed (so that an interval over seeds includes the estimate's sampling variance), with the ewc.*
    estimator and normalization `o`."""
    from data import batches_by_length

    import distributed

    sample = random.Random(cfg.seed).sample(general_examples, min(o.fisher_samples, len(general_examples)))
    # the "batch" estimator squares each batch's mean gradient, so its value depends on the batch size
    batches = batches_by_length(sample, cfg.batch_size, tok.pad_id, seed=cfg.seed)
    # under torchrun each rank sums its own rows of every batch and the sums are all-reduced (distributed.py)
    return estimate_fisher(model, distributed.fisher_share(batches), estimator=o.fisher_estimator,
                           normalize=o.fisher_normalize, progress=distributed.is_main(), seed=cfg.seed,
                           all_ranks=True)


@register("replay")
class Replay(Method):
    """Experience replay: full fine-tuning on the domain set mixed with general examples
    (int(len(domain) * replay_fraction) of them)."""

    defaults = {"replay_fraction": 0.15}


@register("safe")
class Safe(Method):
    """Full fine-tuning with conservative settings: small lr, warmup, cosine decay, effective batch 16."""

    defaults = {"lr": 2e-5, "epochs": 3, "batch_size": 4, "grad_accum": 4, "warmup": 0.05, "schedule": "cosine",
                "weight_decay": 0.01}


@register("risky")
class Risky(Method):
    """Full fine-tuning with aggressive settings: 2.5x the lr, many epochs, batch 1, no warmup."""

    defaults = {"lr": 5e-5, "epochs": 10, "batch_size": 1, "grad_accum": 1, "warmup": 0.0, "schedule": "linear",
                "weight_decay": 0.0}


# ----------------------------------------------------------------------------- baselines of the literature

@register("l2-init")
class L2Init(Method):
    """L2-SP (Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
    Networks"): pull every trainable weight toward its pretrained value θ₀,

        penalty(θ) = λ/2 · Σ_i (θ_i − θ₀_i)²          gradient: λ · (θ − θ₀)

    This is EWC with F ≡ 1, and on EWC's scale: a mean-normalized Fisher (--ewc.fisher-normalize mean, the
    default) averages 1 per weight, so at the same λ both penalties put the same total weight on a uniform
    displacement, and "ewc vs l2-init at one λ" isolates what the Fisher's distribution over weights adds.
    The gradient is added into .grad in place (as EWC's), so no autograd graph over the whole model is built."""

    @dataclass
    class Options:
        lambda_: float = option(0.5, "strength lambda in lambda/2 * sum (theta - theta_0)^2 (EWC's scale)")

        def __post_init__(self):
            if self.lambda_ < 0:
                raise ForgetlabError("--l2-init.lambda must be >= 0")

    def configure(self, model):
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.theta0 = [p.detach().clone() for p in self.params]

    def shard(self, model):
        """Under FSDP2 (distributed.shard_method_state): follow the sharded parameters, θ₀ laid out like them."""
        from distributed import distribute_like

        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.theta0 = [distribute_like(t, p) for t, p in zip(self.theta0, self.params, strict=True)]

    @torch.no_grad()
    def extra_loss(self, model, step):
        lam = self.options.lambda_
        total = torch.zeros((), dtype=torch.float32, device=local(self.params[0]).device)
        for p, p0 in zip(self.params, self.theta0):
            delta = local(p) - local(p0)  # this rank's shard under FSDP2, else the whole tensor
            total += delta.pow(2).sum(dtype=torch.float32)
            if p.grad is None:
                p.grad = like(p, delta.mul_(lam))
            else:
                local(p.grad).add_(delta, alpha=lam)
        if is_dtensor(self.params[0]):
            torch.distributed.all_reduce(total)  # each rank summed its own shards
        return total * (lam / 2)


@register("freeze")
class Freeze(Method):
    """Freeze the bottom of the network (Zheng et al. 2025, "Spurious Forgetting in Continual Learning of Language
    Models", ICLR): the embeddings and the lowest k decoder layers do not train. Their finding: much of the
    forgetting is a loss of task alignment, carried by updates to the bottom layers, and freezing them (e.g. 6
    of LLaMA-2-7B's 32 layers) keeps it. With tied embeddings (SmolLM2) the frozen embedding is also lm_head."""

    @dataclass
    class Options:
        layers: int = option(3, "k: the embeddings and decoder layers 0 .. k-1 stay frozen")

        def __post_init__(self):
            if self.layers < 0:
                raise ForgetlabError("--freeze.layers must be >= 0")

    def check(self, model, cfg):
        n = len(model.model.layers)
        if self.options.layers > n:
            raise ForgetlabError(f"--freeze.layers {self.options.layers}: the model has {n} decoder layers")

    def configure(self, model):
        model.model.embed_tokens.requires_grad_(False)
        for layer in model.model.layers[:self.options.layers]:
            layer.requires_grad_(False)


@register("wise-ft")
class WiSEFT(Method):
    """WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): after fine-tuning, interpolate
    the weights linearly between the start θ₀ and the fine-tuned θ_ft,

        θ(α) = (1 − α)·θ₀ + α·θ_ft        computed as torch.lerp(θ₀, θ_ft, α): exactly θ₀ at α = 0, θ_ft at 1

    For a LoRA run (--wise-ft.lora) θ₀ is the base model and θ_ft − θ₀ = s·B·A, so θ(α) = W₀ + s·(αB)·A: the
    adapter's B is scaled by α, and the saved adapter is the interpolated one. The model saved and reported as
    "after" is θ(--wise-ft.alpha); each α of --wise-ft.alphas is evaluated too, from the same training run.
    Memory: full fine-tuning keeps θ₀ and θ_ft (two copies of the trainable weights)."""

    uses = ("lora",)

    @dataclass
    class Options:
        alpha: float = option(0.5, "alpha of the saved model (1 - alpha) * theta_0 + alpha * theta_ft, the run's "
                                   "\"after\"", resume_may_change=True)
        alphas: str = option("", "more alphas to evaluate from the same run, comma-separated (e.g. 0.25,0.5,0.75,1): "
                                 "each its own report section", resume_may_change=True)
        lora: bool = option(False, "train LoRA adapters (the lora.* options) and interpolate those")

        def __post_init__(self):
            if not all(0 <= a <= 1 for a in [self.alpha, *parse_floats(self.alphas, "--wise-ft.alphas")]):
                raise ForgetlabError("--wise-ft.alpha and --wise-ft.alphas must be in [0, 1]")

    def check(self, model, cfg):
        if cfg.fsdp and self.options.alphas:
            raise ForgetlabError("--wise-ft.alphas under --fsdp: the extra alphas are evaluated on rank 0's gathered "
                                 "model, which holds no θ₀; run them with DDP (the saved --wise-ft.alpha works)")

    def targets(self, model) -> dict:
        """{name: the tensor interpolated}: each adapter's B (a LoRA run), else every trainable weight."""
        if self.options.lora:
            return {n: m.lora_B.weight for n, m in lora_modules(model).items()}
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def configure(self, model):
        if self.options.lora:
            apply_lora_options(model, self.groups["lora"])
        self.params = self.targets(model)
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}  # a LoRA B starts at 0

    def shard(self, model):
        """Under FSDP2 (distributed.shard_method_state): follow the sharded parameters, θ₀ laid out like them, so
        that each rank interpolates its own shards."""
        from distributed import distribute_like

        self.params = self.targets(model)
        self.theta0 = {n: distribute_like(t, self.params[n]) for n, t in self.theta0.items()}

    @torch.no_grad()
    def finish(self, model):
        self.theta_ft = {n: p.detach().clone() for n, p in self.params.items()}
        self.interpolate(self.options.alpha)

    @torch.no_grad()
    def interpolate(self, alpha: float):
        for n, p in self.params.items():
            local(p).copy_(torch.lerp(local(self.theta0[n]), local(self.theta_ft[n]), alpha))

    def variants(self, model):
        return {f"alpha={a:g}": (lambda a=a: self.interpolate(a))
                for a in parse_floats(self.options.alphas, "--wise-ft.alphas")}


class MoFOOptimizer(torch.optim.Optimizer):
    """MoFO (Chen et al. 2025, "MoFO: Momentum-Filtered Optimizer for Mitigating Forgetting in LLM Fine-Tuning",
    TMLR): Adam's moments are updated for every entry, but in each parameter tensor (MoFO's partition) only the
    fraction α of entries with the largest momentum magnitude |m| move:

        m ← β₁ m + (1 − β₁) g        v ← β₂ v + (1 − β₂) g²        S = the ⌈α · numel⌉ entries of largest |m|
        θ_S ← θ_S · (1 − lr · wd) − lr · m̂_S / (√v̂_S + ε)        θ outside S: unchanged, bit for bit

    with m̂, v̂ Adam's bias-corrected moments. At α = 1 this is AdamW (decoupled weight decay). The state keys are
    AdamW's (step, exp_avg, exp_avg_sq), so checkpoints and --resume treat it alike."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 fraction: float = 0.1):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fraction=fraction))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = float(state["step"])
                # this rank's shards under FSDP2 (the state was made like p), else the tensors themselves
                m, v, g = local(state["exp_avg"]), local(state["exp_avg_sq"]), local(p.grad)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                k = max(1, math.ceil(group["fraction"] * p.numel()))
                if is_dtensor(p):  # the k largest |m| of the whole tensor: at least its k-th largest, gathered
                    kth = full(state["exp_avg"]).abs().view(-1).topk(k, sorted=False).values.min()
                    idx = (m.abs().view(-1) >= kth).nonzero().squeeze(1)
                else:
                    idx = m.abs().view(-1).topk(k, sorted=False).indices  # the filter: largest |m| in this tensor
                m_hat = m.view(-1)[idx] / (1 - beta1 ** t)
                v_hat = v.view(-1)[idx] / (1 - beta2 ** t)
                flat = local(p).view(-1)
                new = flat[idx] * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * m_hat / (
                    v_hat.sqrt() + group["eps"])
                flat[idx] = new


@register("mofo")
class MoFO(Method):
    """Full fine-tuning with MoFO, the momentum-filtered AdamW of Chen et al. 2025 (see `MoFOOptimizer`): each
    step moves only the fraction of each tensor's entries with the largest momentum, so the weights stay closer
    to the pretrained ones without a penalty or any general data. The method's only hook is `optimizer`: an
    `after_step` that undid AdamW's update outside the selected entries would need the pre-step value of every
    weight (a second copy of the model, written each step) and AdamW's momenta to choose by; an optimizer has
    both at hand and writes only the selected entries."""

    @dataclass
    class Options:
        fraction: float = option(0.1, "alpha: fraction of each parameter tensor's entries updated per step (those "
                                      "with the largest momentum magnitude)")

        def __post_init__(self):
            if not 0 < self.fraction <= 1:
                raise ForgetlabError("--mofo.fraction must be in (0, 1]")

    def optimizer(self, param_groups, lr, betas, fused):
        return MoFOOptimizer(param_groups, lr=lr, betas=betas, fraction=self.options.fraction)


@register("kl")
class KLToBase(Method):
    """Learning without Forgetting (Li & Hoiem 2017), in the form of the KL-to-reference term of recent LLM
    fine-tuning recipes: keep the fine-tuned model's next-token distribution close to the base model's on
    general prompts,

        loss += β · 1/N Σ_t KL(p_base(·|x<t) ‖ p_θ(·|x<t)),     p = softmax(logits / T)

    averaged over the N labelled (answer) positions t of one batch of --general-data per step (the batches in a
    fixed order, cycled; --kl.data domain uses the domain set's prompts instead). The base distribution comes
    from the frozen model without a second full copy where possible:
      adapters-off  a LoRA run (--kl.lora): the same model with its adapters switched off (lora_disabled)
      cache         full fine-tuning: the base model's top-k tokens and logits at every position, computed once
                    before training; the KL is then taken over those k tokens, both distributions renormalized
                    on them (exact as k → vocabulary; 0 when p_θ = p_base, as the full KL)
      copy          full fine-tuning: a frozen copy of the base model, one extra forward per step
    --kl.teacher auto picks adapters-off for a LoRA run and cache otherwise (BENCHMARKS.md: cache cost the least
    time and memory on the default model). Cost: a forward and backward of one general batch per step."""

    needs_general_data = True
    uses = ("lora",)

    @dataclass
    class Options:
        beta: float = option(0.1, "beta in beta * KL(p_base || p_theta)")
        temperature: float = option(1.0, "T: both distributions are softmax(logits / T)")
        data: str = option("general", "the prompts the KL is taken on: general (--general-data) or domain (--data)",
                           choices=("general", "domain"))
        teacher: str = option("auto", "where p_base comes from (see methods.KLToBase): auto = adapters-off with "
                                      "--kl.lora, else cache", choices=("auto", "adapters-off", "cache", "copy"))
        top_k: int = option(64, "tokens kept per position by the cache teacher")
        lora: bool = option(False, "train LoRA adapters (the lora.* options) instead of every weight")

        def __post_init__(self):
            checks = [(self.beta >= 0, "--kl.beta must be >= 0"),
                      (self.temperature > 0, "--kl.temperature must be > 0"),
                      (self.top_k >= 1, "--kl.top-k must be >= 1"),
                      (self.teacher != "adapters-off" or self.lora, "--kl.teacher adapters-off needs --kl.lora")]
            for ok, msg in checks:
                if not ok:
                    raise ForgetlabError(msg)

    @property
    def teacher(self) -> str:
        o = self.options
        return o.teacher if o.teacher != "auto" else ("adapters-off" if o.lora else "cache")

    def setup(self, model, tok, cfg, general_examples):
        from data import batches_by_length, load_dataset, tokenize_dataset

        examples = general_examples
        if self.options.data == "domain":
            examples, _ = tokenize_dataset(tok, load_dataset(cfg.data), cfg.max_len)
        self.batches = batches_by_length(examples, cfg.batch_size, tok.pad_id, seed=cfg.seed)
        if cfg.max_steps:  # step s uses batch s mod len: a shorter run never reaches the rest (nor need the cache)
            self.batches = self.batches[:cfg.max_steps]
        if self.teacher == "copy":
            self.base = copy.deepcopy(model).eval().requires_grad_(False)
        elif self.teacher == "cache":
            with torch.no_grad():
                self.cache = [self.top_k(self.logits(model, b)) for b in self.batches]

    def configure(self, model):
        if self.options.lora:
            apply_lora_options(model, self.groups["lora"])

    def logits(self, model, batch) -> torch.Tensor:
        """(N, vocab) float32 logits / T at the batch's N labelled positions (where the next token is an answer
        token): lm_head only there, so the whole (B, T, vocab) tensor is never built."""
        from distributed import is_sharded

        device = local(model.lm_head.weight).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        where = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device)
        if is_sharded(model):  # FSDP2 gathers the weights inside forward only: all (B, T, vocab) logits, then N
            return model(ids, attention_mask=mask)[:, :-1][where].float() / self.options.temperature
        h = model.hidden(ids, attention_mask=mask)[:, :-1][where]
        return model.lm_head(h).float() / self.options.temperature

    def top_k(self, logits) -> tuple:
        """(values, indices) (N, k): the k largest logits / T at each position, i.e. the top-k tokens. Logits,
        not log-probs, are kept: renormalized on the k tokens both give the same distribution, and the student's
        is then computed by the very same operations, so the KL is exactly 0 at the start."""
        return logits.topk(min(self.options.top_k, logits.shape[-1]), dim=-1)

    def kl(self, model, step: int) -> torch.Tensor:
        """1/N Σ_t KL(p_base ‖ p_θ) on the batch of optimizer step `step`, differentiable in θ."""
        i = step % len(self.batches)
        batch = self.batches[i]
        student = self.logits(model, batch)
        if self.teacher == "cache":
            values, index = self.cache[i]
            log_q = torch.log_softmax(values, -1)  # both renormalized on the teacher's top k
            log_p = torch.log_softmax(student.gather(-1, index), -1)
        else:
            adapters_off = self.teacher == "adapters-off"
            with torch.no_grad(), (lora_disabled(model) if adapters_off else contextlib.nullcontext()):
                teacher = self.logits(model if adapters_off else self.base, batch)
            log_q, log_p = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
        return F.kl_div(log_p, log_q, log_target=True, reduction="sum") / student.shape[0]

    def extra_loss(self, model, step):
        return self.options.beta * self.kl(model, step)


def gathered_for_autograd(t: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded DTensor parameter as a plain tensor that autograd sees through: its gradient, a
    partial sum on each rank, is summed and scattered back to the shards (reduce-scatter). t itself when plain."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial, Replicate
    return t.redistribute(placements=[Replicate()] * len(t.placements)).to_local(
        grad_placements=[Partial()] * len(t.placements))


@register("ewc-lora")
class EWCLoRA(Method):
    """EWC on a LoRA run: penalize each adapted weight's effective update ΔW = s·B·A (s = alpha / r) with the
    diagonal Fisher F of the base weight W₀, estimated before the adapters are added,

        penalty = λ/2 · Σ_layers Σ_ij F_ij · (s · (B A)_ij)²

    which is the EWC penalty of the merged weights W₀ + s·B·A around W₀, computed without merging. Prior work:
    the same idea ("EWC-LoRA": EWC on the full-dimensional ΔW of a shared low-rank update) is Zheng et al.
    2026, "Revisiting Weight Regularization for Low-Rank Continual Learning" (ICLR). Options: lora.* for the
    adapters, ewc.lambda and ewc.fisher-* for the penalty (the same λ scale as ewc: F mean-normalized over the
    adapted weights). The penalty is backpropagated (autograd through B·A): (out x in) per adapted layer."""

    needs_general_data = True
    uses = ("lora", "ewc")

    def check(self, model, cfg):
        e = self.groups["ewc"]
        if e.fisher or e.gamma is not None:
            raise ForgetlabError("--method ewc-lora estimates its own Fisher of the adapted weights: "
                                 "--ewc.fisher and --ewc.gamma apply to --method ewc only")

    def setup(self, model, tok, cfg, general_examples):
        targets = tuple(t.strip() for t in self.groups["lora"].targets.split(",") if t.strip())
        self.names = find_targets(model, targets)
        weights = {f"{n}.weight" for n in self.names}
        for n, p in model.named_parameters():  # the Fisher of the adapted base weights only
            p.requires_grad_(n in weights)
        try:
            fisher = estimate_general_fisher(model, tok, cfg, self.groups["ewc"], general_examples)
        finally:
            model.requires_grad_(True)
        dtype = getattr(torch, self.groups["ewc"].dtype)
        self.fisher = {n: fisher[f"{n}.weight"].to(dtype) for n in self.names}

    def configure(self, model):
        apply_lora_options(model, self.groups["lora"])
        self.modules = lora_modules(model)

    def shard(self, model):
        """Under FSDP2 (distributed.shard_method_state): follow the sharded adapters, and lay each F out like its
        B (rows: FSDP2 shards B's and ΔW's output dimension alike), so that each rank penalizes its rows of ΔW."""
        from distributed import distribute_like

        self.modules = lora_modules(model)
        self.fisher = {n: distribute_like(f, self.modules[n].lora_B.weight) for n, f in self.fisher.items()}

    def penalty(self) -> torch.Tensor:
        total = 0.0
        for n, m in self.modules.items():
            delta = (local(m.lora_B.weight) @ gathered_for_autograd(m.lora_A.weight)) * m.scale  # ΔW = s·B·A
            total = total + (local(self.fisher[n]) * delta.square()).sum(dtype=torch.float32)
        total = self.groups["ewc"].lambda_ / 2 * total
        if not is_dtensor(self.fisher[next(iter(self.fisher))]):
            return total
        # under FSDP2 each rank holds its rows of ΔW: backpropagate those, report the sum over the ranks
        whole = total.detach().clone()
        torch.distributed.all_reduce(whole)
        return total + (whole - total.detach())

    def extra_loss(self, model, step):
        return self.penalty()

    def state_dict(self):
        return {f"fisher.{n}": f for n, f in self.fisher.items()}

    def load_state_dict(self, state):
        for n, f in self.fisher.items():
            f.copy_(state[f"fisher.{n}"])


@register("self-replay")
class SelfReplay(Method):
    """Self-replay, in the spirit of Self-Synthesized Rehearsal (Huang et al. 2024, "Mitigating Catastrophic
    Forgetting in Large Language Models with Self-Synthesized Rehearsal") and Self-Distillation Fine-Tuning (Yang
    et al. 2024, "Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning"): replay, but the
    replayed general examples keep their prompts and take the base model's own greedy answers as targets, so
    replay pulls toward what the model did rather than toward someone else's answers.

    The answers are generated once, before training, on the unmodified model, and cached in --self-replay.cache
    under the sha256 of the model's weights (its identity) and the generation settings; a later run with the same
    model reads them back. Only the first assistant turn of a chat example is regenerated; its end-of-turn token
    (the original answer's last label) is kept. Composes like replay: --replay-fraction (preset 0.15)."""

    defaults = {"replay_fraction": 0.15}

    @dataclass
    class Options:
        max_new_tokens: int = option(128, "longest answer the base model generates")
        cache: str = option(str(Path.home() / ".cache" / "forgetlab" / "self-replay"),
                            "directory of the cached answers (one JSON file per model and setting)")

        def __post_init__(self):
            if self.max_new_tokens < 1:
                raise ForgetlabError("--self-replay.max-new-tokens must be >= 1")

    def check(self, model, cfg):
        if cfg.replay_fraction <= 0:
            raise ForgetlabError("--method self-replay replays nothing with --replay-fraction 0")

    def cache_file(self, model, tok) -> Path:
        from model.checkpoint import weights_sha256

        h = hashlib.sha256(weights_sha256(model).encode())
        h.update(json.dumps([self.options.max_new_tokens, sorted(tok.stop_ids), tok.pad_id]).encode())
        return Path(self.options.cache) / f"{h.hexdigest()[:32]}.json"

    @staticmethod
    def read_cache(file: Path) -> dict:
        """{prompt ids as "1,2,3": answer ids} from the cache file; {} when there is none, or when it cannot be
        read (cut short by a full disk, edited): a cache is derived data, so it is generated again, not fatal."""
        if not file.is_file():
            return {}
        try:
            cached = json.loads(file.read_text(encoding="utf-8"))
            if isinstance(cached, dict) and all(isinstance(k, str) and isinstance(v, list) and
                                                all(isinstance(t, int) for t in v) for k, v in cached.items()):
                return cached
            why = "not a map of prompts to answer token ids"
        except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            why = type(e).__name__
        print(f"warning: self-replay: ignoring the unreadable cache {file} ({why}): the answers are generated "
              f"again", file=sys.stderr)
        return {}

    def replay_examples(self, model, tok, cfg, examples):
        from model.checkpoint import write_atomic_text
        from model.generate import eval_mode, generate_ids

        file = self.cache_file(model, tok)
        cached = self.read_cache(file)
        prompts = [e["input_ids"][:next(i for i, y in enumerate(e["labels"]) if y != IGNORE_INDEX)] for e in examples]
        keys = [",".join(map(str, p)) for p in prompts]
        todo = sorted({k: p for k, p in zip(keys, prompts) if k not in cached}.items(), key=lambda kp: len(kp[1]))
        if todo:
            print(f"self-replay: the base model answers {len(todo)} general prompts ({file})", file=sys.stderr)
            with eval_mode(model):
                for s in range(0, len(todo), 16):
                    chunk = todo[s:s + 16]
                    answers = generate_ids(model, [p for _, p in chunk], self.options.max_new_tokens, tok.stop_ids,
                                           tok.pad_id)
                    cached.update({k: a for (k, _), a in zip(chunk, answers)})
            file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic_text(file, json.dumps(cached))
        out = []
        for e, p, k in zip(examples, prompts, keys):
            end = [y for y in e["labels"] if y != IGNORE_INDEX][-1:]
            answer = cached[k] + (end if end and end[0] in tok.stop_ids else [])
            ids = (p + answer)[:cfg.max_len]
            out.append(dict(input_ids=ids, labels=([IGNORE_INDEX] * len(p) + answer)[:cfg.max_len]))
        return out
