"""The training loss without the full logits: next-token cross-entropy fused with lm_head.

    loss = linear_cross_entropy(hidden, lm_head, labels)
         = F.cross_entropy(lm_head(hidden[:, :-1]).float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

which is `Llama.forward`'s reference path (`model.fused_loss = False`), in a fraction of the memory: only
labelled positions go through lm_head (prompt tokens marked -100 cost nothing), a chunk of tokens at a time,
and each chunk's (N, vocab) logits become their own gradient in place (`LinearCrossEntropy`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # a label that is not a target (prompt, padding), as in Hugging Face and F.cross_entropy


def linear_cross_entropy(hidden, lm_head, labels, chunk_tokens: int = 4096):
    """Mean next-token cross-entropy over labelled positions (labels[:, t] is predicted from position t-1);
    hidden (B, T, hidden), labels (B, T). Float32 logits per chunk of `chunk_tokens` labelled positions. When
    one chunk's logits would be large (Llama 3's 128k vocabulary), each chunk is recomputed in backward rather
    than stored, so memory never holds all the logits. No labelled token: 0, still differentiable."""
    h = hidden[:, :-1]  # (B, T-1, hidden)
    y = labels[:, 1:].to(h.device)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]  # (N, hidden), (N,)
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0  # keeps the graph: a batch with no labelled token contributes nothing

    recompute = torch.is_grad_enabled() and chunk_tokens * lm_head.weight.shape[0] * 4 > 2**30
    plain = type(lm_head) is nn.Linear and lm_head.bias is None  # a LoRA-wrapped head takes the generic path

    def generic_loss(h_c, y_c):
        return F.cross_entropy(lm_head(h_c).float(), y_c, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk_tokens):
        h_c, y_c = h[i:i + chunk_tokens], y[i:i + chunk_tokens]
        if plain:
            total = total + LinearCrossEntropy.apply(h_c, lm_head.weight, y_c, recompute)
        elif recompute:
            total = total + checkpoint(generic_loss, h_c, y_c, use_reentrant=False)
        else:
            total = total + generic_loss(h_c, y_c)
    return total / n


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i · Wᵀ, y_i) with float32 logits, one chunk, as one autograd node.

    Why not `F.cross_entropy(lm_head(h))`: autograd would keep the log-softmax output, then in backward fill a
    zero tensor of the same (N, vocab) size and write a third one for the softmax gradient: three fresh 200 MB
    tensors per step at batch 4 × 256 on SmolLM2, page-faulted in on CPU. Here forward turns the logits into
    their gradient, softmax − one_hot, in place, and backward multiplies by it: one (N, vocab) buffer. With
    `recompute`, forward keeps only the log-sum-exp and backward recomputes the logits (large vocabularies)."""

    @staticmethod
    def forward(ctx, h, weight, y, recompute: bool):
        # the products run in autocast's dtype when it is on (bf16 on CUDA), in backward too; the softmax in float32
        on = torch.is_autocast_enabled(h.device.type)
        ctx.dtype = torch.get_autocast_dtype(h.device.type) if on else h.dtype
        logits = F.linear(h.to(ctx.dtype), weight.to(ctx.dtype)).float()  # (N, vocab)
        picked = logits.gather(1, y[:, None]).squeeze(1)  # (N,) the target's logit
        # log-sum-exp in place (torch.logsumexp writes an (N, vocab) temporary: fresh memory is slow on CPU)
        top = logits.amax(dim=-1)
        exp = logits.sub_(top[:, None]).exp_()  # (N, vocab), the logits' buffer from here on
        total = exp.sum(dim=-1)
        lse = top + total.log()
        loss = (lse - picked).sum()
        ctx.recompute = recompute
        if recompute:
            ctx.save_for_backward(h, weight, y, lse)
        elif any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(h, weight, minus_one_hot_(exp.div_(total[:, None]), y))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dtype = ctx.dtype
        if ctx.recompute:
            h, weight, y, lse = ctx.saved_tensors
            logits = F.linear(h.to(dtype), weight.to(dtype)).float()
            g = minus_one_hot_(logits.sub_(lse[:, None]).exp_(), y)  # softmax from the saved log-sum-exp
        else:
            h, weight, g = ctx.saved_tensors
        g = g.to(dtype)  # (N, vocab): d(sum CE) / d logits; grad_loss scales the smaller products below
        grad_h = (g @ weight.to(dtype)).mul_(grad_loss).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g.t() @ h.to(dtype)).mul_(grad_loss).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def minus_one_hot_(probs, y):
    """softmax probabilities (N, vocab) -> probs − one_hot(y), in place: the gradient of sum CE by the logits."""
    probs[torch.arange(len(y), device=y.device), y] -= 1
    return probs
