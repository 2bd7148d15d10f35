"""The study (scripts/study.py, run by sweep.py --protocol): the selection rule, the protocol's checks, the report
rebuilt byte for byte from records alone, and one real protocol run on tiny models."""
import json
import re
import shutil
from pathlib import Path

import pytest

from errors import ForgetlabError
from scripts import study, study_report, sweep

FIXTURE = Path(__file__).parent / "fixtures" / "study"
RESULTS = Path(__file__).resolve().parent.parent / "results" / "study"
PROTOCOL = dict(train_flags=["--eval", "quick"], methods={"full": {"lr": ["1e-4", "2e-4", "4e-4"]},
                                                          "ewc": {"ewc.lambda": ["1", "10", "100"]}},
                seeds=[0, 1], selection=dict(rule="least-forgetting-above-gain", gain="recall_gain",
                                             forgetting="forgetting", reference="full", fraction=0.9))


def dev_row(method, params, gain, forgetting, seed=0):
    return dict(method=method, params=params, seed=seed, recall_gain=gain, forgetting=forgetting)


def test_selection_picks_the_least_forgetting_among_settings_with_enough_gain():
    rows = [dev_row("full", {"lr": "1e-4"}, 0.50, 0.01), dev_row("full", {"lr": "2e-4"}, 0.95, 0.08),
            dev_row("full", {"lr": "4e-4"}, 1.00, 0.30),  # the best gain: the bar is 0.9 x 1.00
            dev_row("ewc", {"ewc.lambda": "1"}, 0.99, 0.20), dev_row("ewc", {"ewc.lambda": "10"}, 0.90, 0.05),
            dev_row("ewc", {"ewc.lambda": "100"}, 0.40, 0.00),  # the least forgetting, but too little gain
            dev_row("ewc", {"ewc.lambda": "10"}, 5.0, -1.0, seed=1)]  # another seed: not read
    chosen = study.select(PROTOCOL, rows)
    assert chosen["full"]["params"] == {"lr": "2e-4"} and chosen["full"]["qualified"]
    assert chosen["ewc"]["params"] == {"ewc.lambda": "10"} and chosen["ewc"]["qualified"]
    assert "recall_gain >= 0.9000" in chosen["ewc"]["reason"]


def test_selection_takes_the_largest_gain_when_no_setting_reaches_the_bar_and_waits_for_missing_runs():
    rows = [dev_row("full", {"lr": "1e-4"}, 0.5, 0.0), dev_row("full", {"lr": "2e-4"}, 1.0, 0.1),
            dev_row("full", {"lr": "4e-4"}, 1.0, 0.1),  # a tie: the earlier setting
            dev_row("ewc", {"ewc.lambda": "1"}, 0.6, 0.0), dev_row("ewc", {"ewc.lambda": "10"}, 0.7, 0.3),
            dev_row("ewc", {"ewc.lambda": "100"}, 0.2, 0.0)]
    chosen = study.select(PROTOCOL, rows)
    assert chosen["full"]["params"] == {"lr": "2e-4"}
    assert chosen["ewc"]["params"] == {"ewc.lambda": "10"} and not chosen["ewc"]["qualified"]
    assert study.select(PROTOCOL, rows[:-1]).keys() == {"full"}  # ewc's grid is not complete yet
    assert study.select(PROTOCOL, rows[1:]) == {}  # nor is the reference's: no bar yet


def test_a_protocol_with_unequal_grids_or_a_per_run_flag_is_refused():
    study.check_protocol(PROTOCOL, "p.json")
    unequal = dict(PROTOCOL, methods={"full": {"lr": ["1e-4", "2e-4"]}, "ewc": {"ewc.lambda": ["1"]}})
    with pytest.raises(ForgetlabError, match="same number of settings, here full 2, ewc 1"):
        study.check_protocol(unequal, "p.json")
    with pytest.raises(ForgetlabError, match="may not set --seed"):
        study.check_protocol(dict(PROTOCOL, train_flags=["--seed", "3"]), "p.json")
    with pytest.raises(ForgetlabError, match="'lora.r' is not a key ewc reads"):
        study.check_protocol(dict(PROTOCOL, methods={"full": {"lr": ["1"]}, "ewc": {"lora.r": ["4"]}}), "p.json",
                             sweep.grid_keys)


