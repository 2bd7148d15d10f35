"""What the model-generated-target methods share (`self-replay`, `sdft-rewrite`, `sdft-on-policy`; one file each).

  split_example            a tokenized chat example -> (prompt ids, answer ids, its end-of-turn id)
  DemonstrationPrompt      the same prompt with a demonstration (the training answer) written into it, at the token
                           level: the teacher's context of both SDFT forms
  generate_cached          the model's greedy answers to many prompts, generated once and cached on disk under the
                           model's identity (the sha256 of its weights) and the generation settings
"""
import hashlib
import json
import sys
from pathlib import Path

from errors import ForgetlabError
from model.checkpoint import weights_sha256, write_atomic_text
from model.llama import IGNORE_INDEX


def split_example(example: dict, stop_ids) -> tuple[list[int], list[int], list[int]]:
    """(prompt, answer, end): the tokens before the first labelled one, the labelled tokens up to the first
    end-of-turn token, and that token as a one-element list ([] when truncation cut it off)."""
    labels = example["labels"]
    first = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
    answer = [y for y in labels[first:] if y != IGNORE_INDEX]
    stops = set(stop_ids)
    cut = next((i for i, t in enumerate(answer) if t in stops), len(answer))
    return list(example["input_ids"][:first]), answer[:cut], answer[cut:cut + 1]


class DemonstrationPrompt:
    """A prompt with a demonstration (the training answer) written into it, built from token ids. A chat prompt
    gets it at the end of its last user turn; any other prompt (a stream's classification prompt, in the papers'
    plain format) gets it in front:

        chat    ... user text | in_turn(demonstration) | header      (header: the chat template's end of the user
                                                                      turn and the assistant's generation header,
                                                                      e.g. ChatML's "<|im_end|>\n<|im_start|>assistant\n")
        plain   [BOS] | prefix(demonstration) | the prompt

    `in_turn` and `prefix` are texts holding "{demonstration}", where the demonstration's own tokens go. Working
    on ids keeps the prompt's tokens exactly as the example has them."""

    def __init__(self, tok, in_turn: str, prefix: str):
        probe = "\u2063probe\u2063"  # any text that occurs nowhere in a template
        rendered = tok.apply_chat_template([{"role": "user", "content": probe}], add_generation_prompt=True)
        self.header = tok.encode(rendered[rendered.index(probe) + len(probe):])
        self.in_turn = [tok.encode(part) for part in in_turn.split("{demonstration}")]
        self.prefix = [tok.encode(part) for part in prefix.split("{demonstration}")]
        self.bos = tok.bos_id if tok.adds_bos else None

    def check(self, examples: list, stop_ids, what: str):
        """Refuse examples without a prompt to show the demonstration in, or without an answer to show: `what`
        names them in the error."""
        for i, e in enumerate(examples):
            prompt, answer, _ = split_example(e, stop_ids)
            if len(prompt) <= (prompt[:1] == [self.bos]):
                raise ForgetlabError(f"{what}: example {i + 1} has no prompt (a plain-text row, every token "
                                     f"labelled?): there is nothing to show the demonstration with")
            if not answer:
                raise ForgetlabError(f"{what}: example {i + 1} has no answer tokens to demonstrate (cut off by "
                                     f"--max-len?)")

    def __call__(self, prompt: list[int], demonstration: list[int]) -> list[int]:
        h = len(self.header)
        if h and len(prompt) > h and prompt[-h:] == self.header:
            before, after = self.in_turn
            return prompt[:-h] + before + demonstration + after + prompt[-h:]
        before, after = self.prefix
        start = 1 if prompt[:1] == [self.bos] else 0
        return prompt[:start] + before + demonstration + after + prompt[start:]


def cache_file(directory: str, model, settings) -> Path:
    """The cache file of `model`'s answers under `settings` (any JSON value): the name hashes both."""
    h = hashlib.sha256(weights_sha256(model).encode())
    h.update(json.dumps(settings).encode())
    return Path(directory) / f"{h.hexdigest()[:32]}.json"


def read_cache(file: Path, who: str) -> dict:
    """{prompt ids as "1,2,3": answer ids} from the cache file; {} when there is none, or when it cannot be read
    (cut short by a full disk, edited): a cache is derived data, so it is generated again, not fatal."""
    if not file.is_file():
        return {}
    try:
        cached = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and all(isinstance(k, str) and isinstance(v, list) and
                                            all(isinstance(t, int) for t in v) for k, v in cached.items()):
            return cached
        why = "not a map of prompts to answer token ids"
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = type(e).__name__
    print(f"warning: {who}: ignoring the unreadable cache {file} ({why}): the answers are generated again",
          file=sys.stderr)
    return {}


def generate_cached(model, tok, prompts: list[list[int]], max_new_tokens: int, file: Path, who: str) -> list:
    """The model's greedy answer (ids, without the stop token) to each prompt, read from `file` where cached;
    the missing ones are generated, shortest prompts first in batches of 16, and the file is rewritten."""
    from model.generate import eval_mode, generate_ids  # looked up at the call: the tests replace it

    cached = read_cache(file, who)
    keys = [",".join(map(str, p)) for p in prompts]
    todo = sorted({k: p for k, p in zip(keys, prompts) if k not in cached}.items(), key=lambda kp: len(kp[1]))
    if todo:
        print(f"{who}: the model answers {len(todo)} prompts ({file})", file=sys.stderr)
        with eval_mode(model):
            for s in range(0, len(todo), 16):
                chunk = todo[s:s + 16]
                answers = generate_ids(model, [p for _, p in chunk], max_new_tokens, tok.stop_ids, tok.pad_id)
                cached.update({k: a for (k, _), a in zip(chunk, answers)})
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic_text(file, json.dumps(cached))
    return [cached[k] for k in keys]
