"""O-LoRA: one LoRA adapter per task of a stream, each new one kept orthogonal to the earlier ones."""
import re
from dataclasses import dataclass
from pathlib import Path

import torch

import distributed
from errors import ForgetlabError
from lora import init_lora_a, init_lora_b, lora_modules
from model.checkpoint import write_atomic_safetensors

from .base import Method, check_all, option, register
from .lora import apply_lora_options

STATE_KEY = re.compile(r"(\d+)\.(.+)\.([AB])")  # "<stage>.<LoRA module name>.<A or B>"


@register("o-lora")
class OLoRA(Method):
    """O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning", EMNLP
    Findings): every task t of a stream trains a new LoRA adapter (A_t, B_t), the earlier ones frozen, and the
    new A_t is pulled toward rows orthogonal to the earlier A_s, so each task updates its own input subspace:

        loss = task loss + λ1 · Σ_{s<t} Σ_layers Σ_{j,k} |(A_s A_tᵀ)_{jk}| + λ2 · Σ_layers (‖A_t‖_F + ‖B_t‖_F)

    The paper writes the orthogonality term with squares, Σ_{jk} ((A_s A_tᵀ)_{jk})²; this follows the authors'
    code (cmnfriend/O-LoRA, uie_trainer_lora.py: `torch.abs(torch.mm(lora_A, loranew_A.T)).sum()`, lora_A
    the earlier adapters' A stacked, and `torch.norm(param, p=2)` over the new adapter's tensors), whose
    scripts use λ1 = 0.5, λ2 = 0 for the standard task orders (the defaults here).

    Stage 0 (and a single fine-tune) is plain LoRA (the lora.* options) plus the λ2 term. At a later stage's
    configure the adapter trained in the stage before is kept as method state (clones, never trained again),
    its update folded into the frozen base weight, W ← W + s·B·A (s = alpha / r, in place, the sum taken in
    float32 as merge_lora does), and a fresh adapter initialized as LoRALinear initializes one (A Kaiming-
    uniform, B = 0) trains alone. Folding gives the same forward as keeping the earlier adapters beside the new
    one (Σ_s s·B_s·A_s is linear), exactly in float32 and up to one rounding of W in bf16; it costs no compute
    per step. The model of stage t is therefore W₀ + Σ_{s<t} s·B_s·A_s + s·B_t·A_t: the run's adapter is only
    the last term; olora.safetensors (save) holds the others.

    A stage t ≥ 1 takes the adapter the model carries at its configure as stage t−1's (a model without
    adapters, e.g. a merged one, is taken to have every earlier adapter folded in already)."""

    defaults = {"lr": 1e-3}
    uses = ("lora",)

    @dataclass
    class Options:
        lambda1: float = option(0.5, "weight of the orthogonality term sum_s sum |A_s A_t^T| (earlier adapters' A "
                                     "against the new one's)")
        lambda2: float = option(0.0, "weight of the L2 term ||A_t||_F + ||B_t||_F on the new adapter")

        def __post_init__(self):
            check_all([(self.lambda1 >= 0, "--o-lora.lambda1 must be >= 0"),
                       (self.lambda2 >= 0, "--o-lora.lambda2 must be >= 0")])

    def __init__(self, groups: dict | None = None):
        super().__init__(groups)
        self.earlier: dict[str, torch.Tensor] = {}  # {"<stage>.<module>.A" / ".B": the frozen earlier adapters}
        self.stacked: dict[str, torch.Tensor] = {}  # {module: the earlier A_s stacked, (Σ_s r_s, in)}
        self.run = None

    def check(self, model, run):
        if run.fsdp and (run.stages > 1 or self.options.lambda2 > 0):
            raise ForgetlabError("--method o-lora under --fsdp: only plain LoRA (a single fine-tune with "
                                 "--o-lora.lambda2 0) is supported; the penalties are not computed on FSDP2 shards")

    def setup(self, model, run):
        self.run = run

    @torch.no_grad()
    def configure(self, model):
        stage = self.run.stage if self.run is not None else 0
        if stage > 0:
            for name, m in lora_modules(model).items():  # the previous stage's adapter: kept, folded, replaced
                self.earlier[f"{stage - 1}.{name}.A"] = m.lora_A.weight.detach().clone()
                self.earlier[f"{stage - 1}.{name}.B"] = m.lora_B.weight.detach().clone()
                m.weight.copy_(m.merged_weight())  # W ← W + s·B·A
                init_lora_a(m.lora_A.weight)
                init_lora_b(m.lora_B.weight)
        apply_lora_options(model, self.groups["lora"])  # only the (new) adapters train
        modules = lora_modules(model)
        for s in self.stages():
            held = {k.removeprefix(f"{s}.")[:-2] for k in self.earlier if k.startswith(f"{s}.") and k.endswith(".A")}
            if held != set(modules):
                raise ForgetlabError(f"--method o-lora: the adapter of stage {s} was on other modules than this "
                                     f"stage's (--lora.targets changed within the stream?)")
        device = next(iter(modules.values())).lora_A.weight.device
        self.earlier = {k: t.to(device) for k, t in self.earlier.items()}  # a checkpoint's are read on the CPU
        self.stacked = {name: torch.cat([self.earlier[f"{s}.{name}.A"] for s in self.stages()])
                        for name in modules} if self.earlier else {}

    def stages(self) -> list[int]:
        """The earlier stages whose adapters are held, in order."""
        return sorted({int(STATE_KEY.fullmatch(k).group(1)) for k in self.earlier})

    def extra_loss(self, model, step):
        o = self.options
        orthogonal, l2 = [], []
        for name, m in lora_modules(model).items():
            A, B = m.lora_A.weight, m.lora_B.weight
            if o.lambda1 > 0 and name in self.stacked:  # Σ_s Σ_jk |(A_s A_tᵀ)_jk|, every A_s at once
                orthogonal.append(torch.abs(self.stacked[name] @ A.T).sum())
            if o.lambda2 > 0:
                l2.append(torch.linalg.norm(A) + torch.linalg.norm(B))
        terms = ([o.lambda1 * sum(orthogonal[1:], orthogonal[0])] if orthogonal else []) + \
                ([o.lambda2 * sum(l2[1:], l2[0])] if l2 else [])
        return sum(terms[1:], terms[0]) if terms else None

    def save(self, out):
        """olora.safetensors: every earlier adapter's A and B ("<stage>.<module>.A"), when there is one; with the
        run's adapter they give the model (class docstring)."""
        if not self.earlier or not distributed.is_main():
            return
        lo = self.groups["lora"]
        meta = dict(stages=",".join(map(str, self.stages())), r=str(lo.r), alpha=str(lo.alpha),
                    scale=str(lo.alpha / lo.r), update="W0 + sum_s scale * B_s @ A_s",
                    lambda1=str(self.options.lambda1), lambda2=str(self.options.lambda2))
        write_atomic_safetensors(Path(out) / "olora.safetensors",
                                 {k: t.detach().cpu().contiguous() for k, t in self.earlier.items()}, meta)

    def state_dict(self):
        return {**super().state_dict(), **self.earlier}

    @torch.no_grad()
    def load_state_dict(self, state):
        """The earlier adapters of a checkpoint, taken as they are (a fresh instance, before the next stage's
        configure, gets them all); the state must hold every adapter this instance already holds."""
        super().load_state_dict(state)
        unknown = [k for k in state if not STATE_KEY.fullmatch(k)]
        missing = [k for k in self.earlier if k not in state]
        unpaired = [k for k in state if k[-1] in "AB" and k[:-1] + ("B" if k[-1] == "A" else "A") not in state]
        for bad, what in ((unknown, "holds an unknown tensor"), (missing, "lacks"), (unpaired, "lacks the pair of")):
            if bad:
                raise ForgetlabError(f"method 'o-lora': the saved state {what} {bad[0]}")
        self.earlier = {k: t.detach().clone() for k, t in state.items()}