@pytest.mark.parametrize("change, message", [
    (dict(methods={"full": {"lr": ["1e-4"]}, "nope": {"lr": ["1e-4"]}}), "protocol.json: --method 'nope' is unknown"),
    (dict(train_flags=["--epochs", "0"]), "--epochs must be >= 1"),
    (dict(methods={"full": {"lr": ["1e-4"]}, "ewc": {"lora.r": ["4"]}}), "'lora.r' is not a key ewc reads")])
def test_a_bad_protocol_fails_before_any_run(tmp_path, monkeypatch, change, message):
    monkeypatch.setattr(sweep, "run_train", lambda *a: pytest.fail("a run started"))
    file = tmp_path / "protocol.json"
    file.write_text(json.dumps({**PROTOCOL, **change}))
    with pytest.raises(ForgetlabError, match=re.escape(message)):
        sweep.main(["--protocol", str(file), "--results", str(tmp_path / "results")])


def test_a_results_directory_takes_an_amendment_that_only_adds_methods_or_controls():
    added = dict(PROTOCOL, methods={**PROTOCOL["methods"], "replay": {"replay-fraction": ["0.1", "0.2", "0.4"]}},
                 controls={"l2": {"method": "l2-init", "like": "ewc"}}, description="amended")
    assert study.amendment_error(PROTOCOL, added) is None and study.amendment_error(PROTOCOL, PROTOCOL) is None
    regrid = dict(PROTOCOL, methods={**PROTOCOL["methods"], "ewc": {"ewc.lambda": ["1", "10", "1000"]}})
    assert "methods ewc changed or removed" in study.amendment_error(PROTOCOL, regrid)
    assert "methods full changed or removed" in study.amendment_error(
        PROTOCOL, dict(PROTOCOL, methods={"ewc": PROTOCOL["methods"]["ewc"]}))
    assert "controls l2 changed" in study.amendment_error(added, dict(added, controls={}))
    assert "seeds differ" in study.amendment_error(PROTOCOL, dict(PROTOCOL, seeds=[0, 1, 2]))


def test_two_evaluations_of_the_base_model_are_compared_item_by_item():
    a = {"ppl": [{"id": "t:1", "nll": 2.5, "tokens": 10}, {"id": "t:2", "nll": 3.0, "tokens": 4}],
         "general_qa": [{"id": "q:1", "correct": True}]}
    assert study.differences(a, a) == (3, 0, 0.0)
    b = {"ppl": [{"id": "t:1", "nll": 2.5, "tokens": 10}, {"id": "t:2", "nll": 3.25, "tokens": 4}],
         "general_qa": [{"id": "q:1", "correct": False}, {"id": "q:2", "correct": True}]}
    assert study.differences(a, b) == (4, 3, 0.25)  # t:2's nll, q:1's answer, and q:2 found in b only


def test_a_later_sitting_adds_the_tasks_base_json_lacks_and_keeps_the_items_it_has():
    saved = dict(weights_sha256="w", eval="study", items={"ppl": [{"id": "t:1", "nll": 2.5, "tokens": 10}]})
    again = dict(weights_sha256="w", eval="study", items={"ppl": [{"id": "t:1", "nll": 2.75, "tokens": 10}],
                                                          "instructions": [{"id": "i:1", "passed": True}]})
    kept, compared, added = study.later_base(saved, again)
    assert added == ["instructions"] and compared == (1, 1, 0.25)  # the new task is not a difference
    assert kept["items"] == {"ppl": saved["items"]["ppl"], "instructions": again["items"]["instructions"]}
    assert study.later_base(saved, saved) == (saved, (1, 0, 0.0), [])
    with pytest.raises(ForgetlabError, match="other weights"):
        study.later_base(saved, dict(again, weights_sha256="v"))


