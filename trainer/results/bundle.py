"""The bundle: everything needed to rebuild the measured multi-task model, and nothing else.

``bundle/manifest.json`` describes the backbone architecture, tasks, preprocessing, merge and
surgery settings, and the sha256 of every file; ``backbone.safetensors`` holds the shared merged
backbone, ``tasks.safetensors`` the per-task heads and adapters. Written to a temporary
directory and renamed, so a bundle is either complete or absent.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from modeldir import atomic_directory, sha256_file

from ..backbones import backbone_from_spec
from ..errors import UserError
from ..surgery.model import Heads, MultiTaskModel

FORMAT_VERSION = 1


def write_bundle(
    directory: Path, model: MultiTaskModel, classes: list[list[str]], info: dict
) -> Path:
    """Write ``model`` (its backbone holds the merged weights) to ``directory`` atomically."""
    backbone_state = {
        k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()
    }
    task_state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("backbone.")
    }
    with atomic_directory(directory) as tmp:
        save_file(backbone_state, str(tmp / "backbone.safetensors"))
        save_file(task_state, str(tmp / "tasks.safetensors"))
        assets = model.backbone.save_assets(tmp)
        files = ["backbone.safetensors", "tasks.safetensors", *assets]
        manifest = {
            "format_version": FORMAT_VERSION,
            "modality": model.backbone.modality,
            "backbone": model.backbone.spec(),
            "preprocessing": model.backbone.preprocessing(),
            "tasks": [
                {
                    "name": name,
                    "index": i,
                    "classes": list(classes[i]),
                    "num_classes": len(classes[i]),
                }
                for i, name in enumerate(model.task_names)
            ],
            "heads": {"normalize": model.heads.normalize},
            "surgery": {"mode": model.mode, "rank": model.rank},
            "assets": assets,
            "sha256": {name: sha256_file(tmp / name) for name in files},
            **info,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def read_manifest(directory: Path) -> dict:
    directory = Path(directory)
    path = directory / "manifest.json"
    if not directory.is_dir():
        raise UserError(
            f"bundle directory {directory} does not exist; run python -m trainer.fit "
            "first or pass --bundle DIR"
        )
    if not path.is_file():
        raise UserError(f"{directory} is not a complete bundle: manifest.json is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    for name, digest in manifest.get("sha256", {}).items():
        file = directory / name
        if not file.is_file():
            raise UserError(f"bundle {directory} is incomplete: {name} is missing")
        if sha256_file(file) != digest:
            raise UserError(
                f"bundle file {file} does not match its sha256 in the manifest "
                "(corrupt or modified); re-run python -m trainer.fit"
            )
    return manifest


def load_bundle(directory: Path) -> tuple[MultiTaskModel, dict]:
    """Rebuild the exact model the trainer measured from a verified bundle."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    backbone = backbone_from_spec(manifest["backbone"], directory)
    tasks = manifest["tasks"]
    task_state = load_file(str(directory / "tasks.safetensors"))
    weight, bias = task_state["heads.weight"], task_state["heads.bias"]
    heads = Heads(
        [weight[t["index"], : t["num_classes"]] for t in tasks],
        [bias[t["index"], : t["num_classes"]] for t in tasks],
        normalize=manifest["heads"]["normalize"],
    )
    model = MultiTaskModel(
        backbone,
        heads,
        [t["name"] for t in tasks],
        mode=manifest["surgery"]["mode"],
        rank=manifest["surgery"]["rank"],
    )
    state = {
        f"backbone.{k}": v for k, v in load_file(str(directory / "backbone.safetensors")).items()
    }
    state.update(task_state)
    model.load_state_dict(state, strict=True)
    return model.eval(), manifest
