import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import methods
import train
import train_config
from data import batches_by_length, load_dataset, tokenize_dataset
from errors import ForgetlabError, run_cli
from model import load_model
from model.tokenizer import Tokenizer
from tests.tiny import DOMAIN, read_metrics, tiny_args, tiny_llama

REPO = Path(__file__).resolve().parent.parent
DRUG_RECALL = str(REPO / "data" / "domain_recall.jsonl")  # the drug domain's own evaluation, for tiny_data runs
# ----------------------------------------------------------------------------- pieces of the loop

def test_lr_schedule_values_at_chosen_steps():
    lr, w, n = 1e-3, 4, 24
    assert train.get_lr(0, lr, w, n, "cosine") == pytest.approx(lr / 5)  # warmup: lr (it+1)/(w+1)
    assert train.get_lr(3, lr, w, n, "cosine") == pytest.approx(lr * 4 / 5)
    assert train.get_lr(4, lr, w, n, "cosine") == pytest.approx(lr)  # peak right after warmup
    assert train.get_lr(14, lr, w, n, "cosine") == pytest.approx(lr / 2)  # halfway through the decay
    assert train.get_lr(9, lr, w, n, "cosine") == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 4)))
    assert train.get_lr(14, lr, w, n, "linear") == pytest.approx(lr / 2)
    assert train.get_lr(19, lr, w, n, "linear") == pytest.approx(lr / 4)
    assert train.get_lr(14, lr, w, n, "constant") == lr
    assert train.get_lr(n, lr, w, n, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert train.get_lr(0, lr, 0, n, "linear") == lr  # no warmup: the first step uses the peak


def test_weight_decay_applies_to_matrices_only_and_skips_frozen_parameters():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = train.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * 2 + 1  # two norms per layer, final norm
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable
    assert not any(p is model.model.embed_tokens.weight for p in decay["params"])


def test_gradient_accumulation_of_4x1_equals_one_batch_of_4():
    torch.manual_seed(0)
    lengths, n_prompt = [5, 9, 13, 7], [2, 4, 1, 3]  # different labelled-token counts per example
    examples = []
    for L, p in zip(lengths, n_prompt):
        ids = torch.randint(3, 101, (L,)).tolist()
        examples.append(dict(input_ids=ids, labels=[-100] * p + ids[p:]))
    big = batches_by_length(examples, 4, pad_id=0, shuffle=False)
    small = batches_by_length(examples, 1, pad_id=0, shuffle=False)
    grads, losses = [], []
    for micro in (big, small):
        model = tiny_llama().train()
        loss, tokens = train.accumulate_gradients(model, micro, "cpu", torch.autocast("cpu", enabled=False),
                                                  functools.partial(methods.Method().task_loss, model, step=0))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        losses.append((loss, tokens))
    assert losses[0][0] == pytest.approx(losses[1][0], abs=1e-6)
    assert losses[0][1] == losses[1][1] == sum(lengths)  # non-pad tokens only
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=0, msg=name)
    assert max(g.abs().max() for g in grads[0].values()) > 1e-3  # the comparison is not between zeros


# ----------------------------------------------------------------------------- configuration

def test_method_presets_replace_defaults_but_explicit_flags_win():
    cfg, _ = train.parse_config(["--method", "safe"])
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.grad_accum, cfg.warmup, cfg.schedule, cfg.weight_decay) == \
        (2e-5, 3, 4, 4, 0.05, "cosine", 0.01)
    cfg, _ = train.parse_config(["--method", "risky"])
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.warmup) == (5e-5, 10, 1, 0.0)
    default_lr = train_config.TrainConfig().lr
    cfg, _ = train.parse_config(["--method", "safe", "--lr", str(default_lr), "--epochs", "1"])
    assert (cfg.lr, cfg.epochs, cfg.batch_size) == (default_lr, 1, 4)  # typed flags win even when equal to defaults
    cfg, _ = train.parse_config(["--method", "replay"])
    assert cfg.replay_fraction == 0.15
    cfg, _ = train.parse_config(["--method", "lora", "--replay-fraction", "0.15"])
    assert cfg.replay_fraction == 0.15 and cfg.lr == 1e-3


