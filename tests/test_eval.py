"""eval.py: log-likelihood scoring against hand-computed log-probs and a transformers scorer, the checklist
checks, compare_forgetting on fixed numbers, the CLI, and an adapter that must change the results."""
import json
import random
from pathlib import Path

import pytest
import torch

import eval as ev
from errors import run_cli
from tests.tiny import tiny_llama

MMLU = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mmlu_val.jsonl"


@pytest.fixture(scope="module")
def tok(smollm_dir):
    from model.tokenizer import Tokenizer

    return Tokenizer.from_dir(smollm_dir)


@pytest.fixture(scope="module")
def tiny_smol(tok):
    """A tiny random Llama over SmolLM2's vocabulary, so real text can be scored in milliseconds."""
    return tiny_llama(std=0.2, vocab_size=tok.vocab_size)


@pytest.fixture(scope="module")
def smollm(smollm_dir):
    from model import load_pretrained

    return load_pretrained(smollm_dir)


def hand_logprob(model, ids: list[int], n_ctx: int) -> float:
    """Σ_{t >= n_ctx} log softmax(logits[t-1])[ids[t]] from one full forward pass."""
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].double().log_softmax(-1)
    return sum(lp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids)))


# ----------------------------------------------------------------------------- scoring

def test_score_continuations_equals_logprobs_from_full_logits_whatever_the_batching():
    model = tiny_llama(std=0.2)
    rng = random.Random(0)
    requests = []
    for _ in range(9):  # several continuations share each context, with ragged lengths on both sides
        ctx = [rng.randrange(101) for _ in range(rng.randint(1, 10))]
        requests += [(ctx, [rng.randrange(101) for _ in range(rng.randint(1, 7))]) for _ in range(rng.randint(1, 4))]
    requests.append(([5], []))  # an empty continuation scores 0
    ref = [hand_logprob(model, c + x, len(c)) if x else 0.0 for c, x in requests]
    for batch_size, max_tokens in [(16, 2048), (3, 8), (1, 1)]:
        got = ev.score_continuations(model, requests, batch_size=batch_size, max_tokens=max_tokens)
        assert got == pytest.approx(ref, abs=1e-4), (batch_size, max_tokens)
    assert got[-1] == 0.0
    assert model.model.layers[0].self_attn.kv_cache is None  # the cache is released


@pytest.mark.real_model
def test_choice_starting_with_a_space_keeps_its_space_token(tok):
    ctx, cont = ev.split_request(tok, "Question: What is the capital of France?\nAnswer:", " Paris")
    assert cont == tok.encode(" Paris") and len(cont) == 1  # "ĠParis", not "Ġ" + "Paris"
    assert ctx == tok.encode("Question: What is the capital of France?\nAnswer:", add_bos=tok.adds_bos)
    # A context ending in a space scores the same tokens: the space moves to the continuation.
    assert ev.split_request(tok, "Question: What is the capital of France?\nAnswer: ", "Paris") == (ctx, cont)


@pytest.mark.real_model
def test_mc_logprobs_match_hand_computation_on_a_tiny_model(tok, tiny_smol):
    rows = [dict(question="What is the capital of France?", choices=["Paris", "Lyon", "New York City"], answer=0),
            dict(question="2 + 2 =", choices=["4", " four", "22"], answer=0)]
    res = ev.evaluate_mc(tiny_smol, tok, rows)
    for row, item in zip(rows, res["items"]):
        assert item["context"] == f"Question: {row['question']}\nAnswer:"
        assert item["continuations"] == [" " + c for c in row["choices"]]
        n_ctx = len(tok.encode(item["context"], add_bos=tok.adds_bos))
        for cont, lp in zip(item["continuations"], item["logprobs"]):
            ids = tok.encode(item["context"] + cont, add_bos=tok.adds_bos)
            assert lp == pytest.approx(hand_logprob(tiny_smol, ids, n_ctx), abs=1e-4)
        assert item["pred"] == max(range(len(item["logprobs"])), key=item["logprobs"].__getitem__)
    assert res["acc"] == sum(it["pred"] == it["answer"] for it in res["items"]) / 2


