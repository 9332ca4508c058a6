"""Run configuration: plain dataclasses loaded from TOML, validated before any work starts.

A config is a TOML file (or the name of one shipped in ``trainer/configs``). Every section maps
to one dataclass below; an unknown key is an error that lists the valid ones (mergekit-style:
fail before work, not halfway through). ``[merge.<method>]`` tables are checked against the
parameters each merge method declares in the registry.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeldir import ALL_TASKS

from .backbones import BackboneSettings, HFTextSettings, get_kind
from .errors import UserError
from .merging import METHODS, get_method
from .surgery.model import SURGERY_MODES
from .surgery.train import LOSSES, SCHEDULES

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TaskConfig:
    name: str = ""
    path: str = ""  # folder (jsonl text / class folders of images) or an .npz file
    checkpoint: str = ""  # optional: expert weights (safetensors) instead of fine-tuning here
    # optional: the task's fine-tuned expert in its library's format (a transformers
    # classifier, a sentence-transformers / HF vision folder, an open_clip state dict): a local
    # path or a Hugging Face hub id; see trainer/experts/formats
    expert: str = ""
    # the expert's head when its files hold none: a head file (safetensors weight [C, F],
    # bias [C]) or "zeroshot" (CLIP: built from the class names with the text tower)
    head: str = ""
    train_limit: int = 0  # 0 = every training row
    test_limit: int = 0  # 0 = every test row
    # optional: the task's own validation data (a jsonl / text file, an .npz with x_val and
    # y_val, a folder of class folders or of images) instead of rows held out of train
    validation: str = ""
    # optional: this task's own unlabeled pool for surgery and AdaMerging (a text/jsonl file,
    # an .npz or a folder of inputs, e.g. its deployment traffic) instead of [surgery]
    # unlabeled's; inductive: refused when it shares inputs with a scored test split
    unlabeled: str = ""


@dataclass
class FinetuneConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of steps with linear warm-up, then cosine decay
    head_lr: float = 1e-3  # the fresh linear head learns faster than the pretrained body
    seed: int = 0


@dataclass
class PretrainConfig:
    """Supervised pre-training of the base on a generic labelled corpus before the experts
    (for backbones without pretrained weights here, e.g. a small ViT on cifar10). Off when
    ``path`` is empty. The result is cached like the experts; its head is dropped."""

    name: str = "pretrain"
    path: str = ""  # a task folder or .npz, like [[tasks]] paths
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.1
    augment: bool = True  # images: random crop (4 px padding) + horizontal flip
    train_limit: int = 0
    test_limit: int = 0
    seed: int = 0


@dataclass
class MultitaskConfig:
    """The "Traditional MTL" reference row: one backbone + per-task heads fine-tuned jointly
    on every task's train split (each step: ``finetune.batch_size`` rows of every task)."""

    enabled: bool = False
    steps: int = 0  # 0 = finetune.steps (then it sees as many rows as all experts together)
    lr: float = 0.0  # 0 = finetune.lr


@dataclass
class MergeConfig:
    """``methods`` to run, in order; ``[merge.<method>]`` tables (or inline tables under
    ``[merge]``) give a method's parameters. ``params`` holds every listed method's full
    parameters after validation: the declared defaults filled in, and a ``Searched`` grid for
    each parameter to be chosen on the validation split (left out, ``"search"`` or an array)."""

    methods: list = field(default_factory=lambda: ["task_arithmetic"])
    params: dict = field(default_factory=dict)  # method -> {parameter: value}

    def hparams(self, method: str) -> dict:
        return dict(self.params.get(method, {}))


@dataclass
class ValidationConfig:
    """Rows of each task's TRAIN split held out (never fine-tuned on, never the test split)
    on which searched merge hyper-parameters are chosen; class-stratified, seeded by the
    top-level ``seed``. ``size``: "auto" (200 rows, at most a fifth of the train split), a
    number of rows, a fraction < 1 of the train split, or 0 (hold nothing out)."""

    size: Any = field(default="auto", metadata={"checked_in": "validate"})


