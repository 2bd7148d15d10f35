"""Fisher estimators against the reference loop, the EWC penalty's value and gradient, online EWC, the Fisher
file, and EWC preventing forgetting on the toy two-head model of scripts/demo_toy_forgetting.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from errors import ForgetlabError
from ewc import EWC, estimate_fisher, fisher_reference, trainable_parameters
from scripts.demo_toy_forgetting import TinyModel, make_task, task_fisher
from tests.tiny import tiny_llama

VOCAB = 101


def padded_batch(seed=0, lengths=(12, 8, 5), prompt=(2, 3, 1), left=False):
    """Random token ids, unequal lengths padded with id 0; the first `prompt[i]` labels of each row are -100,
    as are the pads' (and a pad's label is set to a real token id in one row, which must still not count)."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    ids = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, (n, p) in enumerate(zip(lengths, prompt)):
        span = slice(T - n, T) if left else slice(0, n)
        ids[i, span] = torch.randint(3, VOCAB, (n,), generator=g)
        labels[i, span] = ids[i, span]
        labels[i, span.start:span.start + p] = -100
        mask[i, span] = 1
    if not left:
        labels[1, -1] = 7  # a label on a pad position: masked out by attention_mask
    return dict(input_ids=ids, labels=labels, attention_mask=mask)


def raw_fisher(model, batches, **kwargs):
    """The Fisher unnormalized, as the reference loop and the closed forms give it."""
    return estimate_fisher(model, batches, normalize="none", **kwargs)


def assert_fisher_close(fast, ref):
    assert fast.keys() == ref.keys()
    for name in ref:
        assert ref[name].abs().max() > 0, name  # the comparison must not be vacuous
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-4, atol=1e-7 * float(ref[name].abs().max()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("left", [False, True])
def test_empirical_fisher_equals_per_example_loop_on_padded_batches(tied, left):
    model = tiny_llama(std=0.2, tie_word_embeddings=tied)
    batches = [padded_batch(0, left=left), padded_batch(1, lengths=(9, 11, 4), left=left)]
    fast = raw_fisher(model, batches, estimator="empirical")
    ref = fisher_reference(model, batches)
    assert len(fast) == len(trainable_parameters(model))
    assert_fisher_close(fast, ref)
    assert model.training is False and all(p.requires_grad for p in model.parameters())


def test_fisher_covers_only_trainable_parameters():
    model = tiny_llama(std=0.2).train()
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name or "layers.1.mlp" in name or name == "model.norm.weight")
    batches = [padded_batch(0)]
    fast = raw_fisher(model, batches)
    assert set(fast) == set(trainable_parameters(model)) and len(fast) == 6
    assert_fisher_close(fast, fisher_reference(model, batches))
    assert model.training  # restored
    assert sum(p.requires_grad for p in model.parameters()) == 6


def test_fisher_of_lora_adapters_equals_loop():
    from lora import apply_lora

    model = tiny_llama(std=0.2)
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj"))
    for name, p in model.named_parameters():  # B = 0 at init would make A's Fisher zero: perturb it
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    batches = [padded_batch(0)]
    fast = raw_fisher(model, batches)
    assert set(fast) == {n for n in dict(model.named_parameters()) if ".lora_" in n}
    assert_fisher_close(fast, fisher_reference(model, batches))


def test_max_examples_stops_midway_through_a_batch():
    model = tiny_llama(std=0.2)
    batches = [padded_batch(0), padded_batch(1)]
    first_four = [batches[0], {k: v[:1] for k, v in batches[1].items()}]
    assert_fisher_close(raw_fisher(model, batches, max_examples=4), fisher_reference(model, first_four))


def test_batch_estimator_is_the_square_of_the_mean_gradient():
    model = tiny_llama(std=0.2)
    batch = padded_batch(0)
    params = trainable_parameters(model)
    # mean over examples of each example's own mean loss, computed example by example
    losses = []
    for i in range(3):
        real = batch["attention_mask"][i].bool()
        losses.append(model(batch["input_ids"][i, real][None], labels=batch["labels"][i, real][None]))
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(params.values()))
    fisher = raw_fisher(model, [batch], estimator="batch")
    for (name, g) in zip(params, grads):
        torch.testing.assert_close(fisher[name], g.pow(2), rtol=1e-4, atol=1e-7 * float(g.pow(2).max()))
    # with one example per batch, batch and empirical estimators coincide; with three they do not
    singles = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(3)]
    assert_fisher_close(raw_fisher(model, singles, estimator="batch"), fisher_reference(model, singles))
    emp = raw_fisher(model, [batch])
    assert fisher["lm_head.weight"].sum() < 0.9 * emp["lm_head.weight"].sum()  # biased low