@pytest.mark.real_model
def test_acc_norm_divides_by_the_continuation_length(tok, monkeypatch):
    # Fixed log-probs: the short choice wins on the sum, the long one per character.
    monkeypatch.setattr(ev, "score_continuations", lambda model, reqs, **kw: [-2.0, -3.0])
    res = ev.evaluate_mc(None, tok, [dict(question="q", choices=["a", "bbbbbbbbb"], answer=1)])
    assert res["items"][0]["pred"] == 0 and res["items"][0]["pred_norm"] == 1  # -2/2 < -3/10
    assert (res["acc"], res["acc_norm"]) == (0.0, 1.0)


@pytest.mark.real_model
def test_domain_nll_is_the_training_loss_of_the_reference_completion(tok, tiny_smol):
    from data import collate, tokenize_example

    row = dict(prompt="What class of drug is metformin?", completion="Metformin is a biguanide.", answer="biguanide")
    ctx, cont = ev.domain_nll_request(tok, row, max_len=512)
    nll = -ev.score_continuations(tiny_smol, [(ctx, cont)])[0] / len(cont)
    batch = collate([tokenize_example(tok, row, 512)], tok.pad_id)
    with torch.no_grad():
        loss = tiny_smol(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])
    assert nll == pytest.approx(loss.item(), abs=1e-4)
    assert tok.decode(cont).strip() == "Metformin is a biguanide."  # the answer span, end-of-turn included


@pytest.mark.real_model
@pytest.mark.shared_data
def test_mc_predictions_agree_with_a_transformers_scorer_on_mmlu(smollm_dir, smollm, tok):
    if not MMLU.is_file():
        pytest.skip(f"{MMLU} not found (../shared/data is absent)")
    from transformers import AutoTokenizer, LlamaForCausalLM

    rows = ev.load_task_rows("mc", MMLU)
    # The 100 shortest items (all subjects mixed), so the reference scorer below stays within seconds.
    rows = sorted(rows, key=lambda r: len(r["question"]) + sum(len(c) for c in r["choices"]))[:100]
    ours = ev.evaluate_mc(smollm[0], tok, rows, batch_size=32)

    hf = LlamaForCausalLM.from_pretrained(smollm_dir).eval()
    hf_tok = AutoTokenizer.from_pretrained(smollm_dir)
    agree, max_diff = 0, 0.0
    for row, item in zip(rows, ours["items"]):
        # lm-evaluation-harness's split: continuation tokens = enc(context + choice)[len(enc(context)):].
        context = f"Question: {row['question']}\nAnswer:"
        ctx = hf_tok(context)["input_ids"]
        conts = [hf_tok(context + " " + c)["input_ids"][len(ctx):] for c in row["choices"]]
        with torch.no_grad():
            out = hf(torch.tensor([ctx]), use_cache=True)
            first = out.logits[0, -1].double().log_softmax(-1)
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(conts))
            M = max(map(len, conts))
            if M > 1:  # tokens 2..m of each choice, right-padded, after the shared cached context
                inp = torch.tensor([c[:-1] + [0] * (M - len(c)) for c in conts])
                mask = torch.tensor([[1] * len(ctx) + [1] * (len(c) - 1) + [0] * (M - len(c)) for c in conts])
                rest = hf(inp, attention_mask=mask, past_key_values=cache).logits.double().log_softmax(-1)
        ref = [first[c[0]].item() + sum(rest[i, j - 1, c[j]].item() for j in range(1, len(c)))
               for i, c in enumerate(conts)]
        pred = max(range(len(ref)), key=ref.__getitem__)
        agree += pred == item["pred"]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(ref, item["logprobs"])))
    assert agree >= 97, f"{agree}/100 predictions agree"
    assert max_diff < 0.05, max_diff
    assert 0.2 <= ours["acc"] <= 1.0 and ours["n"] == 100


# ----------------------------------------------------------------------------- QA and domain matching

def test_cut_answer_keeps_the_first_paragraph_only():
    assert ev.cut_answer(" Paris.\n\nQuestion: What is ...") == "Paris."
    assert ev.cut_answer(" Paris\nQuestion: What is the capital of Spain?\nAnswer: Madrid") == "Paris"
    assert ev.cut_answer(" The answer is\n4, of course") == "The answer is\n4, of course"


