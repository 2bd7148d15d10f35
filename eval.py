"""Measuring forgetting: general-ability benchmarks, chat QA, instruction following, general-text NLL and the
domain, before and after fine-tuning, each number with its 95% interval, and paired before/after comparisons.

    results = evaluate(model, tok)                          # the "full" level: what train.py runs before and after
    results = evaluate(model, tok, tasks=("hellaswag", "arc_easy"), limit=500, split="all")
    comparison = compare_forgetting(before, after)          # per metric: paired difference, interval, verdict
    print(format_report(comparison))

    python eval.py --model DIR [--adapter DIR] [--level full|quick] [--tasks T1,T2] [--split dev|test|all]
                   [--limit N] [--match strict|substring] --out OUT.json
    python eval.py --compare BEFORE.json AFTER.json

TASKS, below, is the one table of tasks: each names its data file, the fields its rows need, its scorer and
the metrics it reports. Adding a task is one entry there.

  general_qa     data/general_qa.jsonl, asked as a chat turn, greedy, 24 new tokens; correct when the answer or
                 an alias matches (MATCH_RULES) in the answer span. Accuracy, and per category.
  instructions   data/instructions.jsonl: IFEval-style prompts (Zhou et al. 2023) with programmatic checks
                 (instruction_checks.py), greedy chat answers of at most 64 tokens; pass = every check passes.
  hellaswag, arc_easy, arc_challenge    multiple choice by log-likelihood, zero-shot, exactly as
                 lm-evaluation-harness builds and scores them (../shared/data/README.md):
                     logprob(c) = Σ_j log p(c_j | context, c_<j)        (summed over the choice's tokens)
                     acc      = mean[argmax_c logprob(c) == gold]
                     acc_norm = mean[argmax_c logprob(c) / len(c) == gold]   (len in characters, no leading space)
  winogrande     partial scoring: the option fills the blank, only the text after it is scored; acc.
  lambada        greedy: correct when greedy decoding of the passage reproduces its last word's tokens exactly;
                 acc, and the word's mean NLL (perplexity = exp of it, the harness's definition).
  mmlu           ../shared/data/mmlu_val.jsonl as "Question: ...\\nAnswer:" + " choice", scored like ARC. The
                 default model is at chance on it: kept as a task, not in the default levels.
  ppl            token-weighted NLL of the general prose in data/general_text.jsonl (ppl = exp(nll)): usually
                 the first signal of forgetting to move.
  domain_recall  the trained drugs' facts asked in new words (data/domain_recall.jsonl): recall under
                 paraphrase, not generalization. Strict-match accuracy of greedy chat answers (48 tokens), and
                 the NLL of the reference answer (the training loss on these prompts).
  domain_unseen  the same on drugs never trained on, of drug classes that were (data/domain_unseen.jsonl):
                 what fine-tuning taught beyond the facts it saw.

Splits. Every file has fixed, disjoint dev and test halves: the repository's rows carry a "split" field; the
public benchmarks are split by a hash of the item's id (sha256(id) even = dev). Choose hyper-parameters on dev,
report test. --limit N takes N items evenly spaced over the split (files are often sorted by subject).

Statistics (stats.py). Each accuracy has a Wilson interval, each NLL a bootstrap interval over items. Before vs
after pairs the same items: Newcombe's interval (and McNemar's exact p) for accuracies, a paired bootstrap for
NLLs. The verdict follows the interval of the difference ("forgot", "no detectable change", "improved"); a
metric whose intervals include chance on both sides is "at chance", never a change.

Every task keeps per-item records (prompt, response or log-probabilities, verdict), so each number in OUT.json
can be audited and paired.
"""
import hashlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import stats
from data import read_jsonl, tokenize_example
from errors import ArgumentParser, ForgetlabError, no_space_error, read_json_object, run_cli
from model import IGNORE_INDEX, eval_mode, generate, left_pad

