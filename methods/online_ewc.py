"""Online EWC across the tasks of a stream (the Fisher, its estimators and the penalty are in ../ewc.py)."""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import ForgetlabError
from ewc import EWC, ESTIMATORS, NORMALIZATIONS

from .base import Method, check_all, option, register
from .ewc import estimate_general_fisher


@register("online-ewc")
class OnlineEWC(Method):
    """Online EWC over the tasks of a stream (Schwarz et al. 2018, "Progress & Compress", ICML; Chaudhry et al.
    2018's EWC++ is similar): after task t, with F_t the diagonal Fisher of task t's own training examples at
    the weights θ*_t that ended it,

        F̃_t = γ·F̃_{t−1} + F_t   (F̃_0 = F_0),      penalty during task t+1: λ/2 · Σ_i F̃_t,i (θ_i − θ*_t,i)²

    so one Fisher and one anchor summarize every earlier task, the older ones decayed by γ (γ = 1: the sum of
    the Fishers, Huszár 2018's recursive EWC). The penalty's gradient λ·F̃·(θ − θ*) is added into .grad
    (ewc.EWC.add_penalty_grad_), so the first task trains unregularized. F_t is estimated in finish() on
    --online-ewc.fisher-samples of the stage's examples (drawn with --seed; the ewc.* estimators and
    normalization, F_t mean-normalized by default so λ keeps EWC's scale), over the parameters that trained in
    the stage; the last stage of the stream estimates nothing, as no task follows. In a single fine-tune the
    method is therefore full fine-tuning. ewc.safetensors (save) is F̃ and θ*, as --ewc.fisher reads them."""

    @dataclass
    class Options:
        lambda_: float = option(0.5, "strength lambda in lambda/2 * sum F (theta - theta*)^2 (EWC's scale)")
        gamma: float = option(1.0, "decay of the earlier tasks' Fisher: F <- gamma * F + F_task after each task")
        fisher_samples: int = option(64, "examples of each task used to estimate its Fisher")
        fisher_estimator: str = option("empirical", "Fisher estimator (see ewc.py)", choices=ESTIMATORS)
        fisher_normalize: str = option("mean", "Fisher normalization (see ewc.py)", choices=NORMALIZATIONS)

        def __post_init__(self):
            check_all([(self.lambda_ >= 0, "--online-ewc.lambda must be >= 0"),
                       (0 <= self.gamma <= 1, "--online-ewc.gamma must be in [0, 1]"),
                       (self.fisher_samples >= 1, "--online-ewc.fisher-samples must be >= 1"),
                       (self.fisher_estimator in ESTIMATORS,
                        f"--online-ewc.fisher-estimator must be one of {', '.join(ESTIMATORS)}"),
                       (self.fisher_normalize in NORMALIZATIONS,
                        f"--online-ewc.fisher-normalize must be one of {', '.join(NORMALIZATIONS)}")])

    def __init__(self, groups: dict | None = None):
        super().__init__(groups)
        self.ewc: EWC | None = None  # F̃ and θ*, from the end of the first task on
        self.pending: dict[str, torch.Tensor] = {}  # a checkpoint's F̃ and θ*, loaded before the model is known
        self.model = None
        self.run = None

    def check(self, model, run):
        if run.fsdp and run.stages > 1:
            raise ForgetlabError("--method online-ewc under --fsdp: the Fisher estimated after each task needs the "
                                 "unsharded model; run the stream with DDP")

    def setup(self, model, run):
        self.run = run

    def configure(self, model):
        self.model = model
        if self.ewc is not None and self.ewc.model is not model:  # a stage on another model object: follow it
            self.pending, self.ewc = self.ewc.state_dict(), None
        if self.pending:
            self.ewc, self.pending = self.restore(model, self.pending), {}

    def restore(self, model, state: dict) -> EWC:
        """An EWC over the model's trainable parameters holding F̃ and θ* of `state` (EWC.state_dict's names)."""
        o = self.options
        fisher = {k.removeprefix("fisher."): t for k, t in state.items() if k.startswith("fisher.")}
        ewc = EWC(model, fisher, lam=o.lambda_, gamma=o.gamma, source="method 'online-ewc': the saved state")
        ewc.load_state_dict(state, "method 'online-ewc': the saved state")
        return ewc

    def add_gradient(self, model, step):
        if self.ewc is None:  # the first task: nothing to remember yet
            return None
        return self.ewc.add_penalty_grad_(model)

    def finish(self, model):
        run, o = self.run, self.options
        if run is None or run.stage >= run.stages - 1:  # the stream's last task (or a single fine-tune)
            return
        # F_t at θ*_t, on the stage's own examples, of the parameters that trained in it
        fisher = estimate_general_fisher(model, dataclasses.replace(run, general=run.domain), o)
        if self.ewc is None:
            self.ewc = EWC(model, fisher, lam=o.lambda_, gamma=o.gamma)  # F̃ = F_0, θ* = the current weights
        else:
            self.ewc.consolidate(model, fisher)  # F̃ ← γ·F̃ + F_t, θ* ← the current weights
        self.ewc.metadata.update(estimator=o.fisher_estimator, normalize=o.fisher_normalize,
                                 n_examples=str(min(o.fisher_samples, len(run.domain))),
                                 tasks_consolidated=str(run.stage + 1), last_task=str(run.task),
                                 model=str(run.model_name or "SmolLM2-135M-Instruct (default)"))

    def save(self, out):
        """ewc.safetensors: F̃ and θ* after the tasks consolidated so far (`--ewc.fisher` reads it)."""
        if self.ewc is not None:
            self.ewc.save(Path(out) / "ewc.safetensors")

    def state_dict(self):
        return {**super().state_dict(), **(self.ewc.state_dict() if self.ewc is not None else self.pending)}

    def load_state_dict(self, state):
        """F̃ and θ* ("fisher.<name>", "anchor.<name>"); on a fresh instance they wait for the next configure,
        which knows the model."""
        super().load_state_dict(state)
        unknown = [k for k in state if not k.startswith(("fisher.", "anchor."))]
        if unknown:
            raise ForgetlabError(f"method 'online-ewc': the saved state holds an unknown tensor {unknown[0]}")
        if self.ewc is not None:
            self.ewc.load_state_dict(state, "method 'online-ewc': the saved state")
        elif self.model is not None and state:
            self.ewc = self.restore(self.model, state)
        else:
            self.pending = {k: t.detach().clone() for k, t in state.items()}
