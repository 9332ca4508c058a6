"""python -m export.onnx: a trainer bundle -> ONE fused multi-task ONNX graph, verified.

    python -m export.onnx --tasks all|name,name [--bundle DIR] [--out DIR]
                          [--precision fp32|fp16|int8] [--adapter-form auto|masked|gather]
                          [--per-task] [--opset N] [--force] [--target modeldir|triton]
                          [--name NAME] [--max-batch N] [--max-queue N] [--max-delay-ms MS]

The graph is traced from the trainer's own ``MultiTaskModel.forward`` (shared merged backbone,
each row's task adapters, each row's task head), so the served model is the measured one. It
takes the N distinct inputs of a batch once, plus per output row ``input_index`` and
``task_ids``: everything before the first task-specific operation runs once per distinct
input (the whole backbone for ``none``/``surgery`` bundles, blocks 1..k for SurgeryV2 with
branch block k), then the rows fan out. ``--adapter-form auto`` exports both adapter forms
(masked-dense, per-row gather), times them in onnxruntime on the held-out batches and keeps
the faster; the manifest records the choice and the timings. ``--precision int8``: dynamic
int8 quantization of the backbone's linear layers (adapters and heads stay fp32).
Before anything is kept, the graph is checked, loaded in onnxruntime (CPU provider) and compared
with PyTorch on held-out batches of distinct and repeated inputs of every task; the export
fails, leaving nothing in ``--out``, if fp32 parity is worse than 1e-4 max |Δlogit| or any
top-1 differs (fp16: top-1 >= 99.5%, int8: top-1 >= 95%). The held-out inputs are
synthesized, plus the bundle's seeded sample of real inputs when it has one; int8 is judged on
the real ones (synthesized text is out of distribution: its near-tie logits flip under any
quantization), and both kinds' records are kept.
The verified graph is then handed to the ``--target``'s writer (``export/targets``): the
model directory (model.onnx, manifest.json, tokenizer.json for text: the contract the runtime
reads) by default, or a Triton model repository (``--name``, ``--max-batch``, ``--max-queue``,
``--max-delay-ms`` shape its config.pbtxt). Either is written to a temporary sibling and
renamed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from modeldir import (
    FORMAT_VERSION,
    INPUT_INDEX,
    MANIFEST,
    PARITY_BARS,
    PRECISIONS,
    TASK_IDS,
    graph_inputs,
    sha256_file,
    task_entries,
)
from trainer.errors import UserError, run_cli
from trainer.results.bundle import load_bundle, read_samples
from trainer.surgery.adapters import ADAPTER_FORMS
from trainer.surgery.model import PAD_LOGIT, MultiTaskModel

from .graph import (
    DEFAULT_OPSET,
    FusedGraph,
    SingleTaskGraph,
    check_graph,
    convert_to_fp16,
    convert_to_int8,
    cpu_session,
    export_graph,
    input_names,
)
from .parity import HeldOutBatch, batches, compare, describe, held_out_inputs
from .targets import TARGETS, VerifiedExport, get_target

ROWS_PER_TASK = 8
OPSETS = range(17, 24)
FORM_CHOICES = ("auto", *ADAPTER_FORMS)
FORM_ROUNDS = 5  # interleaved timing rounds per adapter form (--adapter-form auto)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="all", help="'all' or a comma-separated list of task names")
    p.add_argument("--bundle", type=Path, help="bundle dir (default: newest runs/*/bundle)")
    p.add_argument("--out", type=Path, help="output dir (default: <run>/onnx beside the bundle)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument(
        "--adapter-form",
        choices=FORM_CHOICES,
        default="auto",
        help="adapters as masked-dense or per-row gather; auto: the faster in onnxruntime",
    )
    p.add_argument(
        "--per-task",
        action="store_true",
        help="also write one graph per task without the task_ids input",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--target",
        default="modeldir",
        help="what to write: "
        + "; ".join(f"{t.name}: {t.help}" for t in sorted(TARGETS.values(), key=lambda t: t.name)),
    )
    p.add_argument("--name", default="deepsurgery", help="triton: the model's name")
    p.add_argument("--max-batch", type=int, default=32, help="triton: max_batch_size")
    p.add_argument(
        "--max-queue", type=int, default=256, help="triton: requests queued before rejecting"
    )
    p.add_argument(
        "--max-delay-ms", type=float, default=5.0, help="triton: dynamic batching's queue delay"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    code, result = run_cli(
        lambda: export(
            args.bundle,
            args.out,
            args.tasks,
            args.precision,
            args.per_task,
            args.opset,
            args.force,
            args.adapter_form,
            args.target,
            {
                "name": args.name,
                "max_batch": args.max_batch,
                "max_queue": args.max_queue,
                "max_delay_ms": args.max_delay_ms,
            },
        )
    )
    if code:
        return code
    manifest, graph = result
    parity, form = manifest["parity"], manifest["adapter_form"]
    timings = ", ".join(f"{k} {v:.1f} ms" for k, v in (form.get("timings_ms") or {}).items())
    print(
        f"wrote {graph} ({manifest['precision']}, opset {manifest['opset']}, "
        f"{len(manifest['tasks'])} tasks, adapters {form['form']}"
        f"{f' ({timings})' if timings else ''}): parity on {parity['rows']} held-out rows "
        f"({parity['distinct_inputs']} distinct inputs, {parity['judged_on']}): "
        f"max |Δlogit| {parity['max_abs_logit_diff']:.2e}, "
        f"top-1 agreement {parity['top1_agreement']:.2%}"
    )
    return 0


# ---------------------------------------------------------------- selection


def latest_bundle(runs: Path = Path("runs")) -> Path:
    """The most recent run's bundle: the newest runs/*/bundle/manifest.json."""
    found = sorted(runs.glob("*/bundle/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(
            f"no bundle found under {runs}/*/bundle; run python -m trainer.fit first "
            "or pass --bundle DIR"
        )
    return found[-1].parent


def select_tasks(model: MultiTaskModel, tasks: str) -> list[int]:
    """'all' or 'a,b' -> indices into the bundle's tasks, in the order asked."""
    known = model.task_names
    if tasks.strip() == "all":
        return list(range(len(known)))
    names = [n.strip() for n in tasks.split(",") if n.strip()]
    if not names:
        raise UserError(f"--tasks is empty; use 'all' or some of: {', '.join(known)}")
    for name in names:
        if name not in known:
            raise UserError(f"unknown task '{name}'; the bundle's tasks are: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise UserError(f"--tasks names a task twice: {tasks}")
    return [known.index(n) for n in names]


def task_subset(
    model: MultiTaskModel, indices: list[int], adapter_form: str | None = None
) -> MultiTaskModel:
    """The same model restricted to ``indices`` (renumbered 0..k-1): shared backbone module,
    those tasks' heads and adapter slices, the same branch block and adapter form (or
    ``adapter_form``). C_max shrinks to the largest kept task."""
    subset = MultiTaskModel(
        model.backbone,
        model.heads.subset(indices),
        [model.task_names[t] for t in indices],
        mode=model.mode,
        rank=model.rank,
        branch_block=model.branch_block,
        adapter_form=adapter_form or adapter_form_of(model) or "masked",
        attention_adapters=model.attention_adapters is not None,
    )
    with torch.no_grad():
        for name in ("block_adapters", "attention_adapters", "final_adapter"):
            source, target = getattr(model, name), getattr(subset, name)
            if source is not None:
                target.down.copy_(source.down[:, indices])
                target.up.copy_(source.up[:, indices])
    return subset.eval()


def adapter_form_of(model: MultiTaskModel) -> str | None:
    """The form of the model's adapters (None without adapters)."""
    adapters = model.block_adapters or model.final_adapter
    return None if adapters is None else adapters.form


def _graph_file(name: str, index: int) -> str:
    safe = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) and name not in ("model", "manifest")
    return f"{name}.onnx" if safe else f"task{index}.onnx"


# ---------------------------------------------------------------- export


def _load(bundle: Path | None):
    """The bundle (default: the newest), read and verified by the trainer's own loader."""
    bundle = Path(bundle) if bundle is not None else latest_bundle()
    try:
        model, manifest = load_bundle(bundle)
    except UserError:
        raise
    except (KeyError, ValueError, OSError, RuntimeError) as exc:  # malformed manifest/weights
        raise UserError(
            f"cannot load bundle {bundle}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}; re-run "
            "python -m trainer.fit"
        ) from None
    return bundle, model, manifest


def reference_logits(graph: FusedGraph, held_out: list[HeldOutBatch]) -> list[np.ndarray]:
    """PyTorch logits [R, C_max] of every held-out batch, computed WITHOUT fan-out (each row
    runs the whole model on its own copy of its input): the bar the graph is held to."""
    with torch.no_grad():
        return [graph.model(b.expanded(), b.task_ids).numpy() for b in held_out]


def _feed(names: list[str], batch: HeldOutBatch, fused: bool = True) -> dict[str, np.ndarray]:
    """The fused graph's inputs for a held-out batch (per-task graphs: the expanded rows)."""
    if not fused:
        expanded = batch.expanded()
        return {n: expanded[n].numpy() for n in names}
    feed = {n: batch.inputs[n].numpy() for n in names}
    feed[INPUT_INDEX] = batch.input_index.numpy()
    feed[TASK_IDS] = batch.task_ids.numpy()
    return feed


def _run(session, names: list[str], batch: HeldOutBatch, fused: bool = True) -> np.ndarray:
    return session.run(["logits"], _feed(names, batch, fused))[0]


def _check_bar(parity: dict, precision: str, what: str) -> None:
    diff, top1 = parity["max_abs_logit_diff"], parity["top1_agreement"]
    bar = PARITY_BARS[precision]
    if precision == "fp32" and (
        not diff <= bar["max_abs_logit_diff"] or top1 < bar["top1_agreement"]
    ):
        raise UserError(
            f"{what} fails the fp32 parity bar on {parity['rows']} held-out rows: max |Δlogit| "
            f"{diff:.3g} (must be <= {bar['max_abs_logit_diff']:g}), top-1 agreement "
            f"{top1:.2%} (must be 100%); nothing was written"
        )
    if not np.isfinite(diff):
        raise UserError(
            f"{what} produces non-finite logits on held-out inputs "
            f"({precision}); nothing was written"
        )
    if top1 < bar["top1_agreement"]:
        on = parity.get("judged_on", "synthesized")
        hint = (
            "; this bundle has no sample of real inputs, so synthesized text or images were "
            "judged: re-running python -m trainer.fit writes one"
            if precision == "int8" and on == "synthesized"
            else ""
        )
        raise UserError(
            f"{what} fails the {precision} parity bar: top-1 agreement {top1:.2%} on "
            f"{parity['rows']} held-out rows ({on} inputs; must be >= "
            f"{bar['top1_agreement']:.1%}); export with --precision fp32{hint}"
        )


def _parity(precision: str, synthesized: tuple, real: tuple, num_classes, task_names) -> dict:
    """The parity record: the rows the precision's bar is judged on at the top level
    (fp32, fp16: every row; int8: the bundle's real inputs when it has them, since synthesized
    text is out of distribution and its near-tie logits flip under quantization), and each
    input kind's own record under ``synthesized`` / ``real``."""
    ref, got, ids, held_out = synthesized
    parts = {
        "synthesized": {**compare(ref, got, ids, num_classes, task_names), **describe(held_out)}
    }
    real_ref, real_got, real_ids, real_batches = real
    if real_batches:
        real_ref, real_got = np.concatenate(real_ref), np.concatenate(real_got)
        parts["real"] = {
            **compare(real_ref, real_got, real_ids, num_classes, task_names),
            **describe(real_batches),
        }
    if precision == "int8" and real_batches:
        judged = {**parts["real"], "judged_on": "real"}
    elif real_batches:
        judged = {
            **compare(
                np.concatenate([ref, real_ref]),
                np.concatenate([got, real_got]),
                np.concatenate([ids, real_ids]),
                num_classes,
                task_names,
            ),
            **{k: parts["synthesized"][k] + parts["real"][k] for k in describe(held_out)},
            "judged_on": "synthesized and real",
        }
    else:
        judged = {**parts["synthesized"], "judged_on": "synthesized"}
    return {**judged, **parts}


def _write_graph(graph, example, path: Path, precision: str, opset: int):
    """Export, convert to ``precision``, check; -> (CPU session, what the conversion kept or
    did: fp16's op types kept fp32, int8's quantization record)."""
    export_graph(graph, example, path, opset)
    converted = None
    if precision == "fp16":
        converted = convert_to_fp16(path)
    elif precision == "int8":
        converted = convert_to_int8(path)
    check_graph(path)
    return cpu_session(path, precision=precision), converted


def choose_adapter_form(
    model: MultiTaskModel,
    choice: str,
    held_out: list[HeldOutBatch],
    example: tuple,
    directory: Path,
    opset: int,
) -> dict:
    """The adapter form to export: ``choice`` itself, or for ``auto`` the one whose fp32 graph
    runs the held-out batches faster in onnxruntime (CPU provider, ``FORM_ROUNDS``
    interleaved rounds, median). -> the manifest's ``adapter_form`` record."""
    if adapter_form_of(model) is None:
        return {"form": None, "choice": choice, "reason": "no adapters (surgery mode none)"}
    if choice != "auto":
        model.set_adapter_form(choice)
        return {"form": choice, "choice": choice, "reason": "asked for"}
    names = input_names(model.backbone.modality)
    sessions = {}
    for form in ADAPTER_FORMS:
        model.set_adapter_form(form)
        path = directory / f".form-{form}.onnx"
        export_graph(FusedGraph(model), example, path, opset)
        sessions[form] = cpu_session(path)
        path.unlink()
    feeds = [_feed(names, b) for b in held_out]
    times: dict[str, list[float]] = {form: [] for form in sessions}
    for round_ in range(FORM_ROUNDS + 1):  # round 0 warms up
        order = list(sessions) if round_ % 2 == 0 else list(reversed(sessions))
        for form in order:
            start = time.perf_counter()
            for feed in feeds:
                sessions[form].run(["logits"], feed)
            if round_:
                times[form].append(1e3 * (time.perf_counter() - start))
    timings = {form: round(statistics.median(t), 3) for form, t in times.items()}
    form = min(timings, key=timings.get)
    model.set_adapter_form(form)
    return {
        "form": form,
        "choice": "auto",
        "reason": (
            f"faster median of {FORM_ROUNDS} interleaved runs of the held-out batches, "
            "onnxruntime CPU provider, fp32"
        ),
        "timings_ms": timings,
        "held_out": describe(held_out),
    }


def export(
    bundle: Path | None = None,
    out: Path | None = None,
    tasks: str = "all",
    precision: str = "fp32",
    per_task: bool = False,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    adapter_form: str = "auto",
    target: str = "modeldir",
    target_options: dict | None = None,
) -> tuple[dict, Path]:
    """Export and verify the fused graph, then hand it to the ``target``'s writer (the model
    directory by default) -> (the manifest, the main graph's path as written)."""
    writer = get_target(target)  # an unknown target fails before any work
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if adapter_form not in FORM_CHOICES:
        raise UserError(
            f"--adapter-form must be one of {', '.join(FORM_CHOICES)}, got '{adapter_form}'"
        )
    if opset not in OPSETS:
        raise UserError(f"--opset {opset} is not supported; use {OPSETS[0]}..{OPSETS[-1]}")
    if per_task and target != "modeldir":
        raise UserError(f"--per-task writes model-directory graphs; drop it for --target {target}")
    bundle, full_model, bundle_manifest = _load(bundle)
    out = Path(out) if out is not None else bundle.parent / "onnx"
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or --out DIR")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.stage-", dir=out.parent))
    try:
        verified = _verify(
            bundle,
            full_model,
            bundle_manifest,
            staging,
            tasks,
            precision,
            per_task,
            opset,
            adapter_form,
        )
        verified.options = dict(target_options or {})
        return verified.manifest, writer.write(verified, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _verify(
    bundle: Path,
    full_model: MultiTaskModel,
    bundle_manifest: dict,
    tmp: Path,
    tasks: str,
    precision: str,
    per_task: bool,
    opset: int,
    adapter_form: str,
) -> VerifiedExport:
    """The fused graph (and the per-task ones) written to ``tmp``, converted to ``precision``
    and held to its parity bar against PyTorch; the model directory's manifest."""
    indices = select_tasks(full_model, tasks)
    model = task_subset(full_model, indices)
    modality = model.backbone.modality
    names = input_names(modality)
    num_classes = model.heads.num_classes
    bundle_tasks = {t["name"]: t for t in bundle_manifest["tasks"]}

    image_size = tuple(getattr(model.backbone, "image_size", (224, 224)))
    raw, row_tasks = held_out_inputs(modality, len(indices), ROWS_PER_TASK, image_size)
    held_out = batches(model.backbone, raw, row_tasks, len(indices))
    fused = FusedGraph(model).eval()
    reference = reference_logits(fused, held_out)
    first = held_out[0]  # N = 16 inputs, R > N rows: no dimension of size 1, N != R
    example = (*(first.inputs[n] for n in names), first.input_index, first.task_ids)
    ids = np.concatenate([b.task_ids.numpy() for b in held_out])
    # the bundle's real inputs (a seeded sample of what surgery learned from), when it has them
    samples = read_samples(bundle, bundle_manifest, model.task_names)
    real = []
    if samples is not None and all(samples):
        sample_raw = [x for rows in samples for x in rows]
        sample_ids = torch.tensor([t for t, rows in enumerate(samples) for _ in rows])
        order = np.random.default_rng(1).permutation(len(sample_raw))
        real = batches(
            model.backbone, [sample_raw[i] for i in order], sample_ids[order], len(indices)
        )
    real_reference = reference_logits(fused, real)
    real_ids = np.concatenate([b.task_ids.numpy() for b in real]) if real else ids[:0]

    form = choose_adapter_form(model, adapter_form, held_out, example, tmp, opset)
    session, converted = _write_graph(fused, example, tmp / "model.onnx", precision, opset)
    onnx_out = [_run(session, names, b) for b in held_out]
    real_out = [_run(session, names, b) for b in real]
    parity = _parity(
        precision,
        (np.concatenate(reference), np.concatenate(onnx_out), ids, held_out),
        (real_reference, real_out, real_ids, real),
        num_classes,
        model.task_names,
    )
    _check_bar(parity, precision, "model.onnx")
    parity["max_padding_logit"] = _max_padding(np.concatenate(onnx_out), ids, num_classes)
    if (parity["max_padding_logit"] or PAD_LOGIT) > PAD_LOGIT / 10:
        raise UserError(
            f"model.onnx's padding logits reach {parity['max_padding_logit']:.3g}"
            f"; they must stay near {PAD_LOGIT:g}"
        )
    files = ["model.onnx"]
    per_task_files = {}
    if per_task:
        parity["per_task_graphs"] = {}
        for t, name in enumerate(model.task_names):
            single = SingleTaskGraph(task_subset(model, [t])).eval()
            file = _graph_file(name, t)
            # per-task graphs take one row per input; the example's rows are distinct
            example_rows = first.expanded()
            one, _ = _write_graph(
                single, tuple(example_rows[n] for n in names), tmp / file, precision, opset
            )
            rows = [(b, (b.task_ids == t).numpy()) for b in held_out]
            got = np.concatenate([_run(one, names, b, fused=False)[r] for b, r in rows])
            want = np.concatenate(
                [o[r, : num_classes[t]] for o, (_, r) in zip(onnx_out, rows, strict=True)]
            )
            ref = np.concatenate(
                [o[r, : num_classes[t]] for o, (_, r) in zip(reference, rows, strict=True)]
            )
            zeros = np.zeros(len(got), dtype=np.int64)
            vs_fused = compare(want, got, zeros, [num_classes[t]], [name])
            vs_torch = compare(ref, got, zeros, [num_classes[t]], [name])
            _check_bar(vs_torch, precision, file)
            if precision == "fp32":
                _check_bar(vs_fused, precision, f"{file} (against model.onnx)")
            parity["per_task_graphs"][name] = {
                "file": file,
                "rows": vs_torch["rows"],
                "max_abs_logit_diff": vs_torch["max_abs_logit_diff"],
                "top1_agreement": vs_torch["top1_agreement"],
                "max_abs_logit_diff_vs_fused": vs_fused["max_abs_logit_diff"],
                "top1_agreement_vs_fused": vs_fused["top1_agreement"],
            }
            per_task_files[name] = file
            files.append(file)
    if modality == "text":
        tokenizer = bundle_manifest["preprocessing"].get("tokenizer", "tokenizer.json")
        shutil.copyfile(bundle / tokenizer, tmp / "tokenizer.json")
        files.append("tokenizer.json")

    parity.update(
        {
            "inputs": (
                f"synthesized held-out inputs, seed 0, {ROWS_PER_TASK} rows per task, "
                "tasks mixed within batches of 16 and 7 distinct inputs, each batch also "
                "asking its first input for every task, its second twice and its third for "
                "one more task, through the bundle's preprocessing (the bundle's data paths "
                "are not used); plus, when the bundle has them, its sample of real inputs "
                f"({len(real_ids)} rows here), batched the same way"
            ),
            "reference": (
                "PyTorch MultiTaskModel.forward, fp32, CPU, every row on its own copy of "
                "its input (no fan-out)"
            ),
            "provider": "CPUExecutionProvider",
            "bar": PARITY_BARS[precision],
        }
    )
    c_max = max(num_classes)
    manifest = {
        "format_version": FORMAT_VERSION,
        "modality": modality,
        "backbone": bundle_manifest["backbone"],
        "tasks": task_entries(
            model.task_names, [bundle_tasks[name]["classes"] for name in model.task_names]
        ),
        "inputs": graph_inputs(modality, image_size),
        "outputs": [
            {
                "name": "logits",
                "dtype": "float32",
                "shape": ["rows", c_max],
                "padding_logit": PAD_LOGIT,
            }
        ],
        "preprocessing": bundle_manifest["preprocessing"],
        "opset": opset,
        "precision": precision,
        **({"fp16_ops_kept_fp32": converted} if precision == "fp16" else {}),
        **({"int8": converted} if precision == "int8" else {}),
        "adapter_form": form,
        "shared_blocks": model.shared_blocks,
        "sha256": {f: sha256_file(tmp / f) for f in files},
        **({"per_task": per_task_files} if per_task else {}),
        "parity": parity,
        "source_bundle": {
            "path": str(bundle.resolve()),
            "manifest_sha256": sha256_file(bundle / MANIFEST),
            "tasks": [t["name"] for t in bundle_manifest["tasks"]],
            "surgery": bundle_manifest.get("surgery"),
            "heads": bundle_manifest.get("heads"),
            **{
                k: bundle_manifest[k]
                for k in ("suite", "merge", "accuracy")
                if k in bundle_manifest
            },
        },
        "exporter": {
            "method": "torch.onnx.export(dynamo=True)",
            "torch": torch.__version__,
            **_versions(),
        },
    }

    def check(path: Path, what: str) -> dict:
        """``path`` (a rewritten fused graph without ``input_index``: every row its own
        input) against the same PyTorch reference and bar."""
        session = cpu_session(path, precision=precision)

        def run(batch: HeldOutBatch) -> np.ndarray:
            feed = {n: v.numpy() for n, v in batch.expanded().items() if n in names}
            return session.run(["logits"], {**feed, TASK_IDS: batch.task_ids.numpy()})[0]

        record = _parity(
            precision,
            (np.concatenate(reference), np.concatenate([run(b) for b in held_out]), ids, held_out),
            (real_reference, [run(b) for b in real], real_ids, real),
            num_classes,
            model.task_names,
        )
        _check_bar(record, precision, what)
        return record

    return VerifiedExport(tmp, files, manifest, check)


def _max_padding(logits: np.ndarray, task_ids: np.ndarray, num_classes: list[int]) -> float | None:
    """Largest logit in any row's padding columns (None when no task is padded)."""
    columns = np.arange(logits.shape[1])[None, :]
    padding = columns >= np.asarray(num_classes)[task_ids][:, None]
    return float(logits[padding].max()) if padding.any() else None


def _versions() -> dict:
    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


if __name__ == "__main__":
    raise SystemExit(main())
