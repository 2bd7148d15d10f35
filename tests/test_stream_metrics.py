"""Tests for stream_metrics.py: the formulas against values worked out by hand (below), the bootstrap's pairing and
determinism, and the aggregation over runs against stats.mean_interval."""
import numpy as np
import pytest

import stats
from stream_metrics import (accuracy_matrix, across_runs, earlier_task_change, paired_difference, stream_metrics,
                            transfer_metrics)

# T = 3 tasks, rows: zero-shot, after task 0, after task 1, after task 2. Task 0 is best after task 1 (0.9), not
# right after its own training (0.8), so forgetting's max differs from BWT's "just after training".
R3 = [[0.2, 0.3, 0.4],
      [0.8, 0.35, 0.45],
      [0.9, 0.7, 0.5],
      [0.6, 0.5, 0.8]]
# ACC = (0.6 + 0.5 + 0.8)/3                         = 1.9/3 = 0.633333
# LA  = (R[1][0] + R[2][1] + R[3][2])/3 = (0.8 + 0.7 + 0.8)/3 = 2.3/3 = 0.766667
# BWT = ((0.6 − 0.8) + (0.5 − 0.7))/2               = −0.2
# FWT = ((R[1][1] − R[0][1]) + (R[2][2] − R[0][2]))/2 = ((0.35 − 0.3) + (0.5 − 0.4))/2 = 0.075
# F_0 = max(R[1][0], R[2][0]) − R[3][0] = 0.9 − 0.6 = 0.3  (right after training it would be 0.8 − 0.6 = 0.2)
# F_1 = max(R[2][1]) − R[3][1]          = 0.7 − 0.5 = 0.2
# F   = (0.3 + 0.2)/2                   = 0.25


def _booleans(R, n):
    """Per-item verdicts with exactly R[i][j]·n correct, the first ones."""
    return [[[k < round(r * n) for k in range(n)] for r in row] for row in R]


def _width(ci):
    return ci[1] - ci[0]


# ---------------------------------------------------------------- formulas
def test_transfer_metrics_match_hand_computed_values():
    m = transfer_metrics(R3)
    assert m["acc"] == pytest.approx(1.9 / 3)
    assert m["learning_acc"] == pytest.approx(2.3 / 3)
    assert m["bwt"] == pytest.approx(-0.2)
    assert m["fwt"] == pytest.approx(0.075)
    assert m["forgetting_per_task"][:2] == pytest.approx([0.3, 0.2])
    assert m["forgetting_per_task"][2] is None
    assert m["forgetting"] == pytest.approx(0.25)


def test_forgetting_takes_the_max_over_stages_after_training_not_before():
    # task 1 is at 0.9 zero-shot, trained at stage 2 down to 0.6, final 0.5: F_1 = 0.6 − 0.5 = 0.1, not 0.9 − 0.5
    R = [[0.5, 0.9, 0.5],
         [0.8, 0.7, 0.5],
         [0.7, 0.6, 0.5],
         [0.7, 0.5, 0.9]]
    # F_0 = max(0.8, 0.7) − 0.7 = 0.1 (here the max is right after training)
    assert transfer_metrics(R)["forgetting_per_task"] == pytest.approx([0.1, 0.1, None])


def test_each_stage_s_change_of_the_earlier_tasks_matches_hand_computed_values():
    # stage 2 (row 2) on task 0: 0.9 − 0.8 = +0.1; stage 3 on tasks 0, 1: ((0.6 − 0.9) + (0.5 − 0.7))/2 = −0.25
    changes = earlier_task_change(_booleans(R3, 20), n_boot=500)
    assert [c["stage"] for c in changes] == [2, 3]
    assert [c["change"] for c in changes] == pytest.approx([0.1, -0.25])
    assert all(lo <= c["change"] <= hi for c in changes for lo, hi in [c["change_ci"]])
    assert earlier_task_change(_booleans([[0.2], [0.8]], 20)) == []  # one task: nothing before it


def test_accuracy_matrix_from_booleans():
    correct = [[[True, False, True, True], [False, False]],
               [[True, True, True, True], [True, False]],
               [[False, False, False, True], [True, True]]]
    assert accuracy_matrix(correct) == [[0.75, 0.0], [1.0, 0.5], [0.25, 1.0]]


def test_single_task_has_no_transfer_or_forgetting():
    m = transfer_metrics([[0.3], [0.7]])
    assert m["acc"] == pytest.approx(0.7) and m["learning_acc"] == pytest.approx(0.7)
    assert m["bwt"] is None and m["fwt"] is None and m["forgetting"] is None
    assert m["forgetting_per_task"] == [None]
    s = stream_metrics(_booleans([[0.3], [0.7]], 10), n_boot=200)
    assert s["bwt_ci"] is None and s["fwt_ci"] is None and s["forgetting_ci"] is None
    assert s["forgetting_per_task_ci"] == [None]
    assert s["acc_ci"] is not None


