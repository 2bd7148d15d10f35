"""Self-replay: replay general prompts with the base model's own answers."""
from dataclasses import dataclass
from pathlib import Path

from errors import ForgetlabError
from model.llama import IGNORE_INDEX

from .base import Method, check_all, option, register
from .self_distillation import cache_file, generate_cached


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
        return cache_file(self.options.cache, model, [self.options.max_new_tokens, sorted(tok.stop_ids), tok.pad_id])

    def replay_examples(self, model, run, examples):
        tok = run.tokenizer
        prompts = [e["input_ids"][:next(i for i, y in enumerate(e["labels"]) if y != IGNORE_INDEX)] for e in examples]
        answers = generate_cached(model, tok, prompts, self.options.max_new_tokens, self.cache_file(model, tok),
                                  "self-replay")
        out = []
        for e, p, a in zip(examples, prompts, answers):
            end = [y for y in e["labels"] if y != IGNORE_INDEX][-1:]
            answer = a + (end if end and end[0] in tok.stop_ids else [])
            ids = (p + answer)[:run.max_len]
            out.append(dict(input_ids=ids, labels=([IGNORE_INDEX] * len(p) + answer)[:run.max_len]))
        return out
