"""tasks/instruction_checks.py: every check type on a response that passes and one that fails, the loader's
one-line errors on bad rows, and the shape of the shipped data/instructions.jsonl."""
import json
from collections import Counter
from pathlib import Path

import pytest

from errors import ForgetlabError
from tasks import instruction_checks as ic

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "instructions.jsonl"

CHECKLIST_NAMES = ("basic_grammar", "simple_arithmetic", "instruction_following", "factual_knowledge", "word_limit",
                   "numbered_list", "bullet_list", "valid_json", "all_lowercase", "required_keyword", "yes_no_answer",
                   "one_word_answer", "repeat_exactly", "count_to_five", "uppercase_word", "no_commas")

# (check, a response that passes, a response that fails). Each failing response misses the rule narrowly, so a
# check that is too lenient fails its test.
CASES = {
    "max_words": ({"n": 5}, "The moon is very bright.", "The moon is very bright tonight."),
    "min_words": ({"n": 4}, "Cats like warm beds.", "Cats like beds."),
    "max_sentences": ({"n": 2}, "It rains. Pi is 3.14 today!", "It rains. It pours. It stops."),
    "min_sentences": ({"n": 3}, "Leaves fall. Days shorten. It is cold.", "Leaves fall. Days shorten."),
    "looks_like_sentence": ({}, "The weather is sunny today.", "the weather is sunny today."),
    "numbered_list": ({"n": 3}, "1. apple\n2) pear\n3. plum", "1. apple\n2. pear\n3. plum\n4. fig"),
    "bullet_list": ({"n": 2}, "- read\n* swim", "- read\n- swim\n- cook"),
    "json_keys": ({"keys": ["name", "age"]}, '```json\n{"name": "Anna", "age": 30}\n```',
                  'Sure! {"name": "Anna", "age": 30}'),
    "markdown_table": ({"columns": 2, "rows": 2}, "| Fruit | Color |\n|---|---|\n| apple | red |\n| lime | green |",
                       "| Fruit | Color |\n|---|---|\n| apple | red |"),
    "has_title": ({}, "<<Snow Day>>\nWhite flakes fall.", "<Snow Day>\nWhite flakes fall."),
    "all_lowercase": ({}, "dogs love long walks.", "dogs love long walks with Max."),
    "all_uppercase": ({}, "NEVER GIVE UP!", "NEVER GIVE Up!"),
    "capitalized_word": ({"word": "stop"}, "Always STOP at red lights.", "Always Stop at red lights."),
    "includes_words": ({"words": ["tall", "quiet"]}, "Tall trees stand quiet.", "Tall trees stand quietly."),
    "includes_any": ({"words": ["4", "four"]}, "The answer is 4.", "The answer is 44."),
    "includes_n_of": ({"words": ["whale", "shark", "seal"], "n": 2}, "Whales and a shark.", "A whale and a whale."),
    "excludes_words": ({"words": ["hot"]}, "Summer is a time of hotels and beaches.", "Summer is Hot."),
    "letter_count": ({"letter": "z", "n": 3}, "Zoe zipped the zebra bag.", "Zoe zipped the bag."),
    "includes_phrase": ({"phrase": "The cat sat on the mat."}, "Sure: the cat  sat on the mat.",
                        "The cat sat on a mat."),
    "includes_sequence": ({"numbers": [1, 2, 3]}, "Counting: 1, 2, 3!", "Counting: 1, 3, 2, 3."),
    "no_commas": ({}, "Cats sleep all day long.", "Cats sleep, eat and play."),
    "wrapped_in_quotes": ({}, "“The moon glows softly.”", "\"The moon glows softly.\" That is all."),
    "starts_with": ({"text": "Once upon a time"}, "Once upon a time, a fox ran.", "Once, upon a hill, a fox ran."),
    "ends_with": ({"text": "See you soon."}, "Take care and see you soon!", "See you soon, take care."),
    "equals": ({"text": "She goes to school every day."}, "she goes to school every day",
               "Corrected: She goes to school every day."),
    "one_of": ({"options": ["tea", "coffee"]}, "Coffee.", "Coffee, please."),
}


def test_every_check_type_has_a_pass_and_a_fail_case():
    assert set(CASES) == set(ic.CHECKS)


@pytest.mark.parametrize("check_type", sorted(CASES))
def test_check_passes_the_good_response_and_fails_the_bad_one(check_type):
    params, good, bad = CASES[check_type]
    assert ic.CHECKS[check_type](good, **params) is True
    assert ic.CHECKS[check_type](bad, **params) is False


@pytest.mark.parametrize("check_type", sorted(CASES))
def test_check_fails_an_empty_response(check_type):
    """An empty generation (a model that emits end-of-turn at once) never satisfies an instruction."""
    params, _, _ = CASES[check_type]
    if check_type == "excludes_words":
        pytest.skip("nothing is trivially absent from an empty response; the prompt's other checks catch it")
    assert ic.CHECKS[check_type]("", **params) is False


def test_every_check_type_documents_what_passes():
    for name, f in ic.CHECKS.items():
        assert f.__doc__ and "\n" not in f.__doc__.strip(), name


def test_keyword_checks_accept_a_plural_but_not_a_longer_word():
    assert ic.includes_words("Eggs and toast.", ["egg", "toast"])
    assert not ic.includes_words("Eggplant and toast.", ["egg", "toast"])
    assert not ic.excludes_words("The stars came out.", ["star"])
    assert ic.includes_n_of("Whales, sharks and an octopus.", ["whale", "shark", "octopus"], 3)


