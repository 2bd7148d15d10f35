"""The task-stream methods (o-lora, online-ewc) driven stage after stage as a stream drives them, on the tiny Llama:
their penalties against the formulas written out here, what carries from stage to stage, and their state on a
fresh instance."""
import copy
import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import methods
import methods.online_ewc
from data import collate
from errors import ForgetlabError
from ewc import EWC, estimate_fisher
from lora import lora_modules
from methods import RunContext
from tests.tiny import tiny_llama

VOCAB = 101
LORA = {"lora.r": 4, "lora.alpha": 8.0, "lora.dropout": 0.0}


def task(t: int, n: int = 8, seed: int = 0) -> list[dict]:
    """Tokenized examples of task t: random ids from a band of the vocabulary of its own, the first 2 labels
    (the prompt) ignored."""
    g = random.Random(1000 * t + seed)
    lo = 3 + 30 * t
    rows = []
    for _ in range(n):
        ids = [g.randrange(lo, lo + 30) for _ in range(g.randrange(5, 11))]
        rows.append(dict(input_ids=ids, labels=[-100, -100] + ids[2:]))
    return rows


TASKS = [task(t) for t in range(3)]


def context(stage: int, stages: int, domain: list, steps: int = 3) -> RunContext:
    return RunContext(seed=0, batch_size=4, max_len=32, total_steps=steps, tokenizer=SimpleNamespace(pad_id=0),
                      device="cpu", domain=list(domain), stage=stage, stages=stages, task=f"task{stage}")


def begin_stage(model, method, stage: int, stages: int, domain: list):
    """What a stream does before a stage's steps: every parameter trainable, then setup and configure."""
    model.requires_grad_(True)
    method.setup(model, context(stage, stages, domain))
    method.configure(model)


def steps(model, method, domain: list, n: int = 3, lr: float = 1e-2, record: list | None = None):
    """n optimizer steps of a stage: the task loss plus extra_loss, backpropagated, then add_gradient; `record`
    gets (gradient before add_gradient, after, its value, the weights) of each step."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    for step in range(n):
        b = collate([domain[(4 * step + i) % len(domain)] for i in range(4)], pad_id=0)
        loss = model(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"])
        extra = method.extra_loss(model, step)
        (loss if extra is None else loss + extra).backward()
        before = {k: p.grad.clone() for k, p in params.items()}
        value = method.add_gradient(model, step)
        if record is not None:
            record.append((before, {k: p.grad.clone() for k, p in params.items()}, value,
                           {k: p.detach().clone() for k, p in params.items()}))
        opt.step()
        method.after_step(model, step)
        opt.zero_grad(set_to_none=True)


def run_stage(model, method, stage: int, stages: int, domain: list, n: int = 3, record=None):
    begin_stage(model, method, stage, stages, domain)
    steps(model, method, domain, n, record=record)
    method.finish(model)


def adapters(model) -> dict:
    """{module: (A, B)} of the model's live adapters, cloned."""
    return {n: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone())
            for n, m in lora_modules(model).items()}


def weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def o_lora(**values):
    return methods.get_method("o-lora", {**LORA, **values})


# ----------------------------------------------------------------------------- o-lora

def o_lora_after_stages(n: int, stages: int = 3, **values):
    """A tiny model and an o-lora instance after n finished stages of a `stages`-task stream, and the live adapter
    each stage ended with (recorded here, independently of the method's state)."""
    torch.manual_seed(0)
    model, method = tiny_llama(), o_lora(**values)
    ended = []
    for stage in range(n):
        run_stage(model, method, stage, stages, TASKS[stage])
        ended.append(adapters(model))
    return model, method, ended