def test_help_explains_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_config(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--data", "--general-data", "--out", "--epochs", "--max-steps", "--lr", "--batch-size",
                 "--grad-accum", "--max-len", "--seed", "--eval", "--method", "--replay-fraction", "--compile",
                 "--grad-ckpt"):
        assert flag in text, flag
    assert "(default: 256)" in text and "(default: full)" in text
    for method in ("lora", "ewc", "l2-init", "freeze", "wise-ft", "mofo", "kl", "self-replay"):  # its own group
        assert f"{method} options:" in text, method
    for flag in ("--lora.r INT", "--ewc.lambda FLOAT", "--ewc.fisher-samples INT", "--l2-init.lambda FLOAT",
                 "--freeze.layers INT", "--wise-ft.alphas STR", "--mofo.fraction FLOAT", "--kl.beta FLOAT",
                 "--kl.lora", "--self-replay.max-new-tokens INT"):
        assert flag in text, flag
    assert "(reads lora.*, ewc.*)" in text  # ewc-lora: the groups it shares
    assert "--fisher-samples" not in text and "--ewc-lambda" not in text  # the old global spellings are gone


def test_method_options_are_parsed_checked_and_belong_to_their_method():
    _, method = train.parse_config(["--method", "ewc", "--ewc.lambda", "3", "--ewc.fisher-normalize", "max"])
    assert (method.options.lambda_, method.options.fisher_normalize, method.options.fisher_samples) == (3.0, "max", 64)
    _, method = train.parse_config(["--method", "ewc-lora", "--ewc.lambda", "3", "--lora.r", "4"])
    assert method.groups["ewc"].lambda_ == 3.0 and method.groups["lora"].r == 4  # groups shared with ewc and lora
    assert method.option_values()["lora.r"] == 4 and method.option_values()["ewc.lambda"] == 3.0
    message = "--ewc.lambda: not an option of --method lora (it reads: lora)"
    with pytest.raises(ForgetlabError, match=re.escape(message)):
        train.parse_config(["--method", "lora", "--ewc.lambda", "3"])
    with pytest.raises(ForgetlabError, match=re.escape("--lora.r must be >= 1")):
        train.parse_config(["--method", "lora", "--lora.r", "0"])
    with pytest.raises(ForgetlabError, match="invalid choice"):
        train.parse_config(["--method", "kl", "--kl.data", "web"])


def test_the_old_global_spellings_of_method_options_are_unknown_flags():
    for old in ("--ewc-lambda", "--fisher-samples", "--lora-r"):
        with pytest.raises(ForgetlabError, match=f"unrecognized arguments: {old}"):
            train.parse_config(["--method", "ewc", old, "7"])


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "known methods: "),
    (["--lr", "0"], "--lr must be > 0"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--warmup", "1.5"], "--warmup must be in [0, 1)"),
    (["--method-file", "no_such_method.py"], "no_such_method.py: method file not found"),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(ForgetlabError, match=re.escape(message)):
        train.parse_config(argv)


# ----------------------------------------------------------------------------- whole runs on a tiny model

OPTIONS_FOR_TINY = {"freeze": ["--freeze.layers", "1"], "self-replay": ["--self-replay.max-new-tokens", "4"],
                    "sdft-rewrite": ["--sdft-rewrite.max-new-tokens", "4"],
                    "sdft-on-policy": ["--sdft-on-policy.max-new-tokens", "4"]}


@pytest.mark.parametrize("method", list(methods.REGISTRY))
def test_every_builtin_method_runs_three_steps_and_writes_its_outputs(tiny_dir, tiny_data, tmp_path, method):
    out = tmp_path / "run"
    extra = OPTIONS_FOR_TINY.get(method, []) + ([f"--{method}.cache", str(tmp_path / "cache")]
                                                 if method in ("self-replay", "sdft-rewrite") else [])
    results = train.main(tiny_args(tiny_dir, tiny_data, out, "--method", method, "--max-steps", "3", *extra))
    files = sorted(p.name for p in out.iterdir())
    saved = "adapter" if method in ("lora", "ewc-lora", "o-lora") else "model"
    assert files == sorted(["config.json", "metrics.jsonl", "results.json", "report.md", saved]
                           + (["ewc.safetensors"] if method == "ewc" else [])
                           + (["sdft_rewrite.json"] if method == "sdft-rewrite" else []))
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["total_steps"] == 3
    assert set(methods.option_keys(methods.REGISTRY[method])) <= set(config)  # every option of the method, recorded
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m["tokens_per_second"] > 0 for m in metrics)
    assert json.loads((out / "results.json").read_text())["training"]["steps"] == 3 == results["training"]["steps"]
    assert "## Training" in (out / "report.md").read_text()
    if method == "ewc":  # the penalty is 0 at the anchor and grows as the weights move
        assert metrics[0]["extra_loss"] == 0.0 and metrics[2]["extra_loss"] > 0
    if method == "replay":
        assert results["training"]["replay_examples"] == int(len(DOMAIN) * 0.15)
    if method in ("lora", "ewc-lora", "o-lora"):
        assert (out / "adapter" / "adapter_config.json").is_file()
        assert results["training"]["trainable_params"] < results["training"]["total_params"] / 10
    else:
        assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()


