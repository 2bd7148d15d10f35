"""Training checkpoints under torchrun: train_state.py's checkpoints when several ranks hold the state.

One checkpoint directory serves every rank:
    rank-<r>.safetensors  rank r's part of the state: its local shard of every DTensor (FSDP2: weights, AdamW
                          moments, the method's sharded state), and in rank 0's file the tensors every rank holds
                          whole (DDP's replicated weights, step counters), written once; rank r's torch
                          generators (rng.*), and its Python and NumPy states in the file's metadata
    state.json            as train_state.py's, plus world_size, the optimizer's non-tensor values ("scalars"),
                          the names of the replicated tensors, and the byte size and sha256 of every rank's file
The tensors are named by their path in the state (model.<name>, optimizer.state.<name>.exp_avg, method.<key>).
A run resumes on as many ranks as wrote the checkpoint, so each rank's shards have the shapes they had: each rank
reads its own file back into its own shards, with no resharding and nothing but JSON and safetensors on the way
(torch.distributed.checkpoint's own reader unpickles its metadata file, so it is not used).
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import distributed
import train_state  # its helpers are looked up at call time: train_state imports this module too
from errors import DuplicateKeyError, ForgetlabError, loads_strict
from model.checkpoint import read_safetensors, read_tensors


def sharded_state(model, optimizer, method) -> dict:
    """The state a torchrun checkpoint holds: {"model", "optimizer", "method"} keyed by parameter name, DTensors
    under FSDP2. Frozen weights are left out (a LoRA run's base model is the checkpoint it started from)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_sd, "optimizer": optim_sd, "method": method.state_dict()}


def state_leaves(obj, path: tuple = ()):
    """(path, value) of every leaf of a nested state: dicts and lists are walked; tensors, numbers, strings and
    tuples (AdamW's betas) are leaves."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from state_leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from state_leaves(v, (*path, i))
    else:
        yield path, obj


def leaf_name(path: tuple) -> str:
    return ".".join(map(str, path))


def rank_file(r: int) -> str:
    return f"rank-{r}.safetensors"


def save(out, step: int, model, optimizer, method, progress: dict, config: dict,
                            keep: int = 2) -> Path:
    """train_state.save_checkpoint on several ranks (every rank calls it): written into step-<N>.tmp/, renamed by
    rank 0 once every rank has written and fsynced its file, as atomic as the single-process one."""
    rank, main = distributed.rank(), distributed.is_main()
    root = train_state.checkpoint_dir(out)
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    distributed.barrier()
    try:
        tensors, scalars, replicated, aliases, seen = {}, {}, [], {}, {}
        for path, leaf in state_leaves(sharded_state(model, optimizer, method)):
            name = leaf_name(path)
            if torch.is_tensor(leaf):  # a tensor met again under another name (tied embeddings) is saved once
                t = distributed.local(leaf)
                key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
                if t.numel() and key in seen:
                    aliases[name] = seen[key]
                    continue
                seen[key] = name
            if distributed.is_dtensor(leaf):
                tensors[name] = leaf.to_local()
            elif torch.is_tensor(leaf):
                replicated.append(name)
                if main:  # the same on every rank: written once
                    tensors[name] = leaf
            else:
                scalars[name] = leaf
        rng_meta, rng_tensors = train_state.capture_rng()
        tensors.update(rng_tensors)
        file = tmp / rank_file(rank)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, file,
                  metadata={"format": "pt", "rng": json.dumps(rng_meta)})
        records = distributed.gather_objects(train_state.file_record(file))
        if main:
            meta = dict(version=train_state.FORMAT_VERSION, step=step, progress=progress,
                        world_size=distributed.world_size(),
                        optimizer_params=[n for n, p in model.named_parameters() if p.requires_grad],
                        config=config, scalars=scalars, replicated=replicated, aliases=aliases,
                        files={rank_file(r): rec for r, rec in enumerate(records)})
            train_state.write_state_json(tmp, meta)
            train_state.fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            train_state.fsync_dir(root)
            for _, old in train_state.step_dirs(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier()
    return final


def read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json, this rank's tensors: its own file's, and the replicated ones from rank 0's) of a
    `save` directory, each file read checked against the size and sha256 state.json
    recorded; ForgetlabError naming the file otherwise."""
    path = Path(path)
    meta = train_state.read_state_json(path, ("version", "step", "progress", "world_size", "files", "config",
                                              "scalars", "replicated", "aliases", "optimizer_params"))
    if meta["world_size"] != distributed.world_size():
        raise ForgetlabError(f"{path}: written by {meta['world_size']} ranks, resumed on {distributed.world_size()}: "
                             f"resume with the same number of processes")
    if not (isinstance(meta["replicated"], list) and all(isinstance(n, str) for n in meta["replicated"])
            and isinstance(meta["scalars"], dict) and isinstance(meta["aliases"], dict)):
        raise ForgetlabError(f"{path / train_state.STATE_JSON}: malformed training checkpoint metadata")
    rank = distributed.rank()
    train_state.verify_files(path, meta["files"], sorted({rank_file(rank), rank_file(0)}))
    own = path / rank_file(rank)
    tensors, file_meta = read_safetensors(own)
    try:
        meta["rng"] = loads_strict(file_meta["rng"])
    except (KeyError, TypeError, ValueError, DuplicateKeyError):
        raise ForgetlabError(f"{own}: no readable RNG state in its metadata") from None
    if rank != 0:
        tensors.update(read_tensors(path / rank_file(0), meta["replicated"]))
    return meta, tensors


def apply(path, meta: dict, tensors: dict, model, optimizer, method):
    """Load a `save` directory into the run, in place, each rank its own shards: every name and shape
    is checked before anything changes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    path = Path(path)
    if meta["optimizer_params"] != [n for n, p in model.named_parameters() if p.requires_grad]:
        raise ForgetlabError(f"{path}: the checkpoint was saved for other trainable parameters")
    state = sharded_state(model, optimizer, method)
    leaves = list(state_leaves(state))
    aliases = meta["aliases"]
    for p, leaf in leaves:
        name = leaf_name(p)
        if torch.is_tensor(leaf):
            target, name = distributed.local(leaf), aliases.get(name, name)
            if name not in tensors:
                raise ForgetlabError(f"{path}: does not fit this run (no tensor {name})")
            if tensors[name].shape != target.shape:
                raise ForgetlabError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, this run's is "
                                     f"{tuple(target.shape)}")
        elif name not in meta["scalars"]:
            raise ForgetlabError(f"{path}: does not fit this run (no value {name})")
    with torch.no_grad():
        for p, leaf in leaves:
            name = leaf_name(p)
            if torch.is_tensor(leaf):
                distributed.local(leaf).copy_(tensors[aliases.get(name, name)])
            else:
                parent = state
                for k in p[:-1]:
                    parent = parent[k]
                value = meta["scalars"][name]
                parent[p[-1]] = tuple(value) if isinstance(leaf, tuple) else value
    # strict=False: the frozen weights are not in the checkpoint (every trainable tensor and optimizer state
    # was checked above)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if state["method"]:
        method.load_state_dict(state["method"])
