"""General-text perplexity: the token-weighted NLL of prose (ppl = exp(nll)), usually the first signal of
forgetting to move."""
import math

from .common import Options
from .loglikelihood import score_continuations


def score_perplexity(model, tok, rows, opts: Options, max_len: int = 1024):
    """Each text encoded as the model's tokenizer would (a BOS only if it adds one by default) and cut at
    max_len tokens; the first token has nothing to be predicted from, so it is context, not a target."""
    requests, truncated = [], 0
    for row in rows:
        ids = tok.encode(row["text"], add_bos=tok.adds_bos)
        truncated += len(ids) > max_len
        ids = ids[:max_len]
        requests.append((ids[:1], ids[1:]))
    scores, _ = score_continuations(model, requests, batch_size=opts.batch_size, progress=opts.progress)
    items = [dict(id=row["id"], text=row["text"][:80], tokens=len(c), nll=-s / len(c))
             for row, s, (_, c) in zip(rows, scores, requests)]
    nll = sum(it["nll"] * it["tokens"] for it in items) / sum(it["tokens"] for it in items)
    return items, dict(ppl=math.exp(nll), tokens=sum(it["tokens"] for it in items), truncated=truncated)
