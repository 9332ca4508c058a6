"""This project's own expert file (what its cache holds, and the ``checkpoint`` key reads): one
safetensors file with ``backbone.*`` weights in the base backbone's key layout and
``head.weight`` [C, F], ``head.bias`` [C]; the head follows the backbone's convention
(CLIP-style backbones: it reads the L2-normalised feature)."""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError
from ...surgery.model import TaskHead
from .registry import ExpertSource, LoadedExpert, read_safetensors, register, safetensors_keys

PREFIX = "backbone."


def detect(path: Path) -> bool:
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    keys = safetensors_keys(path, "expert")
    return "head.weight" in keys and any(k.startswith(PREFIX) for k in keys)


@register(
    "deepsurgery",
    detect,
    "a .safetensors file with backbone.* weights and head.weight, head.bias",
)
def load(source: ExpertSource) -> LoadedExpert:
    if not source.path.is_file():
        raise UserError(
            f"task '{source.task}': expert checkpoint {source.path} not found (expected a "
            "safetensors file with backbone.* weights and head.weight, head.bias)"
        )
    tensors, _ = read_safetensors(source.path, f"task '{source.task}': expert checkpoint")
    state = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    if "head.weight" not in tensors or "head.bias" not in tensors:
        raise UserError(
            f"expert checkpoint {source.path} has no head.weight / head.bias (the task head)"
        )
    head = TaskHead(tensors["head.weight"].float(), tensors["head.bias"].float())
    return LoadedExpert(state, head, normalize=source.base.normalize_head)
