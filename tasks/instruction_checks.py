"""Verifiable instruction following in the spirit of IFEval (Zhou et al. 2023, "Instruction-Following
Evaluation for Large Language Models"): chat prompts whose instructions a program can check.

    rows = load_instructions("data/instructions.jsonl")      # validated; ForgetlabError "file:line: ..." if not
    verdict = check_response(rows[0], response.strip())      # {"passed": bool, "failed": [check types]}

Each row of data/instructions.jsonl names its checks declaratively, e.g.

    {"id": "tea_three_steps", "prompt": "...", "category": "format", "split": "dev",
     "checks": [{"type": "numbered_list", "n": 3}, {"type": "excludes_words", "words": ["coffee"]}]}

A check type is a function `check(response, **params) -> bool` in CHECKS; its keyword parameters are
exactly the parameters a row must give (the loader reads them off the signature and its annotations), and
its docstring says exactly what passes. A prompt passes when all of its checks pass (IFEval's "strict,
prompt-level" accuracy), so one prompt is one Bernoulli outcome and two models compare with a paired test.

Words are runs of letters, digits and apostrophes (`words_of`), so "3.5" is two words and "don't" one; word
matches are whole-word and case-insensitive (`has_word`). Responses are expected stripped of surrounding
whitespace; the checks do not strip them again, except where a docstring says so.
"""
import inspect
import json
import re

from data import read_jsonl
from errors import ForgetlabError

SPLITS = ("dev", "test")


# ----------------------------------------------------------------------------- text helpers

def words_of(text: str) -> list[str]:
    """Runs of ASCII letters, digits and apostrophes: what every word count here counts."""
    return re.findall(r"[A-Za-z0-9']+", text)


def has_word(text: str, word: str) -> bool:
    """`word` (one word or a phrase) occurs in `text`, case-insensitively, not inside a longer word or number."""
    # The second look-behind/ahead keep "0" from matching in "18.0" and "4" in "4.5" or "4,000".
    pattern = rf"(?<![a-z0-9])(?<![0-9][.,]){re.escape(word.lower())}(?![a-z0-9])(?![.,][0-9])"
    return re.search(pattern, text.lower()) is not None


def has_word_or_plural(text: str, word: str) -> bool:
    """`has_word` for `word` or its plural in -s or -es ("eggs" counts for "egg")."""
    return any(has_word(text, word + ending) for ending in ("", "s", "es"))


def sentences(text: str) -> list[str]:
    """Sentences: pieces ending in . ! or ? followed by whitespace or the end (so "3.5" does not split),
    plus any unterminated tail; list lines without end punctuation count one sentence each."""
    pieces = re.split(r"(?<=[.!?])[\"')\]]*\s+|\n+", text.strip())
    return [p for p in pieces if words_of(p)]


LIST_NUMBER = re.compile(r"(?m)^[ \t]*\d+[.)][ \t]+(?=\S)")  # "1. " / "2) " opening a line with text after it


def numbered_items(text: str) -> int:
    """Lines that start with a number and "." or ")" followed by text on the same line ("1. eggs", "2) milk")."""
    return len(LIST_NUMBER.findall(text))


def bullet_items(text: str) -> int:
    """Lines that start with a bullet "-", "*" or "•" and a space, and hold a word (so "* * *" is a rule, not 3)."""
    return len(re.findall(r"(?m)^[ \t]*[-*•][ \t]+.*\w", text))


