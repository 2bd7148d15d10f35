"""Training checkpoints for `train.py --resume`: everything a run needs to continue bit for bit, nothing pickled.

    <out>/checkpoints/step-<N>/
        state.safetensors   model.<name>          trainable weights (LoRA adapters only, for a LoRA run)
                            optimizer.<i>.<key>   the optimizer's per-parameter tensors (AdamW: step, exp_avg,
                                                  exp_avg_sq), <i> its parameter index
                            method.<key>          the method's tensors (EWC: fisher.*, anchor.*)
                            rng.torch, rng.cuda.<i>   torch's CPU and CUDA generator states (uint8)
        state.json          step, data position, Python and NumPy RNG states, optimizer hyper-parameters, the
                            run's config, the byte size of state.safetensors

What is not saved is recomputed exactly: the learning rate is a function of the step (train.get_lr), and the
data order of epoch e is a function of (seed, e) (train.micro_batch_stream), so the position is the step.

A checkpoint is written into step-<N>.tmp/, each file fsynced, then renamed to step-<N>/ and the parent
directory fsynced: a crash or a SIGKILL at any point leaves either the complete new checkpoint or none, and
the older ones untouched. The newest `keep` are kept. `find_latest` returns the newest that reads back
completely, skipping (with a warning) one that does not.

Under torchrun (several processes, distributed.py) the state is written with torch.distributed.checkpoint
instead, each rank its own shards: see `save_sharded_checkpoint` at the end.
"""
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import distributed
from errors import ForgetlabError, check_names, read_json_object
from model.checkpoint import read_safetensors, write_atomic_text

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
FORMAT_VERSION = 1


def checkpoint_dir(out) -> Path:
    return Path(out) / "checkpoints"


def step_dirs(out) -> list[tuple[int, Path]]:
    """(step, path) of the finished checkpoints under <out>/checkpoints, oldest first (.tmp ones excluded)."""
    root = checkpoint_dir(out)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            n = p.name.removeprefix("step-")
            if p.is_dir() and p.name.startswith("step-") and n.isdigit():
                found.append((int(n), p))
    return sorted(found)


# ----------------------------------------------------------------------------- RNG states

def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of every generator a training step may draw from."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = dict(python=[version, list(mt), gauss], numpy=[name, keys.tolist(), pos, has_gauss, cached])
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]):
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- optimizer state

def optimizer_param_names(model, optimizer) -> list[str]:
    """The model's name of each optimizer parameter, in the optimizer's index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def flatten_optimizer(optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """optimizer.state_dict() as (JSON part, named tensors): tensors become optimizer.<i>.<key>."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{i}.{k}"] = v
            else:
                scalars[f"{i}.{k}"] = v
    return dict(param_groups=sd["param_groups"], scalars=scalars), tensors


def unflatten_optimizer(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("optimizer."):
            i, k = name[len("optimizer."):].split(".", 1)
            state.setdefault(int(i), {})[k] = t
    for name, v in meta["scalars"].items():
        i, k = name.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- write

def fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out, step: int, model, optimizer, method, progress: dict, config: dict, keep: int = 2) -> Path:
    """Write <out>/checkpoints/step-<step>/ atomically and delete all but the newest `keep` checkpoints.
    `progress`: JSON-able run counters (data position, tokens, skipped batches) restored by the caller."""
    if distributed.world_size() > 1:
        return save_sharded_checkpoint(out, step, model, optimizer, method, progress, config, keep)
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed mid-write
    tmp.mkdir()
    try:
        rng_meta, rng_tensors = capture_rng()
        opt_meta, opt_tensors = flatten_optimizer(optimizer)
        tensors = {f"model.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
        tensors.update(opt_tensors)
        tensors.update({f"method.{k}": v.detach() for k, v in method.state_dict().items()})
        tensors.update(rng_tensors)
        tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, tmp / STATE_TENSORS, metadata={"format": "pt"})
        meta = dict(version=FORMAT_VERSION, step=step, progress=progress, rng=rng_meta, optimizer=opt_meta,
                    optimizer_params=optimizer_param_names(model, optimizer), config=config,
                    sizes={STATE_TENSORS: (tmp / STATE_TENSORS).stat().st_size})
        (tmp / STATE_JSON).write_text(json.dumps(meta))
        for f in (STATE_TENSORS, STATE_JSON):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step that failed to read back, from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:  # Ctrl-C or a full disk mid-write: no half-written directory stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in step_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- read

