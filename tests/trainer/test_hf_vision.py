"""transformers vision backbones (CLIP, ViT, DINOv2): the block-wise forward equals the library's
own, collate equals the image processor, and bundle -> ONNX -> runtime keeps both."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import (
    AutoImageProcessor,
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from runtime.preprocess import ImagePreprocessor
from trainer.backbones import (
    HFVisionBackbone,
    HFVisionSettings,
    backbone_from_spec,
    build_backbone,
)
from trainer.backbones.hf_vision import resolve_model_source
from trainer.config import load_config
from trainer.errors import UserError

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
DINOV2_DIR = Path(__file__).resolve().parents[3] / "shared" / "models" / "dinov2-small-imgfocus"


def _seeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every weight (LayerNorms, LayerScale, biases too): a test that passes with the
    library's init constants could hide a skipped op."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def _tiny_clip_config() -> CLIPConfig:
    return CLIPConfig(
        text_config={
            **TINY,
            "intermediate_size": 64,
            "vocab_size": 99,
            "max_position_embeddings": 16,
        },
        vision_config={**TINY, "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny seeded models written by transformers itself, each with its image processor."""
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hf-vision")
    clip_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    dirs = {}
    dirs["clip"] = root / "clip"  # a full CLIPModel folder: vision tower + visual_projection
    _seeded(CLIPModel(_tiny_clip_config()), 0).save_pretrained(dirs["clip"])
    clip_processor.save_pretrained(dirs["clip"])
    vision = CLIPVisionConfig(**TINY, intermediate_size=64, image_size=32, patch_size=8)
    dirs["clip_vision"] = root / "clip_vision"
    _seeded(CLIPVisionModel(vision), 1).save_pretrained(dirs["clip_vision"])
    clip_processor.save_pretrained(dirs["clip_vision"])
    vision_proj = CLIPVisionConfig(
        **TINY, intermediate_size=64, image_size=32, patch_size=8, projection_dim=24
    )
    dirs["clip_vision_proj"] = root / "clip_vision_proj"
    _seeded(CLIPVisionModelWithProjection(vision_proj), 2).save_pretrained(dirs["clip_vision_proj"])
    clip_processor.save_pretrained(dirs["clip_vision_proj"])
    dirs["vit"] = root / "vit"
    vit = ViTConfig(**TINY, intermediate_size=64, image_size=32, patch_size=8)
    _seeded(ViTModel(vit, add_pooling_layer=False), 3).save_pretrained(dirs["vit"])
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dirs["vit"])
    # DINOv2 as published: a larger position grid than the crop, fp16 weights on disk
    dirs["dinov2"] = root / "dinov2"
    dino = Dinov2Config(**TINY, mlp_ratio=2, image_size=64, patch_size=8, layerscale_value=0.5)
    _seeded(Dinov2Model(dino), 4).half().save_pretrained(dirs["dinov2"])
    BitImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(dirs["dinov2"])
    return dirs


def _reference(name: str, directory: Path, pixels: torch.Tensor, interpolate: bool):
    """The library's own image representation for ``pixels``."""
    if name == "clip":
        model = CLIPModel.from_pretrained(directory).eval()
        out = model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=interpolate)
        return out.pooler_output if hasattr(out, "pooler_output") else out
    if name == "clip_vision":
        model = CLIPVisionModel.from_pretrained(directory).eval()
        return model(pixel_values=pixels, interpolate_pos_encoding=interpolate).pooler_output
    if name == "clip_vision_proj":
        model = CLIPVisionModelWithProjection.from_pretrained(directory).eval()
        return model(pixel_values=pixels, interpolate_pos_encoding=interpolate).image_embeds
    if name == "vit":
        model = ViTModel.from_pretrained(directory, add_pooling_layer=False).eval()
        out = model(pixel_values=pixels, interpolate_pos_encoding=interpolate)
        return out.last_hidden_state[:, 0]
    model = Dinov2Model.from_pretrained(directory, dtype=torch.float32).eval()
    return model(pixel_values=pixels).pooler_output


def _images(seed: int, sizes=((40, 30), (30, 41), (33, 33), (32, 32))) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


FAMILY = {
    "clip": ("clip", True, 16),
    "clip_vision": ("clip", False, 32),
    "clip_vision_proj": ("clip", True, 24),
    "vit": ("vit", False, 32),
    "dinov2": ("dinov2", False, 32),
}


