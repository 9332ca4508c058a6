"""The paper's analyses (bench.surgery_iterations, rank_sweep, unlabeled_fraction, wild_data,
adamerging_curve) end to end on the tiny model: their JSON, plot and one-line errors."""

import json

import numpy as np
import pytest

from bench import (
    adamerging_curve,
    rank_sweep,
    surgery_ablation,
    surgery_iterations,
    unlabeled_fraction,
    wild_data,
)
from trainer.config import SurgeryConfig


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One expert cache for the module: the tiny experts are trained once, then loaded."""
    return tmp_path_factory.mktemp("cache")


def _run(module, config, tmp_path, cache, *extra):
    return module.main(
        [
            "--config",
            str(config),
            "--data",
            str(tmp_path / "data"),
            "--cache",
            str(cache),
            "--out",
            str(tmp_path / "res"),
            "--device",
            "cpu",
            "--eval-limit",
            "16",
            *extra,
        ]
    )


def _result(tmp_path, name):
    assert (tmp_path / "res" / f"{name}.png").stat().st_size > 1000
    data = json.loads((tmp_path / "res" / f"{name}.json").read_text())
    assert data["bench"] == name and data["config"] == "tiny" and data["device"] == "cpu"
    assert data["tasks"] == ["animals", "colours"]
    assert data["eval_limit"] == 16 and data["eval_rows"] == {"animals": 16, "colours": 16}
    for ref in data["reference"].values():
        _check_row(ref)
    assert data["total_seconds"] > 0 and "machine" in data
    return data


def _check_row(row):
    assert set(row["acc"]) == {"animals", "colours"}
    assert all(0.0 <= v <= 1.0 for v in row["acc"].values())
    assert 0.0 <= row["avg"] <= 1.0


def test_surgery_iterations(tiny_config, tmp_path, cache, capsys):
    code = _run(
        surgery_iterations,
        tiny_config,
        tmp_path,
        cache,
        *("--surgery-iterations", "4", "--surgeryv2-iterations", "2"),
        *("--checkpoints", "0,2,4", "--compare-at", "2"),
    )
    assert code == 0
    data = _result(tmp_path, "surgery_iterations")
    assert data["iterations"] == {"surgery": 4, "surgeryv2": 2} and data["rank"] == 4
    assert [p["iteration"] for p in data["curves"]["surgery"]] == [0, 2, 4]
    assert [p["iteration"] for p in data["curves"]["surgeryv2"]] == [0, 2]
    for curve in data["curves"].values():
        assert curve[0] == {**data["reference"]["task_arithmetic"], "iteration": 0, "loss": None}
        for point in curve:
            _check_row(point)
    assert data["modes"]["surgeryv2"]["seconds_per_iteration"] > 0
    assert data["comparison"]["surgeryv2_iteration"] == 2
    # the two points compared by a paired test on the same test rows, each with its interval
    paired = data["comparison"]["paired"]
    assert paired["a"] == "SurgeryV2 @2" and paired["b"] == "Surgery @4"
    assert paired["verdict"] in ("beats", "below", "ties within noise")
    assert all("avg" in p["ci95"] for curve in data["curves"].values() for p in curve)
    out = capsys.readouterr().out
    assert "SurgeryV2 avg" in out and "SurgeryV2 at 2 it" in out


def test_rank_sweep(tiny_config, tmp_path, cache):
    assert (
        _run(rank_sweep, tiny_config, tmp_path, cache, "--ranks", "2,4", "--iterations", "2") == 0
    )
    data = _result(tmp_path, "rank_sweep")
    assert data["rank"] == [2, 4] and data["iterations"] == 2
    assert [(r["rank"], r["mode"]) for r in data["rows"]] == [
        (2, "surgery"),
        (2, "surgeryv2"),
        (4, "surgery"),
        (4, "surgeryv2"),
    ]
    for r in data["rows"]:
        _check_row(r)
    params = {(r["rank"], r["mode"]): r["adapter_params_per_task"] for r in data["rows"]}
    assert params[(2, "surgery")] == 2 * 2 * 32  # down + up of the final adapter, width 32
    assert params[(4, "surgeryv2")] == 3 * 2 * 4 * 32  # 2 blocks + final
    assert params[(4, "surgeryv2")] == 2 * params[(2, "surgeryv2")]
    # each mode's rank is chosen on validation; the test curve carries intervals
    for mode in ("surgery", "surgeryv2"):
        points = [r for r in data["rows"] if r["mode"] == mode]
        best = max(points, key=lambda r: r["validation"]["avg"])
        assert data["chosen"][mode] == best["rank"] and best["chosen"]
        assert all(r["ci95"]["avg"][0] <= r["avg"] <= r["ci95"]["avg"][1] for r in points)


def test_surgery_ablation(tiny_config, tmp_path, cache, capsys):
    variants = (
        "default,iterations=x2,rank=2,lr=x3,loss=cos,schedule=cosine,logit_weight=0.5,batch_size=4,"
        "attention_adapters=true"
    )
    code = _run(
        surgery_ablation, tiny_config, tmp_path, cache, "--variants", variants, "--iterations", "2"
    )
    assert code == 0
    data = _result(tmp_path, "surgery_ablation_tiny")
    assert [r["variant"] for r in data["rows"]] == [
        "default",
        "iterations=4",
        "rank=2",
        f"lr={3 * SurgeryConfig().lr:g}",  # x3 of the shipped default
        "loss=cos",
        "schedule=cosine",
        "logit_weight=0.5",
        "batch_size=4",
        "attention_adapters=true",
    ]
    base = data["defaults"]
    assert base["iterations"] == 2 and data["rows"][0]["delta_points"] == 0.0
    changes = [
        "iterations",
        "rank",
        "lr",
        "loss",
        "schedule",
        "logit_weight",
        "batch_size",
        "attention_adapters",
    ]
    for r, changed in zip(data["rows"][1:], changes, strict=True):
        _check_row(r)
        # exactly one setting differs from the defaults
        assert [k for k in base if r["settings"][k] != base[k]] == [changed]
    assert data["rows"][2]["settings"]["rank"] == 2
    # the rows are VALIDATION scores; the chosen one is the best of them
    assert data["chosen_on"] == "validation" and data["validation"]["rows"] == {
        "animals": 9,
        "colours": 9,
    }
    val = data["validation"]["reference"]
    merged, individual = (val[k]["avg"] for k in ("task_arithmetic", "individual"))
    for r in data["rows"]:
        if individual > merged:
            assert r["gap_closure"] == pytest.approx((r["avg"] - merged) / (individual - merged))
    assert data["chosen"] == max(data["rows"], key=lambda r: r["avg"])["variant"]
    # test: only the chosen variant and the default, each with its interval and paired tests
    assert set(data["test"]) == {data["chosen"], "default"}
    for entry in data["test"].values():
        _check_row(entry)
        assert set(entry["ci95"]) == {"animals", "colours", "avg"}
        assert entry["vs_individual"]["verdict"] in ("beats", "below", "ties within noise")
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "chosen on validation" in summary and "test rows (at most" in summary


def test_surgery_ablation_pick_ignores_test_labels(tiny_config, tmp_path, cache):
    """Permuting every task's TEST labels changes test numbers, never the choice."""
    # experts trained long enough that the variants differ on validation
    variants = "default,iterations=x10,lr=x10,rank=1"
    args = ("--variants", variants, "--iterations", "3")
    args += ("--set", "finetune.steps=40", "--set", "finetune.lr=3e-3")
    assert _run(surgery_ablation, tiny_config, tmp_path, cache, *args) == 0
    before = _result(tmp_path, "surgery_ablation_tiny")
    assert len({r["avg"] for r in before["rows"]}) > 1
    rng = np.random.default_rng(0)
    for task in ("animals", "colours"):
        path = tmp_path / "data" / task / "test.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        labels = rng.permutation([r["label"] for r in rows])
        path.write_text(
            "".join(json.dumps({**r, "label": int(y)}) + "\n" for r, y in zip(rows, labels))
        )
    assert _run(surgery_ablation, tiny_config, tmp_path, cache, *args) == 0
    after = _result(tmp_path, "surgery_ablation_tiny")
    assert after["chosen"] == before["chosen"]
    assert [r["avg"] for r in after["rows"]] == [r["avg"] for r in before["rows"]]
    assert after["validation"] == before["validation"]
    # the permutation did reach the test split
    assert after["reference"]["individual"] != before["reference"]["individual"]


