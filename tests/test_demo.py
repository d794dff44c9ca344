"""`patchattn demo`: dense vs hand-written plans vs a plan file, and its errors."""

import json

import pytest
from conftest import STORIES, needs

from patchattn.cli import main
from patchattn.models import shipped_plan

SMOLLM2_PLAN = shipped_plan("smollm2-135m")


def test_shipped_plan_only_for_aliases():
    assert SMOLLM2_PLAN is not None and SMOLLM2_PLAN.name == "smollm2-135m.budget.json"
    assert shipped_plan(str(STORIES)) is None
    assert shipped_plan("no-such-alias") is None


@needs(STORIES)
def test_demo_rows_for_methods_and_plan_files(tmp_path, capsys):
    # A plan file for this model: the hand-written streaming plan that a first run writes.
    first = tmp_path / "first"
    assert main(["demo", "--model", str(STORIES), "--tokens", "768", "--window", "256", "--methods", "streaming",
                 "--out", str(first)]) == 0
    assert "no calibrated plan ships" in capsys.readouterr().out
    plan_file = first / "streaming.plan.json"
    out = tmp_path / "second"
    assert main(["demo", "--model", str(STORIES), "--tokens", "768", "--window", "256",
                 "--methods", "streaming,vertical_slash", "--plan", str(plan_file), "--out", str(out)]) == 0
    rows = {r["plan"]: r for r in json.loads((out / "demo.json").read_text())["rows"]}
    assert list(rows) == ["dense", "streaming", "vertical_slash", "streaming.plan.json"]
    assert rows["dense"]["density"] == 1.0
    for name in ("streaming", "vertical_slash"):
        assert 0 < rows[name]["density"] < 1
        assert rows[name]["ppl"] > 1
    # The same plan run from its file gives the same numbers as the plan it was saved from.
    assert rows["streaming.plan.json"]["ppl"] == pytest.approx(rows["streaming"]["ppl"], rel=1e-6)
    assert rows["streaming.plan.json"]["density"] == pytest.approx(rows["streaming"]["density"], rel=1e-9)


@needs(STORIES)
def test_demo_rejects_a_plan_for_another_model_before_any_forward(tmp_path, capsys):
    rc = main(["demo", "--model", str(STORIES), "--plan", str(SMOLLM2_PLAN), "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "plan is for another model" in err and "num_layers=30" in err
    assert not (tmp_path / "demo.json").exists()


def test_demo_rejects_unknown_methods(capsys):
    assert main(["demo", "--methods", "streaming,nope"]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err


@needs(STORIES)
def test_demo_missing_plan_file(tmp_path, capsys):
    assert main(["demo", "--model", str(STORIES), "--plan", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
