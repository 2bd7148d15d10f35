"""Self-distillation fine-tuning, the rewrite form: train on the model's own rewrites of the training answers."""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import write_atomic_text
from model.llama import IGNORE_INDEX

from .base import Method, check_all, option, register
from .self_distillation import DemonstrationPrompt, cache_file, generate_cached, split_example

# The teacher's context: the training answer shown in the user's turn, then the request to say it again (after
# Yang et al.'s template, which asks the seed model to answer "using the reference answer as a guide"; with wording
# that names a "reference answer", the default model often began its rewrite by echoing those words), or the same
# in front of a plain prompt.
IN_TURN = "\n\n{demonstration}\n\nThat is one answer to the question. Write the answer again in your own words."
PREFIX = "{demonstration}\n\nThat is one answer to the question below. Write the answer again in your own words.\n\n"


@register("sdft-rewrite")
class SDFTRewrite(Method):
    """Self-Distillation Fine-Tuning, rewrite form (Yang et al. 2024, ACL, "Self-Distillation Bridges
    Distribution Gap in Language Model Fine-Tuning"). Before training, the unmodified model rewrites each training
    answer y given the prompt x and y itself as a reference,

        ỹ = greedy decode of π₀(· | x with "y ... Write the answer again in your own words." in its user turn)

    and the fine-tune minimizes the usual cross-entropy on (x, ỹ) instead of (x, y): the targets are in the
    model's own distribution, so fitting them moves the weights less. A rewrite that is empty, or that does not
    end within --sdft-rewrite.max-new-tokens, is replaced by the original answer (the paper's fallback keeps the
    original where the rewrite loses the answer; which rewrites were kept is in sdft_rewrite.json).

    The rewrites are generated once and cached in --sdft-rewrite.cache under the model's weights' sha256 and the
    settings (as self-replay's answers are); in a task stream each stage's model rewrites its own task's answers.
    Cost: one greedy generation per training example before the first step; training itself is full
    fine-tuning's."""

    @dataclass
    class Options:
        max_new_tokens: int = option(256, "longest rewrite; one that does not end by then keeps the original answer")
        cache: str = option(str(Path.home() / ".cache" / "forgetlab" / "sdft-rewrite"),
                            "directory of the cached rewrites (one JSON file per model and setting)")

        def __post_init__(self):
            check_all([(self.max_new_tokens >= 1, "--sdft-rewrite.max-new-tokens must be >= 1")])

    def check(self, model, run):
        DemonstrationPrompt(run.tokenizer, IN_TURN, PREFIX).check(run.domain, run.tokenizer.stop_ids,
                                                                "--method sdft-rewrite")

    def train_examples(self, model, run, examples):
        tok = run.tokenizer
        teacher_prompt = DemonstrationPrompt(tok, IN_TURN, PREFIX)
        parts = [split_example(e, tok.stop_ids) for e in examples]
        settings = [self.options.max_new_tokens, sorted(tok.stop_ids), tok.pad_id, IN_TURN, PREFIX]
        rewrites = generate_cached(model, tok, [teacher_prompt(p, a) for p, a, _ in parts],
                                   self.options.max_new_tokens, cache_file(self.options.cache, model, settings),
                                   "sdft-rewrite")
        out, self.kept_original = [], []
        for i, (e, (prompt, _, end), rewrite) in enumerate(zip(examples, parts, rewrites)):
            if not rewrite or len(rewrite) >= self.options.max_new_tokens:
                self.kept_original.append(i)
                out.append(e)
                continue
            target = rewrite + (end or tok.stop_ids[:1])
            out.append(dict(input_ids=(prompt + target)[:run.max_len],
                            labels=([IGNORE_INDEX] * len(prompt) + target)[:run.max_len]))
        print(f"sdft-rewrite: {len(examples) - len(self.kept_original)} of {len(examples)} answers rewritten, "
              f"{len(self.kept_original)} kept as they were", file=sys.stderr)
        self.n_examples = len(examples)
        return out

    def save(self, out: Path):
        if hasattr(self, "kept_original"):
            write_atomic_text(out / "sdft_rewrite.json", json.dumps(dict(
                examples=self.n_examples, rewritten=self.n_examples - len(self.kept_original),
                kept_original=self.kept_original)))
