"""transformers vision experts: a ``save_pretrained`` folder of a CLIP vision tower
(``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / a whole ``CLIPModel``), a ``ViTModel``
or ``ViTForImageClassification``, or a ``Dinov2Model``, fine-tuned from an ``hf_vision`` base.

The tower is read by the ``hf_vision`` backbone itself, so it lands in the base's key layout.
A CLIP tower saved without ``visual_projection`` (FusionBench's published experts are
``CLIPVisionModel``s: the projection was frozen) takes the base's. The head: a
``ViTForImageClassification``'s classifier (it reads the final LayerNorm's [CLS] token, the
backbone's pooling), else a head file (the task's ``head`` or ``head.safetensors`` in the
folder), or for CLIP ``head = "zeroshot"``: CLIP's zero-shot classifier from the task's class
names with the text tower of the base (a full ``CLIPModel`` folder or hub id) and the task's
published prompt templates. Class names of a classifier come from ``config.id2label``.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForImageClassification

from ...backbones import HFVisionBackbone
from ...errors import UserError
from ...surgery.model import TaskHead
from ..zeroshot import zeroshot_head
from .registry import HEAD_FILE, ZEROSHOT, ExpertSource, LoadedExpert, linear_head, register

MODEL_TYPES = ("clip", "clip_vision_model", "vit", "dinov2")
PROJECTION = "visual_projection.weight"


def _config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def detect(path: Path) -> bool:
    return path.is_dir() and _config(path).get("model_type") in MODEL_TYPES


def _classifier(path: Path, where: str) -> tuple[TaskHead, list[str]]:
    """A ViTForImageClassification's classifier and its class names."""
    try:
        model = AutoModelForImageClassification.from_pretrained(path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where} cannot be loaded by transformers: {first}") from None
    classes = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    head = TaskHead(
        model.classifier.weight.detach().clone(), model.classifier.bias.detach().clone()
    )
    return head, classes


@register(
    "hf_vision",
    detect,
    "a transformers CLIP vision / ViT / DINOv2 folder (save_pretrained) with a head file, "
    'a ViTForImageClassification head, or head = "zeroshot" (CLIP)',
)
def load(source: ExpertSource) -> LoadedExpert:
    base, where = source.base, source.where
    if not isinstance(base, HFVisionBackbone):
        raise UserError(
            f'{where} is a transformers vision model; it needs backbone.kind = "hf_vision"'
        )
    architectures = _config(source.path).get("architectures") or []
    if any(a.startswith("Dinov2For") for a in architectures):
        raise UserError(
            f"{where}: a Dinov2ForImageClassification head reads [CLS, mean of the patch "
            "tokens], not the backbone's [CLS] feature; give the Dinov2Model with a head file"
        )
    try:
        tower = HFVisionBackbone(source.path)
    except UserError:
        raise
    except Exception as exc:  # a corrupt or truncated weights file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where} cannot be loaded by transformers: {first}") from None
    state = {k: v.clone() for k, v in tower.state_dict().items()}
    if PROJECTION in source.base_state and PROJECTION not in state:
        state[PROJECTION] = source.base_state[PROJECTION].clone()  # frozen while fine-tuned
    if source.head == ZEROSHOT:
        if base.family != "clip":
            raise UserError(f'{where}: head = "zeroshot" needs a CLIP model, this is {base.family}')
        weight, bias = zeroshot_head(source.classes, source.base_path, source.task)
        head = TaskHead(weight.float(), bias.float())  # built from the task's names, in order
        return LoadedExpert(state, head, classes=list(source.classes), normalize=True)
    if not source.head and any(a.endswith("ForImageClassification") for a in architectures):
        head, classes = _classifier(source.path, where)
        return LoadedExpert(state, head, classes=classes, normalize=base.normalize_head)
    head, classes, normalize = linear_head(source, source.path / HEAD_FILE, base.normalize_head)
    return LoadedExpert(state, head, classes=classes, normalize=normalize)
