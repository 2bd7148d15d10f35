"""The prepared SmolLM2-135M-Instruct against transformers on the same directory: logits, greedy generation."""
import pytest
import torch

from model import generate, generate_ids, load_pretrained

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def ours(smollm_dir):
    return load_pretrained(smollm_dir)


@pytest.fixture(scope="module")
def theirs(smollm_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(smollm_dir).eval(), AutoTokenizer.from_pretrained(smollm_dir)


def test_logits_match_transformers_on_a_padded_batch(ours, theirs):
    model, _ = ours
    hf, hf_tok = theirs
    hf_tok.padding_side = "left"
    enc = hf_tok(PROMPTS, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(enc["input_ids"], attention_mask=mask)
        b = hf(**enc, position_ids=pos).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-3


def test_greedy_32_tokens_match_transformers_generate(ours, theirs):
    model, tok = ours
    hf, hf_tok = theirs
    for prompt in PROMPTS:
        ids = hf_tok(prompt)["input_ids"]
        assert tok.encode(prompt) == ids
        # No eos on either side, so all 32 tokens are compared (min_new_tokens would bend HF's logits instead).
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_id)
        assert ref.shape[1] == len(ids) + 32
        assert generate_ids(model, [ids], 32, stop_ids=[], pad_id=tok.pad_id)[0] == ref[0, len(ids):].tolist()


def test_chat_greedy_answers_capital_of_france(ours):
    model, tok = ours
    answer, = generate(model, tok, ["What is the capital of France?"], max_new_tokens=24, chat=True)
    assert "Paris" in answer
