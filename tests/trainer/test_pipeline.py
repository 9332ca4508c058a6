"""The Experiment: models own their weights, and nothing label-dependent reaches surgery or
data-driven merging."""

import numpy as np
import pytest
import torch

from tests.trainer.pool_kit import permute_test_labels
from trainer.config import load_config
from trainer.data.unlabeled import unlabeled_pool
from trainer.errors import UserError
from trainer.pipeline import prepare


def _prepare(config_path, data, cache, *overrides):
    config = load_config(str(config_path), list(overrides))
    return prepare(config, data_root=data, cache=cache, device=torch.device("cpu"))


def test_surgery_and_adamerging_never_read_labels(tiny_config, text_tasks, tmp_path):
    """Surgery learns from the test inputs: with the test LABELS permuted (same inputs), the
    trained adapters and AdaMerging's merge must be bit-identical. A leak of labels into
    either would break the equality (checked by injecting one)."""
    permuted = permute_test_labels(text_tasks, tmp_path / "permuted", seed=5)
    runs = []
    for data in (text_tasks, permuted):
        exp = _prepare(
            tiny_config,
            data,
            tmp_path / "cache",
            "merge.methods=['adamerging']",
            "surgery.methods=[]",
            "merge.adamerging.iterations=3",
        )
        for pool, task in zip(exp.unlabeled, exp.tasks):  # what surgery is handed: inputs only
            assert pool == list(task.test.inputs) and all(isinstance(x, str) for x in pool)
        merged, _ = exp.merged("adamerging")
        model = exp.model(merged, "surgeryv2")
        exp.surgery(model, iterations=4)
        labels = [t.test.labels for t in exp.tasks]
        runs.append((labels, merged, [p.detach().clone() for p in model.adapter_parameters()]))
    (labels_a, merged_a, adapters_a), (labels_b, merged_b, adapters_b) = runs
    assert all((a != b).any() for a, b in zip(labels_a, labels_b))  # labels really differ
    for key in merged_a:
        assert torch.equal(merged_a[key], merged_b[key]), key
    for a, b in zip(adapters_a, adapters_b, strict=True):
        assert torch.equal(a, b)


def test_unlabeled_inputs_hand_over_no_labels(tiny_config, text_tasks, tmp_path):
    exp = _prepare(tiny_config, text_tasks, tmp_path / "cache")
    pools = unlabeled_pool(exp.config, exp.tasks, text_tasks).pools
    assert [len(p) for p in pools] == [len(t.test) for t in exp.tasks]
    assert all(isinstance(x, str) for pool in pools for x in pool)


def test_every_model_owns_its_weights(tiny_config, text_tasks, tmp_path):
    """No call order can change a model already built: each holds its own backbone copy."""
    exp = _prepare(tiny_config, text_tasks, tmp_path / "cache")
    base_before = {k: v.clone() for k, v in exp.base_state.items()}
    ta, _ = exp.merged("task_arithmetic")
    first = exp.model(ta, "surgeryv2")
    snapshot = {k: v.clone() for k, v in first.state_dict().items()}
    wa, _ = exp.merged("weight_averaging")
    second = exp.model(wa, "none")
    exp.surgery(exp.model(wa, "surgeryv2"), iterations=2)
    exp.multitask_model()
    exp.expert_targets([list(t.test.inputs)[:4] for t in exp.tasks], "check")
    assert first.backbone is not second.backbone and first.heads is not second.heads
    for key, value in first.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    for key, value in exp.base_state.items():
        assert torch.equal(value, base_before[key]), key
    assert any(not torch.equal(v, wa[k]) for k, v in ta.items())


def test_branch_block_beyond_the_backbone_is_refused(tiny_config, text_tasks, tmp_path):
    with pytest.raises(UserError, match="surgery.branch_block 3 exceeds the backbone's 2 blocks"):
        _prepare(tiny_config, text_tasks, tmp_path / "cache", "surgery.branch_block=3")
    exp = _prepare(tiny_config, text_tasks, tmp_path / "cache", "surgery.branch_block=1")
    ta, _ = exp.merged("task_arithmetic")
    model = exp.model(ta, "surgeryv2")
    assert model.branch_block == 1 and model.block_adapters.down.shape[0] == 1


def test_evaluation_on_test_and_validation_rows(tiny_config, text_tasks, tmp_path):
    """One Evaluation per (model, split): per-row correctness behind every accuracy, the
    validation split scored like the searches score it, and row subsets taken row for row."""
    exp = _prepare(tiny_config, text_tasks, tmp_path / "cache")
    ta, _ = exp.merged("task_arithmetic")
    model = exp.model(ta)
    test = exp.evaluate(model, "ta")
    for name, task in zip(exp.names, exp.tasks):
        assert test.correct[name].dtype == bool and len(test.correct[name]) == len(task.test)
        assert test.acc[name] == pytest.approx(test.correct[name].mean())
    assert len(test.bias) == 3  # 2 blocks + final
    val = exp.evaluate(model, "ta", split="validation")
    assert [len(val.correct[n]) for n in exp.names] == exp.validation.rows()
    _, per_task = exp.scorer()(ta)  # what λ and k are chosen by
    assert [val.acc[n] for n in exp.names] == pytest.approx(per_task)
    experts = exp.individual_accuracy(split="validation")
    for t, name in enumerate(exp.names):
        expected = exp.scorer().predictions(exp.experts[t].state, [t])[0].numpy()
        assert np.array_equal(experts.predictions[name], expected)
    assert experts.bias == [] and val.agreement(experts)["animals"] <= 1.0
    rows = [np.arange(3), np.arange(5)]
    part = exp.evaluate(model, "ta", rows=rows)
    for name, r in zip(exp.names, rows):
        assert np.array_equal(part.correct[name], test.correct[name][r])
    assert exp.individual_accuracy(rows).acc["animals"] == pytest.approx(
        exp.individual_accuracy().correct["animals"][:3].mean()
    )
