"""Several processes, one run: torch.distributed under torchrun, DDP or FSDP2, with the numbers of one process.

    torchrun --nproc_per_node 8 train.py --method ewc ...            # DDP: every rank holds the whole model
    torchrun --nproc_per_node 8 train.py --method ewc --fsdp ...     # FSDP2: weights, gradients, AdamW, F, θ* / 8

Nothing here is home-made communication: torchrun starts the processes and its rendezvous (--nnodes,
--rdzv-endpoint) connects the machines; torch.distributed's DistributedDataParallel or FSDP2's `fully_shard`
(DTensor parameters) reduce the gradients; torch.distributed.checkpoint's state_dict helpers gather and set the
sharded state, which train_state.py saves as one safetensors file per rank (never DCP's own pickled format).
The backend follows the device: gloo on CPU, NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK).

The same global batch as one process. The data order is the single-process one: every rank builds the same
list of global micro-batches (same seed) and takes its own contiguous slice of rows of each (`rank_slice`).
The loss of one optimizer step is Σ_tokens ℓ_t / n, n = the labelled tokens of the step's global
micro-batches, which every rank can count without communicating since it holds the global batches. Rank r's
micro-batch loss (its mean over its own n_r tokens) is weighted by N·n_r/n before backward, because DDP and
FSDP2 *average* gradients over the N ranks: the average of N·n_r/n·∇(mean_r) is Σ_r n_r/n·∇(mean_r), the
single-process gradient. So the loss curve does not depend on N (tests/test_distributed.py: ≤ 1e-5).

The Fisher, which the obvious code gets wrong. After a DDP backward, p.grad is the *rank-averaged* gradient,
and under FSDP2 it is a reduce-scattered shard of that average; squaring it gives ((g_a + g_b)/2)², not the
mean of g_a² and g_b² (a large error under DDP and under FSDP2, which
tests/test_distributed.py shows). Here the per-example squares are summed by the hook path of per_example_grads.py,
which never touches p.grad (the parameters are frozen while it runs, so no gradient is synchronized at all),
on the plain model before it is wrapped, each rank over its slice of the Fisher examples; then the sums and
the example count are all-reduced as a SUM, and divided
(ewc.estimate_fisher(..., all_ranks=True)). Under FSDP2, F and θ* are then sharded exactly like their
parameters (`EWC.shard_like`: distribute_tensor with the parameter's mesh and placements), the penalty and
its gradient are computed on local shards, and the logged penalty is all-reduced: EWC's memory per rank
falls as 1/N.

Evaluation runs on rank 0 on the whole model (under FSDP2, the gathered weights in a plain copy) while the
other ranks wait: the same numbers and per-item records as one process, in the same time (docs/distributed.md
gives the measurement).

Limits. Every rank loads the whole model first (model/checkpoint.py reads it into memory; FSDP2 shards it
afterwards), so the model must fit one device's memory once, without its gradients and optimizer state; the
Fisher is estimated on that whole model too, with one full-size float32 accumulator per rank, before
`EWC.shard_like` keeps 1/N of it. The kl method's "copy" teacher is an unsharded copy on every rank (its
"cache" teacher, the default, is not a model). Every built-in method runs under both DDP and FSDP2.
Dropout masks are drawn per rank: with dropout > 0, N ranks give a run that is statistically, not bitwise,
the one-process run (the equality tests use dropout 0).
"""
import atexit
import contextlib
import copy
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from errors import ForgetlabError
from model.llama import IGNORE_INDEX

# Evaluation of the whole model runs on rank 0 while the others wait at a barrier: give them time.
TIMEOUT = datetime.timedelta(hours=2)


