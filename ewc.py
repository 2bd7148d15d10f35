"""Elastic weight consolidation for LLMs: diagonal Fisher estimates, the EWC penalty, online EWC.

EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks") keeps fine-tuning
near what pre-training taught by pulling each weight back toward its old value θ*, in proportion to how much
the old data's loss cares about that weight, measured by the diagonal of the Fisher information F:

    penalty(θ) = λ/2 · Σ_i F_i · (θ_i − θ*_i)²          gradient: λ · F · (θ − θ*)

Online EWC (Schwarz et al. 2018, "Progress & Compress") handles a sequence of tasks with one penalty:
after each task F ← γ·F + F_new and θ* moves to the weights just learned.

    fisher = estimate_fisher(model, general_batches, estimator="empirical", max_examples=512)
    ewc = EWC(model, fisher, lam=0.5)
    loss = model(ids, labels=labels) + ewc.penalty(model)      # or: loss.backward(); ewc.add_penalty_grad_(model)
    ewc.save("fisher.safetensors", {"estimator": "empirical", "data": "general_qa.jsonl", "n_examples": 512})

The Fisher. Example n's loss ℓ_n is the *mean* cross-entropy over its own labelled tokens (labels HF-aligned,
-100 ignored), so every example weighs the same in F whatever its length: a token of a short answer counts
more than a token of a long one, and a long example's squared gradient, an average over many tokens, is
smaller. Three estimators, over N examples:
  empirical  F = 1/N Σ_n (∇ℓ_n)², the squared gradient of each example's own loss on its data labels:
             `fisher_reference` is this definition as a plain loop; `estimate_fisher` computes the same
             numbers in one batched pass (`per_example_grads.py`).
  true       the same with every target token sampled from the model's own predictive distribution, a Monte
             Carlo estimate of the expected Fisher E_x E_{y~p_θ(·|x)}[(∇ log p_θ(y|x))²] (Martens 2020, "New
             insights and perspectives on the natural gradient method"; Kunstner et al. 2019 on why the
             empirical Fisher can differ from it).
  batch      1/K Σ_k (∇L_k)², the square of each batch's mean gradient: the shortcut of many EWC tutorials.
             It is biased: E[(ḡ)²] = (E g)² + Var(g)/B, so it shrinks toward the squared mean gradient
             (≈ 0 near an optimum) as the batch size B grows, and it depends on B. Kept for comparison only.

Normalization, and what λ means. The raw F's scale depends on the model, the data and the loss averaging
above, so a λ tuned on one Fisher means nothing on another. normalize="mean" (the default, here and on the
command line) divides every entry by the mean entry over all tensors: F then averages 1, the relative
importance of weights and layers is kept, and λ/2 is the penalty per unit of squared displacement of a
weight of average importance. "max" divides by the largest entry instead; "none" keeps the raw values.
"""
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from distributed import full, is_dtensor, local
from errors import ForgetlabError, check_names
from model.checkpoint import read_safetensors, write_atomic_safetensors
from model.llama import IGNORE_INDEX
from per_example_grads import Scratch, add_per_example_squares_, per_example_objective

