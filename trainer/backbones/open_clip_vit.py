"""open_clip ``VisionTransformer``: any open_clip model name, or a small inline config.

Blocks are ``visual.transformer.resblocks[l]`` (batch-first [B, 1 + grid², width]); the final
representation is open_clip's own pooling (ln_post, CLS token) followed by ``proj``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import UserError
from .base import Backbone, ExpertWeights
from .registry import BackboneSettings, register


@dataclass
class OpenClipViTSettings(BackboneSettings):
    """``[backbone] kind = "open_clip_vit"``: ``path`` is a weights file (safetensors / .pt,
    full CLIP or visual-only keys) or "" for seeded random weights."""

    model: str = ""  # an open_clip model name ("ViT-B-32") ...
    vision_cfg: dict = field(default_factory=dict)  # ... and/or an inline vision config
    embed_dim: int = 0  # output width (needed with vision_cfg alone)
    init_seed: int = 0  # without weights: the seed of the random init

    def check(self) -> None:
        if not (self.model or self.vision_cfg):
            raise UserError(
                "backbone.kind open_clip_vit needs backbone.model or backbone.vision_cfg"
            )


def _vision_config(model: str, vision_cfg: dict, embed_dim: int) -> tuple[dict, int, bool]:
    import open_clip

    if model:
        cfg = open_clip.get_model_config(model)
        if cfg is None:
            raise UserError(
                f"unknown open_clip model '{model}'; see open_clip.list_models(), "
                "or give backbone.vision_cfg instead"
            )
        merged = dict(cfg["vision_cfg"])
        merged.update(vision_cfg)
        return merged, embed_dim or cfg["embed_dim"], bool(cfg.get("quick_gelu", False))
    if not embed_dim:
        raise UserError("backbone.vision_cfg needs backbone.embed_dim (the output width)")
    return dict(vision_cfg), embed_dim, False


def load_visual_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Visual-tower weights from a safetensors or torch file (full CLIP or visual-only keys)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"backbone weights not found: {path} (expected a .safetensors or .pt file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
    except Exception as exc:  # corrupt file: say which and why
        raise UserError(f"cannot read backbone weights {path}: {exc}") from None
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return state


class OpenClipViTBackbone(Backbone):
    modality = "image"
    normalize_head = True

    def __init__(
        self,
        model: str = "",
        vision_cfg: dict | None = None,
        embed_dim: int = 0,
        weights: str = "",
        init_seed: int = 0,
    ):
        super().__init__()
        import open_clip
        from open_clip.model import _build_vision_tower

        cfg, embed_dim, quick_gelu = _vision_config(model, vision_cfg or {}, embed_dim)
        self.model_name, self.vision_cfg, self.embed_dim = model, cfg, embed_dim
        self.quick_gelu = quick_gelu
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            self.visual = _build_vision_tower(embed_dim, cfg, quick_gelu=quick_gelu)
        if weights:
            state = load_visual_state(weights)
            missing, unexpected = self.visual.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise UserError(
                    f"weights {weights} do not fit the {model or 'configured'} ViT: "
                    f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
                )
        self.visual.eval()
        if not self.visual.transformer.batch_first:
            raise UserError("only batch-first open_clip transformers are supported")
        size = self.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.mean = tuple(getattr(self.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(self.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.num_blocks = len(self.visual.transformer.resblocks)
        self.width = self.visual.transformer.width
        self.feature_dim = embed_dim

    def embed(self, batch):
        return self.visual._embeds(batch["pixel_values"]), {}

    def block(self, index, hidden, ctx):
        return self.visual.transformer.resblocks[index](hidden)

    def attention_output(self, index):
        # nn.MultiheadAttention projects inside a functional call (a hook on its out_proj
        # never fires); ls_1 (LayerScale, or Identity) is what the residual add reads
        return self.visual.transformer.resblocks[index].ls_1

    def token_mean(self, hidden, ctx):
        return hidden.mean(1)

    def pool(self, hidden, ctx):
        pooled, _ = self.visual._pool(hidden)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled

    def collate(self, inputs):
        """uint8 images [N, H, W, 3] (or PIL images) -> normalised pixel_values [N, 3, H, W]."""
        arrays = [self._resize(np.asarray(img)) for img in inputs]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return {"pixel_values": (x - mean) / std}

    def _resize(self, img: np.ndarray) -> np.ndarray:
        """open_clip's eval transform: shorter side to size (bicubic), then centre crop."""
        th, tw = self.image_size
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        if img.shape[:2] == (th, tw):
            return img
        from PIL import Image

        pil = Image.fromarray(img).convert("RGB")
        w, h = pil.size
        short = min(th, tw)
        if w <= h:
            size = (short, int(short * h / w))
        else:
            size = (int(short * w / h), short)
        pil = pil.resize(size, Image.BICUBIC)
        w, h = pil.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return np.asarray(pil.crop((left, top, left + tw, top + th)))

    def spec(self):
        return {
            "kind": "open_clip_vit",
            "model": self.model_name,
            "vision_cfg": self.vision_cfg,
            "embed_dim": self.embed_dim,
            "quick_gelu": self.quick_gelu,
            "num_blocks": self.num_blocks,
            "width": self.width,
        }

    @classmethod
    def from_settings(cls, settings: OpenClipViTSettings) -> OpenClipViTBackbone:
        return cls(
            settings.model,
            settings.vision_cfg,
            settings.embed_dim,
            settings.path,
            settings.init_seed,
        )

    @classmethod
    def from_spec(cls, spec: dict, asset_dir) -> OpenClipViTBackbone:
        return cls(spec.get("model", ""), spec["vision_cfg"], spec["embed_dim"])

    def write_expert(
        self, folder: Path, expert: ExpertWeights, classes: list[str]
    ) -> dict[str, str]:
        """The visual tower's state dict ``visual.safetensors`` + the head file."""
        from ..experts.formats.layout import HEAD_FILE, write_head_file

        if expert.head.hidden_weight is not None:
            raise UserError(
                f"task '{folder.name}': an image expert's head with a hidden layer has no "
                "file format"
            )
        write_head_file(folder / HEAD_FILE, expert.head, classes, expert.normalize)
        tower = {k.removeprefix("visual."): v.contiguous() for k, v in expert.state.items()}
        save_file(tower, str(folder / "visual.safetensors"))
        return {"expert": "visual.safetensors", "head": HEAD_FILE}

    def write_base(self, folder: Path) -> str:
        tower = {k: v.contiguous() for k, v in self.visual.state_dict().items()}
        save_file(tower, str(folder / "visual.safetensors"))
        return "visual.safetensors"

    def preprocessing(self):
        return {
            "type": "image",
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": "bicubic",
            "resize": "shortest_edge_then_center_crop",
        }


register("open_clip_vit", OpenClipViTSettings, OpenClipViTBackbone)
