"""Benchmarks, printed (not timed tests): training, generation and Fisher estimation, ours against
transformers + PEFT on the same machine in the same run.

    python scripts/bench.py --all                     # everything below, default model, CPU, float32
    python scripts/bench.py --quick                   # everything, on a tiny random model, 2 steps each (a test)
    python scripts/bench.py --all --json out.json     # also write the figures as JSON
    python scripts/bench.py --train --generate        # sections: --train --generate --fisher --ewc-step --eval --loop
    python scripts/bench.py --mode lora --batch 4 --seq 256 --steps 5     # one workload; last line tokens_per_s=
    python scripts/bench.py --all --device cuda --dtype bfloat16 --shape llama-3.2-1b --seq 2048 --batch 4

Sections:
  matmul peak   GFLOP/s of one large matrix product in the benchmark's dtype: the denominator of MFU.
  training      tokens/s and peak memory of full fine-tuning, LoRA (r 16, alpha 32, q/v, no dropout) and EWC
                (full fine-tuning + the EWC penalty), each workload in its own process (so that peak memory is
                its own: max RSS on CPU, max allocated on CUDA), ours and transformers(+PEFT) interleaved
                round by round. Same random token ids (seeded), labels = input ids (every token labelled),
                torch.optim.AdamW lr 1e-5 with the same foreach/fused choice on both sides; 1 warm-up step,
                then the median of --steps steps.
                MFU = tokens/s · FLOPs/token / matmul peak, with N = the parameters of all matrix products
                (every linear layer and lm_head; the embedding lookup costs none): full and EWC 6N (forward
                2N, backward 4N); LoRA 4N + 6N_lora (the frozen weights need forward 2N and the activation
                gradients 2N, no weight gradients). Attention's T² products are left out of both.
  generation    batch 16, 32 new tokens, greedy, the same random prompts: ours (static KV cache) and HF
                `generate` (its default dynamic cache); tokens/s = new tokens / wall time including prefill.
  Fisher        the empirical Fisher vs a plain forward+backward over the same tokens (target: at most 2.5x),
                and vs the batch-size-1 reference loop (target: at least 4x faster).
  evaluation    eval.py's `full` level (--quick: a tiny random model over the default vocabulary, 4 items a
                task): seconds per task, and tokens/s and MFU of its forward passes. Tokens = positions run
                through the decoder layers (prefill, continuations and decoding steps, padding included:
                it is computed); FLOPs = 2·(N − vocab·hidden) per such token + 2·vocab·hidden per row that
                goes through lm_head (only scored positions and the next-token rows do); wall time includes
                everything (tokenizing, answer checks). Attention's T² products are left out.
  EWC step      a plain AdamW step vs EWC steps (penalty through autograd or added to .grad, float32 or
                bfloat16 state), in one process. (These two: scripts/bench_fisher.py.)

The model is the default SmolLM2-135M-Instruct unless --model DIR or --shape NAME (random weights built
from a config, no checkpoint needed) says otherwise. Timings are medians, interleaved so that a slow
period of a shared machine hits every case; the spread is printed with them.
"""
import importlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from errors import ArgumentParser, ForgetlabError, run_cli
from ewc import EWC, trainable_parameters
from model import Llama, LlamaConfig, generate_ids, load_model
from model.checkpoint import DTYPES
from model.tiny import random_llama

# Random-weight models, as HF config.json dicts: `tiny` for --quick, `llama-3.2-1b` for the GPU targets
# (Llama 3.2 1B's published shape: tied 128k vocabulary, llama3 RoPE scaling).
SHAPES = {
    "tiny": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
}
LORA = dict(r=16, alpha=32, targets=("q_proj", "v_proj"))
LR = 1e-5
GEN_BATCH, GEN_PROMPT, GEN_NEW = 16, 32, 32
FISHER_BATCH, FISHER_SEQ = 8, 128
SIZES = dict(batch=(4, 2), seq=(256, 32), steps=(3, 2), repeats=(3, 1), examples=(16, 8))  # (default, --quick)


def sibling(name: str):
    """scripts/<name>.py: `scripts.<name>` when the tests import scripts as a package, `<name>` when the scripts
    run as scripts (scripts/ is then sys.path[0]); the project's own modules come from its install."""
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


