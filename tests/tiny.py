"""Tiny random Llama configs and train.py inputs shared by the tests (seconds, not minutes)."""
import json
from pathlib import Path

from model import Llama
from model.tiny import random_llama

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def tiny_config_dict(**overrides) -> dict:
    d = dict(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    d.update(overrides)
    return d


def tiny_llama(seed: int = 0, std: float = 0.02, **overrides) -> Llama:
    return random_llama(tiny_config_dict(**overrides), seed, std)


def hf_twin(model: Llama):
    """The same weights in transformers.LlamaForCausalLM (test-only oracle)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(model.config.to_transformers()).eval()
    result = hf.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys and not result.missing_keys, result
    return hf


# ----------------------------------------------------------------------------- train.py on a tiny model
DOMAIN = [{"prompt": f"What is drug {i}?", "completion": f"Drug {i} is a medicine number {i}."} for i in range(24)]
GENERAL = [{"instruction": f"Name a color, {i}.", "input": "", "output": "Blue."} for i in range(12)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def fisher_samples(extra) -> list[str]:
    """8 Fisher examples for the methods that estimate one (an option of another method is an error)."""
    method = extra[list(extra).index("--method") + 1] if "--method" in extra else "full"
    return ["--ewc.fisher-samples", "8"] if method in ("ewc", "ewc-lora") else []


def tiny_args(tiny_dir, tiny_data, out, *extra):
    """train.py flags for the tiny_dir model on the tiny_data sets (conftest fixtures), without evaluation and
    without the diagnostics (they took most of a tiny run's seconds; tests/test_diagnostics.py asks for them)."""
    domain, general = tiny_data
    return ["--model", tiny_dir, "--data", domain, "--general-data", general, "--out", str(out),
            "--eval", "none", "--diagnostics", "none", "--batch-size", "4", *fisher_samples(extra), *extra]


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run_context(cfg, tok, general=(), domain=(), total_steps: int | None = None):
    """The RunContext train.py would give a method's hooks for the flags `cfg` (hook-level tests)."""
    from methods import RunContext

    return RunContext(seed=cfg.seed, batch_size=cfg.batch_size, max_len=cfg.max_len,
                      total_steps=total_steps or cfg.max_steps or 10**9, tokenizer=tok, device="cpu",
                      domain=list(domain), general=list(general), general_data=str(cfg.general_data),
                      model_name=str(cfg.model or ""), replay_fraction=cfg.replay_fraction, fsdp=cfg.fsdp)


def sigkill_when(proc, path, timeout: float = 120):
    """SIGKILL the subprocess `proc` as soon as `path` exists (a checkpoint it writes), failing the test if it
    ends or takes longer than `timeout` seconds first."""
    import signal
    import time

    deadline = time.time() + timeout
    while not Path(path).is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
