"""Measuring forgetting: general QA, an instruction-following checklist, multiple-choice log-likelihood,
general-text perplexity and the domain score, before and after fine-tuning.

    results = evaluate(model, tok, tasks=("general_qa", "ppl"))       # {task: {metrics..., "items": [...]}}
    comparison = compare_forgetting(before, after, threshold=0.10)
    print(format_report(comparison))

    python eval.py --model DIR [--adapter DIR] --tasks general_qa,checklist,mc,ppl,domain --out OUT.json
    python eval.py --compare BEFORE.json AFTER.json

Every task keeps per-item records (prompt, response or log-probabilities, verdict), so each number in
OUT.json can be audited.

Tasks
- general_qa: the prompt `Question: {q}\\nAnswer:`, greedy decoding, the answer cut at the first blank line
  or "\\nQuestion"; correct when the answer or any alias is a lower-cased substring of the response.
  Accuracy overall and per category. `chat=True` asks the bare question as a chat user turn instead.
- checklist: CHECKLIST, a forgetting checklist of instructions with programmatic checks in the spirit of
  IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models"), asked as chat
  turns. Score = severity-weighted pass rate (high 3, medium 2, low 1).
- mc: multiple choice by log-likelihood, the way lm-evaluation-harness scores ARC / HellaSwag:
      context       = "Question: {question}\\nAnswer:"
      continuation  = " " + choice                       (one per choice)
      logprob(c)    = Σ_j log p(c_j | context, c_<j)     (summed over the continuation's tokens)
      acc      = mean[argmax_c logprob(c) == answer]
      acc_norm = mean[argmax_c logprob(c) / len(c) == answer]   (len in characters, as the harness does)
  The context is run once per question through the KV cache and shared by its choices.
- ppl: token-weighted mean negative log-likelihood of held-out general prose, ppl = exp(nll). Usually the
  first signal of forgetting to move, before any accuracy does.
- domain: held-out domain questions asked in chat format; correct when the answer or an alias occurs as a
  whole word (case-insensitive) in the response; plus the NLL of the reference completion given the
  chat-formatted prompt (the training loss on unseen questions).
"""
import json
import math
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from data import read_jsonl, tokenize_example
from errors import ArgumentParser, ForgetlabError, read_json_object, run_cli
from model import IGNORE_INDEX, generate

REPO = Path(__file__).resolve().parent
TASKS = ("general_qa", "checklist", "mc", "ppl", "domain")
DEFAULT_DATA = {
    "general_qa": REPO / "data" / "general_qa.jsonl",
    "mc": REPO.parent / "shared" / "data" / "mmlu_val.jsonl",
    "ppl": REPO / "data" / "general_text.jsonl",
    "domain": REPO / "data" / "drug_qa_heldout.jsonl",
}
REQUIRED_FIELDS = {
    "general_qa": ("question", "answer"),
    "mc": ("question", "choices", "answer"),
    "ppl": ("text",),
    "domain": ("prompt", "completion", "answer"),
}
SEVERITY_WEIGHTS = {"high": 3, "medium": 2, "low": 1}


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


# ----------------------------------------------------------------------------- log-likelihood scoring

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


def _plan_batches(groups: list, batch_size: int, max_tokens: int) -> list[list]:
    """Cut length-sorted groups into batches of at most batch_size contexts whose memory stays bounded:
    rows x (longest continuation) <= max_tokens logit positions (V floats each), and rows x (context +
    continuation) <= 8 * max_tokens KV-cache slots (each row holds its own copy of its context)."""
    batches, cur = [], []
    for g in groups:
        trial = cur + [g]
        rows = sum(len(x[1]) for x in trial)
        width = max(len(c) for x in trial for c in x[1])
        slots = rows * (max(len(x[0]) for x in trial) + width)
        if cur and (len(trial) > batch_size or rows * width > max_tokens or slots > 8 * max_tokens):
            batches.append(cur)
            trial = [g]
        cur = trial
    if cur:
        batches.append(cur)
    return batches