# ----------------------------------------------------------------------------------------------------------
# Models: ours and the transformers twin, from a checkpoint directory or a random-weight shape


def model_config(args) -> LlamaConfig:
    if args.shape:
        return LlamaConfig.from_hf_dict(SHAPES[args.shape], f"--shape {args.shape}")
    return LlamaConfig.from_json(Path(args.model) / "config.json")


def build_ours(args) -> Llama:
    if not args.shape:
        return load_model(args.model, DTYPES[args.dtype], args.device)
    return random_llama(SHAPES[args.shape], dtype=DTYPES[args.dtype], device=args.device)


def build_hf(args):
    """transformers.LlamaForCausalLM with SDPA attention: from_pretrained(--model), or random weights of --shape
    (the values do not change the cost)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dtype = DTYPES[args.dtype]
    if not args.shape:
        hf = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
        return hf.to(args.device).eval()
    torch.manual_seed(0)
    with torch.device(args.device):
        hf = transformers.LlamaForCausalLM(model_config(args).to_transformers(attn_implementation="sdpa"))
    return hf.to(dtype).eval()


def hf_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))


def matmul_params(cfg: LlamaConfig) -> tuple[int, int]:
    """(N, N_lora): weights of every matrix product per token (attention and MLP projections, lm_head), and
    the LoRA factors' (r·(in + out) per adapted q/v projection)."""
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = 2 * d * q + 2 * d * kv + 3 * d * cfg.intermediate_size
    n_lora = L * LORA["r"] * ((d + q) + (d + kv))
    return L * per_layer + cfg.vocab_size * d, n_lora


def flops_per_token(cfg: LlamaConfig, mode: str) -> float:
    n, n_lora = matmul_params(cfg)
    return 4 * n + 6 * n_lora if mode == "lora" else 6 * n


# ----------------------------------------------------------------------------------------------------------
# Timing and memory


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
    return f"{statistics.median(times):8.3f} s  (min {min(times):.3f}, max {max(times):.3f}, n={len(times)})"


def peak_memory_mb(device) -> float:
    """CUDA: max allocated by torch. CPU: this process's peak RSS (VmHWM). VmHWM belongs to the process
    image, whereas ru_maxrss survives exec and would report the (larger) parent that spawned the process."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux units: KiB


def matmul_peak_gflops(device, dtype, n: int, repeats: int = 5) -> float:
    """Best of `repeats` n×n @ n×n products: 2n³ FLOPs each."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: library initialisation, and CUDA's kernel selection
    times = interleaved({"mm": lambda: a @ b}, repeats, device)["mm"]
    return 2 * n**3 / min(times) / 1e9


# ----------------------------------------------------------------------------------------------------------
# One training workload, run in its own process (--mode): prints key=value lines, tokens_per_s= last


def adamw(params, choice: str):
    return torch.optim.AdamW(params, lr=LR, foreach=choice == "foreach", fused=choice == "fused")


def random_fisher(model) -> dict[str, torch.Tensor]:
    """The step's cost does not depend on F's values: uniform noise stands in for an estimate."""
    return {n: torch.rand_like(p, dtype=torch.float32) for n, p in trainable_parameters(model).items()}


def ours_workload(args, mode: str):
    """Our model set up for `mode`; returns (model, loss function of input ids, what to run after backward)."""
    model = build_ours(args).train()
    if mode == "lora":
        from lora import apply_lora, count_params
        apply_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, targets=LORA["targets"])
        n, total = count_params(model)
        print(f"trainable: {n:,} / {total:,} params ({100 * n / total:.2f}%)")
    if mode == "ewc":
        ewc = EWC(model, random_fisher(model), lam=1.0)
        # as train.py does: the penalty's gradient goes into .grad after the loss's backward
        return model, lambda ids: model(ids, labels=ids), lambda: ewc.add_penalty_grad_(model)
    return model, lambda ids: model(ids, labels=ids), None


def hf_workload(args, mode: str):
    """transformers (+ PEFT for LoRA) set up for `mode`. use_cache=False: a training forward should not
    build a KV cache (HF's default would, which would only slow it down)."""
    hf = build_hf(args).train()
    if mode == "lora":
        import peft
        config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=list(LORA["targets"]),
                                 lora_dropout=0.0)
        hf = peft.get_peft_model(hf, config)
    return hf, lambda ids: hf(input_ids=ids, labels=ids, use_cache=False).loss, None