def test_substring_and_whole_word_matching():
    assert ev.substring_match("It is PARIS, France", ["paris"])
    assert not ev.substring_match("London", ["Paris", "paris, france"])
    assert ev.whole_word_match("It is a proton pump inhibitor (PPI).", ["ppi"])
    assert not ev.whole_word_match("happiness", ["ppi"])
    assert ev.whole_word_match("an ACE-inhibitor.", ["ace inhibitor", "ace-inhibitor"])


# ----------------------------------------------------------------------------- checklist

CHECK_CASES = {  # name: (a response that passes, one that fails)
    "basic_grammar": ("The weather today is sunny and warm.", "weather sunny"),
    "simple_arithmetic": ("2+2 equals 4.", "2+2 equals 5, or 14."),
    "instruction_following": ("Red, green and blue.", "Red and green."),
    "factual_knowledge": ("The capital of France is Paris.", "It is Lyon."),
    "word_limit": ("The moon is Earth's bright natural satellite.", " ".join(["moon"] * 20)),
    "numbered_list": ("1. Apple\n2. Banana\n3. Cherry", "Apple, banana, cherry."),
    "bullet_list": ("- Keep a schedule\n- Avoid caffeine\n* Dark room", "Keep a schedule and avoid caffeine."),
    "valid_json": ('```json\n{"name": "Anna", "age": 30}\n```', '{"name": "Anna", age: 30}'),
    "all_lowercase": ("dogs are loyal friends.", "Dogs are loyal friends."),
    "required_keyword": ("The ocean looks blue today.", "The ocean is bluer than ever."),
    "yes_no_answer": ("Yes, the sun is hot.", "No."),
    "one_word_answer": ("Green.", "Grass is usually green in spring and summer."),
    "repeat_exactly": ("The cat sat on the mat.", "The cat sat on a mat."),
    "count_to_five": ("1, 2, 3, 4, 5", "1, 2, 4, 5"),
    "uppercase_word": ("HELLO", "Hello"),
    "no_commas": ("Cats like to sleep in the sun.", "Cats, like dogs, sleep a lot."),
}


def test_checklist_has_the_lessons_four_checks_and_at_least_eight_more():
    names = [c["name"] for c in ev.CHECKLIST]
    assert {"basic_grammar", "simple_arithmetic", "instruction_following", "factual_knowledge"} <= set(names)
    assert len(names) >= 12 and len(set(names)) == len(names)
    assert all(c["severity"] in ev.SEVERITY_WEIGHTS and c["prompt"] for c in ev.CHECKLIST)
    assert set(names) == set(CHECK_CASES)


@pytest.mark.parametrize("name", sorted(CHECK_CASES))
def test_checklist_check_passes_a_good_response_and_fails_a_bad_one(name):
    check = next(c["check"] for c in ev.CHECKLIST if c["name"] == name)
    good, bad = CHECK_CASES[name]
    assert check(good) is True and check(bad) is False


def test_checklist_score_weights_by_severity():
    items = [dict(severity="high", passed=True), dict(severity="medium", passed=False),
             dict(severity="low", passed=True), dict(severity="low", passed=False)]
    s = ev.checklist_score(items)
    assert s["score"] == pytest.approx((3 + 1) / (3 + 2 + 1 + 1))
    assert (s["passed"], s["total"]) == (2, 4)
    assert s["severity_pass_rate"] == {"high": 1.0, "medium": 0.0, "low": 0.5}


# ----------------------------------------------------------------------------- compare_forgetting

BEFORE = {"general_qa": {"accuracy": 0.60, "category_accuracy": {"math": 0.5, "science": 0.7, "history": 0.6}},
          "ppl": {"nll": 2.0, "ppl": 7.389},
          "checklist": {"score": 0.75},
          "mc": {"acc": 0.40, "acc_norm": 0.45},
          "domain": {"accuracy": 0.10, "nll": 3.0}}
AFTER = {"general_qa": {"accuracy": 0.45, "category_accuracy": {"math": 0.2, "science": 0.7, "history": 0.5}},
         "ppl": {"nll": 2.5, "ppl": 12.18},
         "checklist": {"score": 0.5},
         "mc": {"skipped": "no data"},
         "domain": {"accuracy": 0.60, "nll": 1.0}}