def launched() -> bool:
    """Started by torchrun (or anything that sets its environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str, fsdp: bool = False, backend: str = "auto") -> tuple[str, str | None]:
    """Join the process group torchrun set up, when it did. Returns (this rank's device, backend or None).

    device "cuda" becomes cuda:LOCAL_RANK (one GPU per process). backend "auto" is NCCL on CUDA, gloo on
    CPU. One-line errors for the mistakes: --fsdp without torchrun, NCCL asked on CPU."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ForgetlabError(f"--backend {backend!r}: choose auto, gloo or nccl")
    if not launched():
        if fsdp:
            raise ForgetlabError("--fsdp needs several processes: start the run with torchrun, e.g. "
                                 "`torchrun --nproc_per_node 2 train.py --fsdp ...`")
        return device, None
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ForgetlabError(f"--backend nccl needs CUDA devices; this run is on {device} (use gloo)")
    if cuda:
        if local >= torch.cuda.device_count():
            raise ForgetlabError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} GPU(s); "
                                 f"start at most that many processes per node")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT,
                                device_id=torch.device(device) if cuda else None)
        atexit.register(teardown)  # the group this call created ends with the process
    return device, backend


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and prints."""
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x):
    """Σ over ranks: of a tensor in place, of a number as a float (summed in float64)."""
    if not dist.is_initialized():
        return x
    t = x if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t if torch.is_tensor(x) else t.item()


def comm_device() -> torch.device:
    """Where a tensor must live for the backend's collectives: the GPU for NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] alone): e.g. each rank's verdict on its own
    checkpoint file, so that all of them take the same decision."""
    if not dist.is_initialized():
        return [obj]
    box = [None] * world_size()
    dist.all_gather_object(box, obj)
    return box


def broadcast_object(obj):
    """rank 0's Python object, on every rank (e.g. an evaluation only rank 0 ran)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------- the data

def check_batch_size(batch_size: int):
    """Each rank gets batch_size / N rows of every global micro-batch: N must divide it."""
    n = world_size()
    if batch_size % n:
        raise ForgetlabError(f"--batch-size {batch_size} is not divisible by the world size {n}: each rank takes "
                             f"an equal slice of every global batch")


def rank_rows(n_rows: int, r: int, n: int) -> slice:
    """Rank r's contiguous rows of an n_rows batch: equal slices, the first n_rows % n ranks one row more
    (the last batch of an epoch may be short)."""
    base, extra = divmod(n_rows, n)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def rank_slice(batch: dict) -> dict:
    """This rank's rows of a global micro-batch (dict of (B, T) tensors), padding as the global batch has it.
    A rank left without rows (a short last batch) gets row 0 again, marked `rank_weight` 0: it still runs
    forward and backward through every parameter, which DDP's reducer and FSDP2 need from every rank, and
    `local_targets` counts it as nothing, so it contributes exactly zero."""
    n = world_size()
    if n == 1:
        return batch
    rows = rank_rows(batch["input_ids"].shape[0], rank(), n)
    part = {k: v[rows] for k, v in batch.items()}
    if part["input_ids"].shape[0] == 0:
        part = {k: v[:1] for k, v in batch.items()}
        part["rank_weight"] = torch.zeros(())
    return part