def test_joint_run_has_two_rows_and_only_acc():
    R = [[0.2, 0.3, 0.4], [0.6, 0.5, 0.7]]
    m = transfer_metrics(R, joint=True)
    assert m["acc"] == pytest.approx(0.6)
    assert m["bwt"] is m["fwt"] is m["forgetting"] is m["learning_acc"] is None
    assert m["forgetting_per_task"] == [None, None, None]
    s = stream_metrics(_booleans(R, 10), n_boot=200, joint=True)
    assert s["acc"] == pytest.approx(0.6) and s["acc_ci"][0] <= 0.6 <= s["acc_ci"][1]
    assert s["learning_acc_ci"] is None and s["forgetting_per_task_ci"] == [None, None, None]


def test_row_count_must_fit_the_kind_of_run():
    with pytest.raises(ValueError, match="4"):
        transfer_metrics(R3[:2])  # 3 sequential tasks need 4 rows
    with pytest.raises(ValueError, match="joint"):
        transfer_metrics(R3, joint=True)


@pytest.mark.parametrize("correct,message", [
    ([[[True, False]], [[True]]], "different number of items"),
    ([[[True, False]]], "at least 2 stages"),
    ([[[True], []], [[True], []]], "task 1 has no items"),
    ([[[True], [False]], [[True]]], "stage 1 has 1 tasks"),
    ([[[0.5]], [[1]]], "booleans"),
])
def test_ragged_input_is_refused(correct, message):
    with pytest.raises(ValueError, match=message):
        accuracy_matrix(correct)
    with pytest.raises(ValueError, match=message):
        stream_metrics(correct, n_boot=10)


# ---------------------------------------------------------------- the bootstrap of one run
@pytest.fixture(scope="module")
def random_stream():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.2, 0.9, size=(4, 3))
    return (rng.random((4, 3, 40)) < p[..., None]).tolist()  # 4 stages × 3 tasks × 40 items


def test_point_estimates_are_the_plain_values_and_cells_have_wilson_intervals(random_stream):
    s = stream_metrics(random_stream, n_boot=200)
    R = accuracy_matrix(random_stream)
    assert s["R"] == R
    assert {k: s[k] for k in transfer_metrics(R)} == transfer_metrics(R)
    k = sum(random_stream[2][1])
    assert s["R_ci"][2][1] == list(stats.wilson_interval(k, 40))
    assert s["n_items"] == [40, 40, 40] and s["n_boot"] == 200


def test_bootstrap_intervals_contain_the_point_estimates(random_stream):
    s = stream_metrics(random_stream)
    for key in ("acc", "bwt", "fwt", "forgetting", "learning_acc"):
        lo, hi = s[f"{key}_ci"]
        assert lo <= s[key] <= hi, key
    for f, (lo, hi) in zip(s["forgetting_per_task"][:2], s["forgetting_per_task_ci"][:2]):
        assert lo <= f <= hi
    assert s["forgetting_per_task_ci"][2] is None


def test_bootstrap_is_deterministic_in_the_seed(random_stream):
    a, b = stream_metrics(random_stream, seed=3), stream_metrics(random_stream, seed=3)
    assert a == b
    assert stream_metrics(random_stream, seed=4)["bwt_ci"] != a["bwt_ci"]


def test_bootstrap_narrows_when_items_are_duplicated(random_stream):
    four_times = [[items * 4 for items in stage] for stage in random_stream]
    s, s4 = stream_metrics(random_stream), stream_metrics(four_times)
    assert s4["bwt"] == pytest.approx(s["bwt"])
    for key in ("acc", "bwt", "fwt", "learning_acc"):
        assert _width(s4[f"{key}_ci"]) < 0.7 * _width(s[f"{key}_ci"]), key  # about half: √4


def test_bootstrap_keeps_stages_paired_on_items():
    # T = 2; task 0's 20 items (half right) do exactly the same at stages 1 and 2: BWT = 0 on every resample that
    # keeps the pairing, while resampling the two stages' items independently gives a wide interval
    item = [k % 2 == 0 for k in range(20)]
    other = [k < 10 for k in range(20)]
    correct = [[item, other], [item, other], [item, [not x for x in other]]]
    s = stream_metrics(correct)
    assert s["bwt"] == 0.0 and s["bwt_ci"] == [0.0, 0.0]
    assert s["forgetting_per_task_ci"][0] == [0.0, 0.0]
    rng = np.random.default_rng(0)
    x = np.asarray(item, dtype=float)
    unpaired = x[rng.integers(0, 20, (2000, 20))].mean(1) - x[rng.integers(0, 20, (2000, 20))].mean(1)
    assert _width(np.quantile(unpaired, [0.025, 0.975])) > 0.3