def test_compare_forgetting_on_fixed_numbers():
    c = ev.compare_forgetting(BEFORE, {"results": AFTER}, threshold=0.10)  # an OUT.json works as well
    assert (c["accuracy_before"], c["accuracy_after"]) == (0.60, 0.45)
    assert c["accuracy_drop"] == pytest.approx(0.15) and c["forgetting_detected"]
    assert c["category_drops"] == pytest.approx({"history": 0.1, "math": 0.3, "science": 0.0})
    assert "Significant forgetting" in c["recommendation"] and "LoRA" in c["recommendation"]
    d = c["deltas"]
    assert d["ppl_nll"]["delta"] == pytest.approx(0.5) and d["ppl_nll"]["worse"]
    assert d["checklist_score"]["delta"] == pytest.approx(-0.25) and d["checklist_score"]["worse"]
    assert d["domain_accuracy"]["delta"] == pytest.approx(0.5) and not d["domain_accuracy"]["worse"]
    assert d["domain_nll"]["delta"] == pytest.approx(-2.0) and not d["domain_nll"]["worse"]
    assert "mc_acc" not in d  # skipped on one side
    report = ev.format_report(c)
    assert "forgetting detected" in report and "| math | +0.300 |" in report and "| ppl_nll |" in report


def test_compare_forgetting_below_the_threshold_is_not_forgetting():
    after = {"general_qa": {"accuracy": 0.58, "category_accuracy": {}}, "ppl": {"nll": 2.01, "ppl": 7.46}}
    c = ev.compare_forgetting(BEFORE, after, threshold=0.10)
    assert c["accuracy_drop"] == pytest.approx(0.02) and not c["forgetting_detected"]
    assert c["recommendation"] == "No significant forgetting."
    assert not ev.compare_forgetting(BEFORE, AFTER, threshold=0.2)["forgetting_detected"]  # 0.15 < 0.2


# ----------------------------------------------------------------------------- data and CLI

def test_limit_takes_rows_evenly_spaced_and_bad_rows_name_their_line(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(dict(question=f"q{i}", answer=str(i))) + "\n" for i in range(10)))
    assert [r["question"] for r in ev.load_task_rows("general_qa", f, limit=3)] == ["q0", "q3", "q6"]
    f.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    with pytest.raises(ev.ForgetlabError, match=r"qa.jsonl:2: .*missing field 'answer'"):
        ev.load_task_rows("general_qa", f)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "general_qa,bogus"], "unknown task 'bogus'"),
    (["--model", "/nonexistent/model"], "/nonexistent/model: model directory not found"),
    (["--tasks", "ppl,domain", "--data", "x.jsonl"], "--data replaces one task's data"),
    (["--tasks", "ppl", "--data", "/nonexistent.jsonl"], "/nonexistent.jsonl: data file not found"),
    (["--adapter", "/nonexistent/adapter"], "/nonexistent/adapter: adapter directory not found"),
    (["--compare", "/nonexistent/a.json", "/nonexistent/b.json"], "a.json: results file not found"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(ev.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_compare_prints_the_report(tmp_path, capsys):
    (tmp_path / "b.json").write_text(json.dumps({"results": BEFORE}))
    (tmp_path / "a.json").write_text(json.dumps({"results": AFTER}))
    ev.main(["--compare", str(tmp_path / "b.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "c.json")])
    assert "forgetting detected" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["accuracy_drop"] == pytest.approx(0.15)


@pytest.mark.real_model
def test_an_adapter_with_nonzero_weights_changes_the_results(smollm_dir, tmp_path):
    """Guards the harness bug where --adapter is accepted but never reaches the forward pass."""
    from lora import apply_lora, lora_modules, save_adapter
    from model import load_pretrained

    model, _ = load_pretrained(smollm_dir)
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"))
    torch.manual_seed(0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.2)
    save_adapter(model, tmp_path / "adapter")
    argv = ["--model", str(smollm_dir), "--tasks", "ppl", "--limit", "2"]
    ev.main(argv + ["--out", str(tmp_path / "base.json")])
    ev.main(argv + ["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora.json")])
    base = json.loads((tmp_path / "base.json").read_text())
    tuned = json.loads((tmp_path / "lora.json").read_text())
    assert tuned["adapter"] == str(tmp_path / "adapter")
    assert abs(tuned["results"]["ppl"]["nll"] - base["results"]["ppl"]["nll"]) > 1e-2  # noise is ~1e-6
    assert base["results"]["ppl"]["n"] == 2 and len(base["results"]["ppl"]["items"]) == 2