@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.parametrize("image_size", [0, 48])
@torch.no_grad()
def test_blockwise_equals_library_forward(hf_dirs, name, image_size):
    """At the processor's resolution and at another one (interpolated position embeddings)."""
    backbone = HFVisionBackbone(hf_dirs[name], image_size=image_size)
    family, projected, feature_dim = FAMILY[name]
    assert (backbone.family, backbone.visual_projection is not None) == (family, projected)
    assert (backbone.num_blocks, backbone.width, backbone.feature_dim) == (2, 32, feature_dim)
    assert backbone.normalize_head == (family == "clip")
    assert backbone.image_size == ((image_size, image_size) if image_size else (32, 32))
    batch = backbone.collate(_images(0))
    ours, means = backbone.run(batch, block_means=True)
    ref = _reference(name, hf_dirs[name], batch["pixel_values"], interpolate=bool(image_size))
    assert ours.shape == (4, feature_dim) and len(means) == 2
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_fp16_weights_load_as_fp32(hf_dirs):
    from safetensors.torch import load_file

    stored = load_file(str(hf_dirs["dinov2"] / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    backbone = HFVisionBackbone(hf_dirs["dinov2"])
    state = backbone.state_dict()
    assert {t.dtype for t in state.values()} == {torch.float32}
    cls = state["vision_model.embeddings.cls_token"]
    torch.testing.assert_close(cls, stored["embeddings.cls_token"].float(), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["clip", "vit", "dinov2"])
@pytest.mark.parametrize("image_size", [0, 48])
def test_collate_and_runtime_match_the_image_processor(hf_dirs, name, image_size):
    """collate == transformers' image processor (PIL backend) == the torch-free runtime's
    preprocessing of the bundle manifest, on odd sizes and a greyscale image."""
    backbone = HFVisionBackbone(hf_dirs[name], image_size=image_size)
    overrides = {}
    if image_size:  # the processor at the new resolution: crop = 48, resize scaled alike
        p = backbone.processor
        key = {"shortest_edge": p["resize_size"]} if p["resize"] == "shortest_edge" else None
        overrides["size"] = key or {"height": 48, "width": 48}
        overrides["crop_size"] = {"height": 48, "width": 48}
    processor = AutoImageProcessor.from_pretrained(hf_dirs[name], backend="pil", **overrides)
    images = _images(1, ((40, 30), (30, 41), (33, 33), (7, 100), (32, 32)))
    images.append(np.random.default_rng(2).integers(0, 256, (45, 38), dtype=np.uint8))
    ours = backbone.collate(images)["pixel_values"].numpy()
    # greyscale becomes RGB first (ViT's processor would refuse it; the runtime converts too)
    rgb = [Image.fromarray(i).convert("RGB") for i in images]
    ref = np.stack(processor(rgb)["pixel_values"])
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    runtime = ImagePreprocessor(backbone.preprocessing())
    for img, row in zip(images, ours, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG")
        np.testing.assert_allclose(runtime.image(buffer.getvalue()), row, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["clip", "clip_vision", "dinov2"])
@torch.no_grad()
def test_rebuilt_from_spec_and_assets(hf_dirs, name, tmp_path):
    backbone = HFVisionBackbone(hf_dirs[name], image_size=40)
    assets = backbone.save_assets(tmp_path)
    assert assets == ["config.json", "preprocessor_config.json"]
    json.loads((tmp_path / "preprocessor_config.json").read_text())
    clone = backbone_from_spec(backbone.spec(), tmp_path)
    clone.load_state_dict(backbone.state_dict())
    assert clone.spec() == backbone.spec() and clone.preprocessing() == backbone.preprocessing()
    images = _images(3)
    torch.testing.assert_close(clone.collate(images), backbone.collate(images), atol=0, rtol=0)
    batch = backbone.collate(images)
    torch.testing.assert_close(clone(batch), backbone(batch), atol=1e-6, rtol=0)


def test_bundle_export_runtime_round_trip(hf_dirs, tmp_path):
    """A merged-and-surgered model on a DINOv2 backbone at a non-native resolution: the ONNX
    graph passes the exporter's parity bar, and the runtime (its own preprocessing, no torch)
    gives the PyTorch model's logits for encoded images."""
    from export.onnx import export
    from runtime.engine import Engine
    from runtime.manifest import load_model_dir
    from runtime.preprocess import make_preprocessor
    from trainer.results.bundle import load_bundle, write_bundle
    from trainer.surgery.model import Heads, MultiTaskModel

    torch.manual_seed(0)
    backbone = HFVisionBackbone(hf_dirs["dinov2"], image_size=40)
    sizes = [3, 5]
    heads = Heads(
        [torch.randn(n, backbone.feature_dim) for n in sizes], [torch.randn(n) for n in sizes]
    )
    model = MultiTaskModel(backbone, heads, ["a", "b"], mode="surgeryv2", rank=4).eval()
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    classes = [[f"c{i}" for i in range(n)] for n in sizes]
    write_bundle(tmp_path / "bundle", model, classes, {"suite": "tiny-dinov2"})
    reloaded, _ = load_bundle(tmp_path / "bundle")
    manifest, _ = export(tmp_path / "bundle", tmp_path / "onnx")
    assert manifest["parity"]["max_abs_logit_diff"] <= 1e-4
    assert manifest["preprocessing"]["resize_size"] == 45  # 36 * 40 / 32
    spec = load_model_dir(tmp_path / "onnx")
    engine = Engine(spec, make_preprocessor(spec), providers="cpu")
    images = _images(4, ((50, 37), (40, 40), (29, 61)))
    rows = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG")
        rows.append(engine.pre.image(buffer.getvalue()))
    task_ids = [0, 1, 1]
    got = engine.run(rows, task_ids)
    with torch.no_grad():
        want = reloaded(backbone.collate(images), torch.tensor(task_ids)).numpy()
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w[: sizes[task_ids[t]]], atol=1e-4, rtol=0)


def test_config_builds_hf_vision(hf_dirs, tmp_path):
    toml = tmp_path / "suite.toml"
    toml.write_text(
        f'[backbone]\nkind = "hf_vision"\npath = "{hf_dirs["vit"]}"\nimage_size = 48\n'
        '[[tasks]]\nname = "t"\npath = "x.npz"\n'
    )
    config = load_config(str(toml))
    backbone = build_backbone(config.backbone)
    assert isinstance(backbone, HFVisionBackbone) and backbone.image_size == (48, 48)
    with pytest.raises(UserError, match="image_size"):
        load_config(str(toml), ["backbone.image_size=-1"])


def test_bad_sources_are_one_line_errors(hf_dirs, tmp_path, tiny_bert_dir):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing" / "deep" / "dir"))
    with pytest.raises(UserError, match="model_type 'bert'"):
        build_backbone(HFVisionSettings(path=str(tiny_bert_dir)))


def test_hub_id_offline(hf_dirs, tmp_path, monkeypatch):
    """Offline, a hub id is read from the local cache; one missing from it is a one-line error
    (nothing is downloaded here)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="cached on this machine.*HF_HUB_OFFLINE=1"):
        HFVisionBackbone("nobody-here/no-such-model")
    # a cache entry as huggingface_hub lays it out: refs/main -> snapshots/<commit>/
    repo = tmp_path / "models--someone--tiny-vit"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in hf_dirs["vit"].iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    assert resolve_model_source("someone/tiny-vit") == snapshot
    assert HFVisionBackbone("someone/tiny-vit").family == "vit"


@pytest.mark.skipif(not DINOV2_DIR.is_dir(), reason=f"no {DINOV2_DIR}")
@torch.no_grad()
def test_real_dinov2_small_folder():
    """The shipped ViT-S/14 folder (fp16 on disk) at 56 px: 16 patches, fp32, the library's
    pooler_output."""
    backbone = HFVisionBackbone(DINOV2_DIR, image_size=56)
    assert (backbone.num_blocks, backbone.width, backbone.image_size) == (12, 384, (56, 56))
    assert backbone.processor["resize_size"] == 64  # 256 * 56 / 224
    assert next(backbone.parameters()).dtype == torch.float32
    batch = backbone.collate(_images(5, ((32, 32), (32, 32))))
    ref = Dinov2Model.from_pretrained(DINOV2_DIR, dtype=torch.float32).eval()
    torch.testing.assert_close(
        backbone(batch), ref(pixel_values=batch["pixel_values"]).pooler_output, atol=1e-5, rtol=0
    )
