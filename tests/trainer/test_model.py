"""The one multi-task forward pass: adapters, heads, mixed-task batches."""

import torch

from trainer.backbones import HFTextBackbone
from trainer.surgery.adapters import Adapters
from trainer.surgery.model import PAD_LOGIT, Heads, MultiTaskModel


def _model(tiny_bert_dir, mode, rank=4):
    torch.manual_seed(0)
    backbone = HFTextBackbone(tiny_bert_dir, max_length=16)
    heads = Heads([torch.randn(2, 32), torch.randn(3, 32)], [torch.randn(2), torch.randn(3)])
    return MultiTaskModel(backbone, heads, ["a", "b"], mode, rank).eval()


@torch.no_grad()
def test_step_zero_surgered_model_is_the_merged_model(tiny_bert_dir):
    plain = _model(tiny_bert_dir, "none")
    batch = plain.backbone.collate(["one text", "another longer text here", "x"])
    ids = torch.tensor([0, 1, 1])
    for mode in ("surgery", "surgeryv2"):
        surgered = _model(tiny_bert_dir, mode)
        surgered.backbone.load_state_dict(plain.backbone.state_dict())
        assert torch.equal(surgered(batch, ids), plain(batch, ids))
        assert surgered.adapter_parameters()[0].abs().sum() > 0  # W_down is not zero


@torch.no_grad()
def test_mixed_task_batch_equals_per_task_batches(tiny_bert_dir):
    model = _model(tiny_bert_dir, "surgeryv2")
    for p in model.adapter_parameters():
        p.normal_(0, 0.3)  # non-trivial adapters
    texts = ["alpha beta", "gamma delta epsilon", "zeta", "eta theta"]
    ids = torch.tensor([1, 0, 1, 0])
    mixed = model(model.backbone.collate(texts), ids)
    for i, text in enumerate(texts):
        alone = model(model.backbone.collate([text]), ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)


def test_adapter_formula_and_task_isolation():
    adapters = Adapters(positions=1, num_tasks=3, rank=2, dim=4, seed=0)
    with torch.no_grad():
        adapters.up.normal_()
    x = torch.randn(3, 4)
    ids = torch.tensor([2, 0, 1])
    out = adapters(0, x, adapters.unit_mask(ids))
    for row, t in enumerate(ids.tolist()):
        down, up = adapters.down[0, t], adapters.up[0, t]
        expected = x[row] - up @ torch.relu(down @ x[row])
        torch.testing.assert_close(out[row], expected)
    # a row's loss gives gradient to its own task's adapter only
    out[0].sum().backward()
    assert adapters.up.grad[0, 2].abs().sum() > 0
    assert adapters.up.grad[0, 0].abs().sum() == 0 and adapters.up.grad[0, 1].abs().sum() == 0


def test_heads_pad_columns():
    heads = Heads([torch.ones(2, 4), torch.ones(3, 4)], [torch.zeros(2), torch.zeros(3)])
    logits = heads(torch.ones(2, 4), torch.tensor([0, 1]))
    assert logits.shape == (2, 3)
    assert logits[0, 2] == PAD_LOGIT and logits[1, 2] == 4.0