def parse_json(text: str):
    """json.loads of the response, allowing a ``` fence around it (as IFEval does); None if not JSON."""
    s = text.strip()
    fence = re.match(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```\s*$", s, re.S)
    if fence:
        s = fence.group(1).strip()
    try:
        return json.loads(s)
    except (json.JSONDecodeError, RecursionError):
        return None


def _table_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _normalized_words(text: str) -> list[str]:
    """Lower-cased words: the form in which `equals`, `starts_with` and `ends_with` compare text."""
    return [w.lower() for w in words_of(text)]


# ----------------------------------------------------------------------------- the check types
# Length

def max_words(response: str, n: int) -> bool:
    """Between 1 and n words."""
    return 1 <= len(words_of(response)) <= n


def min_words(response: str, n: int) -> bool:
    """At least n words."""
    return len(words_of(response)) >= n


def max_sentences(response: str, n: int) -> bool:
    """Between 1 and n sentences (see `sentences`)."""
    return 1 <= len(sentences(response)) <= n


def min_sentences(response: str, n: int) -> bool:
    """At least n sentences (see `sentences`)."""
    return len(sentences(response)) >= n


def looks_like_sentence(response: str) -> bool:
    """The first line starts with a capital letter (after an optional quote), has 4+ words and ends in . ! or ?"""
    s = response.strip().split("\n")[0].strip()
    return bool(re.match(r"^[\"']?[A-Z]", s)) and len(words_of(s)) >= 4 and s.rstrip("\"' ")[-1:] in ".!?"


# Formats

def numbered_list(response: str, n: int) -> bool:
    """Exactly n lines start like "1." or "1)" (a numbered item)."""
    return numbered_items(response) == n


def bullet_list(response: str, n: int) -> bool:
    """Exactly n lines start with a bullet "- ", "* " or "• "."""
    return bullet_items(response) == n


def json_keys(response: str, keys: list[str]) -> bool:
    """The whole response (optionally in a ``` fence) is a JSON object that has every one of `keys`."""
    obj = parse_json(response)
    return isinstance(obj, dict) and all(k in obj for k in keys)


def markdown_table(response: str, columns: int, rows: int) -> bool:
    """The first table (run of lines starting "|") has a header of `columns` cells, a |---| line, `rows` rows."""
    # Exact counts, as the prompts ask for them; every body row must have the header's number of cells.
    lines = [ln.strip() for ln in response.splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    if start is None:
        return False
    table = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        table.append(_table_cells(ln))
    if len(table) < 2 or not all(re.fullmatch(r":?-{3,}:?", c) for c in table[1]):
        return False
    header, body = table[0], table[2:]
    return len(header) == columns and len(body) == rows and all(len(r) == columns for r in body)


def has_title(response: str) -> bool:
    """Contains a title in double angular brackets, like <<Morning Walk>> (some non-blank text inside)."""
    return re.search(r"<<[^<>\n]*\w[^<>\n]*>>", response) is not None


# Casing

def all_lowercase(response: str) -> bool:
    """Has at least one letter and no upper-case letter."""
    return any(c.isalpha() for c in response) and response == response.lower()


def all_uppercase(response: str) -> bool:
    """Has at least one letter and no lower-case letter."""
    return any(c.isalpha() for c in response) and response == response.upper()


def capitalized_word(response: str, word: str) -> bool:
    """`word` occurs in ALL CAPITALS as a whole word (case-sensitive: "HELLO" passes, "Hello" does not)."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word.upper())}(?![A-Za-z0-9])", response) is not None


# Keywords

# The keyword checks accept a word's plural in -s/-es (`has_word_or_plural`): "include the word 'egg'" is met by
# "eggs", "without the word 'star'" is broken by "stars", and "name three animals" counts "whales" for "whale"
# without the list naming both forms (which would let "whale ... whales" count twice).

def includes_words(response: str, words: list[str]) -> bool:
    """Every one of `words` occurs as a whole word or its -s/-es plural (case-insensitive)."""
    return all(has_word_or_plural(response, w) for w in words)


def includes_any(response: str, words: list[str]) -> bool:
    """At least one of `words` occurs as a whole word or its -s/-es plural (case-insensitive)."""
    return any(has_word_or_plural(response, w) for w in words)


def includes_n_of(response: str, words: list[str], n: int) -> bool:
    """At least n different entries of `words` occur as whole words or their -s/-es plurals (case-insensitive)."""
    return sum(has_word_or_plural(response, w) for w in words) >= n


def excludes_words(response: str, words: list[str]) -> bool:
    """None of `words` occurs as a whole word or its -s/-es plural (case-insensitive)."""
    return not any(has_word_or_plural(response, w) for w in words)


def letter_count(response: str, letter: str, n: int) -> bool:
    """The letter occurs at least n times, counting both cases."""
    return response.lower().count(letter.lower()) >= n


def includes_phrase(response: str, phrase: str) -> bool:
    """`phrase` occurs as a substring, ignoring case and treating any run of whitespace as one space."""
    squash = lambda s: " ".join(s.lower().split())  # noqa: E731
    return squash(phrase) in squash(response)


def includes_sequence(response: str, numbers: list[int]) -> bool:
    """The integers in digits (list markers like "1. " aside) contain `numbers` in a row: "1, 2, 3" for [1, 2, 3]."""
    # Without dropping the markers, "1. 1\n2. 2\n3. 3" reads as 1, 1, 2, 2, 3, 3 and fails a correct count.
    found = [int(x) for x in re.findall(r"\d+", LIST_NUMBER.sub("", response))]
    k = len(numbers)
    return any(found[i:i + k] == numbers for i in range(len(found) - k + 1))


# Punctuation

def no_commas(response: str) -> bool:
    """Has at least one word and no comma (neither "," nor the full-width "，")."""
    return bool(words_of(response)) and "," not in response and "，" not in response


def wrapped_in_quotes(response: str) -> bool:
    """Starts and ends with a double quote (straight " or curly “ ”), with some text between."""
    return len(response) >= 3 and response[0] in "\"“" and response[-1] in "\"”" and bool(words_of(response))


# Start and end

