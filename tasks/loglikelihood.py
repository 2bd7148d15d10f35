"""Log-likelihood scoring, the engine of every task that reads probabilities instead of generated text:

    score(context, continuation) = Σ_j log p(continuation_j | context, continuation_<j)
    greedy(context, continuation) = every continuation_j is the argmax after context, continuation_<j

split_request turns a (context, continuation) pair of strings into token ids as lm-evaluation-harness does;
score_continuations scores many such requests in batches that share each context's forward pass.
"""
import torch

from model import eval_mode, left_pad


def split_request(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids (context, continuation) for scoring `continuation` after `context`.

    The pair is tokenized as one string, as the model would have read it, and split where the context's own
    tokens end (lm-evaluation-harness's rule): " Paris" after "Answer:" is the single token "ĠParis", not
    "Ġ" + "Paris". Trailing whitespace of the context moves to the continuation first, so "Answer: " +
    "Paris" is scored the same way. Should a BPE merge straddle the boundary, the split falls at the end of
    the longest common prefix, so no token is dropped or counted twice."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tok.encode(context + continuation, add_bos=tok.adds_bos)
    ctx = tok.encode(context, add_bos=tok.adds_bos)
    k = 0
    while k < min(len(ctx), len(whole)) and ctx[k] == whole[k]:
        k += 1
    if k == 0:  # nothing to condition on: start from a document boundary token
        start = tok.bos_id if tok.bos_id is not None else tok.eos_ids[0]
        return [start], whole
    return whole[:k], whole[k:]


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32, without materializing the whole log-softmax. (..., V), (...)."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)


def _head_logprobs(lm_head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 128):
    """(log p(target), target is the argmax) per row of hidden (K, H) -> (K,), (K,): lm_head and
    _token_logprobs a chunk of rows at a time. Speed: the log-sum-exp is taken in place in the logits' buffer
    (torch.logsumexp writes a second (chunk, V) temporary, and fresh memory is slow on CPU); chunks of 128
    rows keep the buffer (25 MB at a 49k vocabulary) under glibc's mmap threshold, so it is reused, not
    page-faulted in anew."""
    lps, hits = [], []
    for i in range(0, len(targets), chunk):
        logits = lm_head(hidden[i:i + chunk]).float()  # (k, V)
        y = targets[i:i + chunk]
        picked = logits.gather(-1, y[:, None])[:, 0]
        hits.append(logits.argmax(-1) == y)
        top = logits.amax(dim=-1)
        lse = top + logits.sub_(top[:, None]).exp_().sum(dim=-1).log()
        lps.append(picked - lse)
    return torch.cat(lps), torch.cat(hits)


def _plan_batches(groups: list, batch_size: int, max_tokens: int, max_waste: float = 0.25,
                  min_tokens: int = 512) -> list[list]:
    """Cut length-sorted groups into batches of at most batch_size contexts whose memory stays bounded:
    rows x (longest continuation) <= max_tokens logit positions (V floats each), and rows x (context +
    continuation) <= 8 * max_tokens KV-cache slots (each row holds its own copy of its context).

    Speed: a batch is also cut when its padding would cost more than max_waste of its real tokens (contexts
    are left-padded to the longest, continuations right-padded to the longest: ARC's choices vary a lot in
    length, and padded positions cost as much as real ones). Batches of min_tokens tokens or fewer are
    never cut for padding: their matrix products are small enough that the per-pass overhead dominates."""
    batches, cur = [], []
    for g in groups:
        trial = cur + [g]
        rows = sum(len(x[1]) for x in trial)
        width = max(len(c) for x in trial for c in x[1])
        longest = max(len(x[0]) for x in trial)
        slots = rows * (longest + width)
        real = sum(len(x[0]) + sum(len(c) - 1 for c in x[1]) for x in trial)
        computed = len(trial) * longest + rows * (width - 1)
        wasteful = computed > min_tokens and computed > (1 + max_waste) * real
        if cur and (len(trial) > batch_size or rows * width > max_tokens or slots > 8 * max_tokens or wasteful):
            batches.append(cur)
            trial = [g]
        cur = trial
    if cur:
        batches.append(cur)
    return batches


def score_continuations(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                        max_tokens: int = 2048, progress: bool = False) -> tuple[list[float], list[bool]]:
    """For each (context_ids, continuation_ids): the summed log-probability Σ_j log p(cont_j | ctx, cont_<j),
    and whether greedy decoding after the context reproduces the continuation (every token is the argmax).

    Requests with the same context share one pass over it. Per batch of contexts:
      1. prefill: the left-padded contexts (G, L) fill the KV cache; the last position's logits score
         each continuation's first token;
      2. the cache rows are repeated once per continuation, and the continuations minus their last token,
         right-padded (N, M-1), are run after it; their logits score tokens 2..m.
    Only continuation positions go through lm_head. An empty continuation scores (0, True)."""
    device = model.model.embed_tokens.weight.device
    scores, greedy = [0.0] * len(requests), [True] * len(requests)
    by_context: dict[tuple, list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not ctx:
            raise ValueError(f"request {i} has an empty context")
        if cont:
            by_context.setdefault(tuple(ctx), []).append(i)
    groups = [(list(ctx), [requests[i][1] for i in idx], idx) for ctx, idx in by_context.items()]
    groups.sort(key=lambda g: len(g[0]) + max(map(len, g[1])), reverse=True)
    batches = _plan_batches(groups, batch_size, max_tokens)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="loglikelihood", unit="batch", leave=False)
    with eval_mode(model):
        for batch in batches:
            conts = [c for g in batch for c in g[1]]
            counts = torch.tensor([len(g[1]) for g in batch], device=device)
            G, L, M = len(batch), max(len(g[0]) for g in batch), max(map(len, conts))
            ctx_ids, ctx_mask = (t.to(device) for t in left_pad([g[0] for g in batch], pad_id=0))  # (G, L)
            first = torch.tensor([c[0] for c in conts], device=device)
            model.setup_kv_cache(G, L + M - 1)
            try:
                last = model(ctx_ids, attention_mask=ctx_mask, cache_start=0, last_only=True)[:, -1]  # (G, V)
                last = last.repeat_interleave(counts, dim=0)  # (N, V)
                lp = _token_logprobs(last, first)[:, None]  # (N, 1)
                hit = (last.argmax(-1) == first)[:, None]  # (N, 1)
                if M > 1:
                    model.repeat_kv_cache(counts)
                    N = len(conts)
                    inp = torch.zeros((N, M - 1), dtype=torch.long)
                    tgt = torch.zeros((N, M - 1), dtype=torch.long)
                    cont_mask = torch.zeros((N, M - 1), dtype=torch.long)
                    for r, c in enumerate(conts):
                        inp[r, :len(c) - 1] = torch.tensor(c[:-1])
                        tgt[r, :len(c) - 1] = torch.tensor(c[1:])
                        cont_mask[r, :len(c) - 1] = 1
                    inp, tgt, cont_mask = inp.to(device), tgt.to(device), cont_mask.to(device)
                    mask = torch.cat([ctx_mask.repeat_interleave(counts, dim=0), cont_mask], dim=1)  # (N, L+M-1)
                    # Speed: lm_head only at the real (unpadded) continuation positions, a chunk of them at a
                    # time, instead of model(...)'s (N, M-1, V) logits over the padding too; the values are
                    # the same as _token_logprobs(model(...), tgt) * cont_mask (the padding scores 0, a hit).
                    hidden = model.hidden(inp, attention_mask=mask, cache_start=L)  # (N, M-1, hidden)
                    where = cont_mask.bool()
                    lp_rest = torch.zeros((N, M - 1), device=device)
                    hit_rest = torch.ones((N, M - 1), dtype=torch.bool, device=device)
                    lp_rest[where], hit_rest[where] = _head_logprobs(model.lm_head, hidden[where], tgt[where])
                    lp = torch.cat([lp, lp_rest], dim=1)
                    hit = torch.cat([hit, hit_rest], dim=1)
            finally:
                model.clear_kv_cache()
            totals, all_hit = lp.sum(dim=1).tolist(), hit.all(dim=1).tolist()
            for j, i in enumerate(i for g in batch for i in g[2]):
                scores[i], greedy[i] = totals[j], all_hit[j]
    return scores, greedy
