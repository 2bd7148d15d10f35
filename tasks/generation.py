"""Tasks scored on greedy generated answers: general QA, whose answer is matched against the accepted answers
(tasks/matching.py), and instruction following, whose response is checked by program
(tasks/instruction_checks.py)."""
from model import generate

from .common import Options, qa_prompt
from .instruction_checks import check_response
from .matching import MATCHERS, accepted_answers, cut_answer


def score_general_qa(model, tok, rows, opts: Options, max_new_tokens: int = 24):
    """Each question answered greedily, as a chat turn or (opts.chat False) a "Question: ...\\nAnswer:"
    completion cut at its answer; correct when opts.match finds an accepted answer. Extra: the accuracy per
    category."""
    prompts = [r["question"] if opts.chat else qa_prompt(r["question"]) for r in rows]
    raw = generate(model, tok, prompts, max_new_tokens=max_new_tokens, chat=opts.chat, batch_size=opts.batch_size,
                   progress=opts.progress)
    items = []
    for row, prompt, text in zip(rows, prompts, raw):
        response = text.strip() if opts.chat else cut_answer(text)
        answers = accepted_answers(row)
        items.append(dict(id=row["id"], category=row.get("category", "all"), prompt=prompt, response=response,
                          answers=answers, correct=MATCHERS[opts.match](response, answers)))
    by_cat: dict[str, list[bool]] = {}
    for it in items:
        by_cat.setdefault(it["category"], []).append(it["correct"])
    return items, dict(chat=opts.chat, match=opts.match,
                       category_accuracy={c: sum(v) / len(v) for c, v in sorted(by_cat.items())})


def score_instructions(model, tok, rows, opts: Options, max_new_tokens: int = 64):
    """Each prompt answered greedily as a chat turn; passed when every one of its checks passes, and the
    failed check types named."""
    responses = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, chat=True,
                         batch_size=opts.batch_size, progress=opts.progress)
    items = []
    for row, text in zip(rows, responses):
        verdict = check_response(row, text.strip())
        items.append(dict(id=row["id"], category=row.get("category"), prompt=row["prompt"], response=text.strip(),
                          passed=verdict["passed"], failed=verdict["failed"]))
    return items, {}
