"""The run's tasks: the config's ``[[tasks]]``, or the generated demo suite."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import Config
from .demo import generate
from .tasks import TaskData, load_task


def demo_folder(config: Config, cache: Path) -> Path:
    """Where the generated demo tasks of ``config`` live: ``<cache>/demo-data/<key>``."""
    options = {"train": 600, "test": 300, "tasks": None, **config.demo}
    names = options.pop("tasks") or None
    key = json.dumps([config.seed, options, names], sort_keys=True).encode()
    return cache / "demo-data" / hashlib.sha256(key).hexdigest()[:16]


def load_tasks(config: Config, data_root: Path, cache: Path) -> list[TaskData]:
    if config.demo:
        options = {"train": 600, "test": 300, "tasks": None, **config.demo}
        names = options.pop("tasks") or None
        folder = demo_folder(config, cache)
        if not (folder / ".complete").is_file():
            generate(
                folder,
                seed=config.seed,
                train=options["train"],
                test=options["test"],
                **({"tasks": tuple(names)} if names else {}),
            )
            (folder / ".complete").write_text("ok\n")
        task_names = names or [p.name for p in sorted(folder.iterdir()) if p.is_dir()]
        return [load_task(n, str(folder / n), data_root) for n in task_names]
    return [load_task(t.name, t.path, data_root, t.train_limit, t.test_limit) for t in config.tasks]
