"""bench.pair_runs on two tiny trainer.fit runs: per-row correctness kept beside results.json,
paired on the same test rows, and refused when the rows differ or were not kept."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bench import pair_runs
from trainer.results import stats
from trainer.results.predictions import read_correct

SETS = ("--set", 'merge.methods=["task_arithmetic"]', "--set", 'surgery.modes=["none","surgeryv2"]')


def _fit(config, root, name, *extra):
    """trainer.fit into ``root/name`` (data and cache shared under ``root``)."""
    from trainer.fit import main

    out = root / name
    argv = ["--config", str(config), "--data", str(root / "data"), "--out", str(out)]
    assert main([*argv, "--cache", str(root / "cache"), *SETS, *extra]) == 0
    return out


def test_two_runs_pair_on_the_same_rows(tiny_config, tmp_path, capsys):
    run_a = _fit(tiny_config, tmp_path, "a")
    run_b = _fit(tiny_config, tmp_path, "b", "--set", "surgery.rank=2")
    results_a = json.loads((run_a / "results.json").read_text())
    correct_a = read_correct(run_a / "correct.npz")
    # every row's kept correctness is the row's own accuracy
    for row in results_a["rows"]:
        key = f"{row['method']}/{row['surgery']}"
        for task, acc in row["acc"].items():
            assert correct_a[key][task].mean() == pytest.approx(acc)
    assert set(results_a["test_rows"]) == {"animals", "colours"}
    assert all(len(v["sha256"]) == 64 for v in results_a["test_rows"].values())

    out = tmp_path / "res"
    assert pair_runs.main([str(run_a), str(run_b / "results.json"), "--out", str(out)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads((out / "pair_runs.json").read_text())
    assert data["a"]["row"] == results_a["bundle"]["row"] and data["summary"] == summary
    assert summary.startswith(f"tiny {data['a']['row']} (A) vs tiny {data['b']['row']} (B)")
    correct_b = read_correct(run_b / "correct.npz")
    want = stats.compare(correct_a[data["a"]["row"]], correct_b[data["b"]["row"]]).to_json()
    assert data["comparison"]["p_value"] == want["p_value"]
    assert data["comparison"]["per_task"] == want["per_task"]

    # one run against itself, two named rows: the same paired test results.json records
    # for the compared surgered row against the experts
    compared = results_a["comparisons"][0]
    args = [str(run_a), str(run_a), "--row", compared["a"], "--row-b", "individual/none"]
    assert pair_runs.main([*args, "--out", str(out)]) == 0
    again = json.loads((out / "pair_runs.json").read_text())["comparison"]
    assert again["p_value"] == compared["p_value"] and again["verdict"] == compared["verdict"]
    assert again["difference"] == compared["difference"]

    # ---- refusals: one line each, exit 2, nothing written -----------------------------------
    (out / "pair_runs.json").unlink()

    def refused(argv, message):
        assert pair_runs.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
        assert not (out / "pair_runs.json").exists()

    refused([str(run_a), str(run_b), "--row", "ties_merging/none"], "is not a row of")
    refused([str(run_a), str(tmp_path / "nowhere")], "no results.json there")
    other = tmp_path / "other"
    shutil.copytree(run_b, other)
    results = json.loads((other / "results.json").read_text())
    results["test_rows"]["colours"]["sha256"] = "0" * 64
    (other / "results.json").write_text(json.dumps(results))
    refused([str(run_a), str(other)], "task colours was scored on other test rows")
    (other / "correct.npz").unlink()
    refused([str(run_a), str(other)], "keeps no per-row results")
    (other / "correct.npz").write_bytes(b"not an npz")
    refused([str(run_a), str(other)], "is not a readable correct.npz")
    np.testing.assert_equal(read_correct(run_a / "correct.npz"), correct_a)  # untouched


def _ablation(config, root, *extra):
    """bench.surgery_ablation on the data and cache of ``_fit`` -> its JSON's path."""
    from bench import surgery_ablation

    argv = ["--config", str(config), "--data", str(root / "data"), "--cache", str(root / "cache")]
    argv += ["--out", str(root / "ablation"), "--device", "cpu", "--iterations", "2"]
    assert surgery_ablation.main([*argv, "--variants", "default,rank=2", *extra]) == 0
    return root / "ablation" / "surgery_ablation_tiny.json"


def test_an_analysis_pairs_with_itself_and_with_a_fit_run(tiny_config, tmp_path, capsys):
    """A bench analysis keeps its rows' correctness too: its variants pair with each other,
    and its experts' row with a trainer.fit run's on the same rows (the same experts, so the
    very same correctness); an --eval-limit subset is refused against the full rows."""
    run = _fit(tiny_config, tmp_path, "fit")
    analysis = _ablation(tiny_config, tmp_path, "--eval-limit", "0")
    data = json.loads(analysis.read_text())
    assert data["correct_file"] == "surgery_ablation_tiny.correct.npz"
    fit_results = json.loads((run / "results.json").read_text())
    assert data["test_rows"] == fit_results["test_rows"]  # all test rows, same hash
    correct = read_correct(analysis.parent / data["correct_file"])
    assert {"individual", "task_arithmetic", *data["test"]} <= set(correct)
    for label, entry in data["test"].items():
        for task, acc in entry["acc"].items():
            assert correct[label][task].mean() == pytest.approx(acc)

    out = tmp_path / "res"
    # default: the analysis's chosen variant, on both sides
    assert pair_runs.main([str(analysis), str(analysis), "--out", str(out)]) == 0
    paired = json.loads((out / "pair_runs.json").read_text())
    assert paired["a"]["row"] == paired["b"]["row"] == data["chosen"]
    assert paired["a"]["suite"] == "tiny" and paired["comparison"]["difference"] == 0
    capsys.readouterr()

    # the analysis's experts against the fit run's: identical rows, identical correctness
    args = [str(analysis), str(run), "--row", "individual", "--row-b", "individual/none"]
    assert pair_runs.main([*args, "--out", str(out)]) == 0
    paired = json.loads((out / "pair_runs.json").read_text())
    fit_correct = read_correct(run / "correct.npz")["individual/none"]
    np.testing.assert_equal(correct["individual"], fit_correct)
    assert paired["comparison"]["difference"] == 0 and paired["tasks"] == ["animals", "colours"]
    assert (
        capsys.readouterr()
        .out.strip()
        .splitlines()[-1]
        .startswith("tiny individual (A) vs tiny individual/none (B)")
    )

    # a subset of the test rows is not the same rows: refused in one line
    subset = _ablation(tiny_config, tmp_path, "--eval-limit", "16")
    assert json.loads(subset.read_text())["test_rows"]["animals"]["rows"] == 16
    capsys.readouterr()
    (out / "pair_runs.json").unlink()
    args = [str(subset), str(run), "--row", "individual", "--row-b", "individual/none"]
    assert pair_runs.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "task animals was scored on other test rows" in err and "\n" not in err
    assert "(16 vs 24 rows" in err and not (out / "pair_runs.json").exists()
    # an analysis JSON without its correctness file
    (subset.parent / "surgery_ablation_tiny.correct.npz").unlink()
    assert pair_runs.main([str(subset), str(run), "--row", "x", "--out", str(out)]) == 2
    assert "keeps no per-row results (surgery_ablation_tiny.correct.npz" in capsys.readouterr().err
