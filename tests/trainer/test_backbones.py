"""The block-wise forward equals each library's own forward pass; the kind registry."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from trainer.backbones import (
    KINDS,
    Backbone,
    BackboneSettings,
    HFTextBackbone,
    OpenClipViTBackbone,
    backbone_from_spec,
    build_backbone,
)
from trainer.backbones import register as register_kind
from trainer.backbones.hf_text import minilm_dir, resolve_model_dir
from trainer.config import load_config
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


# ---- the kind registry --------------------------------------------------------------------


@dataclass
class PatchMLPSettings(BackboneSettings):
    """A whole new kind's [backbone] keys: only its own."""

    width: int = 8
    blocks: int = 2

    def check(self) -> None:
        if self.width < 1:
            raise UserError(f"backbone.width must be >= 1, got {self.width}")


class PatchMLPBackbone(Backbone):
    """4x4-pixel patches, ``blocks`` residual MLPs, mean pooling: a kind in one class."""

    modality = "image"

    def __init__(self, width: int, blocks: int):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Linear(48, width)
        self.mlps = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.num_blocks, self.width, self.feature_dim = blocks, width, width

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.width, settings.blocks)

    @classmethod
    def from_spec(cls, spec, asset_dir):
        return cls(spec["width"], spec["num_blocks"])

    def embed(self, batch):
        x = batch["pixel_values"].unfold(2, 4, 4).unfold(3, 4, 4)  # [B, 3, 2, 2, 4, 4]
        return self.patch(x.permute(0, 2, 3, 1, 4, 5).flatten(1, 2).flatten(2)), {}

    def block(self, index, hidden, ctx):
        return hidden + torch.relu(self.mlps[index](hidden))

    def token_mean(self, hidden, ctx):
        return hidden.mean(1)

    def pool(self, hidden, ctx):
        return hidden.mean(1)

    def collate(self, inputs):
        x = torch.from_numpy(np.stack(inputs)).permute(0, 3, 1, 2).float() / 255.0
        return {"pixel_values": x}

    def spec(self):
        return {"kind": self.kind, "num_blocks": self.num_blocks, "width": self.width}

    def preprocessing(self):
        return {"type": "image", "image_size": [8, 8], "mean": [0.0] * 3, "std": [1.0] * 3}


@pytest.fixture
def patch_mlp_kind():
    """The new kind registered for one test (the registry is process-wide)."""
    register_kind("patch_mlp", PatchMLPSettings, PatchMLPBackbone)
    yield
    del KINDS["patch_mlp"]


