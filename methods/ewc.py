"""Elastic weight consolidation as a mitigation (the Fisher, its estimators and the penalty are in ../ewc.py)."""
import random
from dataclasses import dataclass
from pathlib import Path

import torch

import distributed
from data import batches_by_length
from ewc import EWC, estimate_fisher

from .base import Method, check_all, option, register


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
            check_all([(self.lambda_ >= 0, "--ewc.lambda must be >= 0"),
                       (self.fisher_samples >= 1, "--ewc.fisher-samples must be >= 1"),
                       (self.gamma is None or 0 <= self.gamma <= 1, "--ewc.gamma must be in [0, 1]"),
                       (self.gamma is None or self.fisher,
                        "--ewc.gamma needs --ewc.fisher: the previous task's EWC state to decay"),
                       (not self.fisher or Path(self.fisher).is_file(), f"--ewc.fisher {self.fisher}: file not found")])

    def check(self, model, run):
        o = self.options
        if o.fisher:  # read (again) in setup; a file that does not fit the model fails here, in seconds
            EWC.load(o.fisher, model, lam=o.lambda_, gamma=o.gamma)

    def setup(self, model, run):
        o = self.options
        dtype = getattr(torch, o.dtype)
        if o.fisher:  # one expensive estimate reused across runs; its anchor stays where it was estimated
            self.ewc = EWC.load(o.fisher, model, lam=o.lambda_, gamma=o.gamma, dtype=dtype)
            if o.gamma is None:
                return
        fisher = estimate_general_fisher(model, run, o)
        if o.fisher:  # online EWC: this run's weights are the last task's solution
            self.ewc.consolidate(model, fisher)
            self.ewc.metadata["consolidated_from"] = str(o.fisher)
        else:
            self.ewc = EWC(model, fisher, lam=o.lambda_, dtype=dtype)
        self.ewc.metadata.update(estimator=o.fisher_estimator, normalize=o.fisher_normalize,
                                 data=str(run.general_data), n_examples=str(min(o.fisher_samples, len(run.general))),
                                 model=str(run.model_name or "SmolLM2-135M-Instruct (default)"))

    def add_gradient(self, model, step):
        # the gradient λ·F·(θ − θ*) written into .grad in place: backpropagating penalty() would allocate a fresh
        # gradient for every parameter each step (BENCHMARKS.md: the EWC step's cost)
        return self.ewc.add_penalty_grad_(model)

    def save(self, out):
        """ewc.safetensors: the Fisher and anchor this run used, with metadata; `--ewc.fisher` reads it back."""
        self.ewc.save(Path(out) / "ewc.safetensors")

    def state_dict(self):
        return self.ewc.state_dict()

    def load_state_dict(self, state):
        self.ewc.load_state_dict(state)


def estimate_general_fisher(model, run, o) -> dict:
    """The diagonal Fisher of the model's trainable parameters on --ewc.fisher-samples general examples drawn
    with --seed (so that an interval over seeds includes the estimate's sampling variance), with the ewc.*
    estimator and normalization `o`."""
    sample = random.Random(run.seed).sample(run.general, min(o.fisher_samples, len(run.general)))
    # the "batch" estimator squares each batch's mean gradient, so its value depends on the batch size
    batches = batches_by_length(sample, run.batch_size, run.pad_id, seed=run.seed)
    # under torchrun each rank sums its own rows of every batch and the sums are all-reduced (distributed.py)
    return estimate_fisher(model, distributed.fisher_share(batches), estimator=o.fisher_estimator,
                           normalize=o.fisher_normalize, progress=distributed.is_main(), seed=run.seed,
                           all_ranks=True)
