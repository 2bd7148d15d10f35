import json
import re
from pathlib import Path

import pytest
import torch

import methods
import train
from errors import ForgetlabError
from model import load_model
from tests.tiny import read_metrics, run_context, tiny_args

REPO = Path(__file__).resolve().parent.parent

# The plug-in the README shows (test_readme_shows_the_example keeps the two identical).
EXAMPLE = REPO / "examples" / "l1_init.py"
L1_INIT_EXAMPLE = EXAMPLE.read_text()


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ForgetlabError) as e:
        methods.get_method("ewk")
    for name in ("full", "lora", "ewc", "replay", "safe", "risky"):
        assert name in str(e.value)


def test_register_rejects_a_class_that_is_not_a_method():
    with pytest.raises(TypeError):
        methods.register("broken")(object)


def test_custom_method_file_runs_with_its_own_option_and_its_penalty_holds_weights_back(tiny_dir, tiny_data, tmp_path):  # noqa: F811
    example = EXAMPLE
    assert len(L1_INIT_EXAMPLE.splitlines()) <= 30
    runs = {}
    for name, extra in [("l1", ["--method-file", str(example), "--method", "l1-init", "--l1-init.strength", "0.01"]),
                        ("full", ["--lr", "1e-4"])]:
        out = tmp_path / name
        train.main(tiny_args(tiny_dir, tiny_data, out, "--max-steps", "3", *extra))
        runs[name] = out
    config = json.loads((runs["l1"] / "config.json").read_text())
    assert config["method"] == "l1-init" and config["lr"] == 1e-4  # its preset applied
    assert config["l1-init.strength"] == 0.01  # its option, typed, recorded under its flag's name
    metrics = read_metrics(runs["l1"])
    assert metrics[0]["extra_loss"] == 0.0 and metrics[-1]["extra_loss"] > 0.0
    assert "l1-init" in methods.REGISTRY


def test_custom_method_options_show_in_help_under_its_name(tmp_path, capsys):
    example = EXAMPLE
    with pytest.raises(SystemExit):
        train.parse_config(["--method-file", str(example), "--help"])
    text = capsys.readouterr().out
    group = " ".join(text[text.index("l1-init options:"):].split())
    assert "--l1-init.strength FLOAT" in group and "(default: 0.0001)" in group


def test_readme_shows_the_example():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert L1_INIT_EXAMPLE in blocks


class Recorder(methods.Method):
    calls: list = []  # class-level: train.main builds its own instance

    def setup(self, model, run):
        self.calls.append(("setup", len(run.general)))

    def train_examples(self, model, run, examples):
        self.calls.append(("train_examples", len(examples)))
        return examples

    def replay_examples(self, model, run, examples):
        self.calls.append(("replay_examples", len(examples)))
        return examples

    def configure(self, model):
        self.calls.append(("configure",))

    def task_loss(self, model, forward, batch, step):
        self.calls.append(("task_loss", step))
        return super().task_loss(model, forward, batch, step)

    def extra_loss(self, model, step):
        self.calls.append(("extra_loss", step))
        return None

    def after_step(self, model, step):
        self.calls.append(("after_step", step))

    def finish(self, model):
        self.calls.append(("finish",))


def test_hooks_are_called_in_the_documented_order(tiny_dir, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(Recorder, "calls", [])
    monkeypatch.setitem(methods.REGISTRY, "recorder", Recorder)
    train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "run", "--method", "recorder", "--max-steps", "2",
                         "--replay-fraction", "0.5"))
    assert Recorder.calls == [("setup", 12), ("train_examples", 24), ("replay_examples", 12), ("configure",),
                              ("task_loss", 0), ("extra_loss", 0), ("after_step", 0),
                              ("task_loss", 1), ("extra_loss", 1), ("after_step", 1), ("finish",)]


def test_lora_trains_only_the_adapters(tiny_dir, tiny_data, tmp_path):  # noqa: F811
    from lora import load_adapter

    out = tmp_path / "run"
    train.main(tiny_args(tiny_dir, tiny_data, out, "--method", "lora", "--max-steps", "3"))
    base = load_model(tiny_dir)
    adapted = load_adapter(load_model(tiny_dir), out / "adapter")
    b, a = base.state_dict(), adapted.state_dict()
    assert all(torch.equal(b[n], a[n]) for n in b)  # base weights untouched
    assert any(a[n].abs().max() > 0 for n in a if "lora_B" in n)  # B starts at 0: it trained


def test_ewc_keeps_weights_closer_to_the_start_than_full_fine_tuning(tiny_dir, tiny_data, tmp_path):  # noqa: F811
    start = load_model(tiny_dir).state_dict()
    distance = {}
    for method, extra in [("full", []), ("ewc", ["--ewc.lambda", "1e6", "--ewc.fisher-normalize", "max"])]:
        out = tmp_path / method
        train.main(tiny_args(tiny_dir, tiny_data, out, "--method", method, "--max-steps", "10", "--lr", "1e-2", *extra))
        end = load_model(out / "model").state_dict()
        # the embedding rows of tokens absent from the general data have F = 0 and move freely: leave them out
        distance[method] = sum(float((end[n] - start[n]).pow(2).sum()) for n in start if "embed" not in n)
    assert distance["ewc"] < 0.5 * distance["full"]


