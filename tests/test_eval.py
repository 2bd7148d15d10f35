"""eval.py and tasks/: log-likelihood and greedy scoring against hand computations and an independent
transformers scorer on every benchmark, strict answer matching, splits and limits, paired before/after
comparisons with intervals, the CLI, and an adapter that must change the results."""
import json
import random
from pathlib import Path

import pytest
import torch

import eval as ev
from errors import run_cli
from tasks.benchmarks import mmlu_as_benchmark, score_benchmark
from tasks.common import Options
from tasks.domain import domain_nll_request
from tasks.loglikelihood import score_continuations, split_request
from tasks.matching import cut_answer, strict_match, substring_match
from tests.tiny import tiny_llama

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
BENCHMARKS = ("hellaswag", "arc_easy", "arc_challenge", "winogrande", "lambada", "mmlu")


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


def hand_logprob(model, ids: list[int], n_ctx: int) -> tuple[float, bool]:
    """(Σ_{t >= n_ctx} log softmax(logits[t-1])[ids[t]], every ids[t] the argmax) from one full forward pass."""
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].double().log_softmax(-1)
    return (sum(lp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids))),
            all(int(lp[t - 1].argmax()) == ids[t] for t in range(n_ctx, len(ids))))


# ----------------------------------------------------------------------------- scoring

def test_score_continuations_equals_logprobs_and_greedy_from_full_logits_whatever_the_batching():
    model = tiny_llama(std=0.2)
    rng = random.Random(0)
    requests = []
    for _ in range(9):  # several continuations share each context, with ragged lengths on both sides
        ctx = [rng.randrange(101) for _ in range(rng.randint(1, 10))]
        requests += [(ctx, [rng.randrange(101) for _ in range(rng.randint(1, 7))]) for _ in range(rng.randint(1, 4))]
    # Greedy continuations of a few contexts, so that both verdicts occur.
    for ctx in ([3, 4], [7, 8, 9, 10]):
        ids = list(ctx)
        for _ in range(3):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        requests.append((ctx, ids[len(ctx):]))
    requests.append(([5], []))  # an empty continuation scores 0
    ref = [hand_logprob(model, c + x, len(c)) if x else (0.0, True) for c, x in requests]
    for batch_size, max_tokens in [(16, 2048), (3, 8), (1, 1)]:
        scores, greedy = score_continuations(model, requests, batch_size=batch_size, max_tokens=max_tokens)
        assert scores == pytest.approx([r[0] for r in ref], abs=1e-4), (batch_size, max_tokens)
        assert greedy == [r[1] for r in ref]
    assert greedy[-3:] == [True, True, True] and not all(greedy)
    assert model.model.layers[0].self_attn.kv_cache is None  # the cache is released


def test_greedy_generation_dropping_stopped_rows_gives_each_prompt_its_own_continuation(monkeypatch):
    """generate_ids drops rows that have stopped from the batch and the KV cache (a speed path): every row
    must still be the continuation it has alone, cut at its first stop token."""
    from model import generate_ids

    model = tiny_llama(std=0.5)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 101) for _ in range(rng.randint(1, 9))] for _ in range(16)]
    free = generate_ids(model, prompts, 12, stop_ids=[], pad_id=0)
    stops = sorted({row[k] for row, k in zip(free[:6], (1, 3, 5, 7, 9, 11))})  # rows stop at different steps
    dropped = []
    original = type(model).select_kv_cache
    monkeypatch.setattr(type(model), "select_kv_cache", lambda m, rows: (dropped.append(len(rows)), original(m, rows)))
    out = generate_ids(model, prompts, 12, stop_ids=stops, pad_id=0)
    assert dropped, "no row was dropped: the test does not exercise the path"
    for p, row, got in zip(prompts, free, out):
        cut = next((j for j, t in enumerate(row) if t in stops), len(row))
        assert got == row[:cut] == generate_ids(model, [p], 12, stop_ids=stops, pad_id=0)[0]
    assert model.model.layers[0].self_attn.kv_cache is None