# ---------------------------------------------------------------- over runs
def test_across_runs_is_the_mean_with_a_t_interval():
    runs = [dict(acc=0.6, bwt=-0.1, fwt=0.02, forgetting=0.12, learning_acc=0.7),
            dict(acc=0.65, bwt=-0.05, fwt=0.0, forgetting=0.08, learning_acc=0.72),
            dict(acc=0.58, bwt=None, fwt=0.01, forgetting=0.1, learning_acc=0.69)]
    out = across_runs(runs)
    mean, lo, hi = stats.mean_interval([0.6, 0.65, 0.58])
    assert out["acc"] == dict(value=mean, ci=[lo, hi], n=3)
    mean, lo, hi = stats.mean_interval([-0.1, -0.05])  # the None is skipped
    assert out["bwt"] == dict(value=mean, ci=[lo, hi], n=2)


def test_across_runs_of_one_run_has_no_interval():
    out = across_runs([dict(acc=0.6, bwt=None, fwt=None, forgetting=None, learning_acc=0.7)])
    assert out["acc"] == dict(value=0.6, ci=None, n=1)
    assert out["bwt"] == dict(value=None, ci=None, n=0)
    with pytest.raises(ValueError):
        across_runs([])


# ---------------------------------------------------------------- two methods, paired
# A second run on R3's tasks and items: task 0 kept better (final 0.8), task 1 learnt less (0.6 just after).
R3_B = [[0.2, 0.3, 0.4],
        [0.8, 0.35, 0.45],
        [0.85, 0.6, 0.5],
        [0.8, 0.55, 0.75]]
# against R3: ACC (0.8 + 0.55 + 0.75)/3 = 0.7 vs 0.633333 -> R3 − R3_B = −0.066667
#             BWT ((0.8 − 0.8) + (0.55 − 0.6))/2 = −0.025 vs −0.2 -> −0.175
#             LA  (0.8 + 0.6 + 0.75)/3 = 0.716667 vs 0.766667 -> +0.05


def test_paired_difference_matches_hand_computed_values():
    d = paired_difference([(_booleans(R3, 20), _booleans(R3_B, 20))], n_boot=200)
    assert d["acc"]["value"] == pytest.approx(1.9 / 3 - 0.7)
    assert d["bwt"]["value"] == pytest.approx(-0.175)
    assert d["learning_acc"]["value"] == pytest.approx(0.05)
    assert d["acc"]["ci_runs"] is None and d["acc"]["n"] == 1  # one pair: no interval over runs
    assert d["acc"]["ci_items"][0] <= d["acc"]["value"] <= d["acc"]["ci_items"][1]


def test_paired_difference_of_a_run_with_itself_is_exactly_zero_on_every_resample(random_stream):
    # the two runs draw the same items in every resample: a difference of identical runs cannot move
    d = paired_difference([(random_stream, random_stream)] * 2, n_boot=200)
    for key in ("acc", "bwt", "fwt", "forgetting", "learning_acc"):
        assert d[key]["value"] == 0.0
        assert d[key]["ci_items"] == [0.0, 0.0] and d[key]["ci_runs"] == [0.0, 0.0]


def test_paired_difference_over_pairs_is_their_mean_with_a_t_interval():
    a2 = [[0.1, 0.2, 0.3], [0.9, 0.2, 0.3], [0.8, 0.9, 0.3], [0.5, 0.6, 0.9]]
    pairs = [(_booleans(R3, 20), _booleans(R3_B, 20)), (_booleans(a2, 20), _booleans(R3_B, 20))]
    d = paired_difference(pairs, n_boot=200)
    per = [transfer_metrics(a)["bwt"] - transfer_metrics(R3_B)["bwt"] for a in (R3, a2)]
    assert d["bwt"]["per_pair"] == pytest.approx(per)
    mean, lo, hi = stats.mean_interval(per)
    assert d["bwt"]["value"] == pytest.approx(mean)
    assert d["bwt"]["ci_runs"] == pytest.approx([lo, hi])


def test_paired_difference_refuses_runs_on_different_items():
    with pytest.raises(ValueError, match="different numbers of items"):
        paired_difference([(_booleans(R3, 20), _booleans(R3_B, 10))])
