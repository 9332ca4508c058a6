"""The ONE multi-task forward pass: merged backbone, per-task adapters, per-task heads.

Training (surgery), evaluation and ONNX export all call ``MultiTaskModel.forward``, so what is
exported and served is exactly what was measured. Every row of a batch carries its own task id;
one batch may mix tasks.

Representation surgery (SurgeryV2, arXiv 2410.14389): after block l the hidden state of a row
of task t becomes
    Ẑ = Z − W_up[l, t] · ReLU(W_down[l, t] · Z)          (no bias, on every token)
and feeds block l + 1; one more adapter acts on the final pooled representation. ``surgery``
keeps only that final one, ``surgeryv2`` has both. ``attention_adapters`` adds a third set to
SurgeryV2 (not in the paper): the same adapter form on each adapted block's attention output,
before its residual add (where adapter tuning puts one), trained by the same objective.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from .adapters import ADAPTER_FORMS, Adapters

SURGERY_MODES = ("none", "surgery", "surgeryv2")
PAD_LOGIT = -1e4  # value of a task's padding logit columns (fits fp16)


# the activation between a head's hidden layer and its classifier, by the name experts use
ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}


@dataclass
class TaskHead:
    """One task's classifier on the final representation f [F]:
    ``weight · act(hidden_weight · f + hidden_bias) + bias`` with a hidden layer (BERT's pooler,
    RoBERTa's classification head...), else ``weight · f + bias``."""

    weight: torch.Tensor  # [C, H] (H = F without a hidden layer)
    bias: torch.Tensor  # [C]
    hidden_weight: torch.Tensor | None = None  # [H, F]
    hidden_bias: torch.Tensor | None = None  # [H]
    activation: str = ""  # one of ACTIVATIONS, with a hidden layer

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]


class Heads(nn.Module):
    """Per-task classifiers stacked to [T, C_max, H]; padding columns get PAD_LOGIT.

    Optionally one hidden layer per task before the classifier (``hidden_weight`` [T, H, F],
    ``hidden_bias`` [T, H]) with ONE activation for all tasks (the experts share an
    architecture, so they share their head's form). ``normalize``: the heads read the
    L2-normalised feature (CLIP-style heads, sentence-transformers' Normalize).
    """

    def __init__(
        self,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor],
        normalize: bool = False,
        hidden_weights: list[torch.Tensor] | None = None,
        hidden_biases: list[torch.Tensor] | None = None,
        activation: str = "",
    ):
        super().__init__()
        num_classes = [w.shape[0] for w in weights]
        c_max, dim = max(num_classes), weights[0].shape[1]
        weight = torch.zeros(len(weights), c_max, dim)
        bias = torch.full((len(weights), c_max), PAD_LOGIT)
        for t, (w, b) in enumerate(zip(weights, biases)):
            weight[t, : w.shape[0]] = w
            bias[t, : w.shape[0]] = b
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        hidden_weight = hidden_bias = None  # no hidden layer: no buffers in the state dict
        if hidden_weights is not None:
            if activation not in ACTIVATIONS:
                raise ValueError(f"head activation '{activation}' is not one of {[*ACTIVATIONS]}")
            hidden_weight = torch.stack([w.float() for w in hidden_weights])
            hidden_bias = torch.stack([b.float() for b in hidden_biases])
        self.register_buffer("hidden_weight", hidden_weight)
        self.register_buffer("hidden_bias", hidden_bias)
        self.activation = activation if hidden_weights is not None else ""
        self.num_classes = num_classes
        self.normalize = normalize

    @property
    def hidden_width(self) -> int:
        """H of the per-task hidden layer, 0 without one."""
        return 0 if self.hidden_weight is None else self.hidden_weight.shape[1]

    @classmethod
    def stack(cls, heads: list[TaskHead], normalize: bool = False) -> Heads:
        """One Heads from per-task heads that all have, or all lack, a hidden layer."""
        hidden = [h.hidden_weight is not None for h in heads]
        if any(hidden) and not all(hidden):
            raise ValueError("either every task head has a hidden layer or none has")
        if len({h.activation for h in heads}) > 1:
            raise ValueError("every task head must use the same activation")
        return cls(
            [h.weight for h in heads],
            [h.bias for h in heads],
            normalize,
            [h.hidden_weight for h in heads] if all(hidden) else None,
            [h.hidden_bias for h in heads] if all(hidden) else None,
            heads[0].activation,
        )

    def task_head(self, t: int) -> TaskHead:
        """Task ``t``'s head, unpadded (copies)."""
        c = self.num_classes[t]
        hidden = self.hidden_weight is not None
        return TaskHead(
            self.weight[t, :c].clone(),
            self.bias[t, :c].clone(),
            self.hidden_weight[t].clone() if hidden else None,
            self.hidden_bias[t].clone() if hidden else None,
            self.activation,
        )

    def subset(self, indices: list[int]) -> Heads:
        """The heads of tasks ``indices`` (renumbered 0..k-1)."""
        return Heads.stack([self.task_head(t) for t in indices], self.normalize)

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """features [B, F], task_ids [B] -> logits [B, C_max]."""
        if self.normalize:
            features = F.normalize(features, dim=-1)
        if self.hidden_weight is not None:
            tasks, width = self.hidden_weight.shape[:2]
            # every task's hidden layer on every row in one matmul ([B, T, H]; T is small),
            # then each row keeps its own task's: cheaper than gathering [B, H, F] weights
            hidden = F.linear(features, self.hidden_weight.reshape(tasks * width, -1))
            hidden = hidden.view(-1, tasks, width) + self.hidden_bias
            index = task_ids.view(-1, 1, 1).expand(-1, 1, width)
            features = ACTIVATIONS[self.activation](hidden.gather(1, index).squeeze(1))
        weight = self.weight[task_ids]  # [B, C_max, H]: tiny, a gather is cheapest here
        return torch.bmm(weight, features.unsqueeze(-1)).squeeze(-1) + self.bias[task_ids]


