"""Training checkpoints for `train.py --resume`: everything a run needs to continue bit for bit, nothing pickled.

    <out>/checkpoints/step-<N>/
        state.safetensors   model.<name>          trainable weights (LoRA adapters only, for a LoRA run)
                            optimizer.<i>.<key>   the optimizer's per-parameter tensors (AdamW: step, exp_avg,
                                                  exp_avg_sq), <i> its parameter index
                            method.<key>          the method's tensors (EWC: fisher.*, anchor.*)
                            rng.torch, rng.cuda.<i>   torch's CPU and CUDA generator states (uint8)
        state.json          step, data position, Python and NumPy RNG states, optimizer hyper-parameters, the
                            run's config, the byte size and sha256 of every other file, and a checksum of itself

What is not saved is recomputed exactly: the learning rate is a function of the step (train.get_lr), and the
data order of epoch e is a function of (seed, e) (train.micro_batch_stream), so the position is the step.

A checkpoint is written into step-<N>.tmp/, each file fsynced, then renamed to step-<N>/ and the parent
directory fsynced: a crash or a SIGKILL at any point leaves either the complete new checkpoint or none, and
the older ones untouched. The newest `keep` are kept. `find_latest` returns the newest that reads back
completely, with every file's size and sha256 as written, skipping (with a warning) one that does not: a
truncated file, or one whose bytes changed in place, falls back to the previous checkpoint.

Nothing on the read path unpickles: state.json is JSON, the tensors are safetensors. Under torchrun (several
processes, distributed.py) each rank writes its own part, again as safetensors: see sharded_checkpoint.py.
"""
import hashlib
import json
import math
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
import sharded_checkpoint
from errors import ForgetlabError, check_names, read_json_object
from model.checkpoint import read_safetensors, write_atomic_text

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
FORMAT_VERSION = 2  # 2: every file's sha256 and the checksum of state.json; torchrun's parts as safetensors


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

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """What state.json records of a checkpoint file, to know on resume that it is the very file written. The
    file is fsynced first: the record describes bytes that are on the disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    return dict(bytes=path.stat().st_size, sha256=file_sha256(path))


def json_checksum(meta: dict) -> str:
    """sha256 of state.json's content without its own "checksum" key: a byte changed in state.json is seen."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_state_json(directory: Path, meta: dict):
    with open(directory / STATE_JSON, "w") as f:
        f.write(json.dumps({**meta, "checksum": json_checksum(meta)}))
        f.flush()
        os.fsync(f.fileno())


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
        return sharded_checkpoint.save(out, step, model, optimizer, method, progress, config, keep)
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
                    files={STATE_TENSORS: file_record(tmp / STATE_TENSORS)})
        write_state_json(tmp, meta)
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


def write_checkpoint(out: Path, model, optimizer, method, run, data, epoch: int, config: dict) -> Path:
    """train.py's checkpoint of the state after step run.step, never of a poisoned model."""
    if count_nonfinite(model):  # every rank stops, whichever holds the bad shard
        raise ForgetlabError(f"step {run.step}: non-finite weights after the update: training stopped; "
                             f"{checkpoint_note(run.checkpoint)}; lower --lr")
    counters = dict(tokens=run.tokens, skipped=run.skipped, loss=run.loss, examples=len(data.train_set),
                    epoch=epoch, steps_per_epoch=data.steps_per_epoch)
    return save_checkpoint(out, run.step, model, optimizer, method, counters, config)


def count_nonfinite(model) -> int:
    """Trainable weights that are NaN or inf, over every rank's shards (every rank must call it)."""
    bad = sum(int((~torch.isfinite(distributed.local(p))).sum()) for p in model.parameters() if p.requires_grad)
    return int(distributed.all_reduce_sum(bad))


def checkpoint_note(path) -> str:
    return f"the last checkpoint, {path}, is intact" if path else "no checkpoint was written (see --save-every)"


def nonfinite_cause(loss: float, extra, grad_norm: float) -> str | None:
    """What is not finite in an optimizer step, or None: a NaN/inf loss poisons every gradient, and a finite loss
    can still overflow in backward (an inf gradient norm)."""
    if not math.isfinite(loss):
        return f"loss ({loss})"
    if extra is not None and not torch.isfinite(extra.detach()).all():
        return f"method loss ({float(extra.detach())})"
    if not math.isfinite(grad_norm):
        return f"gradient norm ({grad_norm})"
    return None


def skip_or_stop(step: int, cause: str, run, cfg):
    """A non-finite optimizer step: drop its batch (no update; the schedule moves on) while --skip-nonfinite
    allows, else stop the run, naming the step, the cause and the checkpoint to resume from."""
    if run.skipped >= cfg.skip_nonfinite:
        raise ForgetlabError(f"step {step + 1}: non-finite {cause}: training stopped; "
                             f"{checkpoint_note(run.checkpoint)}; lower --lr, or skip such batches with "
                             f"--skip-nonfinite N")
    run.skipped += 1
    print(f"step {step + 1}: non-finite {cause}: batch skipped ({run.skipped} of --skip-nonfinite "
          f"{cfg.skip_nonfinite})", file=sys.stderr)


