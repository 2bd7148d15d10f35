"""Freeze the bottom of the network."""
from dataclasses import dataclass

from errors import ForgetlabError

from .base import Method, check_all, option, register


@register("freeze")
class Freeze(Method):
    """Freeze the bottom of the network (Zheng et al. 2025, "Spurious Forgetting in Continual Learning of Language
    Models", ICLR): the embeddings and the lowest k decoder layers do not train. Their finding: much of the
    forgetting is a loss of task alignment, carried by updates to the bottom layers, and freezing them (e.g. 6
    of LLaMA-2-7B's 32 layers) keeps it. With tied embeddings (SmolLM2) the frozen embedding is also lm_head."""

    @dataclass
    class Options:
        layers: int = option(3, "k: the embeddings and decoder layers 0 .. k-1 stay frozen")

        def __post_init__(self):
            check_all([(self.layers >= 0, "--freeze.layers must be >= 0")])

    def check(self, model, run):
        n = len(model.model.layers)
        if self.options.layers > n:
            raise ForgetlabError(f"--freeze.layers {self.options.layers}: the model has {n} decoder layers")

    def configure(self, model):
        model.model.embed_tokens.requires_grad_(False)
        for layer in model.model.layers[:self.options.layers]:
            layer.requires_grad_(False)