def _config(tmp_path, backbone: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(f'[backbone]\n{backbone}\n[[tasks]]\nname = "a"\npath = "x"\n')
    return str(path)


@torch.no_grad()
def test_a_new_kind_is_one_registration(tmp_path, patch_mlp_kind):
    config = load_config(_config(tmp_path, 'kind = "patch_mlp"\nwidth = 6\nblocks = 3'))
    assert isinstance(config.backbone, PatchMLPSettings) and config.backbone.width == 6
    assert config.to_dict()["backbone"] == {
        "kind": "patch_mlp",
        "path": "",
        "width": 6,
        "blocks": 3,
    }
    backbone = build_backbone(config.backbone)
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    batch = backbone.collate(list(images))
    final, means = backbone.run(batch, block_means=True)
    assert final.shape == (5, 6) and len(means) == 3
    clone = backbone_from_spec(backbone.spec(), None)
    clone.load_state_dict(backbone.state_dict())
    torch.testing.assert_close(clone(batch), final)
    # its own keys are checked by it, other kinds' keys are refused naming its valid ones
    with pytest.raises(UserError, match="backbone.width must be >= 1"):
        load_config(_config(tmp_path, 'kind = "patch_mlp"\nwidth = 0'))
    with pytest.raises(UserError) as err:
        load_config(_config(tmp_path, 'kind = "patch_mlp"\npooling = "cls"'))
    assert str(err.value) == (
        "unknown config key 'backbone.pooling'; valid keys of [backbone] with kind patch_mlp: "
        "blocks, kind, path, width"
    )
    # without an expert file format of its own, export_experts says so in one line
    with pytest.raises(UserError, match="kind 'patch_mlp' has no expert file format"):
        backbone.write_expert(tmp_path, None, [])


def test_unknown_kind_is_one_line_listing_the_known_ones(tmp_path):
    with pytest.raises(UserError) as err:
        load_config(_config(tmp_path, 'kind = "resnet"'))
    assert str(err.value) == (
        "backbone.kind 'resnet' is unknown; known kinds: hf_text, hf_vision, open_clip_vit"
    )
    with pytest.raises(UserError, match="known kinds: hf_text, hf_vision, open_clip_vit"):
        backbone_from_spec({"kind": "resnet"}, None)
    with pytest.raises(ValueError, match="registered twice"):
        register_kind("hf_text", PatchMLPSettings, PatchMLPBackbone)


def test_each_kind_reads_only_its_own_keys(tmp_path):
    with pytest.raises(UserError, match="valid keys of \\[backbone\\] with kind open_clip_vit"):
        load_config(
            _config(tmp_path, 'kind = "open_clip_vit"\nmodel = "ViT-B-32"\nmax_length = 16')
        )
    with pytest.raises(UserError, match="needs backbone.model or backbone.vision_cfg"):
        load_config(_config(tmp_path, 'kind = "open_clip_vit"'))
    with pytest.raises(UserError, match="hf_vision needs backbone.path"):
        load_config(_config(tmp_path, 'kind = "hf_vision"'))
    with pytest.raises(UserError, match="backbone.pooling 'avg' is unknown"):
        load_config(_config(tmp_path, 'pooling = "avg"'))
    text = load_config(_config(tmp_path, 'path = "minilm"'))
    assert text.backbone.kind == "hf_text" and text.backbone.pooling == ""  # "" = inferred


# ---- settings the experts' own files fix ------------------------------------------------------


@pytest.fixture(scope="module")
def bert_classifiers(tmp_path_factory):
    """root/base (a tiny bare BERT) and root/animals (a BertForSequenceClassification)."""
    from tests.trainer.experts_kit import write_family

    return write_family(tmp_path_factory.mktemp("family"), "bert", {"animals": ["cat", "dog"]})


def test_pooling_is_inferred_from_a_classifier_expert(bert_classifiers, tmp_path, caplog):
    from trainer.backbones import HFTextSettings
    from trainer.config import TaskConfig
    from trainer.experts.expert import settle_backbone

    tasks = [TaskConfig(name="animals", path="x", expert=str(bert_classifiers / "animals"))]
    unset = HFTextSettings(path=str(bert_classifiers / "base"), max_length=16)
    with caplog.at_level("INFO", logger="deepsurgery"):
        settled = settle_backbone(unset, tasks, tmp_path)
    assert settled.pooling == "cls" and unset.pooling == ""  # the config is not changed
    said = [r.getMessage() for r in caplog.records if "inferred" in r.getMessage()]
    assert said == [
        f"backbone.pooling = 'cls' inferred from the expert {bert_classifiers / 'animals'} "
        "(the config leaves it unset)"
    ]
    assert build_backbone(settled).pooling == "cls"
    # the same value given explicitly agrees; a real conflict is refused in one line
    agreeing = HFTextSettings(path=unset.path, pooling="cls")
    assert settle_backbone(agreeing, tasks, tmp_path) == agreeing
    with pytest.raises(UserError) as err:
        settle_backbone(HFTextSettings(path=unset.path, pooling="mean"), tasks, tmp_path)
    assert "needs backbone.pooling = 'cls'" in str(err.value)
    assert 'set [backbone] pooling = "cls" or leave it out' in str(err.value)
    assert "\n" not in str(err.value)
    # no experts given: nothing to infer, the kind's default (mean) applies when built
    assert settle_backbone(unset, [TaskConfig(name="a", path="x")], tmp_path) == unset
    assert build_backbone(unset).pooling == "mean"
