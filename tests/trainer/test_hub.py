"""Base and experts by Hugging Face hub id: read from the local cache offline, a one-line
error when not cached, a plain "does not exist" for a path that is not an id."""

from __future__ import annotations

import shutil

import pytest
from huggingface_hub import constants

from tests.trainer.experts_kit import write_family
from trainer.backbones.hf_text import resolve_model_dir
from trainer.errors import UserError
from trainer.hub import is_hub_id, resolve_source


def _cache_as_hub(cache, repo_id: str, folder) -> None:
    """``folder`` placed in a hub cache the way huggingface_hub stores a download."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


def test_cached_hub_ids_resolve_offline(tmp_path, monkeypatch):
    assert constants.HF_HUB_OFFLINE  # the tests run offline
    experts = write_family(tmp_path / "bert", "bert", {"topic": ["a", "b", "c"]})
    cache = tmp_path / "hub"
    _cache_as_hub(cache, "someone/tiny-bert", experts / "base")
    _cache_as_hub(cache, "someone/tiny-bert-topic", experts / "topic")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    base = resolve_model_dir("someone/tiny-bert")
    assert (base / "config.json").is_file() and "snapshots" in str(base)
    expert = resolve_source("someone/tiny-bert-topic", "task 't': expert")
    assert (expert / "model.safetensors").is_file()


def test_missing_hub_id_and_missing_path(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1 forbids downloading it") as err:
        resolve_source("nobody/no-such-model", "task 't': expert")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1"):
        resolve_model_dir("nobody/no-such-base")
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(str(tmp_path / "no" / "such" / "dir"), "task 't': expert")
    assert is_hub_id("org/name") and is_hub_id("bert-base-uncased")
    assert not any(is_hub_id(p) for p in ("/abs/path", "./rel", "a/b/c", "~/x"))
