"""The committed run records regenerate their reports: report.md is a function of results.json, so a change to
the comparison, the intervals or the report's format shows here before it silently disagrees with the record."""
import json
import os
import types
from pathlib import Path

import pytest

import outputs

RESULTS = Path(__file__).resolve().parent.parent / "results"
RUNS = sorted(p.parent for folder in ("main-job", "fast-loop") for p in (RESULTS / folder).glob("*/results.json"))


@pytest.mark.parametrize("run", RUNS, ids=[f"{p.parent.name}/{p.name}" for p in RUNS])
def test_a_committed_run_report_is_rebuilt_from_its_results_byte_for_byte(run, tmp_path, capsys):
    results = json.loads((run / "results.json").read_text())
    variants = {label: v["after"] for label, v in results.get("after_variants", {}).items()} or None
    method = types.SimpleNamespace(name=results["training"]["method"])
    outputs.write_results(tmp_path, method, results["before"], results["after"], results["training"], variants,
                          results.get("base"), results.get("diagnostics"))
    assert (tmp_path / "report.md").read_text() == (run / "report.md").read_text()


def test_there_are_run_records_to_check():
    assert len(RUNS) >= 5


def strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def test_committed_records_name_the_repository_s_files_relative_to_it():
    """An absolute path whose tail is a file of this repository (or of ../shared) is one checkout's path: it
    means nothing on another machine. Paths outside the repository (a scratch --out, the cache) may stay."""
    repo = RESULTS.parent
    roots = [repo, repo.parent / "shared"]
    checkout_paths = set()
    for file in RESULTS.rglob("*.json"):
        for s in strings(json.loads(file.read_text())):
            if not os.path.isabs(s):
                continue
            parts = Path(s).parts
            tails = [Path(*parts[i:]) for i in range(1, len(parts) - 1)]
            if any((root / tail).is_file() for root in roots for tail in tails):
                checkout_paths.add(f"{file.relative_to(repo)}: {s}")
    assert not checkout_paths, sorted(checkout_paths)[:5]
