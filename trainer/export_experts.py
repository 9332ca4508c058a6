"""``python -m trainer.export_experts``: write a config's experts in their libraries' standard
formats, and a config that merges them back as given experts.

The experts are the ones ``python -m trainer.fit`` uses (the cache, or fine-tuned now), each
written the way a user of its library would hold it:

- text, linear head (what this project fine-tunes: a head on the mean / cls / max pooling): a
  sentence-transformers folder written by sentence-transformers (Transformer + Pooling
  [+ Normalize]) with ``head.safetensors``. A ``BertForSequenceClassification`` cannot hold
  such an expert exactly: its head reads tanh(pooler(CLS)), not a pooled mean.
- text, hidden-layer head (an expert that came as a transformers classifier): its
  ``*ForSequenceClassification`` folder (``save_pretrained``).
- open_clip ViT: the visual tower's state dict ``visual.safetensors`` + ``head.safetensors``.
- transformers vision (CLIP / ViT / DINOv2): ``save_pretrained`` of the vision model with its
  ``preprocessor_config.json``, + ``head.safetensors``.

A base pre-trained here (``[pretrain]``) is written to ``base/`` in the same way and the new
config points at it. ``OUT/experts.toml`` is the original config with every task's ``expert``
(and ``head``) set; the generated demo tasks are copied to ``OUT/data``. Then
``python -m trainer.fit --config OUT/experts.toml`` reproduces the original run's table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModelForSequenceClassification, CLIPVisionModelWithProjection

from modeldir import atomic_directory

from .backbones import Backbone, HFTextBackbone, HFVisionBackbone, OpenClipViTBackbone
from .backbones.hf_vision import PROCESSOR_FILE
from .config import apply_overrides, load_config, resolve_config_path
from .data.suite import demo_folder
from .data.tasks import TaskData
from .errors import UserError, run_cli
from .experts.expert import Expert
from .experts.formats.registry import HEAD_FILE, write_head_file
from .experts.formats.transformers_classifier import head_modules
from .pipeline import gather_experts, resolve_device
from .progress import quiet_libraries

try:  # sentence-transformers >= 6 (the modules' earlier home is deprecated there)
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
except ImportError:
    from sentence_transformers.models import Normalize, Pooling, Transformer

log = logging.getLogger("deepsurgery")
CONFIG_FILE = "experts.toml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.export_experts", description=__doc__.splitlines()[0]
    )
    p.add_argument("--config", default="demo", help="a shipped config name or a TOML file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--data", default=None, help="root for {data} (as trainer.fit)")
    p.add_argument("--out", required=True, help="folder to write the experts and the config to")
    p.add_argument("--cache", default=None, help="the experts' cache (as trainer.fit)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (fine-tuning, if needed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    return run_cli(lambda: run(args))[0]


def run(args: argparse.Namespace) -> Path:
    config = load_config(args.config, args.set)
    raw = apply_overrides(tomllib.loads(resolve_config_path(args.config).read_text()), args.set)
    data_root = Path(
        args.data
        or os.environ.get("DEEPSURGERY_DATA")
        or Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    cache = Path(args.cache or os.environ.get("DEEPSURGERY_CACHE") or "runs/cache")
    out = Path(args.out).resolve()
    gathered = gather_experts(
        config, data_root=data_root, cache=cache, device=resolve_device(args.device)
    )
    base = gathered.base.cpu()
    entries = {}
    with atomic_directory(out) as tmp:
        for task, expert in zip(gathered.tasks, gathered.experts):
            files = write_expert(tmp / task.name, base, expert, task.classes)
            entries[task.name] = {k: str(out / task.name / v) for k, v in files.items()}
            if config.demo:  # generated data: copied, so the new config stands alone
                shutil.copytree(demo_folder(config, cache) / task.name, tmp / "data" / task.name)
                entries[task.name]["path"] = str(out / "data" / task.name)
            log.info("expert %-12s -> %s", task.name, out / task.name)
        if gathered.pretrain is not None:  # the new config starts from this base
            raw.pop("pretrain", None)
            written = write_base(tmp / "base", base)
            raw.setdefault("backbone", {})["path"] = str(out / "base" / written)
        raw["name"] = f"{config.name}-experts"
        raw.pop("demo", None)
        raw["tasks"] = _task_tables(raw.get("tasks", []), gathered.tasks, entries)
        (tmp / CONFIG_FILE).write_text(dump_toml(raw))
    print(f"{len(entries)} experts written to {out}; merge them with")
    print(f"python -m trainer.fit --config {out / CONFIG_FILE}")
    return out


def _task_tables(original: list[dict], tasks: list[TaskData], entries: dict) -> list[dict]:
    """[[tasks]] of the new config: the original tables (paths, limits) with the expert set."""
    by_name = {t.get("name"): t for t in original}
    tables = []
    for task in tasks:
        table = {
            k: v
            for k, v in by_name.get(task.name, {}).items()
            if k not in ("checkpoint", "expert", "head")
        }
        table["name"] = task.name
        table.update(entries[task.name])
        tables.append(table)
    return tables


# ---- writers: one per kind of expert --------------------------------------------------------


def write_expert(folder: Path, base: Backbone, expert: Expert, classes: list[str]) -> dict:
    """Write ``expert`` under ``folder`` -> the [[tasks]] keys pointing at it, relative to the
    task's folder name (``expert``, and ``head`` when the expert's files hold none)."""
    folder.mkdir(parents=True)
    name = folder.name
    if isinstance(base, HFTextBackbone):
        if expert.head.hidden_weight is not None:
            write_classifier(folder, base, expert, classes)
        else:
            write_sentence_transformer(folder, base, expert, classes)
        return {"expert": "."}
    if expert.head.hidden_weight is not None:
        raise UserError(
            f"task '{name}': an image expert's head with a hidden layer has no file format"
        )
    write_head_file(folder / HEAD_FILE, expert.head, classes, expert.normalize)
    if isinstance(base, OpenClipViTBackbone):
        tower = {k.removeprefix("visual."): v.contiguous() for k, v in expert.state.items()}
        save_file(tower, str(folder / "visual.safetensors"))
        return {"expert": "visual.safetensors", "head": HEAD_FILE}
    write_hf_vision(folder, base, expert.state)
    return {"expert": ".", "head": HEAD_FILE}


def write_sentence_transformer(
    folder: Path, base: HFTextBackbone, expert: Expert, classes: list[str]
) -> None:
    """A sentence-transformers folder (written by sentence-transformers) + the head file."""
    encoder = copy.deepcopy(base.model)
    encoder.load_state_dict({k.removeprefix("model."): v for k, v in expert.state.items()})
    encoder.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    transformer = Transformer(str(folder), max_seq_length=base.max_length)
    modules = [transformer, Pooling(base.width, base.pooling)]
    SentenceTransformer(modules=modules + ([Normalize()] if expert.normalize else [])).save(
        str(folder)
    )
    write_head_file(folder / HEAD_FILE, expert.head, classes, expert.normalize)


def write_classifier(
    folder: Path, base: HFTextBackbone, expert: Expert, classes: list[str]
) -> None:
    """The ``*ForSequenceClassification`` the expert came as (``save_pretrained``)."""
    config = copy.deepcopy(base.model.config)
    config.num_labels = len(classes)
    config.id2label = dict(enumerate(classes))
    config.label2id = {c: i for i, c in enumerate(classes)}
    config.architectures = None
    model = AutoModelForSequenceClassification.from_config(config)
    encoder = {k.removeprefix("model."): v for k, v in expert.state.items()}
    missing, unexpected = model.base_model.load_state_dict(encoder, strict=False)
    hidden, out, activation = head_modules(model, config.model_type)
    if (
        unexpected
        or any(not k.startswith("pooler.") for k in missing)
        or activation != expert.head.activation
    ):
        raise UserError(
            f"task '{folder.name}': its head does not fit a {config.model_type} classifier"
        )
    for layer, (weight, bias) in (
        (hidden, (expert.head.hidden_weight, expert.head.hidden_bias)),
        (out, (expert.head.weight, expert.head.bias)),
    ):
        layer.weight.data.copy_(weight)
        layer.bias.data.copy_(bias)
    model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)


def write_hf_vision(folder: Path, base: HFVisionBackbone, state: dict) -> None:
    """``save_pretrained`` of the vision model holding ``state``, and its processor file."""
    work = copy.deepcopy(base)
    work.load_state_dict(state)
    if work.visual_projection is not None:  # CLIP with its projection: the wrapper holds both
        model = CLIPVisionModelWithProjection(work.hf_config)
        model.load_state_dict(work.state_dict())
    else:  # CLIPVisionModel / ViTModel / Dinov2Model: the tower is the model
        model = work.vision_model
    model.save_pretrained(folder)
    with tempfile.TemporaryDirectory() as assets:
        base.save_assets(assets)
        shutil.copyfile(Path(assets) / PROCESSOR_FILE, folder / PROCESSOR_FILE)


def write_base(folder: Path, base: Backbone) -> str:
    """A base pre-trained here, in its kind's format -> the file or folder name under folder."""
    folder.mkdir(parents=True)
    if isinstance(base, OpenClipViTBackbone):
        tower = {k: v.contiguous() for k, v in base.visual.state_dict().items()}
        save_file(tower, str(folder / "visual.safetensors"))
        return "visual.safetensors"
    if isinstance(base, HFTextBackbone):
        base.model.save_pretrained(folder)
        base.tokenizer.save_pretrained(folder)
        return "."
    write_hf_vision(folder, base, base.state_dict())
    return "."


# ---- a TOML writer for the config (tomllib reads, the standard library writes none) --------


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _is_tables(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _lines(table: dict) -> list[str]:
    return [f"{_key(k)} = {_value(v)}" for k, v in table.items()]


def dump_toml(raw: dict) -> str:
    """Top-level values, then one [table] per section (tables within it inline), then the
    arrays of tables ([[tasks]])."""
    top = {k: v for k, v in raw.items() if not isinstance(v, dict) and not _is_tables(v)}
    lines = _lines(top)
    for key, value in raw.items():
        if isinstance(value, dict):
            lines += ["", f"[{_key(key)}]", *_lines(value)]
    for key, value in raw.items():
        if _is_tables(value):
            for table in value:
                lines += ["", f"[[{_key(key)}]]", *_lines(table)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