@pytest.mark.real_model
def test_choice_starting_with_a_space_keeps_its_space_token(tok):
    ctx, cont = split_request(tok, "Question: What is the capital of France?\nAnswer:", " Paris")
    assert cont == tok.encode(" Paris") and len(cont) == 1  # "ĠParis", not "Ġ" + "Paris"
    assert ctx == tok.encode("Question: What is the capital of France?\nAnswer:", add_bos=tok.adds_bos)
    # A context ending in a space scores the same tokens: the space moves to the continuation.
    assert split_request(tok, "Question: What is the capital of France?\nAnswer: ", "Paris") == (ctx, cont)


@pytest.mark.real_model
def test_each_scoring_rule_scores_what_the_harness_scores_on_a_tiny_model(tok, tiny_smol):
    mc = dict(id="a", context="The cat", choices=[" sat.", " ran away quickly."], gold=1, scoring="mc")
    partial = dict(id="b", context="Tom gave Ann a gift because ", choices=["Tom", "Ann"], gold=0,
                   continuation=" was kind.", scoring="partial")
    greedy = dict(id="c", context="One, two, three,", choices=[" four"], gold=0, scoring="greedy")
    items, _ = score_benchmark(tiny_smol, tok, [mc, partial, greedy], Options())

    def ref(context, continuation):
        ctx = tok.encode(context)
        return hand_logprob(tiny_smol, tok.encode(context + continuation), len(ctx))

    mc_ref = [ref(mc["context"], c)[0] for c in mc["choices"]]
    assert items[0]["logprobs"] == pytest.approx(mc_ref, abs=1e-4)
    norm = [lp / len(c.lstrip(" ")) for lp, c in zip(mc_ref, mc["choices"])]  # characters without the space
    assert items[0]["pred_norm"] == max(range(2), key=norm.__getitem__)
    assert items[0]["correct"] == (items[0]["pred"] == 1) and items[0]["chance"] == 0.5
    part_ref = [ref(partial["context"] + c, partial["continuation"])[0] for c in partial["choices"]]
    assert items[1]["logprobs"] == pytest.approx(part_ref, abs=1e-4) and "correct_norm" not in items[1]
    lp, is_greedy = ref(greedy["context"], " four")
    assert items[2]["logprobs"] == pytest.approx([lp], abs=1e-4) and items[2]["correct"] == is_greedy
    assert items[2]["nll"] == pytest.approx(-lp, abs=1e-4) and items[2]["tokens"] == len(tok.encode(" four"))


@pytest.mark.real_model
def test_acc_norm_divides_by_the_choice_length_without_its_leading_space(tok, monkeypatch):
    # Fixed log-probs: the short choice wins on the sum, the long one per character.
    monkeypatch.setattr("tasks.benchmarks.score_continuations",
                        lambda model, reqs, **kw: ([-2.0, -3.0], [False, False]))
    row = dict(id="x", context="q", choices=[" ab", " bbbbbbbbbb"], gold=1, scoring="mc")
    item = score_benchmark(None, tok, [row], Options())[0][0]
    assert item["pred"] == 0 and item["pred_norm"] == 1  # -2/2 < -3/10
    assert (item["correct"], item["correct_norm"]) == (False, True)


@pytest.mark.real_model
def test_domain_nll_is_the_training_loss_of_the_reference_completion(tok, tiny_smol):
    from data import collate, tokenize_example

    row = dict(prompt="What class of drug is metformin?", completion="Metformin is a biguanide.", answer="biguanide")
    ctx, cont = domain_nll_request(tok, row, max_len=512)
    nll = -score_continuations(tiny_smol, [(ctx, cont)])[0][0] / len(cont)
    batch = collate([tokenize_example(tok, row, 512)], tok.pad_id)
    with torch.no_grad():
        loss = tiny_smol(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])
    assert nll == pytest.approx(loss.item(), abs=1e-4)
    assert tok.decode(cont).strip() == "Metformin is a biguanide."  # the answer span, end-of-turn included


