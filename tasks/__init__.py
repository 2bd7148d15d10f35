"""The evaluation machinery behind eval.py, one job per file. eval.py keeps the task table (TASKS, LEVELS),
evaluate(), the before/after comparison and the command line; what a task does with its rows lives here.

    common.py              what every task shares: the scorers' Options, the Metric and Task records of the
                           table, and the "Question: ...\\nAnswer:" prompt
    rows.py                the rows of a task's file: checked, each with an id, of one fixed split, to a limit
    loglikelihood.py       the engine: Σ log p(continuation | context) and greedy agreement, batched
    matching.py            whether a generated answer states an accepted answer (MATCH_RULES)
    generation.py          scorers of greedy answers: general QA (matched) and instruction following (checked)
    instruction_checks.py  the programmatic checks of the instruction-following set (IFEval-style)
    benchmarks.py          scorers of the lm-evaluation-harness benchmarks and MMLU by log-likelihood
    perplexity.py          the scorer of general text: token-weighted NLL
    domain.py              the scorer of the domain tasks: matched greedy answers and the reference answer's NLL

A scorer is score(model, tok, rows, opts) -> (items, extra): one record per row (with the row's "id"), and
any task-level results beside the metrics (a category breakdown, the matching rule).
"""
