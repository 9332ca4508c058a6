"""Plumbing shared by the paper's analyses (``bench.surgery_iterations``, ``bench.rank_sweep``,
``bench.unlabeled_fraction``, ``bench.wild_data``).

Each analysis builds the trainer's ``Experiment`` once (tasks, cached experts, heads and the
experts' representations), merges with task arithmetic, then varies one thing about surgery.

Two splits, two jobs. A setting is CHOSEN on the validation rows (held out of each task's
train split; ``Analysis.validate``: accuracy, or agreement with the experts where a task has
no labelled validation rows), never on test. Test numbers (``Analysis.test``) are what a
choice is reported with: every test evaluation in a run scores the same seeded subset of
``--eval-limit`` test rows per task, the reference rows (task arithmetic without surgery, the
individual experts) included, so they can be compared row for row (paired tests, gap closure
with a paired-bootstrap interval) and each carries its 95 % interval (``ci95``). Each
row's per-row correctness is kept in ``<out>/<name>.correct.npz`` and the scored rows' hash
in the JSON's ``test_rows``, so ``python -m bench.pair_runs`` can pair two runs later.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import RESULTS, write_result
from trainer.backbones import build_backbone
from trainer.config import load_config as load_trainer_config
from trainer.errors import UserError, run_cli
from trainer.pipeline import prepare, resolve_device
from trainer.progress import quiet_libraries
from trainer.results import stats
from trainer.results.evaluate import Evaluation
from trainer.results.predictions import test_rows_record, write_correct
from trainer.results.report import save_plot

METHOD = "task_arithmetic"  # the merge every analysis repairs, as in the paper's figures
MODE_LABELS = {"none": "no surgery", "surgery": "Surgery", "surgeryv2": "SurgeryV2"}


def parser(prog: str, doc: str, iterations: bool = True) -> argparse.ArgumentParser:
    """The options every analysis shares; ``iterations`` adds ``--iterations``."""
    p = argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        default="text-bench",
        help="a shipped config name (text-bench, vision-bench, demo) or a TOML file",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set surgery.batch_size=8",
    )
    p.add_argument(
        "--data",
        default=None,
        help="root for {data} in config paths (env DEEPSURGERY_DATA, else ../shared/data)",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="cache folder for experts (env DEEPSURGERY_CACHE, else runs/cache)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument(
        "--eval-limit",
        type=int,
        default=500,
        metavar="N",
        help="score every row on the same seeded N test rows per task (0 = full test split)",
    )
    if iterations:
        p.add_argument(
            "--iterations",
            type=int,
            default=None,
            help="surgery iterations per run (default: the config's surgery.iterations)",
        )
    p.add_argument("--out", default=str(RESULTS), help="folder for <name>.json and <name>.png")
    return p


def run_main(p: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict], argv) -> int:
    """Parse, quieten the libraries, run; a ``UserError`` is one line and exit code 2."""
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    return run_cli(lambda: run(args))[0]


def parse_list(text: str, kind: type, flag: str) -> list:
    """``"4,8,16"`` -> ``[4, 8, 16]``; a bad item is a one-line error naming ``flag``."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise UserError(
            f"{flag} expects comma-separated {kind.__name__} values, got '{text}'"
        ) from None


def load_config(args: argparse.Namespace):
    """The config with every surgery mode on, so ``prepare`` computes the unlabeled inputs
    and the experts' targets whatever the config's own rows were."""
    config = load_trainer_config(args.config, args.set)
    config.surgery.modes = ["none", "surgery", "surgeryv2"]
    if args.eval_limit < 0:
        raise UserError(f"--eval-limit must be >= 0 (0 = full test split), got {args.eval_limit}")
    if getattr(args, "iterations", None) is not None and args.iterations < 1:
        raise UserError(f"--iterations must be >= 1, got {args.iterations}")
    return config


def data_root(args: argparse.Namespace) -> Path:
    """``--data``, else env DEEPSURGERY_DATA, else ../shared/data (as ``trainer.fit``)."""
    return Path(
        args.data
        or os.environ.get("DEEPSURGERY_DATA")
        or Path(__file__).resolve().parents[2] / "shared" / "data"
    )


def check_ranks(config, ranks: list[int], flag: str = "--ranks") -> None:
    """Every rank must fit the backbone (checked before any expert is built or loaded)."""
    base = build_backbone(config.backbone)
    width = min(base.width, base.feature_dim)
    for rank in ranks:
        if not 1 <= rank <= width:
            raise UserError(
                f"{flag}: rank {rank} does not fit the backbone width {width}; "
                f"use ranks in 1..{width}"
            )


