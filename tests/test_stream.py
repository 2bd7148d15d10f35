"""stream.py: a stream of classification tasks trained one after another on a tiny model, its records, its
resume after a kill, the replay buffer, and bad input refused in one line before anything slow."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stream
import stream_outputs
from tests.tiny import sigkill_when
from errors import ForgetlabError
from tasks.classification import ClassificationTask, encode_prompt, load_benchmark, resolve_order

REPO = Path(__file__).resolve().parents[1]
LABELS = {"colors": ["red", "blue", "green"], "animals": ["cat", "dog"], "moods": ["happy", "sad", "calm", "angry"]}


def write_benchmark(root: Path, n_train: int = 12, n_test: int = 6) -> Path:
    """A benchmark folder like ../shared/data/cl/cl500: tasks.json, orders.json and three tasks' rows."""
    rng = random.Random(0)
    spec = {name: dict(label_set=labels, instruction=f"Which {name[:-1]} is it? Choose one from the option.\n")
            for name, labels in LABELS.items()}
    (root / "tasks.json").write_text(json.dumps({"tasks": spec}))
    (root / "orders.json").write_text(json.dumps({"order1": {"tasks": list(LABELS)}}))
    for name, labels in LABELS.items():
        (root / name).mkdir()
        for split, n in (("train", n_train), ("test", n_test)):
            rows = []
            for i in range(n):
                label = labels[i % len(labels)]
                words = " ".join(rng.choice(["the", "a", "one", "some", "this"]) for _ in range(rng.randint(3, 9)))
                rows.append(dict(id=f"{name}-{split}-{i:05d}", task=name, input=f"{words} {label} {words}",
                                 label=label, choices=labels, split=split))
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def bench(tmp_path):
    root = tmp_path / "bench"
    root.mkdir()
    return write_benchmark(root)


def stream_args(tiny_dir, bench, out, *extra):
    return ["--model", tiny_dir, "--benchmark", str(bench), "--out", str(out), "--general-eval", "none",
            "--batch-size", "4", "--max-steps", "3", "--eval-batch-size", "8", "--diagnostics", "none", *extra]


def final_weights(out) -> dict:
    return load_file(Path(out) / "model" / "model.safetensors")


def stage_records(out) -> list:
    """Every stage's per-item evaluation records and training losses: what a resumed stream must reproduce."""
    out = Path(out)
    records = []
    for d in sorted(out.glob("stage-*")):
        ev = json.loads((d / "eval.json").read_text())
        items = {t: r["items"] for t, r in ev["tasks"].items()}
        losses = [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] \
            if (d / "metrics.jsonl").exists() else []
        records.append((d.name, items, losses))
    return records


# ----------------------------------------------------------------------------- the prompt and the tasks

def test_the_prompt_is_the_papers_template_and_the_loss_is_on_the_answer_only(smollm_dir):
    from model.tokenizer import Tokenizer
    from tasks.classification import answer_ids, tokenize_rows

    tok = Tokenizer.from_dir(smollm_dir)
    task = ClassificationTask("agnews", ("World", "Sports"), "What is the topic? Choose one from the option.\n",
                              Path("."))
    prompt, cut = encode_prompt(tok, task, "Stocks fell.", 256)
    assert tok.decode(prompt) == "What is the topic? Choose one from the option.\nOption: World, Sports \n" \
                                 "Stocks fell.\nAnswer:" and not cut
    [example], n_cut = tokenize_rows(tok, task, [dict(input="Stocks fell.", label="Sports")], 256)
    answer = [t for t, y in zip(example["input_ids"], example["labels"]) if y != -100]
    assert tok.decode(answer, skip_special_tokens=False) == " Sports" + tok.decode(tok.eos_ids[:1], False)
    assert example["input_ids"][:len(prompt)] == prompt and n_cut == 0
    long_prompt, cut = encode_prompt(tok, task, "word " * 500, 64)  # the input is cut, never the tail
    longest = max(len(answer_ids(tok, c)) for c in task.label_set)
    assert cut and len(long_prompt) + longest == 64 and tok.decode(long_prompt).endswith("\nAnswer:")


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "cl" / "cl500").is_dir(),
                    reason="../shared/data/cl/cl500 is not on this machine")
