"""Tiny experts written by their own libraries: transformers ``save_pretrained`` of
``*ForSequenceClassification`` models of every supported family, and sentence-transformers
folders. Seeded, a fraction of a second each; every weight is perturbed so that a skipped op
could not hide behind the library's init constants."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification

from trainer.backbones.hf_text import minilm_dir

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
TEXTS = [
    "a short one",
    "a noticeably longer sentence about the markets and the weather today",
    "mid length text here",
    "the cat sat on the mat",
]
SIZES = {"vocab_size": 30522, "max_position_embeddings": 64}
FAMILIES = {
    "bert": lambda: transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **SIZES
    ),
    "roberta": lambda: transformers.RobertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=0,  # MiniLM's tokenizer pads with 0: positions then skip the padding
        **SIZES,
    ),
    "distilbert": lambda: transformers.DistilBertConfig(
        dim=32, n_layers=2, n_heads=2, hidden_dim=64, **SIZES
    ),
    "electra": lambda: transformers.ElectraConfig(
        embedding_size=16,  # narrower than hidden: exercises embeddings_project
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        **SIZES,
    ),
    "mpnet": lambda: transformers.MPNetConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **SIZES
    ),
}


def copy_tokenizer(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm_dir() / name, out / name)
    return out


def perturb(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def classifier(family: str, labels: list[str], seed: int = 0, config=None):
    """A ``*ForSequenceClassification`` of ``family``: the encoder from seed 0 (the shared
    base), the head and a small fine-tuning delta from ``seed``."""
    config = config or FAMILIES[family]()
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    perturb(model, 0, 0.1)  # the "pretrained" base: every model of a family starts here
    if seed:
        perturb(model, seed, 0.02)  # the fine-tuning delta
        head = [m for n, m in model.named_modules() if n.startswith(("classifier", "pre_"))]
        for module in head:  # a head of its own
            perturb(module, seed + 1000, 0.3)
    return model.eval()


def write_family(root: Path, family: str, experts: dict[str, list[str]], config=None) -> Path:
    """root/base (the bare encoder) and root/<task> (a classifier per task), each a
    save_pretrained folder with MiniLM's tokenizer. -> root."""
    base = classifier(family, ["a", "b"], 0, config)
    base.base_model.save_pretrained(copy_tokenizer(root / "base"))
    for i, (task, labels) in enumerate(experts.items(), 1):
        classifier(family, labels, i, config).save_pretrained(copy_tokenizer(root / task))
    return root