class Analysis:
    """One analysis run: the prepared experts, the eval subset, the references (on test and
    on validation), the outputs."""

    def __init__(self, name: str, args: argparse.Namespace, config):
        self.name, self.args, self.config = name, args, config
        self.started = time.perf_counter()
        self.device = resolve_device(args.device)
        cache = Path(args.cache or os.environ.get("DEEPSURGERY_CACHE") or "runs/cache")
        self.out = Path(args.out)
        self.experiment = prepare(
            config, data_root=data_root(args), cache=cache, device=self.device
        )
        self.names = self.experiment.names
        self.eval_rows = self._eval_rows(args.eval_limit)
        self.merged_state, self.hparams = self.experiment.merged(METHOD)
        # what a choice is made by: "validation" (accuracy) or "agreement" with the experts
        self.criterion = self.experiment.bundle_criterion()
        self.correct: dict[str, stats.Correct] = {}  # test row label -> per-row correctness
        self._validation_experts: Evaluation | None = None
        merged = self.experiment.model(self.merged_state)
        self.individual = self._individual()
        self.merged = self.test(merged, METHOD)
        self.validation_reference = {
            "individual": row(self._validate_experts()),
            METHOD: self.validate(merged, METHOD),
        }

    @property
    def iterations(self) -> int:
        return getattr(self.args, "iterations", None) or self.config.surgery.iterations

    def _eval_rows(self, limit: int) -> list[np.ndarray] | None:
        """A fixed seeded subset of ``limit`` test rows per task (all rows when 0)."""
        if limit == 0:
            return None
        rng = np.random.default_rng(self.config.seed)
        rows = []
        for task in self.experiment.tasks:
            n = len(task.test)
            rows.append(np.sort(rng.choice(n, limit, replace=False)) if limit < n else np.arange(n))
        return rows

    def test_rows_text(self) -> str:
        """How many test rows a test figure is on: "all 7000 test rows" or "1240 test rows
        (at most 500 per task)"."""
        sizes = [
            len(t.test) if self.eval_rows is None else len(self.eval_rows[i])
            for i, t in enumerate(self.experiment.tasks)
        ]
        if self.eval_rows is None:
            return f"all {sum(sizes)} test rows"
        return f"{sum(sizes)} test rows (at most {self.args.eval_limit} per task)"

    def _individual(self) -> dict:
        """The experts' test row on the eval subset, from their cached representations."""
        evaluation = self.experiment.individual_accuracy(self.eval_rows)
        self.correct["individual"] = evaluation.correct
        return scored_row(evaluation)

    def test(self, model, label: str) -> dict:
        """``{"acc", "avg", "ci95"}`` on the eval subset of the TEST split; the per-row
        correctness is kept under ``label`` for :meth:`gap_closure` and :meth:`compare`.
        Report a choice with it; never make one with it."""
        evaluation = self.experiment.evaluate(model, label, self.eval_rows)
        self.correct[label] = evaluation.correct
        return scored_row(evaluation)

    def validate(self, model, label: str) -> dict:
        """``{"acc": {task: score}, "avg": mean}`` on the validation rows: accuracy, or (the
        criterion "agreement") the share of rows predicted as the task's expert predicts
        them. What every choice between settings is made by."""
        evaluation = self.experiment.evaluate(model, label, split="validation")
        if self.criterion == "validation":
            return row(evaluation.acc)
        if self._validation_experts is None:
            self._validation_experts = self.experiment.individual_accuracy(split="validation")
        return row(evaluation.agreement(self._validation_experts))

    def _validate_experts(self) -> dict[str, float]:
        """The experts' own validation score: their accuracy, or 1 (they agree with
        themselves)."""
        if self.criterion != "validation":
            return {n: 1.0 for n in self.names}
        return self.experiment.individual_accuracy(split="validation").acc

    def validation_gap_closure(self, avg: float) -> float | None:
        """``(avg − merged) / (individual − merged)`` on validation (None without a gap)."""
        ref = self.validation_reference
        gap = ref["individual"]["avg"] - ref[METHOD]["avg"]
        return (avg - ref[METHOD]["avg"]) / gap if gap > 0 else None

    def gap_closure(self, label: str) -> dict:
        """Test row ``label``'s gap closure with its 95 % paired-bootstrap interval."""
        return stats.gap_closure(
            self.correct[label],
            self.correct[METHOD],
            self.correct["individual"],
            self.config.seed,
        ).to_json()

    def compare(self, a: str, b: str) -> dict:
        """Test rows ``a`` vs ``b`` on the same rows: the paired test and its verdict."""
        return stats.compare(self.correct[a], self.correct[b], a, b).to_json()

    def surgery(self, mode: str, rank: int | None = None, attention: bool | None = None, **kwargs):
        """A fresh model on the merged backbone with ``mode`` adapters (``attention``: with
        attention adapters, else the config's choice), trained; -> (model, SurgeryResult).
        ``kwargs`` go to ``Experiment.surgery`` (unlabeled, targets, callback, iterations,
        ...); iterations default to ``--iterations`` or the config's."""
        model = self.experiment.model(self.merged_state, mode, rank, attention=attention)
        kwargs.setdefault("iterations", self.iterations)
        return model, self.experiment.surgery(model, **kwargs)

    def expert_targets(self, pool: list, desc: str, skip: dict | None = None) -> list:
        """Every expert's representations (``Targets``) of the same inputs ``pool``;
        ``skip[t]`` supplies task t's ready-made targets instead of recomputing them."""
        return self.experiment.expert_targets([pool] * len(self.names), desc, skip)

    def result(self, **fields) -> dict:
        """The JSON fields every analysis records, then its own ``fields``."""
        sc = self.config.surgery
        return {
            "bench": self.name,
            "config": self.config.name,
            "tasks": self.names,
            "device": str(self.device),
            "merge": {"method": METHOD, "hparams": self.hparams},
            "rank": sc.rank,
            "iterations": self.iterations,
            "surgery": {
                k: getattr(sc, k)
                for k in (
                    "batch_size",
                    "lr",
                    "loss",
                    "schedule",
                    "logit_weight",
                    "attention_adapters",
                    "seed",
                )
            },
            "unlabeled": sc.unlabeled,
            "chosen_on": self.criterion,
            "validation": {
                "criterion": self.criterion,
                "rows": dict(zip(self.names, self.experiment.validation.rows())),
                "reference": self.validation_reference,
            },
            "eval_limit": self.args.eval_limit,
            "eval_rows": {
                t.name: len(t.test) if self.eval_rows is None else len(self.eval_rows[i])
                for i, t in enumerate(self.experiment.tasks)
            },
            "reference": {"individual": self.individual, METHOD: self.merged},
            # what `python -m bench.pair_runs` pairs two analyses (or an analysis and a
            # trainer.fit run) on: the scored test rows' hash and each row's correctness
            "test_rows": test_rows_record(self.experiment.tasks, self.eval_rows),
            "correct_file": self.correct_file.name,
            **fields,
            "prepare_s": self.experiment.timing,
            "total_seconds": round(time.perf_counter() - self.started, 1),
        }

    @property
    def correct_file(self) -> Path:
        return self.out / f"{self.name}.correct.npz"

    def write(self, data: dict, draw: Callable) -> tuple[Path, Path]:
        """``<out>/<name>.json``, ``<out>/<name>.png`` (``draw(ax)`` fills the axes) and
        ``<out>/<name>.correct.npz``: every scored test row's per-row correctness, by label."""
        png = self.out / f"{self.name}.png"
        self.out.mkdir(parents=True, exist_ok=True)
        save_plot(png, draw)
        write_correct(self.correct_file, self.correct)
        return write_result(self.name, data, self.out), png

    def references(self, ax) -> None:
        """The merged (no surgery) and individual averages as horizontal lines."""
        ax.axhline(100 * self.merged["avg"], color="grey", ls="--", label=f"{METHOD} (no surgery)")
        ax.axhline(100 * self.individual["avg"], color="black", ls=":", label="individual experts")

    def title(self, what: str) -> str:
        return f"{self.config.name}: {what} ({METHOD}, eval {self.args.eval_limit or 'all'}/task)"

    def reference_text(self) -> str:
        return (
            f"{METHOD} {pct(self.merged['avg'])}, individual {pct(self.individual['avg'])}; "
            f"{time.perf_counter() - self.started:.0f} s on {self.device}"
        )