def read_checkpoint(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json, every tensor of state.safetensors) of one checkpoint directory, fully read and checked;
    ForgetlabError naming the file if anything is missing, truncated or malformed."""
    path = Path(path)
    meta_file, tensor_file = path / STATE_JSON, path / STATE_TENSORS
    for f in (meta_file, tensor_file):
        if not f.is_file():
            raise ForgetlabError(f"{f}: checkpoint file missing")
    meta = read_json_object(meta_file, "checkpoint metadata")
    required = ("version", "step", "progress", "rng", "optimizer", "optimizer_params", "config", "sizes")
    if any(k not in meta for k in required):
        raise ForgetlabError(f"{meta_file}: not a training checkpoint (expected keys {', '.join(required)})")
    if not (isinstance(meta["step"], int) and isinstance(meta["sizes"], dict) and isinstance(meta["progress"], dict)):
        raise ForgetlabError(f"{meta_file}: malformed training checkpoint metadata")
    if meta["version"] != FORMAT_VERSION:
        raise ForgetlabError(f"{meta_file}: checkpoint format {meta['version']}, this code reads {FORMAT_VERSION}")
    size = tensor_file.stat().st_size
    if size != meta["sizes"].get(STATE_TENSORS):
        raise ForgetlabError(f"{tensor_file}: truncated or replaced ({size} bytes, "
                             f"{meta['sizes'].get(STATE_TENSORS)} were written)")
    tensors, _ = read_safetensors(tensor_file)
    if "rng.torch" not in tensors:
        raise ForgetlabError(f"{tensor_file}: no rng.torch tensor (not a training checkpoint)")
    return meta, tensors


def find_latest(out) -> tuple[Path, dict, dict] | None:
    """(path, state.json, tensors) of the newest checkpoint under <out> that reads back completely, None if
    there is none at all. Unreadable ones are skipped with a warning; ForgetlabError if every one is."""
    errors = []
    read = read_sharded_checkpoint if distributed.world_size() > 1 else read_checkpoint
    for _, path in reversed(step_dirs(out)):
        try:
            meta, tensors = read(path)
        except ForgetlabError as e:
            print(f"warning: skipping checkpoint {path}: {e}", file=sys.stderr)
            errors.append(str(e))
            continue
        return path, meta, tensors
    if errors:
        raise ForgetlabError(f"{checkpoint_dir(out)}: no readable checkpoint ({errors[0]})")
    return None


def apply_checkpoint(path, meta: dict, tensors: dict, model, optimizer, method):
    """Load the weights, optimizer and method state of a checkpoint read by `read_checkpoint` into the run.
    Everything is checked against the model before anything is changed, so a mismatch never half-loads.
    RNG states are restored separately (`restore_rng`), right before the loop continues."""
    file = Path(path) / STATE_TENSORS
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k[len("model."):]: t for k, t in tensors.items() if k.startswith("model.")}
    check_names(params, saved, f"{file}: does not fit this run's model (another method or model?)", "trainable tensor")
    for n, p in params.items():
        if saved[n].shape != p.shape:
            raise ForgetlabError(f"{file}: {n} has shape {tuple(saved[n].shape)}, the model's is {tuple(p.shape)}")
    if meta["optimizer_params"] != optimizer_param_names(model, optimizer):
        raise ForgetlabError(f"{file}: the optimizer state was saved for other parameters")
    method_state = {k[len("method."):]: t for k, t in tensors.items() if k.startswith("method.")}
    expected = method.state_dict()
    if set(method_state) != set(expected):
        raise ForgetlabError(f"{file}: the {method.name!r} method's state does not match the checkpoint's")
    try:  # first: load_state_dict checks everything before it changes anything
        optimizer.load_state_dict(unflatten_optimizer(meta["optimizer"], tensors))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ForgetlabError(f"{file}: optimizer state does not load ({type(e).__name__}: {e})") from None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    if method_state:
        method.load_state_dict(method_state)


# ----------------------------------------------------------------------------- resume

@dataclass
class Progress:
    """Where a run is and what it has counted: what a checkpoint restores besides its tensors."""
    step: int = 0  # optimizer steps done
    tokens: int = 0  # non-pad tokens processed
    skipped: int = 0  # non-finite steps skipped (--skip-nonfinite)
    loss: float = float("nan")  # the last step's loss
    checkpoint: Path | None = None  # the newest checkpoint written (or resumed from)


def resume(out, model, optimizer, method, examples: int, total_steps: int, metrics: Path) -> Progress:
    """Continue the run in `out` from its newest readable checkpoint (`find_latest`); Progress() when it has none.
    Loads the weights, optimizer and method state into the run (after the method's setup and configure, and
    the optimizer's creation), cuts the `metrics` log back to the checkpoint's step and restores the RNG states:
    call it right before the loop, since whatever draws a random number after it changes the run."""
    found = find_latest(out)
    main = distributed.is_main()  # the one that prints and owns metrics.jsonl
    if found is None:
        if main:
            print(f"--resume: no checkpoint in {out}: starting from step 0", file=sys.stderr)
            trim_metrics(metrics, 0)
        return Progress()
    path, meta, tensors = found
    counters = meta["progress"]
    if any(k not in counters for k in ("tokens", "skipped", "loss", "examples")):
        raise ForgetlabError(f"{path / STATE_JSON}: malformed training checkpoint metadata (progress)")
    if counters["examples"] != examples:
        raise ForgetlabError(f"--resume: the training set has {examples} examples, the checkpoint "
                             f"{path} was trained on {counters['examples']} (data changed?)")
    if meta["step"] > total_steps:
        raise ForgetlabError(f"--resume: {path} is at step {meta['step']}, past the {total_steps} steps asked")
    if distributed.world_size() > 1:
        apply_sharded_checkpoint(path, meta, model, optimizer, method)
    else:
        apply_checkpoint(path, meta, tensors, model, optimizer, method)
    if main:
        print(f"resuming from {path} (step {meta['step']} of {total_steps})", file=sys.stderr)
        trim_metrics(metrics, meta["step"])
    restore_rng(meta["rng"], tensors)  # last: nothing above draws from the restored generators
    return Progress(meta["step"], counters["tokens"], counters["skipped"], counters["loss"], path)


def trim_metrics(path: Path, step: int):
    """Keep the JSON lines of steps 1..step (a run killed after its checkpoint logged a few more)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut short by the kill: nothing after it is kept
    write_atomic_text(path, "".join(kept))


# ----------------------------------------------------------------------------- several processes (torchrun)
# Under torchrun (distributed.py) one checkpoint directory serves every rank:
#     dcp/                    weights (trainable only), optimizer and method state, written by
#                             torch.distributed.checkpoint: each rank its own shards under FSDP2, DDP's replicated
#                             tensors once
#     rng-<rank>.safetensors  each rank's torch generators, its Python and NumPy states in the metadata
#     state.json              as above, plus world_size, and the byte size of every file (a truncated one is seen)
# A run resumes on as many ranks as wrote the checkpoint: the rows each rank trains on depend on the count.
DCP_DIR = "dcp"


def sharded_state(model, optimizer, method) -> dict:
    """What DCP saves and loads in place: {"model", "optimizer", "method"} keyed by parameter name, DTensors
    under FSDP2. Frozen weights are left out (a LoRA run's base model is the checkpoint it started from)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_sd, "optimizer": optim_sd, "method": method.state_dict()}


def save_sharded_checkpoint(out, step: int, model, optimizer, method, progress: dict, config: dict,
                            keep: int = 2) -> Path:
    """`save_checkpoint` on several ranks (every rank calls it): written into step-<N>.tmp/, renamed by rank 0
    once every rank has finished its part, as atomic as the single-process one."""
    import torch.distributed.checkpoint as dcp
    rank, main = distributed.rank(), distributed.is_main()
    root = checkpoint_dir(out)
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    distributed.barrier()
    try:
        dcp.save(sharded_state(model, optimizer, method), checkpoint_id=str(tmp / DCP_DIR))
        rng_meta, rng_tensors = capture_rng()
        rng_file = tmp / f"rng-{rank}.safetensors"
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, rng_file,
                  metadata={"format": "pt", "rng": json.dumps(rng_meta)})
        with open(rng_file, "rb") as fh:
            os.fsync(fh.fileno())
        distributed.barrier()
        if main:
            sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            meta = dict(version=FORMAT_VERSION, step=step, progress=progress, world_size=distributed.world_size(),
                        optimizer_params=[n for n, p in model.named_parameters() if p.requires_grad],
                        config=config, sizes=sizes)
            (tmp / STATE_JSON).write_text(json.dumps(meta))
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            fsync_dir(tmp / DCP_DIR)
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
            for _, old in step_dirs(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier()
    return final


def read_sharded_checkpoint(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json, this rank's RNG tensors) of a `save_sharded_checkpoint` directory, every file checked
    against the sizes state.json recorded; ForgetlabError naming the file otherwise."""
    path = Path(path)
    meta_file = path / STATE_JSON
    if not meta_file.is_file():
        raise ForgetlabError(f"{meta_file}: checkpoint file missing")
    meta = read_json_object(meta_file, "checkpoint metadata")
    if any(k not in meta for k in ("version", "step", "progress", "world_size", "sizes", "config")):
        raise ForgetlabError(f"{meta_file}: not a training checkpoint of a torchrun run")
    if meta["version"] != FORMAT_VERSION:
        raise ForgetlabError(f"{meta_file}: checkpoint format {meta['version']}, this code reads {FORMAT_VERSION}")
    if meta["world_size"] != distributed.world_size():
        raise ForgetlabError(f"{path}: written by {meta['world_size']} ranks, resumed on {distributed.world_size()}: "
                             f"resume with the same number of processes")
    for name, size in meta["sizes"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise ForgetlabError(f"{f}: truncated or missing ({size} bytes were written)")
    tensors, file_meta = read_safetensors(path / f"rng-{distributed.rank()}.safetensors")
    meta["rng"] = json.loads(file_meta["rng"])
    return meta, tensors


def apply_sharded_checkpoint(path, meta: dict, model, optimizer, method):
    """Load a `save_sharded_checkpoint` into the run, in place, each rank its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    if meta["optimizer_params"] != [n for n, p in model.named_parameters() if p.requires_grad]:
        raise ForgetlabError(f"{path}: the checkpoint was saved for other trainable parameters")
    state = sharded_state(model, optimizer, method)
    try:
        dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    except Exception as e:  # DCP reports a missing or mis-shaped key as a CheckpointException
        raise ForgetlabError(f"{path}: does not fit this run ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    # strict=False: the frozen weights are not in the checkpoint (DCP's load above already failed on any
    # trainable tensor or optimizer state the checkpoint lacks)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if state["method"]:
        method.load_state_dict(state["method"])