@dataclass
class SurgeryConfig:
    modes: list = field(default_factory=lambda: ["none"])
    # merge methods to run surgery for; empty = every one of merge.methods
    methods: list = field(default_factory=list)
    rank: int = 16
    # SurgeryV2 adapters only after blocks k+1..L: blocks 1..k are shared by every task (a
    # request for all tasks computes them once). 0 = the paper's SurgeryV2, L = Surgery.
    branch_block: int = 0
    # SurgeryV2 also adapts each adapted block's attention output, before its residual add
    # (not in the paper; the same adapter form, the same label-free objective)
    attention_adapters: bool = False
    loss: str = "l1"
    iterations: int = 200
    batch_size: int = 16
    # Adam lr of the adapters, one value for every suite, chosen on validation rows: 3e-3 and
    # 1e-3 tie on the demo's and dinov2-bench's, 3e-3 is 0.5 points ahead on text-bench's
    # (within noise) and 1e-2 is 3.2 points behind on dinov2-bench's (the paper: 1e-3)
    lr: float = 3e-3
    # the lr over the iterations: "constant" (the paper's) or "cosine" (annealed to 0)
    schedule: str = "constant"
    # β of a KL term between the expert's and the surgered model's predictions through the
    # task's own head, added to the representation loss (0: the paper's objective)
    logit_weight: float = 0.0
    # what surgery and AdaMerging learn from, never labels (trainer.data.unlabeled):
    # "train" (the inductive protocol: train inputs minus validation rows and copies of test
    # inputs), "test" (the paper's transductive protocol), "task:<name>", or a file / folder
    unlabeled: str = "train"
    # rows per task: "auto" (a train pool as large as the task's test split: the transductive
    # protocol's memory and compute), "all", or a number
    unlabeled_size: Any = field(default="auto", metadata={"checked_in": "validate"})
    unlabeled_fraction: float = 1.0
    seed: int = 0


@dataclass
class EvalConfig:
    batch_size: int = 64