def count_targets(batch) -> int:
    """Labelled positions the loss averages over (labels[:, 0] is never a target)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def local_targets(part) -> int:
    """The targets a `rank_slice` contributes: its labelled positions, none for a stand-in row."""
    return 0 if "rank_weight" in part else count_targets(part)


def loss_weight(part, n_global: int) -> float:
    """The factor of a rank's mean micro-batch loss so that the gradient, once DDP / FSDP2 average it over the
    N ranks, is the single-process one: N · n_local / n_global (see the module docstring). 1 process: n / n_global."""
    return world_size() * local_targets(part) / n_global


def fisher_share(batches) -> list[dict]:
    """This rank's rows of each Fisher batch, stand-ins dropped (estimate_fisher(all_ranks=True) runs on the
    plain model, with no collective inside, so ranks may see different numbers of batches)."""
    return [p for p in map(rank_slice, batches) if "rank_weight" not in p]


# -------------------------------------------------------------------------------------------- the model

def wrap(model: nn.Module, fsdp: bool, device: str) -> nn.Module:
    """The module to call for training. DDP: a DistributedDataParallel around `model` (the model itself is
    unchanged, method hooks keep using it); FSDP2: `model` itself, sharded in place (`shard`). One process:
    `model`. Call after the method has configured the model (LoRA applied, parameters frozen)."""
    if world_size() == 1 and not fsdp:
        return model
    if fsdp:
        return shard(model, device)
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    # gradient_as_bucket_view: p.grad is a view into DDP's communication bucket, not a second copy of it
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True)


def shard(model: nn.Module, device: str) -> nn.Module:
    """FSDP2: `fully_shard` every decoder layer, then the root (embedding, final norm, lm_head), in place.
    Every parameter becomes a DTensor sharded on dim 0 over the ranks, frozen ones too (a LoRA run's base
    weights, a frozen reference copy: `shard` it the same way and call it on every rank). On CUDA the
    layers compute in bf16 (MixedPrecisionPolicy: bf16 parameters, float32 gradient reduction) while the
    sharded master weights stay float32; on CPU everything stays in the model's dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.startswith("cuda") else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def shard_method_state(method, model: nn.Module):
    """After `shard`: FSDP2 replaced the model's parameters by sharded DTensors, so a method's per-parameter
    state must follow. Every tensor of the method's `param_state` attributes ({parameter name: tensor}, see
    methods/base.py) is laid out like the parameter of its name, so that the method's formulas, written on whole
    tensors, run unchanged on each rank's shards; every ewc.EWC among its attributes is laid out like the
    parameters it holds F and θ* for (EWC.shard_like)."""
    from ewc import EWC
    params = dict(model.named_parameters())
    for attr in method.param_state:
        state = getattr(method, attr)
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"{type(method).__name__}.{attr}: {unknown[0]} is not a parameter of the model "
                           f"(param_state tensors are keyed by parameter name)")
        setattr(method, attr, {n: distribute_like(t, params[n]) for n, t in state.items()})
    for value in vars(method).values():
        if isinstance(value, EWC):
            value.shard_like(model)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def unwrap(module: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (FSDP2 shards in place: there is nothing to unwrap)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool):
    """Backward passes in this block synchronize gradients only if `enabled`: gradient accumulation
    reduces once, on the last micro-batch (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if enabled or world_size() == 1:
        yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def is_dtensor(t) -> bool:
    """A DTensor (FSDP2's sharded parameters and whatever is laid out like them)."""
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of a DTensor this rank holds (its local shard), or t itself."""
    return t.to_local() if is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor, gathered (a collective: every rank must call it), or t itself."""
    return t.full_tensor() if is_dtensor(t) else t


def distribute_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`t` (the same full value on every rank) laid out exactly like parameter p: a DTensor with p's mesh and
    placements when p is one (each rank keeps its own shard, no communication), else t."""
    if not hasattr(p, "device_mesh"):
        return t
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.to(p.device_mesh.device_type), p.device_mesh, p.placements, src_data_rank=None)


def clip_grad_norm_(params, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ as a float: the global norm, over every rank's shards under FSDP2."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    return float(full(norm))


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree (LoRA layers, ties, frozen flags) on the meta device, costing no memory.
    Take it before FSDP2 shards the model; after training, `gathered` fills it with the trained weights on
    rank 0: a plain model to save and evaluate."""
    memo = {}
    for t in model.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    for t in model.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(model, memo)


def gathered(model: nn.Module, twin: nn.Module | None) -> nn.Module | None:
    """The trained model as a plain module on rank 0's CPU (None on the other ranks; every rank must call it):
    under FSDP2 the full state dict gathered into `twin` (see meta_twin), else the model itself."""
    if not is_sharded(model):
        return unwrap(model) if is_main() else None
    state = full_state_dict(model)
    if not is_main():
        return None
    twin.load_state_dict(state, assign=True)  # assign: the meta tensors become the gathered ones
    twin.tie_weights()
    twin.reset_rope("cpu")
    return twin


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered on CPU on rank 0 (an empty dict elsewhere): what
    save_pretrained / save_adapter write. A collective under FSDP2: every rank must call it."""
    if not is_sharded(model):
        return {k: v.detach() for k, v in unwrap(model).state_dict().items()} if is_main() else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main() else {}
