"""A Llama decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention through SDPA, SwiGLU, KV cache.

Parameter names equal Hugging Face's (`model.layers.3.self_attn.q_proj.weight`, ...), so a checkpoint's
state dict loads with no renaming table and LoRA/PEFT key names map one to one.

    logits = model(input_ids)                      # (B, T, vocab)
    loss = model(input_ids, labels=labels)         # mean cross-entropy over labels != -100 (HF-aligned:
                                                   # labels[t] is the target of position t-1)
    hidden = model.hidden(input_ids)               # (B, T, hidden): the final norm's output, before lm_head
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig
from .loss import IGNORE_INDEX, linear_cross_entropy


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (as HF does, so bf16 runs match it)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) for RoPE (Su et al. 2021), with HF's `linear` and `llama3` scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "linear":  # positions divided by `factor` (Chen et al. 2023, position interpolation)
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band in between
        # interpolated smoothly, measured against the original context length.
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """HF's rotate-half convention: the two halves of head_dim (not interleaved pairs) form the complex pairs."""
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Static key/value cache (gpt-fast): preallocated once, written in place, sliced to the filled length."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k, v):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, n_kv_heads, end, head_dim)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, cache_start):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_start is not None:
            k, v = self.kv_cache.update(cache_start, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache_start=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask, T: int, start: int):
    """Boolean SDPA mask (B, 1, T, S): query i (at slot start+i) sees key slot j iff j <= start+i and j is
    not padding. Each query also sees itself, so a left-pad query never has an all-masked (NaN) row;
    its output is discarded anyway."""
    S = attention_mask.shape[1]
    q_slot = torch.arange(start, start + T, device=attention_mask.device)
    k_slot = torch.arange(S, device=attention_mask.device)
    mask = (k_slot[None, :] <= q_slot[:, None]) & attention_mask.bool()[:, None, :]  # (B, T, S)
    mask |= k_slot[None, None, :] == q_slot[None, :, None]
    return mask[:, None]


def is_right_padded(attention_mask) -> bool:
    """True when every row is ones then zeros: causal attention alone then never lets a real token see a pad."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        self.fused_loss = True  # False: the loss from the full logits, the reference model/loss.py is tested against

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self, device=None):
        """Recompute the (non-persistent) RoPE buffer, e.g. after building the model on the meta device."""
        self.inv_freq = rope_inv_freq(self.config, device=device)

    def init_weights(self, std: float = 0.02):
        """N(0, std) for linear and embedding weights, ones for norms: HF's initializer_range convention."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def setup_kv_cache(self, batch_size: int, max_len: int):
        p = self.model.embed_tokens.weight
        for layer in self.model.layers:
            a = layer.self_attn
            a.kv_cache = KVCache(batch_size, a.n_kv_heads, max_len, a.head_dim, p.dtype, p.device)

    def select_kv_cache(self, rows: torch.Tensor):
        """Keep cache rows `rows`, in that order (generation drops the sequences that have stopped)."""
        for layer in self.model.layers:
            c = layer.self_attn.kv_cache
            c.k, c.v = c.k[rows], c.v[rows]

    def clear_kv_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache_start: int | None = None):
        """The final norm's output (B, T, hidden): every layer but lm_head. input_ids (B, T). attention_mask
        (B, S): 1 = token, 0 = padding, over the key slots (S = T, or cache_start + T when decoding with the
        KV cache). Positions count real tokens only, so left-padded prompts get the same positions as unpadded
        ones. A boolean (B, 1, T, S) attention_mask is used as it is (query t sees key s where True), with
        position_ids given: several sequences packed into one row, say."""
        B, T = input_ids.shape
        start = 0 if cache_start is None else cache_start
        if attention_mask is not None and attention_mask.dim() == 4:
            if position_ids is None:
                raise ValueError("a 4-d attention_mask needs position_ids")
            mask = attention_mask
        else:
            if position_ids is None:
                if attention_mask is None:
                    position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
                else:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            mask = None
            if attention_mask is not None and not (cache_start is None and is_right_padded(attention_mask)):
                mask = attention_mask_4d(attention_mask, T, start)
            elif cache_start is not None:  # SDPA's is_causal aligns top-left, wrong once the cache holds a prefix
                ones = torch.ones(B, start + T, dtype=torch.bool, device=input_ids.device)
                mask = attention_mask_4d(ones, T, start)

        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim), broadcast over heads
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache_start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache_start)
        return self.model.norm(x)

    def forward(self, input_ids, labels=None, attention_mask=None, position_ids=None,
                cache_start: int | None = None, last_only: bool = False):
        """Logits (B, T, vocab) (only the last position's with last_only), or with labels the mean
        cross-entropy over tokens whose label is not -100 (labels[:, t] is the target of position t-1).
        The other arguments are `hidden`'s."""
        x = self.hidden(input_ids, attention_mask, position_ids, cache_start)  # (B, T, hidden)
        if labels is None:
            return self.lm_head(x[:, -1:] if last_only else x)
        if not self.fused_loss:  # the definition, with all (B, T-1, vocab) logits in float32
            logits = self.lm_head(x[:, :-1]).float()
            return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return linear_cross_entropy(x, self.lm_head, labels)  # the same value and gradients, in less memory
