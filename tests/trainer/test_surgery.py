"""Surgery: cached targets, label-free training, loss decrease, representation bias."""

import copy

import numpy as np
import pytest
import torch

from trainer.backbones import HFTextBackbone
from trainer.data.tasks import Split
from trainer.results.evaluate import evaluate_task
from trainer.surgery.features import Targets, representations
from trainer.surgery.model import Heads, MultiTaskModel
from trainer.surgery.train import logit_divergence, surgery_loss, train_surgery

TEXTS = [
    [f"task zero sentence number {i} about cats" for i in range(12)],
    [f"the other task has row {i} on cars and roads" for i in range(12)],
]


def _setup(tiny_bert_dir, mode="surgeryv2", rank=4):
    torch.manual_seed(0)
    merged = HFTextBackbone(tiny_bert_dir, max_length=16)
    experts = []
    for t in range(2):  # experts: the merged weights plus a seeded perturbation
        e = copy.deepcopy(merged)
        with torch.no_grad():
            g = torch.Generator().manual_seed(10 + t)
            for p in e.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        experts.append(e)
    heads = Heads([torch.randn(2, 32), torch.randn(3, 32)], [torch.zeros(2), torch.zeros(3)])
    model = MultiTaskModel(merged, heads, ["a", "b"], mode, rank)
    return model, experts


@pytest.mark.parametrize("mode", ["surgery", "surgeryv2"])
def test_cached_and_on_the_fly_targets_give_the_same_loss(tiny_bert_dir, mode):
    model, experts = _setup(tiny_bert_dir, mode)
    cached = [representations(e, TEXTS[t], 5, torch.device("cpu")) for t, e in enumerate(experts)]
    rows = [3, 7, 1, 10]
    for t, expert in enumerate(experts):
        batch = model.backbone.collate([TEXTS[t][i] for i in rows])
        ids = torch.full((len(rows),), t)
        with torch.no_grad():  # on the fly: run the expert on exactly this batch
            hidden, ctx = expert.embed(batch)
            means = []
            for index in range(expert.num_blocks):
                hidden = expert.block(index, hidden, ctx)
                means.append(expert.token_mean(hidden, ctx))
            fly = Targets(torch.stack(means, 1), expert.pool(hidden, ctx))
            loss_fly = surgery_loss(model, batch, ids, fly, "l1")
            loss_cached = surgery_loss(model, batch, ids, cached[t].take(torch.tensor(rows)), "l1")
        torch.testing.assert_close(loss_cached, loss_fly, atol=1e-6, rtol=1e-5)


def test_surgeryv2_reduces_the_loss_and_the_bias(tiny_bert_dir):
    model, experts = _setup(tiny_bert_dir)
    targets = [representations(e, TEXTS[t], 6, torch.device("cpu")) for t, e in enumerate(experts)]
    splits = [Split(TEXTS[t], np.zeros(12, dtype=np.int64)) for t in range(2)]
    _, bias_before = evaluate_task(model, 0, splits[0], 6, torch.device("cpu"), targets[0])
    result = train_surgery(model, TEXTS, targets, iterations=40, batch_size=6, lr=5e-3)
    _, bias_after = evaluate_task(model, 0, splits[0], 6, torch.device("cpu"), targets[0])
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert len(bias_before) == model.backbone.num_blocks + 1
    assert bias_after[-1] < bias_before[-1] and bias_after[0] < bias_before[0]
    assert all(not p.requires_grad for p in model.parameters())  # frozen after training


def test_surgery_v1_trains_only_the_final_adapter(tiny_bert_dir):
    model, experts = _setup(tiny_bert_dir, mode="surgery")
    before = copy.deepcopy(model.backbone.state_dict())
    targets = [representations(e, TEXTS[t], 6, torch.device("cpu")) for t, e in enumerate(experts)]
    result = train_surgery(model, TEXTS, targets, iterations=30, batch_size=6, lr=5e-3)
    assert model.block_adapters is None
    assert result.losses[-1] < result.losses[0]
    assert model.final_adapter.up.abs().sum() > 0
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key])  # merged weights frozen


def test_cosine_schedule_anneals_the_adapters_steps_to_zero(tiny_bert_dir):
    """Adam's step is ~lr: held constant the last step moves the adapters as much as the
    first ones; annealed along a half cosine it moves them almost not at all."""
    last_moves = {}
    for schedule in ("constant", "cosine"):
        model, experts = _setup(tiny_bert_dir)
        targets = [
            representations(e, TEXTS[t], 6, torch.device("cpu")) for t, e in enumerate(experts)
        ]
        snapshots = []

        def keep(step, m, snapshots=snapshots):
            snapshots.append(torch.cat([p.detach().flatten() for p in m.adapter_parameters()]))

        train_surgery(
            model,
            TEXTS,
            targets,
            iterations=12,
            batch_size=6,
            lr=5e-3,
            schedule=schedule,
            callback=keep,
        )
        moves = [(b - a).abs().max().item() for a, b in zip(snapshots, snapshots[1:])]
        last_moves[schedule] = moves[-1] / moves[0]
    assert last_moves["constant"] > 0.3
    assert last_moves["cosine"] < 0.05
    with pytest.raises(ValueError, match="unknown surgery schedule 'step'"):
        train_surgery(model, TEXTS, targets, iterations=1, batch_size=6, lr=5e-3, schedule="step")


def test_logit_weight_adds_the_heads_kl_and_trains(tiny_bert_dir):
    model, experts = _setup(tiny_bert_dir)
    targets = [representations(e, TEXTS[t], 6, torch.device("cpu")) for t, e in enumerate(experts)]
    rows = torch.tensor([0, 4, 9])
    batch = model.backbone.collate([TEXTS[1][i] for i in rows])
    ids = torch.full((3,), 1)
    target = targets[1].take(rows)
    with torch.no_grad():
        plain = surgery_loss(model, batch, ids, target, "l1")
        weighted = surgery_loss(model, batch, ids, target, "l1", logit_weight=2.0)
        final, _ = model.representations(batch, ids)
        kl = logit_divergence(model, final, target.final, ids)
        assert kl > 0  # the merged model predicts differently from the expert
        torch.testing.assert_close(weighted - plain, 2.0 * kl)
        # the expert against itself: nothing to learn; padding columns (task 0 has 2 of 3
        # classes) add nothing
        zero = logit_divergence(model, target.final, target.final, ids)
        assert zero.abs() < 1e-6
        pad = logit_divergence(model, target.final, target.final, torch.zeros(3, dtype=torch.long))
        assert pad.abs() < 1e-6
    result = train_surgery(
        model, TEXTS, targets, iterations=30, batch_size=6, lr=5e-3, logit_weight=1.0
    )
    assert result.losses[-1] < 0.7 * result.losses[0]
    with torch.no_grad():
        final, _ = model.representations(batch, ids)
        assert logit_divergence(model, final, target.final, ids) < kl