ESTIMATORS = ("empirical", "true", "batch")
NORMALIZATIONS = ("mean", "max", "none")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with requires_grad, by name; a tied weight appears once, under its first name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def zero_sums(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """One zero accumulator per parameter, float32 (float64 for a float64 model): bf16 sums would stall."""
    return {name: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for name, p in params.items()}


# ----------------------------------------------------------------------------------------------------------
# The Fisher: its definition, then the fast estimate


def fisher_reference(model, batches, max_examples: int | None = None) -> dict[str, torch.Tensor]:
    """The empirical Fisher by its definition, unnormalized: one backward per example, each cut to its real
    tokens (no padding at all). Slow; what `estimate_fisher` is tested and benchmarked against."""
    params = trainable_parameters(model)
    acc = zero_sums(params)
    n = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            for i in range(batch["input_ids"].shape[0]):
                if max_examples is not None and n >= max_examples:
                    break
                real = slice(None) if mask is None else mask[i].bool()
                ids, labels = batch["input_ids"][i, real][None], batch["labels"][i, real][None]
                if not (labels[:, 1:] != IGNORE_INDEX).any():
                    continue
                logits = model(ids)[0, :-1]  # (T-1, vocab), in the model's dtype
                loss = F.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE_INDEX)  # ℓ_n: the token mean
                grads = torch.autograd.grad(loss, list(params.values()))
                for name, g in zip(params, grads):
                    g = g.to(acc[name].dtype)
                    acc[name].addcmul_(g, g)
                n += 1
    finally:
        model.train(was_training)
    return {name: a / max(n, 1) for name, a in acc.items()}


def estimate_fisher(model, batches, estimator: str = "empirical", max_examples: int | None = None,
                    normalize: str = "mean", progress: bool = False, seed: int = 0,
                    all_ranks: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the trainable parameters (requires_grad=True), keyed by parameter name, float32
    (float64 for a float64 model).

    `batches` yields dicts with `input_ids` (B, T), `labels` (B, T) aligned with input_ids as in Hugging Face
    (-100 = ignored) and optionally `attention_mask` (B, T) (1 = token, 0 = padding). Padding never counts:
    a pad position's label is ignored and its gradient is zero, and each example's gradient is its own.
    Examples with no labelled token are skipped. `max_examples` stops after that many examples.
    `normalize`: "mean" (default), "max" or "none", see the module docstring. `seed` drives the label
    sampling of estimator="true". The model runs in eval mode (no dropout) and is restored afterwards.

    all_ranks=True (torch.distributed, see distributed.py): `batches` are this rank's share of the examples and
    the result is the Fisher of all ranks' examples together, the same on every rank: each rank sums its own
    per-example squares (the hook path, which never touches p.grad, so no gradient is synchronized), then the
    sums and the example count are all-reduced as a SUM, and divided. Call it on the plain model, before DDP or
    FSDP2 wrap it (`EWC.shard_like` shards the result afterwards). max_examples then counts per rank, and "true"
    draws each rank's labels from seed + rank."""
    if estimator not in ESTIMATORS:
        raise ForgetlabError(f"unknown Fisher estimator {estimator!r} (choose from {', '.join(ESTIMATORS)})")
    if normalize not in NORMALIZATIONS:
        raise ForgetlabError(f"unknown Fisher normalization {normalize!r} (choose from {', '.join(NORMALIZATIONS)})")
    if max_examples is not None and max_examples <= 0:
        raise ForgetlabError(f"max_examples must be positive, got {max_examples}")
    params = trainable_parameters(model)
    if not params:
        raise ForgetlabError("estimate_fisher: the model has no trainable parameter (requires_grad=True)")
    acc = zero_sums(params)
    if all_ranks and dist.is_initialized():
        seed += dist.get_rank()  # "true": independent label samples on each rank
    generator = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
    scratch = Scratch()
    n_examples = n_batches = 0
    was_training = model.training
    model.eval()
    try:
        if progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"fisher ({estimator})", unit="batch")
        for batch in batches:
            if max_examples is not None:
                batch = {k: v[:max_examples - n_examples] for k, v in batch.items()}
            if estimator == "batch":
                n = add_batch_gradient_squares_(model, batch, params, acc)
                n_batches += n > 0
            else:
                n = add_per_example_squares_(model, batch, params, acc, scratch,
                                             generator if estimator == "true" else None)
            n_examples += n
            if max_examples is not None and n_examples >= max_examples:
                break
    finally:
        model.train(was_training)
    if all_ranks and dist.is_initialized():
        n_examples, n_batches = all_reduce_sums_(acc, n_examples, n_batches)
    if n_examples == 0:
        raise ForgetlabError("estimate_fisher: the batches hold no labelled token (every label is -100)")
    denominator = n_batches if estimator == "batch" else n_examples
    fisher = {name: a.div_(denominator) for name, a in acc.items()}
    return normalize_fisher(fisher, normalize)