REPO = Path(__file__).resolve().parent
SHARED = REPO.parent / "shared" / "data"
SPLITS = ("dev", "test", "all")
MATCH_RULES = {
    "strict": "the answer or an alias on word and number boundaries in the answer's first sentence",
    "substring": "the answer or an alias as a lower-cased substring of the whole response (the original rule)",
}


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
                    logits = model(inp, attention_mask=mask, cache_start=L)  # (N, M-1, V)
                    lp = torch.cat([lp, _token_logprobs(logits, tgt) * cont_mask], dim=1)
                    hit = torch.cat([hit, (logits.argmax(-1) == tgt) | (cont_mask == 0)], dim=1)
            finally:
                model.clear_kv_cache()
            totals, all_hit = lp.sum(dim=1).tolist(), hit.all(dim=1).tolist()
            for j, i in enumerate(i for g in batch for i in g[2]):
                scores[i], greedy[i] = totals[j], all_hit[j]
    return scores, greedy


# ----------------------------------------------------------------------------- answer matching

def cut_answer(text: str) -> str:
    """The answer part of a plain completion: up to the first blank line or the next "\\nQuestion"."""
    text = text.lstrip()
    for stop in ("\n\n", "\nQuestion"):
        text = text.split(stop, 1)[0]
    return text.strip()


def answer_span(response: str) -> str:
    """The part of a response that states the answer: its first non-empty line, up to the end of its first
    sentence (". ", "! " or "? "; a decimal point like "3.5" does not end a sentence)."""
    line = next((ln.strip() for ln in response.strip().splitlines() if ln.strip()), "")
    return re.split(r"(?<=[.!?])\s+", line, maxsplit=1)[0]


def _boundary_pattern(answer: str) -> str:
    """The answer on word and number boundaries: no letter or digit may touch either end ("mean" is not in
    "means", "8" not in "18" or "8.5", "10" not in "100"), and a number may not continue with ".5" or ",000"."""
    a = re.escape(" ".join(answer.lower().split()))
    return rf"(?<![a-z0-9])(?<![0-9][.,]){a}(?![a-z0-9])(?![.,][0-9])"


def strict_match(response: str, answers: list[str]) -> bool:
    """An accepted answer occurs, case-insensitively and on word and number boundaries, in the answer span."""
    span = " ".join(answer_span(response).lower().split())
    return any(re.search(_boundary_pattern(a), span) for a in answers if a.strip())


def substring_match(response: str, answers: list[str]) -> bool:
    """The original rule: any accepted answer is a lower-cased substring of the whole response."""
    r = response.lower()
    return any(a.lower() in r for a in answers)


MATCHERS = {"strict": strict_match, "substring": substring_match}


def accepted_answers(row: dict) -> list[str]:
    return [str(row["answer"])] + [str(a) for a in row.get("aliases") or []]


# ----------------------------------------------------------------------------- scorers
# Each scorer(model, tok, rows, opts) returns the per-item records (with an "id") and any extra results.

@dataclass(frozen=True)
class Options:
    batch_size: int = 64
    chat: bool = True  # general_qa as a chat turn (else "Question: ...\nAnswer:" completion)
    match: str = "strict"
    progress: bool = False


def qa_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def score_general_qa(model, tok, rows, opts: Options, max_new_tokens: int = 24):
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
    from instruction_checks import check_response

    responses = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, chat=True,
                         batch_size=opts.batch_size, progress=opts.progress)
    items = []
    for row, text in zip(rows, responses):
        verdict = check_response(row, text.strip())
        items.append(dict(id=row["id"], category=row.get("category"), prompt=row["prompt"], response=text.strip(),
                          passed=verdict["passed"], failed=verdict["failed"]))
    return items, {}


def _norm_len(choice: str) -> int:
    """The character length acc_norm divides by: the choice without its leading space (the harness's)."""
    return max(len(choice[1:] if choice.startswith(" ") else choice), 1)


def _argmax(xs: list[float]) -> int:
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
    items, extra = score_benchmark(model, tok, [mmlu_as_benchmark(r) for r in rows], opts)
    for it, row in zip(items, rows):
        it["subject"] = row.get("subject")
    return items, extra


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