def reference_scores(hf, hf_tok, row) -> tuple[list[float], bool]:
    """An independent scorer in transformers: the item's requests right-padded into one batch, each scored from
    its own full forward pass, with lm-evaluation-harness's split: continuation tokens =
    enc(context + continuation)[len(enc(context)):]. Returns (log-probs, greedy match of the last request)."""
    if row["scoring"] == "partial":
        pairs = [(row["context"] + c, row["continuation"]) for c in row["choices"]]
    else:
        pairs = [(row["context"], c) for c in row["choices"]]
    encoded = [(len(hf_tok(ctx)["input_ids"]), hf_tok(ctx + cont)["input_ids"]) for ctx, cont in pairs]
    width = max(len(whole) for _, whole in encoded)
    ids = torch.tensor([whole + [0] * (width - len(whole)) for _, whole in encoded])
    mask = torch.tensor([[1] * len(whole) + [0] * (width - len(whole)) for _, whole in encoded])
    with torch.no_grad():
        lp = hf(ids, attention_mask=mask).logits.double().log_softmax(-1)
    lps = [sum(lp[i, t - 1, whole[t]].item() for t in range(n_ctx, len(whole)))
           for i, (n_ctx, whole) in enumerate(encoded)]
    n_ctx, whole = encoded[-1]
    greedy = all(int(lp[len(encoded) - 1, t - 1].argmax()) == whole[t] for t in range(n_ctx, len(whole)))
    return lps, greedy


@pytest.mark.real_model
@pytest.mark.shared_data
@pytest.mark.parametrize("task", BENCHMARKS)
def test_benchmark_scores_agree_with_a_transformers_scorer(task, smollm_dir, smollm, tok):
    path = ev.TASKS[task].data
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared/data is absent)")
    from transformers import AutoTokenizer, LlamaForCausalLM

    # The 40 shortest items, so that the reference scorer stays within seconds.
    rows = sorted(ev.load_task_rows(task, path), key=lambda r: len(json.dumps(r)))[:40]
    items, _ = ev.TASKS[task].score(smollm[0], tok, rows, Options(batch_size=32))
    hf = LlamaForCausalLM.from_pretrained(smollm_dir).eval()
    hf_tok = AutoTokenizer.from_pretrained(smollm_dir)
    agree, max_diff = 0, 0.0
    for row, item in zip(rows, items):
        row = mmlu_as_benchmark(row) if task == "mmlu" else row
        ref, greedy = reference_scores(hf, hf_tok, row)
        if row["scoring"] == "greedy":
            agree += greedy == item["correct"]
        else:
            agree += max(range(len(ref)), key=ref.__getitem__) == item["pred"]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(ref, item["logprobs"])))
    assert agree >= 39, f"{agree}/40 verdicts agree"
    assert max_diff < 1e-2, max_diff


