"""Time per surgery iteration: cached expert targets vs recomputing the experts every step.

    python -m bench.surgery_speed [--iterations 5] [--device cpu]

Same run, same model, same batches (MiniLM, 4 tasks, batch 16 per task, real texts from
../shared/data/text when present). Three ways to get the expert side of the loss:
  cached     - the L + 1 target vectors computed once per example, looked up every step (ours)
  recompute  - every step runs each task's expert on the batch (experts kept in memory)
  reload     - every step also reloads the expert weights from disk first, as the released
               SurgeryV2 code does
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.common import print_table, write_result
from trainer.backbones import HFTextBackbone, resolve_model_dir
from trainer.data.demo import generate
from trainer.surgery.features import Targets, representations
from trainer.surgery.model import Heads, MultiTaskModel
from trainer.surgery.train import surgery_loss

TASKS = ("agnews", "amazon", "yelp", "dbpedia")


def _texts(n: int) -> list[list[str]]:
    root = (
        Path(
            os.environ.get(
                "DEEPSURGERY_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
            )
        )
        / "text"
    )
    if (root / "agnews" / "test.jsonl").is_file():
        out = []
        for task in TASKS:
            lines = (root / task / "test.jsonl").read_text().splitlines()[:n]
            out.append([json.loads(x)["text"] for x in lines])
        return out
    folder = generate(Path(tempfile.mkdtemp()), train=1, test=n)
    return [
        [json.loads(x)["text"] for x in (folder / t / "test.jsonl").read_text().splitlines()]
        for t in ("creature", "place", "time", "feeling")
    ]


def _expert_targets(expert, batch) -> Targets:
    with torch.no_grad():
        hidden, ctx = expert.embed(batch)
        means = []
        for index in range(expert.num_blocks):
            hidden = expert.block(index, hidden, ctx)
            means.append(expert.token_mean(hidden, ctx))
        return Targets(torch.stack(means, 1), expert.pool(hidden, ctx))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--modes", default="surgeryv2,surgery")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-dir", default="minilm", help="local BERT-family dir, or 'minilm'")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    merged = HFTextBackbone(resolve_model_dir(args.model_dir), max_length=128)
    experts = []
    tmp = Path(tempfile.mkdtemp())
    for t in range(len(TASKS)):  # stand-in experts: seeded perturbations of the base
        expert = copy.deepcopy(merged)
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for prm in expert.parameters():
                prm.add_(0.01 * torch.randn(prm.shape, generator=g))
        save_file(
            {k: v.contiguous() for k, v in expert.state_dict().items()},
            str(tmp / f"expert{t}.safetensors"),
        )
        experts.append(expert.to(device).eval())
    n = args.batch_size * (args.iterations + 1)
    texts = _texts(n)
    heads = Heads([torch.randn(4, 384)] * len(TASKS), [torch.zeros(4)] * len(TASKS))
    rows, summary = [], {}
    for mode in args.modes.split(","):
        model = MultiTaskModel(merged, heads, list(TASKS), mode, 16).to(device)
        for prm in model.parameters():
            prm.requires_grad_(False)
        params = model.adapter_parameters()
        for prm in params:
            prm.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-3)
        t0 = time.perf_counter()
        cached = [representations(e, texts[t], 32, device) for t, e in enumerate(experts)]
        precompute = time.perf_counter() - t0
        frozen = None
        if mode == "surgery":  # what train_surgery does for v1: merged features once
            frozen = [
                representations(model.backbone, texts[t], 32, device).final
                for t in range(len(TASKS))
            ]

        def step(it: int, how: str) -> None:
            opt.zero_grad(set_to_none=True)
            for t in range(len(TASKS)):
                rows_ = list(range(it * args.batch_size, (it + 1) * args.batch_size))
                ids = torch.full((len(rows_),), t, device=device)
                if how == "cached" and frozen is not None:
                    # v1 as train_surgery runs it: no tokenisation, no backbone pass at all
                    out = model.final_adapter(
                        0, frozen[t][rows_].to(device), model.final_adapter.route(ids)
                    )
                    loss = torch.nn.functional.l1_loss(out, cached[t].final[rows_].to(device))
                    loss.backward()
                    continue
                texts_ = [texts[t][i] for i in rows_]
                batch = {k: v.to(device) for k, v in merged.collate(texts_).items()}
                if how == "cached":
                    tgt = cached[t].take(torch.tensor(rows_))
                    tgt = Targets(tgt.blocks.to(device), tgt.final.to(device))
                else:
                    if how == "reload":
                        experts[t].load_state_dict(load_file(str(tmp / f"expert{t}.safetensors")))
                    tgt = _expert_targets(experts[t], batch)
                loss = surgery_loss(model, batch, ids, tgt, "l1")
                loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        timings = {"cached": [], "recompute": [], "reload": []}
        step(0, "cached")  # warm-up
        for it in range(1, args.iterations + 1):  # interleaved: the same noise for all three
            for how in timings:
                t0 = time.perf_counter()
                step(it, how)
                timings[how].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
        rows.append(
            [
                mode,
                med["cached"],
                med["recompute"],
                med["reload"],
                med["recompute"] / med["cached"],
                med["reload"] / med["cached"],
                precompute,
            ]
        )
        summary[mode] = {
            "seconds_per_iteration": med,
            "precompute_s": precompute,
            "speedup_vs_recompute": med["recompute"] / med["cached"],
            "speedup_vs_reload": med["reload"] / med["cached"],
        }
    header = [
        "mode",
        "cached s/it",
        "recompute s/it",
        "reload s/it",
        "x vs recompute",
        "x vs reload",
        "one-off target pass s",
    ]
    line = "; ".join(
        f"{m}: cached is {s['speedup_vs_recompute']:.1f}x faster than recomputing "
        f"({s['speedup_vs_reload']:.1f}x vs reloading)"
        for m, s in summary.items()
    )
    write_result(
        "surgery_speed",
        {
            "device": str(device),
            "iterations": args.iterations,
            "batch_per_task": args.batch_size,
            "modes": summary,
        },
    )
    print_table(header, rows, f"surgery_speed on {device}: {line}")


if __name__ == "__main__":
    main()
