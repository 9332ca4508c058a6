"""[pretrain] (cached supervised pre-training of the base) and the multitask reference row,
on a tiny open_clip ViT and synthetic colour tasks."""

import json
import logging

import numpy as np
import pytest
import torch

from trainer.backbones import OpenClipViTBackbone
from trainer.config import FinetuneConfig, load_config
from trainer.data.tasks import load_task
from trainer.errors import UserError
from trainer.experts.finetune import augment_images, train_classifier
from trainer.fit import main


def _colour_npz(path, classes, n_train, n_test, seed):
    """Label = which colour channel is bright: learnable by a tiny ViT in a few steps."""
    rng = np.random.default_rng(seed)

    def images(n):
        labels = rng.integers(0, len(classes), n)
        x = rng.integers(0, 60, (n, 16, 16, 3), dtype=np.uint8)
        for i, y in enumerate(labels):
            x[i, :, :, y % 3] += np.uint8(150 if y < 3 else 90)
        return x, labels

    x_train, y_train = images(n_train)
    x_test, y_test = images(n_test)
    np.savez(
        path,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        classes=np.array(classes),
    )


@pytest.fixture
def vision_config(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _colour_npz(data / "corpus.npz", ["r", "g", "b"], 96, 48, 0)
    _colour_npz(data / "one.npz", ["r", "g", "b"], 48, 24, 1)
    _colour_npz(data / "two.npz", ["r", "g", "b", "dim-r", "dim-g"], 48, 24, 2)
    path = tmp_path / "vision.toml"
    path.write_text("""
name = "tiny-vision"
[backbone]
kind = "open_clip_vit"
path = ""
vision_cfg = { image_size = 16, patch_size = 8, width = 32, layers = 2, head_width = 16 }
embed_dim = 32
[pretrain]
name = "corpus"
path = "{data}/corpus.npz"
steps = 6
batch_size = 16
lr = 1e-3
[finetune]
steps = 4
batch_size = 8
lr = 1e-3
[multitask]
enabled = true
[eval]
batch_size = 32
[merge]
methods = ["task_arithmetic"]
[surgery]
modes = ["none", "surgeryv2"]
rank = 4
iterations = 3
batch_size = 8
[[tasks]]
name = "one"
path = "{data}/one.npz"
[[tasks]]
name = "two"
path = "{data}/two.npz"
""")
    return path


def _main(config, tmp_path, *extra) -> int:
    folders = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    return main(["--config", str(config), *folders, "--cache", str(tmp_path / "cache"), *extra])


def _fit(config, tmp_path, *extra):
    assert _main(config, tmp_path, *extra) == 0
    return json.loads((tmp_path / "out" / "results.json").read_text())


def test_pretrain_multitask_rows_and_cache(vision_config, tmp_path, caplog):
    first = _fit(vision_config, tmp_path)
    pre = first["pretrain"]
    assert pre["corpus"] == "corpus" and pre["source"] == "fine-tuned"
    assert pre["train_rows"] == 96 and pre["test_rows"] == 48
    assert 0.0 <= pre["test_accuracy"] <= 1.0
    assert "pretrain" in first["timing_s"] and "multitask" in first["timing_s"]
    labels = [(r["method"], r["surgery"]) for r in first["rows"]]
    assert labels[:2] == [("individual", "none"), ("multitask", "none")]
    assert set(first["rows"][1]["acc"]) == {"one", "two"}
    assert (tmp_path / "cache" / "pretrain").is_dir()
    assert len(list((tmp_path / "cache" / "multitask").glob("*.safetensors"))) == 1

    # everything cached: same base, same experts (their key includes the pre-trained
    # weights), same multitask model, so every row is reproduced exactly
    with caplog.at_level(logging.INFO, logger="deepsurgery"):
        second = _fit(vision_config, tmp_path)
    assert second["pretrain"]["source"] == "cache"
    assert second["pretrain"]["test_accuracy"] == pre["test_accuracy"]
    assert "multitask reference cache" in caplog.text
    assert [r["acc"] for r in second["rows"]] == [r["acc"] for r in first["rows"]]
    assert len(list((tmp_path / "cache" / "experts").glob("*.safetensors"))) == 2


def test_corrupt_or_foreign_pretrain_cache_is_rebuilt(vision_config, tmp_path, caplog):
    _fit(vision_config, tmp_path)
    entry = next((tmp_path / "cache" / "pretrain").glob("*.safetensors"))
    data = bytearray(entry.read_bytes())
    data[-16:] = b"\x01" * 16
    entry.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="deepsurgery"):
        again = _fit(vision_config, tmp_path)
    assert "pre-training cache" in caplog.text and "corrupt (sha256 mismatch)" in caplog.text
    assert again["pretrain"]["source"] == "fine-tuned"

    stamp = entry.with_suffix(".json")
    meta = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**meta, "key": "another-config"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepsurgery"):
        third = _fit(vision_config, tmp_path)
    assert "belongs to another config; rebuilding" in caplog.text
    assert third["pretrain"]["source"] == "fine-tuned"


def test_pretraining_moves_the_base_and_learns(vision_config, tmp_path):
    """More steps on a learnable corpus: well above chance (1/3) on its test split."""
    overrides = ["pretrain.steps=40", "merge.methods=[]", 'surgery.modes=["none"]']
    overrides.append("multitask.enabled=false")
    results = _fit(vision_config, tmp_path, *(x for o in overrides for x in ("--set", o)))
    assert results["pretrain"]["test_accuracy"] > 0.6


def test_augment_images_is_seeded_and_shape_preserving():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a = augment_images(x, torch.Generator().manual_seed(0))
    b = augment_images(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    flipped_only = augment_images(x, torch.Generator().manual_seed(1), pad=0)
    for i in range(2):
        assert torch.equal(flipped_only[i], x[i]) or torch.equal(flipped_only[i], x[i].flip(-1))


def test_train_classifier_gives_one_head_per_task(tmp_path):
    _colour_npz(tmp_path / "a.npz", ["r", "g", "b"], 16, 8, 0)
    _colour_npz(tmp_path / "b.npz", ["r", "g", "b", "x", "y"], 16, 8, 1)
    tasks = [load_task(n, str(tmp_path / f"{n}.npz"), tmp_path) for n in ("a", "b")]
    base = OpenClipViTBackbone(
        vision_cfg={"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        embed_dim=32,
    )
    trained = train_classifier(
        base, tasks, FinetuneConfig(steps=2, batch_size=4), torch.device("cpu")
    )
    assert [tuple(w.shape) for w, _ in trained.heads] == [(3, 32), (5, 32)]
    assert set(trained.state) == set(base.state_dict())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.stepz=3", "unknown config key 'pretrain.stepz'"),
        ("pretrain.steps=0", "pretrain.steps and pretrain.batch_size must be >= 1"),
        ("multitask.steps=-1", "multitask.steps and multitask.lr must be >= 0"),
    ],
)
def test_bad_pretrain_and_multitask_keys(vision_config, override, message):
    with pytest.raises(UserError, match=message):
        load_config(str(vision_config), [override])


def test_missing_pretrain_corpus_is_one_line_error(vision_config, tmp_path, capsys):
    code = _main(vision_config, tmp_path, "--set", "pretrain.path={data}/nope.npz")
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.npz" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
