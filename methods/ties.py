"""TIES-merging of the fine-tune's task vector."""
from dataclasses import dataclass

import torch

from .base import check_all, option, register
from .merging import TaskVectorMerge, parse_settings


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """τ with all but its int(density · numel) largest-magnitude entries set to 0 (entries equal to the
    smallest kept magnitude are kept too)."""
    k = int(density * tau.numel())
    if k == 0:
        return torch.zeros_like(tau)
    kth = tau.abs().flatten().topk(k, sorted=False).values.min()
    return tau * (tau.abs() >= kth)


def ties_merge(task_vectors: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS)
    of task vectors τ_1..τ_n of one tensor:

        trim    τ̂_t = τ_t on its top-density fraction of entries by magnitude, 0 elsewhere
        elect   γ = sign(Σ_t τ̂_t)                      (+1 where the sum is 0)
        merge   τ_m = Σ_t τ̂_t·[sign τ̂_t = γ] / max(1, Σ_t [sign τ̂_t = γ])     the disjoint mean

    For one task vector τ_m is its trim: the merged model keeps the largest updates of each tensor."""
    trimmed = torch.stack([trim(t, density) for t in task_vectors])  # (n, ...)
    elected = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agrees = trimmed.sign() == elected  # a trimmed (zero) entry agrees with neither sign
    return (trimmed * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


@register("ties")
class TIES(TaskVectorMerge):
    """Full fine-tuning, then θ = θ₀ + λ·τ_m with τ_m the TIES merge (`ties_merge`) of τ = θ_ft − θ₀, each
    parameter tensor trimmed on its own; with --ties.across-stages in a task stream, the TIES merge of every
    stage's task vector. methods/merging.py says which model is saved and what --ties.settings and a stream do."""

    knob = "density"

    @dataclass
    class Options:
        density: float = option(0.2, "fraction of each tensor's task-vector entries kept (largest magnitude)",
                                resume_may_change=True)
        lambda_: float = option(1.0, "lambda: the merged task vector's scale, theta_0 + lambda * tau_m",
                                resume_may_change=True)
        settings: str = option("", "more density:lambda pairs to evaluate from the same run, comma-separated "
                                   "(e.g. 0.1:1,0.5:1): each its own report section", resume_may_change=True)
        across_stages: bool = option(False, "in a task stream: merge every stage's task vector once, after the "
                                            "last stage, instead of each stage's own at its end")

        def __post_init__(self):
            pairs = [(self.density, self.lambda_), *parse_settings(self.settings, "--ties.settings",
                                                                   ("density", "lambda"))]
            check_all([(all(0 < d <= 1 for d, _ in pairs), "--ties.density (and each of --ties.settings' "
                                                           "densities) must be in (0, 1]")])

    def merge(self, index, taus, setting):
        density, lam = setting
        return lam * ties_merge(taus, density)
