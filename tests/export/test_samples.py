"""The bundle's sample of real inputs: written by the trainer, read back in order, and used by
the exporter's parity check (int8 is judged on it; fp32 on every row)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.export.conftest import TASKS, build_model
from tests.export.test_onnx import check_model_dir, export
from trainer.errors import UserError
from trainer.results.bundle import load_bundle, read_samples, sample_inputs, write_bundle

TEXTS = [
    "the cat chased a red ball across the garden",
    "a green leaf fell on the calm lake",
    "the dog was sad and angry all day",
    "blue skies make everyone happy",
    "an angry cat hissed at the dog",
    "red and green lights at the crossing",
]


def pools(kind: str) -> list[list]:
    """Per task, a few 'real' inputs: texts, or uint8 images of several sizes (some larger
    than the model's 32 px, so the sample file shrinks them)."""
    rng = np.random.default_rng(0)
    if kind == "text":
        return [[f"{t} ({i})" for i, t in enumerate(TEXTS)] for _ in TASKS]
    sizes = [(32, 32), (48, 40), (120, 90), (20, 28), (64, 64), (33, 100)]
    return [[rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes] for _ in TASKS]


@pytest.fixture(scope="module")
def sampled_bundle(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("sampled")
    made = {}

    def make(kind: str):
        if kind not in made:
            model = build_model(kind, "surgeryv2", tiny_bert_dir)
            samples = sample_inputs(pools(kind), seed=0, rows=5)
            made[kind] = write_bundle(
                root / kind / "bundle",
                model,
                list(TASKS.values()),
                {"suite": "tiny", "merge": {"method": "task_arithmetic"}},
                samples,
            )
        return made[kind]

    return make


def test_sample_inputs_is_seeded_and_bounded():
    a = sample_inputs([list(range(100)), list(range(3))], seed=0, rows=8)
    assert a == sample_inputs([list(range(100)), list(range(3))], seed=0, rows=8)
    assert len(a[0]) == 8 and a[1] == [0, 1, 2]
    assert a != sample_inputs([list(range(100)), list(range(3))], seed=1, rows=8)


@pytest.mark.parametrize("kind", ["text", "image"])
def test_samples_round_trip(kind, sampled_bundle):
    bundle = sampled_bundle(kind)
    _, manifest = load_bundle(bundle)
    assert manifest["samples"]["rows"] == {n: 5 for n in TASKS}
    got = read_samples(bundle, manifest, list(reversed(TASKS)))  # any order of names
    want = list(reversed(sample_inputs(pools(kind), seed=0, rows=5)))
    for rows, expected in zip(got, want, strict=True):
        assert len(rows) == len(expected)
        for x, y in zip(rows, expected, strict=True):
            if kind == "text":
                assert x == y
            else:  # shorter side at most the model's 32 px, aspect kept, uint8 RGB
                assert x.dtype == np.uint8 and x.shape[2] == 3
                assert min(x.shape[:2]) == min(32, min(y.shape[:2]))
                if min(y.shape[:2]) <= 32:
                    assert np.array_equal(x, y)


@pytest.mark.parametrize("kind", ["text", "image"])
def test_export_checks_the_real_rows(kind, sampled_bundle, tmp_path):
    bundle = sampled_bundle(kind)
    out = tmp_path / "fp32"
    assert export(bundle, out) == 0
    parity = check_model_dir(out, bundle, "fp32")["parity"]
    real, synth = parity["real"], parity["synthesized"]
    assert real["distinct_inputs"] == 5 * len(TASKS) and real["rows"] > real["distinct_inputs"]
    assert parity["judged_on"] == "synthesized and real"
    assert parity["rows"] == real["rows"] + synth["rows"]
    assert real["max_abs_logit_diff"] <= 1e-4 and real["top1_agreement"] == 1.0


def test_int8_is_judged_on_the_real_rows(sampled_bundle, tmp_path):
    bundle = sampled_bundle("text")
    out = tmp_path / "int8"
    assert export(bundle, out, "--precision", "int8") == 0
    parity = check_model_dir(out, bundle, "int8")["parity"]
    assert parity["judged_on"] == "real"
    assert parity["rows"] == parity["real"]["rows"]
    assert parity["top1_agreement"] == parity["real"]["top1_agreement"] >= 0.95
    assert "top1_agreement" in parity["synthesized"]  # recorded, not judged


def test_a_changed_sample_file_is_refused(sampled_bundle, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(sampled_bundle("text"), bundle)
    data = json.loads((bundle / "samples.json").read_text())
    data["tasks"]["animals"][0] = "something else"
    (bundle / "samples.json").write_text(json.dumps(data))
    assert export(bundle, tmp_path / "onnx") == 2
    err = capsys.readouterr().err
    assert "samples.json" in err and "sha256" in err
    with pytest.raises(UserError, match="samples.json"):
        load_bundle(bundle)