def test_a_run_is_deterministic_with_a_seed_and_changes_with_another(tiny_dir, tiny_data, tmp_path):
    runs = [(tmp_path / "a", "0"), (tmp_path / "b", "0"), (tmp_path / "c", "1")]
    for out, seed in runs:
        train.main(tiny_args(tiny_dir, tiny_data, out, "--method", "lora", "--max-steps", "4", "--seed", seed))
    losses = [[m["loss"] for m in read_metrics(out)] for out, _ in runs]
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_one_epoch_processes_every_non_pad_token_once(tiny_dir, tiny_data, tmp_path, smollm_dir):
    out = tmp_path / "run"
    results = train.main(tiny_args(tiny_dir, tiny_data, out, "--epochs", "1", "--grad-accum", "2"))
    examples, _ = tokenize_dataset(Tokenizer.from_dir(smollm_dir), load_dataset(tiny_data[0]), 256)
    assert results["training"]["steps"] == math.ceil(math.ceil(len(DOMAIN) / 4) / 2) == 3
    assert results["training"]["tokens"] == sum(len(e["input_ids"]) for e in examples)


def test_full_fine_tune_saves_weights_that_reload_and_differ_from_the_start(tiny_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_dir, tiny_data, out, "--max-steps", "2", "--lr", "1e-2"))
    before, after = load_model(tiny_dir), load_model(out / "model")
    assert not torch.equal(before.model.norm.weight, after.model.norm.weight)


def test_quick_eval_writes_before_after_and_comparison(tiny_dir, tiny_data, tmp_path, monkeypatch):
    import eval as ev

    monkeypatch.setitem(ev.LEVELS, "quick", {"general_qa": 2, "ppl": 2, "domain_recall": 2})
    out = tmp_path / "run"
    argv = tiny_args(tiny_dir, tiny_data, out, "--max-steps", "1", "--domain-eval", DRUG_RECALL)
    argv[argv.index("--eval") + 1] = "quick"
    results = train.main(argv)
    assert set(results) == {"training", "base", "before", "after", "comparison"}  # --diagnostics none
    rows = results["comparison"]["metrics"]
    assert {(r["task"], r["metric"]) for r in rows} == {("general_qa", "accuracy"), ("ppl", "nll"),
                                                         ("domain_recall", "accuracy"), ("domain_recall", "nll")}
    assert all(r["verdict"] in ("forgot", "no detectable change", "improved") for r in rows)
    assert "Forgetting report" in (out / "report.md").read_text()


