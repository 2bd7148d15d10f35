"""What every task shares: the Options its scorer receives, the Metric and Task records of eval.py's task table,
and the "Question: ...\\nAnswer:" prompt that general QA (as a completion) and MMLU are asked in."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Options:
    """The evaluation's settings, as every scorer receives them (batch_size and progress change no result)."""
    batch_size: int = 64
    chat: bool = True  # general_qa as a chat turn (else "Question: ...\nAnswer:" completion)
    match: str = "strict"
    progress: bool = False


@dataclass(frozen=True)
class Metric:
    """A number reported with its interval and paired before/after: the mean of the items' `field`, weighted by
    their `weight` field when given (tokens, for a token-weighted NLL). binary: a proportion of booleans."""
    key: str
    field: str
    higher_is_better: bool = True
    weight: str | None = None
    binary: bool = True


@dataclass(frozen=True)
class Task:
    """One entry of the task table: its default data file and the fields every row must have, its scorer
    score(model, tok, rows, opts) -> (items, extra results), and the metrics read off the items."""
    name: str
    data: Path
    fields: tuple[str, ...]  # what every row must have
    score: Callable
    metrics: tuple[Metric, ...]
    uses_match: bool = False  # its accuracy depends on --match
    # Checks the whole file before its rows are read, raising ForgetlabError "file:line: ..." (rows whose
    # fields hold more than the table can say, like the instructions' checks).
    check_file: Callable | None = None
    # rows -> the rows the task scores (domain_heldout: those of the training file kept out of training)
    select: Callable | None = None


def qa_prompt(question: str) -> str:
    """A question as a plain completion prompt, for a model that is not asked in its chat format."""
    return f"Question: {question}\nAnswer:"
