"""Representations of a plain backbone (no adapters): the experts' targets that surgery aligns
to and the bias is measured against, and the merged backbone's frozen final features."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones import Backbone
from ..backbones.base import length_order
from ..progress import progress


@dataclass
class Targets:
    """A backbone's representations of some inputs, row for row."""

    blocks: torch.Tensor  # [N, L, D] token-mean of every block output
    final: torch.Tensor  # [N, F] final representation

    def take(self, rows) -> Targets:
        return Targets(self.blocks[rows], self.final[rows])

    def to(self, device: torch.device) -> Targets:
        return Targets(self.blocks.to(device), self.final.to(device))


@torch.no_grad()
def representations(
    backbone: Backbone, inputs, batch_size: int, device: torch.device, desc: str = "features"
) -> Targets:
    """Per-block token-means and final representation of ``inputs`` (texts batched by length)."""
    backbone.eval()
    order = length_order(inputs)
    blocks = torch.empty(len(order), backbone.num_blocks, backbone.width)
    final = torch.empty(len(order), backbone.feature_dim)
    for start in progress(range(0, len(order), batch_size), desc, "batch"):
        rows = order[start : start + batch_size]
        out, means = backbone.run(backbone.batch([inputs[i] for i in rows], device), None, True)
        blocks[rows] = torch.stack(means, 1).float().cpu()
        final[rows] = out.float().cpu()
    return Targets(blocks, final)


@torch.no_grad()
def final_features(
    backbone: Backbone, pools: list, device: torch.device, names: list[str], batch_size: int = 64
) -> list[torch.Tensor]:
    """The frozen backbone's final representations [N_t, F] of every task's pool.

    Surgery (last layer only) adapts the output of a frozen backbone, a constant: it is
    computed once here instead of in every iteration (same maths, a fraction of the time).
    """
    backbone.eval()
    out = []
    for pool, name in zip(pools, names):
        order = length_order(pool)
        final = torch.empty(len(order), backbone.feature_dim)
        for start in progress(range(0, len(order), batch_size), f"merged features {name}", "batch"):
            rows = order[start : start + batch_size]
            final[rows] = backbone(backbone.batch([pool[i] for i in rows], device)).float().cpu()
        out.append(final)
    return out
