"""What gRPC serving adds to one row: Predict p50 vs a direct session.run of the same row.

    python -m bench.grpc_overhead --model DIR [--n 1000] [--task NAME] [--ray]

The server runs in its own process with its default flags; the client sends single-row
Predicts one after another (no concurrency). The direct baseline runs the same preprocessed row
through an onnxruntime session built with the server's own options (runtime.engine.Engine),
in this process. Rounds alternate between the two so drift hits both alike. Three rows: the
direct run, Predict with the row as `input.tensor` (transport + batching only), Predict
with the raw input (`input.text` / `input.image`: preprocessing included), and the Open
Inference Protocol's ModelInfer of the same raw input (one BYTES row).
Target: tensor Predict p50 <= 1.2x the direct p50 on CPU. Writes bench/results/grpc_overhead.json.
`--ray` adds the same calls through runtime.serve_ray (one replica on a local Ray: the
Serve proxy, the ingress and the replica), i.e. what the scale-out path adds per request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.serving_load import (
    RESULTS,
    RayProcess,
    ServerProcess,
    model_inputs,
    open_inference_request,
    open_model_dir,
)

TARGET = 1.2


def _path(kind: str) -> str:
    ray, kind = kind.startswith("ray "), kind.removeprefix("ray ")
    call = f"ModelInfer({kind[3:]})" if kind.startswith("v2 ") else f"Predict(input.{kind})"
    return f"serve_ray {call}" if ray else call


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpc_overhead", description=__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--n", type=int, default=1000, help="timed calls per row kind")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--rounds", type=int, default=10, help="alternations between the kinds")
    p.add_argument("--task", help="task to ask (default: the first)")
    p.add_argument("--providers", default="cpu", choices=["auto", "cuda", "cpu"])
    p.add_argument("--ray", action="store_true", help="also through runtime.serve_ray")
    p.add_argument("--out", type=Path, default=RESULTS / "grpc_overhead.json")
    args = p.parse_args(argv)

    import grpc

    from protos.deepsurgery.v1 import inference_pb2 as pb
    from protos.deepsurgery.v1 import inference_pb2_grpc as pb_grpc
    from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
    from runtime.engine import Engine
    from runtime.preprocess import make_preprocessor

    spec = open_model_dir("bench.grpc_overhead", args.model)
    if spec is None:
        return 2
    task = args.task or spec.tasks[0].name
    index = spec.task(task).index
    field, inputs = model_inputs(spec.manifest)
    raw = inputs[0]
    if field == "text":  # a typical-length text, not a pathological one
        raw = sorted(inputs, key=len)[len(inputs) // 2]
    pre = make_preprocessor(spec)
    engine = Engine(spec, pre, providers=args.providers)
    row = pre.text(raw) if field == "text" else pre.image(raw)
    feeds = engine.feeds([row], [index])
    dtype = "int64" if field == "text" else "float32"
    tensor = pb.Tensor(dtype=dtype, shape=list(row.shape), data=row.tobytes())
    requests = {
        "tensor": pb.PredictRequest(task=task, input=pb.Input(tensor=tensor)),
        field: pb.PredictRequest(task=task, input=pb.Input(**{field: raw})),
    }
    infer = open_inference_request(task, field, [raw])

    server = ServerProcess(args.model, "--providers", args.providers)
    ray = RayProcess(args.model, 1, "--providers", args.providers) if args.ray else None
    times: dict[str, list[float]] = {"direct": [], "tensor": [], field: [], f"v2 {field}": []}
    if ray:
        times |= {"ray tensor": [], f"ray {field}": [], f"ray v2 {field}": []}
    try:
        channel = grpc.insecure_channel(server.addr)
        stub = pb_grpc.InferenceStub(channel)
        calls = {"direct": lambda: engine.run_feeds(feeds)}
        for kind, req in requests.items():
            calls[kind] = lambda req=req: stub.Predict(req, timeout=60)
        v2_stub = v2_grpc.GRPCInferenceServiceStub(channel)
        calls[f"v2 {field}"] = lambda: v2_stub.ModelInfer(infer, timeout=60)
        if ray:
            ray_channel = grpc.insecure_channel(ray.addr)
            ray_stub = pb_grpc.InferenceStub(ray_channel)
            for kind, req in requests.items():
                calls[f"ray {kind}"] = lambda req=req: ray_stub.Predict(req, timeout=60)
            ray_v2 = v2_grpc.GRPCInferenceServiceStub(ray_channel)
            calls[f"ray v2 {field}"] = lambda: ray_v2.ModelInfer(infer, timeout=60)
        for fn in calls.values():
            for _ in range(args.warmup):
                fn()
        per_round = max(1, args.n // args.rounds)
        for _ in range(args.rounds):
            for kind, fn in calls.items():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    fn()
                    times[kind].append((time.perf_counter() - t0) * 1000)
        channel.close()
    finally:
        server.stop()
        if ray:
            ray.stop()

    p50 = {k: float(np.percentile(v, 50)) for k, v in times.items()}
    rows = [
        {
            "path": {"direct": "session.run (direct)"}.get(k, _path(k)),
            "calls": len(v),
            "p50_ms": round(p50[k], 4),
            "p95_ms": round(float(np.percentile(v, 95)), 4),
            "ratio_vs_direct": round(p50[k] / p50["direct"], 3),
        }
        for k, v in times.items()
    ]
    ratio = p50["tensor"] / p50["direct"]
    raw_ratio = p50[field] / p50["direct"]
    summary = (
        f"grpc_overhead: Predict(tensor) p50 {p50['tensor']:.3f} ms = {ratio:.2f}x session.run "
        f"{p50['direct']:.3f} ms (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'}); "
        f"Predict({field}) {raw_ratio:.2f}x; ModelInfer({field}) "
        f"{p50[f'v2 {field}'] / p50['direct']:.2f}x; providers {engine.providers[0]}"
    )
    if ray:
        summary += f"; via Ray Serve {p50['ray tensor'] / p50['direct']:.2f}x"
    report = {
        "bench": "grpc_overhead",
        "model": str(args.model),
        "task": task,
        "row_shape": list(row.shape),
        "providers": engine.providers,
        "rows": rows,
        "ratio_tensor": round(ratio, 3),
        "ratio_raw": round(raw_ratio, 3),
        "ratio_open_inference": round(p50[f"v2 {field}"] / p50["direct"], 3),
        "target": TARGET,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    cols = ["path", "calls", "p50_ms", "p95_ms", "ratio_vs_direct"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths, strict=True)))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