def test_ewc_run_saves_its_fisher_and_a_second_run_reuses_it_with_the_original_anchor(tiny_dir, tiny_data, tmp_path):  # noqa: F811
    from ewc import EWC

    first = tmp_path / "first"
    train.main(tiny_args(tiny_dir, tiny_data, first, "--method", "ewc", "--max-steps", "2", "--lr", "1e-2"))
    saved = EWC.load(first / "ewc.safetensors", load_model(tiny_dir), lam=1.0)
    assert saved.metadata["estimator"] == "empirical" and saved.metadata["data"] == str(tiny_data[1])
    assert int(saved.metadata["n_examples"]) > 0 and any(f.abs().max() > 0 for f in saved.fisher)
    start = load_model(tiny_dir).state_dict()
    assert all(torch.equal(a, start[n]) for n, a in zip(saved.names, saved.anchor))  # anchored at the base model

    # a second task, starting from the first run's model: plain --ewc.fisher keeps F and the anchor of the file
    second = tmp_path / "second"
    train.main(tiny_args(str(first / "model"), tiny_data, second, "--method", "ewc", "--max-steps", "2",
                         "--ewc.fisher", str(first / "ewc.safetensors")))
    reused = EWC.load(second / "ewc.safetensors", load_model(tiny_dir), lam=1.0)
    assert all(torch.equal(f, g) for f, g in zip(saved.fisher, reused.fisher))
    assert all(torch.equal(a, b) for a, b in zip(saved.anchor, reused.anchor))
    assert read_metrics(second)[0]["extra_loss"] > 0  # the first run moved the weights away from that anchor


def test_online_ewc_decays_the_old_fisher_adds_the_new_and_moves_the_anchor(tiny_dir, tiny_data, tmp_path):  # noqa: F811
    from ewc import EWC

    first = tmp_path / "first"
    train.main(tiny_args(tiny_dir, tiny_data, first, "--method", "ewc", "--max-steps", "2", "--lr", "1e-2"))
    old = EWC.load(first / "ewc.safetensors", load_model(tiny_dir), lam=1.0)
    fresh = tmp_path / "fresh"  # F_new: the same estimate at the first run's weights, without --ewc.fisher
    train.main(tiny_args(str(first / "model"), tiny_data, fresh, "--method", "ewc", "--max-steps", "1", "--lr", "1e-12"))
    new = EWC.load(fresh / "ewc.safetensors", load_model(tiny_dir), lam=1.0)
    online = tmp_path / "online"
    train.main(tiny_args(str(first / "model"), tiny_data, online, "--method", "ewc", "--max-steps", "1", "--lr", "1e-12",
                         "--ewc.fisher", str(first / "ewc.safetensors"), "--ewc.gamma", "0.5"))
    got = EWC.load(online / "ewc.safetensors", load_model(tiny_dir), lam=1.0)
    for f_old, f_new, f in zip(old.fisher, new.fisher, got.fisher):
        torch.testing.assert_close(f, 0.5 * f_old + f_new, rtol=1e-6, atol=0)
    trained = load_model(first / "model").state_dict()
    assert all(torch.equal(a, trained[n]) for n, a in zip(got.names, got.anchor))
    assert got.metadata["gamma"] == "0.5" and got.metadata["consolidated_from"] == str(first / "ewc.safetensors")
    assert read_metrics(online)[0]["extra_loss"] == 0.0  # the anchor is where this run starts


def test_ewc_dtype_bfloat16_keeps_the_fisher_and_anchor_in_bfloat16(tiny_dir, tiny_data, tmp_path):  # noqa: F811
    from safetensors import safe_open

    out = tmp_path / "bf16"
    train.main(tiny_args(tiny_dir, tiny_data, out, "--method", "ewc", "--max-steps", "2", "--ewc.dtype", "bfloat16"))
    with safe_open(out / "ewc.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert read_metrics(out)[1]["extra_loss"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--ewc.gamma", "0.9"], "--ewc.gamma needs --ewc.fisher"),
    (["--ewc.fisher", "x.safetensors", "--ewc.gamma", "1.5"], "--ewc.gamma must be in [0, 1]"),
    (["--ewc.fisher", "missing.safetensors"], "--ewc.fisher missing.safetensors: file not found")])
def test_ewc_flags_are_checked_before_anything_runs(argv, message):
    with pytest.raises(ForgetlabError, match=re.escape(message)):
        train.parse_config(["--method", "ewc", *argv])


def test_ewc_state_dict_round_trips(tiny_dir, tiny_data):  # noqa: F811
    from model.tokenizer import Tokenizer
    from data import load_dataset, tokenize_dataset

    model, tok = load_model(tiny_dir), Tokenizer.from_dir(tiny_dir)
    cfg, method = train.parse_config(["--method", "ewc", "--ewc.fisher-samples", "4"])
    general, _ = tokenize_dataset(tok, load_dataset(tiny_data[1]), 256)
    method.setup(model, run_context(cfg, tok, general))
    state = {k: v.clone() for k, v in method.state_dict().items()}
    for f in method.ewc.fisher:
        f.zero_()
    method.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in method.state_dict().items())
    assert any(f.abs().max() > 0 for f in method.ewc.fisher)


def test_the_fisher_sample_is_drawn_by_the_seed(tiny_dir, tiny_data, monkeypatch):  # noqa: F811
    """An interval over seeds must include the Fisher's sampling variance: each seed draws its own examples."""
    import methods
    from data import load_dataset, tokenize_dataset
    from model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_dir)
    general, _ = tokenize_dataset(tok, load_dataset(tiny_data[1]), 256)
    drawn = []
    monkeypatch.setattr(methods.ewc, "estimate_fisher", lambda model, batches, **kw: drawn.append(
        sorted(tuple(row) for b in batches for row in b["input_ids"].tolist())))
    for seed in ("0", "0", "1"):
        cfg, method = train.parse_config(["--method", "ewc", "--ewc.fisher-samples", "4", "--seed", seed])
        methods.ewc.estimate_general_fisher(None, run_context(cfg, tok, general), method.options)
    assert len(general) > 4 and drawn[0] == drawn[1] and drawn[0] != drawn[2]
