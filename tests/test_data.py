import json

import pytest
import torch

from data import (batches_by_length, collate, create_replay_dataset, detect_format, load_dataset, load_jsonl,
                  to_messages, tokenize_dataset, tokenize_example)
from errors import ForgetlabError
from model import IGNORE_INDEX
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(smollm_dir):
    return Tokenizer.from_dir(smollm_dir)


def labelled_text(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX], skip_special_tokens=False)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


ROWS = {
    "prompt_completion": {"prompt": "What is 2+2?", "completion": "It is 4."},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 2", "output": "It is 4."},
    "chat": {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]},
}


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_loss_is_only_on_the_answer_and_its_end_of_turn_token(tok, fmt):
    row = ROWS[fmt]
    assert detect_format(row) == fmt
    ex = tokenize_example(tok, row, max_len=512)
    assert labelled_text(tok, ex) == "It is 4.<|im_end|>"
    # the labelled tokens are exactly the tokens at those positions, and the prompt is fully masked
    first = next(i for i, y in enumerate(ex["labels"]) if y != IGNORE_INDEX)
    assert all(y == IGNORE_INDEX for y in ex["labels"][:first])
    assert tok.decode(ex["input_ids"][:first], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert all(y in (IGNORE_INDEX, x) for x, y in zip(ex["input_ids"], ex["labels"]))
    # the concatenated pieces decode to the chat template's rendering of the whole conversation
    full = tok.apply_chat_template(to_messages(row), add_generation_prompt=False)
    assert tok.decode(ex["input_ids"], skip_special_tokens=False) == full
    assert not ex["truncated"]


def test_alpaca_input_is_part_of_the_prompt_and_empty_input_is_dropped(tok):
    assert to_messages(ROWS["alpaca"])[0]["content"] == "Add the numbers.\n\n2 and 2"
    assert to_messages({"instruction": "Say hi.", "input": "", "output": "Hi"})[0]["content"] == "Say hi."


def test_every_assistant_turn_of_a_chat_is_trained_and_no_user_turn(tok):
    row = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Goodbye."}]}
    ex = tokenize_example(tok, row, max_len=512)
    assert labelled_text(tok, ex) == "Hello.<|im_end|>Goodbye.<|im_end|>"
    assert "Be terse." in tok.decode(ex["input_ids"])


def test_plain_text_rows_are_trained_on_every_token(tok):
    ex = tokenize_example(tok, {"text": "The cat sat on the mat."}, max_len=512)
    assert ex["labels"] == ex["input_ids"] == tok.encode("The cat sat on the mat.")  # SmolLM2 adds no BOS
    assert not tok.adds_bos


def test_truncation_keeps_the_start_and_is_counted(tok):
    rows = [{"prompt": "Q", "completion": "word " * 100}, ROWS["prompt_completion"]]
    examples, n_truncated = tokenize_dataset(tok, rows, max_len=64)
    assert n_truncated == 1
    assert [len(e["input_ids"]) for e in examples][0] == 64
    # a prompt longer than max_len leaves no answer token: the example is dropped, still counted as truncated
    examples, n_truncated = tokenize_dataset(tok, [{"prompt": "long " * 100, "completion": "a"}], max_len=40)
    assert examples == [] and n_truncated == 1


def test_collate_pads_on_the_right_with_masked_labels():
    exs = [dict(input_ids=[5, 6, 7], labels=[-100, 6, 7]), dict(input_ids=[8], labels=[8])]
    b = collate(exs, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["input_ids"].dtype == torch.long


def fake_examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (n,), generator=g).tolist()
    return [dict(input_ids=[i + 1] * L, labels=[i + 1] * L) for i, L in enumerate(lengths)]


def test_length_batches_cover_each_example_once_and_pad_little():
    exs = fake_examples(300)
    batches = batches_by_length(exs, batch_size=8, pad_id=0, seed=1)
    seen = sorted(i for b in batches for i in b["indices"])
    assert seen == list(range(300))
    for b in batches:  # rows are the examples the indices name
        for row, i in zip(b["input_ids"], b["indices"]):
            assert row[:len(exs[i]["input_ids"])].tolist() == exs[i]["input_ids"]
    padded = sum(b["input_ids"].numel() for b in batches)
    real = sum(len(e["input_ids"]) for e in exs)
    assert padded < 1.15 * real  # random batches of this length spread would pad ~1.6x


def test_length_batches_are_deterministic_per_seed_and_reshuffle_across_seeds():
    exs = fake_examples(100)
    a = [b["indices"] for b in batches_by_length(exs, 4, 0, seed=3)]
    assert a == [b["indices"] for b in batches_by_length(exs, 4, 0, seed=3)]
    assert a != [b["indices"] for b in batches_by_length(exs, 4, 0, seed=4)]
    ordered = batches_by_length(exs, 4, 0, shuffle=False)
    lengths = [len(exs[i]["input_ids"]) for b in ordered for i in b["indices"]]
    assert lengths == sorted(lengths, reverse=True)


def test_replay_mixes_the_lesson_fraction_deterministically():
    domain = [f"d{i}" for i in range(465)]
    general = [f"g{i}" for i in range(200)]
    mixed = create_replay_dataset(domain, general, 0.15, seed=0)
    replayed = [x for x in mixed if x.startswith("g")]
    assert len(replayed) == int(465 * 0.15) == 69
    assert len(set(replayed)) == 69  # sampled without replacement
    assert sorted(x for x in mixed if x.startswith("d")) == sorted(domain)
    assert mixed != domain + replayed  # shuffled, not appended
    assert mixed == create_replay_dataset(domain, general, 0.15, seed=0)
    assert mixed != create_replay_dataset(domain, general, 0.15, seed=1)
    assert create_replay_dataset(domain, general, 0.0, seed=0) != domain  # still shuffled, nothing added
    assert len(create_replay_dataset(domain[:10], general[:3], 1.0, seed=0)) == 20  # more asked than exist


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '], ":2: malformed JSON"),
    (['[1, 2]'], ":1: expected a JSON object, got list"),
    (['{"prompt": "a"}'], ":1: missing fields"),
    (['{"prompt": "a", "completion": 3}'], ":1: field 'completion' must be a string, got int"),
    (['{"instruction": "a", "input": null, "output": "b"}'], ":1: field 'input' must be a string, got NoneType"),
    (['{"messages": "hi"}'], ":1: 'messages' must be a non-empty list"),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], ":1: messages[0] has role 'robot'"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], ":1: 'messages' has no non-empty assistant turn"),
    (['', '{"text": ""}'], ":2: field 'text' is empty"),
    (['', '  '], ": empty dataset"),
])
def test_bad_rows_name_the_file_line_and_problem(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ForgetlabError) as e:
        load_dataset(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ForgetlabError, match="nope.jsonl: file not found"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_load_jsonl_accepts_any_object_rows_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [json.dumps({"question": "q", "answer": "a"}), "", json.dumps({"x": 1})])
    assert load_jsonl(path) == [{"question": "q", "answer": "a"}, {"x": 1}]


def test_shipped_domain_data_loads_and_fits_the_default_max_len(tok):
    from train_config import TrainConfig

    rows = load_dataset(TrainConfig().data)
    n_drugs = len({r["drug"] for r in load_jsonl(TrainConfig().data)})
    assert len(rows) == 5 * n_drugs == 365  # 73 trained drugs x 5 aspects; 20 drugs are held out (domain_unseen)
    examples, n_truncated = tokenize_dataset(tok, rows, TrainConfig().max_len)
    assert len(examples) == len(rows) and n_truncated == 0