# ----------------------------------------------------------------------------- read

def read_state_json(path: Path, required: tuple) -> dict:
    """A checkpoint's state.json, checked: present, JSON, its checksum, its format version and `required` keys."""
    meta_file = path / STATE_JSON
    if not meta_file.is_file():
        raise ForgetlabError(f"{meta_file}: checkpoint file missing")
    meta = read_json_object(meta_file, "checkpoint metadata")
    if "version" in meta and meta["version"] != FORMAT_VERSION:
        raise ForgetlabError(f"{meta_file}: checkpoint format {meta['version']}, this code reads {FORMAT_VERSION}")
    if meta.get("checksum") != json_checksum(meta):
        raise ForgetlabError(f"{meta_file}: corrupted (its checksum does not match its content)")
    if any(k not in meta for k in required):
        raise ForgetlabError(f"{meta_file}: not a training checkpoint (expected keys {', '.join(required)})")
    types = dict(step=int, stage=int, files=dict, progress=dict)
    if not all(isinstance(meta[k], types[k]) for k in required if k in types):
        raise ForgetlabError(f"{meta_file}: malformed checkpoint metadata")
    return meta


def verify_files(path: Path, records: dict, names) -> None:
    """Each file in `names` is in the checkpoint with the byte size and sha256 state.json recorded for it."""
    for name in names:
        f, want = path / name, records.get(name)
        if not isinstance(want, dict) or not f.is_file():
            raise ForgetlabError(f"{f}: checkpoint file missing")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise ForgetlabError(f"{f}: truncated or replaced ({size} bytes, {want.get('bytes')} were written)")
        if file_sha256(f) != want.get("sha256"):
            raise ForgetlabError(f"{f}: corrupted (its sha256 is not the one recorded when it was written)")


def read_checkpoint(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json, every tensor of state.safetensors) of one checkpoint directory, fully read and checked;
    ForgetlabError naming the file if anything is missing, truncated, changed or malformed."""
    path = Path(path)
    meta = read_state_json(path, ("version", "step", "progress", "rng", "optimizer", "optimizer_params", "config",
                                  "files"))
    verify_files(path, meta["files"], [STATE_TENSORS])
    tensor_file = path / STATE_TENSORS
    tensors, _ = read_safetensors(tensor_file)
    if "rng.torch" not in tensors:
        raise ForgetlabError(f"{tensor_file}: no rng.torch tensor (not a training checkpoint)")
    return meta, tensors


def find_latest(out) -> tuple[Path, dict, dict] | None:
    """(path, state.json, tensors) of the newest checkpoint under <out> that reads back completely, None if
    there is none at all. Unreadable ones are skipped with a warning; ForgetlabError if every one is."""
    errors = []
    read = sharded_checkpoint.read if distributed.world_size() > 1 else read_checkpoint
    for _, path in reversed(step_dirs(out)):
        try:
            meta, tensors, error = *read(path), None
        except ForgetlabError as e:
            error = str(e)
        # under torchrun each rank checks its own files: every rank skips a checkpoint any rank cannot read
        error = next((e for e in distributed.gather_objects(error) if e), None)
        if error:
            if distributed.is_main():
                print(f"warning: skipping checkpoint {path}: {error}", file=sys.stderr)
            errors.append(error)
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


def find_resumable(out, examples: int, total_steps: int) -> tuple[Path, dict, dict] | None:
    """The checkpoint `resume` will continue from (`find_latest`), read and checked against this run's data and
    step count; None when --out holds none. Called before anything slow, so that a checkpoint that cannot
    serve fails in seconds, before the "before" evaluation or the method's setup."""
    found = find_latest(out)
    if found is None:
        return None
    path, meta, _ = found
    counters = meta["progress"]
    if any(k not in counters for k in ("tokens", "skipped", "loss", "examples")):
        raise ForgetlabError(f"{path / STATE_JSON}: malformed training checkpoint metadata (progress)")
    if counters["examples"] != examples:
        raise ForgetlabError(f"--resume: the training set has {examples} examples, the checkpoint "
                             f"{path} was trained on {counters['examples']} (data changed?)")
    if meta["step"] > total_steps:
        raise ForgetlabError(f"--resume: {path} is at step {meta['step']}, past the {total_steps} steps asked")
    return found


def resume(found, out, model, optimizer, method, total_steps: int, metrics: Path) -> Progress:
    """Continue the run in `out` from the checkpoint `find_resumable` returned; Progress() when it found none.
    Loads the weights, optimizer and method state into the run (after the method's setup and configure, and
    the optimizer's creation), cuts the `metrics` log back to the checkpoint's step and restores the RNG states:
    call it right before the loop, since whatever draws a random number after it changes the run."""
    main = distributed.is_main()  # the one that prints and owns metrics.jsonl
    if found is None:
        if main:
            print(f"--resume: no checkpoint in {out}: starting from step 0", file=sys.stderr)
            trim_metrics(metrics, 0)
        return Progress()
    path, meta, tensors = found
    counters = meta["progress"]
    if distributed.world_size() > 1:
        sharded_checkpoint.apply(path, meta, tensors, model, optimizer, method)
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
