"""Experts: fine-tuning, the content-hash cache, corrupt entries, checkpoint checks."""

import logging

import pytest
import torch

from trainer.backbones import HFTextBackbone
from trainer.config import FinetuneConfig
from trainer.data.tasks import load_task
from trainer.errors import UserError
from trainer.experts.checkpoints import check_compatible
from trainer.experts.expert import get_expert


@pytest.fixture
def setup(tiny_bert_dir, text_tasks):
    base = HFTextBackbone(tiny_bert_dir, max_length=16)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    task = load_task("animals", "{data}/animals", text_tasks)
    return base, state, task


def _get(setup, cache, cfg=None):
    base, state, task = setup
    cfg = cfg or FinetuneConfig(steps=4, batch_size=8, lr=1e-3)
    return get_expert(
        task,
        given=None,
        base=base,
        base_state=state,
        finetune=cfg,
        cache_dir=cache,
        device=torch.device("cpu"),
    )


def test_finetune_changes_weights_and_is_cached(setup, tmp_path):
    expert = _get(setup, tmp_path)
    assert expert.source == "fine-tuned"
    base_state = setup[1]
    changed = [k for k in base_state if not torch.equal(base_state[k], expert.state[k])]
    assert changed  # full fine-tuning moved the backbone
    again = _get(setup, tmp_path)
    assert again.source == "cache"
    for k, v in expert.state.items():
        assert torch.equal(v, again.state[k])
    # a different fine-tuning setting is a different cache entry
    other = _get(setup, tmp_path, FinetuneConfig(steps=5, batch_size=8, lr=1e-3))
    assert other.source == "fine-tuned"


def test_corrupt_cache_entry_is_rebuilt(setup, tmp_path, caplog):
    _get(setup, tmp_path)
    entry = next((tmp_path / "experts").glob("*.safetensors"))
    data = bytearray(entry.read_bytes())
    data[-10:] = b"\x00" * 10
    entry.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="deepsurgery"):
        again = _get(setup, tmp_path)
    assert again.source == "fine-tuned"
    assert "corrupt" in caplog.text


def test_check_compatible_names_the_first_mismatch():
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(UserError, match="'b' of the base is missing"):
        check_compatible(base, {"a": torch.zeros(2)}, "x")
    with pytest.raises(UserError, match=r"'a' has shape \[4\]"):
        check_compatible(base, {"a": torch.zeros(4), "b": torch.zeros(3)}, "x")
    with pytest.raises(UserError, match="'c' does not exist in the base"):
        check_compatible(base, {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}, "x")
