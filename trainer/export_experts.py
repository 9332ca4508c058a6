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
import json
import logging
import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

from modeldir import atomic_directory

from .backbones import Backbone
from .config import apply_overrides, load_config, resolve_config_path
from .data.suite import demo_folder
from .data.tasks import TaskData
from .errors import run_cli
from .experts.expert import Expert
from .pipeline import gather_experts, resolve_device
from .progress import quiet_libraries

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


# ---- writers: each backbone kind writes its experts in its library's format ---------------


def write_expert(folder: Path, base: Backbone, expert: Expert, classes: list[str]) -> dict:
    """Write ``expert`` under ``folder`` (the base's kind decides the format) -> the
    [[tasks]] keys pointing at it, relative to the task's folder (``expert``, and ``head``
    when the expert's files hold none)."""
    folder.mkdir(parents=True)
    return base.write_expert(folder, expert, classes)


def write_base(folder: Path, base: Backbone) -> str:
    """A base pre-trained here, in its kind's format -> the file or folder name under folder."""
    folder.mkdir(parents=True)
    return base.write_base(folder)


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
