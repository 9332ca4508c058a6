"""python -m trainer.fit end to end on a tiny model, and its one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeldir import sha256_file
from tests.conftest import REPO, run_fit
from trainer.results import stats
from trainer.results.bundle import SAMPLE_ROWS, load_bundle, read_samples


def test_fit_writes_results_bundle_and_table(tiny_config, tmp_path, capsys):
    assert run_fit(tiny_config, tmp_path) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    labels = [(r["method"], r["surgery"]) for r in results["rows"]]
    assert labels == [
        ("individual", "none"),
        ("weight_averaging", "none"),
        ("task_arithmetic", "none"),
        ("task_arithmetic", "surgery"),
        ("task_arithmetic", "surgeryv2"),
        ("ties_merging", "none"),
    ]
    for row in results["rows"]:
        assert set(row["acc"]) == {"animals", "colours"}
        assert 0.0 <= row["avg"] <= 1.0
        assert set(row["ci95"]) == {"animals", "colours", "avg"}  # 95 % intervals, fractions
        for task, (lo, hi) in row["ci95"].items():
            assert 0.0 <= lo <= (row["avg"] if task == "avg" else row["acc"][task]) <= hi <= 1.0
    # every merged + surgery row against its plain merge; the compared row vs the experts
    assert set(results["gap_closure"]) == {"task_arithmetic/surgery", "task_arithmetic/surgeryv2"}
    # the surgered row validation prefers vs the experts, then the bundle row if another
    assert [c["chosen_by"] for c in results["comparisons"]][:1] == ["validation"]
    for comparison in results["comparisons"]:
        assert comparison["b"] == "individual" and comparison["verdict"] in stats.VERDICTS
    assert len(results["bias"]["task_arithmetic/none"]) == 3  # 2 blocks + final
    assert results["device"] == "cpu" and "experts" in results["timing_s"]
    assert (out / "bias.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "Avg" in table and "task_arithmetic w/ SurgeryV2" in table
    # the bundle: verified sha256, and it rebuilds the measured model exactly
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert sha256_file(out / "bundle" / name) == digest
    model, _ = load_bundle(out / "bundle")
    assert model.task_names == ["animals", "colours"]
    # the bundle row: the best VALIDATION average over every merged row, "none" rows included
    bundle = results["bundle"]
    assert bundle["criterion"] == "validation" and manifest["bundle"] == bundle
    merged = [f"{r['method']}/{r['surgery']}" for r in results["rows"][1:]]
    assert list(bundle["scores"]) == merged
    assert bundle["row"] == max(merged, key=lambda k: (bundle["scores"][k], -merged.index(k)))
    shipped = next(r for r in results["rows"] if f"{r['method']}/{r['surgery']}" == bundle["row"])
    assert manifest["accuracy"]["avg"] == shipped["avg"]
    assert results["unlabeled"]["protocol"] == "transductive"  # the fixture's pool is test
    assert manifest["unlabeled"] == {
        k: results["unlabeled"][k] for k in ("protocol", "source", "rows")
    }
    # a seeded sample of the real inputs surgery learned from travels with the bundle
    assert manifest["samples"]["file"] == "samples.json"
    sample = read_samples(out / "bundle", manifest, ["animals", "colours"])
    assert [len(rows) for rows in sample] == list(manifest["samples"]["rows"].values())
    assert all(0 < len(rows) <= SAMPLE_ROWS for rows in sample)
    assert all(isinstance(x, str) and x for rows in sample for x in rows)
    # warm run: experts come from the cache
    assert run_fit(tiny_config, tmp_path) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == results["rows"]


def _error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_unknown_config_key(tiny_config, tmp_path, capsys):
    assert run_fit(tiny_config, tmp_path, "--set", "surgery.rnak=4") == 2
    assert "surgery.rnak" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_task_path(tiny_config, tmp_path, capsys):
    tiny_config.write_text(tiny_config.read_text().replace("{data}/colours", "{data}/nothing"))
    assert run_fit(tiny_config, tmp_path) == 2
    assert "nothing" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_rank_wider_than_the_backbone(tiny_config, tmp_path, capsys):
    assert run_fit(tiny_config, tmp_path, "--set", "surgery.rank=64") == 2
    assert "exceeds the backbone width 32" in _error(capsys)


def test_wild_folder_missing_or_empty(tiny_config, tmp_path, capsys):
    assert run_fit(tiny_config, tmp_path, "--set", f"surgery.unlabeled='{tmp_path}/wild'") == 2
    assert "does not exist" in _error(capsys)
    (tmp_path / "wild").mkdir()
    assert run_fit(tiny_config, tmp_path, "--set", f"surgery.unlabeled='{tmp_path}/wild'") == 2
    assert "holds no inputs" in _error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tiny_config, tmp_path, capsys):
    assert run_fit(tiny_config, tmp_path, "--device", "cuda") == 2
    assert "CUDA is not available" in _error(capsys)


def test_expert_checkpoint_with_a_mismatched_parameter(
    tiny_config, tmp_path, tiny_bert_dir, capsys
):
    weights = load_file(str(tiny_bert_dir / "model.safetensors"))
    tensors = {f"backbone.model.{k}": v for k, v in weights.items()}
    key = "backbone.model.encoder.layer.0.attention.self.query.weight"
    tensors[key] = tensors[key][:16]

    tensors["head.weight"], tensors["head.bias"] = torch.zeros(2, 32), torch.zeros(2)
    save_file(tensors, str(tmp_path / "expert.safetensors"))
    text = tiny_config.read_text().replace(
        'path = "{data}/animals"',
        f'path = "{{data}}/animals"\ncheckpoint = "{tmp_path}/expert.safetensors"',
    )
    tiny_config.write_text(text)
    assert run_fit(tiny_config, tmp_path) == 2
    msg = _error(capsys)
    assert "encoder.layer.0.attention.self.query.weight" in msg and "shape [16, 32]" in msg


def test_cli_module_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.fit", "--config", "nope"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown config 'nope'")


def test_branch_block_and_attention_adapters_reach_the_bundle(tiny_config, tmp_path):
    assert (
        run_fit(
            tiny_config,
            tmp_path,
            "--set",
            "surgery.branch_block=1",
            "--set",
            "surgery.attention_adapters=true",
            "--set",
            "output.bundle='task_arithmetic/surgeryv2'",
        )
        == 0
    )
    manifest = json.loads((tmp_path / "out" / "bundle" / "manifest.json").read_text())
    assert manifest["surgery"] == {
        "mode": "surgeryv2",
        "rank": 4,
        "branch_block": 1,
        "attention_adapters": True,
    }
    # the row named by the config ships; every merged row still has its validation score
    assert manifest["bundle"]["row"] == "task_arithmetic/surgeryv2"
    assert manifest["bundle"]["criterion"] == "config" and len(manifest["bundle"]["scores"]) == 5
    model, _ = load_bundle(tmp_path / "out" / "bundle")
    assert model.branch_block == 1 and model.block_adapters.down.shape[0] == 1
    assert model.attention_adapters.down.shape[0] == 1
    assert model.attention_adapters.up.abs().sum() > 0  # trained, and saved