def test_o_lora_loss_and_gradient_equal_the_formula():
    l1, l2 = 0.5, 0.1
    model, method, ended = o_lora_after_stages(2, **{"o-lora.lambda1": l1, "o-lora.lambda2": l2})
    begin_stage(model, method, 2, 3, TASKS[2])
    steps(model, method, TASKS[2], n=1)  # B_2 no longer 0
    loss = method.extra_loss(model, 1)
    orthogonal, norms, params = 0.0, 0.0, []
    for name, m in lora_modules(model).items():
        A, B = m.lora_A.weight, m.lora_B.weight
        for s in (0, 1):
            orthogonal = orthogonal + torch.abs(ended[s][name][0] @ A.T).sum()
        norms = norms + torch.linalg.matrix_norm(A, "fro") + torch.linalg.matrix_norm(B, "fro")
        params += [A, B]
    expected = l1 * orthogonal + l2 * norms
    assert float(orthogonal.detach()) > 0.1 and float(B.detach().abs().max()) > 0  # neither term vacuous
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(expected, params)
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_o_lora_first_stage_and_single_fine_tune_are_lora_plus_the_l2_term():
    for stages in (1, 3):
        torch.manual_seed(0)
        model, method = tiny_llama(), o_lora(**{"o-lora.lambda2": 0.1})
        begin_stage(model, method, 0, stages, TASKS[0])
        assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
        norms = sum(torch.linalg.norm(m.lora_A.weight) + torch.linalg.norm(m.lora_B.weight)
                    for m in lora_modules(model).values())
        torch.testing.assert_close(method.extra_loss(model, 0), 0.1 * norms)
    assert o_lora().extra_loss(model, 0) is None  # lambda2 0 and no earlier adapter: nothing to add


def test_o_lora_keeps_earlier_adapters_unchanged_and_trains_only_the_new_one():
    model, method, ended = o_lora_after_stages(1)
    begin_stage(model, method, 1, 3, TASKS[1])
    modules = lora_modules(model)
    assert set(method.state_dict()) == {f"0.{n}.{x}" for n in modules for x in "AB"}
    for n, m in modules.items():
        assert torch.equal(method.earlier[f"0.{n}.A"], ended[0][n][0])
        assert torch.equal(method.earlier[f"0.{n}.B"], ended[0][n][1])
        assert not torch.equal(m.lora_A.weight, ended[0][n][0])  # a fresh A ...
        assert not m.lora_B.weight.any()  # ... and B = 0
    steps(model, method, TASKS[1])
    method.finish(model)
    begin_stage(model, method, 2, 3, TASKS[2])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}.weight" for n in modules for x in "AB"}
    held = {k: t.clone() for k, t in method.earlier.items()}
    fresh = adapters(model)
    steps(model, method, TASKS[2])
    method.finish(model)
    assert held.keys() == {f"{s}.{n}.{x}" for s in (0, 1) for n in modules for x in "AB"}
    for k, t in held.items():
        assert torch.equal(method.earlier[k], t), k
    for n, m in lora_modules(model).items():
        assert not torch.equal(m.lora_A.weight, fresh[n][0]) and m.lora_B.weight.any()  # the new adapter trained


def test_o_lora_folds_the_previous_adapter_into_the_base_weight_without_changing_the_model():
    model, method, ended = o_lora_after_stages(2)
    ids = torch.tensor([t["input_ids"][:5] for t in TASKS[1][:4]])
    with torch.no_grad():
        at_end = model(ids)
        base = {n: m.weight.clone() for n, m in lora_modules(model).items()}
    begin_stage(model, method, 2, 3, TASKS[2])
    with torch.no_grad():
        at_start = model(ids)
    torch.testing.assert_close(at_start, at_end, rtol=1e-5, atol=1e-6)
    for n, m in lora_modules(model).items():
        A, B = ended[1][n]
        assert float((B @ A).abs().max()) > 1e-4  # the folded update is not negligible
        torch.testing.assert_close(m.weight, base[n] + m.scale * B @ A, rtol=1e-6, atol=1e-7)
        assert not m.weight.requires_grad