# ----------------------------------------------------------------------------- the task table

@dataclass(frozen=True)
class Metric:
    """A number reported with its interval and paired before/after: the mean of the items' `field`, weighted by
    their `weight` field when given (tokens, for a token-weighted NLL). binary: a proportion of booleans."""
    key: str
    field: str
    higher_is_better: bool = True
    weight: str | None = None
    binary: bool = True


ACC = Metric("acc", "correct")
ACC_NORM = Metric("acc_norm", "correct_norm")
ACCURACY = Metric("accuracy", "correct")
TOKEN_NLL = Metric("nll", "nll", higher_is_better=False, weight="tokens", binary=False)
WORD_NLL = Metric("nll", "nll", higher_is_better=False, binary=False)


@dataclass(frozen=True)
class Task:
    name: str
    data: Path
    fields: tuple[str, ...]  # what every row must have
    score: Callable  # score(model, tok, rows, opts) -> (items, extra results)
    metrics: tuple[Metric, ...]
    uses_match: bool = False  # its accuracy depends on --match


BENCHMARK_FIELDS = ("id", "context", "choices", "gold", "scoring")
TASKS = {t.name: t for t in [
    Task("general_qa", REPO / "data" / "general_qa.jsonl", ("question", "answer"), score_general_qa, (ACCURACY,),
         uses_match=True),
    Task("instructions", REPO / "data" / "instructions.jsonl", ("id", "prompt", "checks"), score_instructions,
         (Metric("pass_rate", "passed"),)),
    Task("hellaswag", SHARED / "hellaswag.jsonl", BENCHMARK_FIELDS, score_benchmark, (ACC, ACC_NORM)),
    Task("arc_easy", SHARED / "arc_easy.jsonl", BENCHMARK_FIELDS, score_benchmark, (ACC, ACC_NORM)),
    Task("arc_challenge", SHARED / "arc_challenge.jsonl", BENCHMARK_FIELDS, score_benchmark, (ACC, ACC_NORM)),
    Task("winogrande", SHARED / "winogrande.jsonl", BENCHMARK_FIELDS + ("continuation",), score_benchmark, (ACC,)),
    Task("lambada", SHARED / "lambada_openai.jsonl", BENCHMARK_FIELDS, score_benchmark, (ACC, WORD_NLL)),
    Task("mmlu", SHARED / "mmlu_val.jsonl", ("question", "choices", "answer"), score_mmlu, (ACC, ACC_NORM)),
    Task("ppl", REPO / "data" / "general_text.jsonl", ("text",), score_perplexity, (TOKEN_NLL,)),
    Task("domain_recall", REPO / "data" / "domain_recall.jsonl", ("prompt", "completion", "answer"), score_domain,
         (ACCURACY, TOKEN_NLL), uses_match=True),
    Task("domain_unseen", REPO / "data" / "domain_unseen.jsonl", ("prompt", "completion", "answer"), score_domain,
         (ACCURACY, TOKEN_NLL), uses_match=True),
]}

# The before/after evaluations of train.py (--eval) and eval.py (--level): {task: items (None = the whole test
# split)}, always on the test split. "full" keeps within the CPU time of the original five-task evaluation
# (README), so the benchmarks enter as evenly spaced subsets of the two the default model is clearly above
# chance on: log-likelihood scoring costs about 0.17 s per item on ARC-Easy and 0.14 s on LAMBADA there, 0.42 s
# on HellaSwag (whose acc is at chance on 100 items, so it is left to --tasks). Whole sets: --split all.
LEVELS = {
    "full": {"general_qa": None, "instructions": None, "ppl": None, "domain_recall": None, "domain_unseen": None,
             "arc_easy": 200, "lambada": 200},
    "quick": {"general_qa": 64, "ppl": 32, "domain_recall": 32, "domain_unseen": 32},
    # the study (scripts/sweep.py --protocol): run with split "all", so that one evaluation gives the dev half
    # that settings are chosen on and the test half that is reported
    "study": {"general_qa": 200, "ppl": None, "domain_recall": None, "domain_unseen": None,
              "arc_easy": 300, "lambada": 300},
}


