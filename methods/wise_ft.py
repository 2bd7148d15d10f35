"""WiSE-FT: interpolate between the start and the fine-tuned weights."""
from dataclasses import dataclass

import torch

from errors import ForgetlabError
from lora import lora_modules

from .base import Method, check_all, option, parse_floats, register
from .lora import apply_lora_options


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
    param_state = ("theta0",)

    @dataclass
    class Options:
        alpha: float = option(0.5, "alpha of the saved model (1 - alpha) * theta_0 + alpha * theta_ft, the run's "
                                   "\"after\"", resume_may_change=True)
        alphas: str = option("", "more alphas to evaluate from the same run, comma-separated (e.g. 0.25,0.5,0.75,1): "
                                 "each its own report section", resume_may_change=True)
        lora: bool = option(False, "train LoRA adapters (the lora.* options) and interpolate those")

        def __post_init__(self):
            check_all([(all(0 <= a <= 1 for a in [self.alpha, *parse_floats(self.alphas, "--wise-ft.alphas")]),
                        "--wise-ft.alpha and --wise-ft.alphas must be in [0, 1]")])

    def check(self, model, run):
        if run.fsdp and self.options.alphas:
            raise ForgetlabError("--wise-ft.alphas under --fsdp: the extra alphas are evaluated on rank 0's gathered "
                                 "model, which holds no θ₀; run them with DDP (the saved --wise-ft.alpha works)")

    def targets(self, model) -> dict:
        """{parameter name: the parameter interpolated}: each adapter's B (a LoRA run), else every trainable one."""
        if self.options.lora:
            return {f"{n}.lora_B.weight": m.lora_B.weight for n, m in lora_modules(model).items()}
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def configure(self, model):
        if self.options.lora:
            apply_lora_options(model, self.groups["lora"])
        self.theta0 = {n: p.detach().clone() for n, p in self.targets(model).items()}  # a LoRA B starts at 0

    @torch.no_grad()
    def finish(self, model):
        self.params = self.targets(model)
        self.theta_ft = {n: p.detach().clone() for n, p in self.params.items()}
        self.interpolate(self.options.alpha)

    @torch.no_grad()
    def interpolate(self, alpha: float):
        for n, p in self.params.items():
            p.copy_(torch.lerp(self.theta0[n], self.theta_ft[n], alpha))

    def variants(self, model):
        return {f"alpha={a:g}": (lambda a=a: self.interpolate(a))
                for a in parse_floats(self.options.alphas, "--wise-ft.alphas")}
