"""The shipped evaluation data is sound: the domain split measures what it says, dev and test are fixed and
disjoint, answer keys cannot be scored by echoing the question, and no general_qa fact is trained on through
general_instructions. Reads only files in data/ (see data/README.md), so it never skips."""
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
ASPECTS = ("class", "indication", "side_effects", "interaction", "warning")
DOMAIN_FIELDS = {"prompt", "completion", "drug", "aspect", "answer", "aliases", "split"}
EVAL_FILES = ("general_qa.jsonl", "general_text.jsonl", "domain_recall.jsonl", "domain_unseen.jsonl")
TRAIN_FILES = ("drug_qa.jsonl", "general_instructions.jsonl")

# Each drug held out of training (domain_unseen), with the class it shares with drugs that stay in training:
# the key must occur in its own `class` completion and in the `class` completion of a trained drug.
UNSEEN_CLASS = {
    "amlodipine": "calcium channel blocker", "hydrochlorothiazide": "diuretic", "rosuvastatin": "statin",
    "escitalopram": "ssri", "duloxetine": "snri", "lorazepam": "benzodiazepine",
    "aripiprazole": "atypical antipsychotic", "levetiracetam": "anticonvulsant", "oxycodone": "opioid",
    "naproxen": "nsaid", "loratadine": "antihistamine", "fluticasone": "corticosteroid",
    "tiotropium": "bronchodilator", "cephalexin": "antibiotic", "oseltamivir": "antiviral",
    "rivaroxaban": "factor xa inhibitor", "carvedilol": "beta blocker", "valsartan": "arb",
    "hydroxychloroquine": "dmard", "pantoprazole": "proton pump inhibitor",
}