def run_workload(args):
    """Build, take 1 warm-up step, time --steps steps; print the figures for the parent to parse."""
    mode, device = args.mode, args.device
    torch.manual_seed(0)
    model, loss_fn, after_backward = (hf_workload if args.impl == "hf" else ours_workload)(args, mode)
    vocab = model_config(args).vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    opt = adamw([p for p in model.parameters() if p.requires_grad], args.adamw)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(ids).backward()
        if after_backward is not None:
            after_backward()
        opt.step()

    step()  # warm-up: AdamW allocates its state, allocators and kernels settle
    times = interleaved({"step": step}, args.steps, device)["step"]
    print(f"impl={args.impl}")
    print(f"mode={mode}")
    print(f"adamw={args.adamw}")
    print(f"step_s={statistics.median(times):.6f}")
    print(f"step_s_min={min(times):.6f}")
    print(f"step_s_max={max(times):.6f}")
    print(f"peak_mb={peak_memory_mb(device):.1f}")
    print(f"tokens_per_s={args.batch * args.seq / statistics.median(times):.3f}")


def child_command(args, mode: str, impl: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--impl", impl, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype,
           "--adamw", args.adamw]
    return cmd + (["--shape", args.shape] if args.shape else ["--model", str(args.model)])


def parse_figures(stdout: str) -> dict:
    figures = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isidentifier():
            try:
                figures[key] = float(value)
            except ValueError:
                figures[key] = value
    return figures


def run_child(args, mode: str, impl: str) -> dict:
    cmd = child_command(args, mode, impl)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or "tokens_per_s=" not in p.stdout:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ForgetlabError(f"benchmark workload failed: {' '.join(cmd[1:])}: {tail}")
    return parse_figures(p.stdout)


def bench_training(args, cfg: LlamaConfig, peak_gflops: float) -> dict:
    """Each workload in a fresh process, ours and HF alternating, --repeats rounds; medians over rounds."""
    impls = ["ours", "hf"] if args.hf else ["ours"]
    runs = {(mode, impl): [] for mode in ("full", "lora", "ewc") for impl in impls if (mode, impl) != ("ewc", "hf")}
    for _ in range(args.repeats):
        for mode, impl in runs:
            runs[(mode, impl)].append(run_child(args, mode, impl))
    n, n_lora = matmul_params(cfg)
    print(f"training: batch {args.batch} x {args.seq} tokens, labels = inputs, AdamW ({args.adamw}) lr {LR:g}, "
          f"1 warm-up + {args.steps} steps (median), {args.repeats} round(s) interleaved, one process each")
    print(f"  FLOPs/token for MFU: full, ewc 6N = {6 * n:.4g}; lora 4N + 6N_lora = {4 * n + 6 * n_lora:.4g} "
          f"(N = {n:,} matmul params, N_lora = {n_lora:,})")
    mem = "peak alloc" if torch.device(args.device).type == "cuda" else "peak RSS"
    print(f"  {'workload':9s} {'impl':5s} {'tokens/s':>10s} {'spread':>17s} {'MFU':>7s} {mem + ' MiB':>15s}")
    results = {}
    for mode in ("full", "lora", "ewc"):
        results[mode] = {}
        for impl in impls:
            rs = runs.get((mode, impl))
            if rs is None:
                continue
            tps = [r["tokens_per_s"] for r in rs]
            tok_s = statistics.median(tps)
            mfu = tok_s * flops_per_token(cfg, mode) / (peak_gflops * 1e9)
            peak = max(r["peak_mb"] for r in rs)
            results[mode][impl] = dict(tokens_per_s=tok_s, tokens_per_s_rounds=tps, mfu=mfu, peak_mb=peak,
                                       step_s=statistics.median(r["step_s"] for r in rs))
            spread = f"{min(tps):.1f}-{max(tps):.1f}"
            print(f"  {mode:9s} {impl:5s} {tok_s:10.1f} {spread:>17s} {100 * mfu:6.1f}% {peak:15.0f}")
    for mode, target in (("full", 1.05), ("lora", 1.15)):
        if "hf" in results[mode]:
            ratio = results[mode]["ours"]["tokens_per_s"] / results[mode]["hf"]["tokens_per_s"]
            results[mode]["ratio"] = ratio
            print(f"  ratio {mode} ours/HF tokens/s      {ratio:.3f}  (CPU target >= {target})")
    over = results["full"]["ours"]["tokens_per_s"] / results["ewc"]["ours"]["tokens_per_s"]
    results["ewc"]["step_over_full"] = over
    print(f"  ratio ewc step / full step        {over:.3f}  (target <= 1.15)")
    if not args.hf:
        print("  (transformers/peft not installed: HF columns skipped)")
    return results


