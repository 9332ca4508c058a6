"""The block-wise forward equals each library's own forward pass."""

import numpy as np
import pytest
import torch

from trainer.backbones import HFTextBackbone, OpenClipViTBackbone, backbone_from_spec
from trainer.backbones.hf_text import minilm_dir, resolve_model_dir
from trainer.errors import UserError

TEXTS = [
    "a short one",
    "a noticeably longer sentence about the markets and the weather today",
    "mid length text here",
]


def _hf_reference(model_dir, batch, pooling="mean"):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    hidden = model(**batch).last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@torch.no_grad()
def test_minilm_blockwise_equals_automodel_with_mean_pooling():
    backbone = HFTextBackbone(resolve_model_dir("minilm"), max_length=64)
    batch = backbone.collate(TEXTS)
    assert batch["attention_mask"].min() == 0  # padding is exercised
    ours = backbone(batch)
    ref = _hf_reference(minilm_dir(), batch)
    assert ours.shape == (3, 384)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert backbone.num_blocks == 6 and backbone.width == 384


@torch.no_grad()
def test_tiny_bert_cls_pooling(tiny_bert_dir):
    backbone = HFTextBackbone(tiny_bert_dir, max_length=16, pooling="cls")
    batch = backbone.collate(TEXTS)
    torch.testing.assert_close(
        backbone(batch), _hf_reference(tiny_bert_dir, batch, "cls"), atol=1e-5, rtol=0
    )


@torch.no_grad()
def test_small_open_clip_vit_equals_visual_forward():
    cfg = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32}
    backbone = OpenClipViTBackbone(vision_cfg=cfg, embed_dim=48, init_seed=1)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    batch = backbone.collate(images)
    torch.testing.assert_close(
        backbone(batch), backbone.visual(batch["pixel_values"]), atol=1e-5, rtol=0
    )
    assert backbone.num_blocks == 3 and backbone.feature_dim == 48
    # rebuilt from its spec + the same weights: the same function
    clone = backbone_from_spec(backbone.spec(), None)
    clone.load_state_dict(backbone.state_dict())
    torch.testing.assert_close(clone(batch), backbone(batch))


@torch.no_grad()
def test_named_open_clip_model_equals_visual_forward():
    backbone = OpenClipViTBackbone(model="ViT-B-32", init_seed=0)
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    batch = backbone.collate(images)
    torch.testing.assert_close(
        backbone(batch), backbone.visual(batch["pixel_values"]), atol=1e-5, rtol=0
    )
    assert (backbone.num_blocks, backbone.width, backbone.feature_dim) == (12, 768, 512)


def test_open_clip_preprocessing_matches_open_clip_transform():
    import open_clip
    from PIL import Image

    backbone = OpenClipViTBackbone(
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
        embed_dim=16,
    )
    transform = open_clip.image_transform(32, is_train=False)
    image = np.random.default_rng(2).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    ours = backbone.collate([image])["pixel_values"][0]
    ref = transform(Image.fromarray(image))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_missing_model_dir_and_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not found"):
        OpenClipViTBackbone(
            vision_cfg={
                "image_size": 32,
                "patch_size": 8,
                "width": 64,
                "layers": 1,
                "head_width": 32,
            },
            embed_dim=16,
            weights=str(tmp_path / "missing.safetensors"),
        )
    with pytest.raises(UserError, match="unknown open_clip model"):
        OpenClipViTBackbone(model="ViT-Nope")
