"""distributed.py and train.py under torch.distributed on CPU: 2 gloo processes spawned by the test on
127.0.0.1 (torch.multiprocessing, or torchrun itself for the SIGKILL test), a tiny random Llama.

Each spawn costs seconds (every process imports torch), so one spawn computes everything a group of tests
checks, once per module (the `fisher_runs`, `saved_runs` and `loss_runs` fixtures), and the tests assert on
its results. The whole file takes about 2.5 minutes on 2 busy cores."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import distributed
from errors import ForgetlabError
from ewc import EWC, estimate_fisher, full
from model.llama import IGNORE_INDEX
from tests.tiny import read_metrics, run_context, tiny_args, tiny_llama

WORLD = 2
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(r, fn, port, out, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(r), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    distributed.init("cpu")
    try:
        result = fn(*args)
        torch.save(result, Path(out) / f"rank{r}.pt")
    finally:
        distributed.teardown()


def run_ranks(fn, tmp_path, *args) -> list:
    """fn(*args) on WORLD gloo processes; the list of what each rank returned."""
    mp.spawn(_worker, args=(fn, free_port(), str(tmp_path), args), nprocs=WORLD, join=True)
    return [torch.load(Path(tmp_path) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def fisher_batches() -> list[dict]:
    """Two batches of 4 examples: different lengths (right padding), prompt tokens unlabelled."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for lengths in ((9, 6, 12, 7), (5, 12, 10, 8)):
        T = max(lengths)
        ids = torch.randint(3, 101, (4, T), generator=g)
        mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        labels[:, :3] = IGNORE_INDEX  # a prompt
        batches.append(dict(input_ids=ids * mask, labels=labels, attention_mask=mask))
    return batches


def examples(batches):
    """Every example alone, cut to its real tokens (what the naive loop backpropagates one at a time)."""
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            real = b["attention_mask"][i].bool()
            yield b["input_ids"][i, real][None], b["labels"][i, real][None]


