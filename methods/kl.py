"""KL to the base model's next-token distribution (Learning without Forgetting)."""
import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import batches_by_length
from distributed import is_sharded, local
from lora import lora_disabled
from model.llama import IGNORE_INDEX

from .base import Method, check_all, option, register
from .lora import apply_lora_options


@register("kl")
class KLToBase(Method):
    """Learning without Forgetting (Li & Hoiem 2017), in the form of the KL-to-reference term of recent LLM
    fine-tuning recipes: keep the fine-tuned model's next-token distribution close to the base model's on
    general prompts,

        loss += β · 1/N Σ_t KL(p_base(·|x<t) ‖ p_θ(·|x<t)),     p = softmax(logits / T)

    averaged over the N labelled (answer) positions t of one batch of --general-data per step (the batches in a
    fixed order, cycled; --kl.data domain uses the domain set's prompts instead). The base distribution comes
    from the frozen model without a second full copy where possible:
      adapters-off  a LoRA run (--kl.lora): the same model with its adapters switched off (lora_disabled)
      cache         full fine-tuning: the base model's top-k tokens and logits at every position, computed once
                    before training; the KL is then taken over those k tokens, both distributions renormalized
                    on them (exact as k → vocabulary; 0 when p_θ = p_base, as the full KL)
      copy          full fine-tuning: a frozen copy of the base model, one extra forward per step
    --kl.teacher auto picks adapters-off for a LoRA run and cache otherwise (BENCHMARKS.md: cache cost the least
    time and memory on the default model). Cost: a forward and backward of one general batch per step."""

    needs_general_data = True
    uses = ("lora",)

    @dataclass
    class Options:
        beta: float = option(0.1, "beta in beta * KL(p_base || p_theta)")
        temperature: float = option(1.0, "T: both distributions are softmax(logits / T)")
        data: str = option("general", "the prompts the KL is taken on: general (--general-data) or domain (--data)",
                           choices=("general", "domain"))
        teacher: str = option("auto", "where p_base comes from (see methods/kl.py): auto = adapters-off with "
                                      "--kl.lora, else cache", choices=("auto", "adapters-off", "cache", "copy"))
        top_k: int = option(64, "tokens kept per position by the cache teacher")
        lora: bool = option(False, "train LoRA adapters (the lora.* options) instead of every weight")

        def __post_init__(self):
            check_all([(self.beta >= 0, "--kl.beta must be >= 0"),
                       (self.temperature > 0, "--kl.temperature must be > 0"),
                       (self.top_k >= 1, "--kl.top-k must be >= 1"),
                       (self.teacher != "adapters-off" or self.lora, "--kl.teacher adapters-off needs --kl.lora")])

    @property
    def teacher(self) -> str:
        o = self.options
        return o.teacher if o.teacher != "auto" else ("adapters-off" if o.lora else "cache")

    def setup(self, model, run):
        examples = run.domain if self.options.data == "domain" else run.general
        self.batches = batches_by_length(examples, run.batch_size, run.pad_id, seed=run.seed)
        # step s uses batch s mod len: a shorter run never reaches the rest (nor needs their cache)
        self.batches = self.batches[:run.total_steps]
        if self.teacher == "copy":
            self.base = copy.deepcopy(model).eval().requires_grad_(False)
        elif self.teacher == "cache":
            with torch.no_grad():
                self.cache = [self.top_k(self.logits(model, b)) for b in self.batches]

    def configure(self, model):
        if self.options.lora:
            apply_lora_options(model, self.groups["lora"])

    def logits(self, model, batch) -> torch.Tensor:
        """(N, vocab) float32 logits / T at the batch's N labelled positions (where the next token is an answer
        token): lm_head only there, so the whole (B, T, vocab) tensor is never built."""
        device = local(model.lm_head.weight).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        where = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device)
        if is_sharded(model):  # FSDP2 gathers the weights inside forward only: all (B, T, vocab) logits, then N
            return model(ids, attention_mask=mask)[:, :-1][where].float() / self.options.temperature
        h = model.hidden(ids, attention_mask=mask)[:, :-1][where]
        return model.lm_head(h).float() / self.options.temperature

    def top_k(self, logits) -> tuple:
        """(values, indices) (N, k): the k largest logits / T at each position, i.e. the top-k tokens. Logits,
        not log-probs, are kept: renormalized on the k tokens both give the same distribution, and the student's
        is then computed by the very same operations, so the KL is exactly 0 at the start."""
        return logits.topk(min(self.options.top_k, logits.shape[-1]), dim=-1)

    def kl(self, model, step: int) -> torch.Tensor:
        """1/N Σ_t KL(p_base ‖ p_θ) on the batch of optimizer step `step`, differentiable in θ."""
        i = step % len(self.batches)
        batch = self.batches[i]
        student = self.logits(model, batch)
        if self.teacher == "cache":
            values, index = self.cache[i]
            log_q = torch.log_softmax(values, -1)  # both renormalized on the teacher's top k
            log_p = torch.log_softmax(student.gather(-1, index), -1)
        else:
            adapters_off = self.teacher == "adapters-off"
            with torch.no_grad(), (lora_disabled(model) if adapters_off else contextlib.nullcontext()):
                teacher = self.logits(model if adapters_off else self.base, batch)
            log_q, log_p = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
        return F.kl_div(log_p, log_q, log_target=True, reduction="sum") / student.shape[0]

    def extra_loss(self, model, step):
        return self.options.beta * self.kl(model, step)


