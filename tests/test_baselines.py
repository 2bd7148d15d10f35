"""The mitigations of the literature (methods.py): each mechanism against its written formula, on tiny models."""
import copy
import importlib
from pathlib import Path

import pytest
import torch

import methods
import train
from data import load_dataset, tokenize_dataset
from errors import ForgetlabError
from ewc import EWC
from lora import lora_disabled, lora_modules, merge_lora
from model import load_model
from model.tokenizer import Tokenizer
from tests.tiny import read_metrics, run_context, tiny_args, tiny_llama


@torch.no_grad()
def perturb_(params, seed=1, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * scale)


def general_examples(tiny_dir, tiny_data):
    tok = Tokenizer.from_dir(tiny_dir)
    examples, _ = tokenize_dataset(tok, load_dataset(tiny_data[1]), 256)
    return tok, examples


# ----------------------------------------------------------------------------- l2-init

def test_l2_init_is_zero_at_the_start_and_its_gradient_is_that_of_the_formula():
    model = tiny_llama()
    method = methods.get_method("l2-init", {"l2-init.lambda": 0.7})
    method.configure(model)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert float(method.add_gradient(model, 0)) == 0.0 and all(p.grad.abs().max() == 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)
    perturb_(model.parameters())
    value = method.add_gradient(model, 1)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    reference = 0.7 / 2 * sum(((p - theta0[n]) ** 2).sum() for n, p in model.named_parameters())
    reference.backward()
    torch.testing.assert_close(value, reference.detach(), rtol=1e-5, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-6, atol=1e-9, msg=n)


def test_l2_init_equals_ewc_with_a_fisher_of_ones_at_the_same_lambda():
    model = tiny_llama()
    method = methods.get_method("l2-init", {"l2-init.lambda": 0.5})
    method.configure(model)
    ewc = EWC(model, {n: torch.ones_like(p) for n, p in model.named_parameters()}, lam=0.5)  # mean-normalized: 1
    perturb_(model.parameters())
    torch.testing.assert_close(method.add_gradient(model, 0), ewc.penalty(model).detach(), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- freeze

def test_freeze_leaves_the_embeddings_and_the_lowest_layers_bitwise_unchanged(tiny_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_dir, tiny_data, out, "--method", "freeze", "--freeze.layers", "1", "--max-steps", "3",
                         "--lr", "1e-2"))
    start, end = load_model(tiny_dir).state_dict(), load_model(out / "model").state_dict()
    frozen = [n for n in start if "embed_tokens" in n or ".layers.0." in n or (n == "lm_head.weight")]
    assert frozen and all(torch.equal(start[n], end[n]) for n in frozen)
    assert all(not torch.equal(start[n], end[n]) for n in start if ".layers.1." in n and n.endswith("proj.weight"))


def test_freeze_rejects_more_layers_than_the_model_has(tiny_dir, tiny_data, tmp_path):
    with pytest.raises(ForgetlabError, match="--freeze.layers 9: the model has 2 decoder layers"):
        train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "run", "--method", "freeze", "--freeze.layers", "9"))


# ----------------------------------------------------------------------------- wise-ft

@pytest.mark.parametrize("lora", [False, True])
def test_wise_ft_at_alpha_0_is_the_base_model_and_at_1_the_fine_tuned_one(lora):
    model = tiny_llama()
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids)
    method = methods.get_method("wise-ft", {"wise-ft.lora": True} if lora else {})
    method.configure(model)
    perturb_([p for p in model.parameters() if p.requires_grad], scale=0.05)  # "training"
    with torch.no_grad():
        tuned = model(ids)
        assert not torch.equal(tuned, base)
        method.finish(model)  # the saved model: alpha 0.5, in between
        half = model(ids)
        assert not torch.equal(half, base) and not torch.equal(half, tuned)
        method.interpolate(0.0)
        assert torch.equal(model(ids), base)
        method.interpolate(1.0)
        assert torch.equal(model(ids), tuned)


