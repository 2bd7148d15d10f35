"""The rows of a task's file: checked for the fields its scorer reads, each with an id, taken from one fixed
split, and thinned to a limit.

Splits. Every file has fixed, disjoint dev and test halves: the repository's rows carry a "split" field; the
public benchmarks are split by a hash of the item's id (sha256(id) even = dev).
"""
import hashlib
from pathlib import Path

from data import read_jsonl
from errors import ForgetlabError

from .common import Task

SPLITS = ("dev", "test", "all")


def row_split(row: dict) -> str:
    """A row's fixed split: its "split" field, else (the public benchmarks) a hash of its id: sha256 even = dev."""
    if "split" in row:
        return row["split"]
    return "dev" if hashlib.sha256(str(row["id"]).encode()).digest()[-1] % 2 == 0 else "test"


def _check_row(task: Task, row: dict) -> str | None:
    """What is wrong with a row the task's scorer would read, or None."""
    missing = [k for k in task.fields if k not in row]
    if missing:
        return f"{task.name} row is missing field {missing[0]!r} (needs {', '.join(task.fields)})"
    if row.get("split", "dev") not in ("dev", "test"):
        return f"split must be \"dev\" or \"test\", got {row['split']!r}"
    if "choices" in row:
        gold = row.get("gold", row.get("answer"))
        if not (isinstance(row["choices"], list) and row["choices"] and isinstance(gold, int)
                and 0 <= gold < len(row["choices"])):
            return f"{task.name} row needs a non-empty list 'choices' and an integer index into it"
    if "scoring" in row and row["scoring"] not in ("mc", "partial", "greedy"):
        return f"unknown scoring {row['scoring']!r} (mc, partial or greedy)"
    return None


def load_rows(task: Task, path, split: str = "all", limit: int | None = None) -> list[dict]:
    """Rows of a task's JSONL file, checked for the fields the task reads, each with an "id" (its own, else
    "<file>:<line>"); those of `split` ("dev", "test" or "all"); with a limit, `limit` rows evenly spaced over
    them (files are often sorted by category or subject, so the first N would cover one)."""
    path = Path(path)
    if task.check_file:
        task.check_file(path)
    numbered = read_jsonl(path)
    rows = []
    for lineno, row in numbered:
        problem = _check_row(task, row)
        if problem:
            raise ForgetlabError(f"{path}:{lineno}: {problem}")
        rows.append({"id": f"{path.name}:{lineno}", **row})
    if task.select:
        rows = task.select(rows)
    if split != "all":
        rows = [r for r in rows if row_split(r) == split]
    if limit is not None and limit < len(rows):
        if limit < 1:
            raise ForgetlabError(f"--limit must be >= 1, got {limit}")
        rows = [rows[i * len(rows) // limit] for i in range(limit)]
    return rows