def naive_fisher(model, forward, my_batches) -> dict:
    """The obvious recipe: backward each example through the DDP / FSDP2 module, square p.grad. p.grad is then
    the rank-averaged gradient (a shard of it, under FSDP2), so this squares an average."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(distributed.local(p)) for n, p in params.items()}
    n = 0
    for ids, labels in examples(my_batches):
        forward(ids, labels=labels).backward()
        for name, p in params.items():
            g = distributed.local(p.grad)
            sums[name] += g * g
            p.grad = None
        n += 1
    result = {}
    for name, p in params.items():
        s = sums[name]
        if hasattr(p, "device_mesh"):
            s = full(ewc_like(p, s))
        result[name] = s
    for s in result.values():
        distributed.all_reduce_sum(s)
    return {k: v / distributed.all_reduce_sum(n) for k, v in result.items()}


def ewc_like(p, shard):
    from ewc import like
    return like(p, shard)


def fisher_on_ranks():
    """Everything the Fisher tests check, on one rank of WORLD."""
    batches = fisher_batches()
    mine = distributed.fisher_share(batches)
    out = {}
    # ours, before wrapping: each rank sums its own examples' squares, then SUM-all-reduce with the count
    model = tiny_llama(seed=0).train()
    fisher = estimate_fisher(model, mine, normalize="none", all_ranks=True)
    out["ours"] = {k: v.clone() for k, v in fisher.items()}
    # FSDP2: F and the anchor sharded exactly like their parameters, the penalty computed on shards
    ewc = EWC(model, fisher, lam=3.0)
    distributed.wrap(model, fsdp=True, device="cpu")
    ewc.shard_like(model)
    out["local_numel"] = sum(distributed.local(f).numel() for f in ewc.fisher)
    out["fsdp_gathered"] = {n: full(f) for n, f in zip(ewc.names, ewc.fisher)}
    ewc.load_state_dict({**{f"fisher.{n}": f for n, f in out["ours"].items()},
                         **{f"anchor.{n}": torch.zeros_like(f) for n, f in out["ours"].items()}})
    out["penalty"] = float(ewc.add_penalty_grad_(model))
    out["penalty_grad"] = {n: full(p.grad) for n, p in model.named_parameters()}
    # the naive recipe under DDP and under FSDP2
    ddp_model = tiny_llama(seed=0).train()
    out["naive_ddp"] = naive_fisher(ddp_model, distributed.wrap(ddp_model, fsdp=False, device="cpu"), mine)
    fsdp_model = distributed.wrap(tiny_llama(seed=0).train(), fsdp=True, device="cpu")
    out["naive_fsdp"] = naive_fisher(fsdp_model, fsdp_model, mine)
    return out


@pytest.fixture(scope="module")
def fisher_runs(tmp_path_factory):
    return run_ranks(fisher_on_ranks, tmp_path_factory.mktemp("fisher"))


@pytest.fixture(scope="module")
def one_process_fisher():
    return estimate_fisher(tiny_llama(seed=0).train(), fisher_batches(), normalize="none")


def relative_error(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b)
    return float((num / sum((b[k] ** 2).sum() for k in b)) ** 0.5)


def test_fisher_from_two_ranks_equals_one_process(fisher_runs, one_process_fisher):
    for r in fisher_runs:
        for name, f in one_process_fisher.items():
            torch.testing.assert_close(r["ours"][name], f, rtol=1e-5, atol=1e-12, msg=name)


def test_fisher_sharded_by_fsdp2_gathers_to_the_one_process_fisher_at_half_the_memory(fisher_runs,
                                                                                   one_process_fisher):
    total = sum(f.numel() for f in one_process_fisher.values())
    assert sum(r["local_numel"] for r in fisher_runs) == total
    assert max(r["local_numel"] for r in fisher_runs) <= total / WORLD + 1000  # 1/N, up to dim-0 padding
    for name, f in one_process_fisher.items():
        torch.testing.assert_close(fisher_runs[0]["fsdp_gathered"][name], f, rtol=1e-5, atol=1e-12, msg=name)


def test_ewc_penalty_on_fsdp2_shards_equals_one_process(fisher_runs, one_process_fisher):
    model = tiny_llama(seed=0)
    ewc = EWC(model, one_process_fisher, lam=3.0)
    ewc.load_state_dict({**{f"fisher.{n}": f for n, f in one_process_fisher.items()},
                         **{f"anchor.{n}": torch.zeros_like(f) for n, f in one_process_fisher.items()}})
    value = float(ewc.add_penalty_grad_(model))
    for r in fisher_runs:  # the logged value is all-reduced: every rank reports the whole penalty
        assert r["penalty"] == pytest.approx(value, rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fisher_runs[0]["penalty_grad"][name], p.grad, rtol=1e-5, atol=1e-12)


def test_naive_squared_p_grad_recipe_is_wrong_under_ddp_and_fsdp2(fisher_runs, one_process_fisher):
    ddp = relative_error(fisher_runs[0]["naive_ddp"], one_process_fisher)
    fsdp = relative_error(fisher_runs[0]["naive_fsdp"], one_process_fisher)
    print(f"naive p.grad² relative error: DDP {ddp:.0%}, FSDP2 {fsdp:.0%}")
    assert ddp > 0.2 and fsdp > 0.2


def test_rank_slices_cover_every_row_once_in_order():
    for n_rows in (1, 3, 8, 9):
        rows = [list(range(n_rows))[distributed.rank_rows(n_rows, r, 4)] for r in range(4)]
        assert sum(rows, []) == list(range(n_rows))
        assert max(map(len, rows)) - min(map(len, rows)) <= 1


def test_fsdp_without_torchrun_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ForgetlabError, match="torchrun"):
        distributed.init("cpu", fsdp=True)


def test_nccl_on_cpu_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ForgetlabError, match="nccl needs CUDA"):
        distributed.init("cpu", backend="nccl")


# ------------------------------------------------------------------------- memory: the plan against 2 ranks

def measured_peaks_on_ranks(batch: int, seq: int) -> dict:
    """Peak tensor bytes on this rank of building the model, wrapping it (DDP, then FSDP2), building EWC and
    taking two steps on this rank's half of the global batch: what scripts/plan_memory.py predicts."""
    from ewc import trainable_parameters
    from model.tiny import random_llama
    from tests.test_plan_memory import MEASURED  # puts scripts/ on sys.path
    from plan_memory import measured_peak

    ids = torch.randint(0, MEASURED["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    global_batch = dict(input_ids=ids, labels=ids.clone())
    peaks = {}
    for fsdp in (False, True):
        with measured_peak("cpu") as m:
            model = random_llama(MEASURED).train()
            ewc = EWC(model, {n: torch.ones_like(p) for n, p in trainable_parameters(model).items()}, lam=1.0)
            forward = distributed.wrap(model, fsdp=fsdp, device="cpu")
            if fsdp:
                ewc.shard_like(model)
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=1e-3)
            part = distributed.rank_slice(global_batch)
            for _ in range(2):
                loss = forward(part["input_ids"], labels=part["labels"])
                (loss * distributed.loss_weight(part, distributed.count_targets(global_batch))).backward()
                ewc.add_penalty_grad_(model)
                distributed.clip_grad_norm_(trainable, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        peaks["fsdp" if fsdp else "ddp"] = m["peak"]
        del model, forward, ewc, opt, trainable
    return peaks


def test_plan_is_within_25_percent_of_the_peak_each_of_2_ranks_allocates(tmp_path):
    from tests.test_plan_memory import MEASURED  # puts scripts/ on sys.path
    from plan_memory import plan
    from model.config import LlamaConfig
    from model.llama import Llama

    runs = run_ranks(measured_peaks_on_ranks, tmp_path, 16, 128)
    for mode in ("ddp", "fsdp"):
        with torch.device("meta"):
            model = Llama(LlamaConfig.from_hf_dict(MEASURED))
        planned = plan(model, "ewc", world_size=WORLD, fsdp=mode == "fsdp", batch_size=16, seq_len=128,
                       device="cpu")
        for r in runs:
            assert abs(planned.peak / r[mode] - 1) <= 0.25, (mode, planned.rows, planned.peak, r[mode])


def test_a_rank_without_rows_runs_a_stand_in_row_that_counts_for_nothing(monkeypatch):
    batch = fisher_batches()[0]
    short = {k: v[:1] for k, v in batch.items()}  # the last batch of an epoch: 1 row for 2 ranks
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    part = distributed.rank_slice(short)
    assert part["input_ids"].shape[0] == 1 and distributed.local_targets(part) == 0
    assert distributed.loss_weight(part, distributed.count_targets(short)) == 0
    assert distributed.fisher_share([short]) == []
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert distributed.local_targets(distributed.rank_slice(short)) == distributed.count_targets(short)


# ------------------------------------------------------------------------- saving a sharded model

def train_two_steps_and_gather(out, use_lora):
    """FSDP2-train a tiny model 2 steps, then: this rank's logits of the sharded model, and rank 0 saves the
    gathered plain model (HF directory or PEFT adapter) to `out`."""
    if isinstance(use_lora, tuple):  # one spawn for both cases, and the frozen reference copy
        return [train_two_steps_and_gather(f"{out}-{u}", u) for u in use_lora] + [frozen_copy_logits()]
    from lora import apply_lora, save_adapter
    from model.checkpoint import save_pretrained

    model = tiny_llama(seed=0).train()
    if use_lora:
        apply_lora(model, dropout=0.0)
    twin = distributed.meta_twin(model)
    distributed.wrap(model, fsdp=True, device="cpu")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    part = distributed.rank_slice(dict(input_ids=ids, labels=ids))
    for _ in range(2):
        model(part["input_ids"], labels=part["labels"]).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        logits = model.eval()(ids)  # the sharded model, every rank taking part
    plain = distributed.gathered(model, twin)
    if distributed.is_main():
        (save_adapter if use_lora else save_pretrained)(plain, out)
    return logits


def frozen_copy_logits():
    """The documented way for a method that needs the base model's outputs (a KL-to-base plug-in) under FSDP2:
    a frozen copy sharded like the model, called through its forward on every rank."""
    teacher = tiny_llama(seed=0).requires_grad_(False)
    distributed.shard(teacher, "cpu")
    ids = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return teacher(ids)


def test_a_frozen_reference_copy_sharded_like_the_model_gives_the_base_logits(saved_runs):
    ids = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = tiny_llama(seed=0)(ids)
    for r in saved_runs[1]:
        torch.testing.assert_close(r[2], base, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    return root, run_ranks(train_two_steps_and_gather, root, str(root / "out"), (False, True))


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_fsdp2_model_saved_by_rank_0_loads_in_one_process_with_the_sharded_logits(saved_runs, use_lora):
    from lora import load_adapter
    from model.checkpoint import load_model

    root, runs = saved_runs
    saved = root / f"out-{use_lora}"
    model = load_adapter(tiny_llama(seed=0), saved) if use_lora else load_model(saved)
    ids = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(ids)
    assert not torch.equal(logits, tiny_llama(seed=0)(ids))  # it trained
    torch.testing.assert_close(logits, runs[0][use_lora], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- train.py on 2 ranks

# 4 steps of 2 micro-batches of 4 (gradient accumulation without sync but on the last); replay's 27 examples
# end an epoch with a batch of 3 rows, split 2 + 1 over the ranks; dropout 0, whose masks are per rank.
COMMON = ["--max-steps", "4", "--grad-accum", "2", "--lr", "1e-3"]
METHODS = {"full": [], "lora": ["--lora.dropout", "0"], "ewc": [], "replay": [], "l2-init": ["--l2-init.lambda", "50"],
           "mofo": ["--mofo.fraction", "0.3"], "wise-ft": ["--wise-ft.alpha", "0.5"], "kl": ["--kl.beta", "1"],
           "ewc-lora": ["--lora.dropout", "0"], "a-gem": ["--a-gem.memory", "8"], "ties": [], "dare": [],
           # the plug-in the README shows, from its file: a formula on whole tensors, no DTensor code
           "l1-init": ["--method-file", str(REPO / "examples" / "l1_init.py"), "--l1-init.strength", "0.01"]}


def train_on_ranks(argvs: list[list[str]]):
    import train
    for argv in argvs:
        train.main(argv)


@pytest.fixture(scope="module")
def loss_runs(tiny_dir, tiny_data, tmp_path_factory):
    """{(mode, method): out directory} of 1-process, 2-process DDP and 2-process FSDP2 runs."""
    import train

    root = tmp_path_factory.mktemp("runs")
    outs = {(mode, m): root / f"{mode}-{m}" for mode in ("one", "ddp", "fsdp") for m in METHODS}

    def argv(mode, m):
        return tiny_args(tiny_dir, tiny_data, outs[mode, m], "--method", m, *COMMON, *METHODS[m],
                         *(["--fsdp"] if mode == "fsdp" else []))
    for m in METHODS:
        train.main(argv("one", m))
    for mode in ("ddp", "fsdp"):
        run_ranks(train_on_ranks, root, [argv(mode, m) for m in METHODS])
    return outs


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", list(METHODS))
def test_per_step_losses_on_2_ranks_equal_one_process(loss_runs, method, mode):
    one = [r["loss"] for r in read_metrics(loss_runs["one", method])]
    two = [r["loss"] for r in read_metrics(loss_runs[mode, method])]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_the_readme_plugin_gives_the_one_process_penalty_on_2_ranks(loss_runs, mode):
    one = [r["extra_loss"] for r in read_metrics(loss_runs["one", "l1-init"])]
    two = [r["extra_loss"] for r in read_metrics(loss_runs[mode, "l1-init"])]
    assert one[0] == two[0] == 0.0 and one[-1] > 0
    # Σ|θ − θ₀| is the L1 distance travelled: AdamW moves a weight whose gradient is ~0 by ±lr whatever its size,
    # so the last bits of a reduction order can flip a few such steps; hence 2e-3, where the losses agree to 1e-5
    for a, b in zip(one[1:], two[1:]):
        assert abs(a - b) <= 2e-3 * abs(a), (one, two)


def test_config_json_records_how_the_run_was_made(loss_runs):
    one = json.loads((loss_runs["one", "ewc"] / "config.json").read_text())
    fsdp = json.loads((loss_runs["fsdp", "ewc"] / "config.json").read_text())
    ddp = json.loads((loss_runs["ddp", "ewc"] / "config.json").read_text())
    assert (one["world_size"], one["backend"], one["fsdp"]) == (1, None, False)
    assert (ddp["world_size"], ddp["backend"], ddp["fsdp"]) == (2, "gloo", False)
    assert (fsdp["world_size"], fsdp["backend"], fsdp["fsdp"]) == (2, "gloo", True)


def test_fsdp2_outputs_are_written_once_in_the_one_process_formats(loss_runs):
    from model.checkpoint import load_model

    for method, output in (("full", "model"), ("lora", "adapter"), ("ewc", "model")):
        assert sorted(p.name for p in (loss_runs["fsdp", method]).iterdir()) == \
            sorted(p.name for p in (loss_runs["one", method]).iterdir())
    for method in ("full", "wise-ft", "ties", "dare"):  # wise-ft: each rank interpolated its own shards; ties, dare:
        # each merged whole gathered tensors
        one, two = load_model(loss_runs["one", method] / "model"), load_model(loss_runs["fsdp", method] / "model")
        for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
            if method == "ties":  # a trim by magnitude: an entry at the threshold may fall either side of it
                close = torch.isclose(a, b, rtol=1e-4, atol=1e-6)
                assert close.float().mean() >= 0.999, (name, close.float().mean())
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{method} {name}")
    ewc_one = load_file(loss_runs["one", "ewc"] / "ewc.safetensors")
    ewc_two = load_file(loss_runs["fsdp", "ewc"] / "ewc.safetensors")
    for k in ewc_one:
        if k.startswith("fisher."):  # the Fisher of the 2 ranks, gathered, is the 1-process one
            torch.testing.assert_close(ewc_two[k], ewc_one[k], rtol=1e-5, atol=1e-10, msg=k)


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), str(REPO / "train.py"), *args]


def test_fsdp2_run_killed_with_sigkill_resumes_on_2_ranks_bitwise(tiny_dir, tiny_data, tmp_path):
    steps, kill_after = 10, 2
    flags = ["--method", "ewc", "--max-steps", str(steps), "--save-every", "1", "--fsdp", "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(torchrun(*tiny_args(tiny_dir, tiny_data, tmp_path / "a", *flags)), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "b"
    proc = subprocess.Popen(torchrun(*tiny_args(tiny_dir, tiny_data, out, *flags)), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (out / "checkpoints" / f"step-{kill_after}").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    assert not (out / "model").exists()
    subprocess.run(torchrun(*tiny_args(tiny_dir, tiny_data, out, *flags, "--resume")), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = load_file(tmp_path / "a" / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [m["loss"] for m in read_metrics(out)] == [m["loss"] for m in read_metrics(tmp_path / "a")]


class RunsACommand:
    """What a hostile checkpoint file holds: a pickle that runs a command when it is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def reseal(step_dir: Path, name: str):
    """Record a replaced file's true size and sha256 in state.json, and the checksum of that: what an attacker
    who can write the checkpoint can do too, so only the format can stop the pickle."""
    import train_state

    meta = json.loads((step_dir / "state.json").read_text())
    meta["files"][name] = dict(bytes=(step_dir / name).stat().st_size, sha256=train_state.file_sha256(step_dir / name))
    meta["checksum"] = train_state.json_checksum(meta)
    (step_dir / "state.json").write_text(json.dumps(meta))


def test_a_torchrun_resume_never_unpickles_a_crafted_checkpoint(tiny_dir, tiny_data, tmp_path):
    """The newest checkpoint of a 2-rank run gets a pickle that runs a command, as torch.distributed.checkpoint's
    metadata file and in place of rank 1's shard, with state.json made to vouch for it: the resume refuses that
    checkpoint, naming the file, continues from the previous one, and the command never runs."""
    import pickle

    marker = tmp_path / "the-command-ran"
    out = tmp_path / "run"
    flags = ["--method", "lora", "--batch-size", "2", "--max-len", "64", "--max-steps", "2", "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(torchrun(*tiny_args(tiny_dir, tiny_data, out, *flags)), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    newest = out / "checkpoints" / "step-2"
    payload = pickle.dumps(RunsACommand(marker))
    (newest / "dcp").mkdir()
    (newest / "dcp" / ".metadata").write_bytes(payload)
    (newest / ".metadata").write_bytes(payload)
    (newest / "rank-1.safetensors").write_bytes(payload)
    reseal(newest, "rank-1.safetensors")
    r = subprocess.run(torchrun(*tiny_args(tiny_dir, tiny_data, out, *flags, "--resume")), env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not marker.exists()
    assert "skipping checkpoint" in r.stderr and "rank-1.safetensors: unreadable or truncated" in r.stderr, r.stderr
    assert "resuming from" in r.stderr and "step-1 (step 1 of 2)" in r.stderr


def test_under_torchrun_a_user_error_is_printed_once_and_every_rank_exits_2(tiny_dir, tiny_data, tmp_path):
    r = subprocess.run(torchrun(*tiny_args(tiny_dir, tiny_data, tmp_path / "out", "--batch-size", "3")),
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.count("error: --batch-size 3 is not divisible by the world size 2") == 1, r.stderr
    assert "[rank0]" not in r.stderr and "[rank1]" not in r.stderr, r.stderr  # no rank's traceback
    # torchrun's summary: the first rank to end ended with 2 (torchrun may stop the other before it does)
    assert "exitcode  : 2" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def every_method_on_ranks(tiny_dir, tiny_data, root, fsdp) -> dict:
    import train
    from methods import REGISTRY

    outcome = {}
    for m in REGISTRY:
        extra = {"freeze": ["--freeze.layers", "1"],  # the tiny model has 2 layers
                 "sdft-rewrite": ["--sdft-rewrite.max-new-tokens", "4", "--sdft-rewrite.cache", f"{root}/cache"],
                 "sdft-on-policy": ["--sdft-on-policy.max-new-tokens", "4"]}.get(m, [])
        try:
            train.main(tiny_args(tiny_dir, tiny_data, Path(root) / f"{fsdp}-{m}", "--method", m, "--max-steps", "2",
                                 "--batch-size", "4", "--grad-accum", "1", *extra, *(["--fsdp"] if fsdp else [])))
            outcome[m] = "ok"
        except ForgetlabError as e:
            outcome[m] = str(e)
    return outcome


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_every_builtin_method_runs_on_2_ranks(tiny_dir, tiny_data, tmp_path, fsdp):
    outcome = run_ranks(every_method_on_ranks, tmp_path, tiny_dir, tiny_data, str(tmp_path), fsdp)[0]
    if fsdp:  # each rank samples answers of its own lengths: refused, in one line, before anything slow
        assert outcome.pop("sdft-on-policy").startswith("--method sdft-on-policy: not with --fsdp")
    for m, result in outcome.items():
        assert result == "ok", (m, result)
        assert any((tmp_path / f"{fsdp}-{m}" / name).is_dir() for name in ("model", "adapter")), m


def test_cli_errors_of_distribution_are_one_line(tiny_dir, tiny_data, tmp_path):
    def run(*flags, env=()):
        return subprocess.run([sys.executable, str(REPO / "train.py"),
                               *tiny_args(tiny_dir, tiny_data, tmp_path / "out", *flags)], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)})
    for flags, env, message in (
            (["--fsdp"], (), "error: --fsdp needs several processes: start the run with torchrun"),
            (["--backend", "nccl", "--device", "cpu"], (("RANK", "0"), ("WORLD_SIZE", "1")),
             "error: --backend nccl needs CUDA devices; this run is on cpu (use gloo)")):
        r = run(*flags, env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_world_size_that_does_not_divide_the_batch_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ForgetlabError, match="--batch-size 8 is not divisible by the world size 3"):
        distributed.check_batch_size(8)
    distributed.check_batch_size(9)


def ewc_lora_penalty_and_grads(sharded: bool):
    """EWC-LoRA's penalty and its gradients for B ≠ 0 (A's gradient is then not zero), on one process or on
    FSDP2 shards (gathered)."""
    import train
    from lora import lora_modules

    _, method = train.parse_config(["--method", "ewc-lora", "--ewc.lambda", "10"])
    model = tiny_llama(seed=0)
    method.configure(model)
    g = torch.Generator().manual_seed(3)
    method.fisher = {}
    for n, m in lora_modules(model).items():
        with torch.no_grad():
            m.lora_B.weight.normal_(generator=g)
        method.fisher[f"{n}.lora_B.weight"] = torch.rand(m.lora_B.weight.shape[0], m.lora_A.weight.shape[1],
                                                         generator=g)
    if sharded:
        distributed.shard(model, "cpu")
        distributed.shard_method_state(method, model)
    value = method.penalty(model)
    value.backward()
    return float(value.detach()), {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def test_ewc_lora_penalty_and_its_gradients_on_fsdp2_shards_equal_one_process(tmp_path):
    value, grads = ewc_lora_penalty_and_grads(False)
    assert any("lora_A" in n for n in grads) and all(g.abs().max() > 0 for g in grads.values())
    for r_value, r_grads in run_ranks(ewc_lora_penalty_and_grads, tmp_path, True):
        assert abs(r_value - value) <= 1e-5 * value
        assert r_grads.keys() == grads.keys()
        for n in grads:
            torch.testing.assert_close(r_grads[n], grads[n], rtol=1e-5, atol=1e-6 * float(grads[n].abs().max()), msg=n)


def test_wise_ft_extra_alphas_under_fsdp2_are_refused_before_training():
    import train

    cfg, method = train.parse_config(["--method", "wise-ft", "--wise-ft.alphas", "0.25,0.75", "--fsdp"])
    with pytest.raises(ForgetlabError, match="--wise-ft.alphas under --fsdp"):
        method.check(None, run_context(cfg, None))
    cfg, method = train.parse_config(["--method", "wise-ft", "--fsdp"])
    method.check(None, run_context(cfg, None))  # the saved alpha alone is fine
