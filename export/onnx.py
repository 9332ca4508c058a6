"""python -m export.onnx: a trainer bundle -> ONE fused multi-task ONNX graph, verified.

    python -m export.onnx --tasks all|name,name [--bundle DIR] [--out DIR]
                          [--precision fp32|fp16] [--per-task] [--opset N] [--force]

The graph is traced from the trainer's own ``MultiTaskModel.forward`` (shared merged backbone,
each row's task adapters, each row's task head), so the served model is the measured one.
Before anything is kept, the graph is checked, loaded in onnxruntime (CPU provider) and compared
with PyTorch on held-out inputs of every task; the export fails, leaving nothing in ``--out``,
if fp32 parity is worse than 1e-4 max |Δlogit| or any top-1 differs (fp16: top-1 >= 99.5%).
The output directory (model.onnx, manifest.json, tokenizer.json for text) is the contract the
runtime reads; it is written to a temporary sibling and renamed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from modeldir import (
    FORMAT_VERSION,
    MANIFEST,
    atomic_directory,
    sha256_file,
    task_entries,
    write_json_atomic,
)
from trainer.errors import UserError, run_cli
from trainer.results.bundle import load_bundle
from trainer.surgery.model import PAD_LOGIT, MultiTaskModel

from .graph import (
    DEFAULT_OPSET,
    FusedGraph,
    SingleTaskGraph,
    check_graph,
    convert_to_fp16,
    cpu_session,
    export_graph,
    input_names,
)
from .parity import batches, compare, held_out_inputs

FP32_MAX_ABS_DIFF = 1e-4  # fp32 must match PyTorch to 1e-4 with identical top-1
FP32_MIN_TOP1 = 1.0
FP16_MIN_TOP1 = 0.995
ROWS_PER_TASK = 8
OPSETS = range(17, 24)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="all", help="'all' or a comma-separated list of task names")
    p.add_argument("--bundle", type=Path, help="bundle dir (default: newest runs/*/bundle)")
    p.add_argument("--out", type=Path, help="output dir (default: <run>/onnx beside the bundle)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument(
        "--per-task",
        action="store_true",
        help="also write one graph per task without the task_ids input",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    code, result = run_cli(
        lambda: export(
            args.bundle, args.out, args.tasks, args.precision, args.per_task, args.opset, args.force
        )
    )
    if code:
        return code
    manifest, out = result
    parity = manifest["parity"]
    print(
        f"wrote {out}/model.onnx ({manifest['precision']}, opset {manifest['opset']}, "
        f"{len(manifest['tasks'])} tasks): parity on {parity['rows']} held-out rows: "
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


def task_subset(model: MultiTaskModel, indices: list[int]) -> MultiTaskModel:
    """The same model restricted to ``indices`` (renumbered 0..k-1): shared backbone module,
    those tasks' heads and adapter slices. C_max shrinks to the largest kept task."""
    subset = MultiTaskModel(
        model.backbone,
        model.heads.subset(indices),
        [model.task_names[t] for t in indices],
        mode=model.mode,
        rank=model.rank,
        branch_block=model.branch_block,
    )
    with torch.no_grad():
        for name in ("block_adapters", "final_adapter"):
            source, target = getattr(model, name), getattr(subset, name)
            if source is not None:
                target.down.copy_(source.down[:, indices])
                target.up.copy_(source.up[:, indices])
    return subset.eval()


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


def reference_logits(graph: FusedGraph, held_out: list) -> list[np.ndarray]:
    """PyTorch logits [B, C_max] of every held-out batch: the bar the graph is held to."""
    with torch.no_grad():
        return [graph(*(b[n] for n in graph.names), t).numpy() for b, t in held_out]


def _run(session, names: list[str], batch: dict, task_ids: torch.Tensor | None) -> np.ndarray:
    feed = {n: batch[n].numpy() for n in names}
    if task_ids is not None:
        feed["task_ids"] = task_ids.numpy()
    return session.run(["logits"], feed)[0]


def _check_bar(parity: dict, precision: str, what: str) -> None:
    diff, top1 = parity["max_abs_logit_diff"], parity["top1_agreement"]
    if precision == "fp32" and (not diff <= FP32_MAX_ABS_DIFF or top1 < FP32_MIN_TOP1):
        raise UserError(
            f"{what} fails the fp32 parity bar on {parity['rows']} held-out rows: max |Δlogit| "
            f"{diff:.3g} (must be <= {FP32_MAX_ABS_DIFF:g}), top-1 agreement {top1:.2%} (must "
            "be 100%); nothing was written"
        )
    if not np.isfinite(diff):
        raise UserError(
            f"{what} produces non-finite logits on held-out inputs "
            f"({precision}); nothing was written"
        )
    if precision == "fp16" and top1 < FP16_MIN_TOP1:
        raise UserError(
            f"{what} fails the fp16 parity bar: top-1 agreement {top1:.2%} on "
            f"{parity['rows']} held-out rows (must be >= {FP16_MIN_TOP1:.1%}); "
            "export with --precision fp32"
        )


