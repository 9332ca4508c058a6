"""The surgery adapter ``z − W_up·ReLU(W_down·z)`` of every task, as stacked tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_FORMS = ("masked", "gather")


class Adapters(nn.Module):
    """Low-rank adapters of all tasks at ``positions`` places, as stacked tensors.

    ``down`` [P, T, r, D] and ``up`` [P, T, D, r]. Two ways for a row to reach its task's
    adapter, the same maths (tested equal):

    - ``masked`` (default): a task mask over the concatenated T·r hidden units; one dense
      [D, T·r] matmul for every row, masked units give exactly zero output and zero gradient.
      Its cost grows with T (2·D·T·r multiply-adds per token).
    - ``gather``: each row gathers its own task's W_down [r, D] and W_up [D, r] and runs a
      batched matmul: 2·D·r per token whatever T is (the multi-adapter servers' approach).

    ``form`` is a plain attribute, so an exporter may pick the faster one for its runtime.
    """

    def __init__(
        self,
        positions: int,
        num_tasks: int,
        rank: int,
        dim: int,
        seed: int = 0,
        form: str = "masked",
    ):
        super().__init__()
        if form not in ADAPTER_FORMS:
            raise ValueError(f"unknown adapter form '{form}'; valid: {', '.join(ADAPTER_FORMS)}")
        self.num_tasks, self.rank, self.form = num_tasks, rank, form
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(dim)  # kaiming_uniform_(a=√5), as nn.Linear
        down = (torch.rand(positions, num_tasks, rank, dim, generator=generator) * 2 - 1) * bound
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(positions, num_tasks, dim, rank))  # step 0 = identity

    def route(self, task_ids: torch.Tensor) -> torch.Tensor:
        """[B] task ids -> what ``forward`` needs to pick each row's adapter: the [B, T·r]
        unit mask (``masked``) or the task ids themselves (``gather``). Computed once per
        batch and shared by every position."""
        if self.form == "gather":
            return task_ids
        onehot = F.one_hot(task_ids, self.num_tasks).to(self.down.dtype)
        return onehot.repeat_interleave(self.rank, dim=1)

    def forward(self, position: int, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """x [B, D] or [B, N, D] -> x − W_up·ReLU(W_down·x) with each row's task's adapter."""
        if self.form == "gather":
            # transpose the [T, ...] stacks before the gather, not the gathered [B, ...]
            # copies: in the exported graph the transpose of a constant folds away, so each
            # row's weights arrive in matmul layout with no per-batch transpose
            down = self.down[position].transpose(1, 2)[route]  # [B, D, r]
            up = self.up[position].transpose(1, 2)[route]  # [B, r, D]
            tokens = x if x.dim() == 3 else x.unsqueeze(1)  # [B, N, D]
            hidden = F.relu(torch.bmm(tokens, down))  # [B, N, r]
            out = tokens - torch.bmm(hidden, up)
            return out if x.dim() == 3 else out.squeeze(1)
        num_tasks, rank, dim = self.down.shape[1:]
        down = self.down[position].reshape(num_tasks * rank, dim)  # [T·r, D]
        up = self.up[position].transpose(1, 2).reshape(num_tasks * rank, dim)  # [T·r, D]
        mask = route if x.dim() == 2 else route.unsqueeze(1)
        hidden = F.relu(x @ down.t()) * mask
        return x - hidden @ up