def test_unlabeled_fraction(tiny_config, tmp_path, cache):
    code = _run(
        unlabeled_fraction,
        tiny_config,
        tmp_path,
        cache,
        *("--fractions", "0.25,1.0", "--iterations", "2"),
    )
    assert code == 0
    data = _result(tmp_path, "unlabeled_fraction")
    assert data["fractions"] == [0.25, 1.0] and data["mode"] == "surgeryv2"
    assert [r["fraction"] for r in data["rows"]] == [0.25, 1.0]
    assert [r["unlabeled_rows"] for r in data["rows"]] == [
        {"animals": 6, "colours": 6},
        {"animals": 24, "colours": 24},
    ]
    for r in data["rows"]:
        _check_row(r)


def test_wild_data(tiny_config, tmp_path, cache):
    wild = tmp_path / "wild.jsonl"
    wild.write_text("".join(json.dumps({"text": f"a note number {i}"}) + "\n" for i in range(30)))
    code = _run(
        wild_data,
        tiny_config,
        tmp_path,
        cache,
        *("--sources", "animals", "--wild", str(wild), "--wild-limit", "20", "--iterations", "2"),
    )
    assert code == 0
    data = _result(tmp_path, "wild_data")
    assert [(r["source"], r["kind"], r["in_domain_for"]) for r in data["rows"]] == [
        ("test", "own", None),
        ("task:animals", "task", "animals"),
        ("wild:wild", "wild", None),
    ]
    assert data["rows"][1]["unlabeled_rows"] == {"animals": 20, "colours": 20}
    assert data["rows"][2]["unlabeled_rows"] == {"animals": 20, "colours": 20}
    for r in data["rows"]:
        _check_row(r)


