"""What the per-task adapter branches cost in the exported graph.

    python -m bench.export_overhead [--quick] [--threads N] [--repeats N]

For two models, the fused multi-task graph (surgeryv2: an adapter after every block and on the
pooled feature, rows of mixed task ids) against the plain merged backbone graph (the same
MultiTaskModel with mode "none", heads included), both exported by export.graph exactly as
``python -m export.onnx`` does, run by onnxruntime on the CPU provider in ONE process,
interleaved, several repeats; the overhead is the median of the per-repeat time ratios.
  text: all-MiniLM-L6-v2 (runs/text-bench/bundle if present, else MiniLM with random
        adapters), 4 tasks, rank 16, sequence length 128;
  image: a ViT-B/32-sized random open_clip ViT, 8 tasks, rank 16, 224x224.
Batches 1, 8 and 32 (--quick: 1 and 8, fewer repeats). Target: <= 3% at batch 32.
Writes bench/results/export_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export.graph import FusedGraph, export_graph
from trainer.backbones import HFTextBackbone, OpenClipViTBackbone
from trainer.backbones.hf_text import resolve_model_dir
from trainer.results.bundle import load_bundle
from trainer.surgery.model import Heads, MultiTaskModel

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TARGET = 0.03  # target: the fused graph costs <= 3% more than the plain backbone at batch 32


def random_model(kind: str, mode: str, seed: int = 0):
    """The bench models: MiniLM (4 tasks) or a ViT-B/32-sized random ViT (8 tasks), rank 16."""
    if kind == "text":
        backbone, classes = HFTextBackbone(resolve_model_dir("minilm"), 128), [4, 2, 5, 3]
    else:
        backbone, classes = OpenClipViTBackbone(model="ViT-B-32"), [10, 43, 47, 10, 37, 100, 2, 8]
    g = torch.Generator().manual_seed(seed)
    heads = Heads(
        [torch.randn(c, backbone.feature_dim, generator=g) for c in classes],
        [torch.randn(c, generator=g) for c in classes],
        backbone.normalize_head,
    )
    model = MultiTaskModel(backbone, heads, [f"task{i}" for i in range(len(classes))], mode, 16)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def bench_models(kind: str):
    """-> (fused surgeryv2 model, plain mode-"none" model sharing its backbone and heads)."""
    bundle = REPO / "runs" / "text-bench" / "bundle"
    if kind == "text" and (bundle / "manifest.json").is_file():
        fused, _ = load_bundle(bundle)
        if fused.mode == "none":  # a bundle without adapters measures nothing
            fused = random_model(kind, "surgeryv2")
    else:
        fused = random_model(kind, "surgeryv2")
    plain = MultiTaskModel(fused.backbone, fused.heads, fused.task_names, "none", fused.rank)
    return fused, plain.eval()


def inputs(model, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if model.backbone.modality == "text":
        ids = rng.integers(1000, 30000, (batch, 128))
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP], all 128 tokens attended
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, 128), dtype=np.int64),
        }
    else:
        feed = {"pixel_values": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
    feed["task_ids"] = (np.arange(batch) % len(model.task_names)).astype(np.int64)  # mixed
    return feed


def export(model, directory: Path, name: str) -> Path:
    graph = FusedGraph(model)
    example = inputs(model, 2)
    path = directory / f"{name}.onnx"
    export_graph(
        graph, tuple(torch.from_numpy(example[n]) for n in [*graph.names, "task_ids"]), path
    )
    return path


def seconds(session, feed, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        session.run(["logits"], feed)
    return (time.perf_counter() - start) / iterations


def measure(kind: str, batches: list[int], repeats: int, threads: int) -> list[dict]:
    import onnxruntime as ort

    fused_model, plain_model = bench_models(kind)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            "fused": export(fused_model, Path(tmp), "fused"),
            "plain": export(plain_model, Path(tmp), "plain"),
        }
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        sessions = {
            k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            for k, p in paths.items()
        }
        for batch in batches:
            feed = inputs(fused_model, batch, seed=batch)
            for s in sessions.values():
                s.run(["logits"], feed)  # warm-up
            # paired single runs, order alternating: machine drift hits both sides of a pair
            per_pair = max(1, int(0.2 / seconds(sessions["plain"], feed, 1)))
            ratios, times = [], {"fused": [], "plain": []}
            for r in range(repeats):
                order = ("fused", "plain") if r % 2 == 0 else ("plain", "fused")
                t = {k: seconds(sessions[k], feed, per_pair) for k in order}
                for k in t:
                    times[k].append(t[k])
                ratios.append(t["fused"] / t["plain"])
            row = {
                "model": kind,
                "batch": batch,
                "tasks": len(fused_model.task_names),
                "plain_ms": 1e3 * statistics.median(times["plain"]),
                "fused_ms": 1e3 * statistics.median(times["fused"]),
                "overhead": statistics.median(ratios) - 1.0,
                "overhead_of_min_times": min(times["fused"]) / min(times["plain"]) - 1.0,
                "ratios": ratios,
            }
            rows.append(row)
            print(
                f"{kind:<6}{batch:>6}{row['plain_ms']:>12.2f}{row['fused_ms']:>12.2f}"
                f"{row['overhead']:>+11.1%}{row['overhead_of_min_times']:>+11.1%}",
                flush=True,
            )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.export_overhead", description=__doc__)
    p.add_argument("--quick", action="store_true", help="batches 1 and 8, 5 repeats")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=0, help="default 15 (--quick: 5)")
    p.add_argument("--models", default="text,image")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    batches = [1, 8] if args.quick else [1, 8, 32]
    repeats = args.repeats or (5 if args.quick else 15)
    print(
        f"onnxruntime CPU, {args.threads} intra-op threads, median of {repeats} interleaved "
        "repeats; fused = surgeryv2 graph with mixed task ids, plain = merged backbone graph"
    )
    print(f"{'model':<6}{'batch':>6}{'plain ms':>12}{'fused ms':>12}{'overhead':>11}{'(min)':>11}")
    rows = []
    for kind in args.models.split(","):
        rows += measure(kind, batches, repeats, args.threads)
    at_max = [r for r in rows if r["batch"] == max(batches)]
    worst = max(r["overhead"] for r in at_max)
    verdict = "meets" if worst <= TARGET else "misses"
    summary = (
        f"fused-graph overhead at batch {max(batches)}: "
        + ", ".join(f"{r['model']} {r['overhead']:+.1%}" for r in at_max)
        + f" ({verdict} the <= {TARGET:.0%} target)"
    )
    print(summary)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export_overhead.json").write_text(
        json.dumps(
            {
                "threads": args.threads,
                "repeats": repeats,
                "batches": batches,
                "rows": rows,
                "target": TARGET,
                "summary": summary,
                "cpu_count": os.cpu_count(),
                "onnxruntime": __import__("onnxruntime").__version__,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