def row(acc: dict[str, float], **extra) -> dict:
    return {"acc": acc, "avg": sum(acc.values()) / len(acc), **extra}


def scored_row(evaluation: Evaluation, **extra) -> dict:
    """A test row: accuracies, their average and each one's 95 % interval (``ci95``)."""
    return {
        "acc": evaluation.acc,
        "avg": evaluation.avg,
        "ci95": stats.ci95(evaluation.correct),
        **extra,
    }


def pm(entry: dict, key: str = "avg") -> str:
    """``89.0±0.7``: a test accuracy and the larger side of its 95 % interval, in points."""
    value = entry["avg"] if key == "avg" else entry["acc"][key]
    ci = entry.get("ci95", {}).get(key)
    if value is None or ci is None:
        return pct(value)
    return f"{100 * value:.1f}±{100 * max(value - ci[0], ci[1] - value):.1f}"


def closure_text(closure: dict | None) -> str:
    """``96 % [91, 101]``: gap closure and its 95 % interval ('n/a' without a gap)."""
    if closure is None or closure["value"] is None:
        return "n/a"
    ci = closure["ci95"]
    return f"{100 * closure['value']:.0f} %" + (
        "" if ci is None else f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
    )


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def subset(n: int, keep: int, seed: int) -> np.ndarray:
    """A seeded, sorted choice of ``keep`` of ``n`` rows (all of them when keep >= n)."""
    if keep >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, keep, replace=False))