# ----------------------------------------------------------------------------- rows and splits

def row_split(row: dict) -> str:
    """A row's fixed split: its "split" field, else (the public benchmarks) a hash of its id: sha256 even = dev."""
    if "split" in row:
        return row["split"]
    return "dev" if hashlib.sha256(str(row["id"]).encode()).digest()[-1] % 2 == 0 else "test"


def _check_row(task: str, row: dict) -> str | None:
    """What is wrong with a row the task's scorer would read, or None."""
    missing = [k for k in TASKS[task].fields if k not in row]
    if missing:
        return f"{task} row is missing field {missing[0]!r} (needs {', '.join(TASKS[task].fields)})"
    if row.get("split", "dev") not in ("dev", "test"):
        return f"split must be \"dev\" or \"test\", got {row['split']!r}"
    if "choices" in row:
        gold = row.get("gold", row.get("answer"))
        if not (isinstance(row["choices"], list) and row["choices"] and isinstance(gold, int)
                and 0 <= gold < len(row["choices"])):
            return f"{task} row needs a non-empty list 'choices' and an integer index into it"
    if "scoring" in row and row["scoring"] not in ("mc", "partial", "greedy"):
        return f"unknown scoring {row['scoring']!r} (mc, partial or greedy)"
    return None


def load_task_rows(task: str, path, split: str = "all", limit: int | None = None) -> list[dict]:
    """Rows of a task's JSONL file, checked for the fields the task reads, each with an "id" (its own, else
    "<file>:<line>"); those of `split` ("dev", "test" or "all"); with a limit, `limit` rows evenly spaced over
    them (files are often sorted by category or subject, so the first N would cover one)."""
    path = Path(path)
    if task == "instructions":
        from instruction_checks import load_instructions

        load_instructions(path)  # validates every row and its checks, naming the line
    numbered = read_jsonl(path)
    rows = []
    for lineno, row in numbered:
        problem = _check_row(task, row)
        if problem:
            raise ForgetlabError(f"{path}:{lineno}: {problem}")
        rows.append({"id": f"{path.name}:{lineno}", **row})
    if split != "all":
        rows = [r for r in rows if row_split(r) == split]
    if limit is not None and limit < len(rows):
        if limit < 1:
            raise ForgetlabError(f"--limit must be >= 1, got {limit}")
        rows = [rows[i * len(rows) // limit] for i in range(limit)]
    return rows


# ----------------------------------------------------------------------------- running tasks

def summarize(task: Task, items: list[dict]) -> dict:
    """Each metric's value and 95% interval from the items: Wilson for a proportion, a bootstrap over items for a
    (weighted) mean; the mean chance level and whether each accuracy's interval includes it."""
    out = {}
    chances = [it["chance"] for it in items if "chance" in it]
    chance = sum(chances) / len(chances) if chances and len(chances) == len(items) else None
    for m in task.metrics:
        xs = [it[m.field] for it in items]
        if m.binary:
            k, n = sum(map(bool, xs)), len(xs)
            out[m.key], out[f"{m.key}_ci"] = (k / n if n else float("nan")), list(stats.wilson_interval(k, n))
            if chance is not None:
                out[f"{m.key}_at_chance"] = stats.at_chance(*out[f"{m.key}_ci"], chance)
        else:
            w = [it[m.weight] for it in items] if m.weight else None
            value, lo, hi = stats.paired_bootstrap([0.0] * len(xs), xs, weights=w)  # one sample: before = 0
            out[m.key], out[f"{m.key}_ci"] = value, [lo, hi]
    if chance is not None:
        out["chance"] = chance
    return out


def evaluate(model, tok, tasks=None, level: str = "full", limit: int | dict | None = None, split: str = "test",
             data_paths: dict | None = None, batch_size: int = 64, progress: bool = True, chat: bool = True,
             match: str = "strict") -> dict:
    """Run `tasks` (default: the level's tasks with its item limits) on the model as it is (a LoRA adapter
    applied to it is live in every forward pass).

    Returns {task: {metric: value, metric_ci: [lo, hi], ..., "n", "items": [...], "data", "split", "seconds"}};
    a task whose default data is absent (the benchmarks without ../shared) is {"skipped": reason}. data_paths
    overrides a task's file; limit caps the items of every task (an int) or of some ({"hellaswag": 100})."""
    if tasks is None:
        if level not in LEVELS:
            raise ForgetlabError(f"unknown evaluation level {level!r}: choose from {', '.join(LEVELS)}")
        tasks, limit = tuple(LEVELS[level]), {**LEVELS[level], **(limit if isinstance(limit, dict) else {})}
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ForgetlabError(f"unknown task {unknown[0]!r}: choose from {', '.join(TASKS)}")
    if split not in SPLITS or match not in MATCHERS:
        raise ForgetlabError(f"split must be one of {SPLITS} and match one of {tuple(MATCHERS)}")
    data_paths, opts = data_paths or {}, Options(batch_size, chat, match, progress)
    results = {}
    for name in tasks:
        task, t0 = TASKS[name], time.perf_counter()
        path = Path(data_paths.get(name) or task.data)
        if name not in data_paths and not path.is_file():
            results[name] = dict(skipped=f"{path} not found")
            print(f"eval: skipping {name}: {path} not found", file=sys.stderr)
            continue
        n_limit = limit.get(name) if isinstance(limit, dict) else limit
        rows = load_task_rows(name, path, split, n_limit)
        items, extra = task.score(model, tok, rows, opts)
        for row, item in zip(rows, items, strict=True):
            item["split"] = row_split(row)  # so that a split="all" evaluation can be summarized per split
        res = dict(**summarize(task, items), n=len(items), **extra, data=str(path), split=split, limit=n_limit,
                   items=items, seconds=round(time.perf_counter() - t0, 2))
        results[name] = res
        if progress:
            print(f"eval: {name}: {summary_line(name, res)} ({res['seconds']:.1f}s)", file=sys.stderr)
    return results


def summary_line(name: str, res: dict) -> str:
    """'acc 0.412 [0.357, 0.469], acc_norm ... (n=300)'; an accuracy whose interval includes chance says so."""
    if "skipped" in res:
        return f"skipped ({res['skipped']})"
    parts = []
    for m in TASKS[name].metrics:
        digits = 3 if m.binary else 4
        text = f"{m.key} {stats.format_interval(res[m.key], *res[f'{m.key}_ci'], digits=digits)}"
        if res.get(f"{m.key}_at_chance"):
            text += f" (at chance, {res['chance']:.3f})"
        parts.append(text)
    return ", ".join(parts) + f" (n={res['n']})"


# ----------------------------------------------------------------------------- before / after

def _results(d: dict) -> dict:
    """Accept evaluate()'s dict or a whole OUT.json (which holds it under "results")."""
    return d["results"] if "results" in d else d


def compare_metric(metric: Metric, before: dict, after: dict) -> dict:
    """One metric of one task, before vs after on the same items: the paired difference after − before with its
    95% interval (Newcombe's for a proportion, with McNemar's exact p; a paired bootstrap for a mean) and the
    verdict that interval gives. Both sides at chance: "at chance", whatever the difference."""
    ib, ia = before["items"], after["items"]
    xb, xa = [it[metric.field] for it in ib], [it[metric.field] for it in ia]
    row = dict(metric=metric.key, n=len(ib), higher_is_better=metric.higher_is_better,
               before=before[metric.key], before_ci=before[f"{metric.key}_ci"],
               after=after[metric.key], after_ci=after[f"{metric.key}_ci"], p=None)
    if metric.binary:
        row["delta"], lo, hi = stats.paired_accuracy_difference(xb, xa)
        row["p"] = stats.mcnemar(xb, xa)["p"]
    else:
        w = [it[metric.weight] for it in ib] if metric.weight else None
        row["delta"], lo, hi = stats.paired_bootstrap(xb, xa, weights=w)
    row["delta_ci"] = [lo, hi]
    at_chance = before.get(f"{metric.key}_at_chance") and after.get(f"{metric.key}_at_chance")
    row["verdict"] = "at chance" if at_chance else stats.verdict(lo, hi, metric.higher_is_better)
    return row


def compare_forgetting(before: dict, after: dict) -> dict:
    """Every metric of every task evaluated on both sides, paired item by item (compare_metric), plus
    forgot / improved lists, a one-line summary, and general QA's per-category accuracies (descriptive: a dozen
    questions each, too few for a verdict). Raises ForgetlabError if the two sides scored different items."""
    b, a = _results(before), _results(after)
    rows = []
    for name, task in TASKS.items():
        rb, ra = b.get(name), a.get(name)
        if not rb or not ra or "skipped" in rb or "skipped" in ra:
            continue
        if [it["id"] for it in rb["items"]] != [it["id"] for it in ra["items"]]:
            raise ForgetlabError(f"{name}: before and after were evaluated on different items (split or limit "
                                 "differ), so they cannot be paired")
        for m in task.metrics:
            rows.append(dict(task=name, **compare_metric(m, rb, ra)))
    forgot = [f"{r['task']} {r['metric']}" for r in rows if r["verdict"] == "forgot"]
    improved = [f"{r['task']} {r['metric']}" for r in rows if r["verdict"] == "improved"]
    qa_b, qa_a = b.get("general_qa") or {}, a.get("general_qa") or {}
    cats = {c: dict(before=v, after=qa_a["category_accuracy"][c])
            for c, v in (qa_b.get("category_accuracy") or {}).items() if c in (qa_a.get("category_accuracy") or {})}
    return dict(metrics=rows, forgot=forgot, improved=improved, summary=summary_sentence(forgot, improved, rows),
                categories=cats, split=next((r.get("split") for r in b.values() if isinstance(r, dict)
                                              and "split" in r), None),
                match=next((r["match"] for r in b.values() if isinstance(r, dict) and "match" in r), None))


def summary_sentence(forgot: list[str], improved: list[str], rows: list[dict]) -> str:
    """One line: what got worse, what got better (each judged by its paired interval), or neither."""
    if not rows:
        return "No task was evaluated on both sides: nothing to compare."
    better = f" Improved: {', '.join(improved)}." if improved else ""
    if forgot:
        return (f"Forgetting detected (the 95% interval of the paired difference excludes zero) on: "
                f"{', '.join(forgot)}.{better} Mitigations: LoRA, a lower learning rate, fewer epochs, replay of "
                "general data, EWC.")
    return f"No detectable forgetting: no metric's interval of change lies on the worse side of zero.{better}"


def format_report(comparison: dict, title: str = "Forgetting report") -> str:
    """The comparison as markdown: the summary, one row per metric with both intervals, the paired difference,
    McNemar's p for accuracies and the verdict, and the rules used."""
    c = comparison
    lines = [f"## {title}", "", c["summary"], ""]
    rules = [f"split: {c['split']}"] if c.get("split") else []
    if c.get("match"):
        rules.append(f"answer matching: {c['match']} ({MATCH_RULES[c['match']]})")
    if rules:
        lines += ["; ".join(rules) + ". Intervals are 95%; differences are paired by item (after − before).", ""]
    if c["metrics"]:
        lines += ["| task | metric | n | before | after | after − before | p | verdict |",
                  "|---|---|---:|---|---|---|---:|---|"]
        for r in c["metrics"]:
            d = 3 if r["p"] is not None else 4
            p = f"{r['p']:.3f}" if r["p"] is not None else ""
            lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | "
                         f"{stats.format_interval(r['before'], *r['before_ci'], digits=d)} | "
                         f"{stats.format_interval(r['after'], *r['after_ci'], digits=d)} | "
                         f"{stats.format_interval(r['delta'], *r['delta_ci'], digits=d)} | {p} | {r['verdict']} |")
        lines.append("")
    if c.get("categories"):
        lines += ["General QA by category (descriptive only: too few questions each for a verdict):", "",
                  "| category | before | after |", "|---|---:|---:|"]
        lines += [f"| {cat} | {v['before']:.3f} | {v['after']:.3f} |" for cat, v in sorted(c["categories"].items())]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def read_results(path) -> dict:
    """An eval.py results file (a JSON object whose "results" maps tasks to results), checked by check_results."""
    d = read_json_object(path, "results file")
    if not isinstance(d.get("results"), dict):
        raise ForgetlabError(f"{path}: not an eval.py results file (no \"results\" object)")
    check_results(d["results"], path)
    return d


def check_results(results: dict, where) -> dict:
    """Checked enough that comparing cannot crash: each task's metrics are numbers with [lo, hi] intervals and
    its items a list of records with an id and the fields the metrics read. Problems name `where`."""
    for name, res in results.items():
        if not isinstance(res, dict):
            raise ForgetlabError(f"{where}: results.{name} is not an object")
        if name not in TASKS or "skipped" in res:
            continue
        items = res.get("items")
        if not isinstance(items, list) or not all(isinstance(it, dict) and "id" in it for it in items):
            raise ForgetlabError(f"{where}: results.{name}.items is not a list of per-item records with ids")
        if not items:
            raise ForgetlabError(f"{where}: results.{name}.items is empty: there is nothing to compare")
        for m in TASKS[name].metrics:
            ci = res.get(f"{m.key}_ci")
            if not isinstance(res.get(m.key), (int, float)) or not (
                    isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci)):
                raise ForgetlabError(f"{where}: results.{name}.{m.key} is not a number with a [lo, hi] interval")
            if not all(finite_number(it.get(m.field)) for it in items):
                raise ForgetlabError(f"{where}: results.{name}.items lack the finite number {m.field!r} "
                                     f"(item {next(it['id'] for it in items if not finite_number(it.get(m.field)))})")
            if m.weight and not all(finite_number(it.get(m.weight)) for it in items):
                raise ForgetlabError(f"{where}: results.{name}.items lack the finite weight {m.weight!r}")
    return results


