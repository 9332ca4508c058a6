"""The one block-wise interface merging and surgery see: embed, run block l, pool.

A backbone is an ``nn.Module`` whose forward pass is split into ``num_blocks`` residual blocks,
so a per-block adapter can be inserted after any of them without knowing the architecture.
"""

from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    modality: str  # "text" | "image"
    num_blocks: int
    width: int  # width of the block outputs [B, N, width]
    feature_dim: int  # width of the final representation [B, feature_dim]
    # CLIP-style heads L2-normalise the feature before their linear layer (PAPER.md)
    normalize_head: bool = False

    def embed(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Input tensors -> (hidden states [B, N, width], context for the blocks, e.g. a mask)."""
        raise NotImplementedError

    def block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Run residual block ``index`` on [B, N, width]."""
        raise NotImplementedError

    def token_mean(self, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Mean over the valid tokens of a block output, [B, N, width] -> [B, width].

        This is the per-block representation surgery aligns (PAPER.md: token-mean, CLS included).
        """
        raise NotImplementedError

    def pool(self, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Last block output -> final representation [B, feature_dim] (what heads read)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, ctx = self.embed(batch)
        for index in range(self.num_blocks):
            hidden = self.block(index, hidden, ctx)
        return self.pool(hidden, ctx)

    # ---- data side -------------------------------------------------------------------------
    def collate(self, inputs) -> dict[str, torch.Tensor]:
        """A list of raw inputs (texts, or uint8 images [N, H, W, 3]) -> input tensors."""
        raise NotImplementedError

    def spec(self) -> dict:
        """JSON description sufficient to rebuild the architecture (weights go separately)."""
        raise NotImplementedError

    def preprocessing(self) -> dict:
        """How raw inputs become tensors, for the bundle/export manifests."""
        raise NotImplementedError

    def save_assets(self, directory) -> list[str]:
        """Write the files needed besides the weights (tokenizer, config); return their names."""
        return []