def _write_graph(graph, example, path: Path, precision: str, opset: int):
    """Export, convert to ``precision``, check; -> (CPU session, op types kept fp32 in fp16)."""
    export_graph(graph, example, path, opset)
    kept = convert_to_fp16(path) if precision == "fp16" else []
    check_graph(path)
    return cpu_session(path, precision=precision), kept


def export(
    bundle: Path | None = None,
    out: Path | None = None,
    tasks: str = "all",
    precision: str = "fp32",
    per_task: bool = False,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
) -> tuple[dict, Path]:
    """Export, verify and write the model directory; returns (its manifest, the directory)."""
    if precision not in ("fp32", "fp16"):
        raise UserError(f"--precision must be fp32 or fp16, got '{precision}'")
    if opset not in OPSETS:
        raise UserError(f"--opset {opset} is not supported; use {OPSETS[0]}..{OPSETS[-1]}")
    bundle, full_model, bundle_manifest = _load(bundle)
    out = Path(out) if out is not None else bundle.parent / "onnx"
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or --out DIR")
    indices = select_tasks(full_model, tasks)
    model = task_subset(full_model, indices)
    modality = model.backbone.modality
    names = input_names(modality)
    num_classes = model.heads.num_classes
    bundle_tasks = {t["name"]: t for t in bundle_manifest["tasks"]}

    image_size = tuple(getattr(model.backbone, "image_size", (224, 224)))
    raw, row_tasks = held_out_inputs(modality, len(indices), ROWS_PER_TASK, image_size)
    held_out = batches(model.backbone, raw, row_tasks)
    fused = FusedGraph(model).eval()
    reference = reference_logits(fused, held_out)
    example = (*(held_out[0][0][n] for n in names), held_out[0][1])

    with atomic_directory(out) as tmp:
        session, kept_fp32 = _write_graph(fused, example, tmp / "model.onnx", precision, opset)
        onnx_out = [_run(session, names, b, t) for b, t in held_out]
        ids = row_tasks.numpy()
        parity = compare(
            np.concatenate(reference), np.concatenate(onnx_out), ids, num_classes, model.task_names
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
                one, _ = _write_graph(single, example[:-1], tmp / file, precision, opset)
                rows = [(b, (tt == t).numpy()) for b, tt in held_out]
                got = np.concatenate([_run(one, names, b, None)[r] for b, r in rows])
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
                    "tasks mixed within batches of 16 and 7, through the bundle's "
                    "preprocessing (the bundle's data paths are not used)"
                ),
                "reference": "PyTorch MultiTaskModel.forward, fp32, CPU",
                "provider": "CPUExecutionProvider",
                "bar": (
                    {"max_abs_logit_diff": FP32_MAX_ABS_DIFF, "top1_agreement": FP32_MIN_TOP1}
                    if precision == "fp32"
                    else {"top1_agreement": FP16_MIN_TOP1}
                ),
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
            "inputs": _input_specs(modality, image_size),
            "outputs": [
                {
                    "name": "logits",
                    "dtype": "float32",
                    "shape": ["batch", c_max],
                    "padding_logit": PAD_LOGIT,
                }
            ],
            "preprocessing": bundle_manifest["preprocessing"],
            "opset": opset,
            "precision": precision,
            **({"fp16_ops_kept_fp32": kept_fp32} if precision == "fp16" else {}),
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
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest, out


def _max_padding(logits: np.ndarray, task_ids: np.ndarray, num_classes: list[int]) -> float | None:
    """Largest logit in any row's padding columns (None when no task is padded)."""
    columns = np.arange(logits.shape[1])[None, :]
    padding = columns >= np.asarray(num_classes)[task_ids][:, None]
    return float(logits[padding].max()) if padding.any() else None


def _input_specs(modality: str, image_size: tuple[int, int]) -> list[dict]:
    if modality == "image":
        specs = [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, *image_size]}]
    else:
        specs = [
            {"name": n, "dtype": "int64", "shape": ["batch", "sequence"]}
            for n in ("input_ids", "attention_mask")
        ]
    return [*specs, {"name": "task_ids", "dtype": "int64", "shape": ["batch"]}]


def _versions() -> dict:
    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


if __name__ == "__main__":
    raise SystemExit(main())
