"""L2 to the initial weights (L2-SP)."""
from dataclasses import dataclass

import torch

from .base import Method, check_all, option, register


@register("l2-init")
class L2Init(Method):
    """L2-SP (Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
    Networks"): pull every trainable weight toward its pretrained value θ₀,

        penalty(θ) = λ/2 · Σ_i (θ_i − θ₀_i)²          gradient: λ · (θ − θ₀)

    This is EWC with F ≡ 1, and on EWC's scale: a mean-normalized Fisher (--ewc.fisher-normalize mean, the
    default) averages 1 per weight, so at the same λ both penalties put the same total weight on a uniform
    displacement, and "ewc vs l2-init at one λ" isolates what the Fisher's distribution over weights adds.
    The gradient is added into .grad in place (add_gradient), so no autograd graph over the model is built."""

    param_state = ("theta0",)  # laid out like the parameters under FSDP2, and checkpointed

    @dataclass
    class Options:
        lambda_: float = option(0.5, "strength lambda in lambda/2 * sum (theta - theta_0)^2 (EWC's scale)")

        def __post_init__(self):
            check_all([(self.lambda_ >= 0, "--l2-init.lambda must be >= 0")])

    def configure(self, model):
        self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def add_gradient(self, model, step):
        lam, total = self.options.lambda_, 0.0
        for n, p in model.named_parameters():
            if n in self.theta0:
                delta = p - self.theta0[n]
                total = total + delta.pow(2).sum(dtype=torch.float32)
                if p.grad is None:
                    p.grad = delta.mul_(lam)
                else:
                    p.grad.add_(delta, alpha=lam)
        return total * (lam / 2)