def test_the_cl500_prompts_equal_the_template_of_tasks_json(smollm_dir):
    """tasks.json's prompt_template, filled in as the papers' scripts do, is the text our tokens decode to."""
    from model.tokenizer import Tokenizer
    from tasks.classification import load_rows

    tok = Tokenizer.from_dir(smollm_dir)
    folder = REPO.parent / "shared" / "data" / "cl" / "cl500"
    spec = json.loads((folder / "tasks.json").read_text())["tasks"]
    tasks = load_benchmark(folder)
    assert resolve_order("1", folder, tasks) == ("order1", ["dbpedia", "amazon", "yahoo", "agnews"])
    for name in ("dbpedia", "amazon", "yahoo", "agnews", "COPA"):
        row = load_rows(tasks[name], "test", 1)[0]
        template = spec[name]["prompt_template"].replace("\\n", "\n").replace('{", ".join(label_set)}', "{options}")
        text = template.format(instruction=spec[name]["instruction"] or "", options=", ".join(spec[name]["label_set"]),
                               input=row["input"])
        assert tok.decode(encode_prompt(tok, tasks[name], row["input"], 4096)[0]) == text, name


def test_loglik_scoring_picks_the_label_a_full_forward_scores_highest(tiny_dir, bench):
    """score_classification against a brute-force log p(answer | prompt) from one plain forward per label."""
    from model import load_pretrained
    from tasks.classification import answer_ids, load_rows, score_classification

    model, tok = load_pretrained(tiny_dir)
    task = load_benchmark(bench)["moods"]
    rows = load_rows(task, "test")
    items = score_classification(model, tok, task, rows, 128)
    for row, item in zip(rows, items, strict=True):
        prompt = encode_prompt(tok, task, row["input"], 128)[0]
        brute = []
        for label in task.label_set:
            ans = answer_ids(tok, label)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ans]))[0].float()
            lp = torch.log_softmax(logits, -1)
            brute.append(sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(ans)))
        assert item["logprobs"] == pytest.approx(brute, abs=1e-3)
        assert item["pred"] == task.label_set[max(range(len(brute)), key=brute.__getitem__)]
        assert item["correct"] == (item["pred"] == row["label"])


# ----------------------------------------------------------------------------- a whole stream

def test_a_three_task_stream_writes_the_matrix_and_a_report_rebuilt_byte_for_byte(tiny_dir, bench, tmp_path):
    out = tmp_path / "s"
    results = stream.main(stream_args(tiny_dir, bench, out, "--order", "1", "--method", "lora"))
    m = results["metrics"]
    assert results["tasks"] == list(LABELS) and len(m["R"]) == 4 and all(len(r) == 3 for r in m["R"])
    assert m["bwt"] is not None and m["fwt"] is not None and len(m["bwt_ci"]) == 2
    for i, row in enumerate(m["R"]):  # R is the stages' own per-item accuracies
        ev = json.loads((out / f"stage-{i}" / "eval.json").read_text())
        assert row == [sum(it["correct"] for it in ev["tasks"][t]["items"]) / 6 for t in LABELS]
    assert [json.loads((out / f"stage-{k}" / "train.json").read_text())["steps"] for k in (1, 2, 3)] == [3, 3, 3]
    assert (out / "matrix.csv").read_text().splitlines()[0] == "stage,colors,animals,moods"
    assert not (out / "state").exists() and (out / "model" / "model.safetensors").is_file()
    before = {f: (out / f).read_bytes() for f in ("results.json", "matrix.csv", "matrix.png", "report.md")}
    for f in before:
        (out / f).unlink()
    stream_outputs.rebuild(out)
    assert {f: (out / f).read_bytes() for f in before} == before
    assert "## Accuracy matrix" in before["report.md"].decode()


def test_joint_training_is_one_stage_on_every_task_with_only_the_average_accuracy(tiny_dir, bench, tmp_path):
    results = stream.main(stream_args(tiny_dir, bench, tmp_path / "j", "--order", "1", "--joint"))
    config = json.loads((tmp_path / "j" / "config.json").read_text())
    assert [s["task"] for s in config["stages"]] == ["joint"] and config["stages"][0]["examples"] == 36
    assert len(results["metrics"]["R"]) == 2 and results["metrics"]["bwt"] is None


