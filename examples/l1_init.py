"""L1-to-init: lambda * sum |theta - theta_0|, which lets a few weights move far rather than many a little."""
from dataclasses import dataclass

from methods import Method, option, register


@register("l1-init")
class L1Init(Method):
    defaults = {"lr": 1e-4}
    param_state = ("theta0",)  # {parameter name: tensor}: sharded like the parameters, saved in checkpoints

    @dataclass
    class Options:
        strength: float = option(1e-4, "lambda in lambda * sum |theta - theta_0|")

    def configure(self, model):
        self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def extra_loss(self, model, step):
        return self.options.strength * sum((p - self.theta0[n]).abs().sum()
                                           for n, p in model.named_parameters() if n in self.theta0)