def test_before_reuses_another_runs_evaluation_of_the_same_weights_and_refuses_anything_else(
        tiny_dir, tiny_data, tmp_path, monkeypatch):
    import eval as ev
    from model.tiny import save_tiny_model

    monkeypatch.setitem(ev.LEVELS, "quick", {"ppl": 4, "domain_recall": 4})
    calls = []
    monkeypatch.setattr(train, "evaluate", lambda *a, **kw: calls.append(kw["split"]) or ev.evaluate(*a, **kw))

    def argv(out, *extra):
        args = tiny_args(tiny_dir, tiny_data, tmp_path / out, "--max-steps", "1", "--eval-split", "all",
                         "--domain-eval", DRUG_RECALL, *extra)
        args[args.index("--eval") + 1] = "quick"
        return args

    first = train.main(argv("a"))
    saved = json.loads((tmp_path / "a" / "before.json").read_text())
    assert saved["eval_split"] == "all" and len(saved["weights_sha256"]) == 64
    assert {it["split"] for it in first["before"]["ppl"]["items"]} == {"dev", "test"}  # each item says its half
    calls.clear()
    second = train.main(argv("b", "--method", "lora", "--before", str(tmp_path / "a" / "before.json")))
    assert calls == ["all"]  # only the "after" evaluation ran
    assert second["before"] == first["before"]

    with pytest.raises(ForgetlabError, match="made with eval_split='all', this run asks 'test'"):
        train.main(argv("c", "--eval-split", "test", "--before", str(tmp_path / "a" / "before.json")))
    other = save_tiny_model(tmp_path / "other", like=tiny_dir, seed=1)
    args = argv("d", "--before", str(tmp_path / "a" / "before.json"))
    args[args.index("--model") + 1] = str(other)
    with pytest.raises(ForgetlabError, match="its weights are not this model's"):
        train.main(args)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_bad_data_exits_2_with_one_line_and_writes_nothing(tiny_dir, tiny_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 7}\n')
    cases = [(str(tmp_path / "missing.jsonl"), "missing.jsonl: file not found"),
             (str(bad), "bad.jsonl:2: field 'completion' must be a string, got int")]
    for path, message in cases:
        argv = tiny_args(tiny_dir, tiny_data, tmp_path / "out")
        argv[argv.index("--data") + 1] = path
        with pytest.raises(SystemExit) as e:
            run_cli(train.main, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
        assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{not json}\n')
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(bad), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: {bad}:2: malformed JSON") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and not out.exists()


def test_an_existing_non_empty_output_directory_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ForgetlabError, match="already exists"):
        train.parse_config(["--out", str(tmp_path / "out")])


@pytest.mark.parametrize("method, option", [("l2-init", ["--l2-init.lambda", "50"]),
                                            ("mofo", ["--mofo.fraction", "0.3"]), ("kl", ["--kl.beta", "5"])])
def test_resume_restores_the_method_options_and_ends_bit_for_bit_where_one_run_ends(tiny_dir, tiny_data, tmp_path,
                                                                                  method, option):
    common = ["--method", method, "--lr", "1e-2", "--save-every", "1"]
    train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "whole", *common, *option, "--max-steps", "4"))
    part = tmp_path / "part"
    train.main(tiny_args(tiny_dir, tiny_data, part, *common, *option, "--max-steps", "2"))
    with pytest.raises(ForgetlabError, match=re.escape(f"--resume: {option[0]} is")):
        train.parse_config(tiny_args(tiny_dir, tiny_data, part, *common, option[0], "1", "--max-steps", "4",
                                     "--resume"))
    train.main(tiny_args(tiny_dir, tiny_data, part, *common, "--max-steps", "4", "--resume"))  # option not typed
    config = json.loads((part / "config.json").read_text())
    assert config[option[0][2:]] == float(option[1])
    whole, resumed = load_model(tmp_path / "whole" / "model").state_dict(), load_model(part / "model").state_dict()
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


def test_config_and_results_name_the_repository_s_files_relative_to_it(tiny_dir, tmp_path):
    """A committed run record must mean the same on every checkout: the default data files are recorded as
    data/..., and --resume still recognises the run's flags."""
    argv = ["--model", tiny_dir, "--out", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4",
            "--eval", "quick", "--eval-split", "dev", "--save-every", "1"]
    results = train.main(argv)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["data"], config["general_data"]) == ("data/drug_qa.jsonl", "data/general_instructions.jsonl")
    assert results["before"]["general_qa"]["data"] == "data/general_qa.jsonl"
    assert config["out"] == str(tmp_path / "run")  # outside the repository: as given
    train.main([*argv, "--resume"])  # the relative record matches the absolute default


