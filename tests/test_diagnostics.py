"""The update's geometry (diagnostics.py) against updates whose answer is known, and in a run's records."""
import json

import pytest
import torch

import train
from diagnostics import matrix_geometry
from tests.tiny import tiny_args


def svd(seed=0, shape=(64, 48)):
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return (w0, *torch.linalg.svd(w0, full_matrices=False))


def test_effective_rank_counts_the_directions_of_an_update():
    w0, u, s, vh = svd()
    rank_one = u[:, 20:21] @ vh[20:21] * 5
    assert matrix_geometry(w0, rank_one)["effective_rank"] == pytest.approx(1, abs=1e-4)
    four_equal = u[:, 10:14] @ vh[10:14]
    assert matrix_geometry(w0, four_equal)["effective_rank"] == pytest.approx(4, abs=1e-4)
    p = torch.tensor([3.0, 2.0, 1.0]) / 6  # σ = 3, 2, 1: exp(H(p))
    graded = u[:, 30:33] @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ vh[30:33]
    assert matrix_geometry(w0, graded)["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), abs=1e-4)


def test_overlap_is_the_share_of_the_update_in_the_base_weight_s_top_directions():
    w0, u, s, vh = svd()
    inside = u[:, :4] @ torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) @ vh[:4]
    outside = u[:, 16:] @ torch.randn(32, 32, generator=torch.Generator().manual_seed(2)) @ vh[16:]
    assert matrix_geometry(w0, inside)["overlap"] == pytest.approx(1, abs=1e-4)
    assert matrix_geometry(w0, outside)["overlap"] == pytest.approx(0, abs=1e-4)
    half = matrix_geometry(w0, inside / inside.norm() + outside / outside.norm())
    assert half["overlap"] == pytest.approx(0.5, abs=1e-3)
    noise = matrix_geometry(w0, torch.randn(64, 48, generator=torch.Generator().manual_seed(3)))
    assert noise["overlap_chance"] == 16 * 16 / (64 * 48) and abs(noise["overlap"] - noise["overlap_chance"]) < 0.03
    assert noise["relative"] == pytest.approx(float(torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
                                                    .norm() / w0.norm()))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_run_records_the_geometry_of_every_weight_it_changed(tiny_dir, tiny_data, tmp_path, method):
    out = tmp_path / "run"
    results = train.main(tiny_args(tiny_dir, tiny_data, out, "--method", method, "--max-steps", "2", "--lr", "1e-2",
                                   "--diagnostics", "all"))
    recorded = json.loads((out / "results.json").read_text())["diagnostics"]["update_geometry"]
    assert recorded == results["diagnostics"]["update_geometry"] and recorded["top_k"] == 16
    matrices = recorded["matrices"]
    assert "model.layers.1.mlp.down_proj.weight" in matrices and "model.embed_tokens.weight" in matrices
    changed = {n for n, g in matrices.items() if g["norm"] > 0}
    if method == "lora":  # only the adapted q and v projections move
        assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv"}
        assert all(matrices[n]["effective_rank"] <= 16 + 1e-6 for n in changed)
    else:
        assert len(changed) == len(matrices)
    assert "## The update's geometry" in (out / "report.md").read_text() and (out / "update_geometry.png").is_file()


# ----------------------------------------------------------------------------- KL to the base model

def test_kl_to_base_is_zero_for_the_base_itself_and_the_chain_rule_s_exact_value_on_average():
    from diagnostics import kl_to_base
    from tests.tiny import tiny_llama

    base, tuned = tiny_llama(std=0.3), tiny_llama(std=0.3)
    with torch.no_grad():
        for p, q in zip(tuned.parameters(), tiny_llama(seed=1, std=0.3).parameters()):
            p.lerp_(q, 0.3)  # a fine-tune: the base moved part of the way elsewhere
    x = [5, 9, 2]
    same = kl_to_base(base, tiny_llama(std=0.3), [x] * 4, stop_ids=[], pad_id=0, max_new_tokens=2)
    assert same["per_prompt"] == [0.0] * 4 and same["n"] == 4
    est = kl_to_base(tuned, base, [x] * 300, stop_ids=[], pad_id=0, max_new_tokens=2, seed=3)
    # exact KL of the two-token continuations: KL at the first position + E_{y1 ~ p0} KL at the second
    with torch.no_grad():
        lp0, lp = (m(torch.tensor([x]))[0, -1].log_softmax(-1) for m in (base, tuned))
        first = float((lp0.exp() * (lp0 - lp)).sum())
        ids = torch.tensor([x + [v] for v in range(lp0.numel())])
        lq0, lq = (m(ids)[:, -1].log_softmax(-1) for m in (base, tuned))
        second = float((lp0.exp() * (lq0.exp() * (lq0 - lq)).sum(-1)).sum())
    values = torch.tensor(est["per_prompt"])
    se = float(values.std() / len(values) ** 0.5)
    assert first + second > 0.05 and abs(est["kl"] - (first + second)) < 4 * se


def test_a_run_records_the_kl_to_its_base_on_its_training_prompts(tiny_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_dir, tiny_data, out, "--method", "full", "--max-steps", "2", "--lr", "1e-2",
                         "--diagnostics", "all"))
    kl = json.loads((out / "results.json").read_text())["diagnostics"]["kl_to_base"]
    assert kl["n"] == len(kl["per_prompt"]) >= 2 and kl["kl"] > 0 and kl["kl_ci"][0] <= kl["kl"] <= kl["kl_ci"][1]
    assert "## KL to the base model on the new task" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------- spurious forgetting

def test_realignment_is_evaluated_on_a_copy_and_leaves_the_run_s_model_and_after_alone(tiny_dir, tiny_data, tmp_path,
                                                                                       monkeypatch):
    import eval as ev

    monkeypatch.setitem(ev.LEVELS, "quick", {"general_qa": 2, "ppl": 2, "domain_recall": 2})

    def run(name, *extra):
        argv = tiny_args(tiny_dir, tiny_data, tmp_path / name, "--method", "full", "--max-steps", "2", "--lr", "1e-2",
                         *extra)
        argv[argv.index("--eval") + 1] = "quick"
        return train.main(argv)

    plain, realigned = run("plain"), run("realigned", "--realign-steps", "3")
    label = "re-aligned (3 steps on general data)"
    assert list(realigned["after_variants"]) == [label]
    assert realigned["after"]["ppl"]["nll"] == plain["after"]["ppl"]["nll"]  # the saved model is the run's own
    assert realigned["after_variants"][label]["after"]["ppl"]["nll"] != plain["after"]["ppl"]["nll"]
    assert f"## full {label}" in (tmp_path / "realigned" / "report.md").read_text()
    assert (tmp_path / "plain" / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "realigned" / "model" / "model.safetensors").read_bytes()


def test_realign_steps_needs_an_evaluation():
    from errors import ForgetlabError

    with pytest.raises(ForgetlabError, match="--realign-steps needs an evaluation"):
        train.parse_config(["--realign-steps", "2", "--eval", "none"])


def test_the_kl_prompts_are_the_tokens_before_the_answer_and_a_text_example_s_first_token():
    from diagnostics import task_prompts

    chat = dict(input_ids=[1, 2, 3, 4, 5], labels=[-100, -100, -100, 4, 5])
    text = dict(input_ids=[7, 8, 9], labels=[7, 8, 9])
    assert task_prompts([chat, text], seed=0) == [[1, 2, 3], [7]]