@dataclass
class OutputConfig:
    # "best": the merged row with the highest VALIDATION average (agreement with the experts
    # without labelled validation rows), "none" rows included; or "<method>/<surgery>"
    bundle: str = "best"


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    # the kind's own settings (``[backbone] kind = ...``; see trainer/backbones)
    backbone: BackboneSettings = field(default_factory=HFTextSettings)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    demo: dict = field(default_factory=dict)  # options of the generated demo data

    def merged_rows(self) -> list[str]:
        """``<method>/<mode>`` of every merged row the config runs, in the order it runs them."""
        surgered = self.surgery.methods or self.merge.methods
        return [
            f"{m}/{mode}"
            for m in self.merge.methods
            for mode in self.surgery.modes
            if mode == "none" or m in surgered
        ]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "backbone": self.backbone.fields()}


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise UserError(f"config section [{where}] must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            valid = ", ".join(sorted(fields))
            name = key if where == "config" else f"{where}.{key}"
            section = "the top level" if where == "config" else f"[{where}]"
            raise UserError(f"unknown config key '{name}'; valid keys of {section}: {valid}")
        f = fields[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, MergeConfig):
            value = _build_merge(value)
        elif isinstance(default, BackboneSettings):
            value = _build_backbone(value)
        elif dataclasses.is_dataclass(default):
            value = _build(type(default), value, key if where == "config" else f"{where}.{key}")
        elif key == "tasks":
            if not isinstance(value, list):
                raise UserError("config key 'tasks' must be an array of tables ([[tasks]])")
            value = [_build(TaskConfig, t, f"tasks[{i}]") for i, t in enumerate(value)]
        elif f.metadata.get("checked_in") == "validate":
            pass  # more than one type is valid: ``validate`` checks it
        else:
            value = _coerce(value, default, f"{where}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _build_backbone(data: Any) -> BackboneSettings:
    """``[backbone]``: ``kind`` (default hf_text) picks the registered kind, whose settings
    dataclass holds the other keys (an unknown kind lists the known ones)."""
    if not isinstance(data, dict):
        raise UserError(f"config section [backbone] must be a table, got {type(data).__name__}")
    kind = data.get("kind", HFTextSettings.kind)
    if not isinstance(kind, str):
        raise UserError(f"config key 'backbone.kind' must be a string, got {kind!r}")
    settings = get_kind(kind).settings
    values = {k: v for k, v in data.items() if k != "kind"}
    valid = sorted(["kind", *(f.name for f in dataclasses.fields(settings))])
    for key in values:
        if key not in valid:
            raise UserError(
                f"unknown config key 'backbone.{key}'; valid keys of [backbone] with kind "
                f"{kind}: {', '.join(valid)}"
            )
    return _build(settings, values, "backbone")


def _build_merge(data: Any) -> MergeConfig:
    """``[merge]``: ``methods`` plus one table per registered method (checked in validate)."""
    if not isinstance(data, dict):
        raise UserError(f"config section [merge] must be a table, got {type(data).__name__}")
    methods = data.get("methods", MergeConfig().methods)
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise UserError(f"config key 'merge.methods' must be an array of names, got {methods!r}")
    tables = {}
    for key, value in data.items():
        if key == "methods":
            continue
        if key not in METHODS:
            raise UserError(
                f"unknown config key 'merge.{key}'; valid: methods, or a merge method's table "
                f"[merge.<method>] with <method> one of {', '.join(sorted(METHODS))}"
            )
        if not isinstance(value, dict):
            raise UserError(f"config key 'merge.{key}' must be a table, got {value!r}")
        tables[key] = value
    # every table is checked now, including those of methods this run does not list
    params = {
        name: get_method(name).hparams(table, f"merge.{name}") for name, table in tables.items()
    }
    for method in methods:
        if method not in params:
            params[method] = get_method(method).hparams({}, f"merge.{method}")
    return MergeConfig(list(methods), params)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check a scalar against its default's type (ints are accepted where floats are)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"config key '{where}' must be true or false, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{where}' must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{where}' must be an integer, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise UserError(f"config key '{where}' must be a string, got {value!r}")
    elif isinstance(default, list) and not isinstance(value, list):
        raise UserError(f"config key '{where}' must be an array, got {value!r}")
    elif isinstance(default, dict) and not isinstance(value, dict):
        raise UserError(f"config key '{where}' must be a table, got {value!r}")
    return value


def _parse_value(text: str) -> Any:
    """Parse the value of ``--set key=value`` as TOML, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set section.key=value`` strings to the raw TOML dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects section.key=value, got '{item}'")
        key, text = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: '{part}' is not a section")
        node[parts[-1]] = _parse_value(text.strip())
    return raw


def resolve_config_path(name_or_path: str) -> Path:
    """A shipped config by name (``text-bench``) or a path to a TOML file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or os.sep in name_or_path:
        if not candidate.is_file():
            raise UserError(f"config file not found: {candidate} (expected a TOML file)")
        return candidate
    shipped = CONFIG_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    if candidate.is_file():
        return candidate
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    raise UserError(f"unknown config '{name_or_path}': not a file; shipped configs: {names}")


def load_config(name_or_path: str = "demo", overrides: list[str] | None = None) -> Config:
    path = resolve_config_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config {path} is not valid TOML: {exc}") from None
    raw = apply_overrides(raw, overrides or [])
    _inherit_seed(raw)
    raw.setdefault("name", path.stem)
    config = _build(Config, raw, "config")
    validate(config)
    return config


# sections whose own ``seed`` follows the top-level one unless they set it: a run reseeded with
# ``seed = 1`` fine-tunes other experts and trains other adapters, not only another validation
# split. The pretrained base ([pretrain]) stays: it plays the downloaded checkpoint.
SEEDED_SECTIONS = ("finetune", "surgery")


def _inherit_seed(raw: dict) -> None:
    seed = raw.get("seed", 0)
    if seed == 0:  # every section's default: nothing to copy (and configs stay byte-equal)
        return
    for section in SEEDED_SECTIONS:
        node = raw.setdefault(section, {})
        if isinstance(node, dict):
            node.setdefault("seed", seed)


def validate(config: Config) -> None:
    """Semantic checks that need no data (types were checked while building)."""
    config.backbone.check()  # the kind's own keys, checked by the kind
    if not config.tasks and not config.demo:
        raise UserError("the config lists no tasks: add [[tasks]] tables with name and path")
    names = [t.name for t in config.tasks]
    for i, task in enumerate(config.tasks):
        if not task.name:
            raise UserError(f"tasks[{i}] has no name")
        if task.name == ALL_TASKS:
            raise UserError(
                f"tasks[{i}] is named '{ALL_TASKS}', which requests every task at serving time; "
                "rename the task"
            )
        if not task.path:
            raise UserError(f"task '{task.name}' has no path (a data folder or .npz file)")
        if task.expert and task.checkpoint:
            raise UserError(
                f"task '{task.name}' names both an expert and a checkpoint; keep one of them"
            )
        if task.head and not task.expert:
            raise UserError(
                f"task '{task.name}' has a head but no expert; the head belongs to its expert"
            )
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UserError(f"task names must be unique; repeated: {', '.join(sorted(dup))}")
    for method in config.merge.methods:
        get_method(method)  # an unknown name fails here, listing the registered ones
    if config.finetune.steps < 1 or config.finetune.batch_size < 1:
        raise UserError("finetune.steps and finetune.batch_size must be >= 1")
    pre = config.pretrain
    if pre.path and (pre.steps < 1 or pre.batch_size < 1 or pre.lr <= 0):
        raise UserError("pretrain.steps and pretrain.batch_size must be >= 1 and pretrain.lr > 0")
    if config.multitask.steps < 0 or config.multitask.lr < 0:
        raise UserError("multitask.steps and multitask.lr must be >= 0 (0 = the finetune value)")
    sc = config.surgery
    for mode in sc.modes:
        if mode not in SURGERY_MODES:
            raise UserError(f"unknown surgery mode '{mode}'; valid: {', '.join(SURGERY_MODES)}")
    if sc.loss not in LOSSES:
        raise UserError(f"unknown surgery.loss '{sc.loss}'; valid: {', '.join(LOSSES)}")
    if sc.schedule not in SCHEDULES:
        raise UserError(f"unknown surgery.schedule '{sc.schedule}'; valid: {', '.join(SCHEDULES)}")
    if sc.rank < 1:
        raise UserError(f"surgery.rank must be >= 1, got {sc.rank}")
    if not sc.logit_weight >= 0:
        raise UserError(f"surgery.logit_weight must be >= 0 (0: off), got {sc.logit_weight}")
    if sc.branch_block < 0:
        raise UserError(f"surgery.branch_block must be >= 0, got {sc.branch_block}")
    if sc.attention_adapters and "surgeryv2" not in sc.modes:
        raise UserError(
            "surgery.attention_adapters adds to SurgeryV2's block adapters, but surgery.modes "
            f"{sc.modes} has no 'surgeryv2'; add it or drop attention_adapters"
        )
    _validate_unlabeled(sc.unlabeled, sc.unlabeled_size)
    if not 0.0 < sc.unlabeled_fraction <= 1.0:
        raise UserError(
            f"surgery.unlabeled_fraction must be in (0, 1], got {sc.unlabeled_fraction}"
        )
    if sc.iterations < 0 or sc.batch_size < 1 or sc.lr <= 0:
        raise UserError("surgery.iterations must be >= 0, batch_size >= 1 and lr > 0")
    unknown = [m for m in sc.methods if m not in config.merge.methods]
    if unknown:
        raise UserError(
            f"surgery.methods names {unknown[0]!r}, which is not among "
            f"merge.methods {config.merge.methods}"
        )
    if config.eval.batch_size < 1:
        raise UserError("eval.batch_size must be >= 1")
    _validate_validation_size(config.validation.size)
    _validate_bundle_choice(config)


def _validate_validation_size(size: Any) -> None:
    """``validation.size``: "auto", a row count >= 0 or a fraction in (0, 1) (whether it
    leaves train rows is checked on the data)."""
    fix = '"auto", a number of rows (0 = none) or a fraction of the train split in (0, 1)'
    if size == "auto":
        return
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise UserError(f"config key 'validation.size' must be {fix}, got {size!r}")
    if size < 0:
        raise UserError(f"config key 'validation.size' must be >= 0 ({fix}), got {size}")
    if size >= 1 and size != int(size):
        raise UserError(
            f"config key 'validation.size' = {size}: a fraction must be below 1 and a number "
            "of rows a whole number"
        )


def _validate_unlabeled(source: str, size: Any) -> None:
    """``surgery.unlabeled``: "train", "test", "task:<name>" or a path (a value that names
    neither a pool nor a path is refused here, before the data is read);
    ``surgery.unlabeled_size``: "auto", "all" or a number of rows >= 1."""
    pools = '"train" (inductive, the default), "test" (transductive), "task:<name>" or a path'
    if source in ("inductive", "transductive"):
        raise UserError(
            f"surgery.unlabeled names the pool, not the protocol: use {pools}; got '{source}'"
        )
    is_path = any(c in source for c in "/\\.{~")
    if source not in ("train", "test") and not source.startswith("task:") and not is_path:
        raise UserError(f"unknown surgery.unlabeled '{source}': use {pools} (e.g. ./{source})")
    if source.startswith("task:") and not source[5:]:
        raise UserError("surgery.unlabeled 'task:' names no task; use 'task:<name>'")
    if size in ("auto", "all"):
        return
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(
            f'surgery.unlabeled_size must be "auto" (as many rows as the task\'s test split), '
            f'"all" or a number of rows >= 1, got {size!r}'
        )


def _validate_bundle_choice(config: Config) -> None:
    """``output.bundle``: "best" or a "<method>/<surgery>" row this config actually runs."""
    choice = config.output.bundle
    if choice == "best":
        return
    rows = config.merged_rows()
    if choice not in rows:
        raise UserError(
            f"output.bundle '{choice}' is not a row this config runs; use 'best' or one of: "
            f"{', '.join(rows) or '(none: merge.methods is empty)'}"
        )
