"""``python -m trainer.fit`` under the inductive protocol (the default): every choice is made
on validation rows or unlabeled train inputs, so permuting the TEST labels moves none of
them; and the pool's bad inputs are one-line errors before any work."""

import json
from pathlib import Path

import pytest

from tests.conftest import run_fit
from tests.trainer.pool_kit import ANIMALS, distinct_rows, permute_test_labels, write_distinct_tasks


@pytest.fixture
def inductive_config(tmp_path, tiny_bert_dir) -> Path:
    """The tiny BERT on two tasks with distinct train and test inputs; λ, Ties' k and λ
    searched, AdaMerging (its start searched), SurgeryV2 on task arithmetic; the pool left
    at its default."""
    write_distinct_tasks(tmp_path / "data", copies=3)
    path = tmp_path / "inductive.toml"
    path.write_text(f"""
name = "pool"
[backbone]
kind = "hf_text"
path = "{tiny_bert_dir}"
max_length = 16
[finetune]
steps = 40
batch_size = 8
lr = 3e-3
[eval]
batch_size = 16
[merge]
methods = ["task_arithmetic", "ties_merging", "adamerging"]
ties_merging = {{ k = "search", lam = [0.5, 1.0] }}
adamerging = {{ iterations = 4, batch_size = 4, guard_every = 2, guard_size = 8 }}
[surgery]
modes = ["none", "surgeryv2"]
methods = ["task_arithmetic", "adamerging"]
rank = 4
iterations = 5
batch_size = 8
[[tasks]]
name = "animals"
path = "{{data}}/animals"
[[tasks]]
name = "colours"
path = "{{data}}/colours"
""")
    return path


def _fit(config: Path, tmp_path: Path, data: Path, out: str, *extra) -> dict:
    code = run_fit(config, tmp_path, "--data", str(data), "--out", str(tmp_path / out), *extra)
    assert code == 0
    return json.loads((tmp_path / out / "results.json").read_text())


def test_permuted_test_labels_move_no_choice(inductive_config, tmp_path, capsys):
    """Run fit twice, the second time with every task's test labels shuffled (same inputs):
    the pool, λ, Ties' k and λ, AdaMerging's start and kept step, every validation score and
    the bundle row (its weights, byte for byte) must not move; the test rows must."""
    data = tmp_path / "data"
    permuted = permute_test_labels(data, tmp_path / "permuted", seed=5)
    first = _fit(inductive_config, tmp_path, data, "a")
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    second = _fit(inductive_config, tmp_path, permuted, "b")

    # the default is the inductive protocol, copies of test inputs dropped from the pool
    pool = first["unlabeled"]
    assert pool["protocol"] == "inductive" and pool["source"] == "train"
    assert pool["overlap_with_test"] == 0 and pool["rows"] == {"animals": 24, "colours": 24}
    assert "inductive (train inputs)" in summary
    assert "by validation" in summary

    # no choice moved
    assert second["unlabeled"] == pool
    assert second["validation"] == first["validation"]
    # λ, k, AdaMerging's start and every candidate's validation score (not the time taken)
    assert _untimed(second["merge"]) == _untimed(first["merge"])
    assert {"init", "kept"} <= set(first["merge"]["adamerging"]["learned"])
    assert second["bundle"] == first["bundle"]
    bundle = first["bundle"]
    assert bundle["criterion"] == "validation"
    assert set(bundle["scores"]) == {
        "task_arithmetic/none",
        "task_arithmetic/surgeryv2",
        "ties_merging/none",
        "adamerging/none",
        "adamerging/surgeryv2",
    }
    assert bundle["row"] == max(bundle["scores"], key=bundle["scores"].get)
    manifests = [json.loads((tmp_path / o / "bundle" / "manifest.json").read_text()) for o in "ab"]
    assert manifests[0]["sha256"] == manifests[1]["sha256"]  # the very same model ships
    assert manifests[0]["bundle"] == bundle
    assert manifests[0]["unlabeled"]["protocol"] == "inductive"

    # ... while the test accuracies did move: the labels really were permuted
    assert [r["acc"] for r in first["rows"]] != [r["acc"] for r in second["rows"]]


