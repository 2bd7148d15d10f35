"""HF-layout checkpoint I/O: round trips, shards, dtypes, transformers interop, and one test per load error."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from errors import ForgetlabError
from model import load_model, save_pretrained
from tests.tiny import tiny_llama


def saved(tmp_path, **overrides):
    model = tiny_llama(**overrides)
    save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_saved_weights_get_the_same_permissions_as_the_config(tmp_path):
    _, path = saved(tmp_path)  # safetensors alone would create the weights 0600
    assert (path / "model.safetensors").stat().st_mode == (path / "config.json").stat().st_mode


@pytest.mark.parametrize("tied", [False, True])
def test_load_save_load_gives_identical_tensors(tmp_path, tied):
    model, path = saved(tmp_path, tie_word_embeddings=tied)
    again = load_model(path)
    save_pretrained(again, tmp_path / "again")
    third = load_model(tmp_path / "again")
    for a, b, c in zip(model.state_dict().values(), again.state_dict().values(), third.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(b, c)
    if tied:
        assert third.lm_head.weight is third.model.embed_tokens.weight
        assert "lm_head.weight" not in load_file(path / "model.safetensors")


def test_sharded_checkpoint_round_trips(tmp_path):
    model = tiny_llama()
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=50_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_model(tmp_path / "sharded")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_in_half_precision(tmp_path, dtype):
    model, path = saved(tmp_path)
    half = load_model(path, dtype=dtype)
    assert all(p.dtype == dtype for p in half.parameters())
    ids = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        assert (half(ids).float() - model(ids)).abs().max() < 0.05


def test_saved_directory_loads_in_transformers_with_same_logits(tmp_path):
    from transformers import LlamaForCausalLM

    model, path = saved(tmp_path, tie_word_embeddings=True)
    hf = LlamaForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-5


def test_transformers_saved_directory_loads_here(tmp_path):
    from tests.tiny import hf_twin

    model = tiny_llama()
    hf_twin(model).save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        assert torch.equal(ours(ids), model(ids))


def test_error_missing_directory(tmp_path):
    with pytest.raises(ForgetlabError, match="model directory not found"):
        load_model(tmp_path / "nope")


def test_error_missing_config(tmp_path):
    _, path = saved(tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ForgetlabError, match="config.json: model config not found"):
        load_model(path)


def test_error_model_type_not_llama(tmp_path):
    _, path = saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ForgetlabError, match="model_type is 'gpt2', only 'llama'"):
        load_model(path)


def rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_error_missing_tensor(tmp_path):
    _, path = saved(tmp_path)
    rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ForgetlabError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        load_model(path)


def test_error_unexpected_tensor(tmp_path):
    _, path = saved(tmp_path)
    rewrite_weights(path, lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(ForgetlabError, match="unexpected tensor model.layers.9.extra.weight"):
        load_model(path)


def test_error_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    _, path = saved(tmp_path)
    rewrite_weights(path, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(ForgetlabError, match=r"shape mismatch for model.norm.weight: checkpoint \(63,\) vs model \(64,\)"):
        load_model(path)


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_error_truncated_safetensors(tmp_path, keep):
    _, path = saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ForgetlabError, match="model.safetensors: unreadable or truncated safetensors"):
        load_model(path)
