"""The committed run records regenerate their reports: report.md is a function of results.json, so a change to
the comparison, the intervals or the report's format shows here before it silently disagrees with the record."""
import json
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
    outputs.write_results(tmp_path, method, results["before"], results["after"], results["training"], variants)
    assert (tmp_path / "report.md").read_text() == (run / "report.md").read_text()


def test_there_are_run_records_to_check():
    assert len(RUNS) >= 5
