"""Benchmarks, printed (not timed tests): Fisher estimation and the EWC training step.

    python scripts/bench.py --fisher              # empirical Fisher vs plain forward+backward vs the batch-size-1 loop
    python scripts/bench.py --ewc-step            # plain AdamW step vs EWC steps
    python scripts/bench.py --memory              # peak memory of a plain step vs EWC steps, each in a fresh process
    python scripts/bench.py --all --quick         # everything, on fewer and shorter examples

The default model (SmolLM2-135M-Instruct, float32) runs on the CPU unless --device says otherwise. Timings
are interleaved (one round runs every case once) and repeated; the median is reported with the spread, as
other processes sharing the machine make single timings noisy.
"""
import os, sys  # noqa: E401
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch

from errors import ForgetlabError, run_cli
from ewc import EWC, empirical_fisher_loop, estimate_fisher, trainable_parameters
from model import IGNORE_INDEX, load_pretrained

GENERAL_DATA = Path(__file__).resolve().parent.parent / "data" / "general_instructions.jsonl"


# ----------------------------------------------------------------------------------------------------------
# Inputs


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


def bench_batches(model, tok, n_examples: int, batch_size: int, seq_len: int, device):
    """General instruction data when data/general_instructions.jsonl and data.py exist, else synthetic."""
    try:
        batches = data_batches(GENERAL_DATA, tok, n_examples, batch_size, seq_len)
        source = f"{GENERAL_DATA.name} ({n_examples} examples, <= {seq_len} tokens)"
    except (ImportError, ForgetlabError, FileNotFoundError):
        batches = synthetic_batches(model.config.vocab_size, n_examples, batch_size, seq_len)
        source = f"synthetic ({n_examples} examples, {seq_len // 2}-{seq_len} tokens, right-padded)"
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return batches, f"{source}, {len(batches)} batches of {batch_size}, {n_tokens} tokens"


# ----------------------------------------------------------------------------------------------------------
# Timing


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(cases: dict, repeats: int, device="cpu") -> dict[str, list[float]]:
    """Seconds per call of each case; every round runs each case once, so slow periods hit all cases."""
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):8.2f} s  (min {min(times):.2f}, max {max(times):.2f}, n={len(times)})"


def plain_forward_backward(model, batches):
    """One forward+backward of the training loss over the batches (the cost the Fisher is compared to)."""
    model.zero_grad(set_to_none=True)
    for b in batches:
        model(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"]).backward()
    model.zero_grad(set_to_none=True)


def bench_fisher(model, batches, repeats: int = 3, loop: bool = True, device="cpu") -> dict[str, float]:
    """Median seconds of (a) plain forward+backward, (b) the empirical Fisher, (c) the batch-size-1 loop,
    over the same tokens, and the two ratios the issue asks for."""
    cases = {"plain forward+backward": lambda: plain_forward_backward(model, batches),
             "empirical Fisher (batched)": lambda: estimate_fisher(model, batches, "empirical")}
    if loop:
        cases["empirical Fisher (bs=1 loop)"] = lambda: empirical_fisher_loop(model, batches)
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


def training_step(model, opt, batch, ewc=None, grad_path=False):
    """One AdamW step; with ewc, the penalty through autograd (`penalty`) or added to .grad (`add_penalty_grad_`)."""
    opt.zero_grad(set_to_none=True)
    loss = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])
    if ewc is not None and not grad_path:
        loss = loss + ewc.penalty(model)
    loss.backward()
    if ewc is not None and grad_path:
        ewc.add_penalty_grad_(model)
    opt.step()


def random_fisher(model) -> dict[str, torch.Tensor]:
    """The step's cost does not depend on F's values: uniform noise stands in for an estimate."""
    return {n: torch.rand_like(p, dtype=torch.float32) for n, p in trainable_parameters(model).items()}


