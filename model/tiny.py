"""Tiny random Llamas: the code paths of a real checkpoint (GQA, RoPE, tied embedding, its tokenizer) at a size
where a training step takes milliseconds. The tests, `scripts/bench.py --quick` and `scripts/sweep.py --quick`
all build theirs here."""
from pathlib import Path

import torch

from errors import read_json_object

from .checkpoint import save_pretrained
from .config import LlamaConfig
from .llama import Llama

TINY_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=512)


def random_llama(config: dict, seed: int = 0, std: float = 0.02, dtype=torch.float32, device="cpu") -> Llama:
    """A Llama of an HF config.json dict, weights N(0, std) drawn from `seed` on `device`, in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Llama(LlamaConfig.from_hf_dict(config))
    model.init_weights(std=std)
    model.to(dtype)
    model.reset_rope(device)  # .to(dtype) also cast the RoPE buffer; positions need it in float32
    return model.eval()


def save_tiny_model(path, like, seed: int = 0) -> Path:
    """A random Llama of TINY_SHAPE with the vocabulary, special tokens and tokenizer files of the checkpoint
    directory `like`, saved as an HF directory at `path`: train.py and eval.py run on it in seconds."""
    config = {**read_json_object(Path(like) / "config.json", "model config"), **TINY_SHAPE}
    return save_pretrained(random_llama(config, seed=seed), path, copy_tokenizer_from=like)
