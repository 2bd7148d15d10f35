"""The lm-evaluation-harness benchmarks (hellaswag, arc_easy, arc_challenge, winogrande, lambada) and MMLU,
scored by log-likelihood, zero-shot, exactly as the harness builds and scores them (../shared/data/README.md):

    mc        each choice scored after the context:
                  logprob(c) = Σ_j log p(c_j | context, c_<j)
                  acc      = mean[argmax_c logprob(c) == gold]
                  acc_norm = mean[argmax_c logprob(c) / len(c) == gold]   (len in characters, no leading space)
    partial   the choice fills a blank; only the text after it is scored (winogrande); acc
    greedy    correct when greedy decoding after the context reproduces the single choice's tokens (lambada);
              the choice's NLL as well
"""
from .common import Options, qa_prompt
from .loglikelihood import score_continuations, split_request


def _norm_len(choice: str) -> int:
    """The character length acc_norm divides by: the choice without its leading space (the harness's)."""
    return max(len(choice[1:] if choice.startswith(" ") else choice), 1)


def _argmax(xs: list[float]) -> int:
    """The index of the largest value, the first of equal ones."""
    return max(range(len(xs)), key=lambda i: xs[i])


def score_benchmark(model, tok, rows, opts: Options):
    """lm-evaluation-harness zero-shot requests (../shared/data/README.md): "mc" scores each choice after the
    context, "partial" scores the continuation after context + choice, "greedy" checks the single choice is
    the greedy continuation. One batched pass over all requests of all rows."""
    requests, spans = [], []
    for row in rows:
        if row["scoring"] == "partial":
            reqs = [split_request(tok, row["context"] + c, row["continuation"]) for c in row["choices"]]
        else:
            reqs = [split_request(tok, row["context"], c) for c in row["choices"]]
        spans.append((len(requests), len(reqs)))
        requests += reqs
    scores, greedy = score_continuations(model, requests, batch_size=opts.batch_size, progress=opts.progress)
    items = []
    for row, (start, n) in zip(rows, spans):
        lps, gold = scores[start:start + n], int(row["gold"])
        item = dict(id=row["id"], logprobs=lps, gold=gold)
        if row["scoring"] == "greedy":
            n_tokens = len(requests[start][1])
            item.update(correct=greedy[start], nll=-lps[0], tokens=n_tokens)
        else:
            pred = _argmax(lps)
            item.update(pred=pred, correct=pred == gold, chance=1 / n)
            if row["scoring"] == "mc":
                pred_norm = _argmax([lp / _norm_len(c) for lp, c in zip(lps, row["choices"])])
                item.update(pred_norm=pred_norm, correct_norm=pred_norm == gold)
        items.append(item)
    return items, {}


def mmlu_as_benchmark(row: dict) -> dict:
    """An MMLU row as an "mc" request: "Question: {q}\\nAnswer:" and " {choice}"."""
    return dict(id=row["id"], context=qa_prompt(row["question"]), choices=[" " + str(c) for c in row["choices"]],
                gold=row["answer"], scoring="mc")


def score_mmlu(model, tok, rows, opts: Options):
    """MMLU scored as an "mc" benchmark (mmlu_as_benchmark); each item keeps its subject."""
    items, extra = score_benchmark(model, tok, [mmlu_as_benchmark(r) for r in rows], opts)
    for it, row in zip(items, rows):
        it["subject"] = row.get("subject")
    return items, extra
