"""The GPU check: everything a lent GPU should tell us, in one go, into one JSON file.

    python scripts/gpu_check.py --out results/bench/gpu-check.json          # on a CUDA machine, a few minutes
    python scripts/gpu_check.py --device cpu --quick --out /tmp/check.json  # the same checks on CPU, tiny shapes

GPU time comes in minutes, so every check runs in this one process, each guarded: a check that fails records
its error and the others still run. The checks:

  parity       bf16 autocast against float32 on the same weights: the logits' largest difference relative to
               their scale, and one AdamW step's loss and update (the update's relative difference)
  mfu          full fine-tuning tokens/s on the Llama-3.2-1B shape (configs/llama-3.2-1b.json, random weights,
               bf16 autocast), and MFU = tokens/s · 6N / the measured matmul peak (scripts/bench.py's N)
  lora_peft    our LoRA model's logits against transformers + PEFT with the same weights (a small random model)
  ewc_step     the EWC step (the penalty's gradient added in place) over a plain step, same batch
  peak_memory  the peak memory of a training step with the 128k vocabulary of the 1B shape
  train_ewc    `train.py --method ewc --device cuda --max-steps 2 --eval none` on the default model: its exit
               code and its two losses

--quick (for the CPU, and the test): tiny shapes everywhere, the tiny model for train_ewc.
"""
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from errors import ArgumentParser, ForgetlabError, can_create, run_cli
from ewc import EWC
from lora import apply_lora
from model import LlamaConfig
from model.checkpoint import write_atomic_text
from model.tiny import random_llama

REPO = Path(__file__).resolve().parent.parent
TINY = dict(model_type="llama", vocab_size=128_256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # the 1B shape's vocabulary


def sibling(name: str):
    """scripts/<name>.py, imported as this file is (scripts.<name> from the tests, <name> as a script)."""
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


def shape(args) -> dict:
    if args.quick:
        return TINY
    return json.loads((REPO / "configs" / "llama-3.2-1b.json").read_text())


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str):
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


def check_parity(args) -> dict:
    torch.manual_seed(0)
    model = random_llama(shape(args) if args.quick else {**TINY, "vocab_size": 32_000, "hidden_size": 512,
                                                             "intermediate_size": 1408, "num_hidden_layers": 4,
                                                             "num_attention_heads": 8, "num_key_value_heads": 4},
                         device=args.device)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device=args.device)
    with torch.no_grad():
        ref = model(ids).float()
        with autocast(args.device):
            low = model(ids).float()
    out = dict(logits_max_rel=float((ref - low).abs().max() / ref.abs().max()))
    updates = {}
    for name, ctx in (("float32", None), ("bf16", autocast(args.device))):
        m = random_llama(model.config.to_hf_dict(), device=args.device)
        m.load_state_dict(model.state_dict())
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        with ctx if ctx is not None else torch.enable_grad():
            loss = m(ids, labels=ids)
        loss.backward()
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        opt.step()
        updates[name] = (float(loss.detach()), torch.cat([(p.detach() - before[n]).flatten() for n, p in m.named_parameters()]))
    (l32, u32), (l16, u16) = updates["float32"], updates["bf16"]
    return dict(out, loss_float32=l32, loss_bf16=l16, update_rel=float((u32 - u16).norm() / u32.norm()))


def training_steps(model, ids, device: str, steps: int, ewc=None) -> list[float]:
    """Seconds of each of `steps` AdamW steps after one warm-up step (bf16 autocast on CUDA)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(steps + 1):
        sync(device)
        t = time.perf_counter()
        with autocast(device) if device.startswith("cuda") else torch.enable_grad():
            loss = model(ids, labels=ids)
        loss.backward()
        if ewc is not None:
            ewc.add_penalty_grad_(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return times


def check_mfu(args) -> dict:
    bench = sibling("bench")
    cfg = LlamaConfig.from_hf_dict(shape(args), "shape")
    model = random_llama(shape(args), device=args.device).train()
    batch, seq = (2, 32) if args.quick else (8, 1024)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=args.device)
    step = statistics.median(training_steps(model, ids, args.device, 2 if args.quick else 5))
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    peak = bench.matmul_peak_gflops(args.device, dtype, 256 if args.quick else 8192)
    tok_s = batch * seq / step
    return dict(batch=batch, seq=seq, step_s=step, tokens_per_s=tok_s, matmul_peak_gflops=peak,
                mfu=tok_s * bench.flops_per_token(cfg, "full") / (peak * 1e9))


def check_lora_peft(args) -> dict:
    import peft

    bench = sibling("bench")
    torch.manual_seed(0)
    ours = random_llama({**TINY, "vocab_size": 1000}, device=args.device)
    hf = hf_twin(ours, args.device)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(bench.LORA["targets"]), lora_dropout=0.0)
    hf = peft.get_peft_model(hf, config)
    apply_lora(ours, r=8, alpha=16, dropout=0.0, targets=bench.LORA["targets"])
    ids = torch.randint(0, 1000, (2, 32), device=args.device)
    with torch.no_grad():  # the same nonzero adapters on both sides
        base = ours(ids).float()
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.02)
                hf_name = "base_model.model." + name.replace("lora_A.weight", "lora_A.default.weight").replace(
                    "lora_B.weight", "lora_B.default.weight")
                dict(hf.named_parameters())[hf_name].copy_(p)
        a, b = ours(ids).float(), hf(input_ids=ids).logits.float()
    return dict(logits_max_abs_diff=float((a - b).abs().max()), logits_scale=float(a.abs().max()),
                adapter_effect=float((a - base).abs().max()))  # > 0: the comparison is not of two base models


def hf_twin(ours, device: str):
    """transformers.LlamaForCausalLM with our model's config and weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    hf = transformers.LlamaForCausalLM(ours.config.to_transformers(attn_implementation="sdpa")).to(device)
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.tie_weights()
    return hf.eval()


