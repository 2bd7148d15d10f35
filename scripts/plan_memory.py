"""How much memory each rank of a fine-tuning run needs, from a model's config.json alone: no weights are read.

    python scripts/plan_memory.py --model configs/llama-3.1-8b.json --method ewc --world-size 8 --fsdp \\
        --batch-size 8 --seq-len 2048 --grad-ckpt --gpu-mem 80
    python scripts/plan_memory.py --model runs/ewc-1/model --method lora --world-size 2       # an HF directory

The model is built on the meta device (shapes only) with LoRA applied when the method trains adapters, so the
parameter counts are those of the real module tree. Per rank, in bytes (N = --world-size):

    weights      every parameter in --dtype (train.py keeps float32 master weights)             /N with --fsdp
    gradients    the trainable parameters, in --dtype                                           /N with --fsdp
    optimizer    AdamW's two moments, in the trainable parameters' dtype                         /N with --fsdp
    fisher+anchor  EWC's F and θ* over the trainable parameters, in --ewc-dtype (ewc.EWC)        /N with --fsdp
    ewc scratch  EWC.value_and_grad's two reused buffers, each the largest (local) trainable tensor
    fsdp buffers the unsharded parameters of the root (embedding, norm, lm_head: gathered for the whole
                 forward and backward) and of two decoder layers (the one computing and the prefetched next),
                 plus one layer's unsharded gradient before its reduce-scatter; bf16 on CUDA (mixed precision)
    activations  what autograd keeps for backward, per rank: batch_size/N examples of --seq-len tokens (every
                 position labelled: the worst case), see `activation_bytes`

A step never holds all of these at once. Gradients are freed after every optimizer step (zero_grad
set_to_none), so backward starts with every activation and no gradient, and ends with every gradient and no
activation; in between, layer by layer, one grows as the other shrinks. Hence

    peak ≈ weights + optimizer + fisher+anchor + scratch + fsdp buffers + max(activations, gradients)

except under DDP, whose gradient buckets (gradient_as_bucket_view) are allocated once and never freed: there
the gradients are added to the activations. `tests/test_plan_memory.py` checks this peak against the tensor
bytes a real step allocates (the CPU allocator's own count, through the profiler); on CUDA compare with
torch.cuda.max_memory_allocated. Not counted: the CUDA context and NCCL buffers (~1-2 GiB per GPU), allocator
fragmentation (leave ~10%), and the Fisher estimation, which runs before the optimizer state exists.
"""
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import ArgumentParser, ForgetlabError, run_cli
from model.checkpoint import DTYPES
from model.config import LlamaConfig
from model.llama import Llama

GiB = 2**30
# What each method keeps, in memory terms: does it train LoRA adapters instead of every weight, and how many
# extra per-parameter copies of the trainable parameters does it hold (EWC: the Fisher and the anchor)?
METHODS = {"full": (False, 0), "replay": (False, 0), "safe": (False, 0), "risky": (False, 0),
           "ewc": (False, 2), "l2-init": (False, 1), "lora": (True, 0), "ewc-lora": (True, 0), "kl": (False, 0)}
# ewc-lora's Fisher and anchor are over the adapted base weights (frozen): counted as 2 copies of those below.
LORA_DEFAULTS = dict(r=16, alpha=32, targets=("q_proj", "v_proj"))
ROOT = ("model.embed_tokens", "model.norm", "lm_head")  # what fully_shard(model) itself owns (distributed.py)


