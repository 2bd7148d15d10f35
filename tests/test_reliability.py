"""Reliability: loaders that only ever raise ForgetlabError, corrupted files named in clear errors, atomic
writes, training checkpoints that resume bit for bit after SIGKILL, and the non-finite guard."""
import json
import re
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import data
import eval as ev
import train_state
from errors import ForgetlabError
from ewc import EWC
from lora import apply_lora, load_adapter, save_adapter
from methods import Method
from model import load_model, save_pretrained
from model.checkpoint import write_atomic_safetensors, write_atomic_text
from tests.tiny import tiny_llama

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- loaders: property-based

def json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                        max_leaves=12)


KEYS = ["text", "prompt", "completion", "instruction", "input", "output", "messages", "role", "content",
        "question", "answer", "aliases", "choices", "category", "results", "accuracy", "nll"]


def row_like():
    """Objects with the keys the loaders look for, holding values of any JSON type."""
    return st.dictionaries(st.sampled_from(KEYS), json_values(), max_size=5)


def lines():
    """One line of a JSONL file: a plausible row, any JSON value, broken JSON, or raw bytes."""
    row = row_like().map(lambda r: json.dumps(r).encode())
    any_json = json_values().map(lambda v: json.dumps(v).encode())
    truncated = row_like().map(lambda r: json.dumps(r).encode()[:-1])
    return st.one_of(row, any_json, truncated, st.binary(max_size=40), st.text(max_size=40).map(str.encode))


LOADERS = {
    "data.load_jsonl": data.load_jsonl,
    "data.load_dataset": data.load_dataset,
    "eval.load_task_rows(general_qa)": lambda p: ev.load_task_rows("general_qa", p, limit=2),
    "eval.load_task_rows(hellaswag)": lambda p: ev.load_task_rows("hellaswag", p, split="test"),
    "eval.load_task_rows(mmlu)": lambda p: ev.load_task_rows("mmlu", p),
    "eval.load_task_rows(ppl)": lambda p: ev.load_task_rows("ppl", p),
    "eval.load_task_rows(domain_recall)": lambda p: ev.load_task_rows("domain_recall", p),
    "eval.load_task_rows(instructions)": lambda p: ev.load_task_rows("instructions", p),
    "eval.read_results": ev.read_results,
}


def assert_only_forgetlab_errors(content: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "input.jsonl"
        path.write_bytes(content)
        for name, load in LOADERS.items():
            try:
                load(path)
            except ForgetlabError as e:
                assert str(path) in str(e) and "\n" not in str(e), (name, str(e))
            except Exception as e:  # noqa: BLE001: the property under test
                raise AssertionError(f"{name} raised {type(e).__name__}: {e!r} on {content[:200]!r}") from e


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines(), max_size=6), st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_random_and_malformed_jsonl_raises_only_forgetlab_error(content, newline):
    assert_only_forgetlab_errors(newline.join(content))


