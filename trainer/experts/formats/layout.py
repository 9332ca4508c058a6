"""File layouts that the expert readers here and the backbone kinds' expert writers
(``trainer.backbones.*.write_expert``) share. It imports nothing of the project, so the
backbones can write what this package reads without an import cycle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

HEAD_FILE = "head.safetensors"


def write_head_file(
    path: Path, head: Any, classes: list[str] | None = None, normalize: bool | None = None
) -> Path:
    """Write a linear ``head`` as a head file (the format ``read_head_file`` reads); ``None``
    leaves a field out."""
    if head.hidden_weight is not None:
        raise ValueError("a head file holds a linear head; this head has a hidden layer")
    metadata = {}
    if normalize is not None:
        metadata["normalize"] = "true" if normalize else "false"
    if classes is not None:
        metadata["classes"] = json.dumps(list(classes))
    tensors = {"weight": head.weight.float().contiguous(), "bias": head.bias.float().contiguous()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def head_modules(model: nn.Module, model_type: str) -> tuple[nn.Linear, nn.Linear, str]:
    """(hidden layer, output layer, activation) of a ``*ForSequenceClassification``: the path
    from the [CLS] hidden state to its logits."""
    if model_type == "bert":
        return model.bert.pooler.dense, model.classifier, "tanh"
    if model_type == "distilbert":
        return model.pre_classifier, model.classifier, "relu"
    activation = "gelu" if model_type == "electra" else "tanh"
    return model.classifier.dense, model.classifier.out_proj, activation
