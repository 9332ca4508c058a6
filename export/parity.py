"""Parity measured at export: the ONNX graph against the PyTorch model on held-out inputs.

The bundle records where its training data was, but those paths may not exist where export
runs, so the held-out inputs are synthesized, seeded and deterministic, and pushed through the
backbone's own ``collate`` (the bundle's tokenizer / image preprocessing): texts of varying
length padded inside each batch, and random images of varying size resized and centre-cropped.
Every task gets the same number of rows, mixed within each batch as the server mixes them,
and every batch also repeats some of its inputs for more tasks (a ``*`` request, the same
request twice): the graph takes each distinct input once plus, per row, its input and task,
and must equal the PyTorch model run on the inputs repeated per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Real-ish sentences; rows join one to three of them so lengths vary (some get truncated).
SENTENCES = [
    "The market rallied after the central bank held rates steady.",
    "A small bird sang outside the window at dawn.",
    "The home team scored twice in the final minutes to win the match.",
    "I waited forty minutes and the food arrived cold; never again.",
    "Researchers found a new species of frog in the rain forest.",
    "Traffic in the city was slow this evening because of the storm.",
    "What a wonderful film, the actors were brilliant from start to finish.",
    "Shares of the chip maker fell sharply on weak quarterly guidance.",
    "The river flooded the valley after a week of heavy rain.",
    "She climbed the mountain at night to watch the sunrise from the summit.",
    "This phone's battery dies before lunch, which is really annoying.",
    "The telescope captured images of a distant galaxy.",
    "Fish swam slowly between the rocks of the coral reef.",
    "Parliament passed the budget late on Tuesday afternoon.",
    "ok",
    "Terrible service.",
    "The museum reopened its ancient history wing this morning.",
    "Our cat sleeps on the warm laptop whenever it can.",
    "Fans waited outside the stadium for hours before kickoff.",
    "A quiet café by the lake, perfect for reading on a Sunday.",
]


def held_out_inputs(
    modality: str,
    num_tasks: int,
    rows_per_task: int = 8,
    image_size: tuple[int, int] = (224, 224),
    seed: int = 0,
):
    """-> (raw inputs, task_ids [N]) with ``rows_per_task`` rows of every task, shuffled."""
    rng = np.random.default_rng(seed)
    task_ids = np.repeat(np.arange(num_tasks), rows_per_task)
    rng.shuffle(task_ids)
    n = len(task_ids)
    if modality == "text":
        raw = []
        for _ in range(n):
            picks = rng.choice(len(SENTENCES), size=int(rng.integers(1, 4)), replace=False)
            raw.append(" ".join(SENTENCES[i] for i in picks))
    else:
        h, w = image_size
        raw = []
        for _ in range(n):
            ih, iw = (int(s * rng.uniform(0.8, 1.6)) for s in (h, w))
            # a colour gradient plus noise: image-like statistics, no two rows alike
            ramp = np.linspace(0, 1, iw)[None, :, None] * rng.uniform(0, 255, 3)
            noise = rng.normal(0, 40, (ih, iw, 3))
            raw.append(np.clip(ramp + noise + rng.uniform(0, 80), 0, 255).astype(np.uint8))
    return raw, torch.from_numpy(task_ids).long()


@dataclass
class HeldOutBatch:
    """One parity batch as the runtime sends it: N distinct inputs, R rows reading them."""

    inputs: dict[str, torch.Tensor]  # the backbone's input tensors [N, ...]
    input_index: torch.Tensor  # [R] int64: the input each row reads
    task_ids: torch.Tensor  # [R] int64

    def expanded(self) -> dict[str, torch.Tensor]:
        """The inputs repeated per row [R, ...]: what a graph without fan-out computes on."""
        return {k: v[self.input_index] for k, v in self.inputs.items()}


def batches(
    backbone, raw, task_ids: torch.Tensor, num_tasks: int, sizes=(16, 7), seed: int = 0
) -> list[HeldOutBatch]:
    """Collate ``raw`` into batches of alternating sizes (several batch shapes, and for text
    several padded lengths, reach the graph). Each input is asked for its own task, and some
    repeatedly, as a server's batch holds them: the first input of a batch for every task (a
    ``*`` request), the second once more for its own task (two clients, one request) and the
    third for one more task; rows are shuffled so ``input_index`` is not monotonic."""
    rng = np.random.default_rng(seed)
    out, start, k = [], 0, 0
    while start < len(raw):
        size = sizes[k % len(sizes)]
        own = task_ids[start : start + size].tolist()
        rows = list(enumerate(own))
        rows += [(0, t) for t in range(num_tasks)]
        if len(own) > 1:
            rows.append((1, own[1]))
        if len(own) > 2:
            rows.append((2, (own[2] + 1) % num_tasks))
        order = rng.permutation(len(rows))
        out.append(
            HeldOutBatch(
                backbone.collate(raw[start : start + size]),
                torch.tensor([rows[i][0] for i in order], dtype=torch.long),
                torch.tensor([rows[i][1] for i in order], dtype=torch.long),
            )
        )
        start, k = start + size, k + 1
    return out


def describe(held_out: list[HeldOutBatch]) -> dict:
    """How many distinct inputs and rows the parity check ran, and how many rows repeat an
    input another row of their batch also reads."""
    inputs = sum(len(b.input_index.unique()) for b in held_out)
    rows = sum(len(b.input_index) for b in held_out)
    return {"distinct_inputs": inputs, "rows": rows, "rows_sharing_an_input": rows - inputs}


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    task_ids: np.ndarray,
    num_classes: list[int],
    task_names: list[str],
) -> dict:
    """Max |Δlogit| over each row's own classes, and top-1 agreement, overall and per task."""
    per_task, all_diff, all_agree = {}, [], []
    for t, name in enumerate(task_names):
        rows = task_ids == t
        if not rows.any():
            continue
        ref = reference[rows, : num_classes[t]].astype(np.float64)
        got = candidate[rows, : num_classes[t]].astype(np.float64)
        diff = np.abs(ref - got).max(axis=1)
        diff[~np.isfinite(diff)] = np.inf  # NaN or inf logits never pass the bar
        agree = ref.argmax(1) == got.argmax(1)
        per_task[name] = {
            "rows": int(rows.sum()),
            "max_abs_logit_diff": float(diff.max()),
            "top1_agreement": float(agree.mean()),
        }
        all_diff.append(diff)
        all_agree.append(agree)
    diff, agree = np.concatenate(all_diff), np.concatenate(all_agree)
    return {
        "rows": int(len(diff)),
        "max_abs_logit_diff": float(diff.max()),
        "top1_agreement": float(agree.mean()),
        "tasks": per_task,
    }
