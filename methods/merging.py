"""Task-vector merging after one fine-tune, the common part of `ties` and `dare` (one file each).

Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"): the fine-tune's task vector is
τ = θ_ft − θ₀, and a merged model is θ₀ + λ·merge(τ). The saved model, the run's "after", is the merge with the
method's own options; each further setting of `--NAME.settings` is evaluated from the same run, as wise-ft's
alphas are. Memory: θ₀ and θ_ft, two copies of the weights, as wise-ft.

In a task stream θ₀ is the start of each stage (the previous task's model): each stage's own update is merged at
its end. With `--NAME.across-stages` the stages instead train one after another unmerged, each keeping its task
vector τ_k = θ_k − θ_{k−1}, and after the last one the stream's model is θ_start + λ·merge(τ_1, ..., τ_T): the
task vectors of the stages merged once (for ties, the multi-task TIES merge of the paper). That keeps one more
copy of the weights per stage."""
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
    and defines `merge(index, taus, setting)`, setting = (knob's value, λ); its Options have `across_stages`."""

    param_state = ("theta0", "stream_start", "stage_updates")  # the last two: --NAME.across-stages in a stream
    knob = ""  # the option each setting pairs with λ: "density" (ties), "drop" (dare); Options has it and lambda_

    def settings(self) -> list[tuple[tuple, str]]:
        """[((knob, λ), label)]: the options' own pair first (the saved model), then --NAME.settings' pairs."""
        o = self.options
        pairs = [(getattr(o, self.knob), o.lambda_),
                 *parse_settings(o.settings, f"--{self.name}.settings", (self.knob, "lambda"))]
        return [(p, f"{self.knob}={p[0]:g},lambda={p[1]:g}") for p in pairs]

    def merge(self, index: int, taus: list[torch.Tensor], setting: tuple) -> torch.Tensor:
        """The merged task vector of parameter number `index` from its task vectors (one per merged fine-tune;
        whole tensors, on every rank alike)."""
        raise NotImplementedError

    def check(self, model, run):
        if run.fsdp and len(self.settings()) > 1:
            raise ForgetlabError(f"--{self.name}.settings under --fsdp: the extra settings are evaluated on rank 0's "
                                 f"gathered model, which holds no θ₀; run them with DDP (the saved setting works)")
        if self.options.across_stages and run.stages == 1:
            raise ForgetlabError(f"--{self.name}.across-stages: for a task stream (stream.py); one fine-tune has one "
                                 f"task vector")

    def setup(self, model, run):
        self.seed = run.seed  # DARE's masks: a stream's stages draw their own (run.seed is the stage's)
        self.stage, self.stages = run.stage, run.stages

    def configure(self, model):
        self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if not hasattr(self, "stage_updates"):  # a resumed stream's are restored by load_state_dict
            self.stream_start, self.stage_updates = {}, {}
        if self.options.across_stages and self.stage == 0:
            self.stream_start = {n: t.clone() for n, t in self.theta0.items()}

    @torch.no_grad()
    def finish(self, model):
        self.params = {n: p for n, p in model.named_parameters() if n in self.theta0}
        self.theta_ft = {n: p.detach().clone() for n, p in self.params.items()}
        if self.options.across_stages:  # keep this stage's task vector; merge them all after the last stage
            self.stage_updates.update({f"{self.stage}/{n}": self.theta_ft[n] - self.theta0[n] for n in self.params})
            if self.stage < self.stages - 1:
                return
        self.apply(self.settings()[0][0])

    def task_vectors(self, n: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(θ₀, [τ]) of parameter n: this fine-tune's, or with --NAME.across-stages the stream's start and every
        stage's task vector."""
        if self.options.across_stages:
            return full(self.stream_start[n]), [full(self.stage_updates[f"{k}/{n}"]) for k in range(self.stages)]
        theta0 = full(self.theta0[n])
        return theta0, [full(self.theta_ft[n]) - theta0]

    @torch.no_grad()
    def apply(self, setting: tuple):
        """Put θ₀ + λ·merge(τ, ...) into the model. Under FSDP2 each tensor is gathered, merged whole (a trim by
        magnitude ranks the whole tensor, not a shard) and laid out again: every rank calls the same collectives."""
        for i, (n, p) in enumerate(self.params.items()):
            theta0, taus = self.task_vectors(n)
            p.copy_(distribute_like((theta0 + self.merge(i, taus, setting)).to(p.dtype), p))

    def variants(self, model):
        return {label: (lambda s=s: self.apply(s)) for s, label in self.settings()[1:]}