@settings(max_examples=60, deadline=None)
@given(st.lists(row_like(), min_size=1, max_size=4), st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_a_valid_file_damaged_anywhere_raises_only_forgetlab_error(rows, where, junk):
    good = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    where = where % (len(good) + 1)
    assert_only_forgetlab_errors(good[:where])  # truncated
    assert_only_forgetlab_errors(good[:where] + junk + good[where:])  # bytes inserted


@pytest.mark.parametrize("content, message", [
    (b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
    (b'{"text": "a"}\n{"text": \n', ":2: malformed JSON"),
    (b'{"text": "a"}\n{"prompt": "a", "completion": "b", "prompt": "c"}\n', ":2: duplicate key 'prompt' in one row"),
])
def test_jsonl_errors_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(ForgetlabError, match=message) as e:
        data.load_jsonl(path)
    assert str(path) in str(e.value)


def test_a_json_file_that_names_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"results": {}, "results": {"general_qa": {}}}')
    with pytest.raises(ForgetlabError, match="results.json: not valid results file \\(duplicate key 'results'\\)"):
        ev.read_results(path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert data.load_jsonl(path) == [{"text": "a"}]


# ----------------------------------------------------------------------------- corrupted and truncated files

def truncate(path: Path, keep: float = 0.5):
    content = path.read_bytes()
    path.write_bytes(content[:int(len(content) * keep)])


def overwrite_middle(path: Path, junk: bytes = b"\xff\x7f\x00\x01"):
    """A few bytes changed in place, the size kept: what a bad disk sector or a careless tool does."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + len(junk)] = junk
    path.write_bytes(bytes(data))


def change_a_digit(path: Path):
    """The first digit past the middle of a text file changed: still valid JSON, another number."""
    text = path.read_text()
    i = next(i for i in range(len(text) // 2, len(text)) if text[i].isdigit())
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


def garble_header(path: Path):
    content = bytearray(path.read_bytes())
    content[8:24] = b"#" * 16  # inside the JSON header that follows the 8-byte length
    path.write_bytes(bytes(content))


DAMAGE = {"truncated": truncate, "empty": lambda p: p.write_bytes(b""), "garbled header": garble_header}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_model_file_is_an_error_naming_it(tmp_path, damage):
    path = save_pretrained(tiny_llama(), tmp_path / "m")
    DAMAGE[damage](path / "model.safetensors")
    with pytest.raises(ForgetlabError, match="model.safetensors: unreadable or truncated"):
        load_model(path)


def test_a_sharded_model_with_a_damaged_shard_or_index_is_an_error_naming_it(tmp_path):
    path = save_pretrained(tiny_llama(), tmp_path / "m", max_shard_bytes=40_000)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    truncate(shards[-1])
    with pytest.raises(ForgetlabError, match=f"{shards[-1].name}: unreadable or truncated"):
        load_model(path)
    index = path / "model.safetensors.index.json"
    index.write_text('{"weight_map": ["not", "a", "map"]}')
    with pytest.raises(ForgetlabError, match="index.json: weight_map must map"):
        load_model(path)
    index.write_bytes(b'{"weight_map": {"a": "\xff"}}')
    with pytest.raises(ForgetlabError, match="index.json: unreadable safetensors index"):
        load_model(path)


@pytest.mark.parametrize("content, message", [
    (b'{"model_type": "llama", "vocab', "config.json:1: not valid JSON"),
    (b"\xff\xfe", "config.json: unreadable model config"),
    (b"[1, 2]", "config.json: expected a JSON object, got list"),
    ({"hidden_size": "big"}, "config.json: hidden_size must be a positive integer, got 'big'"),
    ({"rope_scaling": 5}, "config.json: rope_scaling must be null or an object, got 5"),
    ({"rope_scaling": {"rope_type": "linear"}}, "config.json: rope_scaling of type 'linear' needs factor"),
    ({"rope_theta": "abc"}, "config.json: rope_theta must be a positive number, got 'abc'"),
    ({"rms_norm_eps": "x"}, "config.json: rms_norm_eps must be a positive number, got 'x'"),
])
def test_a_damaged_model_config_is_an_error_naming_it(tmp_path, content, message):
    path = save_pretrained(tiny_llama(), tmp_path / "m")
    if isinstance(content, dict):
        content = json.dumps({**json.loads((path / "config.json").read_text()), **content}).encode()
    (path / "config.json").write_bytes(content)
    with pytest.raises(ForgetlabError, match=message):
        load_model(path)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", b'{"version": "1.0", "trunc', "tokenizer.json: cannot load tokenizer"),
    ("tokenizer_config.json", b"\xff", "tokenizer_config.json: unreadable tokenizer config"),
    ("tokenizer_config.json", b"[1]", "tokenizer_config.json: expected a JSON object, got list"),
])
def test_damaged_tokenizer_files_are_errors_naming_them(smollm_dir, tmp_path, name, content, message):
    import shutil

    from model.tokenizer import Tokenizer

    d = Path(shutil.copytree(smollm_dir, tmp_path / "tok", ignore=shutil.ignore_patterns("*.safetensors")))
    (d / name).write_bytes(content)
    with pytest.raises(ForgetlabError, match=message):
        Tokenizer.from_dir(d)


@pytest.fixture
def adapter_dir(tmp_path):
    model = apply_lora(tiny_llama(), r=2, alpha=4, targets=("q_proj",))
    return save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_adapter_is_an_error_naming_it_and_loads_nothing(adapter_dir, damage):
    DAMAGE[damage](adapter_dir / "adapter_model.safetensors")
    with pytest.raises(ForgetlabError, match="adapter_model.safetensors: unreadable or truncated"):
        load_adapter(tiny_llama(), adapter_dir)


@pytest.mark.parametrize("change, message", [
    ({"r": "2"}, "'r' must be a positive integer"),
    ({"r": 0}, "'r' must be a positive integer"),
    ({"lora_alpha": None}, "'lora_alpha' must be a number"),
    ({"target_modules": [1]}, "'target_modules' must be a string or a non-empty list"),
])
def test_a_malformed_adapter_config_is_an_error_naming_it(adapter_dir, change, message):
    file = adapter_dir / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **change}))
    with pytest.raises(ForgetlabError, match=f"adapter_config.json: {message}"):
        load_adapter(tiny_llama(), adapter_dir)


def test_an_adapter_for_another_model_is_an_error(adapter_dir):
    with pytest.raises(ForgetlabError, match="shape mismatch .*an adapter for another model"):
        load_adapter(tiny_llama(hidden_size=32, intermediate_size=48), adapter_dir)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_fisher_file_is_an_error_naming_it(tmp_path, damage):
    model = tiny_llama()
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    path = tmp_path / "fisher.safetensors"
    EWC(model, fisher, lam=1.0).save(path)
    DAMAGE[damage](path)
    with pytest.raises(ForgetlabError, match="fisher.safetensors: unreadable or truncated"):
        EWC.load(path, model, lam=1.0)


GOOD_QA = {"accuracy": 0.5, "accuracy_ci": [0.1, 0.9], "items": [{"id": "a", "correct": True},
                                                                  {"id": "b", "correct": False}]}


@pytest.mark.parametrize("content, message", [
    (b'{"results": {"general_qa": {"accuracy": 0.5', ":1: not valid JSON"),
    (b'{"results": {"general_qa": 3}}', "results.general_qa is not an object"),
    (b'{"results": {"general_qa": {"accuracy": 0.5}}}', "results.general_qa.items is not a list"),
    (json.dumps({"results": {"general_qa": {**GOOD_QA, "accuracy": "high"}}}).encode(),
     "results.general_qa.accuracy is not a number"),
    (json.dumps({"results": {"general_qa": {**GOOD_QA, "accuracy_ci": [0.1]}}}).encode(),
     "results.general_qa.accuracy is not a number with a [lo, hi] interval"),
    (json.dumps({"results": {"general_qa": {**GOOD_QA, "items": [{"id": "a"}, {"id": "b"}]}}}).encode(),
     "results.general_qa.items lack the finite number 'correct'"),
    (json.dumps({"results": {"ppl": {"nll": 1.0, "nll_ci": [1, 2], "items": [{"id": "a", "nll": 1.0}]}}}).encode(),
     "results.ppl.items lack the finite weight 'tokens'"),
    (b'\xff\xfe{}', "unreadable results file"),
])
def test_a_damaged_results_file_is_an_error_naming_it(tmp_path, content, message):
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_bytes(content)
    good.write_text(json.dumps({"results": {"general_qa": GOOD_QA}}))
    with pytest.raises(ForgetlabError, match=re.escape(message)) as e:
        ev.main(["--compare", str(good), str(bad)])
    assert str(bad) in str(e.value)


# ----------------------------------------------------------------------------- atomic writes

def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import model.checkpoint as ckpt

    text, tensors = tmp_path / "a.json", tmp_path / "a.safetensors"
    write_atomic_text(text, "old")
    write_atomic_safetensors(tensors, {"x": torch.zeros(3)})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", interrupted)
    monkeypatch.setattr(ckpt.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic_text(text, "new")
    with pytest.raises(KeyboardInterrupt):
        write_atomic_safetensors(tensors, {"x": torch.ones(3)})
    assert text.read_text() == "old" and torch.equal(load_file(tensors)["x"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors"]


# ----------------------------------------------------------------------------- training checkpoints (train_state)

def trained_tiny(steps=2, seed=0):
    torch.manual_seed(seed)
    model = tiny_llama(seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 101, (2, 8))
    for _ in range(steps):
        model(x, labels=x).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, x


def test_a_checkpoint_restores_weights_optimizer_and_rng_exactly(tmp_path):
    model, opt, x = trained_tiny()
    train_state.save_checkpoint(tmp_path, 2, model, opt, Method(), {"tokens": 7}, {"seed": 0})
    expected_draw = torch.rand(4)
    path, meta, tensors = train_state.find_latest(tmp_path)
    assert path.name == "step-2" and meta["progress"] == {"tokens": 7}
    other, other_opt, _ = trained_tiny(steps=1, seed=1)
    train_state.apply_checkpoint(path, meta, tensors, other, other_opt, Method())
    train_state.restore_rng(meta["rng"], tensors)
    assert torch.equal(torch.rand(4), expected_draw)
    for m, o in ((model, opt), (other, other_opt)):  # two more identical steps: bitwise equal
        for _ in range(2):
            m(x, labels=x).backward()
            o.step()
            o.zero_grad()
    for (n, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), n


def test_only_the_last_two_checkpoints_are_kept_and_a_damaged_newest_is_skipped(tmp_path, capsys):
    model, opt, _ = trained_tiny(steps=1)
    for step in (1, 2, 3):
        train_state.save_checkpoint(tmp_path, step, model, opt, Method(), {}, {})
    assert [s for s, _ in train_state.step_dirs(tmp_path)] == [2, 3]
    truncate(tmp_path / "checkpoints" / "step-3" / "state.safetensors")
    path, _, _ = train_state.find_latest(tmp_path)
    assert path.name == "step-2"
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-3/state.safetensors: truncated" in err
    garble_header(tmp_path / "checkpoints" / "step-2" / "state.safetensors")
    with pytest.raises(ForgetlabError, match="no readable checkpoint .*state.safetensors"):
        train_state.find_latest(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda d: truncate(d / "state.safetensors"), "state.safetensors: truncated or replaced"),
    (lambda d: garble_header(d / "state.safetensors"), "state.safetensors: corrupted"),
    (lambda d: overwrite_middle(d / "state.safetensors"), "state.safetensors: corrupted"),
    (lambda d: change_a_digit(d / "state.json"), "state.json: corrupted"),
    (lambda d: truncate(d / "state.json"), r"state.json:\d+: not valid JSON"),
    (lambda d: (d / "state.json").write_text("[]"), "state.json: expected a JSON object, got list"),
    (lambda d: (d / "state.json").unlink(), "state.json: checkpoint file missing"),
])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path, damage, message):
    model, opt, _ = trained_tiny(steps=1)
    path = train_state.save_checkpoint(tmp_path, 1, model, opt, Method(), {}, {})
    damage(path)
    with pytest.raises(ForgetlabError, match=message):
        train_state.read_checkpoint(path)


def test_a_checkpoint_for_another_model_loads_nothing(tmp_path):
    model, opt, _ = trained_tiny(steps=1)
    path = train_state.save_checkpoint(tmp_path, 1, model, opt, Method(), {}, {})
    meta, tensors = train_state.read_checkpoint(path)
    other = apply_lora(tiny_llama(seed=3), r=2, alpha=4, targets=("q_proj",))
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(ForgetlabError, match="does not fit this run's model"):
        train_state.apply_checkpoint(path, meta, tensors, other, torch.optim.AdamW(
            [p for p in other.parameters() if p.requires_grad]), Method())
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path, monkeypatch):
    model, opt, _ = trained_tiny(steps=1)
    train_state.save_checkpoint(tmp_path, 1, model, opt, Method(), {}, {})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_state.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        train_state.save_checkpoint(tmp_path, 2, model, opt, Method(), {}, {})
    monkeypatch.undo()
    path, meta, _ = train_state.find_latest(tmp_path)
    assert path.name == "step-1" and meta["step"] == 1
    train_state.save_checkpoint(tmp_path, 2, model, opt, Method(), {}, {})  # the stale .tmp is replaced
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1", "step-2"]


# ----------------------------------------------------------------------------- train.py: resume and the guard

import train  # noqa: E402
from errors import run_cli  # noqa: E402
from tests.tiny import read_metrics, sigkill_when, tiny_args  # noqa: E402


def adapter_weights(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


def test_a_run_killed_with_sigkill_and_resumed_ends_bitwise_identical(tiny_dir, tiny_data, tmp_path):  # noqa: F811
    """LoRA with dropout: the resumed run must restore the weights, AdamW's moments, the data position and the
    dropout RNG exactly, or the adapters differ in the last bits."""
    steps, kill_after = 10, 3
    flags = ["--method", "lora", "--lora.dropout", "0.3", "--max-steps", str(steps), "--save-every", "1",
             "--warmup", "0.2", "--grad-accum", "2", "--batch-size", "2"]
    train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "a", *flags))
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *tiny_args(tiny_dir, tiny_data, out, *flags)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    sigkill_when(proc, out / "checkpoints" / f"step-{kill_after}", timeout=90)
    assert not (out / "adapter").exists()
    killed_at = max(s for s, _ in train_state.step_dirs(out))
    assert killed_at < steps
    train.main(tiny_args(tiny_dir, tiny_data, out, *flags, "--resume"))
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [m["loss"] for m in read_metrics(out)] == [m["loss"] for m in read_metrics(tmp_path / "a")]
    assert [s for s, _ in train_state.step_dirs(out)] == [steps - 1, steps]  # the last two are kept


def test_resume_reads_the_before_evaluation_back_instead_of_redoing_it(tiny_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    flags = ["--eval", "quick", "--save-every", "1"]
    train.main(tiny_args(tiny_dir, tiny_data, out, "--max-steps", "1", *flags))
    saved = json.loads((out / "before.json").read_text())
    assert saved["results"] == json.loads((out / "results.json").read_text())["before"]
    saved["results"]["ppl"]["nll"] = 123.0  # a value no evaluation of this model gives
    (out / "before.json").write_text(json.dumps(saved))
    train.main(tiny_args(tiny_dir, tiny_data, out, "--max-steps", "2", *flags, "--resume"))
    assert json.loads((out / "results.json").read_text())["before"]["ppl"]["nll"] == 123.0


def test_resume_without_a_checkpoint_starts_over_with_one_metrics_line_per_step(tiny_dir, tiny_data, tmp_path,
                                                                               capsys):  # noqa: F811
    out = tmp_path / "run"
    train.main(tiny_args(tiny_dir, tiny_data, out, "--max-steps", "2"))  # no --save-every: no checkpoint
    train.main(tiny_args(tiny_dir, tiny_data, out, "--max-steps", "2", "--resume"))
    assert f"--resume: no checkpoint in {out}: starting from step 0" in capsys.readouterr().err
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


def test_resume_refuses_a_checkpoint_of_another_training_set(tiny_dir, tiny_data, tmp_path):  # noqa: F811
    domain = tmp_path / "domain.jsonl"
    domain.write_text(Path(tiny_data[0]).read_text())
    out, data = tmp_path / "run", (str(domain), tiny_data[1])
    train.main(tiny_args(tiny_dir, data, out, "--max-steps", "1", "--save-every", "1"))
    domain.write_text("".join(Path(tiny_data[0]).read_text().splitlines(keepends=True)[:-4]))
    with pytest.raises(ForgetlabError, match=r"the training set has 20 examples, the checkpoint .*step-1 was trained "
                                             r"on 24 \(data changed\?\)"):
        train.main(tiny_args(tiny_dir, data, out, "--max-steps", "2", "--save-every", "1", "--resume"))
    assert [s for s, _ in train_state.step_dirs(out)] == [1] and [m["step"] for m in read_metrics(out)] == [1]


def test_resume_refuses_changed_flags_and_a_missing_run(tiny_dir, tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    with pytest.raises(ForgetlabError, match="config.json: not found: --resume continues a run"):
        train.parse_config(tiny_args(tiny_dir, tiny_data, out, "--resume"))
    train.main(tiny_args(tiny_dir, tiny_data, out, "--max-steps", "1", "--save-every", "1"))
    with pytest.raises(ForgetlabError, match=r"--resume: --lr is 0.1 but the run in .* used 0.0002"):
        train.parse_config(tiny_args(tiny_dir, tiny_data, out, "--resume", "--lr", "0.1"))
    with pytest.raises(ForgetlabError, match="--resume needs --out"):
        train.parse_config(["--resume"])


def nan_at(step_to_poison: int, what: str):
    """A wrapper of train.accumulate_gradients that poisons optimizer step `step_to_poison` (1-based): a NaN loss,
    or a finite loss whose gradients hold an inf."""
    real = train.accumulate_gradients
    calls = []

    def poisoned(forward, micro_batches, device, autocast, task_loss):
        loss, tokens = real(forward, micro_batches, device, autocast, task_loss)
        calls.append(1)
        if len(calls) == step_to_poison:
            if what == "loss":
                return float("nan"), tokens
            p = next(p for p in forward.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("inf")
        return loss, tokens
    return poisoned


@pytest.mark.parametrize("what, cause", [("loss", "non-finite loss (nan)"),
                                         ("grad", "non-finite gradient norm (inf)")])
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_checkpoint(tiny_dir, tiny_data, tmp_path, monkeypatch,
                                                                        capsys, what, cause):  # noqa: F811
    monkeypatch.setattr(train, "accumulate_gradients", nan_at(4, what))
    out = tmp_path / "run"
    argv = tiny_args(tiny_dir, tiny_data, out, "--max-steps", "6", "--save-every", "2", "--lr", "1e-2")
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert err.startswith(f"error: step 4: {cause}: training stopped; the last checkpoint, ") and "step-2" in err
    path, meta, tensors = train_state.find_latest(out)
    assert path.name == "step-2" and meta["step"] == 2
    saved = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not (out / "model").exists() and [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_skip_nonfinite_skips_the_bad_batch_without_an_update(tiny_dir, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(train, "accumulate_gradients", nan_at(2, "loss"))
    out = tmp_path / "run"
    train.main(tiny_args(tiny_dir, tiny_data, out, "--max-steps", "3", "--skip-nonfinite", "1"))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[1]["skipped"] == "loss (nan)"
    assert "skipped" not in metrics[0] and math.isfinite(metrics[2]["loss"])
    assert all(torch.isfinite(t).all() for t in load_file(out / "model" / "model.safetensors").values())


def test_an_ewc_full_fine_tune_resumed_from_an_older_checkpoint_ends_bitwise_identical(tiny_dir, tiny_data,
                                                                                       tmp_path):  # noqa: F811
    """Full fine-tuning (every weight and its AdamW state in the checkpoint) with the EWC penalty (the method's
    Fisher and anchor restored); the newest checkpoint is damaged, so the resume starts from the one before."""
    flags = ["--method", "ewc", "--max-steps", "4", "--save-every", "1", "--ewc.lambda", "50", "--lr", "1e-2"]
    train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "a", *flags))
    out = tmp_path / "b"
    train.main(tiny_args(tiny_dir, tiny_data, out, *flags))
    truncate(out / "checkpoints" / "step-4" / "state.safetensors")
    train.main(tiny_args(tiny_dir, tiny_data, out, *flags, "--resume"))
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    extra = [m["extra_loss"] for m in read_metrics(out)]
    assert extra == [m["extra_loss"] for m in read_metrics(tmp_path / "a")] and extra[-1] > 0


# ----------------------------------------------------------------------------- what a hostile-input probe found

def test_a_checkpoint_changed_in_place_is_skipped_and_the_resume_ends_bitwise_identical(tiny_dir, tiny_data, tmp_path,
                                                                                        capsys):  # noqa: F811
    """A few bytes overwritten in the middle of the newest checkpoint, its size unchanged: its sha256 no longer
    matches the one state.json recorded, so --resume falls back to the previous checkpoint and redoes the step."""
    flags = ["--max-steps", "4", "--save-every", "1", "--lr", "1e-2"]
    out = tmp_path / "run"
    train.main(tiny_args(tiny_dir, tiny_data, out, *flags))
    finished = load_file(out / "model" / "model.safetensors")
    overwrite_middle(out / "checkpoints" / "step-4" / "state.safetensors")
    capsys.readouterr()
    train.main(tiny_args(tiny_dir, tiny_data, out, *flags, "--resume"))
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "state.safetensors: corrupted" in err and "step 3 of 4" in err, err
    resumed = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)


def test_weights_made_non_finite_by_the_last_step_are_never_saved(tiny_dir, tiny_data, tmp_path, monkeypatch,
                                                                   capsys):  # noqa: F811
    """A method whose after_step divides by zero at the last step (no later loss would show it): nothing is
    saved, the run says why, and its directory is gone."""
    def poison(self, model, step):
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("inf")
    monkeypatch.setattr(Method, "after_step", poison)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, tiny_args(tiny_dir, tiny_data, out, "--max-steps", "1"))
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert e.value.code == 2 and "1 trainable weights are NaN or inf after the last step: nothing saved" in err, err
    assert not out.exists()


def test_a_run_stopped_before_its_first_checkpoint_leaves_its_out_free_for_a_new_run(tiny_dir, tiny_data, tmp_path,
                                                                                     monkeypatch):  # noqa: F811
    monkeypatch.setattr(train, "accumulate_gradients", nan_at(2, "loss"))
    out = tmp_path / "run"
    with pytest.raises(ForgetlabError, match="step 2: non-finite loss"):
        train.main(tiny_args(tiny_dir, tiny_data, out, "--max-steps", "3"))
    assert not out.exists()  # no config.json, no metrics.jsonl: nothing to resume, nothing in the way
    monkeypatch.undo()
    train.main(tiny_args(tiny_dir, tiny_data, out, "--max-steps", "3", "--lr", "1e-4"))
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_resume_reads_the_checkpoint_before_anything_slow_and_keeps_config_json(tiny_dir, tiny_data, tmp_path,
                                                                              capsys):  # noqa: F811
    flags = ["--method", "ewc", "--max-steps", "2", "--save-every", "1"]
    out = tmp_path / "run"
    train.main(tiny_args(tiny_dir, tiny_data, out, *flags))
    config = (out / "config.json").read_bytes()
    for _, path in train_state.step_dirs(out):
        truncate(path / "state.safetensors")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, tiny_args(tiny_dir, tiny_data, out, *flags, "--max-steps", "3", "--resume"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no readable checkpoint" in err.rstrip().split("\n")[-1], err
    assert "fisher" not in err  # the Fisher estimate never started
    assert (out / "config.json").read_bytes() == config


def test_bad_lora_targets_fail_before_the_before_evaluation(tiny_dir, tiny_data, tmp_path, capsys):  # noqa: F811
    argv = tiny_args(tiny_dir, tiny_data, tmp_path / "out", "--method", "lora", "--lora.targets", "bogus_proj",
                     "--eval", "quick")
    with pytest.raises(SystemExit):
        run_cli(train.main, argv)
    err = capsys.readouterr().err
    assert "LoRA target module 'bogus_proj' not found" in err and "evaluating" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_sweep_refuses_a_bad_grid_value_before_its_first_run(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import sweep

    with pytest.raises(SystemExit) as e:
        run_cli(sweep.main, ["--methods", "ewc", "--grid", "ewc.lambda=0.5,-1", "--out", str(tmp_path / "sweep")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "grid point ewc-lambda-1-seed0: --ewc.lambda must be >= 0" in err, err
    assert not (tmp_path / "sweep").exists()


def test_a_truncated_self_replay_cache_is_generated_again(tmp_path, capsys):
    from methods.self_distillation import read_cache

    file = tmp_path / "cache.json"
    file.write_text('{"1,2,3": [4, 5], "6,7": [8')
    assert read_cache(file, "self-replay") == {}
    assert "ignoring the unreadable cache" in capsys.readouterr().err
    file.write_text('{"1,2,3": [4, 5]}')
    assert read_cache(file, "self-replay") == {"1,2,3": [4, 5]}


# A disk that fills up: a real small tmpfs where this process may mount one (root on Linux), and a write that
# fails with ENOSPC everywhere.

@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a directory on a tmpfs of that size (again: resized); skips where mounting is not allowed."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        opts = f"remount,size={size}" if mounted else f"size={size}"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(1)
        return where
    yield mount
    if mounted:  # lazily: tensors read back with safetensors may still map a file of it
        subprocess.run(["umount", "--lazy", str(where)], check=True)


def test_a_full_disk_is_one_line_and_leaves_what_resume_can_use(tiny_dir, tiny_data, tmp_path, small_disk,
                                                               capsys):  # noqa: F811
    """Without a checkpoint the run leaves nothing; with one, the newest complete checkpoint, config.json and
    metrics.jsonl, and --resume finishes the run once there is space, bit for bit as if nothing happened."""
    flags = ["--max-steps", "3", "--lr", "1e-2"]
    disk = small_disk("4m")  # a model of the tiny_dir size does not fit
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, tiny_args(tiny_dir, tiny_data, disk / "a", *flags))
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert e.value.code == 2 and re.search(r"a: no space left on the device \(about [\d.]+ MiB needed, [\d.]+ MiB free\)",
                                           err), err
    assert list(disk.iterdir()) == []

    train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "whole", *flags, "--save-every", "1"))
    one_checkpoint = sum(f.stat().st_size for f in (tmp_path / "whole" / "checkpoints" / "step-3").iterdir())
    disk = small_disk(f"{int(one_checkpoint * 1.5) // 1024}k")  # the first checkpoint fits, the second does not
    out = disk / "b"
    with pytest.raises(SystemExit):
        run_cli(train.main, tiny_args(tiny_dir, tiny_data, out, *flags, "--save-every", "1"))
    assert "no space left on the device" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]  # no step-2.tmp left behind
    small_disk("256m")
    train.main(tiny_args(tiny_dir, tiny_data, out, *flags, "--save-every", "1", "--resume"))
    a, b = load_file(tmp_path / "whole" / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_write_failing_with_enospc_is_one_line_and_leaves_nothing(tiny_dir, tiny_data, tmp_path, monkeypatch,
                                                                   capsys):  # noqa: F811
    """The same, simulated, for machines where no tmpfs can be mounted: the model's save fails as safetensors
    reports a full disk."""
    import model.checkpoint as checkpoint
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, tiny_args(tiny_dir, tiny_data, out, "--max-steps", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "run: no space left on the device (about" in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_second_run_on_the_same_base_model_reads_its_evaluation_from_the_cache(tiny_dir, tiny_data, tmp_path,
                                                                              capsys):  # noqa: F811
    flags = ["--max-steps", "1", "--eval", "quick", "--eval-split", "dev"]
    first = train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "a", *flags))
    assert first["training"]["before_read_from"] is None and "[before] evaluating" in capsys.readouterr().err
    second = train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "b", *flags, "--lr", "1e-3"))
    err = capsys.readouterr().err
    assert "read back from the cache" in err and "[before] evaluating" not in err, err
    assert second["training"]["before_read_from"].endswith(".json")
    assert second["before"] == first["before"]
    train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "c", *flags, "--eval-cache", "none"))
    assert "[before] evaluating" in capsys.readouterr().err  # the cache disabled
    third = train.main(tiny_args(tiny_dir, tiny_data, tmp_path / "d", *flags, "--eval-split", "test"))
    assert third["training"]["before_read_from"] is None  # another split: another key
