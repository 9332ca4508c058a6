"""Backbone factory: a config (or a bundle's spec) -> a block-wise ``Backbone``."""

from __future__ import annotations

from .base import Backbone
from .hf_text import HFTextBackbone, resolve_model_dir
from .hf_vision import HFVisionBackbone
from .open_clip_vit import OpenClipViTBackbone

__all__ = [
    "Backbone",
    "build_backbone",
    "HFTextBackbone",
    "HFVisionBackbone",
    "OpenClipViTBackbone",
]


def build_backbone(cfg) -> Backbone:
    """Build the pretrained base from a ``BackboneConfig``."""
    if cfg.kind == "hf_text":
        return HFTextBackbone(resolve_model_dir(cfg.path), cfg.max_length, cfg.pooling)
    if cfg.kind == "hf_vision":
        return HFVisionBackbone(cfg.path, cfg.image_size)
    return OpenClipViTBackbone(cfg.model, cfg.vision_cfg, cfg.embed_dim, cfg.path, cfg.init_seed)


def backbone_from_spec(spec: dict, asset_dir) -> Backbone:
    """Rebuild a backbone's architecture (random weights) from a bundle's manifest."""
    if spec["kind"] == "hf_text":
        return HFTextBackbone(asset_dir, spec["max_length"], spec["pooling"], pretrained=False)
    if spec["kind"] == "hf_vision":
        return HFVisionBackbone(asset_dir, pretrained=False)
    return OpenClipViTBackbone(spec.get("model", ""), spec["vision_cfg"], spec["embed_dim"])
