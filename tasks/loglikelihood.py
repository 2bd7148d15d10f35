"""Log-likelihood scoring, the engine of every task that reads probabilities instead of generated text:

    score(context, continuation) = Σ_j log p(continuation_j | context, continuation_<j)
    greedy(context, continuation) = every continuation_j is the argmax after context, continuation_<j

split_request turns a (context, continuation) pair of strings into token ids as lm-evaluation-harness does;
score_continuations scores many such requests in batches, each context's forward pass shared by its continuations.
"""
import torch

from model import eval_mode


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


def _head_logprobs(lm_head, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk: int = 128):
    """(log p(targets[k] | hidden[rows[k]]), whether targets[k] is that row's argmax) for every k -> (K,), (K,):
    lm_head once per row of hidden (P, H), a chunk of rows at a time, however many targets a row has.
    Speed: the log-sum-exp is taken in place in the logits' buffer (torch.logsumexp writes a second
    (chunk, V) temporary, and fresh memory is slow on CPU); chunks of 128 rows keep the buffer (25 MB at a
    49k vocabulary) under glibc's mmap threshold, so it is reused, not page-faulted in anew."""
    lp = torch.empty(len(targets), device=hidden.device)
    hit = torch.empty(len(targets), dtype=torch.bool, device=hidden.device)
    for i in range(0, len(hidden), chunk):
        logits = lm_head(hidden[i:i + chunk]).float()  # (k, V)
        here = (rows >= i) & (rows < i + len(logits))
        r, y = rows[here] - i, targets[here]
        picked = logits[r, y]
        hit[here] = logits.argmax(-1)[r] == y
        top = logits.amax(dim=-1)
        lse = top + logits.sub_(top[:, None]).exp_().sum(dim=-1).log()
        lp[here] = picked - lse[r]
    return lp, hit


def _tree_row(ctx: list[int], conts: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """One context and its continuations as one packed row: (ids, positions, segment) where the row is the
    context (segment 0) then each continuation but its last token (segment s = 1, 2, ...), every
    continuation at positions len(ctx), len(ctx)+1, ... as if it alone followed the context."""
    ids, pos, seg = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    for s, c in enumerate(conts, start=1):
        ids += c[:-1]
        pos += range(len(ctx), len(ctx) + len(c) - 1)
        seg += [s] * (len(c) - 1)
    return ids, pos, seg


def _plan_batches(rows: list, batch_size: int, max_tokens: int, max_waste: float = 0.25,
                  min_tokens: int = 512) -> list[list]:
    """Cut length-sorted packed rows into batches of at most batch_size rows and max_tokens positions
    (rows x the longest row, padding included; a longer row is a batch of its own). Speed: passes of about
    a thousand positions ran fastest on a 2-core CPU, faster than larger ones (their activations stay in
    cache: results/bench/LOG.md, run I), and memory stays bounded.

    Speed: a batch is also cut when its padding would cost more than max_waste of its real tokens (rows are
    right-padded to the longest, and padded positions cost as much as real ones). Batches of min_tokens
    positions or fewer are never cut for padding: their matrix products are small enough that the per-pass
    overhead dominates."""
    batches, cur = [], []
    for row in rows:
        trial = cur + [row]
        computed = len(trial) * max(len(r[0]) for r in trial)
        wasteful = computed > min_tokens and computed > (1 + max_waste) * sum(len(r[0]) for r in trial)
        if cur and (len(trial) > batch_size or computed > max_tokens or wasteful):
            batches.append(cur)
            trial = [row]
        cur = trial
    if cur:
        batches.append(cur)
    return batches


def score_continuations(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                        max_tokens: int = 1024, progress: bool = False) -> tuple[list[float], list[bool]]:
    """For each (context_ids, continuation_ids): the summed log-probability Σ_j log p(cont_j | ctx, cont_<j),
    and whether greedy decoding after the context reproduces the continuation (every token is the argmax).

    Requests with the same context share one pass over it: the context and all its continuations (each but
    its last token) make one row, a prefix tree (_tree_row), whose attention mask lets a context token see
    the context before it and a continuation token the context and its own continuation before it, with
    positions that restart after the context for each continuation. Every continuation's logits are then
    those it would get alone after its context. Position len(ctx) - 1 scores each continuation's first
    token, a continuation's own positions its later ones; only those positions go through lm_head, and
    rows of similar length are batched, right-padded. An empty continuation scores (0, True)."""
    device = model.model.embed_tokens.weight.device
    by_context: dict[tuple, list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not ctx:
            raise ValueError(f"request {i} has an empty context")
        if cont:
            by_context.setdefault(tuple(ctx), []).append(i)
    rows = [(*_tree_row(list(ctx), [requests[i][1] for i in idx]), idx) for ctx, idx in by_context.items()]
    rows.sort(key=lambda r: len(r[0]), reverse=True)
    batches = _plan_batches(rows, batch_size, max_tokens)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="loglikelihood", unit="batch", leave=False)
    logprob = torch.zeros(len(requests), dtype=torch.float64)
    misses = torch.zeros(len(requests), dtype=torch.long)
    with eval_mode(model):
        for batch in batches:
            B, T = len(batch), max(len(r[0]) for r in batch)
            ids = torch.zeros((B, T), dtype=torch.long)
            pos = torch.zeros((B, T), dtype=torch.long)
            seg = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
            flat, target, owner = [], [], []  # per scored token: flat position b*T + t, its target, its request
            for b, (row_ids, row_pos, row_seg, idx) in enumerate(batch):
                n = len(row_ids)
                ids[b, :n], pos[b, :n], seg[b, :n] = (torch.tensor(x) for x in (row_ids, row_pos, row_seg))
                n_ctx, offset = row_seg.count(0), row_seg.count(0)
                for i in idx:
                    cont = requests[i][1]
                    where = [n_ctx - 1] + list(range(offset, offset + len(cont) - 1))
                    offset += len(cont) - 1
                    flat += [b * T + t for t in where]
                    target += cont
                    owner += [i] * len(cont)
            q = torch.arange(T)
            causal = q[None, :] <= q[:, None]  # (T, T): query t sees keys <= t
            sees = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))  # (B, T, T)
            sees |= torch.eye(T, dtype=torch.bool)  # a padding query sees itself: no all-masked (NaN) row
            hidden = model.hidden(ids.to(device), attention_mask=sees[:, None].to(device),
                                  position_ids=pos.to(device))  # (B, T, hidden)
            unique, rows_of = torch.tensor(flat).unique(return_inverse=True)
            lp, hit = _head_logprobs(model.lm_head, hidden.flatten(0, 1)[unique.to(device)],
                                     rows_of.to(device), torch.tensor(target, device=device))
            owner = torch.tensor(owner)
            logprob.index_add_(0, owner, lp.double().cpu())
            misses.index_add_(0, owner, (~hit).long().cpu())
    return logprob.tolist(), (misses == 0).tolist()
