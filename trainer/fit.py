"""``python -m trainer.fit``: experts -> merged backbone -> surgery -> evaluation -> bundle.

Reads top to bottom like a training script: load and validate everything first (so a bad
input fails before any work and nothing is half-written), then build the experts, then one row
per merge method × surgery mode, then write results.json, the table and the bundle.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .config import Config, load_config
from .errors import UserError

log = logging.getLogger("deepsurgery")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.fit", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo",
                   help="a shipped config name (demo, text-bench, vision-bench) or a TOML file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set finetune.steps=100")
    p.add_argument("--data", default=None,
                   help="root for {data} in config paths (env DEEPSURGERY_DATA, else ../shared/data)")
    p.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    p.add_argument("--cache", default=None,
                   help="cache folder for experts and targets (env DEEPSURGERY_CACHE, else runs/cache)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_libraries()
    try:
        run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written for this run", file=sys.stderr)
        return 130
    return 0


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def run(args: argparse.Namespace) -> dict:
    from .utils import resolve_device

    config: Config = load_config(args.config, args.set)
    device = resolve_device(args.device)
    data_root = Path(args.data or os.environ.get("DEEPSURGERY_DATA") or
                     Path(__file__).resolve().parents[2] / "shared" / "data")
    cache = Path(args.cache or os.environ.get("DEEPSURGERY_CACHE") or "runs/cache")
    out = Path(args.out or f"runs/{config.name}")
    return fit(config, data_root=data_root, cache=cache, out=out, device=device)


def fit(config: Config, data_root: Path, cache: Path, out: Path, device: torch.device) -> dict:
    from .backbones import build_backbone
    from .bundle import write_bundle
    from .evaluate import accuracy
    from .experts import get_expert
    from .merging import merge
    from .model import Heads, MultiTaskModel
    from .report import format_table, results_row, write_results
    from .tasks import load_tasks
    from .utils import state_fingerprint

    timing: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timing[stage] = round(timing.get(stage, 0.0) + now - clock, 2)
        clock = now

    # ---- 1. inputs: tasks and the pretrained base (all validated before any training) -------
    torch.manual_seed(config.seed)
    tasks = load_tasks(config, data_root, cache)
    base = build_backbone(config.backbone)
    for task in tasks:
        if task.modality != base.modality:
            raise UserError(f"task '{task.name}' holds {task.modality} data but the backbone "
                            f"'{config.backbone.kind}' reads {base.modality}")
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    names = [t.name for t in tasks]
    log.info("%d tasks (%s) on %s, device %s", len(tasks), ", ".join(names),
             config.backbone.kind, device)
    lap("load")

    # ---- 2. experts: checkpoints, cache, or fine-tuned here ---------------------------------
    key_parts = {"backbone": base.spec(), "weights": state_fingerprint(base_state)}
    task_cfgs = {t.name: t for t in config.tasks}
    experts = []
    for task in tasks:
        checkpoint = task_cfgs[task.name].checkpoint if task.name in task_cfgs else ""
        expert = get_expert(task, checkpoint, base, base_state, config.finetune, cache,
                            key_parts, device, base.normalize_head)
        log.info("expert %-12s %s", task.name, expert.source)
        experts.append(expert)
    lap("experts")

    heads = Heads([e.head_weight for e in experts], [e.head_bias for e in experts],
                  normalize=base.normalize_head)
    model = MultiTaskModel(base, heads, names).to(device)
    batch_size = config.eval.batch_size

    def evaluate_all(m: MultiTaskModel, label: str) -> dict[str, float]:
        return {t.name: accuracy(m, i, t.test, batch_size, device, f"{label} {t.name}")
                for i, t in enumerate(tasks)}

    # ---- 3. rows: individual experts, then every merge method × surgery mode -----------------
    rows = []
    individual = {}
    for i, (task, expert) in enumerate(zip(tasks, experts)):
        model.backbone.load_state_dict(expert.state)
        individual[task.name] = accuracy(model, i, task.test, batch_size, device,
                                         f"individual {task.name}")
    rows.append(results_row("individual", "none", individual))
    lap("eval")

    best = None
    for method in config.merge.methods:
        hparams = dict(getattr(config.merge, method))
        merged = merge(method, base_state, [e.state for e in experts], **hparams)
        lap("merge")
        model.backbone.load_state_dict(merged)
        acc = evaluate_all(model, method)
        rows.append(results_row(method, "none", acc))
        lap("eval")
        if best is None or rows[-1]["avg"] > best[0]["avg"]:
            best = (rows[-1], {k: v.detach().cpu().clone() for k, v in merged.items()}, hparams)

    # ---- 4. outputs: results.json, then the bundle of the chosen row -------------------------
    results = {
        "suite": config.name, "backbone": base.spec(), "tasks": names, "rows": rows,
        "bias": {}, "timing_s": timing, "device": str(device), "config": config.to_dict(),
    }
    if best is not None:
        row, merged, hparams = best
        model.backbone.load_state_dict(merged)
        info = {"suite": config.name, "merge": {"method": row["method"], "hparams": hparams},
                "accuracy": row}
        write_bundle(out / "bundle", model.cpu(), [t.classes for t in tasks], info)
        lap("bundle")
    results["timing_s"] = timing
    write_results(out / "results.json", results)
    print(format_table(names, rows))
    return results


if __name__ == "__main__":
    sys.exit(main())