def test_the_replay_buffer_holds_n_examples_of_each_earlier_task(tiny_dir, bench):
    from model import load_pretrained

    _, tok = load_pretrained(tiny_dir)
    scfg, cfg, method = stream.parse_stream_config(stream_args(tiny_dir, bench, "unused", "--order", "1",
                                                               "--replay", "4"))
    tasks, _, names = stream.load_stream_tasks(scfg)
    stages, _, _ = stream.tokenize_stream(tok, cfg, scfg, method, tasks, names)
    own = [d.domain for _, d in stages]
    for k, (task, data) in enumerate(stages):
        replayed = [data.train_set[i] for i in data.replayed]
        assert data.train_set[:len(own[k])] == own[k] and len(replayed) == 4 * k
        for j in range(k):  # task j's buffer: the same 4 of its examples at every later stage, drawn with seed + j
            buffer = replayed[4 * j:4 * (j + 1)]
            assert buffer == random.Random(cfg.seed + j).sample(own[j], 4)
            assert {e["task"] for e in buffer} == {names[j]}


def test_a_plugin_written_for_one_fine_tune_sees_each_stage(tiny_dir, bench, tmp_path):
    plugin = tmp_path / "stage_log.py"
    log = tmp_path / "stages.jsonl"
    plugin.write_text(
        "import json\nfrom methods import Method, register\n\n"
        "@register('stage-log')\nclass StageLog(Method):\n"
        "    def setup(self, model, run):\n"
        f"        open({str(log)!r}, 'a').write(json.dumps([run.stage, run.stages, run.task, len(run.domain)]) + '\\n')\n")
    stream.main(stream_args(tiny_dir, bench, tmp_path / "p", "--order", "colors,moods", "--method-file", str(plugin),
                            "--method", "stage-log"))
    assert [json.loads(x) for x in log.read_text().splitlines()] == [[0, 2, "colors", 12], [1, 2, "moods", 12]]


# ----------------------------------------------------------------------------- resume

def test_a_stream_killed_mid_stage_resumes_bit_for_bit(tiny_dir, bench, tmp_path):
    """o-lora with dropout: the resumed stream must restore the stage snapshot (folded weights, the earlier
    adapters), then the stage's checkpoint (adapter, AdamW, data position, RNG), or the weights differ."""
    flags = ["--order", "1", "--method", "o-lora", "--lora.dropout", "0.3", "--save-every", "1", "--max-steps", "4"]
    stream.main(stream_args(tiny_dir, bench, tmp_path / "a", *flags))
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(REPO / "stream.py"), *stream_args(tiny_dir, bench, out, *flags)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    sigkill_when(proc, out / "stage-2" / "checkpoints" / "step-2")
    assert (out / "state" / "stage-1").is_dir() and not (out / "stage-3").exists()
    stream.main(stream_args(tiny_dir, bench, out, *flags, "--resume"))
    a, b = final_weights(tmp_path / "a"), final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert stage_records(out) == stage_records(tmp_path / "a")
    assert load_file(out / "olora.safetensors").keys() == load_file(tmp_path / "a" / "olora.safetensors").keys()


def test_a_stream_stopped_between_stages_resumes_from_the_snapshot(tiny_dir, bench, tmp_path, monkeypatch):
    flags = ["--order", "colors,animals", "--method", "online-ewc", "--online-ewc.fisher-samples", "4"]
    stream.main(stream_args(tiny_dir, bench, tmp_path / "a", *flags))
    calls = []
    real = stream.evaluate_stage

    def stopped_after_stage_1(*args):
        calls.append(1)
        if len(calls) == 1:  # stage 1's: stage 0's is read from the evaluation cache stream "a" filled
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(stream, "evaluate_stage", stopped_after_stage_1)
    with pytest.raises(KeyboardInterrupt):
        stream.main(stream_args(tiny_dir, bench, tmp_path / "b", *flags))
    monkeypatch.setattr(stream, "evaluate_stage", real)
    assert (tmp_path / "b" / "state" / "stage-1").is_dir() and not (tmp_path / "b" / "stage-1" / "eval.json").exists()
    assert json.loads((tmp_path / "b" / "stage-0" / "eval.json").read_text())["cached"]
    stream.main(stream_args(tiny_dir, bench, tmp_path / "b", *flags, "--resume"))
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert stage_records(tmp_path / "b") == stage_records(tmp_path / "a")
    with pytest.raises(ForgetlabError, match="finished"):
        stream.main(stream_args(tiny_dir, bench, tmp_path / "b", *flags, "--resume"))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case, expected", [
    (["--order", "colors,planets"], "unknown task 'planets'"),
    (["--order", "9"], "neither a task nor an order"),
    (["--order", "colors,colors"], "appears twice"),
    (["--order", "1", "--data", "x.jsonl"], "--data: not a stream flag"),
    (["--order", "1", "--realign-steps", "2"], "--realign-steps: not a stream flag"),
    (["--order", "1", "--joint", "--replay", "2"], "--replay with --joint"),
    (["--order", "1", "--method", "self-replay"], "rewrites --replay-fraction"),
    (["--order", "1", "--max-len", "8"], "too short for task"),
])
def test_bad_stream_input_is_one_line_before_anything_is_written(tiny_dir, bench, tmp_path, case, expected):
    out = tmp_path / "never"
    with pytest.raises(ForgetlabError, match=expected.replace("(", r"\(")):
        stream.main(stream_args(tiny_dir, bench, out, *case))
    assert not out.exists()


