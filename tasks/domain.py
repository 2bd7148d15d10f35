"""The domain tasks. domain_recall and domain_unseen: the drugs' facts asked in new words (or the rows of
train.py --domain-eval), scored two ways: the strict-match accuracy of greedy chat answers, and the NLL of the
reference answer as training sees it (the training loss on these prompts). domain_heldout: the rows of a user's
--data kept out of training (data.is_held_out), the NLL of their answers."""
from data import is_held_out, tokenize_example
from errors import ForgetlabError
from model import IGNORE_INDEX, generate

from .common import Options
from .loglikelihood import score_continuations
from .matching import MATCHERS, accepted_answers


def domain_nll_request(tok, row: dict, max_len: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a prompt/completion row as training sees it (data.tokenize_example):
    the chat-formatted prompt, then the completion's tokens up to its end-of-turn token."""
    ex = tokenize_example(tok, {"prompt": row["prompt"], "completion": row["completion"]}, max_len)
    ids, labels = ex["input_ids"], ex["labels"]
    pos = [t for t, y in enumerate(labels) if y != IGNORE_INDEX]
    if not pos or pos[0] == 0:
        raise ForgetlabError(f"domain row {row['prompt'][:40]!r}: no answer token within max_len={max_len}")
    a, b = pos[0], pos[-1] + 1
    assert labels[a:b] == ids[a:b], "labelled answer tokens must be one contiguous span"
    return ids[:a], ids[a:b]


def score_domain(model, tok, rows, opts: Options, max_new_tokens: int = 48, max_len: int = 512):
    """Each prompt answered greedily as a chat turn, correct when opts.match finds an accepted answer; and the
    per-token NLL of the row's reference completion after the prompt (domain_nll_request)."""
    responses = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, chat=True,
                         batch_size=opts.batch_size, progress=opts.progress)
    requests = [domain_nll_request(tok, r, max_len) for r in rows]
    scores, _ = score_continuations(model, requests, batch_size=opts.batch_size, progress=opts.progress)
    items = []
    for row, resp, s, (_, cont) in zip(rows, responses, scores, requests):
        answers = accepted_answers(row)
        items.append(dict(id=row["id"], drug=row.get("drug"), prompt=row["prompt"], response=resp.strip(),
                          answers=answers, correct=MATCHERS[opts.match](resp, answers), nll=-s / len(cont),
                          tokens=len(cont)))
    return items, dict(match=opts.match)


def held_out_rows(rows: list[dict]) -> list[dict]:
    """domain_heldout's rows: those of the training file that train.py keeps out of training."""
    return [r for r in rows if is_held_out(r)]


def score_heldout(model, tok, rows, opts: Options, max_len: int = 512):
    """The NLL of each held-out row's answer as training sees it (data.tokenize_example, any training format):
    its last answer span after everything before it, token-weighted over the rows."""
    requests = []
    for row in rows:
        ex = tokenize_example(tok, {k: v for k, v in row.items() if k not in ("id", "split")}, max_len)
        pos = [t for t, y in enumerate(ex["labels"]) if y != IGNORE_INDEX and t > 0]
        if not pos:
            raise ForgetlabError(f"held-out row {row['id']}: no answer token within max_len={max_len}")
        end = pos[-1] + 1
        start = end
        while start - 1 in pos:  # back to the start of the last contiguous answer span
            start -= 1
        requests.append((ex["input_ids"][:start], ex["input_ids"][start:end]))
    scores, _ = score_continuations(model, requests, batch_size=opts.batch_size, progress=opts.progress)
    items = [dict(id=row["id"], tokens=len(c), nll=-s / len(c)) for row, s, (_, c) in zip(rows, scores, requests)]
    return items, {}
