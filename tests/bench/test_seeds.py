"""bench.seeds end to end on the tiny model: one trainer.fit per seed (experts, validation split
and adapters reseeded), resumed when a seed's run exists, every row as mean ± sd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import seeds


def test_two_seeds_run_resume_and_aggregate(tiny_config, tmp_path, capsys):
    args = [
        *("--config", str(tiny_config), "--seeds", "0,1"),
        *("--data", str(tmp_path / "data"), "--cache", str(tmp_path / "cache")),
        *("--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "res")),
        *("--set", 'merge.methods=["task_arithmetic"]'),
        *("--set", 'surgery.modes=["none", "surgeryv2"]'),
    ]
    assert seeds.main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("seeds (tiny, transductive, seeds 0,1): experts ")
    report = json.loads((tmp_path / "res" / "seeds_tiny.json").read_text())
    assert report["seeds"] == [0, 1] and report["tasks"] == ["animals", "colours"]
    runs = [json.loads(Path(f).read_text()) for f in report["files"]]
    assert [r["config"]["finetune"]["seed"] for r in runs] == [0, 1]  # experts reseeded
    assert [r["config"]["surgery"]["seed"] for r in runs] == [0, 1]
    assert set(report["rows"]) == {
        "individual/none",
        "task_arithmetic/none",
        "task_arithmetic/surgeryv2",
    }
    for key, row in report["rows"].items():
        avgs = [
            r_["avg"] for r in runs for r_ in r["rows"] if f"{r_['method']}/{r_['surgery']}" == key
        ]
        assert row["avg_mean"] == pytest.approx(sum(avgs) / 2)
        assert row["avg_sd"] == pytest.approx(abs(avgs[0] - avgs[1]) / 2**0.5)
    v2 = report["rows"]["task_arithmetic/surgeryv2"]
    closures = [r["gap_closure"]["task_arithmetic/surgeryv2"]["value"] for r in runs]
    if None in closures:  # a seed whose merge is not below its experts has no gap to close
        assert "gap_closure_mean" not in v2
    else:
        assert v2["gap_closure_per_seed"] == {"0": closures[0], "1": closures[1]}
    assert sum(r["chosen_by_validation"] for r in report["rows"].values()) == 2

    # a second call finds both runs and trains nothing
    assert seeds.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("exists, not run again") == 2


def test_mixed_suites_and_a_seed_override_are_refused(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    base = {"rows": [], "tasks": [], "config": {"seed": 0}}
    a.write_text(json.dumps(base | {"suite": "demo"}))
    b.write_text(json.dumps(base | {"suite": "text-bench", "config": {"seed": 1}}))
    with pytest.raises(SystemExit):
        seeds.main(["--seeds", "", "--results", str(a), str(b), "--out", str(tmp_path)])
    assert "different suites (demo, text-bench)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        seeds.main(["--seeds", "1", "--set", "seed=3"])
    assert "--set seed=... is what --seeds varies" in capsys.readouterr().err