def _check_curve(points, every, last):
    its = [p["iteration"] for p in points]
    assert its[0] == 0 and its == sorted(its) and its[-1] <= last
    assert all(i % every == 0 for i in its)
    for p in points:
        _check_row(p)
        assert all(h >= 0.0 for h in p["entropy"].values())
        assert all(0.0 < m <= 1.0 for m in p["majority"].values())


def test_adamerging_curve(tiny_config, tmp_path, cache, capsys):
    code = _run(adamerging_curve, tiny_config, tmp_path, cache, "--iterations", "4", "--every", "2")
    assert code == 0
    data = _result(tmp_path, "adamerging_curve")
    assert set(data["curves"]) == {"paper", "shipped"}
    # the paper's recipe: from 0.3, every step taken (its guard watches but never stops it)
    assert data["guard"]["paper"]["init"] == 0.3 and data["guard"]["paper"]["stopped"] is None
    assert [p["iteration"] for p in data["curves"]["paper"]] == [0, 2, 4]
    for points in data["curves"].values():
        _check_curve(points, every=2, last=4)
    assert data["hparams"]["shipped"]["init_search"] is True
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("tiny: paper ")


def test_adamerging_curve_one_recipe_from_a_given_start(tiny_config, tmp_path, cache):
    extra = ["--recipes", "shipped", "--iterations", "2", "--every", "1"]
    extra += ["--set", "merge.adamerging.init=0.6", "--set", "merge.adamerging.init_search=false"]
    assert _run(adamerging_curve, tiny_config, tmp_path, cache, *extra) == 0
    data = _result(tmp_path, "adamerging_curve")
    assert list(data["curves"]) == ["shipped"] and data["guard"]["shipped"]["init"] == 0.6
    _check_curve(data["curves"]["shipped"], every=1, last=2)


@pytest.mark.parametrize(
    "module, extra, message",
    [
        (surgery_iterations, ["--checkpoints", "0,-5"], "--checkpoints expects iteration counts"),
        (rank_sweep, ["--ranks", "4,64"], "rank 64 does not fit the backbone width 32"),
        (unlabeled_fraction, ["--fractions", "0.5,1.5"], "--fractions must lie in (0, 1]"),
        (wild_data, ["--sources", "animals,planets"], "--sources: no task named 'planets'"),
        (wild_data, ["--wild", "{data}/nowhere.jsonl"], "nowhere.jsonl does not exist"),
        (surgery_ablation, ["--variants", "default,depth=3"], "'depth=3' is not default"),
        (surgery_ablation, ["--variants", "loss=huber"], "loss must be one of l1, mse, cos"),
        (
            surgery_ablation,
            ["--variants", "schedule=step"],
            "schedule must be one of constant, cosine",
        ),
        (surgery_ablation, ["--variants", "rank=64"], "rank 64 does not fit the backbone width"),
        (
            surgery_ablation,
            ["--variants", "attention_adapters=yes"],
            "attention_adapters must be one of true, false",
        ),
        (adamerging_curve, ["--recipes", "paper,magic"], "--recipes: 'magic'; choose from"),
        (adamerging_curve, ["--every", "0"], "--every must be >= 1"),
    ],
)
def test_bad_input_is_one_line(module, extra, message, tiny_config, tmp_path, cache, capsys):
    assert _run(module, tiny_config, tmp_path, cache, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "res").exists()


def test_unknown_config_is_one_line(tmp_path, capsys):
    assert surgery_iterations.main(["--config", "no-such-config", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'no-such-config'" in err and "Traceback" not in err
