"""LoRA as a mitigation: train low-rank adapters on frozen weights (the adapters themselves are in ../lora.py)."""
from dataclasses import dataclass

from lora import apply_lora, find_targets, is_lora_param, lora_modules

from .base import Method, check_all, option, register


@register("lora")
class LoRA(Method):
    """Train low-rank adapters on frozen weights (Hu et al. 2021). Biderman et al. 2024, "LoRA Learns Less
    and Forgets Less": a constrained update forgets less at a similar target-domain gain."""

    defaults = {"lr": 1e-3}

    @dataclass
    class Options:
        r: int = option(16, "LoRA rank")
        alpha: float = option(32.0, "LoRA alpha (the update is scaled by alpha / r)")
        dropout: float = option(0.1, "dropout on the LoRA path's input")
        targets: str = option("q_proj,v_proj", "comma-separated module names that get LoRA adapters")

        def __post_init__(self):
            check_all([(self.r >= 1, "--lora.r must be >= 1"),
                       (0 <= self.dropout < 1, "--lora.dropout must be in [0, 1)")])

    def configure(self, model):
        apply_lora_options(model, self.groups["lora"])


def lora_targets(o) -> tuple[str, ...]:
    """The module names of --lora.targets (a LoRA.Options `o`)."""
    return tuple(t.strip() for t in o.targets.split(",") if t.strip())


def apply_lora_options(model, o):
    """apply_lora with the lora.* options `o` (a LoRA.Options). On a model that has adapters already (a later
    stage of a task stream) the same adapters train on: sequential LoRA, every other weight frozen again."""
    if lora_modules(model):
        for n, p in model.named_parameters():
            p.requires_grad_(is_lora_param(n))
        return
    apply_lora(model, r=o.r, alpha=o.alpha, dropout=o.dropout, targets=lora_targets(o))


def check_lora_targets(method, model):
    """--lora.targets of a method that reads the lora options, against this model's layers, before anything slow
    (the adapters are added only after the "before" evaluation and the method's setup)."""
    if "lora" in method.groups:
        find_targets(model, lora_targets(method.groups["lora"]))
