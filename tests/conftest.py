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
    from model.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny"), like=smollm_dir))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(domain, general) JSONL files for tiny_dir runs."""
    from tests.tiny import DOMAIN, GENERAL, write_jsonl

    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "domain.jsonl", DOMAIN), write_jsonl(d / "general.jsonl", GENERAL)


@pytest.fixture(autouse=True)
def own_evaluation_cache(tmp_path_factory, monkeypatch):
    """Each test starts with an empty base-model evaluation cache (train.py --eval-cache auto), its subprocesses
    too: a test that evaluates must not read another test's evaluation back."""
    monkeypatch.setenv("FORGETLAB_EVAL_CACHE", str(tmp_path_factory.mktemp("evaluations")))