def score_continuations(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                        max_tokens: int = 2048, progress: bool = False) -> list[float]:
    """Summed log-probability Σ_j log p(cont_j | ctx, cont_<j) of each (context_ids, continuation_ids).

    Requests with the same context share one pass over it. Per batch of contexts:
      1. prefill: the left-padded contexts (G, L) fill the KV cache; the last position's logits score
         each continuation's first token;
      2. the cache rows are repeated once per continuation, and the continuations minus their last token,
         right-padded (N, M-1), are run after it; their logits score tokens 2..m.
    Only continuation positions go through lm_head. An empty continuation scores 0."""
    device = model.model.embed_tokens.weight.device
    scores = [0.0] * len(requests)
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
            ctx_ids = torch.zeros((G, L), dtype=torch.long)
            ctx_mask = torch.zeros((G, L), dtype=torch.long)
            for r, g in enumerate(batch):
                ctx_ids[r, L - len(g[0]):] = torch.tensor(g[0])
                ctx_mask[r, L - len(g[0]):] = 1
            ctx_ids, ctx_mask = ctx_ids.to(device), ctx_mask.to(device)
            first = torch.tensor([c[0] for c in conts], device=device)
            model.setup_kv_cache(G, L + M - 1)
            try:
                last = model(ctx_ids, attention_mask=ctx_mask, cache_start=0, last_only=True)[:, -1]  # (G, V)
                lp = _token_logprobs(last.repeat_interleave(counts, dim=0), first)[:, None]  # (N, 1)
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
                    logits = model(inp, attention_mask=mask, cache_start=L)  # (N, M-1, V)
                    rest = _token_logprobs(logits, tgt) * cont_mask
                    lp = torch.cat([lp, rest], dim=1)
            finally:
                model.clear_kv_cache()
            totals = lp.sum(dim=1).tolist()
            for j, i in enumerate(i for g in batch for i in g[2]):
                scores[i] = totals[j]
    return scores


# ----------------------------------------------------------------------------- general QA

def qa_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def cut_answer(text: str) -> str:
    """The answer part of a plain completion: up to the first blank line or the next "\\nQuestion"."""
    text = text.lstrip()
    for stop in ("\n\n", "\nQuestion"):
        text = text.split(stop, 1)[0]
    return text.strip()


def accepted_answers(row: dict) -> list[str]:
    return [str(row["answer"])] + [str(a) for a in row.get("aliases") or []]


def substring_match(response: str, answers: list[str]) -> bool:
    """The lesson's rule: any accepted answer is a lower-cased substring of the response."""
    r = response.lower()
    return any(a.lower() in r for a in answers)


def evaluate_general_qa(model, tok, rows: list[dict], batch_size: int = 16, chat: bool = False,
                        max_new_tokens: int = 24, progress: bool = False) -> dict:
    """Greedy answers to general questions: accuracy, per-category accuracy, and the items."""
    prompts = [r["question"] if chat else qa_prompt(r["question"]) for r in rows]
    raw = generate(model, tok, prompts, max_new_tokens=max_new_tokens, chat=chat, batch_size=batch_size,
                   progress=progress)
    items = []
    for row, prompt, text in zip(rows, prompts, raw):
        response = text.strip() if chat else cut_answer(text)
        answers = accepted_answers(row)
        items.append(dict(category=row.get("category", "all"), prompt=prompt, response=response, raw=text,
                          answers=answers, correct=substring_match(response, answers)))
    by_cat: dict[str, list[bool]] = {}
    for it in items:
        by_cat.setdefault(it["category"], []).append(it["correct"])
    return dict(accuracy=_mean([it["correct"] for it in items]),
                category_accuracy={c: _mean(v) for c, v in sorted(by_cat.items())},
                n=len(items), chat=chat, items=items)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- checklist

def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(word.lower())}(?![a-z0-9])", text.lower()) is not None


def _looks_like_sentence(text: str) -> bool:
    """A grammatical-looking sentence: starts with a capital letter, has 4+ words, ends with . ! or ?"""
    s = text.strip().split("\n")[0].strip()
    return bool(re.match(r"^[\"']?[A-Z]", s)) and len(_words(s)) >= 4 and s.rstrip("\"' ")[-1:] in ".!?"


COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black", "white",
          "gray", "grey", "indigo", "cyan", "magenta", "gold", "silver", "teal", "turquoise", "beige")


def _count_colors(text: str) -> int:
    return sum(_has_word(text, c) for c in COLORS)