@pytest.mark.shared_data
def test_benchmark_splits_are_disjoint_halves_fixed_by_the_item_ids():
    for task in ("hellaswag", "winogrande"):
        path = ev.TASKS[task].data
        if not path.is_file():
            pytest.skip(f"{path} not found (../shared/data is absent)")
        dev, test = (ev.load_task_rows(task, path, split=s) for s in ("dev", "test"))
        everything = ev.load_task_rows(task, path)
        assert not {r["id"] for r in dev} & {r["id"] for r in test}
        assert len(dev) + len(test) == len(everything)
        assert 0.45 < len(dev) / len(everything) < 0.55
        assert ev.load_task_rows(task, path, split="test", limit=50) == [test[i * len(test) // 50] for i in range(50)]


# ----------------------------------------------------------------------------- answer matching

def test_cut_answer_keeps_the_first_paragraph_only():
    assert cut_answer(" Paris.\n\nQuestion: What is ...") == "Paris."
    assert cut_answer(" Paris\nQuestion: What is the capital of Spain?\nAnswer: Madrid") == "Paris"


@pytest.mark.parametrize("response, answers, expected", [
    ("The answer is 8.", ["8"], True),
    ("The answer is 18.", ["8"], False),  # a number inside a longer number
    ("It is 8.5 meters.", ["8"], False),
    ("About 100 degrees.", ["10"], False),
    ("1,000 people came.", ["1"], False),
    ("The mean is the average.", ["mean"], True),
    ("It means the average.", ["mean"], False),  # a word inside a longer word
    ("You translate it.", ["late"], False),
    ("It is PARIS, France.", ["paris"], True),
    ("Paris is lovely. The capital is London.", ["London"], False),  # only the first sentence is the answer
    ("Madrid\nOr maybe Paris", ["Paris"], False),  # only the first line
    ("At 3.5 kg it is heavy.", ["3.5"], True),  # a decimal point does not end the sentence
    ("It is an ACE-inhibitor.", ["ace inhibitor", "ace-inhibitor"], True),  # an alias with punctuation
    ("He lived in the U.S. for years.", ["u.s."], True),
    ("She moved to Washington,   D.C. last year.", ["washington, d.c."], True),  # spacing normalized
    ("Fifty-six.", ["56", "fifty-six"], True),
    ("", ["a"], False),
])
def test_strict_match_needs_word_and_number_boundaries_in_the_answer_span(response, answers, expected):
    assert strict_match(response, answers) is expected


def test_substring_match_is_the_original_loose_rule():
    assert substring_match("It means 18", ["mean"]) and substring_match("It means 18", ["8"])
    assert not substring_match("London", ["Paris", "paris, france"])


# ----------------------------------------------------------------------------- instruction following

CHECK_CASES = {  # the original 16-item checklist, now inside data/instructions.jsonl: (passes, fails)
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


@pytest.mark.parametrize("name", sorted(CHECK_CASES))
def test_the_original_checklist_items_pass_a_good_response_and_fail_a_bad_one(name):
    from tasks.instruction_checks import check_response

    rows = {r["id"]: r for r in ev.load_task_rows("instructions", ev.TASKS["instructions"].data)}
    good, bad = CHECK_CASES[name]
    assert check_response(rows[name], good)["passed"] is True
    assert check_response(rows[name], bad)["passed"] is False


# ----------------------------------------------------------------------------- intervals and comparisons

def qa_result(correct: list[bool], cats=None) -> dict:
    items = [dict(id=f"q{i}", correct=c, category=(cats or ["all"])[i % len(cats or ["all"])])
             for i, c in enumerate(correct)]
    res = dict(**ev.summarize(ev.TASKS["general_qa"], items), n=len(items), items=items, split="test",
               match="strict")
    by_cat = {}
    for it in items:
        by_cat.setdefault(it["category"], []).append(it["correct"])
    res["category_accuracy"] = {c: sum(v) / len(v) for c, v in by_cat.items()}
    return res


def nll_result(nlls: list[float], tokens: list[int]) -> dict:
    items = [dict(id=f"t{i}", nll=x, tokens=n) for i, (x, n) in enumerate(zip(nlls, tokens))]
    return dict(**ev.summarize(ev.TASKS["ppl"], items), n=len(items), items=items, split="test")


def benchmark_result(correct: list[bool], n_choices: int = 4) -> dict:
    items = [dict(id=f"h{i}", correct=c, correct_norm=c, chance=1 / n_choices) for i, c in enumerate(correct)]
    return dict(**ev.summarize(ev.TASKS["hellaswag"], items), n=len(items), items=items, split="test")


def test_summaries_carry_wilson_intervals_token_weighted_nll_and_the_chance_flag():
    import stats

    qa = qa_result([True] * 30 + [False] * 70)
    assert qa["accuracy"] == 0.3 and qa["accuracy_ci"] == pytest.approx(list(stats.wilson_interval(30, 100)))
    ppl = nll_result([1.0, 3.0], [30, 10])
    assert ppl["nll"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)  # token-weighted, not the mean of items
    assert ppl["nll_ci"][0] <= ppl["nll"] <= ppl["nll_ci"][1]
    assert benchmark_result([True] * 27 + [False] * 73)["acc_at_chance"]  # 0.27, interval includes 0.25
    above = benchmark_result([True] * 45 + [False] * 55)
    assert not above["acc_at_chance"] and above["chance"] == 0.25
    assert "at chance" in ev.summary_line("hellaswag", benchmark_result([True] * 27 + [False] * 73))


def test_compare_forgetting_takes_its_verdict_from_the_paired_interval():
    before = {"general_qa": qa_result([True] * 60 + [False] * 40, cats=["math", "science"]),
              "ppl": nll_result([2.0] * 40, [20] * 40)}
    rng = random.Random(0)
    after_ppl = [2.3 + rng.uniform(-0.05, 0.05) for _ in range(40)]  # every text worse: a clear rise
    after = {"general_qa": qa_result([True] * 35 + [False] * 65, cats=["math", "science"]),  # 25 flips right->wrong
             "ppl": nll_result(after_ppl, [20] * 40)}
    c = ev.compare_forgetting(before, {"results": after})  # an OUT.json works as well
    rows = {(r["task"], r["metric"]): r for r in c["metrics"]}
    qa = rows["general_qa", "accuracy"]
    assert qa["delta"] == pytest.approx(-0.25) and qa["delta_ci"][1] < 0 and qa["verdict"] == "forgot"
    assert qa["p"] < 1e-6  # McNemar: 25 discordant pairs, all one way
    nll = rows["ppl", "nll"]
    assert nll["delta"] == pytest.approx(sum(after_ppl) / 40 - 2.0) and nll["verdict"] == "forgot"
    assert c["forgot"] == ["general_qa accuracy", "ppl nll"] and "Forgetting detected" in c["summary"]
    assert set(c["categories"]) == {"math", "science"}
    report = ev.format_report(c)
    assert "| general_qa | accuracy | 100 |" in report and "forgot" in report and "split: test" in report
    assert "answer matching: strict" in report


def test_a_small_or_balanced_change_is_no_detectable_change_and_improvement_is_named():
    before = {"general_qa": qa_result([True] * 50 + [False] * 50)}
    # 3 items lost and 1 gained: a point estimate of -0.02 that the interval cannot tell from zero.
    after = {"general_qa": qa_result([True] * 47 + [False] * 3 + [True] + [False] * 49)}
    row = ev.compare_forgetting(before, after)["metrics"][0]
    assert row["delta"] == pytest.approx(-0.02) and row["delta_ci"][0] < 0 < row["delta_ci"][1]
    assert row["verdict"] == "no detectable change"
    better = {"general_qa": qa_result([True] * 80 + [False] * 20)}
    c = ev.compare_forgetting(before, better)
    assert c["metrics"][0]["verdict"] == "improved" and c["improved"] == ["general_qa accuracy"] and not c["forgot"]


def test_a_benchmark_at_chance_on_both_sides_is_at_chance_never_a_change():
    before = {"hellaswag": benchmark_result([True] * 30 + [False] * 70)}
    after = {"hellaswag": benchmark_result([True] * 22 + [False] * 78)}
    assert {r["verdict"] for r in ev.compare_forgetting(before, after)["metrics"]} == {"at chance"}


def test_sides_scored_on_different_items_cannot_be_paired():
    with pytest.raises(ev.ForgetlabError, match="different items"):
        ev.compare_forgetting({"general_qa": qa_result([True] * 10)}, {"general_qa": qa_result([True] * 11)})


# ----------------------------------------------------------------------------- data and CLI

def test_limit_takes_rows_evenly_spaced_within_the_split_and_bad_rows_name_their_line(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(dict(question=f"q{i}", answer=str(i), split=["dev", "test"][i % 2])) + "\n"
                         for i in range(20)))
    assert [r["question"] for r in ev.load_task_rows("general_qa", f, limit=3)] == ["q0", "q6", "q13"]
    assert [r["question"] for r in ev.load_task_rows("general_qa", f, "test", limit=3)] == ["q1", "q7", "q13"]
    assert ev.load_task_rows("general_qa", f, "dev")[0]["id"] == "qa.jsonl:1"
    f.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    with pytest.raises(ev.ForgetlabError, match=r"qa.jsonl:2: .*missing field 'answer'"):
        ev.load_task_rows("general_qa", f)
    f.write_text('{"question": "q", "answer": "a", "split": "train"}\n')
    with pytest.raises(ev.ForgetlabError, match=r"qa.jsonl:1: split must be"):
        ev.load_task_rows("general_qa", f)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "general_qa,bogus"], "unknown task 'bogus'"),
    (["--model", "/nonexistent/model"], "/nonexistent/model: model directory not found"),
    (["--tasks", "ppl,domain_recall", "--data", "x.jsonl"], "--data replaces one task's data"),
    (["--tasks", "ppl", "--data", "/nonexistent.jsonl"], "/nonexistent.jsonl: data file not found"),
    (["--adapter", "/nonexistent/adapter"], "/nonexistent/adapter: adapter directory not found"),
    (["--split", "train"], "argument --split: invalid choice"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--compare", "/nonexistent/a.json", "/nonexistent/b.json"], "a.json: results file not found"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(ev.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_compare_prints_the_report_and_rejects_files_without_items(tmp_path, capsys):
    (tmp_path / "b.json").write_text(json.dumps({"results": {"general_qa": qa_result([True] * 60 + [False] * 40)}}))
    (tmp_path / "a.json").write_text(json.dumps({"results": {"general_qa": qa_result([True] * 30 + [False] * 70)}}))
    ev.main(["--compare", str(tmp_path / "b.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "c.json")])
    assert "Forgetting detected" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["forgot"] == ["general_qa accuracy"]
    (tmp_path / "old.json").write_text(json.dumps({"results": {"general_qa": {"accuracy": 0.5}}}))
    with pytest.raises(ev.ForgetlabError, match="old.json: results.general_qa.items"):
        ev.main(["--compare", str(tmp_path / "old.json"), str(tmp_path / "a.json")])


def test_cli_compare_of_one_train_run_prints_its_report_again(tmp_path, capsys):
    before, after = {"general_qa": qa_result([True] * 60 + [False] * 40)}, {"general_qa": qa_result([True] * 62 + [False] * 38)}
    run = dict(training={}, before=before, after=after, comparison=ev.compare_forgetting(before, after))
    (tmp_path / "results.json").write_text(json.dumps(run))
    ev.main(["--compare", str(tmp_path / "results.json")])
    assert capsys.readouterr().out.strip() == ev.format_report(run["comparison"]).strip()
    (tmp_path / "bad.json").write_text(json.dumps(dict(before=before, after={"general_qa": {"accuracy": 1}})))
    with pytest.raises(ev.ForgetlabError, match="bad.json: after: results.general_qa.items"):
        ev.main(["--compare", str(tmp_path / "bad.json")])


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
    assert base["split"] == "test" and base["results"]["ppl"]["split"] == "test"


def test_the_default_levels_benchmarks_ship_with_the_project_and_equal_the_shared_copies():
    """Every task of the default levels reads a file inside the repository, so a checkout without ../shared
    evaluates the same items; where ../shared is present, the shipped files are its very bytes."""
    import eval as ev

    for level in ("full", "study", "stream"):
        for task in ev.LEVELS[level]:
            path = ev.TASKS[task].data
            assert path.is_file() and path.resolve().is_relative_to(ev.REPO), (level, task, path)
    for name, shared in (("arc_easy", "arc_easy.jsonl"), ("lambada", "lambada_openai.jsonl")):
        if (ev.SHARED / shared).is_file():
            assert ev.TASKS[name].data.read_bytes() == (ev.SHARED / shared).read_bytes(), name
            for level in ("full", "study"):  # the very items a level evaluates, whichever copy is read
                n = ev.LEVELS[level][name]
                ids = [r["id"] for r in ev.load_task_rows(name, ev.TASKS[name].data, "test", n)]
                assert ids == [r["id"] for r in ev.load_task_rows(name, ev.SHARED / shared, "test", n)]


def test_a_task_that_could_not_be_evaluated_is_named_in_the_report(tmp_path):
    import eval as ev

    missing = tmp_path / "absent.jsonl"
    before = {"hellaswag": {"skipped": f"{missing} not found"}}
    report = ev.format_report(ev.compare_forgetting(before, before))
    assert f"hellaswag: not evaluated: {missing} not found" in report
