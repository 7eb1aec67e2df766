"""``vist2 eval general``: lm-eval results files (in lm-eval's own layout) into the paper's Table 6."""

import json
import os

import pytest

from vist2.eval.general import parse_runs, read_run


def _run(folder, results: dict, mtime: float | None = None):
    """A results file where lm-eval puts one: <output_path>/<model name>/results_<time>.json."""
    path = folder / "runs__sft" / f"results_{len(list(folder.rglob('*.json')))}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "config": {"model": "vist2", "model_args": "pretrained=x"}}))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_table6_from_lm_eval_runs(tmp_path, capsys):
    from vist2.cli import main

    gcc, none = tmp_path / "gcc", tmp_path / "none"
    _run(gcc, {"gsm8k": {"exact_match,strict-match": 0.1}}, mtime=1_000)  # an older run in the same folder
    _run(gcc, {"gsm8k": {"exact_match,strict-match": 0.8715, "exact_match,flexible-extract": 0.9},
               "hendrycks_math": {"exact_match,none": 0.3015}, "agieval_aqua_rat": {"acc,none": 0.321},
               "cmmlu": {"acc,none": 0.7512}}, mtime=2_000)
    _run(none, {"gsm8k": {"exact_match,strict-match": 0.88}, "cmmlu": {"acc,none": 0.768}})
    out = tmp_path / "t6.json"
    assert main(["eval", "general", "--runs", f"gcc={gcc},none={none}", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["runs"]["gcc"]["scores"] == {"GSM-8k": 0.8715, "MATH": 0.3015, "AQUA": 0.321, "CMMLU": 0.7512}
    assert res["runs"]["none"]["scores"] == {"GSM-8k": 0.88, "MATH": None, "AQUA": None, "CMMLU": 0.768}
    printed = capsys.readouterr().out
    assert "| gcc | 0.8715 | 0.3015 | 0.3210 | 0.7512 |" in printed
    assert "| none | 0.8800 | - | - | 0.7680 |" in printed
    assert out.with_suffix(".md").read_text().strip() in printed


def test_bad_runs(tmp_path, capsys):
    from vist2.cli import main

    with pytest.raises(ValueError, match="expected NAME=PATH"):
        parse_runs("gcc")
    with pytest.raises(ValueError, match="no lm-eval results"):
        read_run(tmp_path)
    bad = tmp_path / "results_1.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not an lm-eval results file"):
        read_run(bad)
    assert main(["eval", "general", "--runs", f"a={tmp_path / 'nope'}", "--out", str(tmp_path / "x.json")]) == 2
    assert "no lm-eval results" in capsys.readouterr().err