def _numbered_items(text: str) -> int:
    return len(re.findall(r"(?m)^\s*\d+[.)]\s+\S", text))


def _bullet_items(text: str) -> int:
    return len(re.findall(r"(?m)^\s*[-*•]\s+\S", text))


def _parse_json(text: str):
    """json.loads of the response, allowing a ``` fence around it (as IFEval does)."""
    s = text.strip()
    fence = re.match(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```\s*$", s, re.S)
    if fence:
        s = fence.group(1).strip()
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return None


def _is_json_object_with(text: str, keys) -> bool:
    obj = _parse_json(text)
    return isinstance(obj, dict) and all(k in obj for k in keys)


def _counts_to_five(text: str) -> bool:
    nums = re.findall(r"\d+", text)
    return any(nums[i:i + 5] == ["1", "2", "3", "4", "5"] for i in range(len(nums)))


CHECKLIST = [
    # The lesson's four.
    dict(name="basic_grammar", severity="high", prompt="Write one sentence about the weather today.",
         check=_looks_like_sentence),
    dict(name="simple_arithmetic", severity="high", prompt="What is 2+2?",
         check=lambda r: _has_word(r, "4") or _has_word(r, "four")),
    dict(name="instruction_following", severity="medium", prompt="List three colors.",
         check=lambda r: _count_colors(r) >= 3),
    dict(name="factual_knowledge", severity="high", prompt="What is the capital of France?",
         check=lambda r: "paris" in r.lower()),
    # Verifiable instruction following, IFEval-style.
    dict(name="word_limit", severity="medium", prompt="Describe the moon in fewer than 20 words.",
         check=lambda r: 0 < len(_words(r)) < 20),
    dict(name="numbered_list", severity="medium",
         prompt="Give a numbered list of three fruits, one per line, like:\n1. ...\n2. ...\n3. ...",
         check=lambda r: _numbered_items(r) >= 3),
    dict(name="bullet_list", severity="low", prompt="Give three tips for sleeping well as a bullet list using '-'.",
         check=lambda r: _bullet_items(r) >= 3),
    dict(name="valid_json", severity="medium",
         prompt='Output only a JSON object with the keys "name" and "age" for a person called Anna who is 30.',
         check=lambda r: _is_json_object_with(r, ("name", "age"))),
    dict(name="all_lowercase", severity="low",
         prompt="Write a short sentence about dogs using only lowercase letters, no capital letters at all.",
         check=lambda r: any(c.isalpha() for c in r) and r == r.lower()),
    dict(name="required_keyword", severity="medium",
         prompt="Write one sentence about the ocean that uses the word 'blue'.",
         check=lambda r: _has_word(r, "blue")),
    dict(name="yes_no_answer", severity="medium", prompt="Is the sun hot? Answer with yes or no.",
         check=lambda r: _has_word(r[:20], "yes")),
    dict(name="one_word_answer", severity="low", prompt="What color is grass? Answer with one word.",
         check=lambda r: len(_words(r)) <= 3 and _has_word(r, "green")),
    dict(name="repeat_exactly", severity="low", prompt="Repeat this sentence exactly: The cat sat on the mat.",
         check=lambda r: "the cat sat on the mat" in r.lower()),
    dict(name="count_to_five", severity="medium", prompt="Count from 1 to 5.", check=_counts_to_five),
    dict(name="uppercase_word", severity="low", prompt="Write the word hello in capital letters.",
         check=lambda r: "HELLO" in r),
    dict(name="no_commas", severity="low", prompt="Write one sentence about cats without using any commas.",
         check=lambda r: len(_words(r)) >= 3 and "," not in r),
]


def checklist_score(items: list[dict]) -> dict:
    """Severity-weighted pass rate Σ w·passed / Σ w (high 3, medium 2, low 1), pass count, per severity."""
    w = [SEVERITY_WEIGHTS[it["severity"]] for it in items]
    by_sev = {s: _mean(it["passed"] for it in items if it["severity"] == s)
              for s in SEVERITY_WEIGHTS if any(it["severity"] == s for it in items)}
    return dict(score=sum(wi * it["passed"] for wi, it in zip(w, items)) / sum(w),
                passed=sum(it["passed"] for it in items), total=len(items), severity_pass_rate=by_sev)


def run_checklist(model, tok, checks: list[dict] = CHECKLIST, batch_size: int = 16, max_new_tokens: int = 64,
                  progress: bool = False) -> dict:
    """Ask each check's prompt as a chat turn (greedy) and apply its check to the response."""
    responses = generate(model, tok, [c["prompt"] for c in checks], max_new_tokens=max_new_tokens, chat=True,
                         batch_size=batch_size, progress=progress)
    items = [dict(name=c["name"], severity=c["severity"], prompt=c["prompt"], response=r.strip(),
                  passed=bool(c["check"](r.strip()))) for c, r in zip(checks, responses)]
    return dict(**checklist_score(items), items=items)


# ----------------------------------------------------------------------------- multiple choice

def mc_context(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer:"


def mc_continuations(row: dict) -> list[str]:
    return [" " + str(c) for c in row["choices"]]


def evaluate_mc(model, tok, rows: list[dict], batch_size: int = 16, progress: bool = False) -> dict:
    """Multiple choice by summed continuation log-probability: acc, acc_norm, and per-item records."""
    requests, spans = [], []
    for row in rows:
        ctx, conts = mc_context(row), mc_continuations(row)
        spans.append((len(requests), len(conts)))
        requests += [split_request(tok, ctx, c) for c in conts]
    scores = score_continuations(model, requests, batch_size=batch_size, progress=progress)
    items = []
    for row, (start, n) in zip(rows, spans):
        lps = scores[start:start + n]
        conts = mc_continuations(row)
        norm = [lp / max(len(c), 1) for lp, c in zip(lps, conts)]
        pred, pred_norm = _argmax(lps), _argmax(norm)
        items.append(dict(subject=row.get("subject"), context=mc_context(row), continuations=conts,
                          logprobs=lps, pred=pred, pred_norm=pred_norm, answer=int(row["answer"])))
    return dict(acc=_mean(it["pred"] == it["answer"] for it in items),
                acc_norm=_mean(it["pred_norm"] == it["answer"] for it in items),
                n=len(items), items=items)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


# ----------------------------------------------------------------------------- perplexity

def evaluate_perplexity(model, tok, rows: list[dict], batch_size: int = 16, max_len: int = 1024,
                        progress: bool = False) -> dict:
    """nll = -Σ log p(x_t | x_<t) / (number of predicted tokens) over all texts; ppl = exp(nll).

    Each text is encoded as the model's tokenizer would (a BOS only if it adds one by default) and cut at
    max_len tokens; the first token has nothing to be predicted from, so it is context, not a target."""
    requests, truncated = [], 0
    for row in rows:
        ids = tok.encode(row["text"], add_bos=tok.adds_bos)
        truncated += len(ids) > max_len
        ids = ids[:max_len]
        requests.append((ids[:1], ids[1:]))
    scores = score_continuations(model, requests, batch_size=batch_size, progress=progress)
    n_tokens = [len(c) for _, c in requests]
    total = sum(n_tokens)
    nll = -sum(scores) / total
    items = [dict(text=row["text"][:80], tokens=n, nll=-s / n if n else float("nan"))
             for row, s, n in zip(rows, scores, n_tokens)]
    return dict(nll=nll, ppl=math.exp(nll), tokens=total, truncated=truncated, n=len(items), items=items)


# ----------------------------------------------------------------------------- domain

def whole_word_match(response: str, answers: list[str]) -> bool:
    """Any accepted answer occurs in the response as whole words, case-insensitively."""
    return any(_has_word(response, a) for a in answers)


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


def evaluate_domain(model, tok, rows: list[dict], batch_size: int = 16, max_new_tokens: int = 48,
                    max_len: int = 512, progress: bool = False) -> dict:
    """Held-out domain questions: whole-word answer accuracy of greedy chat answers, and the token-weighted
    NLL of the reference completions."""
    responses = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, chat=True,
                         batch_size=batch_size, progress=progress)
    requests = [domain_nll_request(tok, r, max_len) for r in rows]
    scores = score_continuations(model, requests, batch_size=batch_size, progress=progress)
    items = []
    for row, resp, s, (_, cont) in zip(rows, responses, scores, requests):
        answers = accepted_answers(row)
        items.append(dict(prompt=row["prompt"], response=resp.strip(), answers=answers,
                          correct=whole_word_match(resp, answers), nll=-s / len(cont), tokens=len(cont)))
    total = sum(it["tokens"] for it in items)
    return dict(accuracy=_mean(it["correct"] for it in items), nll=-sum(scores) / total, tokens=total,
                n=len(items), items=items)


# ----------------------------------------------------------------------------- running tasks

def load_task_rows(task: str, path, limit: int | None = None) -> list[dict]:
    """Rows of a task's JSONL file, checked for the fields the task reads. With a limit, `limit` rows evenly
    spaced over the file (files are often sorted by category or subject, so the first N would cover one)."""
    path = Path(path)
    numbered = read_jsonl(path)
    for lineno, row in numbered:
        missing = [k for k in REQUIRED_FIELDS[task] if k not in row]
        if missing:
            raise ForgetlabError(f"{path}:{lineno}: {task} row is missing field {missing[0]!r} "
                                 f"(needs {', '.join(REQUIRED_FIELDS[task])})")
        if task == "mc" and not (isinstance(row["choices"], list) and isinstance(row["answer"], int)
                                 and 0 <= row["answer"] < len(row["choices"])):
            raise ForgetlabError(f"{path}:{lineno}: mc row needs a list 'choices' and an integer 'answer' index into it")
    rows = [row for _, row in numbered]
    if limit is not None and limit < len(rows):
        if limit < 1:
            raise ForgetlabError(f"--limit must be >= 1, got {limit}")
        rows = [rows[i * len(rows) // limit] for i in range(limit)]
    return rows


def evaluate(model, tok, tasks=TASKS, limit: int | dict | None = None, data_paths: dict | None = None,
             batch_size: int = 16, progress: bool = True, chat_qa: bool = False) -> dict:
    """Run `tasks` on the model as it is (a LoRA adapter applied to it is live in every forward pass).

    Returns {task: {metrics..., "items": [...], "data": path, "seconds": s}}; a task whose default data is
    absent (mc without ../shared) is {"skipped": reason}. data_paths overrides a task's file. limit caps the
    rows of every task (an int) or of some ({"mc": 100, "ppl": 40}); the checklist is always asked whole."""
    data_paths = data_paths or {}
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ForgetlabError(f"unknown task {unknown[0]!r}: choose from {', '.join(TASKS)}")
    results = {}
    for task in tasks:
        t0 = time.perf_counter()
        if task == "checklist":
            res = run_checklist(model, tok, batch_size=batch_size, progress=progress)
        else:
            path = Path(data_paths.get(task) or DEFAULT_DATA[task])
            if task not in data_paths and not path.is_file():
                reason = f"{path} not found"
                print(f"eval: skipping {task}: {reason}", file=sys.stderr)
                results[task] = dict(skipped=reason)
                continue
            rows = load_task_rows(task, path, limit.get(task) if isinstance(limit, dict) else limit)
            if task == "general_qa":
                res = evaluate_general_qa(model, tok, rows, batch_size=batch_size, chat=chat_qa, progress=progress)
            elif task == "mc":
                res = evaluate_mc(model, tok, rows, batch_size=batch_size, progress=progress)
            elif task == "ppl":
                res = evaluate_perplexity(model, tok, rows, batch_size=batch_size, progress=progress)
            else:
                res = evaluate_domain(model, tok, rows, batch_size=batch_size, progress=progress)
            res["data"] = str(path)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[task] = res
        if progress:
            print(f"eval: {task}: {summary_line(task, res)} ({res['seconds']:.1f}s)", file=sys.stderr)
    return results


def summary_line(task: str, res: dict) -> str:
    if "skipped" in res:
        return f"skipped ({res['skipped']})"
    if task == "general_qa":
        return f"accuracy {res['accuracy']:.3f} (n={res['n']})"
    if task == "checklist":
        return f"score {res['score']:.3f}, {res['passed']}/{res['total']} passed"
    if task == "mc":
        return f"acc {res['acc']:.3f}, acc_norm {res['acc_norm']:.3f} (n={res['n']})"
    if task == "ppl":
        return f"nll {res['nll']:.4f}, ppl {res['ppl']:.2f} ({res['tokens']} tokens)"
    return f"accuracy {res['accuracy']:.3f}, nll {res['nll']:.4f} (n={res['n']})"


# ----------------------------------------------------------------------------- before / after

# (name, task, metric, higher is better) for the deltas reported next to the lesson's QA fields.
DELTA_METRICS = (
    ("ppl_nll", "ppl", "nll", False),
    ("ppl", "ppl", "ppl", False),
    ("checklist_score", "checklist", "score", True),
    ("mc_acc", "mc", "acc", True),
    ("mc_acc_norm", "mc", "acc_norm", True),
    ("domain_accuracy", "domain", "accuracy", True),
    ("domain_nll", "domain", "nll", False),
)


METRIC_KEYS = {"accuracy"} | {key for _, _, key, _ in DELTA_METRICS}  # the numbers compare_forgetting reads


def _results(d: dict) -> dict:
    """Accept evaluate()'s dict or a whole OUT.json (which holds it under "results")."""
    return d["results"] if "results" in d else d


def _metric(results: dict, task: str, key: str):
    res = results.get(task)
    if not res or "skipped" in res or key not in res:
        return None
    return res[key]


def compare_forgetting(before: dict, after: dict, threshold: float = 0.10) -> dict:
    """Forgetting between two evaluations, the lesson's fields from general QA:
        accuracy_drop = accuracy_before - accuracy_after,  forgetting_detected = accuracy_drop > threshold,
        category_drops = {category: before - after},  recommendation (a sentence),
    plus deltas = {metric: {before, after, delta = after - before, worse}} for perplexity NLL, checklist,
    MC and domain metrics present on both sides."""
    b, a = _results(before), _results(after)
    acc_b, acc_a = _metric(b, "general_qa", "accuracy"), _metric(a, "general_qa", "accuracy")
    drop = acc_b - acc_a if acc_b is not None and acc_a is not None else None
    cats_b = _metric(b, "general_qa", "category_accuracy") or {}
    cats_a = _metric(a, "general_qa", "category_accuracy") or {}
    category_drops = {c: cats_b[c] - cats_a[c] for c in sorted(cats_b) if c in cats_a}
    detected = drop is not None and drop > threshold
    deltas = {}
    for name, task, key, higher_better in DELTA_METRICS:
        vb, va = _metric(b, task, key), _metric(a, task, key)
        if vb is not None and va is not None:
            delta = va - vb
            deltas[name] = dict(before=vb, after=va, delta=delta, worse=delta < 0 if higher_better else delta > 0)
    return dict(accuracy_before=acc_b, accuracy_after=acc_a, accuracy_drop=drop, threshold=threshold,
                forgetting_detected=detected, category_drops=category_drops,
                recommendation=recommendation(drop, threshold, deltas), deltas=deltas)


def recommendation(drop, threshold: float, deltas: dict) -> str:
    if drop is None:
        return "General QA was not evaluated on both sides: forgetting cannot be judged by accuracy."
    if drop > threshold:
        return (f"Significant forgetting detected (general QA accuracy dropped {drop:.1%} > {threshold:.0%}): "
                "consider LoRA, a lower learning rate, fewer epochs, replay of general data, or EWC.")
    nll = deltas.get("ppl_nll")
    if drop > threshold / 2 or (nll is not None and nll["delta"] > 0.1):
        return ("Mild forgetting (accuracy within the threshold, but general ability is slipping): watch it; "
                "replay or a lower learning rate would limit it.")
    return "No significant forgetting."


def format_report(comparison: dict, title: str = "Forgetting report") -> str:
    """The comparison as a markdown report: headline verdict, metric table, per-category drops."""
    c = comparison
    lines = [f"## {title}", ""]
    if c["accuracy_drop"] is not None:
        lines.append(f"General QA accuracy: {c['accuracy_before']:.3f} → {c['accuracy_after']:.3f} "
                     f"(drop {c['accuracy_drop']:+.3f}, threshold {c['threshold']:.2f}): "
                     f"**{'forgetting detected' if c['forgetting_detected'] else 'no significant forgetting'}**")
    lines += ["", c["recommendation"], ""]
    if c["deltas"]:
        lines += ["| metric | before | after | delta |", "|---|---:|---:|---:|"]
        for name, d in c["deltas"].items():
            flag = " (worse)" if d["worse"] else ""
            lines.append(f"| {name} | {d['before']:.4f} | {d['after']:.4f} | {d['delta']:+.4f}{flag} |")
        lines.append("")
    if c["category_drops"]:
        lines += ["| category | accuracy drop |", "|---|---:|"]
        lines += [f"| {cat} | {d:+.3f} |" for cat, d in sorted(c["category_drops"].items(), key=lambda x: -x[1])]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def read_results(path) -> dict:
    """An eval.py results file, checked enough that comparing it cannot crash: a JSON object whose "results"
    object maps tasks to objects, their metrics numbers."""
    d = read_json_object(path, "results file")
    if not isinstance(d.get("results"), dict):
        raise ForgetlabError(f"{path}: not an eval.py results file (no \"results\" object)")
    for task, res in d["results"].items():
        if not isinstance(res, dict):
            raise ForgetlabError(f"{path}: results.{task} is not an object")
        for key, value in res.items():
            if key in METRIC_KEYS and not (value is None or isinstance(value, (int, float))):
                raise ForgetlabError(f"{path}: results.{task}.{key} is not a number")
        if not isinstance(res.get("category_accuracy", {}), dict) or not all(
                isinstance(v, (int, float)) for v in res.get("category_accuracy", {}).values()):
            raise ForgetlabError(f"{path}: results.{task}.category_accuracy is not an object of numbers")
    return d


def write_json(path, obj):
    from model.checkpoint import write_atomic_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def parse_tasks(spec: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
    for t in tasks:
        if t not in TASKS:
            raise ForgetlabError(f"--tasks: unknown task {t!r}: choose from {', '.join(TASKS)}")
    if not tasks:
        raise ForgetlabError("--tasks: no task given")
    return tasks


def main(argv=None):
    p = ArgumentParser(description="Evaluate general capabilities and the domain, or compare two runs.")
    p.add_argument("--model", help="checkpoint directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="LoRA adapter directory to apply on top of the model")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--data", help="JSONL file replacing the default data of the (single) task given")
    p.add_argument("--limit", type=int, help="evaluate N rows per task, evenly spaced over the file")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chat", action="store_true", help="ask general_qa questions in chat format")
    p.add_argument("--out", help="write the results (with per-item records) to this JSON file")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two results files")
    p.add_argument("--threshold", type=float, default=0.10, help="accuracy drop that counts as forgetting")
    args = p.parse_args(argv)

    if args.compare:
        comparison = compare_forgetting(read_results(args.compare[0]), read_results(args.compare[1]),
                                        args.threshold)
        print(format_report(comparison))
        if args.out:
            write_json(args.out, comparison)
        return

    tasks = parse_tasks(args.tasks)
    data_paths = {}
    if args.data:
        if len(tasks) != 1 or tasks[0] == "checklist":
            raise ForgetlabError("--data replaces one task's data: give exactly one of "
                                 "general_qa, mc, ppl, domain in --tasks")
        if not Path(args.data).is_file():
            raise ForgetlabError(f"{args.data}: data file not found")
        data_paths[tasks[0]] = args.data
    if args.batch_size < 1:
        raise ForgetlabError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.model is not None and not Path(args.model).is_dir():
        raise ForgetlabError(f"{args.model}: model directory not found")
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise ForgetlabError(f"{args.adapter}: adapter directory not found")

    from model import load_pretrained

    model, tok = load_pretrained(args.model)
    if args.adapter:
        from lora import load_adapter

        load_adapter(model, args.adapter)
    results = evaluate(model, tok, tasks, limit=args.limit, data_paths=data_paths, batch_size=args.batch_size,
                       chat_qa=args.chat)
    for task, res in results.items():
        print(f"{task}: {summary_line(task, res)}")
    if args.out:
        write_json(args.out, dict(model=args.model or "default (SmolLM2-135M-Instruct)", adapter=args.adapter,
                                  tasks=list(tasks), limit=args.limit, batch_size=args.batch_size,
                                  chat_qa=args.chat, results=results))


if __name__ == "__main__":
    run_cli(main)
