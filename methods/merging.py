"""Task-vector merging after one fine-tune, the common part of `ties` and `dare` (one file each).

Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"): the fine-tune's task vector is
τ = θ_ft − θ₀, and a merged model is θ₀ + λ·merge(τ). The saved model, the run's "after", is the merge with the
method's own options; each further setting of `--NAME.settings` is evaluated from the same run, as wise-ft's
alphas are. In a task stream θ₀ is the start of each stage (the previous task's model). Memory: θ₀ and θ_ft,
two copies of the weights, as wise-ft."""
import torch

from distributed import distribute_like, full
from errors import ForgetlabError

from .base import Method


def parse_settings(text: str, flag: str, names: tuple[str, str]) -> list[tuple[float, float]]:
    """"0.2:1,0.5:0.8" -> [(0.2, 1.0), (0.5, 0.8)]: comma-separated pairs of the two numbers `names`."""
    pairs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            a, b = (float(x) for x in part.split(":"))
        except ValueError:
            raise ForgetlabError(f"{flag} {part!r}: expected {names[0]}:{names[1]}, e.g. 0.2:1") from None
        pairs.append((a, b))
    return pairs


class TaskVectorMerge(Method):
    """θ = θ₀ + λ·merge(θ_ft − θ₀) over every trainable parameter, after training. A subclass names its `knob`
    and defines `merge(index, tau, setting)`, setting = (knob's value, λ)."""

    param_state = ("theta0",)
    knob = ""  # the option each setting pairs with λ: "density" (ties), "drop" (dare); Options has it and lambda_

    def settings(self) -> list[tuple[tuple, str]]:
        """[((knob, λ), label)]: the options' own pair first (the saved model), then --NAME.settings' pairs."""
        o = self.options
        pairs = [(getattr(o, self.knob), o.lambda_),
                 *parse_settings(o.settings, f"--{self.name}.settings", (self.knob, "lambda"))]
        return [(p, f"{self.knob}={p[0]:g},lambda={p[1]:g}") for p in pairs]

    def merge(self, index: int, tau: torch.Tensor, setting: tuple) -> torch.Tensor:
        """The merged task vector of parameter number `index` (a whole tensor, on every rank alike)."""
        raise NotImplementedError

    def check(self, model, run):
        if run.fsdp and len(self.settings()) > 1:
            raise ForgetlabError(f"--{self.name}.settings under --fsdp: the extra settings are evaluated on rank 0's "
                                 f"gathered model, which holds no θ₀; run them with DDP (the saved setting works)")

    def setup(self, model, run):
        self.seed = run.seed  # DARE's masks: a stream's stages draw their own (run.seed is the stage's)

    def configure(self, model):
        self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def finish(self, model):
        self.params = {n: p for n, p in model.named_parameters() if n in self.theta0}
        self.theta_ft = {n: p.detach().clone() for n, p in self.params.items()}
        self.apply(self.settings()[0][0])

    @torch.no_grad()
    def apply(self, setting: tuple):
        """Put θ₀ + λ·merge(τ) into the model. Under FSDP2 each tensor is gathered, merged whole (a trim by
        magnitude ranks the whole tensor, not a shard) and laid out again: every rank calls the same collectives."""
        for i, (n, p) in enumerate(self.params.items()):
            theta0 = full(self.theta0[n])
            merged = theta0 + self.merge(i, full(self.theta_ft[n]) - theta0, setting)
            p.copy_(distribute_like(merged.to(p.dtype), p))

    def variants(self, model):
        return {label: (lambda s=s: self.apply(s)) for s, label in self.settings()[1:]}
