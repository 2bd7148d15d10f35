"""Every CLI answers a user error with one line on stderr and exit code 2, never a traceback; Ctrl-C exits 130
and leaves no half-written output."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval as ev
import train
from errors import run_cli
from lora import apply_lora, save_adapter
from tests.tiny import tiny_args, tiny_llama

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import bench  # noqa: E402
import demo_single_weight  # noqa: E402
import demo_toy_forgetting  # noqa: E402
import gpu_check  # noqa: E402
import prepare_model  # noqa: E402
import sweep  # noqa: E402


def one_line_error(main, argv, capsys) -> str:
    """Run a CLI's main as its __main__ does; assert exit 2 and that the error is one line, the last on stderr
    (progress lines may come before it), and there is no traceback; return that line."""
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert err.endswith("\n") and last.startswith("error: ") and err.count("error: ") == 1, err
    assert "Traceback" not in err and "usage:" not in err, err
    return last


PLUGIN_LOSS = """from methods import Method, register


@register("{name}")
class Mine(Method):
    def extra_loss(self, model, step):
        p = next(model.parameters())
        return {value}
"""


@pytest.fixture
def restore_registry():
    """The method registry as it was before the test: plug-ins a test loads do not outlive it."""
    import methods

    saved = dict(methods.REGISTRY)
    yield
    methods.REGISTRY.clear()
    methods.REGISTRY.update(saved)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 7}\n')
    (d / "garbage.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    (d / "nonempty").mkdir()
    (d / "nonempty" / "keep.txt").write_text("x")
    (d / "results.json").write_text(json.dumps({"results": {"general_qa": {
        "accuracy": 0.5, "accuracy_ci": [0.1, 0.9], "items": [{"id": "a", "correct": True}, {"id": "b", "correct": False}]}}}))
    (d / "truncated.json").write_text('{"results": {"general_qa": {"accu')
    (d / "nan.json").write_text(json.dumps({"results": {"ppl": {
        "nll": 2.0, "nll_ci": [1.0, 3.0], "items": [{"id": "a", "nll": float("nan"), "tokens": 3}]}}}))
    (d / "empty_items.json").write_text(json.dumps({"results": {"general_qa": {
        "accuracy": 0.5, "accuracy_ci": [0.1, 0.9], "items": []}}}))
    plugins = {  # --method-file plug-ins that are wrong in the ways a first draft is
        "plugin.txt": "",
        "syntax_error.py": "from methods import Method\n\ndef broken(:\n    pass\n",
        "raises.py": "import math\n\nSCALE = math.sqrt(-1)\n",
        "takes_ewc.py": "from methods import Method, register\n\n\n@register('ewc')\nclass Mine(Method):\n    pass\n",
        "vector_loss.py": PLUGIN_LOSS.format(name="vector-loss", value="p.sum(0)"),
        "float_loss.py": PLUGIN_LOSS.format(name="float-loss", value="0.5"),
    }
    for name, text in plugins.items():
        (d / name).write_text(text)
    other = apply_lora(tiny_llama(), r=2, alpha=4, targets=("q_proj",))  # hidden 64: the tiny_dir model has 32
    save_adapter(other, d / "adapter_other_model")
    return d


# ----------------------------------------------------------------------------- train.py

TRAIN_CASES = [  # (argv change, message)
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc' (see"),
    (["--eval", "sometimes"], "argument --eval: invalid choice: 'sometimes'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--method", "nope"], "--method 'nope' is unknown; known methods: "),
    (["--method-file", "{d}/missing.py"], "missing.py: method file not found"),
    (["--data", "{d}/missing.jsonl"], "missing.jsonl: file not found"),
    (["--data", "{d}/bad.jsonl"], "bad.jsonl:2: field 'completion' must be a string, got int"),
    (["--data", "{d}/garbage.jsonl"], "garbage.jsonl:1: not valid UTF-8"),
    (["--model", "{d}/missing_model"], "missing_model: model directory not found"),
    (["--out", "{d}/nonempty"], "nonempty: output directory already exists and is not empty"),
    (["--out", "{d}/results.json/run"], "run: cannot create the output directory"),
    (["--lora.targets", "no_proj", "--method", "lora"], "LoRA target module 'no_proj' not found"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--skip-nonfinite", "-2"], "--skip-nonfinite must be >= 0"),
    (["--resume"], "config.json: not found: --resume continues a run that train.py started in --out"),
    # non-finite values: refused as typed, whether a loop setting or a method's option
    (["--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
    (["--replay-fraction", "inf"], "argument --replay-fraction: 'inf' is not a finite number"),
    (["--method", "l2-init", "--l2-init.lambda", "nan"], "argument --l2-init.lambda: 'nan' is not a finite number"),
    (["--method", "lora", "--lora.alpha", "nan"], "argument --lora.alpha: 'nan' is not a finite number"),
    (["--beta1", "1.5"], "--beta1 must be in [0, 1)"),
    (["--lr", "1e39"], "--lr 1e+39: too large for float32"),
    (["--beta2", "1"], "--beta2 must be in [0, 1)"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--device", "foo"], "--device foo: not a device (cpu, cuda, cuda:N or auto)"),
    # plug-ins: each mistake names the file (and the line), none is a traceback
    (["--method-file", "{d}/plugin.txt"], "plugin.txt: a method file is a Python file ending in .py"),
    (["--method-file", "{d}/syntax_error.py"], "syntax_error.py:3: SyntaxError: "),
    (["--method-file", "{d}/raises.py"], "raises.py:3: ValueError while importing the method file: math domain"),
    (["--method-file", "{d}/takes_ewc.py", "--method", "ewc"],
     "takes_ewc.py:4: @register('ewc'): the name is taken by methods.ewc.ElasticWeightConsolidation"),
    (["--method-file", "{d}/vector_loss.py", "--method", "vector-loss"],
     "step 1: method 'vector-loss': extra_loss returned a tensor of shape (32,); it must return a scalar tensor"),
    (["--method-file", "{d}/float_loss.py", "--method", "float-loss"],
     "step 1: method 'float-loss': extra_loss returned a float; it must return a scalar tensor or None"),
]


@pytest.mark.parametrize("change, message", TRAIN_CASES, ids=[m for _, m in TRAIN_CASES])
def test_train_user_errors_are_one_line(tiny_dir, tiny_data, files, tmp_path, capsys, restore_registry, change,
                                       message):  # noqa: F811
    argv = tiny_args(tiny_dir, tiny_data, tmp_path / "out")
    change = [a.format(d=files) for a in change]
    for flag, value in zip(change[::2], change[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    if len(change) % 2:
        argv += change[-1:]
    assert message in one_line_error(train.main, argv, capsys)
    assert not (tmp_path / "out").exists()  # a user error writes nothing


@pytest.mark.parametrize("fisher", ["not_safetensors", "other_model"])
def test_a_bad_fisher_file_fails_before_the_before_evaluation(tiny_dir, tiny_data, tmp_path, capsys, fisher):  # noqa: F811
    """--fisher is read and checked against the model before anything slow: a file that cannot serve fails in
    seconds, not after the "before" evaluation (minutes with --eval full)."""
    from ewc import EWC

    path = tmp_path / f"{fisher}.safetensors"
    if fisher == "not_safetensors":
        path.write_text("not a safetensors file\n")
    else:  # a real EWC file, of the hidden-64 tiny model: the tiny_dir model's tensors have other shapes
        other = tiny_llama()
        EWC(other, {n: torch.ones_like(p) for n, p in other.named_parameters()}, lam=1.0).save(path)
    argv = tiny_args(tiny_dir, tiny_data, tmp_path / "out", "--method", "ewc", "--ewc.fisher", str(path),
                     "--eval", "quick")
    t = time.time()
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("error: ") == 1 and "Traceback" not in err, err
    assert str(path) in err.rstrip("\n").split("\n")[-1]
    assert "evaluating" not in err and "train ewc" not in err, err  # no evaluation, no Fisher estimate, no step
    assert not (tmp_path / "out").exists()  # nothing written: no before.json, no config.json
    assert time.time() - t < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_on_cuda_without_cuda_is_one_line(capsys):
    assert "--device cuda: CUDA is not available" in one_line_error(train.main, ["--device", "cuda"], capsys)


def test_train_with_a_truncated_model_file_names_it(tiny_dir, tiny_data, tmp_path, capsys):  # noqa: F811
    import shutil

    model_dir = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    argv = tiny_args(str(model_dir), tiny_data, tmp_path / "out")
    assert f"{weights}: unreadable or truncated" in one_line_error(train.main, argv, capsys)


# ----------------------------------------------------------------------------- eval.py

EVAL_CASES = [
    (["--limit", "many"], "argument --limit: invalid int value: 'many'"),
    (["--tasks", "ppl,bogus"], "--tasks: unknown task 'bogus'"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--model", "{d}/missing_model"], "missing_model: model directory not found"),
    (["--adapter", "{d}/missing_adapter"], "missing_adapter: adapter directory not found"),
    (["--tasks", "ppl", "--data", "{d}/missing.jsonl"], "missing.jsonl: data file not found"),
    (["--compare", "{d}/results.json"], "results.json: not a train.py results.json with a before and an after"),
    (["--compare", "{d}/results.json", "{d}/results.json", "{d}/results.json"], "--compare takes BEFORE AFTER"),
    (["--compare", "{d}/results.json", "{d}/missing.json"], "missing.json: results file not found"),
    (["--compare", "{d}/results.json", "{d}/truncated.json"], "truncated.json:1: not valid JSON"),
    (["--compare", "{d}/results.json", "{d}/empty_items.json"], "results.general_qa.items is empty"),
    (["--compare", "{d}/nan.json", "{d}/nan.json"], "results.ppl.items lack the finite number 'nll' (item a)"),
    (["--tasks", "ppl", "--out", "{d}/nonempty"], "--out {d}/nonempty: is a directory"),
    (["--tasks", "ppl", "--out", "{d}/results.json/x.json"], "results.json is not a writable directory"),
]


@pytest.mark.parametrize("argv, message", EVAL_CASES, ids=[m for _, m in EVAL_CASES])
def test_eval_user_errors_are_one_line(files, capsys, argv, message):
    assert message.format(d=files) in one_line_error(ev.main, [a.format(d=files) for a in argv], capsys)


def test_eval_with_an_adapter_for_another_model_is_one_line(tiny_dir, files, capsys):  # noqa: F811
    argv = ["--model", tiny_dir, "--adapter", str(files / "adapter_other_model"), "--tasks", "ppl"]
    err = one_line_error(ev.main, argv, capsys)
    assert "adapter_model.safetensors: shape mismatch" in err and "an adapter for another model?" in err


def test_eval_with_bad_task_data_is_one_line(tiny_dir, files, capsys):  # noqa: F811
    argv = ["--model", tiny_dir, "--tasks", "ppl", "--data", str(files / "bad.jsonl")]
    assert "bad.jsonl:1: ppl row is missing field 'text'" in one_line_error(ev.main, argv, capsys)


# ----------------------------------------------------------------------------- scripts

SCRIPT_CASES = [
    (demo_single_weight.main, ["--a", "x"], "argument --a: invalid float value: 'x'"),
    (demo_single_weight.main, ["--lambdas", "1,b"], "--lambdas: expected comma-separated numbers"),
    (demo_single_weight.main, ["--lambdas", "-1"], "--lambdas: lambda must be >= 0"),
    (demo_toy_forgetting.main, ["--method", "nope"], "unknown toy method 'nope'"),
    (demo_toy_forgetting.main, ["--ewc-lambda", "-1"], "--ewc-lambda and --replay-fraction must be >= 0"),
    (demo_toy_forgetting.main, ["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (bench.main, ["--examples", "x"], "argument --examples: invalid int value: 'x'"),
    (prepare_model.main, ["--out", "{d}/nonempty"], "nonempty: exists but is not a prepared checkpoint"),
    (prepare_model.main, ["--bogus"], "unrecognized arguments: --bogus"),
    (sweep.main, ["--seeds", "0,x"], "--seeds: 'x' is not an integer"),
    (sweep.main, ["--methods", "full,nope"], "--method 'nope' is unknown"),
    (sweep.main, ["--seed", "3"], "--seed is set by the sweep for each run"),
    (gpu_check.main, ["--only", "parity,bogus", "--out", "{d}/check.json"], "--only: unknown check 'bogus'"),
    (gpu_check.main, ["--out", "{d}/nonempty"], "nonempty: cannot be written"),
]


@pytest.mark.parametrize("main, argv, message", SCRIPT_CASES, ids=[m for _, _, m in SCRIPT_CASES])
def test_script_user_errors_are_one_line(files, capsys, main, argv, message):
    assert message in one_line_error(main, [a.format(d=files) for a in argv], capsys)


# ----------------------------------------------------------------------------- real processes

CLI_FILES = [("train.py", ["--lr", "abc"]), ("eval.py", ["--limit", "x"]),
             ("scripts/demo_single_weight.py", ["--a", "x"]), ("scripts/demo_toy_forgetting.py", ["--seed", "x"]),
             ("scripts/bench.py", ["--repeats", "x"]), ("scripts/prepare_model.py", ["--force", "x"]),
             ("scripts/sweep.py", ["--seeds", "x"])]


@pytest.mark.parametrize("script, argv", CLI_FILES, ids=[s for s, _ in CLI_FILES])
def test_each_cli_process_prints_one_line_and_exits_2(tmp_path, script, argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_exits_130_and_leaves_no_half_written_output(tiny_dir, tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    argv = tiny_args(tiny_dir, tiny_data, out, "--max-steps", "100000", "--save-every", "2")
    # SIG_DFL: under a shell's background job (`cmd &`) SIGINT is inherited as ignored, and Python then installs
    # no KeyboardInterrupt handler: the child would keep training, as a backgrounded run rightly does
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 90
    while not (out / "checkpoints").is_dir() or len(list((out / "checkpoints").glob("step-*"))) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"train.py still running 60 s after SIGINT; the end of its stderr:\n{err[-2000:]}")
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [] and not (out / "model").exists() and not (out / "results.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # whole lines only
