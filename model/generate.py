"""Batched generation with the static KV cache: greedy, or temperature with nucleus (top-p) sampling.

Prompts are left-padded; the attention mask hides the pads and positions count real tokens only, so a
prompt's continuation does not depend on the other prompts in its batch. Each sequence stops at its own
stop token (any eos id, or an end-of-turn token like <|im_end|>).
"""
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model):
    """No dropout (LoRA's included) and no autograd, restoring the training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, L), attention mask (B, L), 1 = token), right-aligned so that every row's last
    token sits in the last column: the next token of all rows is predicted from one position."""
    B, L = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, L - len(s):] = 1
    return ids, mask


def sample_next(logits, temperature: float, top_p: float, generator):
    """logits (B, vocab) -> next ids (B,). temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p (Holtzman et al. 2020)
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, stop_ids, pad_id: int,
                 temperature: float = 0.0, top_p: float = 1.0, generator=None) -> list[list[int]]:
    """Continue each token list in one batch; returns the new ids of each, without the stop token."""
    device = model.model.embed_tokens.weight.device
    ids, mask = left_pad(prompts, pad_id)  # (B, L)
    B, L = ids.shape
    mask = torch.cat([mask, torch.ones((B, max_new_tokens), dtype=torch.long)], dim=1)  # over every cache slot
    ids, mask = ids.to(device), mask.to(device)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    model.setup_kv_cache(B, L + max_new_tokens)
    # Speed: greedy decoding drops the rows that have stopped from the batch (and the KV cache), a few at a
    # time, so that the later steps do not spend their matrix products on finished sequences; `rows` maps
    # each batch row to its prompt. Rows are independent (masks, positions), so this changes no result.
    # Sampling keeps every row: the random draws would otherwise change with the batch's shape.
    shrink = temperature <= 0
    rows = torch.arange(B, device=device)
    new_ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    n_generated = 0
    try:
        logits = model(ids, attention_mask=mask[:, :L], cache_start=0, last_only=True)[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            new_ids[rows, step] = nxt
            n_generated = step + 1
            done |= torch.isin(nxt, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            n_done = int(done.sum())
            if shrink and n_done and n_done >= len(rows) // 8:  # a cache copy costs a few decoding steps
                keep = (~done).nonzero()[:, 0]
                model.select_kv_cache(keep)
                rows, nxt, mask, done = rows[keep], nxt[keep], mask[keep], done[keep]
            logits = model(nxt[:, None], attention_mask=mask[:, :L + step + 1], cache_start=L + step)[:, -1]
    finally:
        model.clear_kv_cache()
    new = new_ids[:, :n_generated].tolist()  # (B, n_generated)
    stop_set = set(stop.tolist())
    results = []
    for row in new:
        cut = next((j for j, t in enumerate(row) if t in stop_set), len(row))
        results.append(row[:cut])
    return results


def generate(model, tok, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, chat: bool = False, seed: int = 0, batch_size: int = 16,
             progress: bool = False) -> list[str]:
    """Completions (text after the prompt) for each prompt. chat=True wraps each prompt as a user turn
    with the tokenizer's chat template. Prompts are sorted by length into batches to waste little padding."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}]) if chat else p for p in prompts]
    encoded = [tok.encode(t, add_bos=tok.adds_bos and not chat) for t in texts]  # a template writes its own BOS
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    generator = torch.Generator().manual_seed(seed)  # on CPU: the sampling draws are device-independent
    if next(model.parameters()).device.type != "cpu":
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    results: list[str | None] = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="generate", unit="batch", leave=False)
    with eval_mode(model):
        for batch in batches:
            new = generate_ids(model, [encoded[i] for i in batch], max_new_tokens, tok.stop_ids, tok.pad_id,
                               temperature, top_p, generator)
            for i, ids in zip(batch, new):
                results[i] = tok.decode(ids)
    return results
