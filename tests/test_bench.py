"""scripts/bench.py: the FLOP model behind MFU, and one real --quick run (tiny model) printing every figure."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora import apply_lora, count_params
from model import Llama, LlamaConfig
from scripts import bench

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_bench(*flags, timeout=600) -> str:  # a guard against a hang, not a speed check
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), *flags], capture_output=True,
                       text=True, env=ENV, timeout=timeout, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    return run_bench("--quick", "--json", str(out)), json.loads(out.read_text())


def linear_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("tie", [True, False])
def test_matmul_params_count_every_linear_weight_once_per_use(tie):
    cfg = LlamaConfig.from_hf_dict({**bench.SHAPES["tiny"], "tie_word_embeddings": tie})
    model = Llama(cfg)
    n, n_lora = bench.matmul_params(cfg)
    assert n == linear_weights(model)  # lm_head counted as a product even when tied to the embedding
    apply_lora(model, r=bench.LORA["r"], alpha=bench.LORA["alpha"], dropout=0.0, targets=bench.LORA["targets"])
    assert n_lora == count_params(model)[0]
    assert bench.flops_per_token(cfg, "full") == 6 * n
    assert bench.flops_per_token(cfg, "lora") == 4 * n + 6 * n_lora


def test_llama_3_2_1b_shape_has_the_published_parameter_count():
    cfg = LlamaConfig.from_hf_dict(bench.SHAPES["llama-3.2-1b"])
    with torch.device("meta"):
        model = Llama(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert total == 1_235_814_400  # Llama-3.2-1B (tied embedding counted once)
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    assert bench.matmul_params(cfg)[0] == total - norms  # tied: the embedding's matrix is lm_head's


def test_quick_run_prints_every_figure(quick):
    text, _ = quick
    for pattern in [r"matmul peak: \d+\.\d GFLOP/s",
                    r"FLOPs/token for MFU",
                    *(rf"\n  {mode:9s} {impl:5s} +\d+\.\d +[\d.-]+ +\d+\.\d% +\d+\n"
                      for mode, impl in [("full", "ours"), ("full", "hf"), ("lora", "ours"), ("lora", "hf"),
                                         ("ewc", "ours")]),
                    r"ratio full ours/HF tokens/s +\d+\.\d+",
                    r"ratio lora ours/HF tokens/s +\d+\.\d+",
                    r"ratio ewc step / full step +\d+\.\d+",
                    r"ours \(static KV cache\) +\d+\.\d tokens/s",
                    r"HF generate +\d+\.\d tokens/s",
                    r"ratio ours/HF tokens/s +\d+\.\d+ +\(greedy tokens identical: 100\.0%\)",
                    r"ratio Fisher / plain fwd\+bwd +\d+\.\d+",
                    r"ratio EWC step, penalty\(\) / plain +\d+\.\d+",
                    r"evaluation: level full, 4 items a task",
                    *(rf"\n  {task:16s} +\d+\.\d\d s\n" for task in ("general_qa", "instructions", "ppl", "arc_easy")),
                    r"total \d+\.\d s: \d+ forward tokens, \d+ lm_head rows, \d+\.\d tokens/s, "
                    r"\d+\.\d GFLOP/s, MFU \d+\.\d%",
                    r"short examples \(batch 8\) \d+ tokens/s, 4 x 256 \d+ tokens/s, short / long \d+\.\d\d",
                    r"AdamW step over every parameter: loop \d+\.\d+ s, foreach \d+\.\d+ s, fused \d+\.\d+ s"]:
        assert re.search(pattern, text), f"{pattern!r} not in:\n{text}"


def test_quick_json_holds_every_figure(quick):
    _, results = quick
    assert set(results) == {"machine", "config", "matmul_peak_gflops", "train", "generate", "fisher", "ewc_step",
                            "eval", "loop"}
    assert results["loop"]["short_over_long"] > 0 and all(s > 0 for s in results["loop"]["adamw_step_seconds"].values())
    assert results["config"]["adamw"] == "fused" and results["machine"]["torch_threads"] == 1
    train = results["train"]
    figures = [results["matmul_peak_gflops"], train["full"]["ratio"], train["lora"]["ratio"],
               train["ewc"]["step_over_full"], results["generate"]["ratio"], results["fisher"]["fisher_over_plain"]]
    for mode, impls in (("full", ("ours", "hf")), ("lora", ("ours", "hf")), ("ewc", ("ours",))):
        for impl in impls:
            r = train[mode][impl]
            figures += [r["tokens_per_s"], r["mfu"], r["peak_mb"]]
            assert r["mfu"] < 1.0  # measured against a peak of the same machine: above 1 means a FLOP miscount
    assert all(math.isfinite(x) and x > 0 for x in figures), figures
    assert "hf" not in train["ewc"]
    assert results["generate"]["greedy_agreement"] == 1.0  # the same tokens: both sides did the same work
    ev = results["eval"]
    assert ev["limit"] == 4 and ev["tokens"] > 0 and ev["head_rows"] > 0 and 0 < ev["mfu"] < 1.0
    assert all(sec is not None and sec >= 0 for sec in ev["tasks"].values())


def test_single_workload_ends_with_tokens_per_s():
    text = run_bench("--mode", "lora", "--quick", "--batch", "2", "--seq", "16", "--steps", "1")
    assert "trainable:" in text  # LoRA really applied
    assert re.fullmatch(r"tokens_per_s=\d+\.\d+", text.strip().splitlines()[-1])


def test_hf_has_no_ewc_workload():
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--mode", "ewc", "--impl", "hf",
                        "--quick"], capture_output=True, text=True, env=ENV, timeout=600, cwd=REPO)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --impl hf has no EWC workload")


def test_the_gpu_check_runs_every_check_on_cpu_and_writes_one_json(tmp_path):
    """scripts/gpu_check.py is run when a GPU is lent, in minutes: its CPU-runnable parts are checked here, on
    tiny shapes, so that the GPU's minutes are not spent on a bug."""
    from scripts import gpu_check

    out = tmp_path / "check.json"
    gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert not [name for name in gpu_check.CHECKS if "error" in result[name]], result
    assert result["parity"]["logits_max_rel"] < 0.05 and result["parity"]["update_rel"] < 0.5
    assert result["lora_peft"]["adapter_effect"] > 0
    assert result["lora_peft"]["logits_max_abs_diff"] <= 1e-5 * result["lora_peft"]["logits_scale"]
    assert 0 < result["mfu"]["mfu"] < 1 and result["ewc_step"]["ratio"] > 0
    assert result["train_ewc"]["returncode"] == 0 and len(result["train_ewc"]["losses"]) == 2
    assert "skipped" in result["peak_memory"]  # CUDA only
