"""Committed example reports are reproduced from their own committed metrics.csv: every number, interval and verdict
of the text, rebuilt by `ript-ablate report --from-metrics` without MLflow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ript_ablate.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.parent.name for p in (ROOT / "reports" / "examples").glob("*/metrics.csv"))


def comparable(text: str) -> str:
    """The report without what names where and when it was built (the parent run, the paths, the build time)."""
    text = re.sub(r"MLflow parent run `[0-9a-f]+`\.|Rebuilt from `metrics.csv` \(not read from MLflow\)\.", "", text)
    text = re.sub(r"base config `[^`]*configs/", "base config `configs/", text)
    return re.sub(r"Report built in [\d.]+s at [\d: -]+\.", "", text)


@pytest.mark.parametrize("name", EXAMPLES)
def test_a_committed_report_is_rebuilt_from_its_metrics(name, tmp_path):
    committed = ROOT / "reports" / "examples" / name
    assert main(["report", str(ROOT / "studies" / f"{name}.yaml"), "--from-metrics", str(committed / "metrics.csv"),
                 "--reports", str(tmp_path)]) == 0
    rebuilt = (tmp_path / name / "report.md").read_text()
    assert comparable(rebuilt) == comparable((committed / "report.md").read_text())


def test_the_examples_are_found():
    assert "quickstart" in EXAMPLES


def test_a_metrics_file_that_is_not_there_is_named(tmp_path, capsys):
    assert main(["report", str(ROOT / "studies" / "quickstart.yaml"), "--from-metrics",
                 str(tmp_path / "nothing.csv"), "--reports", str(tmp_path)]) != 0
    assert "nothing.csv" in capsys.readouterr().err


def test_another_studys_metrics_are_refused_naming_the_study(tmp_path, capsys):
    assert main(["report", str(ROOT / "studies" / "laplace_x_fix_scale.yaml"), "--from-metrics",
                 str(ROOT / "reports" / "examples" / "quickstart" / "metrics.csv"), "--reports", str(tmp_path)]) != 0
    assert "holds no configuration of study 'laplace_x_fix_scale'" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["report", str(ROOT / "studies" / "quickstart.yaml"), "--from-metrics", str(bad),
                 "--reports", str(tmp_path)]) != 0
    assert "lacks the column(s) ['cell_id'" in capsys.readouterr().err
