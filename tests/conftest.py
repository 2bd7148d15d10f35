import pytest


@pytest.fixture(scope="session")
def smollm_dir():
    """The prepared SmolLM2-135M-Instruct HF directory (downloaded and converted on first use, ~1 min)."""
    from model.convert_gguf import prepare_default_model

    return prepare_default_model()
