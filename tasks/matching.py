"""Answer matching: whether a generated response states one of a row's accepted answers (its "answer" and its
"aliases"). Two rules, chosen by --match:

    strict     an accepted answer on word and number boundaries in the answer span (the response's first
               sentence), so "8" does not match "18" and a later hedge does not count
    substring  an accepted answer as a lower-cased substring of the whole response (the original rule)
"""
import re

MATCH_RULES = {
    "strict": "the answer or an alias on word and number boundaries in the answer's first sentence",
    "substring": "the answer or an alias as a lower-cased substring of the whole response (the original rule)",
}


def cut_answer(text: str) -> str:
    """The answer part of a plain completion: up to the first blank line or the next "\\nQuestion"."""
    text = text.lstrip()
    for stop in ("\n\n", "\nQuestion"):
        text = text.split(stop, 1)[0]
    return text.strip()


def answer_span(response: str) -> str:
    """The part of a response that states the answer: its first non-empty line, up to the end of its first
    sentence (". ", "! " or "? "; a decimal point like "3.5" does not end a sentence)."""
    line = next((ln.strip() for ln in response.strip().splitlines() if ln.strip()), "")
    return re.split(r"(?<=[.!?])\s+", line, maxsplit=1)[0]


def _boundary_pattern(answer: str) -> str:
    """The answer on word and number boundaries: no letter or digit may touch either end ("mean" is not in
    "means", "8" not in "18" or "8.5", "10" not in "100"), and a number may not continue with ".5" or ",000"."""
    a = re.escape(" ".join(answer.lower().split()))
    return rf"(?<![a-z0-9])(?<![0-9][.,]){a}(?![a-z0-9])(?![.,][0-9])"


def strict_match(response: str, answers: list[str]) -> bool:
    """An accepted answer occurs, case-insensitively and on word and number boundaries, in the answer span."""
    span = " ".join(answer_span(response).lower().split())
    return any(re.search(_boundary_pattern(a), span) for a in answers if a.strip())


def substring_match(response: str, answers: list[str]) -> bool:
    """The original rule: any accepted answer is a lower-cased substring of the whole response."""
    r = response.lower()
    return any(a.lower() in r for a in answers)


MATCHERS = {"strict": strict_match, "substring": substring_match}


def accepted_answers(row: dict) -> list[str]:
    """What a response may state to be correct: the row's "answer", then its "aliases", as strings."""
    return [str(row["answer"])] + [str(a) for a in row.get("aliases") or []]
