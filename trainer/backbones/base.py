"""The one block-wise interface merging and surgery see: embed, run block l, pool.

A backbone is an ``nn.Module`` whose forward pass is split into ``num_blocks`` residual blocks,
so a per-block adapter can be inserted after any of them without knowing the architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import UserError


class ExpertWeights(Protocol):
    """What a kind's ``write_expert`` reads of an expert (``trainer.experts.expert.Expert``,
    which imports this package, so it is described here rather than imported)."""

    state: dict[str, torch.Tensor]  # the fine-tuned backbone's state dict
    head: Any  # its TaskHead (weight, bias, optional hidden layer)
    normalize: bool  # the head reads L2-normalised features


# after_block(index, hidden [B, N, width]) -> hidden: what runs between block l and l + 1
AfterBlock = Callable[[int, torch.Tensor], torch.Tensor]


class Backbone(nn.Module):
    kind: str = ""  # the registered kind name (``registry.register`` sets it)
    modality: str  # "text" | "image"
    num_blocks: int
    width: int  # width of the block outputs [B, N, width]
    feature_dim: int  # width of the final representation [B, feature_dim]
    # CLIP-style heads L2-normalise the feature before their linear layer
    normalize_head: bool = False

    def embed(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Input tensors -> (hidden states [B, N, width], context for the blocks, e.g. a mask)."""
        raise NotImplementedError

    def block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Run residual block ``index`` on [B, N, width]."""
        raise NotImplementedError

    def attention_output(self, index: int) -> nn.Module:
        """The module of block ``index`` whose output [B, N, width] is its attention sublayer's
        result before the residual add (the attention's output projection, or what scales it):
        where surgery's attention adapters act, as a forward hook."""
        raise UserError(
            f"backbone kind '{self.kind}' does not expose its attention outputs; "
            "set surgery.attention_adapters = false"
        )

    def token_mean(self, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Mean over the valid tokens of a block output, [B, N, width] -> [B, width].

        This is the per-block representation surgery aligns (the paper: token-mean, CLS included).
        """
        raise NotImplementedError

    def pool(self, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Last block output -> final representation [B, feature_dim] (what heads read)."""
        raise NotImplementedError

    def run(
        self,
        batch: dict[str, torch.Tensor],
        after_block: AfterBlock | None = None,
        block_means: bool = False,
        fan_out: tuple[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """THE block-wise forward pass: embed, every block (each followed by ``after_block``,
        e.g. the surgery adapters), pool. -> (final representation [R, feature_dim], the
        token-mean [R, width] of every block's output when ``block_means``, else []).

        ``fan_out = (k, rows)``: ``batch`` holds N distinct inputs, and output row r is input
        ``rows[r]`` ([R] int64). Embedding and blocks 0..k-1 run once per distinct input; the
        hidden states fan out to the R rows before block k (k = num_blocks: after pooling).
        Without it, row r is input r.
        """
        hidden, ctx = self.embed(batch)
        means: list[torch.Tensor] = []
        for index in range(self.num_blocks):
            if fan_out is not None and index == fan_out[0]:
                rows = fan_out[1]
                hidden, ctx = hidden[rows], self.select_context(ctx, rows)
                means = [m[rows] for m in means]
            hidden = self.block(index, hidden, ctx)
            if after_block is not None:
                hidden = after_block(index, hidden)
            if block_means:
                means.append(self.token_mean(hidden, ctx))
        final = self.pool(hidden, ctx)
        if fan_out is not None and fan_out[0] >= self.num_blocks:
            rows = fan_out[1]
            final, means = final[rows], [m[rows] for m in means]
        return final, means

    def select_context(self, ctx: dict, rows: torch.Tensor) -> dict:
        """The block context of the inputs ``rows`` (every entry is indexed by input on dim 0)."""
        return {k: v[rows] for k, v in ctx.items()}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Input tensors -> final representation [B, feature_dim]."""
        return self.run(batch)[0]

    # ---- data side -------------------------------------------------------------------------
    def collate(self, inputs) -> dict[str, torch.Tensor]:
        """A list of raw inputs (texts, or uint8 images [N, H, W, 3]) -> input tensors."""
        raise NotImplementedError

    def batch(self, inputs, device: torch.device) -> dict[str, torch.Tensor]:
        """Raw inputs -> input tensors on ``device`` (``collate`` + move)."""
        return to_device(self.collate(inputs), device)

    def spec(self) -> dict:
        """JSON description sufficient to rebuild the architecture (weights go separately)."""
        raise NotImplementedError

    def preprocessing(self) -> dict:
        """How raw inputs become tensors, for the bundle/export manifests."""
        raise NotImplementedError

    def save_assets(self, directory) -> list[str]:
        """Write the files needed besides the weights (tokenizer, config); return their names."""
        return []

    # ---- the kind's factory and file formats (see ``registry``) -----------------------------
    @classmethod
    def from_settings(cls, settings) -> Backbone:
        """The pretrained base described by the kind's ``[backbone]`` settings."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict, asset_dir: str | Path | None) -> Backbone:
        """The architecture (random weights) from ``spec()`` and the ``save_assets`` files."""
        raise NotImplementedError

    def write_expert(
        self, folder: Path, expert: ExpertWeights, classes: list[str]
    ) -> dict[str, str]:
        """Write ``expert`` (fine-tuned from this base) into the existing ``folder`` in its
        library's own format -> the [[tasks]] keys pointing at it, relative to ``folder``
        (``expert``, and ``head`` when the expert's files hold none)."""
        raise UserError(
            f"backbone kind '{self.kind}' has no expert file format; "
            "python -m trainer.export_experts cannot write its experts"
        )

    def write_base(self, folder: Path) -> str:
        """Write this base (pre-trained here) into the existing ``folder`` in the format
        ``backbone.path`` reads -> the file or folder name under ``folder`` to point at."""
        raise UserError(
            f"backbone kind '{self.kind}' has no file format for its base; "
            "python -m trainer.export_experts cannot write it"
        )


def find_submodule(block: nn.Module, paths: tuple[str, ...], what: str) -> nn.Module:
    """The first of the dotted ``paths`` that exists under ``block`` (library versions and
    families name the same submodule differently)."""
    for path in paths:
        module = block
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Module):
            return module
    raise UserError(
        f"cannot find the {what} of {type(block).__name__} (looked for {', '.join(paths)}); "
        "this architecture is not supported here"
    )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def length_order(inputs) -> list[int]:
    """Indices sorted by text length (less padding per batch); images keep their order."""
    if len(inputs) and isinstance(inputs[0], str):
        return sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    return list(range(len(inputs)))