def test_controls_take_the_setting_chosen_for_the_method_they_control():
    protocol = dict(PROTOCOL, controls={"l2": {"method": "l2-init", "like": "ewc",
                                               "rename": {"ewc.lambda": "l2-init.lambda"}},
                                        "true": {"method": "ewc", "like": "ewc",
                                                 "params": {"ewc.fisher-estimator": "true"}}})
    groups = study.test_groups(protocol, {"full": {"params": {"lr": "2e-4"}}, "ewc": {"params": {"ewc.lambda": "10"}}})
    assert groups == [("full", "full", {"lr": "2e-4"}, None), ("ewc", "ewc", {"ewc.lambda": "10"}, None),
                      ("l2", "l2-init", {"l2-init.lambda": "10"}, None),
                      ("true", "ewc", {"ewc.lambda": "10", "ewc.fisher-estimator": "true"}, None)]


def rebuild(source: Path, tmp_path: Path) -> Path:
    """A copy of a results directory's inputs (protocol, base, runs), its report rebuilt there."""
    copy = tmp_path / "results"
    copy.mkdir()
    for name in ("protocol.json", "base.json"):
        shutil.copyfile(source / name, copy / name)
    shutil.copytree(source / "runs", copy / "runs")
    sweep.main(["--report", str(copy)])
    return copy


def test_the_report_is_rebuilt_byte_for_byte_from_the_records_alone(tmp_path):
    copy = rebuild(FIXTURE, tmp_path)
    for name in ("study.md", "study.csv"):
        assert (copy / name).read_bytes() == (FIXTURE / name).read_bytes(), name


def test_the_report_numbers_are_the_items_weighted_means(tmp_path):
    """One cell recomputed by hand from the fixture's items: ewc λ=1, seed 0, dev recall gain."""
    base = json.loads((FIXTURE / "base.json").read_text())["items"]["domain_recall"]
    run = json.loads((FIXTURE / "runs" / "ewc-lambda1-seed0.json").read_text())["items"]["domain_recall"]

    def nll(items):
        dev = [it for it in items if it["split"] == "dev"]
        return sum(it["nll"] * it["tokens"] for it in dev) / sum(it["tokens"] for it in dev)

    line = next(x for x in (FIXTURE / "study.md").read_text().splitlines() if x.startswith("| ewc | ewc.lambda=1 |"))
    assert line.split("|")[3].strip() == f"{nll(base) - nll(run):+.4f}"


@pytest.mark.skipif(not (RESULTS / "protocol.json").is_file(), reason="no committed study in results/study")
def test_the_committed_study_report_is_what_its_records_give(tmp_path):
    copy = rebuild(RESULTS, tmp_path)
    for name in ("study.md", "study.csv"):
        assert (copy / name).read_bytes() == (RESULTS / name).read_bytes(), name


@pytest.mark.skipif(not (RESULTS / "study.md").is_file(), reason="no committed study in results/study")
def test_every_table_row_of_the_study_readme_is_in_the_study_report():
    readme = (RESULTS / "README.md").read_text()
    report = (RESULTS / "study.md").read_text().splitlines()
    rows = [x for x in readme.splitlines() if x.startswith("| ") and not x.startswith("| method")
            and not x.startswith("| difference")]
    assert rows, "results/study/README.md has no table"
    assert [x for x in rows if x not in report] == []


