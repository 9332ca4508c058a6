"""transformers vision transformers: CLIP's vision tower, ViT and DINOv2.

``backbone.path`` is a local model folder or a Hugging Face hub id (``trainer.hub``: downloaded
when online; with ``HF_HUB_OFFLINE=1`` only the local cache is read). Accepted:
a full ``CLIPModel`` folder (its vision tower and ``visual_projection``; the text tower is not
loaded), ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``, ``ViTModel`` (or a
``ViTForImageClassification`` folder: its head is ignored) and ``Dinov2Model``. Weights stored
in fp16/bf16 are loaded as fp32.

Blocks are the library's own layers, batch-first [B, 1 + patches, width]:
``vision_model.encoder.layers[l]`` (CLIP), ``vision_model.layers[l]`` (ViT; ``encoder.layer``
in transformers 4) and ``vision_model.encoder.layer[l]`` (DINOv2). ``embed`` is the library's
patch + CLS + position embedding (CLIP: followed by ``pre_layrnorm``).

Pooling is each library's own image representation:
- CLIP: ``post_layernorm`` of the CLS token, then ``visual_projection`` when the checkpoint has
  one (``CLIPModel.get_image_features``, the space CLIP's zero-shot text heads live in); heads
  read it L2-normalised, as CLIP's logits do.
- ViT and DINOv2: the final ``layernorm`` then the CLS token (DINOv2's ``pooler_output``; what
  ``ViTForImageClassification`` classifies; ViTModel's extra dense+tanh pooler is not used);
  plain linear heads.

Preprocessing is the folder's ``preprocessor_config.json`` (transformers' image processor with
its PIL backend: resize by shortest edge or to an exact size, centre crop with floored offsets,
rescale, normalise), or the family's published defaults when the folder has none.
``image_size`` changes the resolution: the crop becomes ``image_size`` and the resize scales by
the same ratio (DINOv2's 256 -> 224 becomes 128 -> 112); position embeddings are then
interpolated (bicubic) to the new patch grid, as the libraries' ``interpolate_pos_encoding`` does.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ..errors import UserError
from ..hub import resolve_source
from .base import Backbone, ExpertWeights, find_submodule
from .registry import BackboneSettings, register

PROCESSOR_FILE = "preprocessor_config.json"
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's numbering
_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# Used when a folder has no preprocessor_config.json: transformers' CLIPImageProcessor and
# ViTImageProcessor defaults, and the processor published with facebook/dinov2-* (256 -> 224).
# ``None`` sizes mean "the model's config.image_size".
_DEFAULT_PROCESSORS = {
    "clip": {
        "size": {"shortest_edge": None},
        "crop_size": None,
        "do_center_crop": True,
        "resample": 3,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
    },
    "vit": {
        "size": {"height": None, "width": None},
        "do_center_crop": False,
        "resample": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
    "dinov2": {
        "size": {"shortest_edge": 256},
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "resample": 3,
        "image_mean": _IMAGENET_MEAN,
        "image_std": _IMAGENET_STD,
    },
}


def resolve_model_source(path: str, what: str = "backbone.path") -> Path:
    """A local model folder, or a hub id fetched (or, offline, read from the local cache)."""
    folder = resolve_source(path, what)
    if not (folder / "config.json").is_file():
        raise UserError(
            f"{what} {folder} has no config.json: expected a transformers model folder "
            "(config.json, model.safetensors, preprocessor_config.json) or a hub id"
        )
    return folder


def _load_tower(
    source: Path, pretrained: bool
) -> tuple[str, nn.Module, nn.Module | None, PretrainedConfig]:
    """-> (family, vision transformer module, visual projection or None, its config).

    A full CLIPModel folder loads as CLIPVisionModelWithProjection (the vision tower and
    ``visual_projection``; the CLIP config's ``projection_dim`` carried over)."""
    config = AutoConfig.from_pretrained(source)
    kwargs: dict = {}
    model_type = config.model_type
    if model_type == "clip":
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        vision.architectures = ["CLIPVisionModelWithProjection"]
        config, cls, family = vision, transformers.CLIPVisionModelWithProjection, "clip"
    elif model_type == "clip_vision_model":
        family = "clip"
        with_projection = "CLIPVisionModelWithProjection" in (config.architectures or [])
        cls = (
            transformers.CLIPVisionModelWithProjection
            if with_projection
            else transformers.CLIPVisionModel
        )
    elif model_type == "vit":
        family, cls, kwargs = "vit", transformers.ViTModel, {"add_pooling_layer": False}
    elif model_type == "dinov2":
        family, cls = "dinov2", transformers.Dinov2Model
    else:
        raise UserError(
            f"backbone.kind hf_vision reads CLIP, ViT and DINOv2 models; {source} holds "
            f"model_type '{model_type}'"
        )
    if pretrained:
        model = cls.from_pretrained(source, config=config, attn_implementation="sdpa", **kwargs)
    else:
        config._attn_implementation = "sdpa"
        model = cls(config, **kwargs)
    model = model.float().eval()  # fp16 / bf16 weights on disk -> fp32
    projection = getattr(model, "visual_projection", None)
    tower = model
    while not hasattr(tower, "embeddings"):  # CLIP: unwrap to the vision transformer itself
        tower = tower.vision_model
    return family, tower, projection, config


# a block's attention output projection, before its residual add (and DINOv2's layer scale):
# ViT and DINOv2 (transformers 5; ``attention.output.dense`` in 4), CLIP
ATTENTION_OUTPUTS = ("attention.o_proj", "attention.output.dense", "self_attn.out_proj")


def _blocks(tower: nn.Module) -> nn.ModuleList:
    """The residual blocks: ``encoder.layers`` (CLIP), ``layers`` (ViT, transformers 5) or
    ``encoder.layer`` (DINOv2; ViT in transformers 4)."""
    for path in ("encoder.layers", "encoder.layer", "layers"):
        module = tower
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise UserError(f"cannot find the transformer blocks of {type(tower).__name__}")


def _square(value: int | dict, what: str) -> dict:
    """A processor size entry (int, or a dict) -> a dict with explicit keys."""
    if isinstance(value, int):
        return {"height": value, "width": value} if what == "exact" else {"shortest_edge": value}
    return dict(value)


def processor_settings(
    source: Path, family: str, config: PretrainedConfig, image_size: int = 0
) -> dict:
    """The folder's image-processor settings (or the family's defaults), resolved to explicit
    values and rescaled to ``image_size`` when given.

    -> {"resize": "shortest_edge" | "exact", "resize_size": int | [h, w], "crop_size": [h, w],
    "resample": name, "image_mean", "image_std", "rescale_factor"}."""
    path = source / PROCESSOR_FILE
    if path.is_file():
        raw = json.loads(path.read_text())
    else:
        raw = json.loads(json.dumps(_DEFAULT_PROCESSORS[family]))
        native = config.image_size
        if raw["size"].get("shortest_edge", 0) is None:
            raw["size"] = {"shortest_edge": native}
        if raw["size"].get("height", 0) is None:
            raw["size"] = {"height": native, "width": native}
        if raw.get("do_center_crop") and raw.get("crop_size") is None:
            raw["crop_size"] = {"height": native, "width": native}
    where = f"{path if path.is_file() else 'the default image processor'}"
    if raw.get("do_resize", True) is False:
        raise UserError(f"{where}: do_resize false gives images of any size; batching needs one")
    if raw.get("do_rescale", True) is False:
        raise UserError(f"{where}: do_rescale false (0-255 inputs) is not supported")
    # transformers: CLIP and BiT (DINOv2) read an int size as the shortest edge, ViT as HxW
    size = _square(raw.get("size", 224), "exact" if family == "vit" else "shortest")
    crop = _square(raw["crop_size"], "exact") if raw.get("do_center_crop") else None
    if "shortest_edge" in size:
        if crop is None:
            raise UserError(f"{where}: a shortest-edge resize without a centre crop varies in size")
        mode, resize = "shortest_edge", int(size["shortest_edge"])
        covered = resize >= max(crop["height"], crop["width"])
    elif "height" in size and "width" in size:
        mode, resize = "exact", [int(size["height"]), int(size["width"])]
        crop = crop or {"height": resize[0], "width": resize[1]}
        covered = resize[0] >= crop["height"] and resize[1] >= crop["width"]
    else:
        raise UserError(f"{where}: size {size} is not supported (shortest_edge or height+width)")
    if not covered:
        raise UserError(f"{where}: crop_size {crop} is larger than the resized image {size}")
    crop_hw = [int(crop["height"]), int(crop["width"])]
    if image_size:
        ratio = image_size / crop_hw[0]
        if mode == "shortest_edge":
            resize = round(resize * ratio)
        else:
            resize = [round(s * ratio) for s in resize]
        crop_hw = [image_size, round(crop_hw[1] * ratio)]
    resample = raw.get("resample", 2)  # transformers' PIL backend defaults to bilinear
    if resample not in _RESAMPLE:
        raise UserError(f"{where}: resample {resample} is not one of {sorted(_RESAMPLE)}")
    mean = raw.get("image_mean", [0.0] * 3) if raw.get("do_normalize", True) else [0.0] * 3
    std = raw.get("image_std", [1.0] * 3) if raw.get("do_normalize", True) else [1.0] * 3
    mean, std = ([v] * 3 if isinstance(v, (int, float)) else list(v) for v in (mean, std))
    factor = float(raw.get("rescale_factor", 1 / 255))
    if abs(factor * 255 - 1) > 1e-6:
        raise UserError(f"{where}: rescale_factor {factor} is not 1/255")
    return {
        "resize": mode,
        "resize_size": resize,
        "crop_size": crop_hw,
        "resample": _RESAMPLE[resample],
        "image_mean": [float(v) for v in mean],
        "image_std": [float(v) for v in std],
        "rescale_factor": factor,
    }


@dataclass
class HFVisionSettings(BackboneSettings):
    """``[backbone] kind = "hf_vision"``: ``path`` is a CLIP / ViT / DINOv2 folder or hub id."""

    # the input resolution, 0 = the model's image processor's own; its resize is scaled by the
    # same ratio
    image_size: int = 0

    def check(self) -> None:
        if not self.path:
            raise UserError(
                "backbone.kind hf_vision needs backbone.path (a CLIP, ViT or DINOv2 folder "
                "or hub id)"
            )
        if self.image_size < 0:
            raise UserError(f"backbone.image_size must be >= 0, got {self.image_size}")


class HFVisionBackbone(Backbone):
    modality = "image"

    def __init__(self, path: str | Path, image_size: int = 0, pretrained: bool = True):
        """``path``: a model folder or hub id; ``image_size``: the input resolution (0: the
        image processor's own). ``pretrained=False`` builds the architecture alone from the
        folder's config.json with random weights (a bundle's assets, weights loaded after)."""
        super().__init__()
        source = resolve_model_source(str(path)) if pretrained else Path(path)
        family, tower, projection, config = _load_tower(source, pretrained)
        self.family, self.hf_config = family, config
        self.vision_model = tower
        self.visual_projection = projection
        self.processor = processor_settings(source, family, config, image_size)
        self.image_size = tuple(self.processor["crop_size"])
        native = config.image_size
        native = tuple(native) if isinstance(native, (list, tuple)) else (native, native)
        # ViT/CLIP refuse other sizes unless asked to interpolate; DINOv2 always does
        self.interpolate = self.image_size != native
        self.normalize_head = family == "clip"
        self.num_blocks = len(_blocks(tower))
        self.width = config.hidden_size
        self.feature_dim = projection.out_features if projection is not None else self.width
        self.mean = torch.tensor(self.processor["image_mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(self.processor["image_std"]).view(1, 3, 1, 1)

    def embed(self, batch):
        pixels = batch["pixel_values"]
        if self.family == "dinov2":
            return self.vision_model.embeddings(pixels), {}
        hidden = self.vision_model.embeddings(pixels, interpolate_pos_encoding=self.interpolate)
        if self.family == "clip":
            hidden = self.vision_model.pre_layrnorm(hidden)
        return hidden, {}

    def block(self, index, hidden, ctx):
        out = _blocks(self.vision_model)[index](hidden, None)
        return out[0] if isinstance(out, tuple) else out

    def attention_output(self, index):
        return find_submodule(
            _blocks(self.vision_model)[index], ATTENTION_OUTPUTS, "attention output"
        )

    def token_mean(self, hidden, ctx):
        return hidden.mean(1)

    def pool(self, hidden, ctx):
        if self.family == "clip":
            pooled = self.vision_model.post_layernorm(hidden[:, 0])
            if self.visual_projection is not None:
                pooled = self.visual_projection(pooled)
            return pooled
        return self.vision_model.layernorm(hidden[:, 0])  # LayerNorm is per token

    # ---- data side -------------------------------------------------------------------------
    def collate(self, inputs):
        """uint8 images [N, H, W, 3] (or [H, W] greyscale, or PIL images) -> pixel_values
        [N, 3, H, W], as the image processor's PIL backend computes them."""
        rows = np.stack([self._resize_crop(img) for img in inputs])  # [N, H, W, 3] uint8
        # rescale in float64 then float32, normalise in float32: transformers' arithmetic
        x = (rows.astype(np.float64) * self.processor["rescale_factor"]).astype(np.float32)
        x = torch.from_numpy(x).permute(0, 3, 1, 2)
        return {"pixel_values": ((x - self.mean) / self.std).contiguous()}

    def _resize_crop(self, img) -> np.ndarray:
        """One image -> uint8 [crop_h, crop_w, 3]: RGB, resize, centre crop (floored offsets)."""
        pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        pil = pil.convert("RGB")
        w, h = pil.size
        if self.processor["resize"] == "shortest_edge":
            size = self.processor["resize_size"]
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = size, int(size * long / short)
            new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
        else:
            new_h, new_w = self.processor["resize_size"]
        if (new_h, new_w) != (h, w):
            pil = pil.resize((new_w, new_h), resample=_PIL_RESAMPLE[self.processor["resample"]])
        th, tw = self.image_size
        top, left = (new_h - th) // 2, (new_w - tw) // 2
        return np.asarray(pil)[top : top + th, left : left + tw]

    def spec(self):
        return {
            "kind": "hf_vision",
            "family": self.family,
            "model_type": self.hf_config.model_type,
            "projection": self.visual_projection is not None,
            "image_size": list(self.image_size),
            "num_blocks": self.num_blocks,
            "width": self.width,
        }

    def preprocessing(self):
        p = self.processor
        return {
            "type": "image",
            "image_size": list(self.image_size),
            "mean": p["image_mean"],
            "std": p["image_std"],
            "interpolation": p["resample"],
            "resize": (
                "shortest_edge_then_center_crop"
                if p["resize"] == "shortest_edge"
                else "exact_then_center_crop"
            ),
            "resize_size": p["resize_size"],
            "crop_offset": "floor",
        }

    @classmethod
    def from_settings(cls, settings: HFVisionSettings) -> HFVisionBackbone:
        return cls(settings.path, settings.image_size)

    @classmethod
    def from_spec(cls, spec: dict, asset_dir) -> HFVisionBackbone:
        return cls(asset_dir, pretrained=False)

    def write_expert(
        self, folder: Path, expert: ExpertWeights, classes: list[str]
    ) -> dict[str, str]:
        """``save_pretrained`` of the vision model with its ``preprocessor_config.json``, and
        the head file."""
        from ..experts.formats.layout import HEAD_FILE, write_head_file

        if expert.head.hidden_weight is not None:
            raise UserError(
                f"task '{folder.name}': an image expert's head with a hidden layer has no "
                "file format"
            )
        write_head_file(folder / HEAD_FILE, expert.head, classes, expert.normalize)
        self._save_pretrained(folder, expert.state)
        return {"expert": ".", "head": HEAD_FILE}

    def write_base(self, folder: Path) -> str:
        self._save_pretrained(folder, self.state_dict())
        return "."

    def _save_pretrained(self, folder: Path, state: dict) -> None:
        """``save_pretrained`` of the vision model holding ``state``, and its processor file."""
        from transformers import CLIPVisionModelWithProjection

        work = copy.deepcopy(self)
        work.load_state_dict(state)
        if work.visual_projection is not None:  # CLIP with its projection: the wrapper holds both
            model = CLIPVisionModelWithProjection(work.hf_config)
            model.load_state_dict(work.state_dict())
        else:  # CLIPVisionModel / ViTModel / Dinov2Model: the tower is the model
            model = work.vision_model
        model.save_pretrained(folder)
        with tempfile.TemporaryDirectory() as assets:
            self.save_assets(assets)
            shutil.copyfile(Path(assets) / PROCESSOR_FILE, folder / PROCESSOR_FILE)

    def save_assets(self, directory):
        """config.json (the tower's architecture) and preprocessor_config.json (the resolved
        settings): what ``backbone_from_spec`` rebuilds the backbone from."""
        directory = Path(directory)
        self.hf_config.to_json_file(str(directory / "config.json"))
        p = self.processor
        resample = {v: k for k, v in _RESAMPLE.items()}[p["resample"]]
        size = (
            {"shortest_edge": p["resize_size"]}
            if p["resize"] == "shortest_edge"
            else {"height": p["resize_size"][0], "width": p["resize_size"][1]}
        )
        processor = {
            "do_resize": True,
            "size": size,
            "resample": resample,
            "do_center_crop": True,
            "crop_size": {"height": self.image_size[0], "width": self.image_size[1]},
            "do_rescale": True,
            "rescale_factor": p["rescale_factor"],
            "do_normalize": True,
            "image_mean": p["image_mean"],
            "image_std": p["image_std"],
            "do_convert_rgb": True,
        }
        (directory / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
        return ["config.json", PROCESSOR_FILE]


register("hf_vision", HFVisionSettings, HFVisionBackbone)
