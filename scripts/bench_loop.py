"""bench.py --loop: train.py's own loop on short examples against long ones, and what its AdamW step costs.

    python scripts/bench.py --loop                  # the main job's data (batch 8) vs 4 x 256-token rows (batch 4)
    python scripts/bench.py --loop --quick          # the same on a tiny random model, a few steps (a test)

Each workload is `python train.py --method full --eval none --max-steps S` in its own process, interleaved round
by round (short, long, short, long, ...): "short" is the main job's data/drug_qa.jsonl at --batch-size 8 (about
65 tokens an example), "long" text rows cut to 256 tokens at --batch-size 4; S = 12 steps, 2 rounds (--quick: 3
steps, 1 round). tokens/s is read from metrics.jsonl over steps 2..S (the first step warms up), the median over
rounds. Then, in this process, one AdamW step over the
model's parameters by torch's per-tensor loop (its CPU default), its foreach form and its fused kernel.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def long_rows(n: int) -> list[dict]:
    """Text rows longer than 256 tokens (cut to 256 by --max-len): every token labelled."""
    words = "the model reads a long passage of plain text about rivers mountains and the weather".split()
    return [{"text": " ".join(words[(i + j) % len(words)] for j in range(400))} for i in range(n)]


def loop_tokens_per_second(flags: list[str], out: Path, env: dict) -> float:
    subprocess.run([sys.executable, str(REPO / "train.py"), *flags, "--out", str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = steps[0], steps[-1]
    return (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])


def adamw_step_seconds(model_dir, repeats: int) -> dict:
    from model import load_pretrained

    model, _ = load_pretrained(model_dir)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    out = {}
    for kind in ("loop", "foreach", "fused"):
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=kind == "foreach", fused=kind == "fused")
        opt.step()  # the moments allocated
        t = time.perf_counter()
        for _ in range(repeats):
            opt.step()
        out[kind] = (time.perf_counter() - t) / repeats
    return out


def bench_loop(args, model_dir) -> dict:
    """model_dir: the checkpoint (None: the default model); --quick: a tiny random model with its tokenizer."""
    steps = 3 if args.quick else 12
    rounds = 1 if args.quick else 2
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.quick else {})}
    rates = {"short": [], "long": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.quick:
            from model.convert_gguf import prepare_default_model
            from model.tiny import save_tiny_model

            model_dir = save_tiny_model(tmp / "tiny", like=prepare_default_model())
        model = ["--model", str(model_dir)] if model_dir else []
        common = [*model, "--method", "full", "--eval", "none", "--max-steps", str(steps), "--max-len", "256"]
        (tmp / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long_rows(64)))
        flags = {"short": [*common, "--batch-size", "8"],
                 "long": [*common, "--batch-size", "4", "--data", str(tmp / "long.jsonl")]}
        for i in range(rounds):
            for kind in ("short", "long"):
                rates[kind].append(loop_tokens_per_second(flags[kind], tmp / f"{kind}-{i}", env))
        adamw = adamw_step_seconds(model_dir, 2 if args.quick else 5)
    short, long = statistics.median(rates["short"]), statistics.median(rates["long"])
    print(f"train.py loop, {steps} steps, median of {rounds} rounds: short examples (batch 8) {short:.0f} tokens/s, "
          f"4 x 256 {long:.0f} tokens/s, short / long {short / long:.2f}")
    print("AdamW step over every parameter: " + ", ".join(f"{k} {v:.3f} s" for k, v in adamw.items()))
    return dict(steps=steps, rounds=rounds, short_tokens_per_s=rates["short"], long_tokens_per_s=rates["long"],
                short_over_long=short / long, adamw_step_seconds=adamw)
