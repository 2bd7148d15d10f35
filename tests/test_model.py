"""The hand-written Llama against transformers.LlamaForCausalLM on tiny random configs."""
import pytest
import torch

from model import generate_ids
from tests.tiny import LLAMA3_SCALING, hf_twin, tiny_llama

CONFIGS = {
    "gqa_untied": dict(num_key_value_heads=2),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_llama3_rope": dict(num_key_value_heads=1, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
    "linear_rope_head_dim": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, head_dim=32),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    model = tiny_llama(**CONFIGS[name])
    hf = hf_twin(model)
    ids = torch.randint(0, 101, (2, 40))  # longer than original_max_position_embeddings: scaling matters
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_match_transformers(side):
    model = tiny_llama(std=0.3)
    hf = hf_twin(model)
    ids = torch.randint(0, 101, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    if side == "left":
        mask[1, :5] = 0
        mask[2, :11] = 0
    else:
        mask[1, 12:] = 0
        mask[2, 3:] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-5


def test_padding_does_not_change_a_sequence_logits():
    model = tiny_llama(std=0.3)
    ids = torch.randint(3, 101, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], dim=1).long()
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], model(padded, attention_mask=mask)[0, 4:], atol=1e-5)


def test_loss_matches_transformers_with_ignored_labels():
    model = tiny_llama(std=0.3)
    hf = hf_twin(model)
    ids = torch.randint(0, 101, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :6] = -100  # a prompt: no loss there
    with torch.no_grad():
        ours = model(ids, labels=labels, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, labels=labels).loss
    assert abs(ours.item() - theirs.item()) <= 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_loss_gradients_match_transformers_in_every_parameter(tied):
    model = tiny_llama(std=0.3, tie_word_embeddings=tied).train()
    hf = hf_twin(model).train()
    ids = torch.randint(0, 101, (3, 20))
    labels = ids.clone()
    labels[:, :6] = -100
    model(ids, labels=labels).backward()
    hf(ids, labels=labels).loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_fused_linear_cross_entropy_equals_cross_entropy_of_the_logits(recompute, frozen_head):
    from model.loss import LinearCrossEntropy

    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=not frozen_head)
    y = torch.randint(0, 50, (37,))
    inputs = [h] if frozen_head else [h, w]
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="sum")
    ours = LinearCrossEntropy.apply(h, w, y, recompute)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours * 1.7, inputs), torch.autograd.grad(ref * 1.7, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_loss_equals_the_reference_path_in_value_and_gradients(tied):
    ids = torch.randint(0, 101, (3, 20))
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 15:] = -100
    grads = []
    for fused in (True, False):
        model = tiny_llama(std=0.3, tie_word_embeddings=tied).train()
        model.fused_loss = fused
        loss = model(ids, labels=labels)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (fused_loss, fused_grads), (ref_loss, ref_grads) = grads
    torch.testing.assert_close(fused_loss, ref_loss)
    for name, g in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_hidden_is_what_lm_head_reads():
    model = tiny_llama(std=0.3)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model.hidden(ids)), model(ids), rtol=0, atol=0)


def test_loss_is_differentiable_and_zero_without_labels():
    model = tiny_llama().train()
    ids = torch.randint(0, 101, (2, 8))
    loss = model(ids, labels=torch.full_like(ids, -100))
    loss.backward()
    assert loss.item() == 0.0


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 101, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = tiny_llama(seed=1).train()
        model.gradient_checkpointing = ckpt
        model(ids, labels=ids).backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_greedy_generation_matches_transformers_and_is_batch_independent():
    model = tiny_llama(std=0.5)
    hf = hf_twin(model)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20], [40]]
    batched = generate_ids(model, prompts, 16, stop_ids=[], pad_id=0)
    for p, out in zip(prompts, batched):
        assert out == generate_ids(model, [p], 16, stop_ids=[], pad_id=0)[0]
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
        assert out == ref[0, len(p):].tolist()


def test_generation_stops_per_sequence_at_stop_ids():
    model = tiny_llama(std=0.5)
    prompts = [[5, 6, 7], [11, 12]]
    free = generate_ids(model, prompts, 12, stop_ids=[], pad_id=0)
    stop = free[0][3]  # make the 4th token of the first sequence a stop token
    out = generate_ids(model, prompts, 12, stop_ids=[stop], pad_id=0)
    assert out[0] == free[0][:free[0].index(stop)]
    cut = free[1].index(stop) if stop in free[1] else len(free[1])
    assert out[1] == free[1][:cut]


def test_sampling_is_deterministic_with_a_seed():
    model = tiny_llama(std=0.5)
    runs = [generate_ids(model, [[5, 6, 7]] * 3, 10, [], 0, temperature=1.0, top_p=0.9,
                         generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_left_pad_right_aligns_the_rows_and_masks_the_pads():
    from model import left_pad

    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_eval_mode_turns_off_dropout_and_autograd_and_restores_training_after_an_error():
    from model import eval_mode

    model = tiny_llama().train()
    with pytest.raises(KeyError):
        with eval_mode(model):
            assert not model.training and not torch.is_grad_enabled()
            raise KeyError
    assert model.training and torch.is_grad_enabled()