def test_a_label_outside_the_label_set_is_named_by_file_and_line(tiny_dir, bench, tmp_path):
    rows = (bench / "animals" / "test.jsonl").read_text().splitlines()
    rows[2] = rows[2].replace('"label": "cat"', '"label": "horse"')
    (bench / "animals" / "test.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, str(REPO / "stream.py"), *stream_args(tiny_dir, bench, out, "--order", "1")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bench / 'animals' / 'test.jsonl'}:3: label 'horse' is not in the task's label set" in proc.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- scripts/streams.py

def test_a_stream_grid_copies_each_run_s_records_and_rebuilds_its_report_from_them(tiny_dir, bench, tmp_path):
    from scripts import streams

    protocol = dict(description="tiny", benchmark=str(bench), orders=["1"], seeds=[0],
                    stream_flags=["--model", tiny_dir, "--general-eval", "none", "--batch-size", "4", "--max-steps", "1"],
                    methods={"seq-lora": {"flags": ["--method", "lora"]},
                             "joint": {"flags": ["--method", "full", "--joint"], "seeds": [0, 1]}})
    (tmp_path / "p.json").write_text(json.dumps(protocol))
    results = tmp_path / "results"
    streams.main(["--protocol", str(tmp_path / "p.json"), "--results", str(results), "--work", str(tmp_path / "w")])
    runs = sorted(p.name for p in (results / "runs").iterdir())
    assert runs == ["joint-order1-seed0", "joint-order1-seed1", "seq-lora-order1-seed0"]
    assert not (results / "runs" / "seq-lora-order1-seed0" / "model").exists()  # records only
    assert (results / "runs" / "seq-lora-order1-seed0" / "stage-3" / "eval.json").is_file()
    report = (results / "report.md").read_text()
    assert "| seq-lora | 1 |" in report and "| joint | 2 |" in report
    made = {f: (results / f).read_bytes() for f in ("report.md", "summary.csv", "summary.png")}
    for f in made:
        (results / f).unlink()
    streams.main(["--report", str(results)])
    assert {f: (results / f).read_bytes() for f in made} == made
    # started again, the grid runs nothing: every run is finished
    streams.main(["--protocol", str(tmp_path / "p.json"), "--results", str(results), "--work", str(tmp_path / "w")])
    assert sorted(p.name for p in (results / "runs").iterdir()) == runs


COMMITTED = REPO / "results" / "streams"


@pytest.mark.skipif(not (COMMITTED / "report.md").is_file(), reason="no committed streams in results/streams")
def test_the_committed_stream_reports_are_what_their_records_give(tmp_path):
    from scripts import streams

    copy = tmp_path / "streams"
    shutil.copytree(COMMITTED, copy)
    streams.main(["--report", str(copy)])
    for f in ("report.md", "summary.csv"):  # the figures' bytes depend on the machine's fonts: not compared
        assert (copy / f).read_bytes() == (COMMITTED / f).read_bytes(), f
    for run in sorted((copy / "runs").iterdir()):
        stream_outputs.rebuild(run)
        for f in ("results.json", "report.md", "matrix.csv"):
            assert (run / f).read_bytes() == (COMMITTED / "runs" / run.name / f).read_bytes(), (run.name, f)


STREAM_OPTIONS_FOR_TINY = {"freeze": ["--freeze.layers", "1"], "ewc": ["--ewc.fisher-samples", "4"],
                           "ewc-lora": ["--ewc.fisher-samples", "4"], "online-ewc": ["--online-ewc.fisher-samples", "4"],
                           "wise-ft": ["--wise-ft.lora"], "kl": ["--kl.lora"],
                           "sdft-rewrite": ["--sdft-rewrite.max-new-tokens", "4"],
                           "sdft-on-policy": ["--sdft-on-policy.max-new-tokens", "4"]}


@pytest.mark.parametrize("method", [m for m in __import__("methods").REGISTRY if m != "self-replay"])
def test_every_builtin_method_runs_a_two_task_stream(tiny_dir, bench, tmp_path, method):
    results = stream.main(stream_args(tiny_dir, bench, tmp_path / "s", "--order", "colors,animals", "--method", method,
                                      "--max-steps", "2", *STREAM_OPTIONS_FOR_TINY.get(method, []),
                                      *(["--sdft-rewrite.cache", str(tmp_path / "cache")]
                                        if method == "sdft-rewrite" else [])))
    assert len(results["metrics"]["R"]) == 3 and [s["steps"] for s in results["stages"]] == [2, 2]
    for k in (1, 2):
        losses = [json.loads(x)["loss"] for x in (tmp_path / "s" / f"stage-{k}" / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 2 and all(x == x for x in losses)  # finite (not NaN)


def test_a_failed_stream_does_not_stop_the_grid_and_is_named_at_the_end(tiny_dir, bench, tmp_path):
    from scripts import streams

    protocol = dict(benchmark=str(bench), orders=["colors,animals"], seeds=[0],
                    stream_flags=["--model", tiny_dir, "--general-eval", "none", "--batch-size", "4", "--max-steps", "1"],
                    methods={"broken": {"flags": ["--method", "no-such-method"]}, "seq-full": {"flags": []}})
    (tmp_path / "p.json").write_text(json.dumps(protocol))
    with pytest.raises(ForgetlabError, match=r"1 streams failed \(broken-ordercolors,animals-seed0\)"):
        streams.main(["--protocol", str(tmp_path / "p.json"), "--results", str(tmp_path / "r"),
                      "--work", str(tmp_path / "w")])
    assert (tmp_path / "r" / "runs" / "seq-full-ordercolors,animals-seed0" / "results.json").is_file()
    assert "| seq-full | 1 |" in (tmp_path / "r" / "report.md").read_text()


def test_each_stage_records_its_diagnostics_against_its_own_start_and_the_report_reads_them(tiny_dir, bench,
                                                                                            tmp_path):
    from diagnostics import update_geometry

    flags = ["--method", "full", "--max-steps", "2", "--lr", "1e-2", "--diagnostics", "all"]
    results = stream.main(stream_args(tiny_dir, bench, tmp_path / "s", "--order", "colors,animals", *flags))
    rows = results["diagnostics_by_stage"]
    assert [d["stage"] for d in rows] == [1, 2] and rows[0]["earlier_change"] is None
    R = results["metrics"]["R"]
    assert rows[1]["earlier_change"] == pytest.approx(R[2][0] - R[1][0])  # one task before stage 2
    recorded = [json.loads((tmp_path / "s" / f"stage-{k}" / "train.json").read_text())["diagnostics"] for k in (1, 2)]
    assert all(d["kl_to_base"]["kl"] > 0 for d in recorded)
    assert "## Diagnostics per stage" in (tmp_path / "s" / "report.md").read_text()
    # stage 2 against its start: the weights after stage 1, which a stream of colors alone ends with
    stream.main(stream_args(tiny_dir, bench, tmp_path / "one", "--order", "colors", *flags))
    start, end = final_weights(tmp_path / "one"), final_weights(tmp_path / "s")
    two_d = [n for n, t in end.items() if t.dim() == 2]
    expected = update_geometry({n: start[n] for n in two_d}, {n: end[n] for n in two_d})["matrices"]
    got = recorded[1]["update_geometry"]["matrices"]
    assert set(got) >= set(expected) and all(got[n]["norm"] == pytest.approx(expected[n]["norm"], rel=1e-5)
                                             for n in expected)


def test_the_grid_report_reads_each_stage_s_kl_against_the_forgetting_it_caused():
    from scripts import streams

    def run(*pairs):
        return dict(diagnostics_by_stage=[dict(kl=1.0, earlier_change=None)] +
                    [dict(kl=k, earlier_change=c) for k, c in pairs])
    runs = [("a", "m", run((1.0, -0.01), (3.0, -0.10))), ("b", "m", run((2.0, -0.05), (5.0, -0.30))),
            ("c", "m", run((0.5, 0.02), (4.0, -0.20)))]
    text = "\n".join(streams.kl_against_forgetting(runs))
    assert "over 6 stages of 3 runs" in text and "-1.00 [-1.00, -1.00], more KL, more forgetting" in text
    assert streams.kl_against_forgetting([("old", "m", {"metrics": {}})]) == []  # records without diagnostics


def test_the_grid_report_compares_each_method_with_the_baseline_and_further_pairs_on_the_same_items(tmp_path):
    from scripts import streams

    def write_run(name, order, finals):
        """A 2-task run: task x learnt at stage 1 (all 4 items right), its final verdicts `finals`; task y all right
        from stage 2 on."""
        verdicts = [([False] * 4, [False] * 4), ([True] * 4, [False] * 4), (finals, [True] * 4)]
        for i, (x, y) in enumerate(verdicts):
            stage = tmp_path / "runs" / name / f"stage-{i}"
            stage.mkdir(parents=True)
            tasks = {t: {"items": [dict(id=f"{t}{k}", correct=c) for k, c in enumerate(v)]} for t, v in (("x", x), ("y", y))}
            (stage / "eval.json").write_text(json.dumps({"tasks": tasks}))
        return (name, name.split("-")[0], dict(order=order, seed=0, joint=False, tasks=["x", "y"]))

    # on order 1 the method keeps 3 of task x's 4 items where the baseline keeps 1, on order 2 it keeps 4 against 2:
    # BWT differences +0.5 and +0.5, ACC differences +0.25 and +0.25
    runs = [write_run("m-o1", "1", [True, True, True, False]), write_run("base-o1", "1", [True, False, False, False]),
            write_run("m-o2", "2", [True] * 4), write_run("base-o2", "2", [True, True, False, False])]
    protocol = {"baseline": "base"}
    text = "\n".join(streams.paired_sections(protocol, streams.paired_rows(protocol, tmp_path, runs)))
    assert "| m − base | 2 | orders | 0.250 [0.250, 0.250] | 0.500 [0.500, 0.500] |" in text
    assert "- m − base (2 orders): ACC higher; BWT higher;" in text
    assert "further comparisons" not in text
    assert streams.paired_rows({}, tmp_path, runs) == []  # a protocol without a baseline or pairs
    # a further pair, the other way round, in its own section: the differences change sign
    protocol = {"compare": [["base", "m"]]}
    text = "\n".join(streams.paired_sections(protocol, streams.paired_rows(protocol, tmp_path, runs)))
    assert "## The protocol's further comparisons, paired" in text and "## Each method minus" not in text
    assert "| base − m | 2 | orders | -0.250 [-0.250, -0.250] | -0.500 [-0.500, -0.500] |" in text
    assert "- base − m (2 orders): ACC lower; BWT lower;" in text
    bad = dict(benchmark="b", orders=["1"], seeds=[0], stream_flags=[], methods={"m": {"flags": []}}, baseline="base")
    (tmp_path / "p.json").write_text(json.dumps(bad))
    with pytest.raises(ForgetlabError, match="baseline 'base' is not one of the methods"):
        streams.read_protocol(tmp_path / "p.json")
    methods = {"m": {"flags": []}, "n": {"flags": []}, "o": {"flags": []}, "joint": {"flags": ["--joint"]}}
    for baseline, pairs, error in (
            ("m", [["m", "x"]], "compare: 'x' is not one of the methods"), ("m", [["n", "n"]], "is not a pair"),
            ("m", [[["n"], "o"]], r"compare: \['n'\] is not one of the methods"),
            (["m"], [], r"baseline \['m'\] is not one of the methods"),
            ("joint", [], "baseline 'joint' trains jointly"), ("m", [["n", "joint"]], "'joint' trains jointly"),
            ("m", [["n", "m"]], r"\['n', 'm'\] is already compared"), ("m", [["m", "n"]], "already compared"),
            ("m", [["n", "o"], ["o", "n"]], r"\['o', 'n'\] is already compared")):
        (tmp_path / "p.json").write_text(json.dumps(dict(bad, methods=methods, baseline=baseline, compare=pairs)))
        with pytest.raises(ForgetlabError, match=error):
            streams.read_protocol(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps(dict(bad, methods=methods, baseline="m", compare=[["n", "o"]])))
    assert streams.read_protocol(tmp_path / "p.json")["compare"] == [["n", "o"]]


def test_the_committed_stream_with_stage_diagnostics_is_what_its_records_give(tmp_path):
    committed = REPO / "results" / "stream-diagnostics"
    copy = tmp_path / "run"
    shutil.copytree(committed, copy)
    stream_outputs.rebuild(copy)
    for f in ("results.json", "report.md", "matrix.csv"):
        assert (copy / f).read_bytes() == (committed / f).read_bytes(), f
    assert "## Diagnostics per stage" in (committed / "report.md").read_text()
