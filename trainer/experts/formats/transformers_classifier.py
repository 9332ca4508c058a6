"""transformers sequence classifiers: a ``save_pretrained`` folder of a
``*ForSequenceClassification`` model (BERT / MiniLM, RoBERTa / XLM-R, DistilBERT, ELECTRA, MPNet)
fine-tuned from the base.

The encoder's weights merge; the task-specific path from the [CLS] token to the logits stays
the task's head, so the head reproduces the expert's own logits:

- BERT: the pooler (dense + tanh) then ``classifier``;
- RoBERTa, XLM-R, CamemBERT, MPNet: ``classifier.dense`` + tanh then ``classifier.out_proj``;
- ELECTRA: the same with GELU;
- DistilBERT: ``pre_classifier`` + ReLU then ``classifier``.

Class names come from ``config.id2label``.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from ...backbones import HFTextBackbone
from ...errors import UserError
from ...surgery.model import TaskHead
from .layout import head_modules
from .registry import ExpertSource, LoadedExpert, register


def _architectures(path: Path) -> list[str]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    names = config.get("architectures") if isinstance(config, dict) else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def detect(path: Path) -> bool:
    return path.is_dir() and any(
        a.endswith("ForSequenceClassification") for a in _architectures(path)
    )


def classification_head(model: nn.Module, model_type: str) -> TaskHead:
    """The expert's classification path as a TaskHead."""
    hidden, out, activation = head_modules(model, model_type)
    return TaskHead(
        out.weight.detach().float().clone(),
        out.bias.detach().float().clone(),
        hidden.weight.detach().float().clone(),
        hidden.bias.detach().float().clone(),
        activation,
    )


def implies(path: Path, where: str) -> dict:
    """Every ``*ForSequenceClassification`` head reads the first token ([CLS] / <s>)."""
    return {"pooling": "cls"}


@register(
    "transformers",
    detect,
    "a transformers *ForSequenceClassification folder (config.json + weights, "
    "from save_pretrained)",
    implies,
)
def load(source: ExpertSource) -> LoadedExpert:
    where = source.where
    if not isinstance(source.base, HFTextBackbone):
        raise UserError(f'{where} is a text classifier; it needs backbone.kind = "hf_text"')
    if source.head:
        raise UserError(f"{where} has its own classification head; remove the task's head key")
    config = AutoConfig.from_pretrained(source.path)
    source.base.check_same_architecture(config, where)
    if config.num_labels < 2:
        raise UserError(f"{where} has {config.num_labels} output (a regressor), not a classifier")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source.path, output_loading_info=True
        )
    except Exception as exc:  # a corrupt or truncated weights file, mismatched shapes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where} cannot be loaded by transformers: {first}") from None
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    if missing:
        raise UserError(
            f"{where}: its weights lack '{sorted(missing)[0]}' (transformers would initialise "
            "it at random); save the complete fine-tuned model"
        )
    # the encoder in the base backbone's layout (model.<name>); BERT's pooler joins the head
    body = model.base_model.state_dict()
    state = {f"model.{k}": v.clone() for k, v in body.items() if not k.startswith("pooler.")}
    classes = [str(config.id2label[i]) for i in range(config.num_labels)]
    head = classification_head(model, config.model_type)
    return LoadedExpert(state, head, classes=classes, normalize=False, pooling="cls")