def test_a_protocol_runs_dev_then_the_chosen_setting_with_every_seed_and_resumes(tmp_path, smollm_dir, capsys):
    # Eight tiny-model runs, two at a time (about 50 s here).
    model = sweep.quick_model(tmp_path)
    protocol = dict(PROTOCOL, train_flags=["--eval", "quick", "--max-steps", "2", "--batch-size", "4",
                                           "--max-len", "128", "--model", str(model), "--diagnostics", "none"],
                    methods={"full": {"lr": ["1e-4", "1e-3"]}, "l2-init": {"l2-init.lambda": ["0.1", "10"]}},
                    controls={"again": {"method": "l2-init", "like": "l2-init"},  # the very runs of l2-init
                              "anew": {"method": "l2-init", "like": "l2-init", "own_runs": True}})  # made again
    file = tmp_path / "protocol.json"
    file.write_text(json.dumps(protocol))
    results, out = tmp_path / "results", tmp_path / "runs"
    argv = ["--protocol", str(file), "--results", str(results), "--out", str(out), "--jobs", "2"]
    sweep.main(argv)
    records = sorted(p.name for p in (results / "runs").glob("*.json"))
    started = [line for line in capsys.readouterr().err.splitlines() if line.endswith(": running")]
    assert len(started) == len(set(started)) == 8  # each run once, "again"'s shared with l2-init, "anew"'s its own
    chosen = study.select(protocol, [r for r in study_report.rows_of(*study.read_results_dir(results))
                                     if r["split"] == "dev"])
    assert len(records) == 8 and set(chosen) == {"full", "l2-init"}
    for method, c in chosen.items():
        for seed in (0, 1):
            assert sweep.Run(method, c["params"], seed).name + ".json" in records
    anew = [json.loads((results / "runs" / f"anew-seed{s}.json").read_text()) for s in (0, 1)]
    assert all(r["control"] == "anew" and r["params"] == chosen["l2-init"]["params"] for r in anew)
    md = (results / "study.md").read_text()  # each group reads its own two runs
    assert re.search(r"^\| again \| .* \| 2 \|", md, re.M) and re.search(r"^\| anew \| .* \| 2 \|", md, re.M)
    record = json.loads((results / "runs" / records[0]).read_text())
    assert {it["split"] for it in record["items"]["domain_recall"]} == {"dev", "test"}  # one pass, both halves
    assert "prompt" not in record["items"]["domain_recall"][0] and record["cpu_s"] > 0
    assert json.loads((results / "base.json").read_text())["eval"] == "quick"
    later_log = (out / "logs" / f"{sweep.Run('full', {'lr': '1e-3'}, 0).name}.log").read_text()
    assert "[before] evaluation (quick, all split) read back from" in later_log  # the base model evaluated once
    assert (results / "study.md").is_file() and (results / "study.csv").is_file()

    mtimes = {p: p.stat().st_mtime for p in (results / "runs").glob("*.json")}
    sweep.main(argv)  # resumed: every record is there, nothing runs again
    assert {p: p.stat().st_mtime for p in (results / "runs").glob("*.json")} == mtimes
    (out / "before.json").unlink()  # a later sitting on a fresh machine: the base model is evaluated again
    (results / "runs" / records[-1]).unlink()
    capsys.readouterr()
    sweep.main(argv)
    assert re.search(r"base model evaluated again in this sitting: 0 of \d+ items differ", capsys.readouterr().err)
    protocol["seeds"] = [0, 1, 2]
    file.write_text(json.dumps(protocol))
    with pytest.raises(ForgetlabError, match="holds another protocol's runs"):
        sweep.main(argv)


def test_a_study_on_one_s_own_data_reports_the_held_out_gain(tmp_path):
    """The fixture's records with domain_heldout items added (a study on one's own --data): the tables and the
    csv gain heldout_gain, the held-out NLL before − after, token-weighted (checked by hand on one dev cell)."""
    copy = tmp_path / "own"
    shutil.copytree(FIXTURE, copy)
    for f in (copy / "study.md", copy / "study.csv"):
        f.unlink()

    def held(shift):
        return [{"id": f"mine.jsonl:{i}", "split": "dev" if i % 2 else "test",
                 "nll": 2.0 + 0.1 * i - shift * (1 + i % 3), "tokens": 10 + i} for i in range(6)]

    base = json.loads((copy / "base.json").read_text())
    base["items"]["domain_heldout"] = held(0.0)
    (copy / "base.json").write_text(json.dumps(base))
    for i, f in enumerate(sorted((copy / "runs").glob("*.json"))):
        r = json.loads(f.read_text())
        r["items"]["domain_heldout"] = held(0.05 * (i + 1))
        f.write_text(json.dumps(r))
    sweep.main(["--report", str(copy)])
    md = (copy / "study.md").read_text()
    header = next(x for x in md.splitlines() if x.startswith("| method | setting | recall_gain"))
    assert header.split("|")[-3].strip() == "heldout_gain"
    first = sorted((copy / "runs").glob("*.json"))[0]
    r = json.loads(first.read_text())
    dev_b = [it for it in base["items"]["domain_heldout"] if it["split"] == "dev"]
    dev_a = [it for it in r["items"]["domain_heldout"] if it["split"] == "dev"]
    nll = lambda items: sum(it["nll"] * it["tokens"] for it in items) / sum(it["tokens"] for it in items)  # noqa: E731
    label = " ".join(f"{k}={v}" for k, v in r["params"].items())
    line = next(x for x in md.splitlines() if x.startswith(f"| {r['method']} | {label} |"))
    assert line.split("|")[-3].strip() == f"{nll(dev_b) - nll(dev_a):+.4f}"
    assert "heldout_gain" in (copy / "study.csv").read_text().splitlines()[0]