def test_wise_ft_reports_each_alpha_of_one_run_in_its_own_section(tiny_dir, tiny_data, tmp_path, monkeypatch):
    import eval as ev

    monkeypatch.setitem(ev.LEVELS, "quick", {"general_qa": 2, "ppl": 2, "domain_recall": 2})
    out = tmp_path / "run"
    argv = tiny_args(tiny_dir, tiny_data, out, "--method", "wise-ft", "--wise-ft.alphas", "0,1", "--max-steps", "2",
                     "--lr", "1e-2", "--domain-eval", str(Path(ev.__file__).parent / "data" / "domain_recall.jsonl"))
    argv[argv.index("--eval") + 1] = "quick"
    results = train.main(argv)
    assert set(results["after_variants"]) == {"alpha=0", "alpha=1"}
    zero = results["after_variants"]["alpha=0"]["after"]
    before, after = results["before"], results["after"]
    assert zero["ppl"]["nll"] == before["ppl"]["nll"] != after["ppl"]["nll"]  # α = 0: the base model, exactly
    assert zero["domain_recall"]["nll"] == before["domain_recall"]["nll"]
    report = (out / "report.md").read_text()
    assert "## wise-ft alpha=0" in report and "## wise-ft alpha=1" in report


# ----------------------------------------------------------------------------- mofo

