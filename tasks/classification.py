"""The classification tasks of the continual-learning benchmarks (../shared/data/cl: O-LoRA's 15 tasks and their
500-row subsample): the papers' prompt, the label as the answer, and the label scored over the task's label set.

A benchmark folder holds tasks.json (per task: its label set and instruction) and <task>/{train,test}.jsonl rows
{"id", "task", "input", "label", "choices"}. The prompt is the one O-LoRA and TreeLoRA build, without the
"Task:/Dataset:" lines (TreeLoRA's form):

    prompt(x) = instruction + "Option: " + ", ".join(label_set) + " \\n" + x + "\\nAnswer:"
    answer    = " " + label, then the end-of-text token (training's target, and what is scored)

The prompt is encoded in three pieces (the instruction with the options, the input, the "\\nAnswer:" tail) and
a long input is cut to fit --max-len, so the tail and the answer are never truncated away; training and scoring
build exactly the same tokens (`encode_prompt`).

Scoring, per test row:
    loglik (default)  pred = argmax over labels c of log p(" c" <eos> | prompt): exact for small models, and the
                      probability that the model answers c and stops, the event the papers' exact match counts
    generate          greedy decoding of at most (longest label + 1) tokens; correct when the text, stripped,
                      equals the gold label (O-LoRA's exact match)
"""
from dataclasses import dataclass
from pathlib import Path

from errors import ForgetlabError, read_json_object
from data import IGNORE_INDEX, read_jsonl

from .loglikelihood import score_continuations

SCORINGS = ("loglik", "generate")


@dataclass(frozen=True)
class ClassificationTask:
    name: str
    label_set: tuple[str, ...]
    instruction: str | None  # None: the question and its options are inside the input (COPA)
    folder: Path  # the benchmark folder: <folder>/<name>/{train,test}.jsonl

    def file(self, split: str) -> Path:
        return self.folder / self.name / f"{split}.jsonl"

    def head(self) -> str:
        if self.instruction is None:
            return ""
        return self.instruction + "Option: " + ", ".join(self.label_set) + " \n"


def load_benchmark(folder) -> dict[str, ClassificationTask]:
    """{task name: ClassificationTask} from a benchmark folder's tasks.json (tasks without a label set, such as
    TRACE's generation tasks, are left out: they are not classification tasks)."""
    folder = Path(folder)
    spec_file = folder / "tasks.json"
    if not spec_file.is_file():
        raise ForgetlabError(f"{spec_file}: not found (a benchmark folder holds tasks.json and one folder per task)")
    spec = read_json_object(spec_file, "benchmark task list").get("tasks")
    if not isinstance(spec, dict):
        raise ForgetlabError(f"{spec_file}: no \"tasks\" object")
    tasks = {}
    for name, t in spec.items():
        labels = t.get("label_set") if isinstance(t, dict) else None
        if not labels:
            continue
        if not (isinstance(labels, list) and all(isinstance(c, str) and c.strip() for c in labels)
                and len(set(labels)) == len(labels) and isinstance(t.get("instruction"), (str, type(None)))):
            raise ForgetlabError(f"{spec_file}: task {name!r}: label_set must be distinct non-empty strings")
        tasks[name] = ClassificationTask(name, tuple(labels), t.get("instruction"), folder)
    return tasks


def resolve_order(spec: str, folder, tasks: dict) -> tuple[str, list[str]]:
    """(order name, task names) for --order: a standard order of the folder's orders.json ("order1" or "1"), or
    task names separated by commas. Every task must be one of the benchmark's classification tasks."""
    folder = Path(folder)
    orders_file = folder / "orders.json"
    orders = read_json_object(orders_file, "task orders") if orders_file.is_file() else {}
    key = spec if spec in orders else f"order{spec}" if f"order{spec}" in orders else None
    if key is not None:
        names = orders[key].get("tasks") if isinstance(orders[key], dict) else None
        if not (isinstance(names, list) and names):
            raise ForgetlabError(f"{orders_file}: order {key!r} has no task list")
        name = key
    else:
        names = [t.strip() for t in spec.split(",") if t.strip()]
        name = "custom"
        if len(names) == 1 and "," not in spec:
            known = ", ".join(sorted(orders)) or "none"
            if names[0] not in tasks:
                raise ForgetlabError(f"--order {spec!r}: neither a task nor an order of {orders_file} "
                                     f"(orders: {known})")
    unknown = [t for t in names if t not in tasks]
    if unknown:
        raise ForgetlabError(f"--order: unknown task {unknown[0]!r} (the classification tasks of {folder}: "
                             f"{', '.join(sorted(tasks))})")
    if len(set(names)) != len(names):
        raise ForgetlabError(f"--order {spec!r}: a task appears twice")
    return name, names