def meta_model(path) -> Llama:
    """A Llama of `path` (a config.json, or an HF directory holding one) on the meta device: shapes, no data."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    cfg = LlamaConfig.from_json(file)
    with torch.device("meta"):
        return Llama(cfg)


def nbytes(tensors, dtype=None) -> int:
    """Bytes of `tensors` (deduplicated by identity: a tied weight counts once), in `dtype` or their own."""
    seen = {id(t): t for t in tensors}.values()
    return sum(t.numel() * (dtype.itemsize if dtype is not None else t.element_size()) for t in seen)


def activation_bytes(cfg: LlamaConfig, batch: int, seq: int, grad_ckpt: bool, compute_dtype: torch.dtype,
                     master_dtype: torch.dtype, frozen_linears: tuple = ()) -> dict[str, int]:
    """What autograd saves for backward in one forward of `batch` examples of `seq` tokens (model/llama.py),
    in bytes: a count of the tensors each operation keeps, not a measurement.

    Per token and decoder layer, with h = hidden, i = intermediate, q = heads·head_dim, kv = kv_heads·head_dim:
      residual stream and norms, in the master dtype: the block input, the mid-block sum and the two
          normalized inputs (4h), plus the two rsqrt scalars
      attention, in the compute dtype: q, k, v after RoPE (q + 2kv) and the output (q) kept by SDPA (flash or
          memory-efficient kernels: no T×T matrix; its float32 log-sum-exp, one per head), o_proj's input (q);
          under bf16 autocast each linear also keeps its own bf16 copy of its input (5h: q, k, v, gate, up)
      SwiGLU: gate, silu(gate), up and their product (4i), the product kept by down_proj
    A frozen linear (`frozen_linears`: o_proj, down_proj in a LoRA run that does not adapt them) keeps no input
    of its own. With --grad-ckpt only each layer's input (h) is kept, and one layer's activations exist again
    while its backward recomputes them. Outside the layers: the final norm (2h) and the loss: with a
    vocabulary under 64k every labelled position's float32 softmax gradient (vocab each) is kept; above, one
    chunk of 4096 positions at a time is recomputed in backward (model/loss.py, `linear_cross_entropy`).
    Backward's first temporaries, the gradients of the final hidden state and norm, add 2h.
    Checked against the peak of a real step on CPU in tests/test_plan_memory.py (float32)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    m, c = master_dtype.itemsize, compute_dtype.itemsize
    casts = 5 * h if compute_dtype != master_dtype else 0
    o_in = 0 if "o_proj" in frozen_linears else q
    down_in = 0 if "down_proj" in frozen_linears else i
    per_token_layer = (m * (4 * h + 2) + c * (q + 2 * kv + q + o_in + casts + 3 * i + down_in)
                       + 4 * cfg.num_attention_heads)
    tokens = batch * seq
    layer = tokens * per_token_layer
    layers = tokens * m * h * cfg.num_hidden_layers + layer if grad_ckpt else layer * cfg.num_hidden_layers
    recompute = cfg.vocab_size * 4096 * 4 > 2**30  # model/loss.py's rule
    logits_tokens = min(tokens, 4096) if recompute else tokens
    return {"layers": layers, "final norm and loss": tokens * m * 2 * h + logits_tokens * cfg.vocab_size * 4,
            "backward temporaries": tokens * m * 2 * h}


@dataclass
class Plan:
    rows: dict[str, int]  # per-rank bytes of each kind
    peak: int  # the estimated high-water mark, see the module docstring
    total: int  # every row at once: an upper bound
    trainable: int
    params: int


def plan(model: Llama, method: str = "full", world_size: int = 1, fsdp: bool = False,
         dtype: torch.dtype = torch.float32, batch_size: int = 8, seq_len: int = 256, grad_ckpt: bool = False,
         device: str = "cuda", ewc_dtype: torch.dtype = torch.float32, lora: dict | None = None) -> Plan:
    """Per-rank memory of training `model` (on the meta device or not) with `method` on `world_size` ranks;
    `batch_size` is the global micro-batch (each rank gets batch_size / world_size examples, as in train.py)."""
    if method not in METHODS:
        raise ForgetlabError(f"--method {method!r}: no memory recipe (known: {', '.join(METHODS)})")
    if world_size < 1 or batch_size < 1 or seq_len < 1:
        raise ForgetlabError("--world-size, --batch-size and --seq-len must be positive")
    uses_lora, copies = METHODS[method]
    n = world_size if fsdp else 1  # what divides the sharded states
    if uses_lora:
        from lora import apply_lora
        o = {**LORA_DEFAULTS, **(lora or {})}
        with torch.device(next(model.parameters()).device):
            apply_lora(model, r=o["r"], alpha=o["alpha"], dropout=0.0, targets=o["targets"])
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    adapter_dtype = torch.float32  # LoRALinear keeps A and B in float32 whatever the base's dtype
    train_dtype = adapter_dtype if uses_lora else dtype

    def shard(b):  # FSDP2 shards every tensor on dim 0, padding it to a multiple of N
        return math.ceil(b / n)

    rows = {"weights": shard(nbytes([p for p in params if not p.requires_grad], dtype) + nbytes(trainable, train_dtype)),
            "gradients": shard(nbytes(trainable, train_dtype)),
            "optimizer (AdamW)": shard(2 * nbytes(trainable, train_dtype))}
    ewc_over = trainable
    if method == "ewc-lora":  # F and θ* of the adapted base weights
        from lora import lora_modules
        ewc_over, copies = [m.weight for m in lora_modules(model).values()], 2
    rows["fisher+anchor"] = shard(copies * nbytes(ewc_over, ewc_dtype))
    largest = max((p.numel() for p in ewc_over), default=0) if copies else 0
    scratch_dtype = torch.promote_types(train_dtype, ewc_dtype)
    rows["ewc scratch"] = 2 * math.ceil(largest / n) * scratch_dtype.itemsize if copies == 2 else 0
    cuda = device == "cuda"
    compute = torch.bfloat16 if cuda else dtype
    if fsdp and world_size > 1:
        by_module = {}
        for name, p in model.named_parameters():
            if name.startswith("model.layers."):
                by_module.setdefault(".".join(name.split(".")[:3]), []).append(p)
        layer = max(nbytes(ps, compute) for ps in by_module.values())
        root = nbytes([p for name, p in model.named_parameters() if name.startswith(ROOT)], compute)
        layer_grad = max(nbytes([p for p in ps if p.requires_grad], torch.float32) for ps in by_module.values())
        rows["fsdp buffers"] = root + 2 * layer + layer_grad
    else:
        rows["fsdp buffers"] = 0
    per_rank_batch = math.ceil(batch_size / world_size)
    master = dtype if not (fsdp and cuda) else torch.bfloat16  # FSDP mixed precision: bf16 params in compute
    frozen = tuple(k for k in ("o_proj", "down_proj")
                   if not any(p.requires_grad for n, p in model.named_parameters() if f".{k}." in n))
    acts = activation_bytes(model.config, per_rank_batch, seq_len, grad_ckpt, compute, master, frozen)
    rows["activations"] = sum(acts.values())
    grads, activations = rows["gradients"], rows["activations"]
    static = sum(v for k, v in rows.items() if k not in ("gradients", "activations"))
    ddp = world_size > 1 and not fsdp
    peak = static + (grads + activations if ddp else max(grads, activations))
    return Plan(rows, peak, sum(rows.values()), sum(p.numel() for p in trainable), sum(p.numel() for p in params))


