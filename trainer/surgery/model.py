"""The ONE multi-task forward pass: merged backbone, per-task adapters, per-task heads.

Training (surgery), evaluation and ONNX export all call ``MultiTaskModel.forward``, so what is
exported and served is exactly what was measured. Every row of a batch carries its own task id;
one batch may mix tasks.

Representation surgery (SurgeryV2, arXiv 2410.14389): after block l the hidden state of a row
of task t becomes
    Ẑ = Z − W_up[l, t] · ReLU(W_down[l, t] · Z)          (no bias, on every token)
and feeds block l + 1; one more adapter acts on the final pooled representation. ``surgery``
keeps only that final one, ``surgeryv2`` has both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from .adapters import Adapters

SURGERY_MODES = ("none", "surgery", "surgeryv2")
PAD_LOGIT = -1e4  # value of a task's padding logit columns (fits fp16)


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
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (final representation [B, F], each block's token-mean [B, D] after its adapter,
        or [] unless ``block_means``): the L + 1 vectors surgery aligns with the experts'."""
        adapters = self.block_adapters or self.final_adapter
        unit_mask = adapters.unit_mask(task_ids) if adapters is not None else None
        after_block = None
        if self.block_adapters is not None:

            def after_block(index: int, hidden: torch.Tensor) -> torch.Tensor:
                return self.block_adapters(index, hidden, unit_mask)

        final, means = self.backbone.run(batch, after_block, block_means)
        if self.final_adapter is not None:
            final = self.final_adapter(0, final, unit_mask)
        return final, means

    def forward(self, batch: dict[str, torch.Tensor], task_ids: torch.Tensor) -> torch.Tensor:
        """-> logits [B, C_max]; task t's classes first, padding columns at PAD_LOGIT."""
        return self.heads(self.representations(batch, task_ids)[0], task_ids)
