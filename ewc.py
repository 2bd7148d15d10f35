"""Elastic weight consolidation for LLMs: diagonal Fisher estimates, the EWC penalty, online EWC.

EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks") keeps fine-tuning
near what pre-training taught by pulling each weight back toward its old value θ*, in proportion to how much
the old data's loss cares about that weight, measured by the diagonal of the Fisher information F:

    penalty(θ) = λ/2 · Σ_i F_i · (θ_i − θ*_i)²          gradient: λ · F · (θ − θ*)

Online EWC (Schwarz et al. 2018, "Progress & Compress") handles a sequence of tasks with one penalty:
after each task F ← γ·F + F_new and θ* moves to the weights just learned.

    fisher = estimate_fisher(model, general_batches, estimator="empirical", max_examples=512)
    ewc = EWC(model, fisher, lam=100.0)
    loss = model(ids, labels=labels) + ewc.penalty(model)      # or: loss.backward(); ewc.add_penalty_grad_(model)
    ewc.save("fisher.safetensors", {"estimator": "empirical", "data": "general_qa.jsonl", "n_examples": 512})

Three Fisher estimators (each example's loss is the mean over its own labelled tokens, labels HF-aligned):
  empirical  F = 1/N Σ_n (∇ℓ_n)², the squared gradient of each example's own loss on its data labels. Computed
             exactly and in one batched pass: see `PerExampleSquares`.
  true       the same with every target token sampled from the model's own predictive distribution, a Monte
             Carlo estimate of the expected Fisher E_x E_{y~p_θ(·|x)}[(∇ log p_θ(y|x))²] (Martens 2020, "New
             insights and perspectives on the natural gradient method"; Kunstner et al. 2019 on why the
             empirical Fisher can differ from it).
  batch      1/K Σ_k (∇L_k)², the square of each batch's mean gradient: the shortcut of many EWC tutorials.
             It is biased: E[(ḡ)²] = (E g)² + Var(g)/B, so it shrinks toward the squared mean gradient
             (≈ 0 near an optimum) as the batch size B grows, and it depends on B. Kept for comparison only.
"""
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from errors import ForgetlabError
from model.checkpoint import write_atomic_safetensors
from model.llama import IGNORE_INDEX, RMSNorm

ESTIMATORS = ("empirical", "true", "batch")
NORMALIZATIONS = ("none", "mean", "max")
# Per-example gradients of one linear layer are materialized a few examples at a time, so that a large
# matrix (a 49k-token lm_head) never needs (B, out, in) floats at once.
CHUNK_ELEMENTS = 2**24


def accumulator_dtype(p: torch.Tensor) -> torch.dtype:
    """Fisher sums are kept in float32 (float64 for a float64 model)."""
    return torch.promote_types(p.dtype, torch.float32)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with requires_grad, by name; a tied weight appears once, under its first name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def add_sum_of_squares_(acc, per):
    """acc += Σ_n per[n]² (einsum reads `per` once, and is faster on CPU than square + sum(0))."""
    acc.add_(torch.einsum("n...,n...->...", per, per))


