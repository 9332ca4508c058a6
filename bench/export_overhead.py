"""What the per-task adapter branches cost in the exported graph, as the number of tasks grows.

    python -m bench.export_overhead [--tasks 4,8,16,32,64] [--batch 32] [--forms masked,gather]
        [--models text,image] [--repeats 9] [--threads N]

For two backbones, the fused multi-task graph (SurgeryV2 rank 16: an adapter after every block
and on the pooled feature, random adapters, T synthetic tasks, rows of mixed task ids, each on
its own input) against the plain merged backbone graph (the same MultiTaskModel with mode
"none", heads included), both exported by export.graph exactly as ``python -m export.onnx``
does, run by onnxruntime on the CPU provider in ONE process:
  text: all-MiniLM-L6-v2 (6 blocks, width 384), sequence length 128;
  image: a ViT-B/32-sized open_clip ViT (12 blocks, width 768, random weights), 224x224.
Both adapter forms: ``masked`` (one dense [D, T*r] matmul per block for every row: its cost
grows with T) and ``gather`` (each row gathers its own task's W_down/W_up: 2*D*r per token
whatever T is). Runs are paired and interleaved (plain, masked, gather in rotating order,
``--repeats`` rounds), so machine drift hits every graph alike; the overhead is the median
of the per-round time ratios, and also the ratio of the fastest runs. Target: <= 3% at every
T up to 64 (batch 32). Writes bench/results/export_overhead.json with the load averages; the
last printed line is a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, print_table, write_result
from export.graph import FusedGraph, export_graph
from trainer.backbones import HFTextBackbone, OpenClipViTBackbone
from trainer.backbones.hf_text import resolve_model_dir
from trainer.surgery.model import Heads, MultiTaskModel

TARGET = 0.03  # the fused graph costs <= 3% more than the plain backbone, at every T <= 64
RANK = 16
SEQUENCE = 128


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def backbone(kind: str):
    if kind == "text":
        return HFTextBackbone(resolve_model_dir("minilm"), SEQUENCE)
    return OpenClipViTBackbone(model="ViT-B-32")


def bench_model(base, tasks: int, mode: str, form: str = "masked", seed: int = 0):
    """A MultiTaskModel on ``base`` with ``tasks`` synthetic tasks (2..20 classes), random
    heads and (``surgeryv2``) random adapters, seeded."""
    g = torch.Generator().manual_seed(seed)
    classes = [2 + (7 * t) % 19 for t in range(tasks)]
    heads = Heads(
        [torch.randn(c, base.feature_dim, generator=g) for c in classes],
        [torch.randn(c, generator=g) for c in classes],
        base.normalize_head,
    )
    names = [f"task{t}" for t in range(tasks)]
    model = MultiTaskModel(base, heads, names, mode, RANK, adapter_form=form)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def feed(base, batch: int, tasks: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``batch`` distinct inputs, one row each, task ids mixed round robin."""
    rng = np.random.default_rng(seed)
    if base.modality == "text":
        ids = rng.integers(1000, 30000, (batch, SEQUENCE))
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP], all tokens attended
        out = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, SEQUENCE), dtype=np.int64),
        }
    else:
        out = {"pixel_values": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
    out["input_index"] = np.arange(batch, dtype=np.int64)
    out["task_ids"] = (np.arange(batch) % tasks).astype(np.int64)
    return out


def export(model, directory: Path, name: str) -> Path:
    """Export as export.onnx does (dynamic inputs and rows); example: 3 inputs, 5 rows."""
    graph = FusedGraph(model)
    example = feed(model.backbone, 3, len(model.task_names), seed=1)
    example["input_index"] = np.array([0, 1, 2, 0, 1], dtype=np.int64)
    example["task_ids"] = np.array([0, 1, 0, 1, 0], dtype=np.int64) % len(model.task_names)
    names = [*graph.names, "input_index", "task_ids"]
    path = directory / f"{name}.onnx"
    export_graph(graph, tuple(torch.from_numpy(example[n]) for n in names), path)
    return path


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def seconds(sess, inputs: dict) -> float:
    start = time.perf_counter()
    sess.run(["logits"], inputs)
    return time.perf_counter() - start


def measure(kind: str, counts: list[int], forms: list[str], args) -> list[dict]:
    base = backbone(kind)
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-overhead-") as tmp:
        plain = session(export(bench_model(base, 4, "none"), Path(tmp), "plain"), args.threads)
        for tasks in counts:
            before = loadavg()
            sessions = {"plain": plain}
            for form in forms:
                model = bench_model(base, tasks, "surgeryv2", form)
                sessions[form] = session(export(model, Path(tmp), f"{form}{tasks}"), args.threads)
            inputs = feed(base, args.batch, tasks, seed=tasks)
            plain_inputs = {**inputs, "task_ids": inputs["task_ids"] % 4}
            for name, s in sessions.items():  # warm-up
                s.run(["logits"], plain_inputs if name == "plain" else inputs)
            times = {name: [] for name in sessions}
            ratios = {form: [] for form in forms}
            order = list(sessions)
            for r in range(args.repeats):
                t = {}
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    t[name] = seconds(sessions[name], plain_inputs if name == "plain" else inputs)
                    times[name].append(t[name])
                for form in forms:
                    ratios[form].append(t[form] / t["plain"])
            after = loadavg()
            for form in forms:
                row = {
                    "model": kind,
                    "tasks": tasks,
                    "form": form,
                    "batch": args.batch,
                    "plain_ms": round(1e3 * statistics.median(times["plain"]), 2),
                    "fused_ms": round(1e3 * statistics.median(times[form]), 2),
                    "overhead": round(statistics.median(ratios[form]) - 1.0, 4),
                    "overhead_of_min_times": round(min(times[form]) / min(times["plain"]) - 1, 4),
                    "ratios": [round(x, 4) for x in ratios[form]],
                    "loadavg_before": before,
                    "loadavg_after": after,
                }
                rows.append(row)
                print(
                    f"{kind} T={tasks} {form}: plain {row['plain_ms']} ms, fused "
                    f"{row['fused_ms']} ms, overhead {row['overhead']:+.1%} (min "
                    f"{row['overhead_of_min_times']:+.1%}); load {before[0]} -> {after[0]}",
                    flush=True,
                )
            del sessions
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.export_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tasks", default="4,8,16,32,64", help="synthetic task counts T")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--forms", default="masked,gather")
    p.add_argument("--models", default="text,image")
    p.add_argument("--repeats", type=int, default=9, help="paired rounds per T")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    counts = [int(x) for x in args.tasks.split(",") if x]
    forms = [f for f in args.forms.split(",") if f]
    before = loadavg()
    rows = []
    for kind in args.models.split(","):
        rows += measure(kind, counts, forms, args)
    after = loadavg()
    parts = []
    for kind in args.models.split(","):
        for form in forms:
            mine = [r for r in rows if r["model"] == kind and r["form"] == form]
            worst = max(mine, key=lambda r: r["overhead"])
            parts.append(f"{kind} {form} worst {worst['overhead']:+.1%} (T={worst['tasks']})")
    met = {form: all(r["overhead"] <= TARGET for r in rows if r["form"] == form) for form in forms}
    summary = (
        f"fused-graph overhead at batch {args.batch}, T up to {max(counts)}: "
        + ", ".join(parts)
        + "; <= "
        + f"{TARGET:.0%} at every T: "
        + ", ".join(f"{form} {'met' if ok else 'NOT met'}" for form, ok in met.items())
        + f"; load average {before[0]:.2f} -> {after[0]:.2f}"
    )
    print_table(
        ["model", "T", "form", "plain ms", "fused ms", "overhead (median)", "overhead (min)"],
        [
            [
                r["model"],
                r["tasks"],
                r["form"],
                r["plain_ms"],
                r["fused_ms"],
                f"{r['overhead']:+.1%}",
                f"{r['overhead_of_min_times']:+.1%}",
            ]
            for r in rows
        ],
        summary,
    )
    write_result(
        "export_overhead",
        {
            "bench": "export_overhead",
            "threads": args.threads,
            "repeats": args.repeats,
            "batch": args.batch,
            "tasks": counts,
            "forms": forms,
            "rank": RANK,
            "rows": rows,
            "target": TARGET,
            "loadavg_before": before,
            "loadavg_after": after,
            "summary": summary,
            "onnxruntime": __import__("onnxruntime").__version__,
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
