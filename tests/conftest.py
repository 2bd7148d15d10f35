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
