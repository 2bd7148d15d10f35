"""EWC on the effective update of a LoRA run."""

import torch

from distributed import is_dtensor, local
from errors import ForgetlabError
from lora import find_targets, lora_modules

from .base import Method, register
from .ewc import estimate_general_fisher
from .lora import apply_lora_options, lora_targets


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
    adapted weights). The penalty is backpropagated (autograd through B·A): (out x in) per adapted layer.
    Under FSDP2 it is computed on this rank's rows of ΔW (A gathered for autograd), which is why this built-in,
    unlike a plug-in, touches DTensor shards: the whole ΔW of every layer would be gathered on every rank."""

    needs_general_data = True
    uses = ("lora", "ewc")

    param_state = ("fisher",)  # {B's parameter name: F of its layer's base weight}: laid out like B under FSDP2

    def check(self, model, run):
        e = self.groups["ewc"]
        if e.fisher or e.gamma is not None:
            raise ForgetlabError("--method ewc-lora estimates its own Fisher of the adapted weights: "
                                 "--ewc.fisher and --ewc.gamma apply to --method ewc only")

    def setup(self, model, run):
        if lora_modules(model):  # a later stage of a task stream: the same adapter trains on, its ΔW still measured
            return               # from the base weights W₀, so the first stage's Fisher of W₀ stays
        names = find_targets(model, lora_targets(self.groups["lora"]))
        weights = {f"{n}.weight" for n in names}
        for n, p in model.named_parameters():  # the Fisher of the adapted base weights only
            p.requires_grad_(n in weights)
        try:
            fisher = estimate_general_fisher(model, run, self.groups["ewc"])
        finally:
            model.requires_grad_(True)
        dtype = getattr(torch, self.groups["ewc"].dtype)
        # keyed by the adapter's B, which FSDP2 shards by rows as it shards ΔW = s·B·A: each rank then holds
        # the rows of F that its rows of ΔW meet
        self.fisher = {f"{n}.lora_B.weight": fisher[f"{n}.weight"].to(dtype) for n in names}

    def configure(self, model):
        apply_lora_options(model, self.groups["lora"])

    def penalty(self, model) -> torch.Tensor:
        total = 0.0
        for n, m in lora_modules(model).items():
            delta = (local(m.lora_B.weight) @ gathered_for_autograd(m.lora_A.weight)) * m.scale  # ΔW = s·B·A
            total = total + (local(self.fisher[f"{n}.lora_B.weight"]) * delta.square()).sum(dtype=torch.float32)
        total = self.groups["ewc"].lambda_ / 2 * total
        if not is_dtensor(next(iter(self.fisher.values()))):
            return total
        # under FSDP2 each rank holds its rows of ΔW: backpropagate those, report the sum over the ranks
        whole = total.detach().clone()
        torch.distributed.all_reduce(whole)
        return total + (whole - total.detach())

    def extra_loss(self, model, step):
        return self.penalty(model)
