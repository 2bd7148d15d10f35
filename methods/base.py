'''The plug-in contract: a forgetting mitigation is a `Method` subclass registered under a name.

    python train.py --method NAME                          a built-in (one file each in this package)
    python train.py --method-file mine.py --method mine    your own (examples/l1_init.py)

The loop in train.py calls the hooks below in this order; every hook is a no-op on `Method`, so `Method`
itself is plain full fine-tuning ("full"). A hook sees the model and a `RunContext`, the few facts of the run
a method may need (seed, batch size, the tokenized data, rank), never the whole command line.

    check(model, run)                       once, before anything slow: refuse inputs that do not fit
    setup(model, run)                       once, on the model before fine-tuning (e.g. a Fisher estimate)
    train_examples(model, run, examples)    once: the domain's training examples, kept or replaced (sdft-rewrite)
    replay_examples(model, run, examples)   once, with --replay-fraction: the replayed examples, kept or replaced
    configure(model)                        once: decide what trains (requires_grad), e.g. add LoRA adapters
    optimizer(param_groups, lr, betas, fused)   once: AdamW unless the method brings its own
    for step in range(run.total_steps):
        task_loss(model, forward, batch, step)  each micro-batch's loss, backpropagated (gradient-accumulated):
                                            the labels' cross-entropy unless the method learns from something
                                            else (sdft-on-policy: its own samples, toward a teacher)
        extra_loss(model, step)             a differentiable scalar added to the loss once per step, or None
        add_gradient(model, step)           or: add a regularizer's gradient to p.grad yourself (no autograd
                                            graph over the model), returning its value for the log, or None
        optimizer.step()
        after_step(model, step)             e.g. project or clamp weights
    finish(model)                           once, after the last step (e.g. interpolate weights)
    save(out)                               the method's own files beside the model (e.g. ewc.safetensors)
    variants(model)                         more models to evaluate after the final one (wise-ft's alphas)

Per-parameter state. A method that keeps tensors shaped like the parameters (θ₀, a Fisher, a running mean)
names the attributes that hold them in `param_state`: each is a dict {parameter name: tensor}. The loop then
lays every such tensor out like its parameter when FSDP2 shards the model (so `p - self.theta0[n]` is the
same formula on one process and on N ranks), and checkpoints save and restore them (`state_dict`). A method
that keeps other state overrides `state_dict` / `load_state_dict` and calls the base class's.

Task streams (stream.py). A stream trains task after task with one instance of the method: for each stage it
sets every parameter trainable and calls setup, train_examples, configure, optimizer, the steps and finish again,
with `run.stage`, `run.stages`, `run.task` and `run.domain` (that task's examples) telling the method where it is. So a
method written for one fine-tune runs in a stream unchanged, each stage starting from the previous one's model:
l2-init pulls toward the previous task's weights, kl toward the previous task's model, wise-ft interpolates
between the start and the end of each stage. State kept on `self` carries from stage to stage (online EWC's
Fisher, O-LoRA's earlier adapters); `state_dict` must hold all of it, since a resumed stream restores it on a
fresh instance.

Options. A method's settings are a dataclass, `Options`, whose fields (`option(default, help)`) become the flags
`--NAME.FIELD` (underscores as dashes, a trailing underscore dropped: `lambda_` is `--ewc.lambda`), listed by
`train.py --help` under the method's name, saved in config.json under the same key ("ewc.lambda"), restored by
`--resume` and searchable by `scripts/sweep.py --grid`. The method reads them as `self.options`; `uses =
("lora",)` also gives it the option group of the method registered as "lora" (`self.groups["lora"]`).
`Options.__post_init__` validates (raise ForgetlabError naming the flag): it runs before anything is loaded.
`defaults` holds TrainConfig overrides, a preset: they replace the dataclass defaults, but a typed flag wins.
'''
import dataclasses
import importlib.util
import math
import sys
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from errors import ForgetlabError

REGISTRY: dict[str, type] = {}


@dataclass
class RunContext:
    """What a method may know of the run it is part of: train.py builds it once the inputs are loaded."""
    seed: int  # --seed: for anything the method draws (a Fisher sample, a shuffle)
    batch_size: int  # --batch-size, the global micro-batch
    max_len: int  # --max-len: examples are truncated to it
    total_steps: int  # optimizer steps of the run
    tokenizer: object  # model.tokenizer.Tokenizer: pad_id, stop_ids, encode / decode
    device: str  # where the model is (this rank's device under torchrun)
    domain: list = field(default_factory=list)  # the tokenized --data examples (dicts: input_ids, labels)
    general: list = field(default_factory=list)  # tokenized --general-data, when needs_general_data or replay
    general_data: str = ""  # the file `general` came from (for a method's metadata)
    model_name: str = ""  # --model, or "" for the default model
    replay_fraction: float = 0.0  # --replay-fraction
    rank: int = 0  # this process under torchrun, else 0
    world_size: int = 1
    fsdp: bool = False  # the model will be sharded with FSDP2 (see distributed.py)
    stage: int = 0  # in a task stream (stream.py): the task being trained, 0-based; a single fine-tune is stage 0
    stages: int = 1  # the stream's number of tasks (1: a single fine-tune)
    task: str = ""  # the stream's task of this stage ("" in a single fine-tune)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id


