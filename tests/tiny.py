"""Tiny random Llama configs shared by the tests (seconds, not minutes)."""
import torch

from model import Llama, LlamaConfig

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def tiny_config_dict(**overrides) -> dict:
    d = dict(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    d.update(overrides)
    return d


def tiny_llama(seed: int = 0, std: float = 0.02, **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.from_hf_dict(tiny_config_dict(**overrides)))
    model.init_weights(std=std)
    return model.eval()


def hf_twin(model: Llama):
    """The same weights in transformers.LlamaForCausalLM (test-only oracle)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    d = model.config.to_hf_dict()
    for k in ("model_type", "architectures"):
        d.pop(k)
    hf = LlamaForCausalLM(HFConfig(**d)).eval()
    result = hf.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys and not result.missing_keys, result
    return hf
