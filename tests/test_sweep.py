"""scripts/sweep.py: the grid, resuming, the summary tables and the plot, and one real --quick sweep."""
import csv
import json

import pytest

from errors import ForgetlabError
from scripts import sweep, sweep_report

try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def test_grid_applies_each_axis_only_to_the_methods_that_read_it():
    methods = ["full", "lora", "ewc", "ewc-lora", "replay"]
    axes = sweep.parse_grid(["lr=1e-4", "lora.r=4,16", "ewc.lambda=10,100,1000"], methods)
    runs = sweep.expand_grid(methods, [0, 1], axes)
    by_method = {m: [r for r in runs if r.method == m] for m in methods}
    assert [len(v) for v in by_method.values()] == [2, 4, 6, 12, 2]  # ewc-lora reads lora.* and ewc.*
    assert by_method["full"][0].params == {"lr": "1e-4"}
    assert by_method["lora"][2].name == "lora-lr1e-4-r16-seed0"
    assert by_method["lora"][2].params_label == "lr=1e-4,lora.r=16"
    assert by_method["ewc"][0].train_flags() == ["--method", "ewc", "--seed", "0", "--lr", "1e-4",
                                                 "--ewc.lambda", "10"]
    assert len({r.name for r in runs}) == len(runs)


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 0.5), (2.0, 1.0), (1.5, 1.2), (0.5, 0.1), (2.0, 1.1)]  # (gain, forgetting)
    assert sweep_report.pareto_front(pts) == [(0.5, 0.1), (1.0, 0.5), (2.0, 1.0)]


def fake_results(gain: float, forgetting: float) -> dict:
    before = dict(domain_recall=dict(accuracy=0.1, nll=2.0), domain_unseen=dict(accuracy=0.1, nll=2.5),
                  ppl=dict(nll=3.0), general_qa=dict(accuracy=0.5))
    after = dict(domain_recall=dict(accuracy=0.3, nll=2.0 - gain), domain_unseen=dict(accuracy=0.1, nll=2.4),
                 ppl=dict(nll=3.0 + forgetting), general_qa=dict(accuracy=0.4), instructions=dict(pass_rate=0.75))
    return dict(training=dict(tokens=1000, total_seconds=60.0), before=before, after=after)


def write_run(out, name, results, argv=None):
    (out / name).mkdir(parents=True)
    (out / name / "results.json").write_text(json.dumps(results))
    if argv is not None:  # the record run_all writes: the grid point, then the train.py flags
        value = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
        params = {"lr": value("--lr")} if "--lr" in argv else {}
        record = dict(method=value("--method"), params=params, seed=int(value("--seed")), argv=argv, wall_s=70.0,
                      peak_rss_mb=512.0)
        (out / name / "sweep.json").write_text(json.dumps(record))


def refuse_to_train(*args, **kwargs):
    raise AssertionError("a finished run was trained again")


def test_finished_runs_are_skipped_and_summarised_as_mean_and_interval_over_seeds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "run_train", refuse_to_train)
    for seed, (gain, forgetting) in enumerate([(0.4, 0.10), (0.6, 0.30)]):
        write_run(tmp_path, f"full-seed{seed}", fake_results(gain, forgetting),
                  ["--method", "full", "--seed", str(seed), "--out", str(tmp_path / f"full-seed{seed}")])
    write_run(tmp_path, "ewc-lambda100-seed0", fake_results(0.2, 0.01))  # no sweep.json: made by hand
    write_run(tmp_path, "ewc-lambda100-seed1", fake_results(0.3, 0.03))
    sweep.main(["--methods", "full,ewc", "--seeds", "0,1", "--grid", "ewc.lambda=100", "--out", str(tmp_path)])

    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert list(rows[0]) == sweep.COLUMNS
    assert [(r["method"], r["params"], r["seed"]) for r in rows] == [
        ("full", "", "0"), ("full", "", "1"), ("ewc", "ewc.lambda=100", "0"), ("ewc", "ewc.lambda=100", "1")]
    assert float(rows[1]["recall_gain"]) == pytest.approx(0.6)
    assert float(rows[1]["unseen_gain"]) == pytest.approx(0.1)
    assert float(rows[1]["forgetting"]) == pytest.approx(0.3)
    assert float(rows[0]["qa_drop"]) == pytest.approx(0.1)
    assert rows[0]["wall_s"] == "70" and rows[0]["peak_mem_mb"] == "512"  # from sweep.json
    assert rows[2]["wall_s"] == "60" and rows[2]["peak_mem_mb"] == ""  # from results.json alone

    md = (tmp_path / "sweep.md").read_text()
    full = next(line for line in md.splitlines() if line.startswith("| full |"))
    cells = [c.strip() for c in full.strip("|").split("|")]
    header = [c.strip() for c in md.splitlines()[4].strip("|").split("|")]
    assert header == ["method", "params", "seeds", *sweep.METRICS]
    col = dict(zip(header, cells))
    assert col["seeds"] == "2"
    # mean 0.5, sample std 0.2/sqrt(2), t(0.975, 1 df) = 12.706: 0.5 ± 12.706 * 0.1414 / sqrt(2) = 0.5 ± 1.2706
    assert col["recall_gain"] == "0.5000 [-0.7706, 1.7706]"
    assert col["instructions"] == "0.750 [0.750, 0.750]"
    assert "| ewc | ewc.lambda=100 | 2 |" in md
    assert (tmp_path / "sweep.png").is_file() == HAVE_MATPLOTLIB
    if not HAVE_MATPLOTLIB:
        assert "matplotlib is not installed" in capsys.readouterr().err


