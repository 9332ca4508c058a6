"""Zero-shot classification heads built from class names with a CLIP text tower.

CLIP's own zero-shot classifier, as the paper and FusionBench build the heads of their CLIP
experts: for every class, each prompt template filled with the class name is encoded by the
text tower (tokenizer, text transformer, ``text_projection``), the embeddings are
L2-normalised, averaged over the templates and normalised again. Logits are then

    logit_scale · normalize(image_features) @ normalize(class_embedding).T

which is this project's normalised head (``Heads(normalize=True)``) with ``logit_scale`` folded
into the weight, as fine-tuned CLIP-style heads store ``HEAD_SCALE``. With one template this is
exactly the library's ``logits_per_image``.

Text towers: a transformers ``CLIPModel`` folder or hub id (its tokenizer from the same folder),
or an open_clip model (``open_clip.create_model(name, pretrained=<local weights file>)``, or a
``hf-hub:`` / ``local-dir:`` name, with ``open_clip.get_tokenizer``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from transformers import AutoConfig, AutoTokenizer, CLIPModel

from ..backbones.hf_vision import resolve_model_source
from ..errors import UserError

# The prompts CLIP's authors published per data set (CLIP's data/prompts.md, as used by the
# task-vectors line of work and FusionBench for their CLIP experts); "{c}" is the class name.
# Any other task gets CLIP's 80 ImageNet templates (``openai_imagenet``).
TEMPLATES: dict[str, list[str]] = {
    "mnist": ['a photo of the number: "{c}".'],
    "svhn": ['a photo of the number: "{c}".'],
    "gtsrb": [
        'a zoomed in photo of a "{c}" traffic sign.',
        'a centered photo of a "{c}" traffic sign.',
        'a close up photo of a "{c}" traffic sign.',
    ],
    "dtd": [
        "a photo of a {c} texture.",
        "a photo of a {c} pattern.",
        "a photo of a {c} thing.",
        "a photo of a {c} object.",
        "a photo of the {c} texture.",
        "a photo of the {c} pattern.",
        "a photo of the {c} thing.",
        "a photo of the {c} object.",
    ],
    "eurosat": [
        "a centered satellite photo of {c}.",
        "a centered satellite photo of a {c}.",
        "a centered satellite photo of the {c}.",
    ],
    "resisc45": [
        "satellite imagery of {c}.",
        "aerial imagery of {c}.",
        "satellite photo of {c}.",
        "aerial photo of {c}.",
        "satellite view of {c}.",
        "aerial view of {c}.",
        "satellite imagery of a {c}.",
        "aerial imagery of a {c}.",
        "satellite photo of a {c}.",
        "aerial photo of a {c}.",
        "satellite view of a {c}.",
        "aerial view of a {c}.",
        "satellite imagery of the {c}.",
        "aerial imagery of the {c}.",
        "satellite photo of the {c}.",
        "aerial photo of the {c}.",
        "satellite view of the {c}.",
        "aerial view of the {c}.",
    ],
    "sun397": ["a photo of a {c}.", "a photo of the {c}."],
    "cars": [
        "a photo of a {c}.",
        "a photo of the {c}.",
        "a photo of my {c}.",
        "i love my {c}!",
        "a photo of my dirty {c}.",
        "a photo of my clean {c}.",
        "a photo of my new {c}.",
        "a photo of my old {c}.",
    ],
    "cifar10": [
        "a photo of a {c}.",
        "a blurry photo of a {c}.",
        "a black and white photo of a {c}.",
        "a low contrast photo of a {c}.",
        "a high contrast photo of a {c}.",
        "a bad photo of a {c}.",
        "a good photo of a {c}.",
        "a photo of a small {c}.",
        "a photo of a big {c}.",
        "a photo of the {c}.",
        "a blurry photo of the {c}.",
        "a black and white photo of the {c}.",
        "a low contrast photo of the {c}.",
        "a high contrast photo of the {c}.",
        "a bad photo of the {c}.",
        "a good photo of the {c}.",
        "a photo of the small {c}.",
        "a photo of the big {c}.",
    ],
    "openai_imagenet": [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES],
}
TEMPLATES["cifar100"] = TEMPLATES["cifar10"]
TEMPLATES["stanford_cars"] = TEMPLATES["cars"]


def templates_for(task: str) -> list[str]:
    """The published templates of a task by name ("gtsrb", "DTD", "dtd10" -> dtd, ...), else
    CLIP's 80 ImageNet templates."""
    key = task.lower().replace("-", "_")
    while key and key not in TEMPLATES and key[-1].isdigit():
        key = key[:-1]  # "dtd10" (a subset of DTD's classes) -> "dtd"
    return TEMPLATES.get(key, TEMPLATES["openai_imagenet"])


