"""A-GEM: project the step's gradient off the direction that would raise the loss on a memory of examples."""
import contextlib
import random
from dataclasses import dataclass

import torch

from data import batches_by_length
from distributed import full
from errors import ForgetlabError

from .base import Method, check_all, option, register


def project(g: list[torch.Tensor], g_ref: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """A-GEM's projection of the gradient g (a list of tensors, one vector) against the memory's g_ref:

        g̃ = g − (gᵀg_ref / g_refᵀg_ref) · g_ref   if gᵀg_ref < 0 (the step would raise the memory's loss)
        g̃ = g                                     otherwise

    so that g̃ᵀg_ref ≥ 0: to first order the step does not increase the loss on the memory. Returns (g̃, whether
    it projected). Under FSDP2 the tensors are shards and each dot product is summed over the ranks (`full`)."""
    dot = sum(float(full((a * b).sum())) for a, b in zip(g, g_ref))
    if dot >= 0:
        return g, False
    ref_sq = sum(float(full((b * b).sum())) for b in g_ref)
    return [a - (dot / ref_sq) * b for a, b in zip(g, g_ref)], True


@register("a-gem")
class AGEM(Method):
    """Averaged GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM", ICLR): full fine-tuning in
    which each step's gradient g is compared with the gradient g_ref of the loss on a batch of a fixed memory of
    --a-gem.memory general examples (drawn by the seed from --general-data; one batch of --batch-size per step,
    in a fixed order, cycled), and projected (`project`) when the two conflict. Cost: a forward and backward of
    one memory batch per step. The logged extra_loss is the memory batch's loss.

    In a task stream, --a-gem.source earlier-tasks is the paper's episodic memory instead: --a-gem.memory
    examples of each finished task, drawn by the stage's seed from its training examples when its stage begins,
    and each stage's g_ref comes from the memory of the tasks before it (the first stage has none: plain full
    fine-tuning). The memory is kept in the method's state, so a resumed stream has it."""

    needs_general_data = True

    @dataclass
    class Options:
        memory: int = option(64, "examples kept as the memory (per earlier task with --a-gem.source "
                                 "earlier-tasks), drawn by the seed")
        source: str = option("general", "the memory's examples: general (--general-data) or, in a task stream, "
                                        "earlier-tasks", choices=("general", "earlier-tasks"))

        def __post_init__(self):
            check_all([(self.memory >= 1, "--a-gem.memory must be >= 1")])

    def check(self, model, run):
        if self.options.source == "earlier-tasks" and run.stages == 1:
            raise ForgetlabError("--a-gem.source earlier-tasks: for a task stream (stream.py); one fine-tune has no "
                                 "earlier task")

    def setup(self, model, run):
        if self.options.source == "general":
            rows = random.Random(run.seed).sample(range(len(run.general)),
                                                  min(self.options.memory, len(run.general)))
            memory = [run.general[i] for i in sorted(rows)]
        else:  # the tasks before this stage; then this stage's draw joins the memory for the next ones
            memory = list(getattr(self, "episodic", []))
            rows = random.Random(run.seed).sample(range(len(run.domain)), min(self.options.memory, len(run.domain)))
            self.episodic = memory + [dict(input_ids=list(run.domain[i]["input_ids"]),
                                           labels=list(run.domain[i]["labels"])) for i in sorted(rows)]
        self.batches = batches_by_length(memory, run.batch_size, run.pad_id, seed=run.seed) if memory else []

    def state_dict(self):
        """With the episodic memory: its examples' ids and labels, flat, and their lengths."""
        state = super().state_dict()
        episodic = getattr(self, "episodic", [])
        if episodic:
            state["episodic.input_ids"] = torch.tensor([t for e in episodic for t in e["input_ids"]])
            state["episodic.labels"] = torch.tensor([t for e in episodic for t in e["labels"]])
            state["episodic.lengths"] = torch.tensor([len(e["input_ids"]) for e in episodic])
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "episodic.lengths" in state:
            ids, labels = state["episodic.input_ids"].tolist(), state["episodic.labels"].tolist()
            self.episodic, start = [], 0
            for n in state["episodic.lengths"].tolist():
                self.episodic.append(dict(input_ids=ids[start:start + n], labels=labels[start:start + n]))
                start += n

    def add_gradient(self, model, step):
        if not self.batches:  # the first stage of an earlier-tasks stream: nothing to protect yet
            return None
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        g = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None
        batch = self.batches[step % len(self.batches)]
        device = params[0].device
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())
        with autocast:
            loss = model(batch["input_ids"].to(device), labels=batch["labels"].to(device),
                         attention_mask=batch["attention_mask"].to(device))
        loss.backward()  # the same batch on every rank: the averaged g_ref is that batch's
        g_ref = [p.grad for p in params]
        new, _ = project(g, g_ref)
        for p, x in zip(params, new):
            p.grad = x
        return loss.detach()
