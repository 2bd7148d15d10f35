"""The two toy demos reproduce the lesson's qualitative results."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from errors import ForgetlabError

from scripts import demo_single_weight as single
from scripts import demo_toy_forgetting as toy

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Thousands of tiny ops: a second intra-op thread only adds synchronisation (10x slower on a busy CPU).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_rows():
    return {m: toy.run(m) for m in toy.METHODS}


def test_plain_fine_tuning_forgets_task_a_by_a_large_ratio(toy_rows):
    plain = toy_rows["plain"]
    assert plain.ratio > 20, plain
    assert plain.loss_b_after < 0.5, "phase 2 must actually learn task B"


@pytest.mark.parametrize("method", toy.MITIGATIONS)
def test_each_mitigation_forgets_less_than_plain(toy_rows, method):
    assert toy_rows[method].ratio < toy_rows["plain"].ratio / 5, toy_rows[method]
    assert toy_rows[method].loss_a_before == toy_rows["plain"].loss_a_before  # the same phase 1 for every row


def test_freezing_the_shared_layer_leaves_task_a_exactly_untouched(toy_rows):
    assert toy_rows["freeze"].loss_a_after == toy_rows["freeze"].loss_a_before


def test_low_rank_update_alone_learns_b_and_forgets_a(toy_rows):
    # Rank 1 is enough to fit B, and nothing keeps the update off A's features: LoRA is no mitigation here.
    lora, plain = toy_rows["lora"], toy_rows["plain"]
    assert lora.ratio > 5
    assert lora.loss_b_after < 2 * plain.loss_b_after


def test_replay_and_ewc_keep_learning_task_b_unlike_low_lr(toy_rows):
    for method in ("replay", "ewc"):
        assert toy_rows[method].loss_b_after < toy_rows["low_lr"].loss_b_after / 10


def test_the_fisher_is_what_makes_ewc_beat_its_l2_init_control_on_both_tasks(toy_rows):
    ewc, l2 = toy_rows["ewc"], toy_rows["l2-init"]  # the same λ, F replaced by its mean
    assert ewc.loss_a_after < l2.loss_a_after / 3 and ewc.loss_b_after < l2.loss_b_after


def test_ewc_on_the_lora_update_removes_most_of_lora_forgetting(toy_rows):
    assert toy_rows["ewc-lora"].ratio < toy_rows["lora"].ratio / 100


def test_wise_ft_midpoint_forgets_less_than_plain_but_loses_task_b(toy_rows):
    wise, plain = toy_rows["wise-ft"], toy_rows["plain"]
    assert wise.ratio < plain.ratio / 2 and wise.loss_b_after > 10 * plain.loss_b_after


def test_mofo_at_fraction_1_is_plain_fine_tuning_and_sparser_updates_do_not_help_here(toy_rows):
    from dataclasses import replace

    every_entry, plain = toy.run("mofo", replace(toy.ToyConfig(), mofo_fraction=1.0)), toy_rows["plain"]
    assert every_entry.loss_a_after == pytest.approx(plain.loss_a_after, rel=1e-5)  # Adam, up to rounding
    assert every_entry.loss_b_after == pytest.approx(plain.loss_b_after, rel=1e-5)
    assert toy_rows["mofo"].ratio > toy_rows["plain"].ratio


def test_toy_demo_is_deterministic(toy_rows):
    assert toy.run("ewc") == toy_rows["ewc"]


def test_single_weight_fine_tuning_moves_w_from_a_to_b():
    trajectory = single.fine_tune(2.0, -1.0, lr=0.1, steps=50)
    assert trajectory[0] == 2.0
    assert abs(trajectory[-1] - (-1.0)) < 1e-3  # task A's loss went from 0 to (a - b)^2 = 9


def test_single_weight_ewc_descent_matches_closed_form_and_moves_toward_a():
    a, b = 2.0, -1.0
    rows = single.ewc_table(a, b, [0, 0.1, 1, 10, 100])
    for r in rows:
        assert abs(r.descent - r.closed_form) < 1e-3, r
    ws = [r.descent for r in rows]
    assert abs(ws[0] - b) < 1e-3
    assert all(w0 < w1 for w0, w1 in zip(ws, ws[1:])), ws  # monotonically from b toward a as lambda grows
    assert a - ws[-1] < 0.1
    assert abs(single.ewc_closed_form(a, b, 1.0) - 0.0) < 1e-12  # (2b + a) / 3 = 0


def test_toy_demo_cli_prints_its_table():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_toy_forgetting.py"), "--method", "plain"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| plain |" in out.stdout and "x |" in out.stdout


def test_single_weight_main_prints_both_tables(capsys):
    single.main(["--lambdas", "0,100"])
    out = capsys.readouterr().out
    assert "| 50 | -1.0000 |" in out  # plain fine-tuning ends at b
    assert "| 100 | 1.9412 | 1.9412 |" in out  # (2b + 100 a) / 102


def test_demos_reject_bad_arguments_with_forgetlab_errors():
    with pytest.raises(ForgetlabError, match="unknown toy method 'nope'"):
        toy.main(["--method", "nope"])
    with pytest.raises(ForgetlabError, match="lambda must be >= 0"):
        single.main(["--lambdas", "1,-1"])


def test_sparse_merges_of_a_tiny_layer_lose_task_b_and_keep_no_more_of_a(toy_rows):
    # ties (the largest 20% of the update) and dare (90% dropped): a 10 x 20 layer has no redundant entries
    plain = toy_rows["plain"]
    for method in ("ties", "dare"):
        assert toy_rows[method].ratio > plain.ratio / 5 and toy_rows[method].loss_b_after > 10 * plain.loss_b_after


def test_a_gem_forgets_less_than_plain_while_learning_b_as_well(toy_rows):
    agem, plain = toy_rows["a-gem"], toy_rows["plain"]
    assert agem.ratio < plain.ratio / 4 and agem.loss_b_after < 1.5 * plain.loss_b_after