def test_o_lora_state_round_trips_on_a_fresh_instance(tmp_path):
    model, method, _ = o_lora_after_stages(2)
    state = method.state_dict()
    fresh = o_lora()
    fresh.load_state_dict(state)  # before the next stage's configure, as a resumed stream does
    assert fresh.state_dict().keys() == state.keys() and all(torch.equal(fresh.earlier[k], state[k]) for k in state)
    twin = copy.deepcopy(model)
    torch.manual_seed(7)
    begin_stage(model, method, 2, 3, TASKS[2])
    torch.manual_seed(7)
    begin_stage(twin, fresh, 2, 3, TASKS[2])
    assert method.earlier.keys() == fresh.earlier.keys() and len(method.stages()) == 2
    assert all(torch.equal(method.earlier[k], fresh.earlier[k]) for k in method.earlier)
    steps(model, method, TASKS[2], n=1)
    steps(twin, fresh, TASKS[2], n=1)
    loss, again = method.extra_loss(model, 1), fresh.extra_loss(twin, 1)
    assert loss > 0 and torch.equal(loss, again)
    with pytest.raises(ForgetlabError, match="lacks"):
        fresh.load_state_dict({k: t for k, t in state.items() if not k.startswith("1.")})
    fresh.save(tmp_path)
    saved = load_file(tmp_path / "olora.safetensors")
    assert saved.keys() == fresh.earlier.keys() and all(torch.equal(saved[k], fresh.earlier[k]) for k in saved)
    o_lora().save(tmp_path / "none")  # no earlier adapter (a single fine-tune): no file
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- online-ewc

def online_ewc(**values):
    return methods.get_method("online-ewc", {"online-ewc.fisher-samples": 6, **values})


def task_fisher(model, end: dict, domain: list) -> dict:
    """F_t by ewc.estimate_fisher on the examples the method draws (6 of the task's, --seed 0), at the weights
    `end`, in one batch (the empirical Fisher does not depend on the batching)."""
    twin = copy.deepcopy(model).requires_grad_(True)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(end[n])
    sample = random.Random(0).sample(domain, 6)
    return estimate_fisher(twin, [collate(sample, pad_id=0)], estimator="empirical", normalize="mean")