def _hf_text_tower(source: str | Path) -> tuple[Callable[[list[str]], torch.Tensor], float]:
    """A transformers CLIPModel: (texts -> projected text features [N, F], logit scale)."""
    folder = resolve_model_source(str(source), "zero-shot text tower")
    if AutoConfig.from_pretrained(folder).model_type != "clip":
        raise UserError(
            f"zero-shot heads need a full CLIP model (text tower and logit scale); {folder} "
            "is not a CLIPModel folder"
        )
    model = CLIPModel.from_pretrained(folder).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    length = model.config.text_config.max_position_embeddings

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(
            texts, padding=True, truncation=True, max_length=length, return_tensors="pt"
        )
        out = model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 / 5

    return encode, float(model.logit_scale.exp())


def _open_clip_text_tower(
    model_name: str, weights: str | Path | None
) -> tuple[Callable[[list[str]], torch.Tensor], float]:
    """An open_clip CLIP: (texts -> projected text features [N, F], logit scale)."""
    schema = model_name.startswith(("hf-hub:", "local-dir:"))
    if not schema and weights and not Path(weights).is_file():
        raise UserError(f"open_clip weights {weights} not found (expected a .pt/.safetensors file)")
    try:
        model = open_clip.create_model(model_name, pretrained=None if schema else weights or None)
    except RuntimeError as exc:  # unknown name / weights that do not fit
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"open_clip cannot build '{model_name}' from {weights}: {first}") from None
    model = model.float().eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return (lambda texts: model.encode_text(tokenizer(texts))), float(model.logit_scale.exp())


@torch.no_grad()
def zeroshot_head(
    classes: Sequence[str],
    text_tower: str | Path,
    templates: Sequence[str] | str = "openai_imagenet",
    open_clip_model: str = "",
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's zero-shot head from its class names -> (weight [C, F], bias [C]).

    ``text_tower``: a transformers CLIPModel folder or hub id; with ``open_clip_model`` (an
    open_clip model name, or a ``hf-hub:`` / ``local-dir:`` name) the local weights file of
    that model instead ("" for a schema name). ``templates``: prompt strings with ``{c}``, or
    a task name whose published templates to use (``templates_for``). The weight holds
    ``logit_scale · normalised class embedding``, the bias is zero: apply it to
    L2-normalised image features (``Heads(normalize=True)``).
    """
    if not classes:
        raise UserError("a zero-shot head needs the task's class names; the task has none")
    prompts = list(templates_for(templates) if isinstance(templates, str) else templates)
    if not prompts or not all("{c}" in p for p in prompts):
        raise UserError(f"zero-shot templates must each contain '{{c}}', got {prompts[:2]}")
    if open_clip_model:
        encode, scale = _open_clip_text_tower(open_clip_model, text_tower)
    else:
        encode, scale = _hf_text_tower(text_tower)
    texts = [p.replace("{c}", name) for name in classes for p in prompts]
    features = torch.cat(
        [encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    )
    per_template = F.normalize(features.float(), dim=-1).view(len(classes), len(prompts), -1)
    embedding = F.normalize(per_template.mean(1), dim=-1)  # [C, F]
    return scale * embedding, torch.zeros(len(classes))
