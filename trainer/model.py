"""The ONE multi-task forward pass: merged backbone, per-task adapters, per-task heads.

Training (surgery), evaluation and ONNX export all call ``MultiTaskModel.forward``, so what is
exported and served is exactly what was measured. Every row of a batch carries its own task id;
one batch may mix tasks.

Representation surgery (PAPER.md): after block l the hidden state of a row of task t becomes
    Ẑ = Z − W_up[l, t] · ReLU(W_down[l, t] · Z)          (no bias, on every token)
and feeds block l + 1; one more adapter acts on the final pooled representation. ``surgery``
keeps only that final one, ``surgeryv2`` has both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone

SURGERY_MODES = ("none", "surgery", "surgeryv2")
PAD_LOGIT = -1e4  # value of a task's padding logit columns (fits fp16)


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


class Heads(nn.Module):
    """Per-task linear classifiers stacked to [T, C_max, F]; padding columns get PAD_LOGIT."""

    def __init__(
        self, weights: list[torch.Tensor], biases: list[torch.Tensor], normalize: bool = False
    ):
        super().__init__()
        num_classes = [w.shape[0] for w in weights]
        c_max, dim = max(num_classes), weights[0].shape[1]
        weight = torch.zeros(len(weights), c_max, dim)
        bias = torch.full((len(weights), c_max), PAD_LOGIT)
        for t, (w, b) in enumerate(zip(weights, biases)):
            weight[t, : w.shape[0]] = w
            bias[t, : w.shape[0]] = b
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.num_classes = num_classes
        self.normalize = normalize

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """features [B, F], task_ids [B] -> logits [B, C_max]."""
        if self.normalize:
            features = F.normalize(features, dim=-1)
        weight = self.weight[task_ids]  # [B, C_max, F]: tiny, a gather is cheapest here
        return torch.bmm(weight, features.unsqueeze(-1)).squeeze(-1) + self.bias[task_ids]


class MultiTaskModel(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        heads: Heads,
        task_names: list[str],
        mode: str = "none",
        rank: int = 16,
        seed: int = 0,
    ):
        super().__init__()
        if mode not in SURGERY_MODES:
            raise ValueError(f"unknown surgery mode '{mode}'; valid: {', '.join(SURGERY_MODES)}")
        self.backbone, self.heads = backbone, heads
        self.task_names, self.mode, self.rank = list(task_names), mode, rank
        num_tasks = len(task_names)
        self.block_adapters = None
        self.final_adapter = None
        if mode == "surgeryv2":
            self.block_adapters = Adapters(
                backbone.num_blocks, num_tasks, rank, backbone.width, seed
            )
        if mode in ("surgery", "surgeryv2"):
            self.final_adapter = Adapters(1, num_tasks, rank, backbone.feature_dim, seed + 1)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [
            p
            for a in (self.block_adapters, self.final_adapter)
            if a is not None
            for p in a.parameters()
        ]

    def representations(
        self, batch: dict[str, torch.Tensor], task_ids: torch.Tensor, block_means: bool = False
    ):
        """-> (final representation [B, F], each block's token-mean [B, D] after its adapter,
        or [] unless ``block_means``): the L + 1 vectors surgery aligns with the experts'."""
        backbone = self.backbone
        hidden, ctx = backbone.embed(batch)
        need_mask = self.block_adapters is not None or self.final_adapter is not None
        unit_mask = None
        if need_mask:
            adapters = self.block_adapters or self.final_adapter
            unit_mask = adapters.unit_mask(task_ids)
        means = []
        for index in range(backbone.num_blocks):
            hidden = backbone.block(index, hidden, ctx)
            if self.block_adapters is not None:
                hidden = self.block_adapters(index, hidden, unit_mask)
            if block_means:
                means.append(backbone.token_mean(hidden, ctx))
        final = backbone.pool(hidden, ctx)
        if self.final_adapter is not None:
            final = self.final_adapter(0, final, unit_mask)
        return final, means

    def forward(self, batch: dict[str, torch.Tensor], task_ids: torch.Tensor) -> torch.Tensor:
        """-> logits [B, C_max]; task t's classes first, padding columns at PAD_LOGIT."""
        return self.heads(self.representations(batch, task_ids)[0], task_ids)
