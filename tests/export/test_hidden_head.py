"""Export of a text model whose task heads keep a hidden layer (a transformers classifier's
pooler / classification head): bundle -> ONNX equals PyTorch, fused, for a task subset, and
on an MPNet backbone."""

from __future__ import annotations

import json

import numpy as np
import torch

from export import onnx as export_onnx
from tests.export.test_onnx import check_dynamic, check_model_dir, inputs, run, torch_logits
from tests.trainer.experts_kit import write_family
from trainer.backbones import HFTextBackbone
from trainer.experts.formats import ExpertSource, load_expert
from trainer.results.bundle import load_bundle, write_bundle
from trainer.surgery.model import Heads, MultiTaskModel, TaskHead

CLASSES = {"sentiment": ["neg", "pos"], "topic": ["a", "b", "c"], "lang": ["en", "de", "fr", "x"]}


def _bundle(tmp_path, tiny_bert_dir, activation: str):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    backbone = HFTextBackbone(tiny_bert_dir, max_length=16, pooling="cls")
    heads = Heads.stack(
        [
            TaskHead(
                randn(len(c), 32), randn(len(c)), randn(32, 32, scale=0.5), randn(32), activation
            )
            for c in CLASSES.values()
        ]
    )
    model = MultiTaskModel(backbone, heads, list(CLASSES), mode="surgeryv2", rank=4).eval()
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(randn(*p.shape, scale=0.1))
    bundle = tmp_path / f"bundle-{activation}"
    write_bundle(bundle, model, list(CLASSES.values()), {"suite": "hidden-heads"})
    return model, bundle


def test_hidden_layer_heads_through_bundle_and_onnx(tmp_path, tiny_bert_dir):
    for activation in ("tanh", "gelu"):
        model, bundle = _bundle(tmp_path, tiny_bert_dir, activation)
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["heads"] == {"normalize": False, "hidden": 32, "activation": activation}
        loaded, _ = load_bundle(bundle)
        batch = inputs(loaded, 6, 0, 9)
        ids = np.array([0, 1, 2, 2, 1, 0])
        np.testing.assert_array_equal(
            torch_logits(loaded, batch, ids), torch_logits(model, batch, ids)
        )
        # one row of task t alone == its own head by hand: act(Wh f + bh) then W, b
        with torch.no_grad():
            final = loaded.representations(batch, torch.as_tensor(ids))[0]
            head = loaded.heads.task_head(2)
            hidden = {"tanh": torch.tanh, "gelu": torch.nn.functional.gelu}[activation](
                final[2] @ head.hidden_weight.T + head.hidden_bias
            )
            np.testing.assert_allclose(
                torch_logits(loaded, batch, ids)[2, :4],
                (hidden @ head.weight.T + head.bias).numpy(),
                atol=1e-5,
            )
        out = tmp_path / f"onnx-{activation}"
        assert export_onnx.main(["--bundle", str(bundle), "--out", str(out)]) == 0
        check_model_dir(out, bundle)
        check_dynamic(out, loaded, 1e-4)


def test_task_subset_keeps_each_tasks_hidden_layer(tmp_path, tiny_bert_dir):
    _, bundle = _bundle(tmp_path, tiny_bert_dir, "tanh")
    out = tmp_path / "subset"
    assert (
        export_onnx.main(["--bundle", str(bundle), "--out", str(out), "--tasks", "lang,sentiment"])
        == 0
    )
    model, _ = load_bundle(bundle)
    batch = inputs(model, 4, 3, 7)
    got = run(out / "model.onnx", batch, [0, 1, 1, 0])
    want = torch_logits(model, batch, [2, 0, 0, 2])
    np.testing.assert_allclose(got[[0, 3]], want[[0, 3], :4], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[[1, 2], :2], want[[1, 2], :2], atol=1e-4, rtol=0)


def test_mpnet_transformers_experts_export(tmp_path):
    """MPNet (a relative position bias in every block) with its classifiers' heads: the fused
    graph equals PyTorch. BERT, RoBERTa, DistilBERT and ELECTRA export the same way."""
    root = write_family(tmp_path / "mpnet", "mpnet", {"a": ["x", "y"], "b": ["p", "q", "r"]})
    base = HFTextBackbone(root / "base", max_length=16, pooling="cls")
    experts = [load_expert(ExpertSource(root / n, n, [], base, base.state_dict())) for n in "ab"]
    model = MultiTaskModel(base, Heads.stack([e.head for e in experts]), ["a", "b"], "surgeryv2", 4)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_(0, 0.1)
    bundle = tmp_path / "bundle"
    write_bundle(bundle, model.eval(), [["x", "y"], ["p", "q", "r"]], {"suite": "mpnet"})
    assert export_onnx.main(["--bundle", str(bundle), "--out", str(tmp_path / "onnx")]) == 0
    check_model_dir(tmp_path / "onnx", bundle)
    loaded, _ = load_bundle(bundle)
    assert loaded.backbone.model_type == "mpnet"
    check_dynamic(tmp_path / "onnx", loaded, 1e-4)
