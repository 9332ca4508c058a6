"""``python -m trainer.fit``: experts -> merged backbone -> surgery -> evaluation -> bundle.

Reads top to bottom like a training script: load and validate everything first (so a bad
input fails before any work and nothing is half-written), then build the experts, then one row
per merge method × surgery mode, then write results.json, the table and the bundle.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, load_config
from .errors import UserError, run_cli

log = logging.getLogger("deepsurgery")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.fit", description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        default="demo",
        help="a shipped config name (demo, text-bench, vision-bench) or a TOML file",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set finetune.steps=100",
    )
    p.add_argument(
        "--data",
        default=None,
        help="root for {data} in config paths (env DEEPSURGERY_DATA, else ../shared/data)",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    p.add_argument(
        "--cache",
        default=None,
        help="cache folder for experts and targets (env DEEPSURGERY_CACHE, else runs/cache)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_libraries()
    return run_cli(lambda: run(args))[0]


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
    data_root = Path(
        args.data
        or os.environ.get("DEEPSURGERY_DATA")
        or Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    cache = Path(args.cache or os.environ.get("DEEPSURGERY_CACHE") or "runs/cache")
    out = Path(args.out or f"runs/{config.name}")
    return fit(config, data_root=data_root, cache=cache, out=out, device=device)


@dataclass
class Prepared:
    """Everything the rows share: tasks, experts, the frozen heads, the experts'
    representations (individual row, bias reference, surgery targets), unlabeled inputs.

    ``trainer.fit`` builds it once; the ``bench`` analyses reuse it to try surgery variants.
    """

    config: Config
    device: torch.device
    tasks: list
    names: list[str]
    base_state: dict
    experts: list
    plain: object  # MultiTaskModel (mode "none") whose backbone is loaded per row
    unlabeled: list | None
    test_targets: list
    train_targets: list
    individual: dict
    pretrain: dict | None
    timing: dict = field(default_factory=dict)
    _frozen: dict = field(default_factory=dict)  # Surgery: merged features per state and pool
    _clock: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timing[stage] = round(self.timing.get(stage, 0.0) + now - self._clock, 2)
        self._clock = now

    def merged(self, method: str) -> tuple[dict, dict]:
        """The merged backbone state of ``method`` with the config's hyper-parameters."""
        from .adamerging import MergeContext
        from .merging import DATA_DRIVEN, merge

        hparams = dict(getattr(self.config.merge, method))
        extra = {}
        if method in DATA_DRIVEN:
            self.plain.backbone.load_state_dict(self.base_state)
            extra["context"] = MergeContext(
                self.plain.backbone,
                self.plain.heads,
                self.unlabeled,
                self.device,
                self.config.seed,
            )
        state = merge(method, self.base_state, [e.state for e in self.experts], **hparams, **extra)
        return state, hparams

    def model(self, state: dict, mode: str = "none", rank: int | None = None):
        """A fresh MultiTaskModel on ``state`` with untrained adapters for ``mode``."""
        from .model import MultiTaskModel

        self.plain.backbone.load_state_dict(state)
        return MultiTaskModel(
            self.plain.backbone,
            self.plain.heads,
            self.names,
            mode,
            rank or self.config.surgery.rank,
            self.config.seed,
        ).to(self.device)

    def surgery(self, model, unlabeled=None, targets=None, callback=None, **overrides):
        """Train ``model``'s adapters (config.surgery values unless overridden)."""
        from .surgery import representations, train_surgery
        from .utils import state_fingerprint

        sc = self.config.surgery
        kwargs = {k: getattr(sc, k) for k in ("iterations", "batch_size", "lr", "loss", "seed")}
        kwargs.update(overrides)
        pool = self.unlabeled if unlabeled is None else unlabeled
        frozen = None
        if model.mode == "surgery":  # the frozen merged backbone's output: once per state+pool
            key = (state_fingerprint(model.backbone.state_dict()), id(pool))
            if key not in self._frozen:
                feats = [
                    representations(
                        model.backbone, p, 64, self.device, f"merged features {n}"
                    ).final
                    for p, n in zip(pool, self.names)
                ]
                self._frozen[key] = (pool, feats)  # holding pool keeps its id() unique
            frozen = self._frozen[key][1]
        return train_surgery(
            model,
            pool,
            self.train_targets if targets is None else targets,
            device=self.device,
            callback=callback,
            frozen_final=frozen,
            **kwargs,
        )

    def evaluate(self, model, label: str, rows: list | None = None) -> tuple[dict, list]:
        """Per-task accuracy and mean bias per block; ``rows[t]`` limits task t's test rows."""
        from .evaluate import evaluate_task

        acc, per_task_bias = {}, []
        for i, task in enumerate(self.tasks):
            split, targets = task.test, self.test_targets[i]
            if rows is not None:
                index = torch.as_tensor(rows[i])
                split, targets = split.take(rows[i]), targets.take(index)
            acc[task.name], b = evaluate_task(
                model,
                i,
                split,
                self.config.eval.batch_size,
                self.device,
                targets,
                f"{label} {task.name}",
            )
            per_task_bias.append(b)
        return acc, [sum(v) / len(v) for v in zip(*per_task_bias)]