def test_online_ewc_accumulates_the_decayed_fisher_and_penalizes_with_it(monkeypatch):
    lam, gamma = 2.0, 0.5
    estimates = []
    estimate = methods.online_ewc.estimate_general_fisher
    monkeypatch.setattr(methods.online_ewc, "estimate_general_fisher",
                        lambda *a: estimates.append(a[1].stage) or estimate(*a))
    torch.manual_seed(0)
    model, method = tiny_llama(), online_ewc(**{"online-ewc.lambda": lam, "online-ewc.gamma": gamma})
    ended, records, states = [], [], []
    for stage in range(3):
        records.append([])
        begin_stage(model, method, stage, 3, TASKS[stage])
        steps(model, method, TASKS[stage], record=records[-1])
        ended.append(weights(model))
        method.finish(model)
        states.append({k: t.clone() for k, t in method.state_dict().items()})
    assert estimates == [0, 1]  # no Fisher after the last task
    f0, f1 = task_fisher(model, ended[0], TASKS[0]), task_fisher(model, ended[1], TASKS[1])
    names = [n for n, _ in model.named_parameters()]
    assert set(states[2]) == {f"{x}.{n}" for x in ("fisher", "anchor") for n in names}
    for n in names:
        for state, want, anchor in ((states[0], f0[n], ended[0][n]), (states[2], gamma * f0[n] + f1[n], ended[1][n])):
            torch.testing.assert_close(state[f"fisher.{n}"], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
            assert torch.equal(state[f"anchor.{n}"], anchor), n
        assert not torch.equal(ended[2][n], ended[1][n])  # stage 2 moved the weights, not the anchor
    assert not torch.allclose(states[2]["fisher.lm_head.weight"], f0["lm_head.weight"] + f1["lm_head.weight"])
    assert all(value is None for _, _, value, _ in records[0])  # the first task: no penalty
    moved = 0.0
    for stage in (1, 2):
        state = states[stage - 1]
        for before, after, value, theta in records[stage]:
            total = 0.0
            for n in names:
                f, delta = state[f"fisher.{n}"], theta[n] - state[f"anchor.{n}"]
                torch.testing.assert_close(after[n] - before[n], lam * f * delta, rtol=1e-4, atol=1e-9)
                total += float((f * delta * delta).sum())
                moved = max(moved, float((lam * f * delta).abs().max()))
            torch.testing.assert_close(float(value), lam / 2 * total, rtol=1e-4, atol=1e-12)
    assert moved > 1e-4  # the penalty's gradient did act


def test_online_ewc_is_full_fine_tuning_in_a_single_run(tmp_path):
    torch.manual_seed(0)
    model, method = tiny_llama(), online_ewc()
    records = []
    begin_stage(model, method, 0, 1, TASKS[0])
    steps(model, method, TASKS[0], record=records)
    method.finish(model)
    method.save(tmp_path)
    assert all(value is None for _, _, value, _ in records)
    assert method.state_dict() == {} and not any(tmp_path.iterdir())


def test_online_ewc_state_round_trips_on_a_fresh_instance(tmp_path):
    values = {"online-ewc.gamma": 0.7}
    torch.manual_seed(0)
    model, method = tiny_llama(), online_ewc(**values)
    for stage in range(2):
        run_stage(model, method, stage, 4, TASKS[stage])
    state = {k: t.clone() for k, t in method.state_dict().items()}  # the live tensors change with the next task
    fresh = online_ewc(**values)
    fresh.load_state_dict(state)  # before the model of the next stage is known
    again = fresh.state_dict()
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    twin = copy.deepcopy(model)
    records = {}
    for m, mod in ((model, method), (twin, fresh)):
        torch.manual_seed(3)
        records[mod] = []
        run_stage(m, mod, 2, 4, TASKS[2], record=records[mod])
    assert [float(v) for *_, v, _ in records[method]] == [float(v) for *_, v, _ in records[fresh]]
    assert float(records[fresh][-1][2]) > 0
    after, after_fresh = method.state_dict(), fresh.state_dict()
    assert all(torch.equal(after[k], after_fresh[k]) for k in after)
    assert not torch.equal(after["fisher.lm_head.weight"], state["fisher.lm_head.weight"])  # stage 2 consolidated
    fresh.save(tmp_path)
    loaded = EWC.load(tmp_path / "ewc.safetensors", twin, lam=0.5)
    assert all(torch.equal(loaded.state_dict()[k], after_fresh[k]) for k in after_fresh)
    with pytest.raises(ForgetlabError, match="does not fit"):
        bad = online_ewc()
        bad.load_state_dict({k: t for k, t in state.items() if k != "fisher.lm_head.weight"})
        begin_stage(tiny_llama(), bad, 2, 4, TASKS[2])


# ----------------------------------------------------------------------------- options and checks

@pytest.mark.parametrize("method, key, value, flag", [
    ("o-lora", "o-lora.lambda1", -1.0, "--o-lora.lambda1"),
    ("o-lora", "o-lora.lambda2", -0.1, "--o-lora.lambda2"),
    ("online-ewc", "online-ewc.gamma", 2.0, "--online-ewc.gamma"),
    ("online-ewc", "online-ewc.gamma", -0.5, "--online-ewc.gamma"),
    ("online-ewc", "online-ewc.lambda", -1.0, "--online-ewc.lambda"),
    ("online-ewc", "online-ewc.fisher-samples", 0, "--online-ewc.fisher-samples"),
    ("online-ewc", "online-ewc.fisher-estimator", "exact", "--online-ewc.fisher-estimator")])
def test_stream_methods_refuse_bad_options_naming_the_flag(method, key, value, flag):
    with pytest.raises(ForgetlabError, match=flag.replace(".", r"\.")):
        methods.get_method(method, {key: value})


def test_stream_methods_refuse_fsdp_where_their_state_is_not_sharded():
    model = tiny_llama()
    for name, values in (("o-lora", {}), ("online-ewc", {})):
        methods.get_method(name, values).check(model, RunContext(**{**vars(context(0, 1, [])), "fsdp": True}))
        with pytest.raises(ForgetlabError, match="--fsdp"):
            methods.get_method(name, values).check(model, RunContext(**{**vars(context(0, 3, [])), "fsdp": True}))
    with pytest.raises(ForgetlabError, match="--fsdp"):
        o_lora(**{"o-lora.lambda2": 0.1}).check(model, RunContext(**{**vars(context(0, 1, [])), "fsdp": True}))


# ----------------------------------------------------------------------------- ties / dare across stages

@pytest.mark.parametrize("name, values", [("ties", {"ties.density": 0.5, "ties.across-stages": True}),
                                          ("dare", {"dare.drop": 0.5, "dare.across-stages": True})])
def test_a_merge_across_stages_merges_every_stage_s_task_vector_once_after_the_last(name, values):
    from methods.dare import dare
    from methods.ties import ties_merge

    torch.manual_seed(0)
    model, method = tiny_llama(), methods.get_method(name, values)
    start, ends = weights(model), []
    for stage in range(3):
        begin_stage(model, method, stage, 3, TASKS[stage])
        steps(model, method, TASKS[stage])
        ends.append(weights(model))  # the stage's end, before the method's finish
        method.finish(model)
        if stage < 2:  # earlier stages stay unmerged: the next one trains on from where this one ended
            assert all(torch.equal(p, ends[-1][n]) for n, p in model.named_parameters())
    for i, (n, p) in enumerate(model.named_parameters()):
        taus = [ends[0][n] - start[n], ends[1][n] - ends[0][n], ends[2][n] - ends[1][n]]
        if name == "ties":
            expected = start[n] + ties_merge(taus, 0.5)
        else:
            masks = [torch.Generator().manual_seed(i + k * 1_000_000_007) for k in range(3)]  # the last stage's seed 0
            expected = start[n] + sum(dare(t, 0.5, g) for t, g in zip(taus, masks))
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6, msg=n)