def test_config_json_re_runs_the_same_run_from_any_directory(tiny_dir, tiny_data, tmp_path, monkeypatch):
    """train.py --config: the recorded flags and method options again (typed flags win), and the record says
    what re-running needs: the command, the commit, the versions and the inputs' sha256."""
    import hashlib

    a = tmp_path / "a"
    train.main(tiny_args(tiny_dir, tiny_data, a, "--method", "lora", "--lora.r", "4", "--lr", "5e-4",
                         "--max-steps", "3"))
    config_a = json.loads((a / "config.json").read_text())
    p = config_a["provenance"]
    assert p["command"][:2] == ["python", "train.py"] and "--lora.r" in p["command"]
    assert p["files"]["data"]["sha256"] == hashlib.sha256(Path(tiny_data[0]).read_bytes()).hexdigest()
    assert len(p["base_weights_sha256"]) == 64 and p["torch"] and p["python"]
    assert (p["commit"] is None) == (p["dirty"] is None)  # both known in a git checkout, neither outside one
    monkeypatch.chdir(tmp_path)  # the record's paths still find the files
    train.main(["--config", str(a / "config.json"), "--out", str(tmp_path / "b")])
    config_b = json.loads((tmp_path / "b" / "config.json").read_text())
    same = lambda c: {k: v for k, v in c.items() if k not in ("out", "provenance")}  # noqa: E731
    assert same(config_b) == same(config_a)
    assert [m["loss"] for m in read_metrics(tmp_path / "b")] == [m["loss"] for m in read_metrics(a)]
    train.main(["--config", str(a / "config.json"), "--out", str(tmp_path / "c"), "--max-steps", "2"])
    config_c = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config_c["total_steps"] == 2 and config_c["lora.r"] == 4 and config_c["lr"] == 5e-4


def test_eval_compare_pairs_two_runs_changes_item_by_item(tiny_dir, tiny_data, tmp_path, capsys):
    """eval.py --compare BASELINE MINE on two train.py runs: mine's change minus the baseline's, per metric, paired
    by item (checked by hand on the token-weighted NLL), and refused for runs on another split."""
    import eval as ev

    runs = []
    for name, method in (("full", "full"), ("mine", "lora")):
        flags = tiny_args(tiny_dir, tiny_data, tmp_path / name, "--method", method, "--max-steps", "2",
                          "--domain-eval", DRUG_RECALL)
        flags[flags.index("--eval") + 1] = "quick"
        train.main(flags)
        runs.append(tmp_path / name / "results.json")
    ev.main(["--compare", *map(str, runs), "--out", str(tmp_path / "c.json")])
    assert "mine − baseline" in capsys.readouterr().out
    rows = json.loads((tmp_path / "c.json").read_text())["metrics"]
    full, mine = (json.loads(r.read_text()) for r in runs)
    row = next(r for r in rows if r["task"] == "ppl")
    items = [[it for it in x["ppl"]["items"]] for x in (full["before"], full["after"], mine["before"], mine["after"])]
    d = [(ma["nll"] - mb["nll"]) - (fa["nll"] - fb["nll"]) for fb, fa, mb, ma in zip(*items)]
    w = [it["tokens"] for it in items[0]]
    assert row["delta"] == pytest.approx(sum(x * t for x, t in zip(d, w)) / sum(w))
    assert row["delta_ci"][0] <= row["delta"] <= row["delta_ci"][1]
    assert {r["task"] for r in rows} >= {"general_qa", "ppl", "domain_recall"}
    other = json.loads(runs[1].read_text())
    other["base"]["eval_split"] = "dev"
    (tmp_path / "dev.json").write_text(json.dumps(other))
    with pytest.raises(ForgetlabError, match="split differ"):
        ev.main(["--compare", str(runs[0]), str(tmp_path / "dev.json")])