class MultiTaskModel(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        heads: Heads,
        task_names: list[str],
        mode: str = "none",
        rank: int = 16,
        seed: int = 0,
        branch_block: int = 0,
        adapter_form: str = "masked",
        attention_adapters: bool = False,
    ):
        """``branch_block`` k: SurgeryV2 adapters only after blocks k+1..L (1-based), so blocks
        1..k are shared by every task (k = 0: the paper's SurgeryV2; k = L: Surgery).
        ``attention_adapters``: SurgeryV2 also adapts the attention output of those blocks."""
        super().__init__()
        if mode not in SURGERY_MODES:
            raise ValueError(f"unknown surgery mode '{mode}'; valid: {', '.join(SURGERY_MODES)}")
        if not 0 <= branch_block <= backbone.num_blocks:
            raise ValueError(
                f"branch_block {branch_block} must be in 0..{backbone.num_blocks} (the blocks)"
            )
        self.backbone, self.heads = backbone, heads
        self.task_names, self.mode, self.rank = list(task_names), mode, rank
        self.branch_block = branch_block if mode == "surgeryv2" else 0
        num_tasks = len(task_names)
        self.block_adapters = None
        self.attention_adapters = None
        self.final_adapter = None
        adapted = backbone.num_blocks - self.branch_block
        if mode == "surgeryv2" and adapted > 0:  # position p adapts block branch_block + p
            self.block_adapters = Adapters(
                adapted, num_tasks, rank, backbone.width, seed, adapter_form
            )
            if attention_adapters:
                for index in range(self.branch_block, backbone.num_blocks):
                    backbone.attention_output(index)  # a backbone without one: a UserError now
                self.attention_adapters = Adapters(
                    adapted, num_tasks, rank, backbone.width, seed + 2, adapter_form
                )
        if mode in ("surgery", "surgeryv2"):
            self.final_adapter = Adapters(
                1, num_tasks, rank, backbone.feature_dim, seed + 1, adapter_form
            )

    @property
    def shared_blocks(self) -> int:
        """Blocks whose output is the same for every task: rows of one input may share them
        (all of them, and the pooling too, without block adapters)."""
        if self.block_adapters is None:
            return self.backbone.num_blocks
        return self.branch_block

    def set_adapter_form(self, form: str) -> None:
        """Switch every adapter to ``masked`` or ``gather`` (same maths, different cost)."""
        if form not in ADAPTER_FORMS:
            raise ValueError(f"unknown adapter form '{form}'; valid: {', '.join(ADAPTER_FORMS)}")
        for adapters in self.adapter_sets():
            adapters.form = form

    def adapter_sets(self) -> list[Adapters]:
        """The model's adapter stacks (block, attention, final), those it has."""
        sets = (self.block_adapters, self.attention_adapters, self.final_adapter)
        return [a for a in sets if a is not None]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapter_sets() for p in a.parameters()]

    @contextmanager
    def _attention_hooks(self, route: torch.Tensor | None):
        """While open, each adapted block's attention output passes through its task's
        attention adapter (forward hooks on the backbone's modules, removed on exit: the
        backbone module may be shared with another model, e.g. an export's task subset)."""
        handles = []
        if self.attention_adapters is not None:
            adapters, first = self.attention_adapters, self.branch_block

            def hook_for(position: int):
                def hook(module, args, output):
                    if isinstance(output, tuple):
                        return (adapters(position, output[0], route), *output[1:])
                    return adapters(position, output, route)

                return hook

            for index in range(first, self.backbone.num_blocks):
                module = self.backbone.attention_output(index)
                handles.append(module.register_forward_hook(hook_for(index - first)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def representations(
        self,
        batch: dict[str, torch.Tensor],
        task_ids: torch.Tensor,
        block_means: bool = False,
        input_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (final representation [R, F], each block's token-mean [R, D] after its adapter,
        or [] unless ``block_means``): the L + 1 vectors surgery aligns with the experts'.

        Row r is task ``task_ids[r]`` on input ``input_index[r]`` of ``batch`` (default: input
        r). With ``input_index``, everything before the first task-specific operation runs
        once per distinct input (``shared_blocks``), then the rows fan out.
        """
        adapters = self.block_adapters or self.final_adapter
        route = adapters.route(task_ids) if adapters is not None else None
        after_block = None
        if self.block_adapters is not None:
            first = self.branch_block

            def after_block(index: int, hidden: torch.Tensor) -> torch.Tensor:
                if index < first:
                    return hidden
                return self.block_adapters(index - first, hidden, route)

        fan_out = None if input_index is None else (self.shared_blocks, input_index)
        with self._attention_hooks(route):
            final, means = self.backbone.run(batch, after_block, block_means, fan_out)
        if self.final_adapter is not None:
            final = self.final_adapter(0, final, route)
        return final, means

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        task_ids: torch.Tensor,
        input_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> logits [R, C_max]; task t's classes first, padding columns at PAD_LOGIT.
        ``input_index`` [R]: which of ``batch``'s inputs each row reads (default: row r =
        input r)."""
        return self.heads(
            self.representations(batch, task_ids, input_index=input_index)[0], task_ids
        )
