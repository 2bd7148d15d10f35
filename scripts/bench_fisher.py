"""The Fisher and EWC-step benchmarks of scripts/bench.py (its `--fisher` and `--ewc-step` sections, described in
its docstring; bench.main runs them): their batches, the cases timed and the ratios printed.
"""
import importlib
import statistics
from pathlib import Path

import torch

from errors import ForgetlabError
from ewc import EWC, estimate_fisher, fisher_reference
from model import IGNORE_INDEX


def sibling(name: str):
    """scripts/<name>.py: `scripts.<name>` when the tests import scripts as a package, `<name>` when the scripts
    run as scripts (scripts/ is then sys.path[0]); the project's own modules come from its install."""
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


bench = sibling("bench")
adamw, interleaved, random_fisher, summary = bench.adamw, bench.interleaved, bench.random_fisher, bench.summary

GENERAL_DATA = Path(__file__).resolve().parent.parent / "data" / "general_instructions.jsonl"


def synthetic_batches(vocab_size: int, n_examples: int, batch_size: int, seq_len: int, seed: int = 0):
    """Random token ids with lengths uniform in [seq_len/2, seq_len], right-padded with id 0; the first quarter
    of each example is a prompt (labels -100), as in instruction data."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, n_examples, batch_size):
        B = min(batch_size, n_examples - start)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (B,), generator=g)
        ids = torch.randint(3, vocab_size, (B, seq_len), generator=g)
        mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
        ids = ids * mask
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        for i, n in enumerate(lengths.tolist()):
            labels[i, :n // 4] = IGNORE_INDEX
        batches.append(dict(input_ids=ids, labels=labels, attention_mask=mask))
    return batches


def data_batches(path: Path, tok, n_examples: int, batch_size: int, seq_len: int, seed: int = 0):
    """The first n_examples rows of a JSONL dataset, chat-formatted and length-bucketed by data.py."""
    from data import batches_by_length, load_jsonl, tokenize_dataset

    examples, _ = tokenize_dataset(tok, load_jsonl(path)[:n_examples], seq_len)
    batches = batches_by_length(examples, batch_size, tok.pad_id, seed, shuffle=False)
    return [{k: b[k] for k in ("input_ids", "labels", "attention_mask")} for b in batches]


def fisher_batches(args, model, n_examples: int, batch_size: int, seq_len: int):
    """General instruction data for a checkpoint with a tokenizer (data/general_instructions.jsonl), else
    synthetic ids (random-weight shapes)."""
    batches = None
    if not args.shape:
        try:
            from model.tokenizer import Tokenizer

            tok = Tokenizer.from_dir(args.model)
            batches = data_batches(GENERAL_DATA, tok, n_examples, batch_size, seq_len)
            source = f"{GENERAL_DATA.name} ({n_examples} examples, <= {seq_len} tokens)"
        except (ImportError, ForgetlabError, FileNotFoundError):
            batches = None
    if batches is None:
        batches = synthetic_batches(model.config.vocab_size, n_examples, batch_size, seq_len)
        source = f"synthetic ({n_examples} examples, {seq_len // 2}-{seq_len} tokens, right-padded)"
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return batches, f"{source}, {len(batches)} batches of {batch_size}, {n_tokens} tokens"


def plain_forward_backward(model, batches):
    """One forward+backward of the training loss over the batches (the cost the Fisher is compared to)."""
    model.zero_grad(set_to_none=True)
    for b in batches:
        model(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"]).backward()
    model.zero_grad(set_to_none=True)


def bench_fisher(model, batches, repeats: int = 3, loop: bool = True, device="cpu") -> dict[str, float]:
    """Median seconds of (a) plain forward+backward, (b) the empirical Fisher, (c) the batch-size-1 reference
    loop, over the same tokens, and the ratios (b)/(a) and (c)/(b)."""
    cases = {"plain forward+backward": lambda: plain_forward_backward(model, batches),
             "empirical Fisher (batched)": lambda: estimate_fisher(model, batches, "empirical")}
    if loop:
        cases["empirical Fisher (bs=1 loop)"] = lambda: fisher_reference(model, batches)
    times = interleaved(cases, repeats, device)
    for name, t in times.items():
        print(f"  {name:32s} {summary(t)}")
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {"fisher_over_plain": med["empirical Fisher (batched)"] / med["plain forward+backward"]}
    print(f"  ratio Fisher / plain fwd+bwd      {result['fisher_over_plain']:.2f}  (target <= 2.5)")
    if loop:
        result["loop_over_fisher"] = med["empirical Fisher (bs=1 loop)"] / med["empirical Fisher (batched)"]
        print(f"  speed-up batched vs bs=1 loop      {result['loop_over_fisher']:.2f}x (target >= 4)")
    return result


def training_step(model, opt, batch, ewc=None, in_place=False):
    """One AdamW step; with ewc, the penalty through autograd (`penalty`) or added to .grad (`add_penalty_grad_`)."""
    opt.zero_grad(set_to_none=True)
    loss = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])
    if ewc is None:
        loss.backward()
    else:
        ewc.backward(model, loss, in_place)
    opt.step()


def bench_ewc_step(model, batch, repeats: int = 3, lam: float = 1.0, device="cpu", adamw_choice="fused"):
    """Median seconds of a plain full fine-tuning AdamW step and of EWC steps (float32 and bf16 state, both
    penalty paths), each on the same batch; prints EWC step / plain step."""
    model.train()
    opt = adamw([p for p in model.parameters() if p.requires_grad], adamw_choice)
    ewc32 = EWC(model, random_fisher(model), lam)
    ewc16 = EWC(model, random_fisher(model), lam, dtype=torch.bfloat16)
    cases = {"plain AdamW step": lambda: training_step(model, opt, batch),
             "EWC step, penalty()": lambda: training_step(model, opt, batch, ewc32),
             "EWC step, add_penalty_grad_()": lambda: training_step(model, opt, batch, ewc32, in_place=True),
             "EWC step, bf16 state, penalty()": lambda: training_step(model, opt, batch, ewc16)}
    training_step(model, opt, batch)  # AdamW allocates its state on the first step: keep that out of the timing
    times = interleaved(cases, repeats, device)
    for name, t in times.items():
        print(f"  {name:32s} {summary(t)}")
    plain = statistics.median(times["plain AdamW step"])
    result = {name: statistics.median(t) / plain for name, t in times.items() if name != "plain AdamW step"}
    for name, r in result.items():
        print(f"  ratio {name} / plain  {r:.3f}  (target <= 1.15)")
    return result