def test_a_hub_id_loads_through_huggingface_hub_or_says_how_to_get_it(tiny_dir, monkeypatch):
    """--model ORG/NAME: downloaded by huggingface_hub.snapshot_download (here a local stand-in for the hub,
    which no test can reach) into its cache, safetensors and tokenizer files only; without the package, one
    line naming the command that downloads it."""
    import types

    from model import load_pretrained

    asked = {}

    def snapshot_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return tiny_dir

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    model, tok = load_pretrained("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert asked["repo_id"] == "HuggingFaceTB/SmolLM2-360M-Instruct" and model.config.name_or_path == str(tiny_dir)
    assert "*.safetensors" in asked["allow_patterns"] and not any("bin" in p for p in asked["allow_patterns"])
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed: import fails
    with pytest.raises(ForgetlabError, match="pip install huggingface_hub .*huggingface-cli download"):
        load_pretrained("HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(ForgetlabError, match="model directory not found"):
        load_pretrained("no/such/local/dir")  # three parts: a path, not a hub id


def test_your_own_data_is_measured_on_its_held_out_tenth_or_on_domain_eval(tiny_dir, tiny_data, tmp_path):
    """A run on another --data than the drug set trains on nine tenths of it and reports the NLL of the held-out
    answers (domain_heldout) instead of the drug sets; --domain-eval FILE replaces them with FILE's rows."""
    from data import load_dataset, split_held_out

    rows = [{"prompt": f"What is item {i}?", "completion": f"Item {i} is thing number {i}."} for i in range(60)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_rows, held = split_held_out(load_dataset(data))
    assert held and len(train_rows) + len(held) == 60 and not set(map(json.dumps, held)) & set(map(json.dumps, train_rows))
    flags = tiny_args(tiny_dir, (str(data), tiny_data[1]), tmp_path / "a", "--max-steps", "1")
    flags[flags.index("--eval") + 1] = "quick"
    results = train.main(flags)
    assert results["training"]["examples"] == len(train_rows)
    after = results["after"]
    assert "domain_recall" not in after and "domain_unseen" not in after
    held_ids = {it["id"] for it in after["domain_heldout"]["items"]}
    assert after["domain_heldout"]["n"] >= 1 and after["domain_heldout"]["nll"] > 0
    assert any(r["task"] == "domain_heldout" for r in results["comparison"]["metrics"])
    assert held_ids <= {f"mine.jsonl:{i + 1}" for i, r in enumerate(rows) if r in held}
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(dict(prompt=f"Which item is {i}?", completion=f"Item {i}.", answer=f"item {i}",
                                             split="test")) + "\n" for i in range(4)))
    flags = tiny_args(tiny_dir, (str(data), tiny_data[1]), tmp_path / "b", "--max-steps", "1", "--domain-eval",
                      str(probe))
    flags[flags.index("--eval") + 1] = "quick"
    results = train.main(flags)
    assert results["training"]["examples"] == 60 and "domain_heldout" not in results["after"]
    assert results["after"]["domain_recall"]["n"] == 4 and "domain_unseen" not in results["after"]
    assert results["after"]["domain_recall"]["data"].endswith("probe.jsonl")


def test_log_tensorboard_and_wandb_offline_get_every_step_and_the_evaluation(tiny_dir, tiny_data, tmp_path,
                                                                             monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    flags = tiny_args(tiny_dir, tiny_data, out, "--max-steps", "3", "--log", "tensorboard,wandb")
    train.main(flags)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([m["loss"] for m in read_metrics(out)]) and len(losses) == 3
    [run] = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"train/loss" in run.read_bytes()


def test_an_unknown_or_absent_logger_is_one_line_before_anything_runs(tiny_dir, tiny_data, tmp_path, monkeypatch):
    with pytest.raises(ForgetlabError, match="--log mlflow: unknown logger"):
        train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "a", "--log", "mlflow"))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ForgetlabError, match=r"--log wandb: the wandb package is not installed \(pip install wandb\)"):
        train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "b", "--log", "wandb"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
