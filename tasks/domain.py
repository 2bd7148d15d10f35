"""The domain tasks (domain_recall, domain_unseen): the drugs' facts asked in new words, scored two ways: the
strict-match accuracy of greedy chat answers, and the NLL of the reference answer as training sees it (the
training loss on these prompts)."""
from data import tokenize_example
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
