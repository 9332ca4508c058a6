"""The surgery adapter ``z − W_up·ReLU(W_down·z)`` of every task, as stacked tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Adapters(nn.Module):
    """Low-rank adapters of all tasks at ``positions`` places, as stacked tensors.

    ``down`` [P, T, r, D] and ``up`` [P, T, D, r]. Rows pick their task's adapter with a
    task mask over the concatenated T·r hidden units instead of a per-row gather: one dense
    [D, T·r] matmul is what CPUs and ONNX runtimes run fastest, and masked units give exactly
    zero output and zero gradient.
    """

    def __init__(self, positions: int, num_tasks: int, rank: int, dim: int, seed: int = 0):
        super().__init__()
        self.num_tasks, self.rank = num_tasks, rank
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(dim)  # kaiming_uniform_(a=√5), as nn.Linear
        down = (torch.rand(positions, num_tasks, rank, dim, generator=generator) * 2 - 1) * bound
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(positions, num_tasks, dim, rank))  # step 0 = identity

    def unit_mask(self, task_ids: torch.Tensor) -> torch.Tensor:
        """[B] task ids -> [B, T·r] float mask selecting each row's task's hidden units."""
        onehot = F.one_hot(task_ids, self.num_tasks).to(self.down.dtype)
        return onehot.repeat_interleave(self.rank, dim=1)

    def forward(self, position: int, x: torch.Tensor, unit_mask: torch.Tensor) -> torch.Tensor:
        """x [B, D] or [B, N, D] -> x − W_up·ReLU(W_down·x) with each row's task's adapter."""
        num_tasks, rank, dim = self.down.shape[1:]
        down = self.down[position].reshape(num_tasks * rank, dim)  # [T·r, D]
        up = self.up[position].transpose(1, 2).reshape(num_tasks * rank, dim)  # [T·r, D]
        mask = unit_mask if x.dim() == 2 else unit_mask.unsqueeze(1)
        hidden = F.relu(x @ down.t()) * mask
        return x - hidden @ up
