'''Forgetting mitigations as plug-ins to the training loop in train.py.

A mitigation is a `Method` subclass registered under a name; `python train.py --method NAME` runs it. The loop
calls its hooks in this order:

    method.check(model, cfg)                          once, before anything slow: reject inputs that do not fit
    method.setup(model, tok, cfg, general_examples)   once, on the model before fine-tuning (e.g. a Fisher estimate)
    method.configure(model)                           once: decide what trains (requires_grad), e.g. add LoRA
    for step in range(total_steps):
        loss = task loss (gradient-accumulated over cfg.grad_accum micro-batches)
        extra = method.extra_loss(model, step)        a regularizer added once per optimizer step, or None
        optimizer.step()
        method.after_step(model, step)                e.g. project or clamp weights
    method.finish(model)                              once, before the final evaluation (e.g. interpolate weights)
    method.save(out)                                  write the method's own artifacts beside the model

`defaults` holds TrainConfig overrides, a preset: they replace the dataclass defaults, but any flag the user
types wins. `state_dict()` / `load_state_dict()` carry the method's own state (a Fisher, an anchor) for
resumable checkpoints. Replay is not a hook: any method composes with `--replay-fraction`, which mixes general
examples into the training set before the loop starts.

A new mitigation, in a file passed with `--method-file` (README.md's example, `l2_init.py`):

    """L2-to-init: pull the trained weights toward their values before fine-tuning (EWC with F = 1)."""
    from methods import Method, register


    @register("l2-init")
    class L2Init(Method):
        defaults = {"lr": 1e-4}
        strength = 1.0  # loss += strength / 2 * ||theta - theta_0||^2

        def configure(self, model):
            self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def extra_loss(self, model, step):
            return self.strength / 2 * sum(((p - self.theta0[n]) ** 2).sum()
                                           for n, p in model.named_parameters() if n in self.theta0)
'''
import importlib.util
import sys
from pathlib import Path

import torch

from errors import ForgetlabError
from ewc import EWC, estimate_fisher
from lora import apply_lora

REGISTRY: dict[str, type] = {}


class Method:
    """Base class: every hook is a no-op, so `Method` itself is plain full fine-tuning."""

    name = "full"
    defaults: dict = {}
    needs_general_data = False  # True: train.py loads --general-data and passes it to setup()

    def check(self, model, cfg):
        """Before anything slow (the "before" evaluation, setup), on the unmodified model: raise ForgetlabError
        if an input the method reads (e.g. a file named in cfg) does not fit, so a mistake costs seconds."""

    def setup(self, model, tok, cfg, general_examples):
        """Before training, on the unmodified model. general_examples: tokenized --general-data rows
        (dicts with input_ids and labels) when needs_general_data or replay is on, else []."""

    def configure(self, model):
        """Set requires_grad on what should train (all parameters are trainable when this is called)."""

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

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


def register(name: str):
    """Class decorator: make a Method subclass available as `--method name`."""
    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register({name!r}) must decorate a Method subclass")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return wrap


def get_method(name: str) -> Method:
    """A fresh instance of the method registered as `name`."""
    if name not in REGISTRY:
        raise ForgetlabError(f"--method {name!r} is unknown; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


def load_method_file(path):
    """Import a Python file for its @register side effect (`--method-file my_method.py`)."""
    path = Path(path)
    if not path.is_file():
        raise ForgetlabError(f"{path}: method file not found")
    spec = importlib.util.spec_from_file_location(f"forgetlab_user_method_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # errors in the user's own code keep their traceback: they are bugs
    return module


# ----------------------------------------------------------------------------- built-ins

register("full")(Method)


@register("lora")
class LoRA(Method):
    """Train low-rank adapters on frozen weights (Hu et al. 2021). Biderman et al. 2024, "LoRA Learns Less
    and Forgets Less": a constrained update forgets less at a similar target-domain gain."""

    defaults = {"lr": 1e-3}

    def setup(self, model, tok, cfg, general_examples):
        self.cfg = cfg

    def configure(self, model):
        c = self.cfg
        targets = tuple(t.strip() for t in c.lora_targets.split(",") if t.strip())
        apply_lora(model, r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout, targets=targets)


@register("ewc")
class ElasticWeightConsolidation(Method):
    """Elastic weight consolidation (Kirkpatrick et al. 2017): estimate the diagonal Fisher F of the general-data
    log-likelihood at the pretrained weights θ*, then add λ/2 Σ_i F_i (θ_i - θ*_i)² to the domain loss, so weights
    that matter for general data move little."""

    needs_general_data = True

    def check(self, model, cfg):
        if cfg.fisher:  # read (again) in setup; a file that does not fit the model fails here, in seconds
            EWC.load(cfg.fisher, model, lam=cfg.ewc_lambda, gamma=cfg.ewc_gamma)

    def setup(self, model, tok, cfg, general_examples):
        dtype = getattr(torch, cfg.ewc_dtype)
        if cfg.fisher:  # one expensive estimate reused across runs; its anchor stays where it was estimated
            self.ewc = EWC.load(cfg.fisher, model, lam=cfg.ewc_lambda, gamma=cfg.ewc_gamma, dtype=dtype)
            if cfg.ewc_gamma is None:
                return
        fisher = self.estimate(model, tok, cfg, general_examples)
        if cfg.fisher:  # online EWC: this run's weights are the last task's solution
            self.ewc.consolidate(model, fisher)
            self.ewc.metadata["consolidated_from"] = str(cfg.fisher)
        else:
            self.ewc = EWC(model, fisher, lam=cfg.ewc_lambda, dtype=dtype)
        self.ewc.metadata.update(estimator=cfg.fisher_estimator, normalize=cfg.fisher_normalize,
                                 data=str(cfg.general_data), n_examples=str(min(cfg.fisher_samples, len(general_examples))),
                                 model=str(cfg.model or "SmolLM2-135M-Instruct (default)"))

    @staticmethod
    def estimate(model, tok, cfg, general_examples):
        from data import batches_by_length

        # the "batch" estimator squares each batch's mean gradient, so its value depends on the batch size
        batches = batches_by_length(general_examples[:cfg.fisher_samples], cfg.batch_size, tok.pad_id, seed=cfg.seed)
        return estimate_fisher(model, batches, estimator=cfg.fisher_estimator, normalize=cfg.fisher_normalize,
                               progress=True, seed=cfg.seed)

    def extra_loss(self, model, step):
        # the gradient λ·F·(θ − θ*) written into .grad in place: backpropagating penalty() allocates a fresh
        # gradient for every parameter each step, which measured 1.35x a plain step on CPU against 1.11x
        return self.ewc.add_penalty_grad_(model)

    def save(self, out):
        """ewc.safetensors: the Fisher and anchor this run used, with metadata; `--fisher` reads it back."""
        self.ewc.save(Path(out) / "ewc.safetensors")

    def state_dict(self):
        return self.ewc.state_dict()

    def load_state_dict(self, state):
        self.ewc.load_state_dict(state)


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