def test_mofo_moves_exactly_the_entries_with_the_largest_momentum():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20, 10))
    b = torch.nn.Parameter(torch.randn(7))
    opt = methods.mofo.MoFOOptimizer([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                                lr=1e-2, fraction=0.25)
    for step in range(3):
        before = [w.detach().clone(), b.detach().clone()]
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
        for p, old in zip((w, b), before):
            m = opt.state[p]["exp_avg"].abs().view(-1)
            k = -(-p.numel() // 4)  # ceil(0.25 * numel)
            selected = torch.zeros(p.numel(), dtype=torch.bool)
            selected[m.topk(k).indices] = True
            changed = p.detach().view(-1) != old.view(-1)
            assert torch.equal(changed, selected), step  # exactly the selected entries moved


def test_mofo_with_fraction_1_is_adamw():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 4)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    mofo = methods.mofo.MoFOOptimizer([{"params": ps, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.99), fraction=1.0)
    adamw = torch.optim.AdamW([{"params": qs, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.99))
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = q.grad = torch.randn_like(p)
        mofo.step()
        adamw.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- kl

def kl_method(tiny_dir, tiny_data, *flags):
    cfg, method = train.parse_config(["--method", "kl", "--batch-size", "4", "--general-data", tiny_data[1], *flags])
    model = load_model(tiny_dir)
    tok, general = general_examples(tiny_dir, tiny_data)
    method.setup(model, run_context(cfg, tok, general))
    method.configure(model)
    return model.train(), method


def reference_kl(student, teacher, batch, temperature=1.0):
    """1/N Σ_t Σ_v q (log q − log p) from the full (B, T, vocab) logits, at the labelled positions."""
    where = batch["labels"][:, 1:] != -100
    z_s = student(batch["input_ids"], attention_mask=batch["attention_mask"])[:, :-1][where] / temperature
    with torch.no_grad():
        z_t = teacher(batch["input_ids"], attention_mask=batch["attention_mask"])[:, :-1][where] / temperature
    q, log_q, log_p = torch.softmax(z_t, -1), torch.log_softmax(z_t, -1), torch.log_softmax(z_s, -1)
    return (q * (log_q - log_p)).sum() / where.sum()


@pytest.mark.parametrize("flags", [["--kl.teacher", "cache"], ["--kl.teacher", "copy"], ["--kl.lora"]])
def test_kl_is_zero_while_the_model_is_the_base(tiny_dir, tiny_data, flags):
    model, method = kl_method(tiny_dir, tiny_data, *flags)
    assert float(method.kl(model, 0)) == 0.0


def test_kl_gradient_is_that_of_the_written_formula(tiny_dir, tiny_data):
    model, method = kl_method(tiny_dir, tiny_data, "--kl.teacher", "copy", "--kl.temperature", "2")
    base = copy.deepcopy(model)
    perturb_(model.parameters(), scale=0.05)
    value = method.kl(model, 1)
    value.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    reference = reference_kl(model, base, method.batches[1], temperature=2.0)
    reference.backward()
    assert float(reference) > 0
    torch.testing.assert_close(value, reference, rtol=1e-4, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-3, atol=1e-7, msg=n)


def test_kl_teacher_of_a_lora_run_is_the_model_with_its_adapters_off(tiny_dir, tiny_data):
    base = load_model(tiny_dir)
    model, method = kl_method(tiny_dir, tiny_data, "--kl.lora", "--lora.dropout", "0")
    perturb_([m.lora_B.weight for m in lora_modules(model).values()], scale=0.5)
    batch = method.batches[0]
    with torch.no_grad(), lora_disabled(model):
        assert torch.equal(method.logits(model, batch), method.logits(base, batch))  # adapters off: the base model
    value = method.kl(model, 0)
    assert float(value) > 0
    torch.testing.assert_close(value, reference_kl(model, base, batch), rtol=1e-4, atol=0)


def test_kl_cache_teacher_approaches_the_full_kl_as_k_grows(tiny_dir, tiny_data):
    values = {}
    for k in ("4", "49152"):  # 49152: SmolLM2's whole vocabulary, the exact KL
        model, method = kl_method(tiny_dir, tiny_data, "--kl.teacher", "cache", "--kl.top-k", k)
        base = copy.deepcopy(model)
        perturb_(model.parameters(), scale=0.05)
        with torch.no_grad():
            values[k] = float(method.kl(model, 0))
            exact = float(reference_kl(model, base, method.batches[0]))
    assert values["49152"] == pytest.approx(exact, rel=1e-4)
    assert values["4"] != pytest.approx(exact, rel=1e-2)


# ----------------------------------------------------------------------------- self-replay

def test_self_replay_answers_come_from_the_base_model_and_are_read_back_from_the_cache(tiny_dir, tiny_data, tmp_path,
                                                                                     monkeypatch):
    generate = importlib.import_module("model.generate")  # the module (model.generate is also a function's name)
    cfg, method = train.parse_config(["--method", "self-replay", "--self-replay.cache", str(tmp_path / "cache"),
                                      "--self-replay.max-new-tokens", "6"])
    model = load_model(tiny_dir)
    tok, general = general_examples(tiny_dir, tiny_data)
    examples = general[:3]
    replay = method.replay_examples(model, run_context(cfg, tok), examples)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    for e, r in zip(examples, replay):
        n = next(i for i, y in enumerate(e["labels"]) if y != -100)  # the prompt: the same tokens, unlabelled
        assert r["input_ids"][:n] == e["input_ids"][:n] and r["labels"][:n] == [-100] * n
        with generate.eval_mode(model):
            answer = generate.generate_ids(model, [e["input_ids"][:n]], 6, tok.stop_ids, tok.pad_id)[0]
        assert r["input_ids"][n:n + len(answer)] == answer == r["labels"][n:n + len(answer)]  # greedy, base model
        assert answer != [y for y in e["labels"] if y != -100][:len(answer)]  # not the data's answer

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")
    monkeypatch.setattr(generate, "generate_ids", no_generation)
    assert method.replay_examples(model, run_context(cfg, tok), examples) == replay
    perturb_(model.parameters())  # another model: another cache entry
    with pytest.raises(AssertionError, match="generated again"):
        method.replay_examples(model, run_context(cfg, tok), examples)


def test_self_replay_trains_on_the_replaced_examples(tiny_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    results = train.main(tiny_args(tiny_dir, tiny_data, out, "--method", "self-replay", "--max-steps", "2",
                                   "--self-replay.cache", str(tmp_path / "cache"),
                                   "--self-replay.max-new-tokens", "4"))
    assert results["training"]["replay_examples"] == 3  # int(24 x 0.15), the preset
    assert len(list((tmp_path / "cache").iterdir())) == 1


# ----------------------------------------------------------------------------- ewc-lora

def ewc_lora_method(tiny_dir, tiny_data, lam=2.0):
    cfg, method = train.parse_config(["--method", "ewc-lora", "--ewc.lambda", str(lam), "--ewc.fisher-samples", "4",
                                      "--lora.dropout", "0"])
    model = load_model(tiny_dir)
    tok, general = general_examples(tiny_dir, tiny_data)
    method.setup(model, run_context(cfg, tok, general))
    method.configure(model)
    return model, method


def test_ewc_lora_is_zero_at_the_start_and_its_fisher_is_the_base_weights(tiny_dir, tiny_data):
    model, method = ewc_lora_method(tiny_dir, tiny_data)
    assert float(method.penalty(model)) == 0.0  # B = 0
    assert set(method.fisher) == {f"{n}.lora_B.weight" for n in lora_modules(model)}
    assert all(f.abs().max() > 0 for f in method.fisher.values())
    assert all(method.fisher[f"{n}.lora_B.weight"].shape == m.weight.shape for n, m in lora_modules(model).items())


def test_ewc_lora_with_a_constant_fisher_is_the_ewc_penalty_of_the_merged_weights(tiny_dir, tiny_data):
    model, method = ewc_lora_method(tiny_dir, tiny_data, lam=2.0)
    for f in method.fisher.values():
        f.fill_(3.0)
    perturb_([m.lora_B.weight for m in lora_modules(model).values()], scale=0.5)
    value = method.penalty(model)
    value.backward()

    base = load_model(tiny_dir)  # EWC around W0 with F = 3 on the adapted weights, evaluated at the merged weights
    targets = {f"{n}.weight" for n in lora_modules(model)}
    for n, p in base.named_parameters():
        p.requires_grad_(n in targets)
    ewc = EWC(base, {n: torch.full_like(p, 3.0) for n, p in base.named_parameters() if n in targets}, lam=2.0)
    merged = merge_lora(model).state_dict()
    grads = {}
    with torch.no_grad():
        for n, p in base.named_parameters():
            p.copy_(merged[n])
    expected = ewc.value_and_grad(lambda p, g: grads.__setitem__(id(p), g.clone()))
    torch.testing.assert_close(value.detach(), expected, rtol=1e-4, atol=0)
    weights = dict(base.named_parameters())
    for n, m in lora_modules(model).items():  # chain rule through ΔW = s·B·A: dB = s·G·Aᵀ, dA = s·Bᵀ·G
        G = grads[id(weights[f"{n}.weight"])]
        torch.testing.assert_close(m.lora_B.weight.grad, m.scale * G @ m.lora_A.weight.detach().T, rtol=1e-3, atol=1e-8)
        torch.testing.assert_close(m.lora_A.weight.grad, m.scale * m.lora_B.weight.detach().T @ G, rtol=1e-3, atol=1e-8)


def test_ewc_lora_trains_only_adapters_and_its_penalty_grows(tiny_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    results = train.main(tiny_args(tiny_dir, tiny_data, out, "--method", "ewc-lora", "--max-steps", "3",
                                   "--ewc.lambda", "10"))
    metrics = read_metrics(out)
    assert metrics[0]["extra_loss"] == 0.0 and metrics[-1]["extra_loss"] > 0
    assert results["training"]["trainable_params"] < results["training"]["total_params"] / 10
    assert (out / "adapter" / "adapter_config.json").is_file()


# ----------------------------------------------------------------------------- ties, dare

def test_ties_merge_equals_peft_s_ties_on_three_task_vectors():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    from methods.ties import ties_merge

    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(40, 30, generator=g) for _ in range(3)]
    for density in (0.1, 0.3, 1.0):
        ours = ties_merge(taus, density)
        theirs = merge_utils.ties(taus, torch.ones(3), density=density, majority_sign_method="total")
        assert torch.allclose(ours, theirs, atol=1e-6), density


def test_ties_of_one_task_vector_keeps_exactly_its_largest_entries():
    from methods.ties import ties_merge

    tau = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    assert torch.equal(ties_merge([tau], 0.5), torch.tensor([[0.0, -3.0, 0.0], [2.0, 0.0, 1.0]]))
    assert torch.equal(ties_merge([tau], 1.0), tau)


def test_dare_drops_a_p_fraction_and_rescales_the_rest_to_keep_the_expectation():
    from methods.dare import dare

    tau = torch.randn(200, 100, generator=torch.Generator().manual_seed(0))
    out = dare(tau, 0.9, torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.01  # 20,000 Bernoulli(0.1): sd 0.002
    assert torch.allclose(out[kept], tau[kept] / 0.1) and torch.equal(out, dare(tau, 0.9, torch.Generator().manual_seed(1)))
    mean = sum(dare(tau, 0.5, torch.Generator().manual_seed(s)) for s in range(400)) / 400
    assert (mean - tau).abs().mean() < 0.05 * tau.abs().mean()  # E[τ̃] = τ


@pytest.mark.parametrize("name", ["ties", "dare"])
def test_a_merge_at_lambda_0_is_the_start_and_keeping_everything_at_lambda_1_the_fine_tuned_model(name):
    model = tiny_llama()
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    keep_all = "1:1" if name == "ties" else "0:1"
    method = methods.get_method(name, {f"{name}.lambda": 0.0, f"{name}.settings": f"{keep_all},{keep_all[:-1]}0.5"})
    method.setup(model, methods.RunContext(seed=0, batch_size=1, max_len=8, total_steps=1, tokenizer=None,
                                           device="cpu"))
    method.configure(model)
    with torch.no_grad():
        base = model(ids)
        perturb_([p for p in model.parameters() if p.requires_grad], scale=0.05)  # "training"
        tuned = model(ids)
        method.finish(model)  # the saved model: lambda 0
        assert torch.equal(model(ids), base)
        variants = method.variants(model)
        assert list(variants) == (["density=1,lambda=1", "density=1,lambda=0.5"] if name == "ties"
                                  else ["drop=0,lambda=1", "drop=0,lambda=0.5"])
        variants[list(variants)[0]]()
        assert torch.allclose(model(ids), tuned, atol=1e-5)
        variants[list(variants)[1]]()
        half = model(ids)
        assert not torch.allclose(half, base, atol=1e-4) and not torch.allclose(half, tuned, atol=1e-4)


# ----------------------------------------------------------------------------- a-gem

def test_a_gem_projection_removes_exactly_the_conflicting_component():
    from methods.agem import project

    g0 = torch.Generator().manual_seed(0)
    ref = [torch.randn(5, 3, generator=g0), torch.randn(4, generator=g0)]
    flat_ref = torch.cat([r.flatten() for r in ref])
    conflicting = [-2 * r + 0.1 * torch.randn(r.shape, generator=g0) for r in ref]
    new, projected = project(conflicting, ref)
    flat_g, flat_new = torch.cat([x.flatten() for x in conflicting]), torch.cat([x.flatten() for x in new])
    assert projected and float(flat_new @ flat_ref) == pytest.approx(0, abs=1e-4)
    torch.testing.assert_close(flat_new, flat_g - (flat_g @ flat_ref) / (flat_ref @ flat_ref) * flat_ref)
    agreeing = [r + 0.1 for r in ref]
    assert project(agreeing, ref) == (agreeing, False)  # the same tensors: nothing changed


def test_a_gem_projects_the_step_s_gradient_against_the_memory_batch_s(tiny_dir, tiny_data):
    from methods.agem import project

    cfg, method = train.parse_config(["--method", "a-gem", "--batch-size", "4", "--general-data", tiny_data[1],
                                      "--a-gem.memory", "8"])
    model = load_model(tiny_dir).train()
    tok, general = general_examples(tiny_dir, tiny_data)
    method.setup(model, run_context(cfg, tok, general))
    assert sum(len(b["indices"]) for b in method.batches) == 8
    batch = method.batches[1]
    model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"]).backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    for sign in (-1, 1):  # a task gradient against the memory's, then one along it
        task = [sign * r + 0.01 * torch.randn(r.shape, generator=torch.Generator().manual_seed(2)) for r in g_ref]
        for p, t in zip(model.parameters(), task):
            p.grad = t.clone()
        loss = method.add_gradient(model, 1)
        expected, projected = project(task, g_ref)
        assert projected == (sign < 0) and float(loss) > 0
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