def _untimed(record):
    """``record`` without its wall-clock ``seconds`` entries."""
    if isinstance(record, dict):
        return {k: _untimed(v) for k, v in record.items() if k != "seconds"}
    return record


def test_transductive_protocol_is_named(inductive_config, tmp_path, capsys):
    results = _fit(
        inductive_config,
        tmp_path,
        tmp_path / "data",
        "t",
        "--set",
        "surgery.unlabeled='test'",
        "--set",
        "merge.methods=['task_arithmetic']",
        "--set",
        "surgery.methods=[]",
        "--set",
        "surgery.modes=['surgeryv2']",
    )
    assert results["unlabeled"]["protocol"] == "transductive"
    assert results["unlabeled"]["overlap_with_test"] == 48  # every scored test input
    # one merged row: nothing to choose
    assert results["bundle"] == {
        "row": "task_arithmetic/surgeryv2",
        "criterion": "only row",
        "scores": {},
    }
    assert "transductive (test inputs)" in capsys.readouterr().out.strip().splitlines()[-1]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_a_pool_sharing_test_inputs_is_refused_before_any_work(inductive_config, tmp_path, capsys):
    wild = tmp_path / "wild.txt"
    test_input = distinct_rows(ANIMALS, 24, 1, 1000)[0][0]
    wild.write_text(f"an input of my own\n{test_input}\n")
    code = run_fit(inductive_config, tmp_path, "--set", f"surgery.unlabeled='{wild}'")
    assert code == 2
    line = _error(capsys)
    assert "shares 1 inputs with the scored test splits" in line
    assert 'surgery.unlabeled = "test"' in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "experts").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("surgery.unlabeled='transductive'", "names the pool, not the protocol"),
        ("surgery.unlabeled='trian'", "unknown surgery.unlabeled 'trian'"),
        ("surgery.unlabeled_size=0", "unlabeled_size must be"),
    ],
)
def test_bad_pool_settings(inductive_config, tmp_path, capsys, override, message):
    assert run_fit(inductive_config, tmp_path, "--set", override) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_pool_with_no_usable_rows(inductive_config, tmp_path, capsys):
    """Every train input of animals is a copy of one of its test inputs: nothing is left."""
    folder = tmp_path / "data" / "animals"
    (folder / "train.jsonl").write_text((folder / "test.jsonl").read_text() * 2)
    assert run_fit(inductive_config, tmp_path) == 2
    assert "task 'animals': no usable unlabeled inputs for the inductive pool" in _error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "experts").exists()


def test_without_labelled_validation_rows_the_bundle_is_chosen_by_agreement(
    inductive_config, tmp_path
):
    """colours brings its own validation inputs without labels: every merged row is scored by
    its agreement with the experts on the validation inputs, and the manifest says so."""
    rows = distinct_rows(ANIMALS, 6, 9, 5000)  # inputs the pool does not hold
    (tmp_path / "data" / "colours-val.txt").write_text("".join(t + "\n" for t, _ in rows))
    text = inductive_config.read_text().replace(
        'path = "{data}/colours"', 'path = "{data}/colours"\nvalidation = "{data}/colours-val.txt"'
    )
    inductive_config.write_text(text)
    results = _fit(
        inductive_config,
        tmp_path,
        tmp_path / "data",
        "g",
        "--set",
        "merge.methods=['task_arithmetic', 'weight_averaging']",
        "--set",
        "surgery.methods=['task_arithmetic']",
    )
    bundle = results["bundle"]
    assert bundle["criterion"] == "agreement" and results["validation"]["criterion"] == "agreement"
    assert list(bundle["scores"]) == [
        "task_arithmetic/none",
        "task_arithmetic/surgeryv2",
        "weight_averaging/none",
    ]
    assert all(0.0 <= s <= 1.0 for s in bundle["scores"].values())
    assert bundle["row"] == max(bundle["scores"], key=bundle["scores"].get)
    manifest = json.loads((tmp_path / "g" / "bundle" / "manifest.json").read_text())
    assert manifest["bundle"] == bundle