def load_rows(task: ClassificationTask, split: str, limit: int | None = None) -> list[dict]:
    """The task's rows of `split`, checked (one line naming file:line for a row without an input or with a label
    outside the label set); `limit` takes the first N (the files are in the benchmark's own random order)."""
    path = task.file(split)
    if not path.is_file():
        raise ForgetlabError(f"{path}: not found (task {task.name!r}, split {split!r})")
    rows = []
    for line, row in read_jsonl(path):
        if not isinstance(row.get("input"), str) or not isinstance(row.get("label"), str):
            raise ForgetlabError(f"{path}:{line}: a row needs string fields \"input\" and \"label\"")
        if row["label"] not in task.label_set:
            raise ForgetlabError(f"{path}:{line}: label {row['label']!r} is not in the task's label set "
                                 f"({', '.join(task.label_set)})")
        rows.append(dict(row, id=str(row.get("id", f"{task.name}-{split}-{line}"))))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ForgetlabError(f"{path}: no rows")
    return rows


def answer_ids(tok, label: str) -> list[int]:
    """The answer's tokens: " label" then the end-of-text token."""
    return tok.encode(" " + label) + tok.eos_ids[:1]


def encode_prompt(tok, task: ClassificationTask, text: str, max_len: int) -> tuple[list[int], bool]:
    """(prompt ids, truncated): the prompt's three pieces, the input cut so that the prompt and the task's
    longest answer fit in max_len tokens."""
    head = tok.encode(task.head(), add_bos=tok.adds_bos) if task.head() else tok.encode("", add_bos=tok.adds_bos)
    tail = tok.encode("\nAnswer:")
    longest = max(len(answer_ids(tok, c)) for c in task.label_set)
    budget = max_len - len(head) - len(tail) - longest
    if budget < 1:
        raise ForgetlabError(f"--max-len {max_len}: too short for task {task.name!r} (its instruction, options and "
                             f"longest answer take {max_len - budget} tokens)")
    body = tok.encode(text)
    return head + body[:budget] + tail, len(body) > budget


def tokenize_rows(tok, task: ClassificationTask, rows: list[dict], max_len: int) -> tuple[list[dict], int]:
    """Training examples (input_ids, labels: the loss on the answer only) and the number of inputs cut."""
    examples, cut = [], 0
    for row in rows:
        prompt, truncated = encode_prompt(tok, task, row["input"], max_len)
        answer = answer_ids(tok, row["label"])
        examples.append(dict(input_ids=prompt + answer, labels=[IGNORE_INDEX] * len(prompt) + answer,
                             truncated=truncated, task=task.name))
        cut += truncated
    return examples, cut


def score_classification(model, tok, task: ClassificationTask, rows: list[dict], max_len: int,
                         scoring: str = "loglik", batch_size: int = 64) -> list[dict]:
    """Per-item records {id, gold, pred, correct, (logprobs)} of the model on `rows` (scoring: SCORINGS)."""
    prompts = [encode_prompt(tok, task, r["input"], max_len)[0] for r in rows]
    if scoring == "loglik":
        requests = [(p, answer_ids(tok, c)) for p in prompts for c in task.label_set]
        scores, _ = score_continuations(model, requests, batch_size=batch_size)
        k = len(task.label_set)
        items = []
        for i, row in enumerate(rows):
            lp = scores[i * k:(i + 1) * k]
            pred = task.label_set[max(range(k), key=lambda j: lp[j])]  # the first of equal scores
            items.append(dict(id=row["id"], gold=row["label"], pred=pred, correct=pred == row["label"],
                              logprobs=[round(x, 5) for x in lp]))
        return items
    if scoring == "generate":
        from model import generate_ids

        n_new = max(len(answer_ids(tok, c)) for c in task.label_set)
        outputs = []
        for s in range(0, len(prompts), batch_size):
            outputs += generate_ids(model, prompts[s:s + batch_size], n_new, tok.stop_ids, tok.pad_id)
        items = []
        for row, ids in zip(rows, outputs, strict=True):
            text = tok.decode(ids).strip()
            items.append(dict(id=row["id"], gold=row["label"], pred=text, correct=text == row["label"]))
        return items
    raise ForgetlabError(f"scoring {scoring!r}: choose from {', '.join(SCORINGS)}")