class Scratch:
    """A flat buffer reused for large temporaries. On CPU, every fresh 100 MB tensor costs ~0.2 s of page faults
    (and more on a busy machine): more than the arithmetic done on it."""

    def __init__(self):
        self.buffer = None

    def get(self, shape, dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        b = self.buffer
        if b is None or b.numel() < n or b.dtype != dtype or b.device != torch.device(device):
            self.buffer = b = torch.empty(n, dtype=dtype, device=device)
        return b[:n].view(shape)


# ----------------------------------------------------------------------------------------------------------
# Fisher estimation


def estimate_fisher(model, batches, estimator: str = "empirical", max_examples: int | None = None,
                    normalize: str = "none", progress: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the trainable parameters (requires_grad=True), keyed by parameter name, float32
    (float64 for a float64 model).

    `batches` yields dicts with `input_ids` (B, T), `labels` (B, T) aligned with input_ids as in Hugging Face
    (-100 = ignored) and optionally `attention_mask` (B, T) (1 = token, 0 = padding). Padding never counts:
    a pad position's label is ignored and its gradient is zero, and each example's gradient is its own.
    Examples with no labelled token are skipped. `max_examples` stops after that many examples.
    `normalize`: "none"; "mean" or "max" divide every entry by the mean or max over all entries of all
    tensors (so relative importance across layers is kept and λ becomes scale-free). `seed` drives the
    label sampling of estimator="true". The model runs in eval mode (no dropout) and is restored afterwards."""
    if estimator not in ESTIMATORS:
        raise ForgetlabError(f"unknown Fisher estimator {estimator!r} (choose from {', '.join(ESTIMATORS)})")
    if normalize not in NORMALIZATIONS:
        raise ForgetlabError(f"unknown Fisher normalization {normalize!r} (choose from {', '.join(NORMALIZATIONS)})")
    if max_examples is not None and max_examples <= 0:
        raise ForgetlabError(f"max_examples must be positive, got {max_examples}")
    params = trainable_parameters(model)
    if not params:
        raise ForgetlabError("estimate_fisher: the model has no trainable parameter (requires_grad=True)")
    acc = {name: torch.zeros_like(p, dtype=accumulator_dtype(p)) for name, p in params.items()}
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
                n = accumulate_batch_gradient_squares(model, batch, params, acc)
                n_batches += n > 0
            else:
                n = accumulate_per_example_squares(model, batch, params, acc, scratch,
                                                   generator if estimator == "true" else None)
            n_examples += n
            if max_examples is not None and n_examples >= max_examples:
                break
    finally:
        model.train(was_training)
    if n_examples == 0:
        raise ForgetlabError("estimate_fisher: the batches hold no labelled token (every label is -100)")
    denominator = n_batches if estimator == "batch" else n_examples
    fisher = {name: a.div_(denominator) for name, a in acc.items()}
    return normalize_fisher(fisher, normalize)


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


def per_example_objective(model, batch, generator: torch.Generator | None = None):
    """Σ_n ℓ_n, where ℓ_n is example n's mean cross-entropy over its own labelled tokens, so that the
    gradient of this sum with respect to any per-example quantity is that example's own gradient.

    The body runs once for the whole batch; the final hidden states of labelled positions are then packed
    example by example into (B, L, hidden), L = the most labelled tokens of any example, with zeros (and
    zero loss weight) in the unused slots, so lm_head sees a batch dimension like every other layer.
    With a generator, every target is replaced by a sample from the model's own prediction ("true" Fisher).
    Returns (objective, number of examples with at least one labelled token)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    B, T = input_ids.shape
    hidden = final_hidden_states(model, input_ids, mask)  # (B, T, hidden)
    y = labels[:, 1:].to(hidden.device)  # labels[:, t] is predicted from position t-1
    keep = y != IGNORE_INDEX
    if mask is not None:
        keep &= mask[:, 1:].bool().to(hidden.device)  # a pad never counts, whatever its label says
    counts = keep.sum(1)  # (B,)
    L = max(int(counts.max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :L]  # labelled positions first
    slot = torch.arange(L, device=hidden.device)[None] < counts[:, None]  # (B, L): slot holds a label
    h = hidden[:, :-1].gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, L, hidden)
    h = h * slot[..., None].to(h.dtype)
    targets = y.gather(1, order).masked_fill(~slot, 0)  # (B, L)
    logits = model.lm_head(h)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (B, L, vocab)
    V = logits.shape[-1]
    if generator is not None:
        probs = torch.softmax(logits.detach().view(-1, V), dim=-1)
        targets = torch.multinomial(probs, 1, generator=generator).view(B, L)
    token_loss = F.cross_entropy(logits.view(-1, V), targets.reshape(-1), reduction="none").view(B, L)
    weight = slot / counts.clamp(min=1)[:, None]  # 1/n_b on example b's labelled slots, 0 elsewhere
    return (token_loss * weight).sum(), int((counts > 0).sum())


def final_hidden_states(model, input_ids, attention_mask):
    """The output of the final norm, (B, T, hidden), with the autograd graph. The model is run with
    last_only=True (lm_head on one position per row: negligible) and the norm's output is caught by a hook,
    so no logits are computed for unlabelled positions."""
    caught = []
    handle = model.model.norm.register_forward_hook(lambda module, inputs, output: caught.append(output))
    try:
        model(input_ids, attention_mask=attention_mask, last_only=True)
    finally:
        handle.remove()
    return caught[0]


def accumulate_batch_gradient_squares(model, batch, params, acc) -> int:
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


def accumulate_per_example_squares(model, batch, params, acc, scratch, generator=None) -> int:
    """acc += Σ_n (∇ℓ_n)² for the examples of one batch, exactly, in one forward and one backward."""
    with PerExampleSquares(model, params, acc, batch, scratch):
        objective, n = per_example_objective(model, batch, generator)
        if n > 0:
            objective.backward()
    return n


@contextmanager
def frozen(params):
    """Temporarily requires_grad=False: backward then computes activation gradients only."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class PerExampleSquares:
    """Accumulates Σ_n (per-example gradient)² of every trainable parameter, layer by layer, in backward hooks.

    Per-example gradients come from what each layer sees (Goodfellow 2015, "Efficient per-example gradient
    computations"): with input activations a (B, T, in) and output gradients g (B, T, out) of example n,
      nn.Linear   ∇W_n = Σ_t g_nt ⊗ a_nt  (einsum "bto,bti->boi"),  ∇b_n = Σ_t g_nt
      RMSNorm     ∇w_n = Σ_t g_nt ⊙ x̂_nt, x̂ = x / rms(x)
      Embedding   ∇E_n[v] = Σ_{t: id_nt = v} g_nt  (a scatter-add of the output gradients by token id)
    A tied embedding / lm_head gets both: ∇E_n = ∇(lm_head)_n + ∇(embedding)_n, and the square is taken of the
    sum. lm_head's part is a dense (vocab, hidden) matrix; before it is squared, the rows of the tokens that
    example n feeds in are set aside, and added to the embedding part when backward reaches the embedding.

    The trainable parameters are frozen while the hooks run, so autograd computes no weight gradient at all
    (the per-example ones replace it) and the graph starts at the embedding output. Each layer's (B, out, in)
    block is materialized a few examples at a time and dropped once squared, never all layers at once.

    Padding needs no masking in the layers: a pad's activation reaches no labelled position (a real token
    never attends to a pad, whether the batch is right-padded under the causal mask or left-padded under the
    model's 4D mask), so every output gradient at a pad is exactly zero, and the embedding drops pad rows.
    `test_ewc.py` checks this against the loop on unpadded examples."""

    def __init__(self, model, params: dict[str, nn.Parameter], acc: dict[str, torch.Tensor], batch,
                 scratch: Scratch):
        self.model = model
        self.scratch = scratch  # holds each chunk of per-example gradients
        self.acc = {p: acc[name] for name, p in params.items()}  # Parameter -> accumulator
        self.params = list(params.values())
        self.dtype = accumulator_dtype(self.params[0])  # per-example gradients are formed in this dtype
        embedding = model.model.embed_tokens
        self.tied = embedding.weight is model.lm_head.weight and embedding.weight in self.acc
        self.attention_mask = batch.get("attention_mask")  # (B, T)
        self.input_ids = batch["input_ids"]
        self.handles = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p in self.acc]
            if module is embedding:
                self.handles.append(module.register_forward_hook(self.embedding_forward))
            elif isinstance(module, nn.Linear):
                if own:
                    self.handles.append(module.register_forward_hook(self.linear_forward))
            elif isinstance(module, RMSNorm):
                if own:
                    self.handles.append(module.register_forward_hook(self.norm_forward))
            elif own:
                raise ForgetlabError(f"estimate_fisher: no per-example gradient rule for {type(module).__name__} "
                                     f"({name}); freeze its parameters or use estimator='batch'")
        if embedding.weight in self.acc:
            self.rows = self.example_rows()
        if self.tied:
            K, d = self.rows[1].numel(), embedding.weight.shape[1]
            self.head_rows = torch.zeros(K, d, dtype=self.dtype, device=self.input_ids.device)

    def __enter__(self):
        self.freeze = frozen(self.params)
        self.freeze.__enter__()
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.freeze.__exit__(*exc)

    # nn.Linear --------------------------------------------------------------------------------------------
    def linear_forward(self, module, inputs, output):
        if output.requires_grad:
            a = inputs[0]
            output.register_hook(lambda g: self.linear_backward(module, a, g))

    def linear_backward(self, module, a, g):
        a, g = a.to(self.dtype), g.to(self.dtype)  # (B, T, in), (B, T, out)
        if module.weight in self.acc:
            if self.tied and module is self.model.lm_head:
                self.tied_head_backward(a, g)
            else:
                acc = self.acc[module.weight]
                B, out, inp = g.shape[0], g.shape[-1], a.shape[-1]
                step = max(1, CHUNK_ELEMENTS // (out * inp))
                for i in range(0, B, step):
                    per = self.per_example_outer(g[i:i + step], a[i:i + step])  # (b, out, in)
                    add_sum_of_squares_(acc, per)
        if module.bias is not None and module.bias in self.acc:
            add_sum_of_squares_(self.acc[module.bias], g.sum(1))  # per-example (B, out)

    def per_example_outer(self, g, a):
        """Σ_t g_nt ⊗ a_nt for each n: (n, T, out), (n, T, in) -> (n, out, in), written into the scratch buffer."""
        out = self.scratch.get((g.shape[0], g.shape[-1], a.shape[-1]), g.dtype, g.device)
        return torch.bmm(g.transpose(1, 2), a, out=out)

    # RMSNorm ----------------------------------------------------------------------------------------------
    def norm_forward(self, module, inputs, output):
        if output.requires_grad:
            x = inputs[0]
            output.register_hook(lambda g: self.norm_backward(module, x, g))

    def norm_backward(self, module, x, g):
        x32 = x.float()
        x_hat = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.eps)).to(x.dtype)  # as RMSNorm
        per = (g.to(self.dtype) * x_hat.to(self.dtype)).sum(1)  # (B, hidden)
        add_sum_of_squares_(self.acc[module.weight], per)

    # Embedding (and the tied lm_head) ---------------------------------------------------------------------
    def embedding_forward(self, module, inputs, output):
        if not output.requires_grad:
            output.requires_grad_()  # the frozen graph starts here: every later activation needs a gradient
        if module.weight in self.acc:
            output.register_hook(lambda g: self.embedding_backward(module, g))
        return output

    def example_rows(self):
        """The distinct (example, token id) pairs of real tokens, sorted by example: key = n·vocab + id.
        Returns (inverse (n_real,), key's example (K,), key's token id (K,), real-token mask (B, T))."""
        ids = self.input_ids
        V = self.model.model.embed_tokens.weight.shape[0]
        mask = self.attention_mask
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        keys = (torch.arange(ids.shape[0], device=ids.device)[:, None] * V + ids)[real]
        unique, inverse = torch.unique(keys, return_inverse=True)
        return inverse, unique // V, unique % V, real

    def tied_head_backward(self, a, g):
        """lm_head part of the tied weight: square everything except each example's own input-token rows,
        which wait in head_rows for the embedding part."""
        _, key_example, key_token, _ = self.rows
        acc = self.acc[self.model.lm_head.weight]
        B, V, d = g.shape[0], g.shape[-1], a.shape[-1]
        step = max(1, CHUNK_ELEMENTS // (V * d))
        for i in range(0, B, step):
            per = self.per_example_outer(g[i:i + step], a[i:i + step])  # (b, vocab, hidden)
            sel = (key_example >= i) & (key_example < i + step)
            ex, tok = key_example[sel] - i, key_token[sel]
            self.head_rows[sel] = per[ex, tok]
            per[ex, tok] = 0.0
            add_sum_of_squares_(acc, per)

    def embedding_backward(self, module, g):
        inverse, _, key_token, real = self.rows
        g = g[real].to(self.dtype)  # (n_real, hidden): pads dropped
        per = torch.zeros(key_token.numel(), g.shape[-1], dtype=self.dtype, device=g.device)
        per.index_add_(0, inverse, g)  # (K, hidden): example n's gradient on row v
        if self.tied:
            per += self.head_rows
        self.acc[module.weight].index_add_(0, key_token, per.square_())


def empirical_fisher_loop(model, batches, max_examples: int | None = None) -> dict[str, torch.Tensor]:
    """The empirical Fisher by brute force: one backward per example, each cut to its real tokens (no
    padding at all). Slow; the reference that `estimate_fisher` is tested and benchmarked against."""
    params = trainable_parameters(model)
    acc = {name: torch.zeros_like(p, dtype=accumulator_dtype(p)) for name, p in params.items()}
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
                loss = F.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE_INDEX)
                grads = torch.autograd.grad(loss, list(params.values()))
                for name, g in zip(params, grads):
                    g = g.to(acc[name].dtype)
                    acc[name].addcmul_(g, g)
                n += 1
    finally:
        model.train(was_training)
    return {name: a / max(n, 1) for name, a in acc.items()}


# ----------------------------------------------------------------------------------------------------------
# The EWC penalty


class EWCPenalty(torch.autograd.Function):
    """λ/2 Σ F (θ − θ*)² as one autograd node: forward keeps nothing but the parameters, backward writes
    λ·F·(θ − θ*) straight away instead of differentiating a graph of a thousand elementwise ops."""

    @staticmethod
    def forward(ctx, ewc, *params):
        ctx.ewc = ewc
        ctx.save_for_backward(*params)
        total = torch.zeros((), dtype=torch.float32, device=params[0].device)
        for p, a, f in zip(params, ewc.anchor, ewc.fisher):
            d, fd = ewc.deltas(p, a, f)
            total += torch.dot(fd.view(-1), d.view(-1)).float()
        return total * (ewc.lam / 2)

    @staticmethod
    def backward(ctx, grad_out):
        ewc = ctx.ewc
        grads = []
        for p, a, f in zip(ctx.saved_tensors, ewc.anchor, ewc.fisher):
            g = p - a  # the returned gradient: the one allocation per parameter, then in place
            grads.append(g.mul_(f).mul_(grad_out * ewc.lam).to(p.dtype))
        return (None, *grads)


class EWC:
    """EWC / online EWC over a model's trainable parameters.

        penalty(θ) = λ/2 · Σ_i F_i · (θ_i − θ*_i)²

    Convention: λ multiplies the whole Fisher sum (Kirkpatrick et al.'s λ/2 in front), F is per-example
    averaged (see `estimate_fisher`), θ* is the anchor: the trainable weights when the EWC was built (or last
    consolidated). F and θ* live in one flat list each, built once; `dtype=torch.bfloat16` halves their memory.
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

    def deltas(self, p, a, f):
        """(θ − θ*, F·(θ − θ*)) for one parameter, written into two reused buffers (valid until the next call)."""
        dtype = torch.promote_types(p.dtype, a.dtype)
        d = torch.sub(p.detach(), a, out=self.scratch_delta.get(p.shape, dtype, p.device))
        return d, torch.mul(d, f, out=self.scratch_fisher_delta.get(p.shape, dtype, p.device))

    def check_model(self, model):
        if model is not self.model:
            raise ValueError("this EWC was built for another model")

    def penalty(self, model) -> torch.Tensor:
        """λ/2 Σ F (θ − θ*)², a float32 scalar differentiable in θ (add it to the loss)."""
        self.check_model(model)
        return EWCPenalty.apply(self, *self.params)

    @torch.no_grad()
    def add_penalty_grad_(self, model) -> torch.Tensor:
        """p.grad += λ·F·(θ − θ*) for every trainable p, after the task loss's backward; returns the penalty's
        value (for logging). The same update as backpropagating `penalty(model)`, without an autograd node."""
        self.check_model(model)
        total = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for p, a, f in zip(self.params, self.anchor, self.fisher):
            d, fd = self.deltas(p, a, f)
            total += torch.dot(fd.view(-1), d.view(-1)).float()
            if p.grad is None:
                p.grad = (fd * self.lam).to(p.dtype)
            else:
                p.grad.add_(fd, alpha=self.lam)
        return total * (self.lam / 2)

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
        return {**{f"fisher.{n}": f for n, f in zip(self.names, self.fisher)},
                **{f"anchor.{n}": a for n, a in zip(self.names, self.anchor)}}

    def save(self, path, metadata: dict | None = None):
        """One safetensors file: `fisher.<name>` and `anchor.<name>` tensors, string metadata (estimator, data,
        n_examples, model: whatever the caller passes, plus gamma and created)."""
        meta = {**self.metadata, **{k: str(v) for k, v in (metadata or {}).items()},
                "gamma": str(self.gamma), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
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
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ForgetlabError(f"{path}: unreadable or truncated safetensors file ({e})") from None
        fisher = {k[len("fisher."):]: v for k, v in tensors.items() if k.startswith("fisher.")}
        anchor = {k[len("anchor."):]: v for k, v in tensors.items() if k.startswith("anchor.")}
        if set(fisher) != set(anchor) or len(fisher) + len(anchor) != len(tensors):
            raise ForgetlabError(f"{path}: not an EWC file (expected matching fisher.* and anchor.* tensors)")
        if gamma is None and meta.get("gamma", "None") != "None":
            gamma = float(meta["gamma"])
        if dtype is None:
            dtype = next(iter(fisher.values())).dtype if fisher else torch.float32
        ewc = cls(model, fisher, lam, gamma=gamma, dtype=dtype, source=str(path))
        check_fits(trainable_parameters(model), anchor, str(path))
        for name, a in zip(ewc.names, ewc.anchor):
            a.copy_(anchor[name])
        ewc.metadata = dict(meta)
        return ewc


def check_fits(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], source: str):
    """ForgetlabError unless `tensors` has exactly one tensor of the right shape per trainable parameter."""
    missing = [n for n in params if n not in tensors]
    extra = [n for n in tensors if n not in params]
    if missing or extra:
        what = f"no entry for trainable parameter {missing[0]}" if missing else f"entry {extra[0]} is not a trainable parameter"
        raise ForgetlabError(f"{source}: does not fit the model: {what} "
                             f"({len(missing)} missing, {len(extra)} unexpected)")
    for n, p in params.items():
        if tuple(tensors[n].shape) != tuple(p.shape):
            raise ForgetlabError(f"{source}: {n} has shape {tuple(tensors[n].shape)}, the model's is {tuple(p.shape)}")
