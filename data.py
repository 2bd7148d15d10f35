"""Fine-tuning data: JSONL reading and validation, chat-template tokenization with prompt masking, length-bucketed
batches with right padding, and replay mixing.

Four row formats are accepted, one JSON object per line (extra keys are ignored):

    {"text": ...}                                      a plain document: every token is trained on (no chat template)
    {"prompt": ..., "completion": ...}                 one user turn, one assistant turn
    {"instruction": ..., "input": ..., "output": ...}  Alpaca (Taori et al. 2023); "input" may be empty or absent
    {"messages": [{"role": ..., "content": ...}, ...]} a chat; every assistant turn is trained on

Everything but plain text is rendered with the checkpoint's own chat template, and only assistant tokens carry a
label: the loss is the model's likelihood of the answers given the prompts, not of the prompts themselves
(prompt tokens get IGNORE_INDEX = -100, which the model's loss skips).
"""
import codecs
import hashlib
import json
import random
from pathlib import Path

import torch

from errors import DuplicateKeyError, ForgetlabError, loads_strict
from model import IGNORE_INDEX

FORMATS = {  # name -> required string fields (chat is checked separately)
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
}
ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------- reading and validation

def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line of a JSONL file; every row must be a JSON object. Lines end
    in \\n, \\r\\n or \\r; a UTF-8 byte-order mark is allowed. Any other problem is a ForgetlabError naming
    the file and line: never a UnicodeDecodeError or a RecursionError from a hostile line."""
    path = Path(path)
    if not path.is_file():
        raise ForgetlabError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ForgetlabError(f"{path}: cannot read ({e.strerror})") from None
    rows = []
    for lineno, line in enumerate(raw.removeprefix(codecs.BOM_UTF8).splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ForgetlabError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if not text.strip():
            continue
        try:
            row = loads_strict(text)
        except json.JSONDecodeError as e:
            raise ForgetlabError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        except DuplicateKeyError as e:
            raise ForgetlabError(f"{path}:{lineno}: {e} in one row (which one is meant?)") from None
        except RecursionError:
            raise ForgetlabError(f"{path}:{lineno}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise ForgetlabError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    if not rows:
        raise ForgetlabError(f"{path}: empty dataset (no JSON lines)")
    return rows


def load_jsonl(path) -> list[dict]:
    """The rows of a JSONL file, any keys. ForgetlabError "file:line: what" on a missing file, a malformed
    line, a line that is not an object, or a file with no rows."""
    return [row for _, row in read_jsonl(path)]


def detect_format(row: dict) -> str:
    """Which of FORMATS a row is, by its keys ("messages" first, then Alpaca, prompt/completion, text).
    Raises ValueError naming the accepted key sets when it is none of them."""
    for name in ("chat", "alpaca", "prompt_completion", "text"):
        if all(k in row for k in FORMATS[name]):
            return name
    raise ValueError(f"missing fields: expected one of {{'text'}}, {{'prompt','completion'}}, "
                     f"{{'instruction','input','output'}} or {{'messages'}}; got keys {sorted(row)}")


def check_row(row: dict) -> str:
    """Validate one row's fields and types; return its format. Raises ValueError saying what is wrong."""
    fmt = detect_format(row)
    if fmt == "chat":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not any(m["role"] == "assistant" and m["content"] for m in msgs):
            raise ValueError("'messages' has no non-empty assistant turn to train on")
        return fmt
    fields = FORMATS[fmt] + (("input",) if fmt == "alpaca" and "input" in row else ())
    for k in fields:
        if not isinstance(row[k], str):
            raise ValueError(f"field {k!r} must be a string, got {type(row[k]).__name__}")
    target = {"text": "text", "prompt_completion": "completion", "alpaca": "output"}[fmt]
    if not row[target].strip():
        raise ValueError(f"field {target!r} is empty")
    return fmt


def load_dataset(path) -> list[dict]:
    """Read and validate a training file: every row must be one of the four formats with string fields.
    Errors name the file and line: "data/x.jsonl:7: field 'completion' must be a string, got int"."""
    rows = []
    for lineno, row in read_jsonl(path):
        try:
            check_row(row)
        except ValueError as e:
            raise ForgetlabError(f"{path}:{lineno}: {e}") from None
        rows.append(row)
    return rows


HELD_OUT = 0.1  # the fraction of a user's --data kept out of training to measure what the run learnt


def is_held_out(row: dict, fraction: float = HELD_OUT) -> bool:
    """Whether a training row is held out: a fixed function of its content (sha256 of its JSON, any "id" field
    left out, so the evaluation's copy of the row, which gains an id, falls on the same side)."""
    body = json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(body.encode()).digest()[:4], "big") < fraction * 2**32


def split_held_out(rows: list[dict], fraction: float = HELD_OUT) -> tuple[list[dict], list[dict]]:
    """(rows to train on, held-out rows) by is_held_out, in file order."""
    held = [r for r in rows if is_held_out(r, fraction)]
    return [r for r in rows if not is_held_out(r, fraction)], held


# ----------------------------------------------------------------------------- formatting and tokenization

def to_messages(row: dict) -> list[dict]:
    """The row as a chat [{"role", "content"}, ...]. A plain-text row becomes a single assistant turn (only for
    display: tokenize_example trains on plain text as a raw document, without the chat template)."""
    fmt = detect_format(row)
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if fmt == "prompt_completion":
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    if fmt == "alpaca":
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return [{"role": "assistant", "content": row["text"]}]