def test_the_report_ranks_the_runs_kl_against_their_forgetting_once_records_have_it(tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(FIXTURE, copy)
    protocol, base, runs = study.read_results_dir(copy)
    test_rows = [r for r in study_report.rows_of(protocol, base, runs) if r["split"] == "test"]
    for row in test_rows:  # a KL that orders the runs exactly as their general-text forgetting does
        record = copy / "runs" / f"{sweep.Run(row['method'], row['params'], row['seed']).name}.json"
        data = json.loads(record.read_text())
        data["kl_to_base"] = dict(kl=10 + 100 * row["forgetting"], kl_ci=[0, 1], n=32)
        record.write_text(json.dumps(data))
    assert "Does the KL" not in (FIXTURE / "study.md").read_text()  # records without the KL: no section
    sweep.main(["--report", str(copy)])
    text = (copy / "study.md").read_text()
    assert f"over the {len(test_rows)} runs whose records have the KL" in text
    assert "| forgetting | +1.00 [+1.00, +1.00] | more KL, more forgetting |" in text


def test_the_instruction_following_column_appears_where_runs_have_it_and_is_the_pass_rate_change(tmp_path):
    """The fixture's records, some with instruction-following items (the study level has them since its third
    amendment): the forgetting tables gain the column, each run's value its test pass rate after − before, and
    the runs without the items show none."""
    copy = tmp_path / "study"
    shutil.copytree(FIXTURE, copy)

    def checks(passed):
        return [{"id": f"if:{i}", "split": "dev" if i % 2 else "test", "passed": p} for i, p in enumerate(passed)]

    base = json.loads((copy / "base.json").read_text())
    base["items"]["instructions"] = checks([True, True, False, False, True, False])  # test: items 0, 2, 4
    (copy / "base.json").write_text(json.dumps(base))
    files = sorted((copy / "runs").glob("*.json"))
    for f in files[:-1]:  # the last run predates the column
        r = json.loads(f.read_text())
        r["items"]["instructions"] = checks([True, False, True, False, True, False])  # test pass rate 3/3 vs 2/3
        f.write_text(json.dumps(r))
    sweep.main(["--report", str(copy)])
    md = (copy / "study.md").read_text()
    header = next(x for x in md.splitlines() if x.startswith("| method | setting | seeds | forgetting"))
    assert header.split("|")[-2].strip() == "instructions"
    rows = [r for r in study_report.rows_of(*study.read_results_dir(copy)) if r["split"] == "test"]
    assert [r["instructions"] for r in rows].count(None) == 1
    assert {round(r["instructions"], 6) for r in rows if r["instructions"] is not None} == {round(1 / 3, 6)}
    assert "instructions" in (copy / "study.csv").read_text().splitlines()[0]
    assert "instructions" not in (FIXTURE / "study.md").read_text()  # records without it: no column


def test_a_verdict_leaves_out_a_quantity_its_runs_did_not_measure(tmp_path):
    """Instruction following only in one method's records (the third amendment's runs beside the older ones):
    that method's verdict covers it, the others' verdicts say nothing about it rather than 'not enough runs'."""
    copy = tmp_path / "study"
    shutil.copytree(FIXTURE, copy)
    checks = [{"id": f"if:{i}", "split": "test", "passed": i % 2 == 0} for i in range(6)]
    base = json.loads((copy / "base.json").read_text())
    base["items"]["instructions"] = checks
    (copy / "base.json").write_text(json.dumps(base))
    records = {f: json.loads(f.read_text()) for f in sorted((copy / "runs").glob("*.json"))}
    measured = next(r["method"] for r in records.values() if r["method"] != "full")
    for f, r in records.items():
        if r["method"] == measured:
            r["items"]["instructions"] = [dict(c, passed=True) for c in checks]
            f.write_text(json.dumps(r))
    sweep.main(["--report", str(copy)])
    verdicts = [x for x in (copy / "study.md").read_text().split("## Verdicts on the test split")[1].splitlines()
                if x.startswith("- ")]
    assert [x.split(":")[0] for x in verdicts if "instructions:" in x] == [f"- {measured}"]
    assert len(verdicts) > 1 and not any("not enough runs" in x for x in verdicts)


def test_the_ranking_gives_each_method_its_per_item_change_and_a_rank_interval(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(FIXTURE, source)
    tokens = {it["id"]: it["tokens"] for items in json.loads((source / "base.json").read_text())["items"].values()
              for it in items if "tokens" in it}
    for f in (source / "runs").glob("*.json"):  # as in real runs, an item's reference has the same tokens after
        r = json.loads(f.read_text())
        for it in (it for items in r["items"].values() for it in items if "tokens" in it):
            it["tokens"] = tokens[it["id"]]
        f.write_text(json.dumps(r))
    copy = rebuild(source, tmp_path)
    md = (copy / "study.md").read_text().splitlines()
    start = md.index("## Ranking on the test split")
    header = next(x for x in md[start:] if x.startswith("| method | seeds |"))
    rows = [x for x in md[md.index(header) + 2:] if x.startswith("|")]
    section = md.index("## Test, per item: the change averaged over seeds, paired by item")
    section = md[section:next(i for i in range(section + 1, len(md)) if md[i].startswith("## "))]
    per_item = {x.split("|")[1].strip(): x for x in section if x.startswith("| ")}
    columns = [c.strip() for c in header.split("|")[3:-1]]
    assert {r.split("|")[1].strip() for r in rows} == {"full", "ewc", "l2-init-at-ewc-lambda"}
    item_header = [c.strip() for c in per_item["method"].split("|")[1:-1]]
    for row in rows:
        name, cells = row.split("|")[1].strip(), [c.strip() for c in row.split("|")[3:-1]]
        for column, cell in zip(columns, cells):
            value, rank = cell.split(", ")
            expected = per_item[name].split("|")[1:-1][item_header.index(column)].split(" [")[0].strip()
            assert value == expected, (name, column)  # the same seed-averaged per-item change
            r, interval = rank.split(" [")
            lo, hi = (float(x) for x in interval.rstrip("]").split("–"))
            assert 1 <= lo <= float(r) <= hi <= 3


def test_a_committed_study_run_made_again_later_gives_the_same_quantities():
    """results/study/reproduced: full at lr 5e-4, seed 0, trained and evaluated again with the code of the third
    amendment (fused AdamW, the packed evaluation): every item's score within 0.001 of the committed record's and
    every quantity of both splits equal to 4 decimals, so the amendment's runs compare with the committed ones."""
    again = json.loads((RESULTS / "reproduced" / "full-lr5e-4-seed0.json").read_text())
    committed = json.loads((RESULTS / "runs" / "full-lr5e-4-seed0.json").read_text())
    base = json.loads((RESULTS / "base.json").read_text())["items"]
    n, _, largest = study.differences(committed["items"], again["items"])
    assert n == 1022 and largest < 1e-3
    assert study.differences(base, again["base_items"])[2] < 1e-4  # the base model's evaluation, again
    for split in study.SPLITS:
        a, b = study.quantities(committed["items"], base, split), study.quantities(again["items"], base, split)
        assert {k: v if v is None else round(v, 4) for k, v in a.items()} == \
            {k: v if v is None else round(v, 4) for k, v in b.items()}