def finite_number(x) -> bool:
    """A bool, an int or a finite float: a NaN per-item value would make every paired statistic NaN."""
    return isinstance(x, (bool, int)) or (isinstance(x, float) and math.isfinite(x))


def check_writable_file(path):
    """--out names a file that can be written: not a directory, inside a directory (or one that can be made).
    Checked before the evaluation, whose results would otherwise be lost at the end."""
    path = Path(path)
    if path.is_dir():
        raise ForgetlabError(f"--out {path}: is a directory; give a file name")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ForgetlabError(f"--out {path}: cannot be written ({parent} is not a writable directory)")


def write_json(path, obj):
    import json

    from model.checkpoint import write_atomic_text

    path = Path(path)
    text = json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic_text(path, text)
    except OSError as e:
        raise (no_space_error(path, e, len(text.encode())) or
               ForgetlabError(f"--out {path}: cannot be written ({e.strerror or e})")) from None


def parse_tasks(spec: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
    for t in tasks:
        if t not in TASKS:
            raise ForgetlabError(f"--tasks: unknown task {t!r}: choose from {', '.join(TASKS)}")
    if not tasks:
        raise ForgetlabError("--tasks: no task given")
    return tasks


def main(argv=None):
    p = ArgumentParser(description="Evaluate general capabilities and the domain, or compare two evaluations.")
    p.add_argument("--model", help="checkpoint directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="LoRA adapter directory to apply on top of the model")
    p.add_argument("--level", default="full", choices=tuple(LEVELS),
                   help="the tasks and item counts of train.py's --eval level of the same name: "
                        + "; ".join(f"{k}: " + ", ".join(f"{t}" + (f" {n}" if n else "") for t, n in v.items())
                                    for k, v in LEVELS.items()))
    p.add_argument("--tasks", help=f"comma-separated tasks instead of the level's: {', '.join(TASKS)}")
    p.add_argument("--split", default="test", choices=SPLITS, help="evaluate the dev or test half, or all items")
    p.add_argument("--data", help="JSONL file replacing the default data of the (single) task given")
    p.add_argument("--limit", type=int, help="evaluate N items per task, evenly spaced over the split")
    p.add_argument("--match", default="strict", choices=tuple(MATCH_RULES),
                   help="answer matching for general_qa and the domain tasks: "
                        + "; ".join(f"{k}: {v}" for k, v in MATCH_RULES.items()))
    p.add_argument("--no-chat", action="store_true", help="ask general_qa as a 'Question: ... Answer:' completion")
    p.add_argument("--batch-size", type=int, default=64,
                   help="prompts per generation batch and contexts per log-likelihood batch (the results do not "
                        "depend on it)")
    p.add_argument("--out", help="write the results (with per-item records) to this JSON file")
    p.add_argument("--compare", nargs="+", metavar="FILE",
                   help="compare two results files (BEFORE AFTER), or the before and after of a train.py run's "
                        "results.json: prints the run's forgetting report again")
    args = p.parse_args(argv)
    if args.out:
        check_writable_file(args.out)

    if args.compare:
        if len(args.compare) > 2:
            raise ForgetlabError("--compare takes BEFORE AFTER, or one train.py results.json")
        if len(args.compare) == 1:
            run = read_json_object(args.compare[0], "train.py results file")
            if not isinstance(run.get("before"), dict) or not isinstance(run.get("after"), dict):
                raise ForgetlabError(f"{args.compare[0]}: not a train.py results.json with a before and an after "
                                     "evaluation (was the run made with --eval none?)")
            sides = [check_results(run["before"], f"{args.compare[0]}: before"),
                     check_results(run["after"], f"{args.compare[0]}: after")]
        else:
            sides = [read_results(f) for f in args.compare]
        comparison = compare_forgetting(*sides)
        print(format_report(comparison))
        if args.out:
            write_json(args.out, comparison)
        return

    tasks = parse_tasks(args.tasks) if args.tasks else None
    data_paths = {}
    if args.data:
        if not tasks or len(tasks) != 1:
            raise ForgetlabError("--data replaces one task's data: give exactly one task in --tasks")
        if not Path(args.data).is_file():
            raise ForgetlabError(f"{args.data}: data file not found")
        data_paths[tasks[0]] = args.data
    if args.batch_size < 1:
        raise ForgetlabError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ForgetlabError(f"--limit must be >= 1, got {args.limit}")
    if args.model is not None and not Path(args.model).is_dir():
        raise ForgetlabError(f"{args.model}: model directory not found")
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise ForgetlabError(f"{args.adapter}: adapter directory not found")

    from model import load_pretrained

    model, tok = load_pretrained(args.model)
    if args.adapter:
        from lora import load_adapter

        load_adapter(model, args.adapter)
    limit = args.limit if tasks else ({t: args.limit for t in LEVELS[args.level]} if args.limit else None)
    results = evaluate(model, tok, tasks, level=args.level, limit=limit, split=args.split, data_paths=data_paths,
                       batch_size=args.batch_size, chat=not args.no_chat, match=args.match)
    for name, res in results.items():
        print(f"{name}: {summary_line(name, res)}")
    if args.out:
        write_json(args.out, dict(model=args.model or "default (SmolLM2-135M-Instruct)", adapter=args.adapter,
                                  level=None if tasks else args.level, tasks=list(results), split=args.split,
                                  limit=args.limit, match=args.match, chat=not args.no_chat,
                                  batch_size=args.batch_size, results=results))


if __name__ == "__main__":
    run_cli(main)
