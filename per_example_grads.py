"""The fast path of the empirical and true Fisher: Σ_n (∇ℓ_n)² over a batch, exactly, in one forward and one
backward, where the definition (`ewc.fisher_reference`) needs one backward per example.

Per-example gradients come from what each layer sees (Goodfellow 2015, "Efficient per-example gradient
computations"): with input activations a (B, T, in) and output gradients g (B, T, out) of example n,

    nn.Linear   ∇W_n = Σ_t g_nt ⊗ a_nt  (einsum "bto,bti->boi"),  ∇b_n = Σ_t g_nt
    RMSNorm     ∇w_n = Σ_t g_nt ⊙ x̂_nt,  x̂ = x / rms(x)
    Embedding   ∇E_n[v] = Σ_{t: id_nt = v} g_nt  (a scatter-add of the output gradients by token id)

The output gradients g_nt are example n's own only if the loss is a sum of per-example terms: that is
`per_example_objective`. Forward hooks keep each layer's input; a hook on its output's gradient forms the
per-example gradients, squares them and adds them to the Fisher sum (`PerExampleSquares`).
`tests/test_ewc.py` checks the result against the reference loop.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import ForgetlabError
from model.llama import IGNORE_INDEX, RMSNorm

# Per-example gradients of one linear layer are materialized a few examples at a time, so that a large
# matrix (a 49k-token lm_head) never needs (B, out, in) floats at once.
CHUNK_ELEMENTS = 2**24


def add_per_example_squares_(model, batch, params, acc, scratch, generator=None) -> int:
    """acc[name] += Σ_n (∇ℓ_n)² for the examples of one batch, exactly, in one forward and one backward.
    With a generator, targets are sampled from the model (the "true" Fisher). Returns the examples counted."""
    with PerExampleSquares(model, params, acc, batch, scratch):
        objective, n = per_example_objective(model, batch, generator)
        if n > 0:
            objective.backward()
    return n


def per_example_objective(model, batch, generator: torch.Generator | None = None):
    """Σ_n ℓ_n, where ℓ_n is example n's mean cross-entropy over its own labelled tokens, so that the
    gradient of this sum with respect to any per-example quantity is that example's own gradient.

    The body runs once for the whole batch; the final hidden states of labelled positions are then packed
    example by example into (B, L, hidden), L = the most labelled tokens of any example, with zeros (and
    zero loss weight) in the unused slots, so lm_head sees a batch dimension like every other layer and no
    logits are computed for unlabelled positions. With a generator, every target is replaced by a sample
    from the model's own prediction ("true" Fisher).
    Returns (objective, number of examples with at least one labelled token)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    B, T = input_ids.shape
    hidden = model.hidden(input_ids, attention_mask=mask)  # (B, T, hidden)
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


def add_sum_of_squares_(acc, per):
    """acc += Σ_n per[n]² (einsum reads `per` once, and is faster on CPU than square + sum(0))."""
    acc.add_(torch.einsum("n...,n...->...", per, per))


class Scratch:
    """A flat buffer reused for large temporaries. On CPU, a fresh tensor of hundreds of MB costs page faults
    that can exceed the arithmetic done on it (more on a busy machine)."""

    def __init__(self):
        self.buffer = None

    def get(self, shape, dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        b = self.buffer
        if b is None or b.numel() < n or b.dtype != dtype or b.device != torch.device(device):
            self.buffer = b = torch.empty(n, dtype=dtype, device=device)
        return b[:n].view(shape)


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

    The rules are in the module docstring. A tied embedding / lm_head gets both: ∇E_n = ∇(lm_head)_n +
    ∇(embedding)_n, and the square is taken of the sum. lm_head's part is a dense (vocab, hidden) matrix;
    before it is squared, the rows of the tokens that example n feeds in are set aside, and added to the
    embedding part when backward reaches the embedding.

    The trainable parameters are frozen while the hooks run, so autograd computes no weight gradient at all
    (the per-example ones replace it) and the graph starts at the embedding output. Each layer's (B, out, in)
    block is materialized a few examples at a time and dropped once squared, never all layers at once.

    Padding needs no masking in the layers: a pad's activation reaches no labelled position (a real token
    never attends to a pad, whether the batch is right-padded under the causal mask or left-padded under the
    model's 4D mask), so every output gradient at a pad is exactly zero, and the embedding drops pad rows."""

    def __init__(self, model, params: dict[str, nn.Parameter], acc: dict[str, torch.Tensor], batch,
                 scratch: Scratch):
        self.model = model
        self.scratch = scratch  # holds each chunk of per-example gradients
        self.acc = {p: acc[name] for name, p in params.items()}  # Parameter -> accumulator
        self.params = list(params.values())
        self.dtype = next(iter(acc.values())).dtype  # per-example gradients are formed in the sums' dtype
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