def test_true_fisher_matches_the_expected_fisher_of_lm_head():
    """With targets sampled from the model, E[(∇W ℓ)²][v, j] = 1/n² Σ_t p_tv (1 − p_tv) h_tj² (the sampled
    tokens are independent given the teacher-forced inputs, so cross terms vanish)."""
    model = tiny_llama(std=0.3)
    batch = padded_batch(0)
    with torch.no_grad():
        h = model.hidden(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, T-1, d)
        p = torch.softmax(model.lm_head(h), -1)  # (B, T-1, V)
    keep = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
    w = keep / keep.sum(1, keepdim=True)  # 1/n on labelled positions
    expected = torch.einsum("bt,btv,btj->vj", w.pow(2), p * (1 - p), h.pow(2)) / 3
    repeated = {k: v.repeat(1000, 1) for k, v in batch.items()}  # 3000 examples, one sample each
    fisher = raw_fisher(model, [repeated], estimator="true", seed=1)["lm_head.weight"]
    rel = (fisher - expected).norm() / expected.norm()
    assert rel < 0.1, rel  # Monte Carlo error ~ 3.5/sqrt(examples) here
    assert abs(float(fisher.sum() / expected.sum()) - 1) < 0.03
    empirical = raw_fisher(model, [batch])["lm_head.weight"]
    assert (empirical - expected).norm() / expected.norm() > 1.0  # the data's labels give something else


def test_normalization_and_bad_options():
    model = tiny_llama(std=0.2)
    batches = [padded_batch(0)]
    by_mean = estimate_fisher(model, batches)  # the default, as on the command line
    by_max = estimate_fisher(model, batches, normalize="max")
    total = sum(f.sum() for f in by_mean.values()) / sum(f.numel() for f in by_mean.values())
    assert abs(float(total) - 1.0) < 1e-5
    assert float(max(f.max() for f in by_max.values())) == 1.0
    ratio = by_mean["lm_head.weight"] / by_max["lm_head.weight"].clamp(min=1e-30)
    assert torch.allclose(ratio[by_max["lm_head.weight"] > 1e-6], ratio.max(), rtol=1e-4)  # one global scale
    for kwargs in (dict(estimator="diag"), dict(normalize="sum"), dict(max_examples=0)):
        with pytest.raises(ForgetlabError):
            estimate_fisher(model, batches, **kwargs)
    unlabelled = dict(padded_batch(0), labels=torch.full((3, 12), -100))
    with pytest.raises(ForgetlabError, match="no labelled token"):
        estimate_fisher(model, [unlabelled])


# ----------------------------------------------------------------------------------------------------------
# The penalty


def random_fisher(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in trainable_parameters(model).items()}


def perturb_(model, seed=1, std=0.01):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_penalty_is_zero_at_the_anchor_and_its_gradient_is_lambda_F_delta():
    model = tiny_llama(std=0.2)
    fisher = random_fisher(model)
    ewc = EWC(model, fisher, lam=3.0)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    value = ewc.penalty(model)
    assert value.item() == 0.0
    value.backward()
    assert all(p.grad.abs().max() == 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)

    perturb_(model)
    params = trainable_parameters(model)
    delta = {n: p.detach() - anchor[n] for n, p in params.items()}
    expected = 1.5 * sum((fisher[n] * delta[n].pow(2)).sum() for n in params)
    value = ewc.penalty(model)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    (2 * value).backward()  # the chain rule through the custom node: grad_out = 2
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 2 * 3.0 * fisher[n] * delta[n], rtol=1e-5, atol=1e-9)

    grads = {n: p.grad.clone() for n, p in params.items()}
    value2 = ewc.add_penalty_grad_(model)  # adds λ F Δ once more onto the existing gradients
    torch.testing.assert_close(value2, expected, rtol=1e-5, atol=0)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, grads[n] + 3.0 * fisher[n] * delta[n], rtol=1e-5, atol=1e-9)


def test_penalty_skips_frozen_parameters_and_works_in_bfloat16():
    model = tiny_llama(std=0.2)
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    fisher = random_fisher(model)
    ewc32, ewc16 = EWC(model, fisher, lam=1.0), EWC(model, fisher, lam=1.0, dtype=torch.bfloat16)
    assert len(ewc32.params) == 6 and all(f.dtype == torch.bfloat16 for f in ewc16.fisher + ewc16.anchor)
    perturb_(model, std=0.05)  # moves frozen weights too: they must not count
    v32, v16 = ewc32.penalty(model), ewc16.penalty(model)
    assert v32 > 0 and v16.dtype == torch.float32
    torch.testing.assert_close(v16, v32, rtol=2e-2, atol=0)
    with pytest.raises(ForgetlabError, match="does not fit"):
        EWC(model, {k: v for k, v in list(fisher.items())[1:]}, lam=1.0)