# ----------------------------------------------------------------------------------------------------------
# Generation


def bench_generation(args, model, hf, vocab_size: int, new_tokens: int = GEN_NEW) -> dict:
    """Greedy generation of GEN_NEW tokens for GEN_BATCH random prompts of GEN_PROMPT tokens, no stop token
    (both sides produce every token, so the work is the same)."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab_size, (GEN_BATCH, GEN_PROMPT), generator=g)
    n_new = GEN_BATCH * new_tokens
    model.eval()
    out = {}

    def ours():
        out["ours"] = generate_ids(model, prompts.tolist(), new_tokens, stop_ids=[], pad_id=0)

    cases = {"ours (static KV cache)": ours}
    if hf is not None:
        ids = prompts.to(args.device)

        def theirs():
            with torch.no_grad():
                # min_new_tokens = max_new_tokens: no early stop at EOS, the same token count as ours
                y = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            out["hf"] = y[:, GEN_PROMPT:].tolist()
        cases["HF generate"] = theirs
    times = interleaved(cases, args.repeats, args.device)
    print(f"generation: batch {GEN_BATCH}, prompt {GEN_PROMPT} tokens, {new_tokens} new tokens, greedy, "
          f"{args.repeats} round(s)")
    result = {}
    for (name, t), key in zip(times.items(), ("ours", "hf")):
        tok_s = n_new / statistics.median(t)
        result[f"{key}_tokens_per_s"] = tok_s
        print(f"  {name:24s} {tok_s:10.1f} tokens/s   {summary(t)}")
    if hf is not None:
        assert all(len(r) == new_tokens for r in out["ours"] + out["hf"]), "a side stopped early"
        same = sum(a == b for ra, rb in zip(out["ours"], out["hf"]) for a, b in zip(ra, rb)) / n_new
        result["ratio"] = result["ours_tokens_per_s"] / result["hf_tokens_per_s"]
        result["greedy_agreement"] = same
        print(f"  ratio ours/HF tokens/s           {result['ratio']:.3f}   (greedy tokens identical: {100 * same:.1f}%)")
    return result


# ----------------------------------------------------------------------------------------------------------


def machine_info(args) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    info = dict(date=time.strftime("%Y-%m-%d %H:%M %Z"), platform=platform.platform(), cpu=cpu,
                cpu_count=os.cpu_count(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
                device=args.device, dtype=args.dtype,
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
    if torch.device(args.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    if args.hf:
        import peft
        import transformers
        info["transformers"], info["peft"] = transformers.__version__, peft.__version__
    return info


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every section")
    parser.add_argument("--train", action="store_true", help="training tokens/s, MFU, peak memory vs HF")
    parser.add_argument("--generate", action="store_true", help="generation tokens/s vs HF generate")
    parser.add_argument("--fisher", action="store_true", help="empirical Fisher cost (vs a plain step, the loop)")
    parser.add_argument("--ewc-step", action="store_true", help="EWC step variants vs a plain step, in process")
    parser.add_argument("--loop", action="store_true",
                        help="train.py's loop: short examples vs 4 x 256 tokens, and the AdamW step (bench_loop.py)")
    parser.add_argument("--eval", action="store_true",
                        help="eval.py's full level: seconds per task, forward tokens/s and MFU")
    parser.add_argument("--quick", action="store_true",
                        help="tiny random model, batch 2 x 32, 2 steps, 1 round (alone: every section)")
    parser.add_argument("--mode", choices=("full", "lora", "ewc"), help="run one training workload, print tokens_per_s=")
    parser.add_argument("--impl", choices=("ours", "hf"), default="ours", help="with --mode: whose model")
    parser.add_argument("--model", help="HF Llama directory (default: SmolLM2-135M-Instruct, prepared on first use)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
    parser.add_argument("--batch", type=int, help="training batch size (default 4; --quick 2)")
    parser.add_argument("--seq", type=int, help="training sequence length (default 256; --quick 32)")
    parser.add_argument("--steps", type=int, help="timed steps per workload after 1 warm-up step (default 3; --quick 2)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds of every timing (default 3; --quick 1)")
    parser.add_argument("--examples", type=int, help="examples for the Fisher timing (default 16; --quick 8)")
    parser.add_argument("--no-loop", action="store_true", help="skip the (slow) batch-size-1 Fisher loop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--adamw", choices=("foreach", "fused"), default="fused",
                        help="torch.optim.AdamW implementation, the same on both sides (fused: one kernel over "
                        "all tensors)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers/PEFT comparison")
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.model and args.shape:
        parser.error("--model and --shape exclude each other")
    if args.mode == "ewc" and args.impl == "hf":
        parser.error("--impl hf has no EWC workload (EWC is compared with our own full step)")
    if args.quick:
        args.shape = args.shape or (None if args.model else "tiny")
        args.no_loop = True
    for name, (default, quick) in SIZES.items():  # flags given explicitly win over --quick's sizes
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    sections = ("train", "generate", "fisher", "ewc_step", "eval", "loop")
    if args.all or (args.quick and not args.mode and not any(getattr(args, s) for s in sections)):
        for s in sections:
            setattr(args, s, True)
    if not args.mode and not any(getattr(args, s) for s in sections):
        parser.error("choose --all, --quick, a section (--train --generate --fisher --ewc-step --eval --loop) or --mode")
    if not args.shape and not args.model:
        from model.convert_gguf import prepare_default_model
        args.model = str(prepare_default_model())
    args.hf = not args.no_hf and hf_available()
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.mode:
        return run_workload(args)
    cfg = model_config(args)
    results = dict(machine=machine_info(args), config=dict(
        model=f"--shape {args.shape}" if args.shape else args.model, batch=args.batch, seq=args.seq,
        steps=args.steps, repeats=args.repeats, adamw=args.adamw, lora=dict(LORA, targets=list(LORA["targets"]))))
    m = results["machine"]
    print(f"machine: {m['cpu']} ({m['cpu_count']} CPUs), {args.device}{' ' + m['gpu'] if 'gpu' in m else ''}, "
          f"torch {m['torch']}, {m['torch_threads']} threads, load average {m['load_average'][0]:.2f}")
    print(f"model: {results['config']['model']}, {args.dtype}, vocab {cfg.vocab_size}, "
          f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}"
          + (f"; vs transformers {m['transformers']} + peft {m['peft']}" if args.hf else "; transformers/peft absent"))
    n = 8192 if torch.device(args.device).type == "cuda" else (512 if args.quick else 2048)
    peak = matmul_peak_gflops(args.device, DTYPES[args.dtype], n)
    results["matmul_peak_gflops"] = peak
    print(f"matmul peak: {peak:.1f} GFLOP/s ({args.dtype} {n}x{n} @ {n}x{n}, best of 5)")
    if args.train:
        results["train"] = bench_training(args, cfg, peak)
    model = build_ours(args) if (args.generate or args.fisher or args.ewc_step) else None
    if args.generate:
        hf = build_hf(args) if args.hf else None
        results["generate"] = bench_generation(args, model, hf, cfg.vocab_size)
        del hf
    if args.fisher or args.ewc_step:
        bench_fisher = sibling("bench_fisher")
        seq = 32 if args.quick else FISHER_SEQ
        batches, source = bench_fisher.fisher_batches(args, model, args.examples, FISHER_BATCH, seq)
        if args.fisher:
            print(f"Fisher estimation: {source}")
            results["fisher"] = bench_fisher.bench_fisher(model, batches, args.repeats, loop=not args.no_loop,
                                                          device=args.device)
        if args.ewc_step:
            print(f"EWC step (one batch of the Fisher data, AdamW {args.adamw}):")
            results["ewc_step"] = bench_fisher.bench_ewc_step(model, batches[0], args.repeats, device=args.device,
                                                              adamw_choice=args.adamw)
    if args.eval:
        results["eval"] = sibling("bench_eval").bench_eval(args, cfg, peak)
    if args.loop:
        results["loop"] = sibling("bench_loop").bench_loop(args, args.model)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    run_cli(main)