def test_a_number_does_not_match_inside_a_decimal():
    """The freezing point asked for is 0: "-18.0°C" must not pass as containing "0"."""
    assert not ic.includes_any("Water freezes at -18.0°C.", ["0", "zero"])
    assert not ic.includes_any("About 4.5 days.", ["4"])
    assert ic.includes_any("Water freezes at 0°C.", ["0", "zero"])


def test_counting_as_a_numbered_list_still_counts():
    """Small chat models answer "Count from 1 to 5" with "1. 1\n2. 2 ..."; the list markers are not numbers."""
    assert ic.includes_sequence("1. 1\n2. 2\n3. 3\n4. 4\n5. 5", [1, 2, 3, 4, 5])
    assert not ic.includes_sequence("1. 5\n2. 4\n3. 3", [1, 2, 3])


def test_a_horizontal_rule_is_not_a_bullet():
    assert ic.bullet_items("* * *\n- tea\n---") == 1
    assert ic.numbered_items("1.\n2. milk") == 1


def test_check_response_passes_only_when_all_checks_pass():
    row = {"checks": [{"type": "max_words", "n": 3}, {"type": "includes_any", "words": ["green"]}]}
    assert ic.check_response(row, "Green.") == {"passed": True, "failed": []}
    assert ic.check_response(row, "It is green grass.") == {"passed": False, "failed": ["max_words"]}
    assert ic.check_response(row, "The color blue is.") == {"passed": False, "failed": ["max_words", "includes_any"]}


# ----------------------------------------------------------------------------- the loader

GOOD = {"id": "a", "prompt": "Say OK.", "checks": [{"type": "equals", "text": "OK"}], "category": "only_output",
        "split": "dev"}


def write_rows(tmp_path, rows) -> Path:
    path = tmp_path / "instr.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_loader_returns_valid_rows(tmp_path):
    rows = [GOOD, dict(GOOD, id="b", split="test")]
    assert ic.load_instructions(write_rows(tmp_path, rows)) == rows


@pytest.mark.parametrize("bad_row, message", [
    (dict(GOOD, checks=[{"type": "rhymes"}]), "unknown check type 'rhymes'"),
    (dict(GOOD, checks=[{"type": "max_words"}]), "check 0 (max_words): missing parameter 'n'"),
    (dict(GOOD, checks=[{"type": "max_words", "n": 5, "m": 1}]), "unexpected parameter 'm'"),
    (dict(GOOD, checks=[{"type": "max_words", "n": "5"}]), "parameter 'n' must be a non-negative integer"),
    (dict(GOOD, checks=[{"type": "includes_any", "words": "green"}]), "parameter 'words' must be a non-empty list"),
    (dict(GOOD, checks=[{"type": "ends_with", "text": "..."}]), "parameter 'text' must be a string with a letter"),
    (dict(GOOD, checks=[{"type": "letter_count", "letter": "ab", "n": 2}]), "'letter' must be a single character"),
    (dict(GOOD, checks=[]), "field 'checks' must be a non-empty list"),
    (dict(GOOD, split="train"), "field 'split' must be 'dev' or 'test', got 'train'"),
    ({k: v for k, v in GOOD.items() if k != "prompt"}, "field 'prompt' must be a non-empty string"),
    (dict(GOOD, category=""), "field 'category' must be a non-empty string"),
    (GOOD, "duplicate id 'a' (first on line 1)"),
])
def test_loader_names_file_and_line_of_a_bad_row(tmp_path, bad_row, message):
    path = write_rows(tmp_path, [GOOD, bad_row])
    with pytest.raises(ForgetlabError) as e:
        ic.load_instructions(path)
    assert str(e.value).startswith(f"{path}:2: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_loader_reports_malformed_json_through_read_jsonl(tmp_path):
    path = tmp_path / "instr.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ForgetlabError, match=r"instr\.jsonl:2: malformed JSON"):
        ic.load_instructions(path)


# ----------------------------------------------------------------------------- the shipped set

@pytest.fixture(scope="module")
def shipped():
    return ic.load_instructions(SHIPPED)


def test_shipped_set_is_large_enough_to_resolve_a_ten_point_change(shipped):
    assert len(shipped) >= 200
    assert sum(r["split"] == "test" for r in shipped) >= 100


def test_shipped_ids_are_unique(shipped):
    assert len({r["id"] for r in shipped}) == len(shipped)


def test_every_category_is_in_both_splits_about_half_and_half(shipped):
    by_cat = Counter((r["category"], r["split"]) for r in shipped)
    for cat in {r["category"] for r in shipped}:
        dev, test = by_cat[(cat, "dev")], by_cat[(cat, "test")]
        assert dev >= 1 and test >= 1 and abs(dev - test) <= 1, (cat, dev, test)


def test_shipped_set_keeps_the_old_checklist_items(shipped):
    assert set(CHECKLIST_NAMES) <= {r["id"] for r in shipped}


def test_every_check_type_is_used_by_at_least_three_prompts(shipped):
    uses = Counter(t for r in shipped for t in {c["type"] for c in r["checks"]})
    assert {t: uses[t] for t in ic.CHECKS if uses[t] < 3} == {}
