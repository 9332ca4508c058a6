"""Expert checkpoints named in the config: read, and checked against the base before any work."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.tasks import TaskData
from ..errors import UserError

StateDict = dict[str, torch.Tensor]


def check_compatible(base: StateDict, state: StateDict, where: str) -> None:
    """Experts must share the base's parameter names and shapes; name the first mismatch."""
    for key, tensor in base.items():
        if key not in state:
            raise UserError(
                f"{where}: parameter '{key}' of the base is missing; experts must be "
                "fine-tuned from the configured base backbone"
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(
                f"{where}: parameter '{key}' has shape {list(state[key].shape)}, the "
                f"base has {list(tensor.shape)}; experts must share the base's shapes"
            )
    extra = sorted(set(state) - set(base))
    if extra:
        raise UserError(f"{where}: parameter '{extra[0]}' does not exist in the base backbone")


def load_checkpoint(
    path: Path, task: TaskData, base: StateDict
) -> tuple[StateDict, torch.Tensor, torch.Tensor]:
    """The project's expert format: a safetensors file with ``backbone.*`` weights and
    ``head.weight`` [C, F], ``head.bias`` [C]. -> (backbone state, head weight, head bias)."""
    if not path.is_file():
        raise UserError(
            f"task '{task.name}': expert checkpoint {path} not found (expected a "
            "safetensors file with backbone.* weights and head.weight, head.bias)"
        )
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise UserError(
            f"task '{task.name}': cannot read expert checkpoint {path}: {exc}"
        ) from None
    state = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    check_compatible(base, state, f"expert checkpoint {path}")
    if "head.weight" not in tensors or "head.bias" not in tensors:
        raise UserError(f"expert checkpoint {path} has no head.weight / head.bias (the task head)")
    weight, bias = tensors["head.weight"], tensors["head.bias"]
    if weight.shape[0] != task.num_classes:
        raise UserError(
            f"expert checkpoint {path}: head has {weight.shape[0]} classes, task "
            f"'{task.name}' has {task.num_classes}"
        )
    return state, weight.float(), bias.float()
