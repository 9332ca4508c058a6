"""The content-addressed cache of fine-tuned models (experts, the pre-trained base, the
multitask reference): ``<cache>/<kind>/<name>-<key>.safetensors`` plus a JSON stamp holding
its key and sha256, so a corrupt or foreign entry is detected, logged and rebuilt."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modeldir import sha256_file, write_json_atomic

from ..errors import UserError
from .checkpoints import StateDict, check_compatible

log = logging.getLogger("deepsurgery")
# bump when what a cache entry holds, or how its key is built, changes
CACHE_VERSION = 2


@dataclass
class Trained:
    """A fine-tuned backbone with one head per task it was trained on."""

    state: StateDict
    heads: list[tuple[torch.Tensor, torch.Tensor]]  # (weight [C, F], bias [C]) per task
    source: str  # "cache" | "fine-tuned"


def state_fingerprint(state: StateDict) -> str:
    """Content hash of a state dict (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def cache_key(
    kind: str, backbone_spec: dict, base_state: StateDict, data: list[str], settings: dict
) -> str:
    """THE cache key: everything that determines a fine-tuned model. ``data`` holds the content
    fingerprints of the task files it is trained on, ``settings`` the training settings."""
    parts = [CACHE_VERSION, kind, backbone_spec, state_fingerprint(base_state), data, settings]
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _to_tensors(trained: Trained) -> dict[str, torch.Tensor]:
    tensors = {f"backbone.{k}": v.contiguous() for k, v in trained.state.items()}
    if len(trained.heads) == 1:  # the expert checkpoint format users can also supply
        tensors["head.weight"], tensors["head.bias"] = (t.contiguous() for t in trained.heads[0])
    else:
        for i, (weight, bias) in enumerate(trained.heads):
            tensors[f"head.{i}.weight"], tensors[f"head.{i}.bias"] = weight, bias
    return tensors


def _from_tensors(tensors: dict[str, torch.Tensor], source: str) -> Trained:
    state = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}
    if "head.weight" in tensors:
        heads = [(tensors["head.weight"], tensors["head.bias"])]
    else:
        count = len([k for k in tensors if k.startswith("head.") and k.endswith(".weight")])
        heads = [(tensors[f"head.{i}.weight"], tensors[f"head.{i}.bias"]) for i in range(count)]
    return Trained(state, heads, source)


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"deepsurgery": json.dumps(metadata)})
    tmp.replace(path)


def cached_training(
    kind: str,
    name: str,
    key: str,
    cache_dir: Path,
    base_state: StateDict,
    train: Callable[[], Trained],
) -> Trained:
    """``<cache>/<kind>/<name>-<key>.safetensors`` if present, intact and from this config;
    else ``train()`` (then cached). Corrupt or foreign entries are logged and rebuilt."""
    path = cache_dir / kind / f"{name}-{key}.safetensors"
    stamp = path.with_suffix(".json")
    what = {"experts": "expert", "pretrain": "pre-training"}.get(kind, kind)
    if path.is_file() or stamp.is_file():
        try:
            meta = json.loads(stamp.read_text())
            if meta.get("key") != key:
                log.warning("%s cache %s belongs to another config; rebuilding", what, path)
            elif sha256_file(path) != meta.get("sha256"):
                log.warning("%s cache %s is corrupt (sha256 mismatch); rebuilding", what, path)
            else:
                trained = _from_tensors(load_file(str(path)), "cache")
                check_compatible(base_state, trained.state, f"cached {what} {path}")
                return trained
        except (UserError, OSError, json.JSONDecodeError, KeyError) as exc:
            log.warning("%s cache %s is unreadable (%s); rebuilding", what, path, exc)
    trained = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, _to_tensors(trained), {"key": key, "name": name})
    write_json_atomic(stamp, {"key": key, "name": name, "sha256": sha256_file(path)})
    return trained
