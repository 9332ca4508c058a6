"""sentence-transformers folders (``modules.json``: Transformer + Pooling [+ Normalize]) with a
linear head file: the Transformer module's encoder weights merge; its pooling (mean, cls or
max, as its Pooling config says) and normalisation are what the head reads, so the head sees
exactly the expert's sentence embedding.

The head is ``head.safetensors`` inside the folder, or the task's ``head`` file (the format is
described in ``registry``). sentence-transformers itself is not needed to read one: the files
are plain JSON plus a transformers folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoModel

from ...backbones import HFTextBackbone
from ...errors import UserError
from .registry import (
    HEAD_FILE,
    ExpertSource,
    LoadedExpert,
    head_path,
    read_head_file,
    register,
)

SUPPORTED = ("Transformer", "Pooling", "Normalize")
# the legacy Pooling config: one boolean per mode
LEGACY_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def detect(path: Path) -> bool:
    return path.is_dir() and (path / "modules.json").is_file()


def read_modules(path: Path, where: str) -> dict[str, Path]:
    """modules.json -> {"Transformer": folder, "Pooling": folder[, "Normalize": folder]}."""
    try:
        entries = json.loads((path / "modules.json").read_text())
        kinds = {str(e["type"]).rsplit(".", 1)[-1]: path / e.get("path", "") for e in entries}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{where}: modules.json is not a list of modules with a type") from None
    for kind in kinds:
        if kind not in SUPPORTED:
            raise UserError(
                f"{where}: module {kind} is not supported; a sentence-transformers expert is "
                "Transformer + Pooling [+ Normalize]"
            )
    if "Transformer" not in kinds or "Pooling" not in kinds:
        raise UserError(f"{where}: modules.json needs a Transformer and a Pooling module")
    return kinds


def read_pooling(folder: Path, where: str) -> str:
    """The Pooling module's mode: mean, cls or max (new ``pooling_mode`` or legacy flags)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(
            f"{where}: {folder / 'config.json'} (the Pooling config) is unreadable"
        ) from None
    mode = config.get("pooling_mode")
    if mode is None:
        mode = [name for key, name in LEGACY_MODES.items() if config.get(key)]
    if isinstance(mode, list):
        mode = mode[0] if len(mode) == 1 else "+".join(mode)
    if mode not in HFTextBackbone.POOLINGS:
        raise UserError(
            f"{where}: pooling '{mode}' is not supported; supported: "
            f"{', '.join(HFTextBackbone.POOLINGS)}"
        )
    return mode


def implies(path: Path, where: str) -> dict:
    """The pooling its Pooling module names (what its head was trained on)."""
    return {"pooling": read_pooling(read_modules(path, where)["Pooling"], where)}


@register(
    "sentence-transformers",
    detect,
    "a sentence-transformers folder (modules.json: Transformer + Pooling [+ Normalize]) "
    f"with a {HEAD_FILE} head",
    implies,
)
def load(source: ExpertSource) -> LoadedExpert:
    where = source.where
    if not isinstance(source.base, HFTextBackbone):
        raise UserError(f'{where} is a text encoder; it needs backbone.kind = "hf_text"')
    modules = read_modules(source.path, where)
    pooling = read_pooling(modules["Pooling"], where)
    normalize = "Normalize" in modules
    path = head_path(source, source.path / HEAD_FILE)
    head, classes, head_normalize = read_head_file(path, where)
    if head_normalize is not None and head_normalize != normalize:
        raise UserError(
            f"{where}: head file {path} says normalize = {str(head_normalize).lower()} but the "
            f"folder {'has' if normalize else 'has no'} Normalize module"
        )
    folder = modules["Transformer"]
    source.base.check_same_architecture(AutoConfig.from_pretrained(folder), where)
    try:
        encoder, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    except Exception as exc:  # a corrupt or truncated weights file, mismatched shapes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where} cannot be loaded by transformers: {first}") from None
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
    if missing:
        raise UserError(f"{where}: its weights lack '{sorted(missing)[0]}'")
    state = {
        f"model.{k}": v.clone()
        for k, v in encoder.state_dict().items()
        if not k.startswith("pooler.")
    }
    return LoadedExpert(state, head, classes=classes, normalize=normalize, pooling=pooling)
