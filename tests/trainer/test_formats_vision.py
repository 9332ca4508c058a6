"""Image experts in their own libraries' formats: open_clip visual towers (safetensors and a
whole CLIP's torch file) with a head file or a zero-shot head, and transformers CLIP vision /
ViT / DINOv2 folders; each written by its library, each reproducing the library's logits."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from safetensors.torch import save_file

from tests.trainer import test_zeroshot
from tests.trainer.experts_kit import perturb
from trainer.backbones import HFTextBackbone, HFVisionBackbone, OpenClipViTBackbone
from trainer.errors import UserError
from trainer.experts.formats import ExpertSource, load_expert
from trainer.experts.formats.registry import write_head_file
from trainer.experts.zeroshot import zeroshot_head
from trainer.surgery.model import Heads, MultiTaskModel, TaskHead

CLASSES = ["cat", "speed limit (30km/h)", "7", "banded"]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
# tiny CLIPs written by transformers and open_clip (module-scoped fixtures)
hf_clip_dir = test_zeroshot.hf_clip_dir
open_clip_tiny = test_zeroshot.open_clip_tiny


def _pixels(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 1, (3, 3, 32, 32))).float()


def _head(classes: int, dim: int) -> TaskHead:
    generator = torch.Generator().manual_seed(dim)
    return TaskHead(torch.randn(classes, dim, generator=generator) * 10, torch.randn(classes))


def _logits(base, loaded, pixels) -> torch.Tensor:
    """What the pipeline scores: the base backbone holding the expert, with its head."""
    base.load_state_dict(loaded.state)
    model = MultiTaskModel(base, Heads.stack([loaded.head], loaded.normalize), ["t"]).eval()
    with torch.no_grad():
        return model({"pixel_values": pixels}, torch.zeros(len(pixels), dtype=torch.long))


def _source(path, base, head="", base_path="", task="t", classes=CLASSES):
    return ExpertSource(path, task, list(classes), base, base.state_dict(), str(head), base_path)


@pytest.fixture(scope="module")
def open_clip_expert(open_clip_tiny, tmp_path_factory):
    """A fine-tuned tiny open_clip CLIP: its visual tower as safetensors, and the whole model
    as a torch file (visual.* keys), as the task-vectors code saves image encoders."""
    name, weights = open_clip_tiny
    folder = tmp_path_factory.mktemp("open-clip-expert")
    model = open_clip.create_model(name, pretrained=str(weights)).eval()
    perturb(model.visual, 7, 0.02)
    tower = {k: v.contiguous() for k, v in model.visual.state_dict().items()}
    save_file(tower, str(folder / "visual.safetensors"))
    torch.save({"state_dict": model.state_dict()}, folder / "whole.pt")
    return model, folder


@torch.no_grad()
def test_open_clip_tower_with_a_head_file(open_clip_tiny, open_clip_expert):
    name, weights = open_clip_tiny
    model, folder = open_clip_expert
    head = _head(4, 16)
    write_head_file(folder / "head.safetensors", head, CLASSES)
    pixels = _pixels(0)
    want = F.normalize(model.encode_image(pixels), dim=-1) @ head.weight.T + head.bias
    for file in ("visual.safetensors", "whole.pt"):
        base = OpenClipViTBackbone(model=name, weights=str(weights))
        loaded = load_expert(_source(folder / file, base, folder / "head.safetensors"))
        assert loaded.format == "open_clip" and loaded.normalize and loaded.classes == CLASSES
        torch.testing.assert_close(_logits(base, loaded, pixels), want, atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_open_clip_zero_shot_head_from_the_base_text_tower(open_clip_tiny, open_clip_expert):
    """head = "zeroshot": the base CLIP's text tower and CLIP's 80 ImageNet templates (a task
    without published ones), the expert's image features: open_clip's own zero-shot logits."""
    name, weights = open_clip_tiny
    model, folder = open_clip_expert
    base = OpenClipViTBackbone(model=name, weights=str(weights))
    source = _source(folder / "visual.safetensors", base, "zeroshot", str(weights), "objects")
    loaded = load_expert(source)
    pretrained = open_clip.create_model(name, pretrained=str(weights)).eval()
    classifier = build_zero_shot_classifier(
        pretrained,
        tokenizer=open_clip.get_tokenizer(name),
        classnames=CLASSES,
        templates=OPENAI_IMAGENET_TEMPLATES,
        device="cpu",
        use_tqdm=False,
    )
    pixels = _pixels(1)
    image = F.normalize(model.encode_image(pixels), dim=-1)
    want = pretrained.logit_scale.exp() * image @ classifier
    torch.testing.assert_close(_logits(base, loaded, pixels), want, atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_clip_vision_model_expert_takes_the_base_projection(hf_clip_dir, tmp_path):
    """FusionBench's experts: CLIPVisionModel folders (no projection) on a CLIPModel base,
    with zero-shot heads from the base's text tower."""
    clip = transformers.CLIPModel.from_pretrained(hf_clip_dir).eval()
    vision = transformers.CLIPVisionModel(clip.config.vision_config)
    vision.load_state_dict(clip.vision_model.state_dict())
    perturb(vision, 3, 0.02).save_pretrained(tmp_path / "expert")
    base = HFVisionBackbone(hf_clip_dir)
    source = _source(tmp_path / "expert", base, "zeroshot", str(hf_clip_dir), "gtsrb")
    loaded = load_expert(source)
    assert loaded.format == "hf_vision" and loaded.normalize
    weight, _ = zeroshot_head(CLASSES, hf_clip_dir, "gtsrb")
    torch.testing.assert_close(loaded.head.weight, weight)
    pixels = _pixels(2)
    clip.vision_model.load_state_dict(vision.state_dict())  # the expert's tower
    features = clip.get_image_features(pixel_values=pixels)
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    want = F.normalize(features, dim=-1) @ weight.T
    torch.testing.assert_close(_logits(base, loaded, pixels), want, atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_vit_classifier_and_dinov2_with_a_head_file(tmp_path):
    transformers.logging.set_verbosity_error()
    vit = transformers.ViTConfig(**TINY, intermediate_size=64, image_size=32, patch_size=8)
    vit.id2label = dict(enumerate(CLASSES))
    torch.manual_seed(0)
    classifier = perturb(transformers.ViTForImageClassification(vit), 1, 0.05).eval()
    classifier.vit.save_pretrained(tmp_path / "vit-base")
    perturb(classifier, 2, 0.02).save_pretrained(tmp_path / "vit-expert")
    base = HFVisionBackbone(tmp_path / "vit-base")
    loaded = load_expert(_source(tmp_path / "vit-expert", base))
    assert loaded.classes == CLASSES and not loaded.normalize
    pixels = _pixels(3)
    want = classifier(pixel_values=pixels).logits
    torch.testing.assert_close(_logits(base, loaded, pixels), want, atol=1e-5, rtol=0)

    dino = transformers.Dinov2Config(**TINY, image_size=32, patch_size=8)
    model = perturb(transformers.Dinov2Model(dino), 4, 0.05).eval()
    model.save_pretrained(tmp_path / "dino-base")
    perturb(model, 5, 0.02).save_pretrained(tmp_path / "dino-expert")
    head = _head(4, 32)
    write_head_file(tmp_path / "dino-expert" / "head.safetensors", head)
    base = HFVisionBackbone(tmp_path / "dino-base")
    loaded = load_expert(_source(tmp_path / "dino-expert", base))
    want = model(pixel_values=pixels).pooler_output @ head.weight.T + head.bias
    # logits of ~100: float32 rounding alone reaches ~1e-5 there, so 1e-6 relative on top
    torch.testing.assert_close(_logits(base, loaded, pixels), want, atol=1e-5, rtol=1e-6)

    transformers.Dinov2ForImageClassification(dino).save_pretrained(tmp_path / "dino-classifier")
    with pytest.raises(UserError, match=r"reads \[CLS, mean of the patch tokens\]"):
        load_expert(_source(tmp_path / "dino-classifier", base))


def test_image_experts_on_the_wrong_base_or_without_a_text_tower(
    open_clip_tiny,
    open_clip_expert,
    tiny_bert_dir,
    tmp_path,
):
    name, weights = open_clip_tiny
    _, folder = open_clip_expert
    text = HFTextBackbone(tiny_bert_dir, max_length=16)
    with pytest.raises(UserError, match='needs backbone.kind = "open_clip_vit"'):
        load_expert(_source(folder / "visual.safetensors", text))
    base = OpenClipViTBackbone(model=name, weights=str(weights))
    with pytest.raises(UserError, match="needs the base CLIP's text tower"):
        load_expert(_source(folder / "visual.safetensors", base, "zeroshot"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not weights
    with pytest.raises(UserError, match=r"save model.state_dict\(\) instead"):
        load_expert(_source(tmp_path / "module.pt", base, folder / "head.safetensors"))
