"""open_clip image encoders: a state dict of a fine-tuned ``visual`` tower (safetensors or a
torch file; the tower's own keys, or a whole CLIP's ``visual.*`` / ``model.visual.*`` keys as
the task-vectors line of work saves them), merged on an ``open_clip_vit`` base.

The head is a head file (the task's ``head``, else ``head.safetensors`` beside the weights;
it reads the L2-normalised feature unless its metadata says otherwise, as CLIP's do), or
``head = "zeroshot"``: CLIP's zero-shot classifier built from the task's class names with the
base CLIP's text tower (``backbone.model`` + the full CLIP weights in ``backbone.path``) and
the task's published prompt templates.
"""

from __future__ import annotations

from pathlib import Path

from ...backbones import OpenClipViTBackbone
from ...errors import UserError
from ...surgery.model import TaskHead
from ..zeroshot import zeroshot_head
from .registry import (
    HEAD_FILE,
    ZEROSHOT,
    ExpertSource,
    LoadedExpert,
    linear_head,
    read_state,
    register,
    safetensors_keys,
)

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def visual_keys(keys) -> dict[str, str]:
    """{key in the file: key of the visual tower} for the tensors of the visual tower: the
    part after the last "visual." when there is one (whole-CLIP checkpoints), else the key."""
    keys = list(keys)
    if any("visual." in k for k in keys):
        return {k: k.rsplit("visual.", 1)[1] for k in keys if "visual." in k}
    return {k: k for k in keys}


def _is_visual(keys) -> bool:
    if any(k.startswith("backbone.") for k in keys):  # this project's own format
        return False
    tower = set(visual_keys(keys).values())
    return "conv1.weight" in tower and any(k.startswith("transformer.resblocks.0.") for k in tower)


def detect(path: Path) -> bool:
    if not (path.is_file() and path.suffix in SUFFIXES):
        return False
    if path.suffix == ".safetensors":
        return _is_visual(safetensors_keys(path, "expert"))
    return _is_visual(read_state(path, "expert"))


def zeroshot(source: ExpertSource, model_name: str) -> TaskHead:
    """The task's zero-shot head from the base CLIP's text tower (weights [C, F], bias 0)."""
    if not model_name or not source.base_path:
        raise UserError(
            f'{source.where}: head = "zeroshot" needs the base CLIP\'s text tower: an open_clip '
            "backbone.model name and its full CLIP weights in backbone.path"
        )
    weight, bias = zeroshot_head(
        source.classes, source.base_path, source.task, open_clip_model=model_name
    )
    return TaskHead(weight.float(), bias.float())


@register(
    "open_clip",
    detect,
    "an open_clip visual tower state dict (.safetensors / .pt) with a head file or "
    'head = "zeroshot"',
)
def load(source: ExpertSource) -> LoadedExpert:
    base = source.base
    if not isinstance(base, OpenClipViTBackbone):
        raise UserError(
            f"{source.where} is an open_clip image encoder; it needs backbone.kind = "
            '"open_clip_vit"'
        )
    tensors = read_state(source.path, source.where)
    state = {f"visual.{tower}": tensors[key] for key, tower in visual_keys(tensors).items()}
    if source.head == ZEROSHOT:
        head = zeroshot(source, base.model_name)  # built from the task's names, in its order
        return LoadedExpert(state, head, classes=list(source.classes), normalize=True)
    head, classes, normalize = linear_head(source, source.path.parent / HEAD_FILE, True)
    return LoadedExpert(state, head, classes=classes, normalize=normalize)