def mask_after_last_stop(ids: list[int], stop_ids) -> list[int]:
    """Labels for an assistant segment: its tokens up to and including the last end-of-turn token; what the
    template writes after it (ChatML's trailing newline) is not something the model must learn to say."""
    stops = set(stop_ids)
    last = max((i for i, t in enumerate(ids) if t in stops), default=len(ids) - 1)
    return ids[:last + 1] + [IGNORE_INDEX] * (len(ids) - last - 1)


def tokenize_example(tok, row: dict, max_len: int) -> dict:
    """Token ids and labels for one row: dict(input_ids, labels, truncated).

    Chat formats are rendered with tok.apply_chat_template. The text is split at each assistant turn: the
    render of the turns before it plus the generation header is the prompt (labels -100), the rest of that
    turn's render is the answer (labels = ids). Each piece is encoded on its own, so a BPE merge can never
    straddle the prompt/answer boundary. Sequences longer than max_len keep their first max_len tokens.
    """
    if detect_format(row) == "text":
        ids = tok.encode(row["text"], add_bos=tok.adds_bos)  # a BOS only where the checkpoint's pipeline adds one
        labels = list(ids)
    else:
        messages = to_messages(row)
        ids, labels, done = [], [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
            full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ForgetlabError(f"{tok.source}: the chat template does not render turns as prefixes of the "
                                     "whole chat, so prompt and answer tokens cannot be separated")
            prompt_ids = tok.encode(prompt[len(done):])
            answer_ids = tok.encode(full[len(prompt):])
            ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + mask_after_last_stop(answer_ids, tok.stop_ids)
            done = full
    truncated = len(ids) > max_len
    return dict(input_ids=ids[:max_len], labels=labels[:max_len], truncated=truncated)


def tokenize_dataset(tok, rows: list[dict], max_len: int) -> tuple[list[dict], int]:
    """Tokenize every row; returns (examples, number truncated). Examples left with no labelled token after
    truncation (a prompt longer than max_len) are dropped: they would add nothing but compute."""
    examples = [tokenize_example(tok, row, max_len) for row in rows]
    n_truncated = sum(e["truncated"] for e in examples)
    # labels[0] is never a target (nothing precedes it), so at least one label must sit at position >= 1
    kept = [e for e in examples if any(y != IGNORE_INDEX for y in e["labels"][1:])]
    return kept, n_truncated


# ----------------------------------------------------------------------------- batching

def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a list of examples to the longest: input_ids (B, T) padded with pad_id, labels (B, T) with -100,
    attention_mask (B, T) 1 = token, 0 = pad. Right padding keeps the model on its fast causal-attention path."""
    T = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask)


def batches_by_length(examples: list[dict], batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True,
                      window: int = 32) -> list[dict]:
    """Collated batches of examples of similar length, so little compute goes to padding.

    shuffle=True: the examples are shuffled with `seed`, sorted by length inside windows of `window` batches,
    cut into batches, and the batches shuffled again: batch composition changes from seed to seed (pass
    seed + epoch), yet each batch holds near-equal lengths. shuffle=False: sorted by length, longest first.
    Each batch also carries "indices", the positions in `examples` of its rows, in order.
    """
    order = list(range(len(examples)))
    length = lambda i: len(examples[i]["input_ids"])  # noqa: E731
    if shuffle:
        rng = random.Random(seed)
        rng.shuffle(order)
        span = batch_size * window
        order = [i for s in range(0, len(order), span) for i in sorted(order[s:s + span], key=length)]
    else:
        order.sort(key=length, reverse=True)
    groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(groups)
    return [{**collate([examples[i] for i in g], pad_id), "indices": g} for g in groups]


# ----------------------------------------------------------------------------- replay

def create_replay_dataset(domain: list, general: list, replay_fraction: float, seed: int) -> list:
    """Experience replay (Robins 1995; Rolnick et al. 2019): mix int(len(domain) * replay_fraction) general
    examples, sampled without replacement with `seed` (with replacement only if more are asked for than exist),
    into the domain set and shuffle the mix with the same seed."""
    if not 0.0 <= replay_fraction:
        raise ForgetlabError(f"--replay-fraction must be >= 0, got {replay_fraction}")
    n = int(len(domain) * replay_fraction)
    rng = random.Random(seed)
    if n and not general:
        raise ForgetlabError("replay needs general examples, but the general dataset is empty")
    sampled = rng.sample(general, n) if n <= len(general) else [rng.choice(general) for _ in range(n)]
    mixed = list(domain) + sampled
    rng.shuffle(mixed)
    return mixed


def micro_batch_stream(examples, cfg, pad_id, start: int = 0):
    """Endless (epoch, micro-batches of one optimizer step) groups, from optimizer step `start` on; each epoch
    reshuffles with seed + epoch, so the data order is a function of (seed, epoch) and a resumed run skips exactly
    what it trained on."""
    epoch, step = 0, 0
    while True:
        batches = batches_by_length(examples, cfg.batch_size, pad_id, seed=cfg.seed + epoch)
        for s in range(0, len(batches), cfg.grad_accum):
            if step >= start:
                yield epoch, batches[s:s + cfg.grad_accum]
            step += 1
        epoch += 1
