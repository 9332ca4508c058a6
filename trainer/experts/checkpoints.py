"""Expert weights against the base: the one compatibility check every expert passes before any
work (the formats experts come in are read by ``trainer.experts.formats``)."""

from __future__ import annotations

import torch

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