def prepare(config: Config, data_root: Path, cache: Path, device: torch.device) -> Prepared:
    """Stages 1-3: inputs (all checked before any training), pre-training, experts, and the
    experts' representations."""
    from .backbones import build_backbone
    from .evaluate import accuracy_from_features
    from .experts import get_expert
    from .merging import DATA_DRIVEN
    from .model import Heads, MultiTaskModel
    from .pretrain import pretrain_base
    from .surgery import representations
    from .tasks import load_tasks, unlabeled_inputs
    from .utils import state_fingerprint

    clock = time.perf_counter()
    timing: dict[str, float] = {}
    # ---- 1. inputs: tasks, unlabeled data, the base (all checked before any training) -------
    torch.manual_seed(config.seed)
    tasks = load_tasks(config, data_root, cache)
    names = [t.name for t in tasks]
    sc = config.surgery
    needs_unlabeled = any(m != "none" for m in sc.modes) or DATA_DRIVEN & set(config.merge.methods)
    unlabeled = unlabeled_inputs(config, tasks, data_root) if needs_unlabeled else None
    base = build_backbone(config.backbone)
    for task in tasks:
        if task.modality != base.modality:
            raise UserError(
                f"task '{task.name}' holds {task.modality} data but the backbone "
                f"'{config.backbone.kind}' reads {base.modality}"
            )
    if sc.rank > min(base.width, base.feature_dim):
        raise UserError(
            f"surgery.rank {sc.rank} exceeds the backbone width "
            f"{min(base.width, base.feature_dim)}; use a rank in 1..{base.width}"
        )
    log.info(
        "%d tasks (%s) on %s, device %s", len(tasks), ", ".join(names), config.backbone.kind, device
    )
    timing["load"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()

    # ---- 2. the base (pre-trained here when configured) and the experts ---------------------
    pretrain = None
    if config.pretrain.path:
        pretrain = pretrain_base(base, config.pretrain, data_root, cache, device)
        timing["pretrain"] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    key_parts = {"backbone": base.spec(), "weights": state_fingerprint(base_state)}
    checkpoints = {t.name: t.checkpoint for t in config.tasks}
    experts = []
    for task in tasks:
        expert = get_expert(
            task,
            checkpoints.get(task.name, ""),
            base,
            base_state,
            config.finetune,
            cache,
            key_parts,
            device,
            base.normalize_head,
        )
        log.info("expert %-12s %s", task.name, expert.source)
        experts.append(expert)
    timing["experts"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    heads = Heads(
        [e.head_weight for e in experts],
        [e.head_bias for e in experts],
        normalize=base.normalize_head,
    )
    plain = MultiTaskModel(base, heads, names).to(device)
    batch_size = config.eval.batch_size

    # ---- 3. the experts' representations: the individual row, bias and surgery targets ------
    test_targets, train_targets, individual = [], [], {}
    for i, (task, expert) in enumerate(zip(tasks, experts)):
        plain.backbone.load_state_dict(expert.state)
        feats = representations(
            plain.backbone, task.test.inputs, batch_size, device, f"expert {task.name}"
        )
        test_targets.append(feats)
        individual[task.name] = accuracy_from_features(
            plain, i, feats.final, task.test.labels, device
        )
        if unlabeled is not None and any(m != "none" for m in sc.modes):
            same = sc.unlabeled == "test" and sc.unlabeled_fraction == 1.0
            train_targets.append(
                feats
                if same
                else representations(
                    plain.backbone, unlabeled[i], batch_size, device, f"targets {task.name}"
                )
            )
    prepared = Prepared(
        config,
        device,
        tasks,
        names,
        base_state,
        experts,
        plain,
        unlabeled,
        test_targets,
        train_targets,
        individual,
        pretrain,
        timing,
        _clock=clock,
    )
    prepared.lap("targets")
    return prepared


def multitask_row(prep: Prepared, cache: Path) -> dict:
    """The "Traditional MTL" reference: one backbone + heads trained on all tasks jointly."""
    from .experts import CACHE_VERSION, HEAD_SCALE, cached_training, train_classifier
    from .model import Heads, MultiTaskModel
    from .report import results_row
    from .utils import fingerprint, state_fingerprint

    cfg = dataclasses.replace(
        prep.config.finetune,
        steps=prep.config.multitask.steps or prep.config.finetune.steps,
        lr=prep.config.multitask.lr or prep.config.finetune.lr,
    )
    base = prep.plain.backbone
    base.load_state_dict(prep.base_state)
    key = fingerprint(
        CACHE_VERSION,
        "multitask",
        base.spec(),
        state_fingerprint(prep.base_state),
        [t.fingerprint for t in prep.tasks],
        cfg.__dict__,
        HEAD_SCALE if base.normalize_head else None,
    )
    trained = cached_training(
        "multitask",
        "-".join(prep.names)[:60],
        key,
        cache,
        prep.base_state,
        lambda: train_classifier(
            base, prep.tasks, cfg, prep.device, base.normalize_head, desc="fine-tune multitask"
        ),
    )
    log.info("multitask reference %s", trained.source)
    heads = Heads(
        [w for w, _ in trained.heads], [b for _, b in trained.heads], normalize=base.normalize_head
    )
    base.load_state_dict(trained.state)
    model = MultiTaskModel(base, heads, prep.names).to(prep.device)
    acc, _ = prep.evaluate(model, "multitask")
    return results_row("multitask", "none", acc)


def fit(config: Config, data_root: Path, cache: Path, out: Path, device: torch.device) -> dict:
    from .bundle import write_bundle
    from .report import format_table, plot_bias, results_row, write_results

    prep = prepare(config, data_root, cache, device)
    sc = config.surgery
    rows = [results_row("individual", "none", prep.individual)]
    if config.multitask.enabled:
        rows.append(multitask_row(prep, cache))
        prep.lap("multitask")

    # ---- 4. every merge method × surgery mode -------------------------------------------------
    bias: dict[str, list[float]] = {}
    surgery_stats: dict[str, dict] = {}
    best = None
    surgery_methods = sc.methods or config.merge.methods
    for method in config.merge.methods:
        merged, hparams = prep.merged(method)
        prep.lap("merge")
        for mode in sc.modes:
            if mode != "none" and method not in surgery_methods:
                continue
            model = prep.model(merged, mode)
            if mode != "none":
                result = prep.surgery(model)
                surgery_stats[f"{method}/{mode}"] = {
                    "seconds_per_iteration": round(result.seconds_per_iteration, 4),
                    "loss_first": result.losses[0] if result.losses else None,
                    "loss_last": result.losses[-1] if result.losses else None,
                }
                prep.lap("surgery")
            acc, bias[f"{method}/{mode}"] = prep.evaluate(model, f"{method}/{mode}")
            rows.append(results_row(method, mode, acc))
            prep.lap("eval")
            if _chosen(config.output.bundle, rows[-1], best):
                best = (rows[-1], model, hparams)
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    # ---- 5. outputs: results.json, the bias plot, the bundle ---------------------------------
    timing = prep.timing
    results = {
        "suite": config.name,
        "backbone": prep.plain.backbone.spec(),
        "pretrain": prep.pretrain,
        "tasks": prep.names,
        "rows": rows,
        "bias": bias,
        "surgery": surgery_stats,
        "timing_s": timing,
        "device": str(device),
        "config": config.to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_bias(out / "bias.png", bias, config.name)
    if best is not None:
        row, model, hparams = best
        model.load_state_dict(best_state)
        info = {
            "suite": config.name,
            "merge": {"method": row["method"], "hparams": hparams},
            "accuracy": row,
        }
        write_bundle(out / "bundle", model.cpu(), [t.classes for t in prep.tasks], info)
        prep.lap("bundle")
    results["timing_s"] = timing
    write_results(out / "results.json", results)
    print(format_table(prep.names, rows))
    print(
        f"{config.name}: best merged row {best[0]['method']}/{best[0]['surgery']} "
        f"avg {100 * best[0]['avg']:.1f} vs individual {100 * rows[0]['avg']:.1f}; "
        f"{sum(timing.values()):.0f} s on {device}"
        if best
        else "no merged rows"
    )
    return results


def _chosen(choice: str, row: dict, best) -> bool:
    """Is ``row`` the one the bundle should hold? ``best`` = highest average merged row."""
    if choice == "best":
        return best is None or row["avg"] > best[0]["avg"]
    return choice == f"{row['method']}/{row['surgery']}"


if __name__ == "__main__":
    sys.exit(main())
