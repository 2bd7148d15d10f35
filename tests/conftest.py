import pytest


@pytest.fixture(scope="session")
def smollm_dir():
    """The prepared SmolLM2-135M-Instruct HF directory (downloaded and converted on first use, ~1 min)."""
    from model.convert_gguf import prepare_default_model

    return prepare_default_model()


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny test models: a second intra-op thread only adds synchronisation (several times slower on a
    busy 2-core CI machine). Subprocess tests set OMP_NUM_THREADS=1 for the same reason."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm_dir):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer files: train.py runs on it in seconds."""
    from model import save_pretrained
    from tests.tiny import tiny_llama

    model = tiny_llama(vocab_size=49152, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    return str(save_pretrained(model, tmp_path_factory.mktemp("tiny"), copy_tokenizer_from=smollm_dir))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(domain, general) JSONL files for tiny_dir runs."""
    from tests.tiny import DOMAIN, GENERAL, write_jsonl

    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "domain.jsonl", DOMAIN), write_jsonl(d / "general.jsonl", GENERAL)