def bench_ewc_step(model, batch, repeats: int = 3, lam: float = 1.0, device="cpu") -> dict[str, float]:
    """Median seconds of a plain full fine-tuning AdamW step and of EWC steps (float32 and bf16 state, both
    penalty paths), each on the same batch; prints EWC step / plain step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    ewc32 = EWC(model, random_fisher(model), lam)
    ewc16 = EWC(model, random_fisher(model), lam, dtype=torch.bfloat16)
    cases = {"plain AdamW step": lambda: training_step(model, opt, batch),
             "EWC step, penalty()": lambda: training_step(model, opt, batch, ewc32),
             "EWC step, add_penalty_grad_()": lambda: training_step(model, opt, batch, ewc32, grad_path=True),
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


# ----------------------------------------------------------------------------------------------------------
# Memory


def probe_step(args, mode: str):
    """Run in a fresh process: load, take two training steps of `mode`, print the peak memory."""
    model, tok = load_pretrained(dtype=torch.float32, device=args.device)
    batches, _ = bench_batches(model, tok, args.batch_size, args.batch_size, args.seq_len, args.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ewc = None
    if mode != "plain":
        ewc = EWC(model, random_fisher(model), 1.0, dtype=torch.bfloat16 if mode == "ewc-bf16" else torch.float32)
    for _ in range(2):
        training_step(model, opt, batches[0], ewc)
    if torch.device(args.device).type == "cuda":
        print(f"peak_mb {torch.cuda.max_memory_allocated() / 2**20:.0f}")
    else:
        print(f"peak_mb {peak_rss_mb():.0f}")


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process image, whereas ru_maxrss survives
    exec and would report the (larger) parent that spawned the probe."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux units: KiB


def bench_memory(args) -> dict[str, float]:
    """Peak memory (CPU: process max RSS; CUDA: max allocated) of a plain step and EWC steps, each measured
    in its own process so that one cannot inherit the other's peak."""
    peaks = {}
    for mode in ("plain", "ewc", "ewc-bf16"):
        cmd = [sys.executable, os.path.abspath(__file__), "--probe", mode, "--device", args.device,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        peaks[mode] = float(out.split("peak_mb")[-1])
    what = "max allocated" if torch.device(args.device).type == "cuda" else "max RSS"
    for mode, mb in peaks.items():
        print(f"  peak {what}, {mode:9s} step  {mb:8.0f} MiB  ({mb - peaks['plain']:+.0f} vs plain)")
    return peaks


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fisher", action="store_true", help="time the empirical Fisher (issue 3)")
    parser.add_argument("--ewc-step", action="store_true", help="time an EWC training step against a plain one")
    parser.add_argument("--memory", action="store_true", help="peak memory with and without EWC")
    parser.add_argument("--all", action="store_true", help="all of the above")
    parser.add_argument("--quick", action="store_true", help="8 examples of <= 64 tokens, 2 repeats, no bs=1 loop")
    parser.add_argument("--examples", type=int, default=16, help="examples for the Fisher timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-loop", action="store_true", help="skip the (slow) batch-size-1 loop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe", choices=("plain", "ewc", "ewc-bf16"), help=argparse.SUPPRESS)  # see bench_memory
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.seq_len, args.repeats, args.no_loop = 8, 64, 2, True
    if args.probe:
        return probe_step(args, args.probe)
    if not (args.fisher or args.ewc_step or args.memory or args.all):
        parser.error("choose --fisher, --ewc-step, --memory or --all")
    model, tok = load_pretrained(dtype=torch.float32, device=args.device)
    print(f"model: SmolLM2-135M-Instruct, float32, {args.device}, torch threads {torch.get_num_threads()}")
    batches, source = bench_batches(model, tok, args.examples, args.batch_size, args.seq_len, args.device)
    print(f"data: {source}")
    if args.fisher or args.all:
        print("Fisher estimation:")
        bench_fisher(model, batches, args.repeats, loop=not args.no_loop, device=args.device)
    if args.ewc_step or args.all:
        print("training step (one batch):")
        bench_ewc_step(model, batches[0], args.repeats, device=args.device)
    if args.memory or args.all:
        print("memory:")
        bench_memory(args)


if __name__ == "__main__":
    run_cli(main)