def option(default, help: str, **kw):
    """A field of a method's Options dataclass: its default and --help text. kw: choices=(...), or
    resume_may_change=True for an option that only acts after the last step (may differ on --resume)."""
    return field(default=default, metadata=dict(help=help, **kw))


class Method:
    """Base class: every hook is a no-op, so `Method` itself is plain full fine-tuning."""

    name = "full"
    defaults: dict = {}
    uses: tuple = ()  # names of other registered methods whose option groups this method reads
    needs_general_data = False  # True: train.py loads --general-data into run.general
    param_state: tuple = ()  # attributes holding {parameter name: tensor laid out like it} (module docstring)

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

    def check(self, model, run: RunContext):
        """Before anything slow (the "before" evaluation, setup), on the unmodified model: raise ForgetlabError
        if an input the method reads (e.g. a file named in an option) does not fit, so a mistake costs seconds."""

    def setup(self, model, run: RunContext):
        """Before training, on the unmodified model (e.g. estimate a Fisher on run.general)."""

    def train_examples(self, model, run: RunContext, examples: list) -> list:
        """`examples` are the domain's training examples (run.domain), in order; return what to train on in their
        place (the same number: the step count is fixed by then). Called after setup, on the unmodified model;
        in a task stream, on each stage's task."""
        return examples

    def replay_examples(self, model, run: RunContext, examples: list) -> list:
        """With --replay-fraction: `examples` are the general examples mixed into the training set, in order;
        return what to train on in their place (the same number). Called after setup, on the unmodified model."""
        return examples

    def configure(self, model):
        """Set requires_grad on what should train (all parameters are trainable when this is called)."""

    def optimizer(self, param_groups: list, lr: float, betas, fused: bool) -> torch.optim.Optimizer:
        """The optimizer over train.configure_optimizers' parameter groups (matrices with weight decay, norms and
        biases without). Its state must be tensors and numbers: train_state.py checkpoints it."""
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)

    def task_loss(self, model, forward, batch: dict, step: int) -> torch.Tensor:
        """The loss of one micro-batch of optimizer step `step`: this rank's rows of it, on the device
        (input_ids, labels, attention_mask, right-padded). `forward` is the model as train.py runs it (DDP-wrapped
        under torchrun, compiled with --compile): call it for everything that must backpropagate; `model` is the
        bare model, e.g. to generate from. train.py weighs each micro-batch by its share of the step's labelled
        tokens, whatever this returns."""
        return forward(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])

    def extra_loss(self, model, step: int) -> torch.Tensor | None:
        """A differentiable scalar tensor added to the loss of optimizer step `step` (backpropagated once per
        step, after the task loss's micro-batches), or None."""
        return None

    def add_gradient(self, model, step: int) -> torch.Tensor | None:
        """The other way to regularize: add the regularizer's gradient to each trainable `p.grad` in place
        (cheaper when it is known in closed form, e.g. λ·F·(θ − θ*)), and return its value as a scalar tensor
        without grad, for the log; or None. Called after extra_loss's backward, before clipping."""
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
        """The method's tensors for a resumable checkpoint: every `param_state` tensor, as "<attribute>.<name>"."""
        return {f"{attr}.{n}": t for attr in self.param_state for n, t in getattr(self, attr, {}).items()}

    def load_state_dict(self, state: dict):
        """Copy a checkpoint's tensors (as `state_dict` names them) into the method's own, in place; a tensor the
        method does not hold yet (a stream resumed at a later stage, on a fresh instance) is taken as it is."""
        with torch.no_grad():
            for attr in self.param_state:
                own = getattr(self, attr, None)
                if own is None:
                    own = {}
                    setattr(self, attr, own)
                missing = [n for n in own if f"{attr}.{n}" not in state]
                if missing:
                    raise ForgetlabError(f"method {self.name!r}: the saved state lacks {attr}.{missing[0]}")
                for key, t in state.items():
                    name = key.removeprefix(f"{attr}.")
                    if name == key:
                        continue
                    if name in own:
                        own[name].copy_(t)
                    else:
                        own[name] = t.clone()


def register(name: str):
    """Class decorator: make a Method subclass available as `--method name`. A name already taken by another
    class is an error naming the line of the decorator (a plug-in cannot replace a built-in unnoticed)."""
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


def preset(name: str, base: type, doc: str, **defaults) -> type:
    """A named set of TrainConfig defaults for an existing method (`--method safe` is full fine-tuning with
    conservative settings): registered like a method, so it is chosen, reported and swept like one."""
    cls = type(name.title().replace("-", "") + "Preset", (base,),
               {"__doc__": doc, "defaults": {**base.defaults, **defaults},
                "__module__": sys._getframe(1).f_globals["__name__"]})  # the module that declares the preset
    return register(name)(cls)


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


def check_all(checks: list[tuple[bool, str]]):
    """Options.__post_init__'s helper: raise ForgetlabError with the message of the first check that fails."""
    for ok, msg in checks:
        if not ok:
            raise ForgetlabError(msg)
