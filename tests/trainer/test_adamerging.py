"""Layer-wise AdaMerging: starts at task arithmetic, learns by entropy, stays in [0, 1]."""

import copy

import torch

from trainer.backbones import HFTextBackbone
from trainer.merging import MergeContext, merge, mergeable, task_vectors
from trainer.merging.adamerging import _merged, adamerging
from trainer.surgery.model import Heads

TEXTS = [[f"first task text {i}" for i in range(8)], [f"second task row {i}" for i in range(8)]]


def _setup(tiny_bert_dir):
    torch.manual_seed(0)
    backbone = HFTextBackbone(tiny_bert_dir, max_length=12)
    base = {k: v.clone() for k, v in backbone.state_dict().items()}
    experts = []
    for t in range(2):
        g = torch.Generator().manual_seed(t)
        experts.append(
            {
                k: v + 0.02 * torch.randn(v.shape, generator=g)
                if v.is_floating_point()
                else v.clone()
                for k, v in base.items()
            }
        )
    heads = Heads([torch.randn(3, 32), torch.randn(2, 32)], [torch.zeros(3), torch.zeros(2)])
    ctx = MergeContext(copy.deepcopy(backbone), heads, TEXTS, torch.device("cpu"))
    return base, experts, ctx


def test_zero_iterations_is_task_arithmetic(tiny_bert_dir):
    base, experts, ctx = _setup(tiny_bert_dir)
    ada = adamerging(base, experts, context=ctx, iterations=0)
    ta = merge("task_arithmetic", base, experts, {"lam": 0.3})
    for k in base:
        torch.testing.assert_close(ada[k], ta[k])


def test_coefficients_are_clamped_per_tensor_and_task():
    base = {"a": torch.zeros(2), "b": torch.zeros(1)}
    vectors = task_vectors(
        base,
        [{"a": torch.ones(2), "b": torch.ones(1)}, {"a": 2 * torch.ones(2), "b": torch.ones(1)}],
    )
    lam = torch.tensor([[1.5, 0.2], [-1.0, 0.5]])  # [task, tensor]
    out = _merged(base, vectors, mergeable(base), lam)
    # a: 1.0 * 1 + 0.0 * 2 ; b: 0.2 * 1 + 0.5 * 1
    torch.testing.assert_close(out["a"], torch.ones(2))
    torch.testing.assert_close(out["b"], torch.tensor([0.7]))


def test_training_lowers_the_entropy(tiny_bert_dir):
    base, experts, ctx = _setup(tiny_bert_dir)

    def entropy(state):
        backbone = ctx.backbone
        backbone.load_state_dict(state)
        total = 0.0
        with torch.no_grad():
            for t, texts in enumerate(TEXTS):
                logits = ctx.heads(backbone(backbone.collate(texts)), torch.full((8,), t))
                logits = logits[:, : ctx.heads.num_classes[t]]
                total += -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean().item()
        return total

    before = entropy(merge("task_arithmetic", base, experts, {"lam": 0.3}))
    ctx.backbone.load_state_dict(base)
    learned = adamerging(base, experts, context=ctx, iterations=25, lr=0.05, batch_size=8)
    assert entropy(learned) < before