def format_plan(p: Plan, gpu_mem: float | None = None) -> str:
    lines = [f"{'':24}{'GiB per rank':>14}"]
    lines += [f"{k:24}{v / GiB:14.2f}" for k, v in p.rows.items()]
    lines += [f"{'peak (estimate)':24}{p.peak / GiB:14.2f}", f"{'all at once (bound)':24}{p.total / GiB:14.2f}"]
    lines.append(f"trainable parameters {p.trainable:,} of {p.params:,}")
    if gpu_mem is not None:
        verdict = "fits" if p.peak <= gpu_mem * GiB else "does NOT fit"
        lines.append(f"{verdict} in {gpu_mem:g} GiB per GPU (CUDA context, NCCL and fragmentation not counted: "
                     f"leave 10%)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- measuring it

@contextlib.contextmanager
def measured_peak(device: str = "cpu"):
    """Yields a dict whose "peak" is, after the block, the most tensor bytes live at once during it, above
    what was live when it began: torch.cuda.max_memory_allocated on CUDA; on CPU the allocator's own
    allocation and free events, recorded by the profiler (profile_memory) and replayed in time order. Not the
    process's RSS: the same tensor bytes the plan counts, without Python's or malloc's overhead."""
    result = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["peak"] = torch.cuda.max_memory_allocated() - start
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, b in events:
        live += b
        peak = max(peak, live)
    result["peak"] = peak


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a config.json, or an HF model directory (only its config is read)")
    p.add_argument("--method", default="full", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) in all")
    p.add_argument("--fsdp", action="store_true", help="FSDP2: shard weights, gradients, optimizer and EWC state")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="dtype of the stored weights")
    p.add_argument("--ewc-dtype", default="float32", choices=("float32", "bfloat16"), help="--ewc.dtype")
    p.add_argument("--batch-size", type=int, default=8, help="global micro-batch, split across the ranks")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example (all labelled: the worst case)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda: bf16 autocast (and bf16 FSDP mixed precision); cpu: everything in --dtype")
    p.add_argument("--lora-r", type=int, default=LORA_DEFAULTS["r"])
    p.add_argument("--lora-targets", default=",".join(LORA_DEFAULTS["targets"]),
                   help="comma-separated module suffixes, or all-linear")
    p.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU: say whether the plan fits")
    a = p.parse_args(argv)
    targets = "all-linear" if a.lora_targets == "all-linear" else tuple(a.lora_targets.split(","))
    model = meta_model(a.model)
    result = plan(model, a.method, a.world_size, a.fsdp, DTYPES[a.dtype], a.batch_size, a.seq_len, a.grad_ckpt,
                  a.device, getattr(torch, a.ewc_dtype), dict(r=a.lora_r, targets=targets))
    how = "FSDP2" if a.fsdp else ("DDP" if a.world_size > 1 else "1 process")
    print(f"{a.model}: {a.method}, {how} x {a.world_size}, {a.dtype} weights, batch {a.batch_size} x {a.seq_len}"
          f"{', grad-ckpt' if a.grad_ckpt else ''}, {a.device}")
    print(format_plan(result, a.gpu_mem))
    return result


if __name__ == "__main__":
    run_cli(main)
