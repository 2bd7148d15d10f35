"""A hand-written Llama that loads Hugging Face checkpoints: config, layers, checkpoint I/O, tokenizer, generation."""
from .checkpoint import load_model, load_pretrained, save_pretrained
from .config import LlamaConfig
from .generate import eval_mode, generate, generate_ids, left_pad
from .llama import IGNORE_INDEX, Llama

__all__ = ["LlamaConfig", "Llama", "IGNORE_INDEX", "load_model", "load_pretrained", "save_pretrained",
           "generate", "generate_ids", "eval_mode", "left_pad"]
