"""LoRA: identity at init, frozen base, exact merge, and adapter parity with PEFT (test-only oracle)."""
import json

import pytest
import torch

from errors import ForgetlabError
from lora import (LoRALinear, apply_lora, count_params, lora_disabled, lora_modules, lora_state_dict,
                  load_adapter, merge_lora, save_adapter)
from model import load_model, save_pretrained
from tests.tiny import hf_twin, tiny_llama

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ids(seed=0, shape=(2, 12)):
    return torch.randint(0, 101, shape, generator=torch.Generator().manual_seed(seed))


def randomize_b(model, seed=1, std=0.2):
    """B starts at zero, which would make every parity test pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def train_steps(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)  # all params: frozen ones must not move
    model.train()
    for step in range(steps):
        x = ids(seed=100 + step, shape=(4, 16))
        loss = model(x, labels=x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_identity_at_init_logits_equal_base_exactly(targets):
    model = tiny_llama(std=0.3)
    x = ids()
    with torch.no_grad():
        base = model(x)
        apply_lora(model, r=4, alpha=8, targets=targets)
        assert torch.equal(model(x), base)


def test_all_linear_adapts_every_decoder_linear_but_not_lm_head():
    model = apply_lora(tiny_llama(), r=4, targets="all-linear")
    names = set(lora_modules(model))
    assert names == {f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
                     for i in range(2) for p in ALL_LINEAR}
    assert not isinstance(model.lm_head, LoRALinear)


def test_apply_lora_trains_only_the_adapter_and_prints_nothing(capsys):
    model = tiny_llama(tie_word_embeddings=True)
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"))
    # q: 64 -> 64, v: 64 -> 2 kv heads x 16 = 32; 2 layers
    n = 2 * 4 * ((64 + 64) + (64 + 32))
    assert count_params(model) == (n, total + n)
    assert capsys.readouterr().out == ""
    for name, p in model.named_parameters():
        assert p.requires_grad == (".lora_A." in name or ".lora_B." in name), name
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad


def test_lora_param_names_extend_hf_names():
    model = apply_lora(tiny_llama(), r=4)
    keys = set(model.state_dict())
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    assert "model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert "model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.shape == (4, 64)
    assert model.model.layers[0].self_attn.v_proj.lora_B.weight.shape == (32, 4)


def test_scale_is_alpha_over_r_or_sqrt_r_with_rslora():
    base = torch.nn.Linear(8, 8, bias=False)
    assert LoRALinear(base, r=16, alpha=32).scale == 2.0
    assert LoRALinear(torch.nn.Linear(8, 8), r=16, alpha=32, rslora=True).scale == 8.0


def test_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, r=2, alpha=3)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 8)
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    expected = x @ w0.T + b0 + 1.5 * (x @ A.T @ B.T)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_dropout_applies_to_lora_path_only():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 16, bias=False), r=4, alpha=8, dropout=0.5).train()
    x = torch.randn(64, 16)
    base = x @ layer.weight.T
    assert torch.equal(layer(x), base)  # B = 0: a dropped base path would differ
    torch.nn.init.normal_(layer.lora_B.weight)
    torch.manual_seed(1)
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)  # dropout is active in training
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_training_leaves_base_bitwise_unchanged_and_disabling_gives_base_logits():
    model = tiny_llama(std=0.3)
    x = ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_logits = model(x)
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets="all-linear")
    train_steps(model)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        tuned = model(x)
        with lora_disabled(model):
            assert torch.equal(model(x), base_logits)
        assert torch.equal(model(x), tuned)  # the context manager restores the adapter
    assert (tuned - base_logits).abs().max() > 1e-3  # the adapter did learn something


def test_only_lora_parameters_receive_gradients():
    model = apply_lora(tiny_llama(), r=4, targets="all-linear").train()
    randomize_b(model)
    x = ids()
    model(x, labels=x).backward()
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merge_lora_gives_a_plain_copy_with_hf_names_that_saves_and_reloads(tmp_path):
    model = tiny_llama(std=0.1)  # logits of order 1, so 1e-5 is float32 rounding, not slack
    names = set(model.state_dict())
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    train_steps(model)
    adapted_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids()
    with torch.no_grad():
        adapted = model(x)
    merged = merge_lora(model)
    assert set(merged.state_dict()) == names
    assert not lora_modules(merged)
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith("_proj"))
    assert all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        assert (merged(x) - adapted).abs().max() <= 1e-5
        save_pretrained(merged, tmp_path)
        assert (load_model(tmp_path)(x) - adapted).abs().max() <= 1e-5
    # the adapted model is untouched: same tensors, still adapted
    assert all(torch.equal(model.state_dict()[k], v) for k, v in adapted_state.items())
    assert len(lora_modules(model)) == 14


def test_merged_weight_is_rounded_once_from_a_float32_sum_for_bf16_weights():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 32, bias=False).to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight, std=1e-3)
    delta = 2.0 * layer.lora_B.weight.detach().double() @ layer.lora_A.weight.detach().double()
    merged = layer.merged_weight()
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (w0.double() + delta).to(torch.bfloat16))
    assert torch.equal(layer.weight, w0)


def test_bf16_autocast_forward_backward_trains_float32_adapter():
    model = apply_lora(tiny_llama(), r=4, targets="all-linear").train()
    randomize_b(model)
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x)
    loss.backward()
    a = model.model.layers[0].self_attn.q_proj.lora_A.weight
    assert a.dtype == torch.float32 and a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()


def test_bf16_model_without_autocast_runs_adapter_in_float32():
    model = tiny_llama(std=0.3).to(torch.bfloat16)
    x = ids()
    with torch.no_grad():
        base = model(x)
        apply_lora(model, r=4, alpha=8)
        assert model.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float32
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_identity_and_training():
    model = tiny_llama(std=0.3).cuda()
    x = ids().cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        base = model(x)
    apply_lora(model, r=4, alpha=8, targets="all-linear").train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, labels=x).backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(model(x), base)


# ---- PEFT parity (peft and transformers are test-only oracles) ----

def peft_model(hf, targets, r=4, alpha=8, rslora=False):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets) if targets != "all-linear" else targets,
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", use_rslora=rslora)
    return get_peft_model(hf, config).eval()


def peft_keys(model) -> dict:
    return {"base_model.model." + k: v for k, v in lora_state_dict(model).items()}


@pytest.mark.parametrize("targets,rslora", [(("q_proj", "v_proj"), False), ("all-linear", False),
                                            ("all-linear", True)])
def test_same_adapter_weights_give_peft_logits(targets, rslora):
    from peft import set_peft_model_state_dict

    model = tiny_llama(std=0.3)
    peft = peft_model(hf_twin(model), targets, rslora=rslora)
    apply_lora(model, r=4, alpha=8, targets=targets, rslora=rslora)
    randomize_b(model)
    result = set_peft_model_state_dict(peft, peft_keys(model))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    x = ids()
    with torch.no_grad():
        ours = model(x)
        assert (ours - peft(x).logits).abs().max() <= 1e-4
        with lora_disabled(model):
            assert (ours - model(x)).abs().max() > 1e-2  # the adapter matters: the parity is not vacuous


def test_peft_saved_adapter_loads_here_with_same_logits(tmp_path):
    model = tiny_llama(std=0.3)
    peft = peft_model(hf_twin(model), "all-linear")
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    peft.save_pretrained(tmp_path)
    load_adapter(model, tmp_path)
    assert len(lora_modules(model)) == 14
    x = ids()
    with torch.no_grad():
        assert (model(x) - peft(x).logits).abs().max() <= 1e-4
        with lora_disabled(model):
            assert (model(x) - peft(x).logits).abs().max() > 1e-2


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_saved_here_loads_in_peft_with_same_logits(tmp_path, rslora):
    from peft import PeftModel

    model = tiny_llama(std=0.3)
    hf = hf_twin(model)
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), rslora=rslora)
    randomize_b(model)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["use_rslora"] == rslora
    peft = PeftModel.from_pretrained(hf, tmp_path).eval()
    x = ids()
    with torch.no_grad():
        assert (model(x) - peft(x).logits).abs().max() <= 1e-4


def test_save_then_load_adapter_round_trips_onto_fresh_model(tmp_path):
    model = apply_lora(tiny_llama(std=0.3), r=4, alpha=16, dropout=0.05, targets="all-linear", rslora=True)
    randomize_b(model)
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_llama(std=0.3), tmp_path)
    m = fresh.model.layers[0].mlp.up_proj
    assert (m.r, m.alpha, m.dropout, m.rslora) == (4, 16, 0.05, True)
    x = ids()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ---- load_adapter errors: ForgetlabError naming the file and the problem ----

@pytest.fixture
def saved_adapter(tmp_path):
    model = apply_lora(tiny_llama(), r=4, alpha=8)
    return save_adapter(model, tmp_path / "adapter")


def edit_config(dir, **changes):
    file = dir / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_load_adapter_missing_config(saved_adapter):
    (saved_adapter / "adapter_config.json").unlink()
    with pytest.raises(ForgetlabError, match=r"adapter_config\.json: adapter config not found"):
        load_adapter(tiny_llama(), saved_adapter)


def test_load_adapter_missing_weights(saved_adapter):
    (saved_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ForgetlabError, match=r"adapter_model\.safetensors: adapter weights not found"):
        load_adapter(tiny_llama(), saved_adapter)


def test_load_adapter_rejects_other_peft_type(saved_adapter):
    edit_config(saved_adapter, peft_type="IA3")
    with pytest.raises(ForgetlabError, match=r"adapter_config\.json: peft_type is 'IA3'"):
        load_adapter(tiny_llama(), saved_adapter)


def test_load_adapter_rejects_unsupported_lora_variant(saved_adapter):
    edit_config(saved_adapter, use_dora=True)
    with pytest.raises(ForgetlabError, match=r"adapter_config\.json: use_dora=True is not supported"):
        load_adapter(tiny_llama(), saved_adapter)


def test_load_adapter_target_modules_not_in_model(saved_adapter):
    edit_config(saved_adapter, target_modules=["c_attn"])
    with pytest.raises(ForgetlabError, match=r"adapter_config\.json: LoRA target module 'c_attn' not found"):
        load_adapter(tiny_llama(), saved_adapter)


def test_load_adapter_shape_mismatch_for_another_model(saved_adapter):
    with pytest.raises(ForgetlabError, match=r"adapter_model\.safetensors: shape mismatch for "
                                             r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight"):
        load_adapter(tiny_llama(hidden_size=32, num_attention_heads=2, num_key_value_heads=1), saved_adapter)


def test_load_adapter_rank_mismatch_with_applied_lora(saved_adapter):
    model = apply_lora(tiny_llama(), r=8, alpha=8)
    with pytest.raises(ForgetlabError, match=r"adapter_config\.json: adapter has r=4"):
        load_adapter(model, saved_adapter)


def test_apply_lora_twice_or_with_unknown_target_is_an_error():
    model = apply_lora(tiny_llama(), r=4)
    with pytest.raises(ForgetlabError, match="already applied"):
        apply_lora(model, r=4)
    with pytest.raises(ForgetlabError, match="'qproj' not found"):
        apply_lora(tiny_llama(), targets=("qproj",))


# ---- the real SmolLM2-135M-Instruct ----

@pytest.mark.real_model
def test_smollm2_qv_r16_trainable_count_and_identity_at_init(smollm_dir):
    model = load_model(smollm_dir)
    total = sum(p.numel() for p in model.parameters())
    x = torch.tensor([[1, 504, 3287, 314, 253, 1345, 30]])
    with torch.no_grad():
        base = model(x)
        apply_lora(model, r=16, alpha=32, targets=("q_proj", "v_proj"))
        # 30 layers; q: 576 -> 576, v: 576 -> 3 kv heads x 64 = 192
        n = 30 * (16 * (576 + 576) + 16 * (576 + 192))
        assert count_params(model) == (921_600, total + n) and n == 921_600
        assert torch.equal(model(x), base)