def check_ewc_step(args) -> dict:
    bench = sibling("bench")
    model = random_llama(shape(args) if args.quick else {**shape(args), "num_hidden_layers": 4},
                         device=args.device).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 32) if args.quick else (4, 512), device=args.device)
    steps = 2 if args.quick else 5
    plain = statistics.median(training_steps(model, ids, args.device, steps))
    ewc = EWC(model, bench.random_fisher(model), lam=1.0)
    with_ewc = statistics.median(training_steps(model, ids, args.device, steps, ewc))
    return dict(plain_step_s=plain, ewc_step_s=with_ewc, ratio=with_ewc / plain)


def check_peak_memory(args) -> dict:
    if not args.device.startswith("cuda"):
        return dict(skipped="CUDA only: torch.cuda.max_memory_allocated")
    torch.cuda.reset_peak_memory_stats()
    model = random_llama(shape(args), device=args.device).train()
    ids = torch.randint(0, model.config.vocab_size, (4, 2048), device=args.device)
    training_steps(model, ids, args.device, 1)
    return dict(batch=4, seq=2048, vocab_size=model.config.vocab_size,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def check_train_ewc(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--method", "ewc", "--device", args.device, "--max-steps", "2", "--eval", "none", "--out",
                 str(Path(tmp) / "run"), "--ewc.fisher-samples", "8"]
        if args.quick:
            from model.convert_gguf import prepare_default_model
            from model.tiny import save_tiny_model
            tiny = save_tiny_model(Path(tmp) / "tiny", like=prepare_default_model(quiet=True))
            flags += ["--model", str(tiny), "--batch-size", "4"]
        t = time.time()
        r = subprocess.run([sys.executable, str(REPO / "train.py"), *flags], capture_output=True, text=True)
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        return dict(returncode=r.returncode, seconds=time.time() - t, losses=losses,
                    stderr_tail=r.stderr[-1500:] if r.returncode else "")


CHECKS = {"parity": check_parity, "mfu": check_mfu, "lora_peft": check_lora_peft, "ewc_step": check_ewc_step,
          "peak_memory": check_peak_memory, "train_ewc": check_train_ewc}


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the check's purpose), or cpu to try it here")
    p.add_argument("--quick", action="store_true", help="tiny shapes everywhere (the CPU test)")
    p.add_argument("--only", help=f"comma-separated checks: {', '.join(CHECKS)}")
    p.add_argument("--out", required=True, help="the JSON file to write")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.only.split(",")] if args.only else list(CHECKS)
    if unknown := [n for n in names if n not in CHECKS]:
        raise ForgetlabError(f"--only: unknown check {unknown[0]!r}; the checks are {', '.join(CHECKS)}")
    out = Path(args.out)
    if out.is_dir() or not can_create(out.parent)[0]:  # before minutes of GPU time, not after
        raise ForgetlabError(f"--out {out}: cannot be written (a directory, or not in a writable one)")
    results = dict(device=args.device, torch=torch.__version__, quick=args.quick,
                   gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None)
    for name in names:
        t = time.time()
        try:
            results[name] = CHECKS[name](args)
        except Exception as e:  # a failing check is a result: record it, run the others
            results[name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
        results[name]["check_seconds"] = time.time() - t
        print(f"{name}: {json.dumps(results[name])[:300]}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)
