"""scripts/plan_memory.py: its per-rank plan against the tensor bytes a real training step allocates, and the
shipped Llama 3 configs. (The 2-process measurement under FSDP2 is in test_distributed.py.)"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from plan_memory import GiB, main, measured_peak, meta_model, plan  # noqa: E402

from errors import ForgetlabError  # noqa: E402
from ewc import EWC, trainable_parameters  # noqa: E402
from lora import apply_lora  # noqa: E402
from model.config import LlamaConfig  # noqa: E402
from model.llama import Llama  # noqa: E402
from model.tiny import random_llama  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# big enough that weights, optimizer state and activations are each megabytes, so a wrong term shows
MEASURED = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=256, tie_word_embeddings=False)


def measure_training_peak(method: str, batch: int, seq: int, grad_ckpt: bool) -> int:
    """Peak tensor bytes of building the model and two train.py-style steps (forward with labels, backward,
    EWC's in-place penalty gradient, clipping, AdamW, zero_grad set_to_none), every position labelled."""
    ids = torch.randint(0, MEASURED["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    with measured_peak("cpu") as m:
        model = random_llama(MEASURED).train()
        model.gradient_checkpointing = grad_ckpt
        ewc = None
        if method == "ewc":
            ewc = EWC(model, {n: torch.ones_like(p) for n, p in trainable_parameters(model).items()}, lam=1.0)
        if method == "lora":
            apply_lora(model, dropout=0.0)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-3)
        for _ in range(2):
            model(ids, labels=ids).backward()
            if ewc is not None:
                ewc.add_penalty_grad_(model)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return m["peak"]


@pytest.mark.parametrize("method,batch,seq,grad_ckpt", [("full", 16, 128, False), ("ewc", 8, 64, False),
                                                         ("ewc", 16, 128, True), ("lora", 8, 64, False)])
def test_plan_is_within_25_percent_of_the_peak_a_real_step_allocates(method, batch, seq, grad_ckpt):
    measured = measure_training_peak(method, batch, seq, grad_ckpt)
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_hf_dict(MEASURED))
    planned = plan(model, method, world_size=1, batch_size=batch, seq_len=seq, grad_ckpt=grad_ckpt, device="cpu")
    assert abs(planned.peak / measured - 1) <= 0.25, (planned.rows, planned.peak, measured)


@pytest.mark.parametrize("name,params", [("llama-3.2-1b", 1_235_814_400), ("llama-3.1-8b", 8_030_261_248),
                                         ("llama-3.1-70b", 70_553_706_496)])
def test_shipped_configs_build_the_published_parameter_counts(name, params):
    model = meta_model(CONFIGS / f"{name}.json")
    assert sum(p.numel() for p in model.parameters()) == params
    assert next(model.parameters()).is_meta  # no weights were ever allocated


def test_fsdp_divides_weights_gradients_optimizer_and_ewc_state_by_the_world_size():
    one = plan(meta_model(CONFIGS / "llama-3.1-8b.json"), "ewc", world_size=1)
    eight = plan(meta_model(CONFIGS / "llama-3.1-8b.json"), "ewc", world_size=8, fsdp=True)
    for row in ("weights", "gradients", "optimizer (AdamW)", "fisher+anchor"):
        assert eight.rows[row] == pytest.approx(one.rows[row] / 8, rel=1e-6), row
    assert one.rows["fisher+anchor"] == 2 * 4 * 8_030_261_248  # F and θ* in float32
    ddp = plan(meta_model(CONFIGS / "llama-3.1-8b.json"), "ewc", world_size=8)
    assert ddp.rows["weights"] == one.rows["weights"]  # DDP replicates everything


def test_cli_says_whether_8b_full_ewc_fits_8_gpus_of_80_gib(capsys):
    result = main(["--model", str(CONFIGS / "llama-3.1-8b.json"), "--method", "ewc", "--world-size", "8", "--fsdp",
                   "--batch-size", "8", "--seq-len", "2048", "--grad-ckpt", "--gpu-mem", "80"])
    out = capsys.readouterr().out
    assert "fisher+anchor" in out and "fits in 80 GiB" in out
    assert result.peak < 80 * GiB
    one_gpu = main(["--model", str(CONFIGS / "llama-3.1-8b.json"), "--method", "ewc", "--gpu-mem", "80"])
    assert "does NOT fit" in capsys.readouterr().out and one_gpu.peak > 80 * GiB


def test_unknown_method_is_a_one_line_error():
    with pytest.raises(ForgetlabError, match="no memory recipe"):
        main(["--model", str(CONFIGS / "llama-3.2-1b.json"), "--method", "nope"])
