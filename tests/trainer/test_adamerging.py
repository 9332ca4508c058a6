"""Layer-wise AdaMerging: starts at task arithmetic, learns by entropy, stays in [0, 1], and
its guard stops a task from collapsing."""

import copy
import logging
import math

import numpy as np
import torch
from torch import nn

from trainer.backbones import HFTextBackbone
from trainer.merging import MergeContext, get_method, merge, mergeable, task_vectors
from trainer.merging.adamerging import (
    INIT_GRID,
    _held_out,
    _merged,
    adamerging,
    information_loss,
)
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
    ada = adamerging(base, experts, context=ctx, iterations=0, init_search=False)
    ta = merge("task_arithmetic", base, experts, {"lam": 0.3})
    for k in base:
        torch.testing.assert_close(ada[k], ta[k])


def test_init_search_starts_from_the_best_agreeing_task_arithmetic(tiny_bert_dir):
    base, experts, ctx = _setup(tiny_bert_dir)
    ada = adamerging(base, experts, context=ctx, iterations=0, guard_size=4)
    record = ctx.extra["adamerging"]
    scores = record["init_agreement"]
    assert set(scores) == set(INIT_GRID) | {0.3}  # the grid and the given init
    assert scores[record["init"]] == max(scores.values())
    ta = merge("task_arithmetic", base, experts, {"lam": record["init"]})
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
    # the paper's objective alone: raw logits, entropy only, no guard
    paper = {"diversity": 0.0, "normalize_logits": False, "guard_every": 0}
    learned = adamerging(base, experts, context=ctx, iterations=25, lr=0.05, batch_size=8, **paper)
    assert entropy(learned) < before


def test_defaults():
    params = {p.name: p.default for p in get_method("adamerging").params}
    assert params["lr"] == 3e-3  # chosen on validation across suites (the paper: 1e-3)
    assert params["init"] == 0.3
    assert params["batch_size"] == 16


def test_learned_coefficients_stay_in_unit_interval(tiny_bert_dir):
    base, experts, ctx = _setup(tiny_bert_dir)
    learned = adamerging(base, experts, context=ctx, iterations=6, lr=0.5, batch_size=4)
    coeff = ctx.extra["adamerging"]["coefficients"]
    keys = mergeable(base)
    assert coeff.shape == (2, len(keys))  # one per task and tensor
    assert coeff.min() >= 0.0 and coeff.max() <= 1.0
    assert (coeff != 0.3).any()  # it moved
    vectors = task_vectors(base, experts)
    for k in base:  # the returned state is Θ(0) + Σ_t λ_t τ_t with those coefficients
        want = (
            base[k] + sum(coeff[t, keys.index(k)] * vectors[t][k] for t in range(2))
            if (k in keys)
            else base[k]
        )
        torch.testing.assert_close(learned[k], want)


# ---- a constructed collapse ---------------------------------------------------------------
#
# Inputs x in R^2, one linear "backbone" f = W x + b, base W = 0, b = 0. Expert 0 reads
# f_0 = x_0 + 1 and its head predicts class 0 iff f_0 > 0, so the expert sends 84 % of the
# inputs to class 0 and the rest to class 1. Task 0's entropy is lowest when f_0 is a large
# constant: λ(0, W) -> 0 and λ(0, b) -> 1 sends EVERY input to class 0 (zero entropy, wrong
# on every input with x_0 < -1). Expert 1 (task 1) only reads f_1 = x_1.


