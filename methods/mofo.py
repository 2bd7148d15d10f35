"""MoFO: the momentum-filtered AdamW, and the method that trains with it."""
import math
from dataclasses import dataclass

import torch

from distributed import full, is_dtensor, local

from .base import Method, check_all, option, register


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
            check_all([(0 < self.fraction <= 1, "--mofo.fraction must be in (0, 1]")])

    def optimizer(self, param_groups, lr, betas, fused):
        return MoFOOptimizer(param_groups, lr=lr, betas=betas, fraction=self.options.fraction)
