"""The experiment: everything the result rows share, built once by :func:`prepare`.

Tasks (with their validation splits) and unlabeled inputs, the base backbone, the experts and
their frozen heads, and the experts' representations (the individual row, the bias reference,
the surgery targets). From it, ``merged(method)`` gives a merged state (its searched
hyper-parameters chosen on the validation split), ``model(state, mode)`` a multi-task model that
OWNS its weights (a fresh copy of the backbone: no model ever sees another's weights, whatever
the call order), ``surgery(model)`` repairs it and ``evaluate(model)`` scores it.
``trainer.fit`` walks every merge method × surgery mode with it; the ``bench`` analyses reuse
it to try surgery variants.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones import Backbone, build_backbone
from .config import Config
from .data.suite import load_tasks
from .data.tasks import Split, TaskData
from .data.unlabeled import UnlabeledPool, unlabeled_pool
from .data.validation import ValidationSet, hold_out_validation, validation_set
from .errors import UserError
from .experts.cache import state_fingerprint
from .experts.checkpoints import StateDict
from .experts.expert import (
    Expert,
    expert_heads,
    get_expert,
    load_given_experts,
    settle_backbone,
)
from .experts.multitask import train_multitask
from .experts.pretrain import pretrain_base
from .merging import MergeContext, Searched, get_method, merge
from .merging.search import SearchResult, search
from .results.evaluate import (
    Evaluation,
    ValidationScorer,
    accuracy_from_features,
    evaluate_task,
    predictions_from_features,
)
from .results.report import search_line
from .surgery.features import Targets, final_features, representations
from .surgery.model import Heads, MultiTaskModel
from .surgery.train import SurgeryResult, train_surgery

log = logging.getLogger("deepsurgery")

# a data-driven merge's choices that results.json records (AdaMerging: the start λ, the
# iteration whose coefficients were kept and where its guard stopped)
LEARNED = ("init", "kept", "stopped")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for but CUDA is not available here; "
            "use --device cpu or --device auto"
        )
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got '{name}'")
    return torch.device(name)


@dataclass(kw_only=True)
class Experiment:
    config: Config
    device: torch.device
    cache: Path
    tasks: list[TaskData]
    base: Backbone  # holds the base weights; never loaded with anything else
    experts: list[Expert]
    heads: Heads  # the experts' frozen heads, one per task
    unlabeled: list | None  # per task: the inputs surgery / AdaMerging learn from
    pool: UnlabeledPool | None  # ... with their protocol and source (None: no pool needed)
    test_targets: list[Targets]  # the experts' representations of the test inputs
    train_targets: list[Targets]  # ... of the unlabeled inputs (surgery targets)
    individual: dict[str, float]  # each task's expert accuracy
    pretrain: dict | None = None
    timing: dict[str, float] = field(default_factory=dict)
    searches: dict[str, SearchResult] = field(default_factory=dict)  # method -> its search
    # method -> what a data-driven merge chose from the unlabeled pool (AdaMerging's start)
    learned: dict[str, dict] = field(default_factory=dict)
    _frozen: dict = field(default_factory=dict)  # Surgery's merged features per state + pool
    _scorer: ValidationScorer | None = None
    _validation: ValidationSet | None = None
    _validation_targets: list[Targets] | None = None  # the experts' on the validation inputs
    _validation_experts: Evaluation | None = None  # the experts' predictions there
    _clock: float = field(default_factory=time.perf_counter)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def base_state(self) -> StateDict:
        return self.base.state_dict()

    def lap(self, stage: str) -> None:
        """Add the time since the last lap to ``timing[stage]``."""
        now = time.perf_counter()
        self.timing[stage] = round(self.timing.get(stage, 0.0) + now - self._clock, 2)
        self._clock = now

    def backbone(self, state: StateDict) -> Backbone:
        """A new backbone module holding ``state`` (the base's architecture), on the device."""
        module = copy.deepcopy(self.base)
        module.load_state_dict(state)
        return module.to(self.device)

    def merged(self, method: str) -> tuple[StateDict, dict]:
        """The merged backbone state of ``method`` and the hyper-parameters it used: the
        config's, its searched ones chosen on the validation split (``searches[method]``)."""
        hparams = self.config.merge.hparams(method)
        context = None
        if get_method(method).needs_data:
            context = MergeContext(
                self.backbone(self.base_state),
                copy.deepcopy(self.heads),
                self.unlabeled,
                self.device,
                self.config.seed,
                names=self.names,
            )
        experts = [e.state for e in self.experts]
        if any(isinstance(v, Searched) for v in hparams.values()):
            result = search(method, self.base_state, experts, hparams, self.scorer(), context)
            self.searches[method] = result
            hparams = result.chosen
            log.info("%s", search_line(result, self.validation, self.validation_notes()))
            self.lap("search")
            state, result.state = result.state, None  # the winning merge, kept as scored
        else:
            state = merge(method, self.base_state, experts, hparams, context)
        if context is not None and method in context.extra:  # what it learned from the pool
            record = context.extra[method]
            self.learned[method] = {k: record[k] for k in LEARNED if k in record}
        return state, hparams

    @property
    def validation(self) -> ValidationSet:
        """What searched hyper-parameters are chosen on (see ``data.validation``)."""
        if self._validation is None:
            self._validation = validation_set(self.config, self.tasks, self.unlabeled)
        return self._validation

    def scorer(self) -> ValidationScorer:
        """The validation score of a merged state (built once: one backbone module, the
        inputs collated once, and for agreement the experts' predictions)."""
        if self._scorer is None:
            val = self.validation
            scorer = ValidationScorer(
                self.backbone(self.base_state),
                self.heads,
                val.inputs,
                self.device,
                self.config.eval.batch_size,
            )
            if val.criterion == "accuracy":
                scorer.targets = [torch.as_tensor(y) for y in val.labels]
            else:
                scorer.targets = [
                    scorer.predictions(expert.state, [t])[0]
                    for t, expert in enumerate(self.experts)
                ]
            self._scorer = scorer
        return self._scorer

    def validation_notes(self) -> list[str]:
        """What a reader of the chosen values must know: tasks scored without labels, and
        given experts that may have been trained on their validation rows."""
        val = self.validation
        notes = []
        unlabeled = [n for n, y in zip(self.names, val.labels) if y is None]
        if unlabeled:
            notes.append(f"no labelled validation rows: {', '.join(unlabeled)}")
        if self.seen_validation():
            notes.append(
                f"the given experts of {', '.join(self.seen_validation())} may have been "
                "trained on their validation rows"
            )
        return notes

    def seen_validation(self) -> list[str]:
        """Tasks whose expert was given (not fine-tuned here) and whose validation rows were
        held out of the train split: that expert may have been trained on them."""
        return [
            t.name
            for t, e in zip(self.tasks, self.experts)
            if t.validation_source == "train" and e.source not in ("fine-tuned", "cache")
        ]

    def validation_record(self) -> dict:
        """results.json's account of the validation data: per task its rows and where they
        come from ("train": held out of it, "file", "unlabeled": a task without validation
        rows scored on its unlabeled inputs, "none"), and the criterion of the searches."""
        if self.searches:
            val = self.validation
            rows, sources, criterion = val.rows(), val.sources, val.criterion
        else:
            rows = [0 if t.validation is None else len(t.validation) for t in self.tasks]
            sources = [t.validation_source or "none" for t in self.tasks]
            criterion = None
        return {
            "size": self.config.validation.size,
            "criterion": criterion,
            "rows": dict(zip(self.names, rows)),
            "source": dict(zip(self.names, sources)),
            "experts_may_have_seen": self.seen_validation(),
        }

    def model(
        self,
        state: StateDict,
        mode: str = "none",
        rank: int | None = None,
        branch_block: int | None = None,
        attention: bool | None = None,
    ) -> MultiTaskModel:
        """A new MultiTaskModel owning a copy of ``state``, with fresh adapters for ``mode``
        (rank, branch block and attention adapters: the config's unless given)."""
        sc = self.config.surgery
        return MultiTaskModel(
            self.backbone(state),
            copy.deepcopy(self.heads),
            self.names,
            mode,
            rank or sc.rank,
            self.config.seed,
            sc.branch_block if branch_block is None else branch_block,
            attention_adapters=sc.attention_adapters if attention is None else attention,
        ).to(self.device)

    def surgery(
        self,
        model: MultiTaskModel,
        unlabeled: list | None = None,
        targets: list[Targets] | None = None,
        callback: Callable[[int, MultiTaskModel], None] | None = None,
        **overrides,
    ) -> SurgeryResult:
        """Train ``model``'s adapters (the config's [surgery] values unless overridden)."""
        sc = self.config.surgery
        keys = ("iterations", "batch_size", "lr", "loss", "schedule", "logit_weight", "seed")
        kwargs = {k: getattr(sc, k) for k in keys}
        kwargs.update(overrides)
        pool = self.unlabeled if unlabeled is None else unlabeled
        frozen = None
        if model.mode == "surgery":  # the frozen merged backbone's output: once per state+pool
            key = (state_fingerprint(model.backbone.state_dict()), id(pool))
            if key not in self._frozen:
                feats = final_features(model.backbone, pool, self.device, self.names)
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

    def split_rows(
        self, split: str, rows: list | None = None
    ) -> list[tuple[Split, Targets | None]]:
        """Per task, the scored rows of ``split`` ("test" or "validation") and the experts'
        representations of them; ``rows[t]`` limits task t to those rows."""
        if split == "test":
            pairs = [(t.test, targets) for t, targets in zip(self.tasks, self.test_targets)]
        elif split == "validation":
            val = self.validation
            if self._validation_targets is None:
                self._validation_targets = self.expert_targets(val.inputs, "validation")
            pairs = [
                (Split(inputs, labels), targets)
                for inputs, labels, targets in zip(val.inputs, val.labels, self._validation_targets)
            ]
        else:
            raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
        if rows is not None:
            pairs = [
                (part.take(r), None if tg is None else tg.take(torch.as_tensor(r)))
                for (part, tg), r in zip(pairs, rows)
            ]
        return pairs

    def evaluate(
        self, model: MultiTaskModel, label: str, rows: list | None = None, split: str = "test"
    ) -> Evaluation:
        """``model`` scored on ``split`` ("test", or "validation": where choices are made):
        per task its predictions, accuracy (None without labels) and per-row correctness, and
        the mean bias per block; ``rows[t]`` limits task t's rows."""
        predictions, labels, per_task_bias = {}, {}, []
        for i, (part, targets) in enumerate(self.split_rows(split, rows)):
            name = self.names[i]
            predictions[name], bias = evaluate_task(
                model,
                i,
                part,
                self.config.eval.batch_size,
                self.device,
                targets,
                f"{label} {name}" if split == "test" else f"{label} {name} ({split})",
            )
            labels[name] = part.labels
            if bias is not None:
                per_task_bias.append(bias)
        mean_bias = [sum(v) / len(v) for v in zip(*per_task_bias)]
        return Evaluation.from_predictions(predictions, labels, mean_bias)

    def individual_accuracy(self, rows: list | None = None, split: str = "test") -> Evaluation:
        """Each expert on ``split`` (its cached representations + its head): the individual
        row; accuracy None for a task without labels there. Its bias is zero by definition
        and not reported ([])."""
        predictions, labels = {}, {}
        for i, (part, targets) in enumerate(self.split_rows(split, rows)):
            name = self.names[i]
            predictions[name] = predictions_from_features(self.heads, i, targets.final, self.device)
            labels[name] = part.labels
        return Evaluation.from_predictions(predictions, labels)

    def bundle_criterion(self) -> str:
        """How ``output.bundle = "best"`` picks its row: "validation" (mean accuracy over
        tasks on the validation rows), or "agreement" with the experts' predictions on the
        validation inputs when a task has no labelled validation rows (as the searches do)."""
        return "validation" if self.validation.criterion == "accuracy" else "agreement"

    def validation_score(self, model: MultiTaskModel, label: str) -> float:
        """``model``'s score under :meth:`bundle_criterion`, the mean over tasks: what the
        bundle row is chosen by (the test split is never read)."""
        scored = self.evaluate(model, label, split="validation")
        if self.bundle_criterion() == "validation":
            return scored.avg
        if self._validation_experts is None:
            self._validation_experts = self.individual_accuracy(split="validation")
        agreement = scored.agreement(self._validation_experts)
        return sum(agreement.values()) / len(agreement)

    def expert_targets(
        self, pools: list[list], desc: str, skip: dict[int, Targets] | None = None
    ) -> list[Targets]:
        """Expert t's representations of ``pools[t]`` for every task t; ``skip[t]`` supplies
        task t's ready-made targets instead."""
        out = []
        for t, expert in enumerate(self.experts):
            if skip and t in skip:
                out.append(skip[t])
                continue
            out.append(
                representations(
                    self.backbone(expert.state),
                    pools[t],
                    self.config.eval.batch_size,
                    self.device,
                    f"{desc} expert {self.names[t]}",
                )
            )
        return out

    def multitask_model(self) -> MultiTaskModel:
        """The "Traditional MTL" reference (cached like the experts) as a MultiTaskModel."""
        trained = train_multitask(
            self.base,
            self.base_state,
            self.tasks,
            finetune=self.config.finetune,
            multitask=self.config.multitask,
            cache_dir=self.cache,
            device=self.device,
        )
        log.info("multitask reference %s", trained.source)
        heads = Heads(
            [w for w, _ in trained.heads],
            [b for _, b in trained.heads],
            normalize=self.base.normalize_head,
        )
        return MultiTaskModel(self.backbone(trained.state), heads, self.names).to(self.device)


@dataclass
class Experts:
    """Steps 1-2 of :func:`prepare`: the checked inputs and every task's expert (what
    ``trainer.export_experts`` writes out, without the representations)."""

    tasks: list[TaskData]
    base: Backbone
    experts: list[Expert]
    heads: Heads
    pool: UnlabeledPool | None
    pretrain: dict | None
    timing: dict[str, float]
    clock: float


def gather_experts(
    config: Config, *, data_root: Path, cache: Path, device: torch.device
) -> Experts:
    """Inputs (all checked before any training), pre-training and the experts."""
    clock = time.perf_counter()
    timing: dict[str, float] = {}
    # ---- 1. inputs: tasks, unlabeled data, the base (all checked before any training) -------
    torch.manual_seed(config.seed)
    tasks = load_tasks(config, data_root, cache)
    sc = config.surgery
    # settings the experts' own files fix (a classifier's pooling) are read from them
    base = build_backbone(settle_backbone(config.backbone, config.tasks, data_root))
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
    if sc.branch_block > base.num_blocks:
        raise UserError(
            f"surgery.branch_block {sc.branch_block} exceeds the backbone's {base.num_blocks} "
            f"blocks; use 0..{base.num_blocks} (0 = adapters after every block)"
        )
    # every expert given as files: read and checked against the base before any training
    given = load_given_experts(
        config.tasks, tasks, base, base.state_dict(), data_root, config.backbone.path
    )
    # the validation rows leave the train splits before anything is fine-tuned on them
    hold_out_validation(config, tasks, data_root)
    wants_surgery = any(m != "none" for m in sc.modes)
    data_driven = any(get_method(m).needs_data for m in config.merge.methods)
    searching = any(
        isinstance(v, Searched)
        for m in config.merge.methods
        for v in config.merge.hparams(m).values()
    )
    for task in tasks:
        untrained = task.train is None or task.train.labels is None
        if untrained and task.name not in given:
            raise UserError(
                f"task '{task.name}' has no labelled train split to fine-tune an expert on; "
                "give it one (train.jsonl, train/ class folders, x_train + y_train) or an expert"
            )
        if untrained and config.multitask.enabled:
            raise UserError(
                f"multitask.enabled trains on every task's labelled train split and task "
                f"'{task.name}' has none; set multitask.enabled = false or add one"
            )
    # a task without validation rows has its searches (and the bundle's choice among several
    # rows) scored on its unlabeled inputs
    choosing = config.output.bundle == "best" and len(config.merged_rows()) > 1
    needs_pool = (searching or choosing) and any(t.validation is None for t in tasks)
    pool = (
        unlabeled_pool(config, tasks, data_root)
        if wants_surgery or data_driven or needs_pool
        else None
    )
    log.info(
        "%d tasks (%s) on %s, device %s",
        len(tasks),
        ", ".join(t.name for t in tasks),
        config.backbone.kind,
        device,
    )
    held = [f"{t.name} {len(t.validation)}" for t in tasks if t.validation_source == "train"]
    if held:
        log.info("validation rows held out of the train splits: %s", ", ".join(held))
    if pool is not None:
        log.info(
            "unlabeled pool: %s, %s",
            pool.describe(),
            ", ".join(f"{t.name} {len(p)}" for t, p in zip(tasks, pool.pools)),
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
    experts = []
    for task in tasks:
        expert = get_expert(
            task,
            given=given.get(task.name),
            base=base,
            base_state=base_state,
            finetune=config.finetune,
            cache_dir=cache,
            device=device,
        )
        log.info("expert %-12s %s", task.name, expert.source)
        experts.append(expert)
    timing["experts"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    heads = expert_heads(experts).to(device)
    return Experts(tasks, base, experts, heads, pool, pretrain, timing, clock)


def prepare(config: Config, *, data_root: Path, cache: Path, device: torch.device) -> Experiment:
    """Inputs (all checked before any training), pre-training, experts, and the experts'
    representations: everything the rows share."""
    gathered = gather_experts(config, data_root=data_root, cache=cache, device=device)
    tasks, base, experts, heads = gathered.tasks, gathered.base, gathered.experts, gathered.heads
    pool, sc = gathered.pool, config.surgery
    unlabeled = None if pool is None else pool.pools
    wants_surgery = any(m != "none" for m in sc.modes)

    # ---- 3. the experts' representations: the individual row, bias and surgery targets ------
    batch_size = config.eval.batch_size
    test_targets, train_targets, individual = [], [], {}
    for i, (task, expert) in enumerate(zip(tasks, experts)):
        work = copy.deepcopy(base)
        work.load_state_dict(expert.state)
        work.to(device)
        feats = representations(work, task.test.inputs, batch_size, device, f"expert {task.name}")
        test_targets.append(feats)
        individual[task.name] = accuracy_from_features(
            heads, i, feats.final, task.test.labels, device
        )
        if unlabeled is not None and wants_surgery:
            # the transductive pool, whole: the test representations are its targets
            same = sc.unlabeled == "test" and len(unlabeled[i]) == len(task.test)
            train_targets.append(
                feats
                if same
                else representations(work, unlabeled[i], batch_size, device, f"targets {task.name}")
            )
        del work
    experiment = Experiment(
        config=config,
        device=device,
        cache=cache,
        tasks=tasks,
        base=base,
        experts=experts,
        heads=heads,
        unlabeled=unlabeled,
        pool=pool,
        test_targets=test_targets,
        train_targets=train_targets,
        individual=individual,
        pretrain=gathered.pretrain,
        timing=gathered.timing,
        _clock=gathered.clock,
    )
    experiment.lap("targets")
    return experiment