def starts_with(response: str, text: str) -> bool:
    """The response's first words are the words of `text` (case and punctuation ignored)."""
    want = _normalized_words(text)
    return _normalized_words(response)[:len(want)] == want


def ends_with(response: str, text: str) -> bool:
    """The response's last words are the words of `text` (case and punctuation ignored)."""
    want = _normalized_words(text)
    return _normalized_words(response)[-len(want):] == want


# Answers

def equals(response: str, text: str) -> bool:
    """The response has exactly the words of `text`, in order, and nothing else (case and punctuation ignored)."""
    return _normalized_words(response) == _normalized_words(text)


def one_of(response: str, options: list[str]) -> bool:
    """The response is exactly one of `options` and nothing else (case and punctuation ignored)."""
    return any(equals(response, o) for o in options)


CHECKS = {f.__name__: f for f in (
    max_words, min_words, max_sentences, min_sentences, looks_like_sentence,
    numbered_list, bullet_list, json_keys, markdown_table, has_title,
    all_lowercase, all_uppercase, capitalized_word,
    includes_words, includes_any, includes_n_of, excludes_words, letter_count, includes_phrase, includes_sequence,
    no_commas, wrapped_in_quotes,
    starts_with, ends_with,
    equals, one_of,
)}


# ----------------------------------------------------------------------------- loading and scoring

def check_params(check_type: str) -> dict[str, type]:
    """The parameters a check of this type takes, {name: annotation}: its function's keyword arguments."""
    params = inspect.signature(CHECKS[check_type]).parameters
    return {name: p.annotation for name, p in list(params.items())[1:]}


def _param_problem(value, annotation) -> str | None:
    """Why `value` is not a valid parameter of type `annotation`, or None when it is."""
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else \
            "must be a non-negative integer"
    # Strings must hold a word character: `ends_with` of "..." would compare zero words and pass anything.
    if annotation is str:
        return None if isinstance(value, str) and words_of(value) else "must be a string with a letter or digit"
    if annotation == list[str]:
        ok = isinstance(value, list) and value and all(isinstance(v, str) and words_of(v) for v in value)
        return None if ok else "must be a non-empty list of strings with a letter or digit"
    if annotation == list[int]:
        ok = isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in value)
        return None if ok else "must be a non-empty list of integers"
    raise TypeError(f"no validation for parameter type {annotation}")  # a bug in CHECKS, not in the data


def _validate_check(check, i: int) -> str | None:
    """Why the i-th check of a row is invalid, or None."""
    if not isinstance(check, dict):
        return f"check {i} is not a JSON object"
    t = check.get("type")
    if t not in CHECKS:
        return f"check {i}: unknown check type {t!r} (known: {', '.join(sorted(CHECKS))})"
    params = check_params(t)
    given = set(check) - {"type"}
    if missing := sorted(set(params) - given):
        return f"check {i} ({t}): missing parameter {', '.join(map(repr, missing))}"
    if extra := sorted(given - set(params)):
        return f"check {i} ({t}): unexpected parameter {', '.join(map(repr, extra))}"
    for name, annotation in params.items():
        if problem := _param_problem(check[name], annotation):
            return f"check {i} ({t}): parameter {name!r} {problem}"
    if t == "letter_count" and len(check["letter"]) != 1:
        return f"check {i} ({t}): parameter 'letter' must be a single character"
    return None


def load_instructions(path) -> list[dict]:
    """The rows of an instructions JSONL file, each validated: an `id` (unique non-empty string), a `prompt`
    (non-empty string), a `category` (non-empty string), a `split` ("dev" or "test") and `checks` (a non-empty
    list of {"type": a CHECKS name, plus exactly that type's parameters}). Any problem is a ForgetlabError
    "path:line: what"."""
    rows, seen = [], {}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        for field in ("id", "prompt", "category"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise ForgetlabError(f"{where}: field {field!r} must be a non-empty string")
        if row.get("split") not in SPLITS:
            raise ForgetlabError(f"{where}: field 'split' must be 'dev' or 'test', got {row.get('split')!r}")
        checks = row.get("checks")
        if not isinstance(checks, list) or not checks:
            raise ForgetlabError(f"{where}: field 'checks' must be a non-empty list")
        for i, check in enumerate(checks):
            if problem := _validate_check(check, i):
                raise ForgetlabError(f"{where}: {problem}")
        if row["id"] in seen:
            raise ForgetlabError(f"{where}: duplicate id {row['id']!r} (first on line {seen[row['id']]})")
        seen[row["id"]] = lineno
        rows.append(row)
    return rows


def check_response(row: dict, response: str) -> dict:
    """Apply every check of `row` to `response`: passed (all checks pass) and the types of those that failed."""
    failed = [c["type"] for c in row["checks"]
              if not CHECKS[c["type"]](response, **{k: v for k, v in c.items() if k != "type"})]
    return dict(passed=not failed, failed=failed)
