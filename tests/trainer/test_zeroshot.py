"""Zero-shot heads from class names equal the CLIP libraries' own zero-shot logits."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

from trainer.backbones import HFVisionBackbone
from trainer.errors import UserError
from trainer.experts.zeroshot import TEMPLATES, templates_for, zeroshot_head
from trainer.surgery.model import Heads

CLASSES = ["cat", "speed limit (30km/h)", "7", "banded"]
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _clip_tokenizer() -> CLIPTokenizer:
    """CLIP's BPE (open_clip ships OpenAI's merges) as a transformers tokenizer, the way the
    released vocab.json / merges.txt were made."""
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges]
    )


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIPModel written by transformers, with CLIP's tokenizer and a learned scale."""
    transformers.logging.set_verbosity_error()
    folder = tmp_path_factory.mktemp("hf-clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={**TINY_TEXT, "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={**TINY_TEXT, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(37.0))
    model.save_pretrained(folder)
    _clip_tokenizer().save_pretrained(folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def open_clip_tiny(tmp_path_factory) -> tuple[str, Path]:
    """A tiny open_clip CLIP registered under its own name, its weights in a local file."""
    folder = tmp_path_factory.mktemp("open-clip")
    name = "deepsurgery-test-tiny-clip"
    (folder / f"{name}.json").write_text(json.dumps(OPEN_CLIP_TINY))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(name)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(25.0))
    torch.save(model.state_dict(), folder / "weights.pt")
    return name, folder / "weights.pt"


def _pixels(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 1, (3, 3, 32, 32))).float()


@torch.no_grad()
def test_hf_clip_head_equals_logits_per_image(hf_clip_dir):
    """One template: our head on our backbone's features == CLIPModel's logits_per_image."""
    template = "a photo of a {c}."
    weight, bias = zeroshot_head(CLASSES, hf_clip_dir, templates=[template])
    assert weight.shape == (4, 16) and torch.equal(bias, torch.zeros(4))
    torch.testing.assert_close(weight.norm(dim=-1), torch.full((4,), 37.0))
    backbone = HFVisionBackbone(hf_clip_dir)
    pixels = _pixels(0)
    heads = Heads([weight], [bias], normalize=backbone.normalize_head)
    ours = heads(backbone({"pixel_values": pixels}), torch.zeros(3, dtype=torch.long))
    model = CLIPModel.from_pretrained(hf_clip_dir).eval()
    tokens = transformers.AutoTokenizer.from_pretrained(hf_clip_dir)(
        [template.replace("{c}", c) for c in CLASSES], padding=True, return_tensors="pt"
    )
    ref = model(**tokens, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_hf_clip_templates_are_averaged_normalised(hf_clip_dir):
    """Several templates: the normalised mean of the normalised prompt embeddings."""
    templates = templates_for("gtsrb")
    weight, _ = zeroshot_head(CLASSES, hf_clip_dir, templates="gtsrb")
    model = CLIPModel.from_pretrained(hf_clip_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_clip_dir)
    rows = []
    for c in CLASSES:
        tokens = tokenizer(
            [t.replace("{c}", c) for t in templates], padding=True, return_tensors="pt"
        )
        out = model.get_text_features(**tokens)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        rows.append(F.normalize(F.normalize(out, dim=-1).mean(0), dim=-1))
    torch.testing.assert_close(weight, 37.0 * torch.stack(rows), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_open_clip_head_equals_the_library(open_clip_tiny):
    name, weights = open_clip_tiny
    model = open_clip.create_model(name, pretrained=str(weights)).eval()
    tokenizer = open_clip.get_tokenizer(name)
    pixels = _pixels(1)
    image = F.normalize(model.encode_image(pixels), dim=-1)
    # one template: logit_scale · normalize(image) @ normalize(text).T from model(image, text)
    weight, bias = zeroshot_head(CLASSES, weights, ["a photo of a {c}."], open_clip_model=name)
    image_f, text_f, scale = model(pixels, tokenizer([f"a photo of a {c}." for c in CLASSES]))
    heads = Heads([weight], [bias], normalize=True)
    ours = heads(model.encode_image(pixels), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(ours, scale * image_f @ text_f.T, atol=1e-4, rtol=1e-5)
    # CLIP's 80 ImageNet templates: open_clip's own zero-shot classifier
    weight, _ = zeroshot_head(CLASSES, weights, open_clip_model=name)
    classifier = build_zero_shot_classifier(
        model, tokenizer, CLASSES, OPENAI_IMAGENET_TEMPLATES, num_classes_per_batch=None
    )
    assert len(TEMPLATES["openai_imagenet"]) == 80
    torch.testing.assert_close(image @ weight.T, 25.0 * image @ classifier, atol=1e-4, rtol=1e-5)


def test_templates_for_task_names():
    assert templates_for("mnist") == ['a photo of the number: "{c}".']
    assert templates_for("dtd10") == templates_for("DTD") and len(templates_for("dtd")) == 8
    assert len(templates_for("cifar10")) == 18 and len(templates_for("resisc45")) == 18
    assert templates_for("my-own-task") == TEMPLATES["openai_imagenet"]
    assert all("{c}" in t for ts in TEMPLATES.values() for t in ts)


def test_bad_inputs_are_one_line_errors(hf_clip_dir, open_clip_tiny, tmp_path):
    name, _ = open_clip_tiny
    with pytest.raises(UserError, match="class names"):
        zeroshot_head([], hf_clip_dir)
    with pytest.raises(UserError, match=r"\{c\}"):
        zeroshot_head(CLASSES, hf_clip_dir, templates=["a photo"])
    with pytest.raises(UserError, match="not found"):
        zeroshot_head(CLASSES, tmp_path / "missing.pt", open_clip_model=name)
    vit = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(
        vit
    )
    with pytest.raises(UserError, match="not a CLIPModel folder"):
        zeroshot_head(CLASSES, vit)
