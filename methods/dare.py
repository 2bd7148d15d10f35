"""DARE: drop and rescale the fine-tune's task vector."""
from dataclasses import dataclass

import torch

from .base import check_all, option, register
from .merging import TaskVectorMerge, parse_settings


def dare(tau: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
    Free Lunch", ICML): drop each entry of the task vector with probability p and rescale the rest,

        τ̃ = m ⊙ τ / (1 − p),     m_i ~ Bernoulli(1 − p) independently,

    so that E[τ̃] = τ. The mask is drawn on the CPU from `generator`, the same on every rank."""
    keep = torch.rand(tau.shape, generator=generator) >= drop
    return tau * keep.to(tau.device) / (1 - drop)


@register("dare")
class DARE(TaskVectorMerge):
    """Full fine-tuning, then θ = θ₀ + λ·τ̃ with τ̃ DARE's drop-and-rescale (`dare`) of τ = θ_ft − θ₀. The mask
    of parameter number i is drawn from a generator seeded with (--seed, i), so every setting and every rank
    draws the same masks for the same drop rate; with --dare.across-stages in a task stream, θ_start +
    λ·Σ_k DARE(τ_k) over the stages' task vectors, each with its own mask. methods/merging.py says which model is
    saved and what --dare.settings and a stream do."""

    knob = "drop"

    @dataclass
    class Options:
        drop: float = option(0.9, "p: probability of dropping each task-vector entry (the rest scaled by 1/(1-p))",
                             resume_may_change=True)
        lambda_: float = option(1.0, "lambda: the task vector's scale, theta_0 + lambda * tau~",
                                resume_may_change=True)
        settings: str = option("", "more drop:lambda pairs to evaluate from the same run, comma-separated "
                                   "(e.g. 0.5:1,0.99:1): each its own report section", resume_may_change=True)
        across_stages: bool = option(False, "in a task stream: drop and rescale every stage's task vector and add "
                                            "them once, after the last stage, instead of each stage's own at its end")

        def __post_init__(self):
            pairs = [(self.drop, self.lambda_), *parse_settings(self.settings, "--dare.settings", ("drop", "lambda"))]
            check_all([(all(0 <= p < 1 for p, _ in pairs), "--dare.drop (and each of --dare.settings' drop rates) "
                                                           "must be in [0, 1)")])

    def merge(self, index, taus, setting):
        drop, lam = setting
        merged = 0
        for k, tau in enumerate(taus):  # several: each stage's own mask, then task arithmetic's sum
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index + k * 1_000_000_007)
            merged = merged + dare(tau, drop, generator)
        return lam * merged