def all_reduce_sums_(acc: dict[str, torch.Tensor], *counts: int) -> list[int]:
    """Σ over ranks of every accumulator (in place) and of the counts: the Fisher's numerator and denominator.
    A SUM, never DDP's average, and taken of the squares each rank summed itself: the square of an averaged
    gradient, ((g_a + g_b)/2)², is not the mean of the squares."""
    for a in acc.values():
        dist.all_reduce(a, op=dist.ReduceOp.SUM)
    c = torch.tensor(counts, dtype=torch.float64, device=next(iter(acc.values())).device)
    dist.all_reduce(c, op=dist.ReduceOp.SUM)
    return [int(x) for x in c.tolist()]


def normalize_fisher(fisher: dict[str, torch.Tensor], normalize: str) -> dict[str, torch.Tensor]:
    """Divide every entry by the global mean or max over all entries (in place); all-zero stays zero."""
    if normalize == "none":
        return fisher
    if normalize == "mean":
        scale = sum(f.sum(dtype=torch.float64) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    else:
        scale = max(f.max() for f in fisher.values())
    scale = float(scale)
    if scale > 0:
        for f in fisher.values():
            f.div_(scale)
    return fisher


def add_batch_gradient_squares_(model, batch, params, acc) -> int:
    """acc += (∇ of the batch's mean per-example loss)²: the biased "batch" estimator."""
    objective, n = per_example_objective(model, batch)
    if n == 0:
        return 0
    grads = torch.autograd.grad(objective / n, list(params.values()), allow_unused=True)
    for name, g in zip(params, grads):
        if g is not None:
            g = g.to(acc[name].dtype)
            acc[name].addcmul_(g, g)
    return n


# ----------------------------------------------------------------------------------------------------------
# The EWC penalty


class EWC:
    """EWC / online EWC over a model's trainable parameters.

        penalty(θ) = λ/2 · Σ_i F_i · (θ_i − θ*_i)²

    Convention: λ multiplies the whole Fisher sum (Kirkpatrick et al.'s λ/2 in front), F is per-example
    averaged (see `estimate_fisher`), θ* is the anchor: the trainable weights when the EWC was built (or last
    consolidated). F and θ* live in one flat list each, built once; `dtype=torch.bfloat16` halves their memory.
    Under FSDP2 (`shard_like`) F and θ* are DTensors sharded like their parameters: each rank computes the
    penalty and its gradient on its own shards, and the penalty's value is all-reduced.
    `gamma` is online EWC's decay γ (Schwarz et al. 2018); None = plain EWC, whose `consolidate` then sums the
    Fishers (γ = 1, Huszár 2018's recursive form)."""

    def __init__(self, model: nn.Module, fisher: dict[str, torch.Tensor], lam: float, gamma: float | None = None,
                 dtype: torch.dtype = torch.float32, source: str = "fisher"):
        params = trainable_parameters(model)
        check_fits(params, fisher, source)
        if lam < 0 or (gamma is not None and not 0 <= gamma <= 1):
            raise ForgetlabError(f"EWC needs lambda >= 0 and 0 <= gamma <= 1 (got lambda={lam}, gamma={gamma})")
        self.model = model
        self.names = list(params)
        self.params = list(params.values())
        self.lam, self.gamma, self.dtype = float(lam), gamma, dtype
        self.fisher = [fisher[n].detach().to(device=p.device, dtype=dtype, copy=True) for n, p in params.items()]
        self.anchor = [p.detach().to(dtype=dtype, copy=True) for p in self.params]
        self.metadata: dict[str, str] = {}
        self.scratch_delta, self.scratch_fisher_delta = Scratch(), Scratch()

    @property
    def sharded(self) -> bool:
        return any(is_dtensor(p) for p in self.params)

    @torch.no_grad()
    def shard_like(self, model):
        """After FSDP2's fully_shard replaced `model`'s parameters by sharded DTensors: follow the new
        parameters (by name) and lay F and θ* out exactly like them (distributed.distribute_like: each rank
        keeps its own shard of the values every rank holds), so that EWC's memory per rank falls as 1/N."""
        from distributed import distribute_like
        params = trainable_parameters(model)
        check_names(self.names, params, "EWC.shard_like: the sharded model's trainable parameters")
        self.model, self.params = model, [params[n] for n in self.names]
        self.fisher = [distribute_like(f, p) for f, p in zip(self.fisher, self.params)]
        self.anchor = [distribute_like(a, p) for a, p in zip(self.anchor, self.params)]
        return self

    def check_model(self, model):
        if model is not self.model:
            raise ValueError("this EWC was built for another model")

    @torch.no_grad()
    def value_and_grad(self, use_grad=None) -> torch.Tensor:
        """The penalty λ/2 Σ F (θ − θ*)² (a float32 scalar), and parameter by parameter its gradient
        λ·F·(θ − θ*), handed to use_grad(p, gradient) when given. The one place the penalty is computed:
        `penalty` and `add_penalty_grad_` only deliver the gradient differently. The gradient is written into a
        reused buffer (a fresh 100 MB tensor per parameter per step is slow on CPU): use it before returning."""
        total = torch.zeros((), dtype=torch.float32, device=local(self.params[0]).device)
        for param, anchor, fisher in zip(self.params, self.anchor, self.fisher):
            p, a, f = local(param), local(anchor), local(fisher)  # this rank's shards under FSDP2, else the same
            dtype = torch.promote_types(p.dtype, a.dtype)
            delta = torch.sub(p, a, out=self.scratch_delta.get(p.shape, dtype, p.device))  # θ − θ*
            f_delta = torch.mul(delta, f, out=self.scratch_fisher_delta.get(p.shape, dtype, p.device))
            total += torch.dot(f_delta.view(-1), delta.view(-1)).float()
            if use_grad is not None:
                use_grad(param, f_delta.mul_(self.lam))  # shaped like param's local shard
        if self.sharded:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)  # every rank summed only its own shards
        return total * (self.lam / 2)

    def penalty(self, model) -> torch.Tensor:
        """λ/2 Σ F (θ − θ*)², a float32 scalar differentiable in θ (add it to the loss)."""
        self.check_model(model)
        return EWCPenalty.apply(self, *self.params)

    @torch.no_grad()
    def add_penalty_grad_(self, model) -> torch.Tensor:
        """p.grad += λ·F·(θ − θ*) for every trainable p, after the task loss's backward; returns the penalty's
        value (for logging). The same update as backpropagating `penalty(model)`, without an autograd node."""
        self.check_model(model)

        def add(p, g):
            if p.grad is None:
                p.grad = like(p, g.to(p.dtype, copy=True))
            else:
                local(p.grad).add_(g)
        return self.value_and_grad(add)

    def backward(self, model, loss: torch.Tensor, in_place: bool = True) -> torch.Tensor:
        """loss.backward() with the penalty's gradient added: written into .grad after the loss's backward
        (in_place, what train.py does: no autograd node, no extra gradient tensors), or backpropagated
        through `penalty`. Returns the penalty's value."""
        if in_place:
            loss.backward()
            return self.add_penalty_grad_(model)
        value = self.penalty(model)
        (loss + value).backward()
        return value.detach()

    @torch.no_grad()
    def consolidate(self, model, new_fisher: dict[str, torch.Tensor]):
        """Online EWC after a task: F ← γ·F + F_new, θ* ← the current weights."""
        self.check_model(model)
        check_fits(trainable_parameters(model), new_fisher, "new fisher")
        gamma = 1.0 if self.gamma is None else self.gamma
        for name, p, a, f in zip(self.names, self.params, self.anchor, self.fisher):
            f.copy_(f.float() * gamma + new_fisher[name].to(device=f.device, dtype=torch.float32))
            a.copy_(p)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`fisher.<name>` and `anchor.<name>` of every trainable parameter: what `save` writes and what a
        training checkpoint carries."""
        return {**{f"fisher.{n}": f for n, f in zip(self.names, self.fisher)},
                **{f"anchor.{n}": a for n, a in zip(self.names, self.anchor)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "EWC state"):
        """Copy F and θ* from a `state_dict()` of an EWC over the same parameters; ForgetlabError (naming
        `source`) before anything changes if a name or a shape differs."""
        own = self.state_dict()
        check_fits(own, state, source)
        for k, t in own.items():
            s = state[k]
            if is_dtensor(t) and not is_dtensor(s):  # a whole tensor (a file) into a shard: keep this rank's part
                from distributed import distribute_like
                s = distribute_like(s.to(t.dtype), t)
            local(t).copy_(local(s))

    def save(self, path, metadata: dict | None = None):
        """One safetensors file: `fisher.<name>` and `anchor.<name>` tensors, string metadata (estimator, data,
        n_examples, model: whatever the caller passes, plus gamma and created)."""
        meta = {**self.metadata, **{k: str(v) for k, v in (metadata or {}).items()},
                "gamma": str(self.gamma), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        # sharded (FSDP2): every rank takes part in gathering the whole tensors, rank 0 writes them
        tensors = {k: full(v).detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_atomic_safetensors(Path(path), tensors, meta)
        self.metadata = meta

    @classmethod
    def load(cls, path, model, lam: float, gamma: float | None = None, dtype: torch.dtype | None = None) -> "EWC":
        """An EWC from a file written by `save`: F and θ* as stored (not the model's current weights). gamma
        defaults to the file's; dtype to the stored one. ForgetlabError if the file does not fit the model's
        trainable parameters."""
        path = Path(path)
        if not path.is_file():
            raise ForgetlabError(f"{path}: Fisher file not found")
        tensors, meta = read_safetensors(path)
        fisher = {k.removeprefix("fisher."): v for k, v in tensors.items() if k.startswith("fisher.")}
        if gamma is None and meta.get("gamma", "None") != "None":
            gamma = float(meta["gamma"])
        if dtype is None:
            dtype = next(iter(fisher.values())).dtype if fisher else torch.float32
        ewc = cls(model, fisher, lam, gamma=gamma, dtype=dtype, source=str(path))
        ewc.load_state_dict(tensors, str(path))  # the anchor, and nothing else in the file
        ewc.metadata = dict(meta)
        return ewc


class EWCPenalty(torch.autograd.Function):
    """λ/2 Σ F (θ − θ*)² as one autograd node: forward takes the gradient from `EWC.value_and_grad` along with
    the value, backward scales it, instead of differentiating a graph of a thousand elementwise ops."""

    @staticmethod
    def forward(ctx, ewc, *params):
        grads = []
        value = ewc.value_and_grad(lambda p, g: grads.append(like(p, g.to(p.dtype, copy=True))))
        ctx.grads = grads
        return value

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None  # each gradient is returned once
        for g in grads:
            local(g).mul_(grad_out)
        return (None, *grads)


def like(p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """A gradient for p from the local-shard-shaped `shard`: a DTensor laid out like p when p is one."""
    if not is_dtensor(p):
        return shard
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def check_fits(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str):
    """ForgetlabError unless `tensors` has exactly the names of `expected`, each with the same shape."""
    check_names(expected, tensors, f"{source}: does not fit the model")
    for n, t in expected.items():
        if tuple(tensors[n].shape) != tuple(t.shape):
            raise ForgetlabError(f"{source}: {n} has shape {tuple(tensors[n].shape)}, the model's is {tuple(t.shape)}")