def test_a_merge_across_stages_survives_a_fresh_instance_between_stages():
    torch.manual_seed(0)
    values = {"ties.density": 0.5, "ties.across-stages": True}
    model, method = tiny_llama(), methods.get_method("ties", values)
    run_stage(model, method, 0, 2, TASKS[0])
    resumed_model, resumed = copy.deepcopy(model), methods.get_method("ties", values)
    resumed.load_state_dict({k: t.clone() for k, t in method.state_dict().items()})  # what a snapshot restores
    for m, meth in ((model, method), (resumed_model, resumed)):
        torch.manual_seed(1)
        run_stage(m, meth, 1, 2, TASKS[1])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_a_merge_across_stages_is_refused_in_a_single_fine_tune():
    method = methods.get_method("ties", {"ties.across-stages": True})
    with pytest.raises(ForgetlabError, match="--ties.across-stages: for a task stream"):
        method.check(tiny_llama(), context(0, 1, TASKS[0]))


# ----------------------------------------------------------------------------- a-gem's episodic memory

def test_a_gem_s_episodic_memory_holds_only_the_earlier_tasks_examples_and_survives_a_fresh_instance():
    values = {"a-gem.source": "earlier-tasks", "a-gem.memory": 3}
    torch.manual_seed(0)
    model, method = tiny_llama(), methods.get_method("a-gem", values)
    begin_stage(model, method, 0, 3, TASKS[0])
    assert method.batches == []  # the first task has nothing before it
    model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).backward()
    before = [p.grad.clone() for p in model.parameters()]
    assert method.add_gradient(model, 0) is None and all(torch.equal(a, p.grad) for a, p in zip(before,
                                                                                               model.parameters()))
    model.zero_grad()
    method.finish(model)
    for stage in (1, 2):
        fresh = methods.get_method("a-gem", values)
        fresh.load_state_dict({k: t.clone() for k, t in method.state_dict().items()})  # a resumed stream's
        for m in (method, fresh):
            begin_stage(model, m, stage, 3, TASKS[stage])
        assert method.episodic == fresh.episodic and len(method.episodic) == 3 * (stage + 1)
        remembered = [e["input_ids"] for b in method.batches for e in unbatch(b)]
        assert len(remembered) == 3 * stage  # 3 of each earlier task, and none of this stage's
        assert all(tuple(ids) in {tuple(e["input_ids"]) for t in range(stage) for e in TASKS[t]} for ids in remembered)


def unbatch(batch) -> list[dict]:
    """The examples of a collated batch, pads stripped."""
    return [dict(input_ids=ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_a_gem_s_earlier_task_memory_is_refused_in_a_single_fine_tune():
    method = methods.get_method("a-gem", {"a-gem.source": "earlier-tasks"})
    with pytest.raises(ForgetlabError, match="--a-gem.source earlier-tasks: for a task stream"):
        method.check(tiny_llama(), context(0, 1, TASKS[0]))
