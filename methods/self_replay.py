"""Self-replay: replay general prompts with the base model's own answers."""
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from errors import ForgetlabError
from model.checkpoint import weights_sha256, write_atomic_text
from model.llama import IGNORE_INDEX

from .base import Method, check_all, option, register


@register("self-replay")
class SelfReplay(Method):
    """Self-replay, in the spirit of Self-Synthesized Rehearsal (Huang et al. 2024, "Mitigating Catastrophic
    Forgetting in Large Language Models with Self-Synthesized Rehearsal") and Self-Distillation Fine-Tuning (Yang
    et al. 2024, "Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning"): replay, but the
    replayed general examples keep their prompts and take the base model's own greedy answers as targets, so
    replay pulls toward what the model did rather than toward someone else's answers.

    The answers are generated once, before training, on the unmodified model, and cached in --self-replay.cache
    under the sha256 of the model's weights (its identity) and the generation settings; a later run with the same
    model reads them back. Only the first assistant turn of a chat example is regenerated; its end-of-turn token
    (the original answer's last label) is kept. Composes like replay: --replay-fraction (preset 0.15)."""

    defaults = {"replay_fraction": 0.15}

    @dataclass
    class Options:
        max_new_tokens: int = option(128, "longest answer the base model generates")
        cache: str = option(str(Path.home() / ".cache" / "forgetlab" / "self-replay"),
                            "directory of the cached answers (one JSON file per model and setting)")

        def __post_init__(self):
            check_all([(self.max_new_tokens >= 1, "--self-replay.max-new-tokens must be >= 1")])

    def check(self, model, run):
        if run.replay_fraction <= 0:
            raise ForgetlabError("--method self-replay replays nothing with --replay-fraction 0")

    def cache_file(self, model, tok) -> Path:
        h = hashlib.sha256(weights_sha256(model).encode())
        h.update(json.dumps([self.options.max_new_tokens, sorted(tok.stop_ids), tok.pad_id]).encode())
        return Path(self.options.cache) / f"{h.hexdigest()[:32]}.json"

    @staticmethod
    def read_cache(file: Path) -> dict:
        """{prompt ids as "1,2,3": answer ids} from the cache file; {} when there is none, or when it cannot be
        read (cut short by a full disk, edited): a cache is derived data, so it is generated again, not fatal."""
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
        print(f"warning: self-replay: ignoring the unreadable cache {file} ({why}): the answers are generated "
              f"again", file=sys.stderr)
        return {}

    def replay_examples(self, model, run, examples):
        from model.generate import eval_mode, generate_ids  # looked up at the call: the tests replace it

        tok = run.tokenizer
        file = self.cache_file(model, tok)
        cached = self.read_cache(file)
        prompts = [e["input_ids"][:next(i for i, y in enumerate(e["labels"]) if y != IGNORE_INDEX)] for e in examples]
        keys = [",".join(map(str, p)) for p in prompts]
        todo = sorted({k: p for k, p in zip(keys, prompts) if k not in cached}.items(), key=lambda kp: len(kp[1]))
        if todo:
            print(f"self-replay: the base model answers {len(todo)} general prompts ({file})", file=sys.stderr)
            with eval_mode(model):
                for s in range(0, len(todo), 16):
                    chunk = todo[s:s + 16]
                    answers = generate_ids(model, [p for _, p in chunk], self.options.max_new_tokens, tok.stop_ids,
                                           tok.pad_id)
                    cached.update({k: a for (k, _), a in zip(chunk, answers)})
            file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic_text(file, json.dumps(cached))
        out = []
        for e, p, k in zip(examples, prompts, keys):
            end = [y for y in e["labels"] if y != IGNORE_INDEX][-1:]
            answer = cached[k] + (end if end and end[0] in tok.stop_ids else [])
            ids = (p + answer)[:run.max_len]
            out.append(dict(input_ids=ids, labels=([IGNORE_INDEX] * len(p) + answer)[:run.max_len]))
        return out