def test_runs_of_an_earlier_grid_in_the_same_directory_join_the_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "run_train", refuse_to_train)
    write_run(tmp_path, "full-seed0", fake_results(0.4, 0.1),
              ["--method", "full", "--seed", "0", "--out", str(tmp_path / "full-seed0")])
    write_run(tmp_path, "lora-lr3e-3-seed1", fake_results(0.3, 0.05),
              ["--method", "lora", "--seed", "1", "--lr", "3e-3", "--eval", "quick",
               "--out", str(tmp_path / "lora-lr3e-3-seed1")])
    write_run(tmp_path, "by-hand", fake_results(0.9, 0.9))  # no sweep.json: not a sweep's run, left out
    sweep.main(["--methods", "full", "--seeds", "0", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(r["method"], r["params"], r["seed"], r["run"]) for r in rows] == [
        ("full", "", "0", "full-seed0"), ("lora", "lr=3e-3", "1", "lora-lr3e-3-seed1")]
    assert "| lora | lr=3e-3 | 1 |" in (tmp_path / "sweep.md").read_text()


def test_resuming_a_run_with_other_train_flags_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "run_train", refuse_to_train)
    write_run(tmp_path, "full-seed0", fake_results(0.1, 0.1),
              ["--method", "full", "--seed", "0", "--out", str(tmp_path / "full-seed0")])
    with pytest.raises(ForgetlabError, match="finished with other train flags"):
        sweep.main(["--methods", "full", "--seeds", "0", "--out", str(tmp_path), "--epochs", "1"])
    moved = tmp_path.rename(tmp_path.with_name(tmp_path.name + "-moved"))
    sweep.main(["--methods", "full", "--seeds", "0", "--out", str(moved)])  # same flags, another place: resumes


def test_failed_run_is_reported_after_the_others_are_tabulated(tmp_path, monkeypatch):
    write_run(tmp_path, "full-seed0", fake_results(0.1, 0.1))
    monkeypatch.setattr(sweep, "run_train", lambda argv, log, env: (log.write_text("boom\n"), (1, 0.1, 10.0, 0.1))[1])
    with pytest.raises(ForgetlabError, match=r"1 of 2 runs failed \(full-seed1\)"):
        sweep.main(["--methods", "full", "--seeds", "0,1", "--out", str(tmp_path)])
    assert len(list(csv.DictReader((tmp_path / "sweep.csv").open()))) == 1
    assert not (tmp_path / "full-seed1" / "sweep.json").exists()


def test_bad_grid_arguments_fail_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "run_train", refuse_to_train)
    for argv, message in [(["--methods", "full,nope"], "nope"),
                          (["--grid", "ewc.lambda=1,x"], "'x' is not a number"),
                          (["--grid", "lora.r=4.5"], "'4.5' is not an integer"),
                          (["--grid", "kl.beta=1"], "KEY one of"),  # no method of the grid reads it
                          (["--grid", "lr"], "expected KEY=V1,V2"),
                          (["--seed", "3"], "--seed is set by the sweep")]:
        with pytest.raises(ForgetlabError, match=message):
            sweep.main([*argv, "--out", str(tmp_path)])


def test_quick_sweep_trains_tiny_models_and_writes_the_three_files(tmp_path, smollm_dir):
    # One run (about 15 s here): tabulating several methods and seeds is tested above on written results.
    argv = ["--quick", "--methods", "ewc", "--seeds", "0", "--out", str(tmp_path)]
    sweep.main(argv)
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert list(rows[0]) == sweep.COLUMNS
    assert [r["method"] for r in rows] == ["ewc"]
    for r in rows:
        for k in ("recall_acc", "recall_nll", "unseen_acc", "unseen_nll", "general_qa_acc", "general_nll", "tokens",
                  "wall_s", "peak_mem_mb", "recall_gain", "unseen_gain", "forgetting"):
            assert r[k] != "", (k, r)
        assert float(r["general_nll"]) > 5  # a random model over a 49k vocabulary: close to ln(49152) = 10.8
        assert int(r["tokens"]) > 0 and float(r["peak_mem_mb"]) > 50
    assert "| ewc | (preset) | 1 |" in (tmp_path / "sweep.md").read_text()
    assert (tmp_path / "sweep.png").is_file() == HAVE_MATPLOTLIB
    assert json.loads((tmp_path / "ewc-seed0" / "sweep.json").read_text())["argv"][:4] == ["--method", "ewc",
                                                                                          "--seed", "0"]
    mtime = (tmp_path / "ewc-seed0" / "results.json").stat().st_mtime
    sweep.main(argv)  # resumed: nothing left to train
    assert (tmp_path / "ewc-seed0" / "results.json").stat().st_mtime == mtime


def test_a_baseline_adds_each_run_s_paired_comparison_to_sweep_md(tmp_path, smollm_dir):
    argv = ["--quick", "--methods", "full,lora", "--seeds", "0", "--baseline", "full", "--out", str(tmp_path)]
    sweep.main(argv)
    md = (tmp_path / "sweep.md").read_text()
    assert "## Against full, paired by item (same seed)" in md
    rows = [x for x in md.splitlines() if x.startswith("| lora-seed0 |")]
    assert any("ppl nll" in r for r in rows) and all(r.split("|")[-2].strip() in (
        "mine better", "mine worse", "no detectable difference") for r in rows)
    lora = json.loads((tmp_path / "lora-seed0" / "results.json").read_text())
    assert lora["training"]["before_read_from"]  # the base model was evaluated once, by the first run
    with pytest.raises(ForgetlabError, match="--baseline ewc: not one of --methods"):
        sweep.main(["--quick", "--methods", "full,lora", "--baseline", "ewc", "--out", str(tmp_path / "x")])