class Linear2(nn.Module):
    """The smallest backbone AdaMerging can run: ``batch`` stacks the inputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def batch(self, inputs: list, device: torch.device) -> torch.Tensor:
        return torch.stack(inputs).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _collapse_case(scale: float = 4.0):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, generator=g) for _ in range(200)]
    base = {"lin.weight": torch.zeros(2, 2), "lin.bias": torch.zeros(2)}
    experts = [
        {"lin.weight": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "lin.bias": torch.tensor([1.0, 0])},
        {"lin.weight": torch.tensor([[0.0, 0.0], [0.0, 1.0]]), "lin.bias": torch.zeros(2)},
    ]
    heads = Heads(
        [scale * torch.tensor([[1.0, 0.0], [0.0, 0.0]]), scale * torch.tensor([[0, 1.0], [0, -1]])],
        [torch.zeros(2), torch.zeros(2)],
    )
    ctx = MergeContext(
        Linear2(), heads, [inputs, inputs], torch.device("cpu"), names=["shifted", "plain"]
    )
    return base, experts, ctx, torch.stack(inputs)


def _task0_predictions(state, heads, x):
    features = x @ state["lin.weight"].T + state["lin.bias"]
    return heads(features, torch.zeros(len(x), dtype=torch.long))[:, :2].argmax(-1)


PAPER = {"diversity": 0.0, "normalize_logits": False}  # the paper's loss: entropy, raw logits


def test_unguarded_entropy_minimisation_collapses_the_constructed_task():
    base, experts, ctx, x = _collapse_case()
    learned = adamerging(
        base, experts, context=ctx, iterations=200, lr=0.05, guard_every=0, **PAPER
    )
    pred = _task0_predictions(learned, ctx.heads, x)
    expert = _task0_predictions(experts[0], ctx.heads, x)
    assert (pred == 0).all()  # every input in one class
    assert (pred == expert).float().mean() < 0.9


def test_guard_stops_the_collapse_and_says_so(caplog):
    base, experts, ctx, x = _collapse_case()
    with caplog.at_level(logging.INFO, logger="deepsurgery"):
        learned = adamerging(
            base, experts, context=ctx, iterations=200, lr=0.05, guard_every=5, **PAPER
        )
    record = ctx.extra["adamerging"]
    assert record["stopped"] is not None and record["stopped"] < 200
    assert record["kept"] < record["stopped"]
    assert "adamerging guard: stopped at iteration" in caplog.text
    assert "task shifted agrees with its expert" in caplog.text
    assert "adamerging guard: kept the coefficients of iteration" in caplog.text
    # the kept checkpoint is within the margin on the held-out inputs, and not collapsed
    kept = dict(record["history"])[record["kept"]]
    assert all(k >= s - 0.03 for k, s in zip(kept, record["start"]))
    pred = _task0_predictions(learned, ctx.heads, x)
    expert = _task0_predictions(experts[0], ctx.heads, x)
    assert (pred == 1).any()
    assert (pred == expert).float().mean() >= 0.95


def test_guard_is_silent_when_no_task_falls(caplog):
    base, experts, ctx, _ = _collapse_case()
    experts[0]["lin.bias"] = torch.zeros(2)  # nothing to collapse onto: f_0 = x_0
    with caplog.at_level(logging.INFO, logger="deepsurgery"):
        adamerging(base, experts, context=ctx, iterations=20, lr=0.05, **PAPER)
    assert ctx.extra["adamerging"]["stopped"] is None
    assert "adamerging guard" not in caplog.text


def test_normalized_logits_make_the_loss_blind_to_a_folded_logit_scale():
    """A head with CLIP's logit scale 100 folded in learns what the unscaled head learns;
    on raw logits its entropy is ~0 and the coefficients barely move."""
    runs = {}
    for scale in (1.0, 100.0):
        for normalize in (True, False):
            base, experts, ctx, _ = _collapse_case(scale)
            adamerging(
                base, experts, context=ctx, iterations=10, lr=0.05, normalize_logits=normalize
            )
            runs[scale, normalize] = ctx.extra["adamerging"]["coefficients"]
    torch.testing.assert_close(runs[1.0, True], runs[100.0, True])
    moved = {k: (v - 0.3).abs().max().item() for k, v in runs.items()}
    assert moved[100.0, False] < 0.5 * moved[1.0, False]


def test_information_loss():
    one_class = torch.tensor([[20.0, 0.0, 0.0]]).repeat(4, 1)
    spread = torch.tensor([[20.0, 0, 0], [0, 20.0, 0], [0, 0, 20.0], [20.0, 0, 0]])
    assert information_loss(one_class).item() < 1e-6  # entropy alone: a perfect minimum
    assert information_loss(one_class, 1.0).item() > 1.0  # KL(one class ‖ uniform) ≈ log 3
    assert information_loss(spread, 1.0) < information_loss(one_class, 1.0)
    # uniform prior: log C minus the entropy of the mean prediction
    logits = torch.randn(8, 3)
    mean = logits.softmax(-1).mean(0)
    want = information_loss(logits) + math.log(3) + (mean * mean.log()).sum()
    torch.testing.assert_close(information_loss(logits, 1.0), want)
    # a prior that matches the mean prediction adds nothing
    torch.testing.assert_close(information_loss(logits, 1.0, mean), information_loss(logits))


def test_held_out_inputs_are_never_trained_on():
    unlabeled = [list(range(10)), list(range(100, 103)), [7]]
    pools, held = _held_out(unlabeled, 4, np.random.default_rng(0))
    assert [len(h) for h in held] == [4, 1, 0]  # at most half a task's inputs
    for pool, h, inputs in zip(pools, held, unlabeled):
        assert not set(pool) & set(h)
        assert sorted(pool + h) == inputs