def test_online_consolidation_decays_the_old_fisher_and_moves_the_anchor():
    model = tiny_llama(std=0.2)
    f1, f2 = random_fisher(model, 0), random_fisher(model, 1)
    ewc = EWC(model, f1, lam=1.0, gamma=0.7)
    perturb_(model)
    ewc.consolidate(model, f2)
    for name, p, a, f in zip(ewc.names, ewc.params, ewc.anchor, ewc.fisher):
        torch.testing.assert_close(f, 0.7 * f1[name] + f2[name], rtol=1e-6, atol=0)
        assert torch.equal(a, p.detach())
    assert ewc.penalty(model).item() == 0.0
    ewc.consolidate(model, f1)
    name = ewc.names[0]
    torch.testing.assert_close(ewc.fisher[0], 0.7 * (0.7 * f1[name] + f2[name]) + f1[name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    model = tiny_llama(std=0.2)
    ewc = EWC(model, random_fisher(model), lam=2.0, gamma=0.9, dtype=dtype)
    path = tmp_path / "fisher.safetensors"
    ewc.save(path, {"estimator": "empirical", "data": "general_qa.jsonl", "n_examples": 64, "model": "tiny"})
    perturb_(model)  # the loaded anchor is the stored one, not the current weights
    loaded = EWC.load(path, model, lam=5.0)
    assert loaded.gamma == 0.9 and loaded.lam == 5.0 and loaded.names == ewc.names
    for a, b in zip(ewc.fisher + ewc.anchor, loaded.fisher + loaded.anchor):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
    meta = safe_open(path, framework="pt").metadata()
    assert meta["estimator"] == "empirical" and meta["n_examples"] == "64" and meta["model"] == "tiny"
    assert {"gamma", "created", "data"} <= set(loaded.metadata)
    torch.testing.assert_close(loaded.penalty(model), 2.5 * ewc.penalty(model))


def test_load_rejects_a_file_that_does_not_fit_the_model(tmp_path):
    path = tmp_path / "fisher.safetensors"
    model = tiny_llama(std=0.2)
    EWC(model, random_fisher(model), lam=1.0).save(path)
    other = tiny_llama(std=0.2, intermediate_size=32)
    with pytest.raises(ForgetlabError, match=f"{path}: .*mlp.gate_proj.weight has shape"):
        EWC.load(path, other, lam=1.0)
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" not in name)
    with pytest.raises(ForgetlabError, match=f"{path}: does not fit the model"):
        EWC.load(path, model, lam=1.0)
    with pytest.raises(ForgetlabError, match="not found"):
        EWC.load(tmp_path / "missing.safetensors", model, lam=1.0)


def test_load_state_dict_restores_f_and_anchor_and_rejects_another_models_state():
    model = tiny_llama(std=0.2)
    ewc = EWC(model, random_fisher(model, 0), lam=1.0)
    state = {k: v.clone() for k, v in ewc.state_dict().items()}
    perturb_(model)
    ewc.consolidate(model, random_fisher(model, 1))
    ewc.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in ewc.state_dict().items())
    broken = {k: v.clone().fill_(7.0) for k, v in state.items() if k != "anchor.lm_head.weight"}
    with pytest.raises(ForgetlabError, match=r"does not fit the model: missing tensor anchor\.lm_head\.weight"):
        ewc.load_state_dict(broken)
    assert all(torch.equal(state[k], v) for k, v in ewc.state_dict().items())  # nothing half-loaded


# ----------------------------------------------------------------------------------------------------------
# The toy of scripts/demo_toy_forgetting.py: forgetting task A while learning task B through a shared layer


def train_toy(model, x, y, task, steps, lr, ewc=None, in_place=True):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x, task), y)
        if ewc is None:
            loss.backward()
        else:
            ewc.backward(model, loss, in_place)
        opt.step()


@pytest.mark.parametrize("in_place", [False, True])
def test_ewc_keeps_the_toy_model_near_its_task_a_optimum(in_place):
    g = torch.Generator().manual_seed(1)
    (x_a, y_a), (x_b, y_b) = make_task("a", 256, g), make_task("b", 256, g)
    torch.manual_seed(0)
    model = TinyModel()
    model.head_b.requires_grad_(False)
    train_toy(model, x_a, y_a, "a", steps=300, lr=1e-2)
    model.requires_grad_(True)
    model.head_a.requires_grad_(False)  # task B trains the shared layer and head_b
    optimum = [p.detach().clone() for p in model.shared.parameters()]
    fisher = task_fisher(model, x_a)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def after_b(lam):
        model.load_state_dict(state)
        ewc = EWC(model, fisher, lam=lam) if lam else None
        train_toy(model, x_b, y_b, "b", steps=300, lr=1e-2, ewc=ewc, in_place=in_place)
        with torch.no_grad():
            dist = sum((p - o).pow(2).sum() for p, o in zip(model.shared.parameters(), optimum)).sqrt()
            return float(dist), F.mse_loss(model(x_a, "a"), y_a).item(), F.mse_loss(model(x_b, "b"), y_b).item()

    plain, with_ewc = after_b(0.0), after_b(100.0)  # measured: dist 6.6 vs 4.0, task-A loss 1.9 vs 0.094
    assert with_ewc[0] < 0.8 * plain[0]  # shared weights stay closer to task A's optimum (weights that
    # task A does not care about, F ≈ 0, are free to move: the distance shrinks less than the loss)
    assert with_ewc[1] < 0.1 * plain[1]  # task A is hardly forgotten
    assert with_ewc[2] < 1.0  # while task B is learned (its targets' variance is 65)
