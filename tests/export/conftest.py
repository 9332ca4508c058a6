"""Tiny bundles for the export tests: a 2-block BERT and a 2-block ViT, random adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.backbones import HFTextBackbone, OpenClipViTBackbone
from trainer.results.bundle import write_bundle
from trainer.surgery.model import Heads, MultiTaskModel

TASKS = {
    "animals": ["cat", "dog"],
    "colours": ["red", "green", "blue"],
    "moods": ["happy", "sad", "calm", "angry"],
}
TINY_VIT = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}


def build_model(
    kind: str,
    mode: str,
    bert_dir: Path,
    seed: int = 0,
    branch_block: int = 0,
    attention_adapters: bool = False,
):
    """A MultiTaskModel on a tiny backbone with random heads and adapters (seeded); SurgeryV2
    adapters after blocks ``branch_block``+1..L (and on their attention outputs)."""
    if kind == "text":
        backbone = HFTextBackbone(bert_dir, max_length=16)
    else:
        backbone = OpenClipViTBackbone(vision_cfg=TINY_VIT, embed_dim=32)
    generator = torch.Generator().manual_seed(seed)
    sizes = [len(c) for c in TASKS.values()]
    # spread-out logits: fp16 top-1 is then decided by margins, not by near-ties
    scale = 4.0 if backbone.normalize_head else 1.0
    heads = Heads(
        [torch.randn(n, backbone.feature_dim, generator=generator) * scale for n in sizes],
        [torch.randn(n, generator=generator) for n in sizes],
        normalize=backbone.normalize_head,
    )
    model = MultiTaskModel(
        backbone,
        heads,
        list(TASKS),
        mode=mode,
        rank=4,
        branch_block=branch_block,
        attention_adapters=attention_adapters,
    ).eval()
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory, tiny_bert_dir):
    """make_bundle(kind, mode, branch_block=0) -> a read-only bundle dir at
    <tmp>/runs/<kind>-<mode>[-k<branch_block>]/bundle."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("export-runs")
    cache: dict[tuple[str, str, int], Path] = {}

    def make(kind: str, mode: str, branch_block: int = 0) -> Path:
        if (kind, mode, branch_block) not in cache:
            model = build_model(kind, mode, tiny_bert_dir, branch_block=branch_block)
            suffix = f"-k{branch_block}" if branch_block else ""
            directory = root / "runs" / f"{kind}-{mode}{suffix}" / "bundle"
            write_bundle(
                directory,
                model,
                list(TASKS.values()),
                {"suite": "tiny", "merge": {"method": "task_arithmetic"}},
            )
            cache[kind, mode, branch_block] = directory
        return cache[kind, mode, branch_block]

    return make
