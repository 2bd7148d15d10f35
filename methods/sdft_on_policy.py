"""Self-distillation fine-tuning, the on-policy form: the model's own samples, pulled toward itself shown the answer."""
import copy
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from errors import ForgetlabError

from .base import Method, check_all, option, register
from .self_distillation import DemonstrationPrompt, split_example

# The teacher's context: the demonstration shown in the user's turn, or before a plain prompt.
IN_TURN = "\n\nAn example of a response to this question:\n{demonstration}\n\nNow answer with a response of your own."
PREFIX = "An example of a response to the question below:\n{demonstration}\n\n"


@register("sdft-on-policy")
class SDFTOnPolicy(Method):
    """On-policy self-distillation (Shenfeld, Damani, Hübotter & Agrawal 2026, "Self-Distillation Enables
    Continual Learning"). For each training example (x, c), c the demonstration (its answer), the student samples
    its own answer y ~ π_θ(· | x), and the loss pulls its next-token distributions along y toward the same model
    shown c in its context, the teacher π_φ(· | x, c):

        loss = 1/N Σ_t KL(π_θ(· | x, y<t) ‖ π_φ(· | x ⊕ c, y<t))        (--sdft-on-policy.kl reverse, Eq. 1)
        loss = 1/N Σ_t KL(π_φ(· | x ⊕ c, y<t) ‖ π_θ(· | x, y<t))        (forward)

    summed over every answer position t of the micro-batch (N positions; each KL exact over the vocabulary), the
    gradient through the student only. The paper writes the reverse KL, the on-policy objective; the recipes built
    on its code (Tinker's cookbook among them) take the forward KL per token, so both are here. The teacher's
    weights φ (--sdft-on-policy.teacher):
      ema   an exponential moving average of the student's, φ ← φ + α (θ − φ) after every step, from the
            weights at the start (the paper's)
      base  the weights at the start of training (in a task stream: of the stage)
      live  the student's current weights, without gradient
    The samples are drawn at --sdft-on-policy.temperature, each micro-batch from its own seed (the run's seed,
    the step, the rank, the micro-batch), so a resumed run draws the same ones. The logged loss is this KL.
    train.py still weighs each micro-batch by its share of the step's labelled (demonstration) tokens.

    Cost per step: generating the answers token by token, a teacher forward, and the student's forward and
    backward over its samples (BENCHMARKS.md); memory: one more copy of the weights for ema and base. Not under
    --fsdp: each rank samples answers of its own lengths, while FSDP2 gathers weights in lockstep."""

    param_state = ("teacher_weights",)

    @dataclass
    class Options:
        teacher: str = option("ema", "the teacher's weights: ema (of the student's), base (the start's) or live",
                              choices=("ema", "base", "live"))
        ema_rate: float = option(0.01, "alpha in phi <- phi + alpha (theta - phi) after each step (teacher ema)")
        kl: str = option("reverse", "reverse: KL(student || teacher), the paper's; forward: KL(teacher || student)",
                         choices=("reverse", "forward"))
        max_new_tokens: int = option(64, "longest answer the student samples")
        temperature: float = option(1.0, "the student's sampling temperature")

        def __post_init__(self):
            check_all([(0 < self.ema_rate <= 1, "--sdft-on-policy.ema-rate must be in (0, 1]"),
                       (self.max_new_tokens >= 1, "--sdft-on-policy.max-new-tokens must be >= 1"),
                       (self.temperature > 0, "--sdft-on-policy.temperature must be > 0")])

    def check(self, model, run):
        if run.fsdp:
            raise ForgetlabError("--method sdft-on-policy: not with --fsdp (each rank samples answers of its own "
                                 "lengths, while FSDP2 gathers the weights in lockstep); run it under DDP")
        DemonstrationPrompt(run.tokenizer, IN_TURN, PREFIX).check(run.domain, run.tokenizer.stop_ids,
                                                                "--method sdft-on-policy")

    def setup(self, model, run):
        self.run = run
        self.teacher_prompt = DemonstrationPrompt(run.tokenizer, IN_TURN, PREFIX)
        self.teacher = None if self.options.teacher == "live" else copy.deepcopy(model).eval().requires_grad_(False)
        # checkpointed (param_state): the EMA moves; the base teacher is the start's weights again on a resume
        self.teacher_weights = dict(self.teacher.named_parameters()) if self.options.teacher == "ema" else {}

    def sampler(self, step: int, micro: int, device) -> torch.Generator:
        key = f"sdft-on-policy {self.run.seed} {step} {self.run.rank} {micro}".encode()
        return torch.Generator(device).manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))

    def task_loss(self, model, forward, batch, step):
        from model.generate import eval_mode, generate_ids

        tok, device = self.run.tokenizer, batch["input_ids"].device
        self.micro = self.micro + 1 if getattr(self, "micro_step", None) == step else 0
        self.micro_step = step
        rows = [{k: v[i][batch["attention_mask"][i].bool()].tolist() for k, v in batch.items()
                 if k in ("input_ids", "labels")} for i in range(len(batch["input_ids"]))]
        parts = [split_example(r, tok.stop_ids) for r in rows]
        prompts = [p for p, _, _ in parts]
        with eval_mode(model):
            samples = generate_ids(model, prompts, self.options.max_new_tokens, tok.stop_ids, tok.pad_id,
                                   temperature=self.options.temperature,
                                   generator=self.sampler(step, self.micro, device))
        # a sample that stopped gets its end-of-turn token back (generate_ids drops it): ending is learnt too
        answers = [s + ((e or tok.stop_ids[:1]) if len(s) < self.options.max_new_tokens else [])
                   for s, (_, _, e) in zip(samples, parts)]
        student = self.answer_logits(forward, prompts, answers, device)
        teacher_model = model if self.teacher is None else self.teacher
        with eval_mode(teacher_model):  # no gradient: the teacher is a target
            teacher = self.answer_logits(teacher_model, [self.teacher_prompt(p, c) for p, c, _ in parts], answers,
                                         device)
        log_s, log_t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
        if self.options.kl == "reverse":
            return F.kl_div(log_t, log_s, log_target=True, reduction="sum") / len(log_s)
        return F.kl_div(log_s, log_t, log_target=True, reduction="sum") / len(log_s)

    def answer_logits(self, forward, contexts: list, answers: list, device) -> torch.Tensor:
        """(N, vocab) float32 logits predicting each answer token after its context: N = Σ len(answer)."""
        seqs = [c + a for c, a in zip(contexts, answers)]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), self.run.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        where = torch.zeros((len(seqs), T), dtype=torch.bool)  # positions whose next token is an answer token
        for i, (c, s) in enumerate(zip(contexts, seqs)):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
            where[i, len(c) - 1:len(s) - 1] = True
        logits = forward(ids.to(device), attention_mask=mask.to(device))
        return logits[where.to(device)].float()

    def after_step(self, model, step):
        if self.options.teacher == "ema":
            with torch.no_grad():
                for (n, p), phi in zip(model.named_parameters(), self.teacher.parameters()):
                    phi.lerp_(p, self.options.ema_rate)