def load(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def has_word(text: str, phrase: str) -> bool:
    """`phrase` occurs in `text` as a whole word or words, case-insensitively."""
    return re.search(rf"(?<![a-z0-9]){re.escape(phrase.lower())}(?![a-z0-9])", text.lower()) is not None


def keys(row):
    return [row["answer"]] + list(row["aliases"])


@pytest.fixture(scope="module")
def train():
    return load("drug_qa.jsonl")


@pytest.fixture(scope="module")
def recall():
    return load("domain_recall.jsonl")


@pytest.fixture(scope="module")
def unseen():
    return load("domain_unseen.jsonl")


def drugs_of(rows):
    return list(dict.fromkeys(r["drug"] for r in rows))


# ----------------------------------------------------------------------------- the domain split

def test_training_set_is_five_aspects_of_every_trained_drug(train):
    assert len(train) == 5 * len(drugs_of(train))
    by_drug = defaultdict(list)
    for r in train:
        assert set(r) == {"prompt", "completion", "drug", "aspect"}
        by_drug[r["drug"]].append(r["aspect"])
    assert all(sorted(a) == sorted(ASPECTS) for a in by_drug.values())


def test_unseen_drugs_are_never_trained_on(train, recall, unseen):
    trained, seen_eval, held = set(drugs_of(train)), set(drugs_of(recall)), set(drugs_of(unseen))
    assert held == set(UNSEEN_CLASS)
    assert 18 <= len(held) <= 24 and len(trained) + len(held) == 93
    assert not held & trained and not held & seen_eval
    assert seen_eval == trained  # recall asks about every trained drug, and only those
    training_text = [r["prompt"] + " " + r["completion"] for r in train]
    training_text += [" ".join((r["instruction"], r["input"], r["output"])) for r in load("general_instructions.jsonl")]
    for drug in held:
        assert not any(has_word(t, drug) for t in training_text), drug


def test_every_unseen_drug_shares_its_class_with_a_trained_drug(train, unseen):
    train_class = [r["completion"] for r in train if r["aspect"] == "class"]
    own_class = {r["drug"]: r["completion"] for r in unseen if r["aspect"] == "class"}
    for drug, cls in UNSEEN_CLASS.items():
        assert has_word(own_class[drug], cls), (drug, cls)
        assert any(has_word(c, cls) for c in train_class), (drug, cls)


def test_unseen_questions_cover_each_drug_and_reuse_its_former_completion(unseen):
    assert len(unseen) >= 45
    per_drug = defaultdict(list)
    for r in unseen:
        assert set(r) == DOMAIN_FIELDS and r["aspect"] in ASPECTS
        assert r["completion"].lower().startswith(r["drug"]), r  # the house style of drug_qa's completions
        per_drug[r["drug"]].append(r["aspect"])
    for drug, aspects in per_drug.items():
        assert {"class", "indication"} <= set(aspects) and len(aspects) == len(set(aspects)), drug


def test_recall_questions_paraphrase_trained_facts(train, recall):
    completion = {(r["drug"], r["aspect"]): r["completion"] for r in train}
    for r in recall:
        assert set(r) == DOMAIN_FIELDS
        assert r["completion"] == completion[(r["drug"], r["aspect"])]
    assert len(recall) == len(drugs_of(recall))  # one question per trained drug


def test_no_domain_eval_prompt_uses_a_training_template(train, recall, unseen):
    def template(r):
        return r["prompt"].lower().replace(r["drug"], "X")
    training_templates = {template(r) for r in train}
    for r in recall + unseen:
        assert template(r) not in training_templates, r["prompt"]


@pytest.mark.parametrize("name", ["domain_recall.jsonl", "domain_unseen.jsonl"])
def test_answer_keys_are_in_the_completion_and_cannot_be_echoed(name):
    for r in load(name):
        answer = r["answer"]
        assert answer == answer.lower() and 1 <= len(answer.split()) <= 3, r
        assert answer in r["completion"].lower(), r
        assert answer not in r["aliases"] and len(set(r["aliases"])) == len(r["aliases"]), r
        for k in keys(r):
            assert k == k.lower() and k not in r["drug"] and k not in r["prompt"].lower(), (r["prompt"], k)


# ----------------------------------------------------------------------------- dev / test

def test_training_files_have_no_split_and_eval_files_are_all_split():
    for name in TRAIN_FILES:
        assert not any("split" in r for r in load(name)), name
    for name in EVAL_FILES:
        assert {r["split"] for r in load(name)} == {"dev", "test"}, name


def alternate(rows, stratum):
    """The documented rule: within each stratum, in file order, the 1st, 3rd, ... go to dev, the rest to test."""
    seen = Counter()
    out = []
    for r in rows:
        out.append("dev" if seen[stratum(r)] % 2 == 0 else "test")
        seen[stratum(r)] += 1
    return out


def test_general_splits_are_the_fixed_alternation():
    qa = load("general_qa.jsonl")
    assert [r["split"] for r in qa] == alternate(qa, lambda r: r["category"])
    text = load("general_text.jsonl")
    assert [r["split"] for r in text] == alternate(text, lambda r: None)


def test_domain_splits_are_the_fixed_alternation(recall, unseen):
    # domain_recall has one question per drug: alternate within each aspect, so dev and test get the same mix
    assert [r["split"] for r in recall] == alternate(recall, lambda r: r["aspect"])
    # domain_unseen: alternate whole drugs, in file order
    order = drugs_of(unseen)
    assert [r["split"] for r in unseen] == ["dev" if order.index(r["drug"]) % 2 == 0 else "test" for r in unseen]


@pytest.mark.parametrize("name", ["domain_recall.jsonl", "domain_unseen.jsonl"])
def test_domain_dev_and_test_are_disjoint_by_drug(name):
    rows = load(name)
    dev = {r["drug"] for r in rows if r["split"] == "dev"}
    test = {r["drug"] for r in rows if r["split"] == "test"}
    assert dev and test and not dev & test
    n_dev = sum(r["split"] == "dev" for r in rows)
    assert abs(2 * n_dev - len(rows)) <= max(2, len(rows) // 10)
    for aspect in ("class", "indication"):
        assert {r["split"] for r in rows if r["aspect"] == aspect} == {"dev", "test"}


def test_dev_and_test_are_disjoint_by_item_and_cover_every_category():
    qa = load("general_qa.jsonl")
    dev = {r["question"].lower() for r in qa if r["split"] == "dev"}
    test = {r["question"].lower() for r in qa if r["split"] == "test"}
    assert not dev & test and len(dev) + len(test) == len(qa)
    for cat in {r["category"] for r in qa}:
        splits = Counter(r["split"] for r in qa if r["category"] == cat)
        assert splits["dev"] >= 1 and splits["test"] >= 1 and abs(splits["dev"] - splits["test"]) <= 1, cat
    text = load("general_text.jsonl")
    dev = {r["text"] for r in text if r["split"] == "dev"}
    test = {r["text"] for r in text if r["split"] == "test"}
    assert dev and test and not dev & test and len(dev) + len(test) == len(text)


# ----------------------------------------------------------------------------- general_qa facts are not trained on

STOPWORDS = set("""a an the of in on at to for from by with and or but is are was were be been being it its this that
these those what which who whom whose when where why how do does did done has have had can could would should will
shall may might must not no yes as if than then so such very more most much many some any each every all one two
three your you i we they he she his her their our my me us them there here about into over under out up down name
give tell say write called call known make made use used per also just like""".split())


def content_words(text: str) -> set[str]:
    """Lower-cased words of 3+ characters that are not stop words, with a possessive 's or a plural -s removed
    ("capitals" and "capital" are the same word)."""
    words = set()
    for w in re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", text.lower()):
        w = re.sub(r"'s$", "", w)
        if w in STOPWORDS or len(w) <= 2:
            continue
        words.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return words


def overlap_flags(qa_rows, texts):
    """The overlap rule of data/README.md: a general_qa item is flagged against a text when its answer or an alias
    occurs in the text as a whole word and the text shares at least two content words with the question."""
    flags = []
    for q in qa_rows:
        question = content_words(q["question"])
        for i, text in enumerate(texts):
            if any(has_word(text, k) for k in keys(q)) and len(question & content_words(text)) >= 2:
                flags.append((q["question"], i))
    return flags


def test_the_overlap_rule_catches_a_leak():
    qa = [{"question": "What is the capital of France?", "answer": "Paris", "aliases": []}]
    assert overlap_flags(qa, ["Tabulate the capitals: France - Paris"]) == [("What is the capital of France?", 0)]
    assert overlap_flags(qa, ["We visited Paris in April."]) == []  # the answer alone is not a leak
    assert overlap_flags(qa, ["France's capital city is Parisian in style."]) == []  # nor a word containing it


def test_no_general_qa_answer_leaks_into_general_instructions():
    rows = load("general_instructions.jsonl")
    assert len(rows) == 220
    texts = [" ".join((r["instruction"], r["input"], r["output"])) for r in rows]
    assert overlap_flags(load("general_qa.jsonl"), texts) == []
