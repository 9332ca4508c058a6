"""Text experts in their own libraries' formats: transformers ``*ForSequenceClassification``
folders of every supported family and sentence-transformers folders (the packaged
all-MiniLM-L6-v2 among them), each written by its library; the loaded expert reproduces the
library's own logits, and every bad input is a one-line error before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import AutoModel, AutoModelForSequenceClassification

from tests.trainer.experts_kit import FAMILIES, TEXTS, classifier, copy_tokenizer, write_family
from trainer.backbones import HFTextBackbone
from trainer.backbones.hf_text import minilm_dir
from trainer.errors import UserError
from trainer.experts.formats import ExpertSource, load_expert
from trainer.experts.formats.registry import class_key, write_head_file
from trainer.surgery.model import Heads, MultiTaskModel, TaskHead

TASKS = {"sentiment": ["neg", "pos"], "topic": ["a", "b", "c"]}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family name, folder with base/ and one classifier folder per task)."""
    root = tmp_path_factory.mktemp(request.param)
    return request.param, write_family(root, request.param, TASKS)


def _source(path, base, classes=(), head=""):
    return ExpertSource(path, "t", list(classes), base, base.state_dict(), head)


def _expert_model(base, loaded) -> MultiTaskModel:
    """The base backbone holding the expert's weights, with the expert's head: what the
    pipeline scores as the individual row."""
    base.load_state_dict(loaded.state)
    return MultiTaskModel(base, Heads.stack([loaded.head], loaded.normalize), ["t"]).eval()


@torch.no_grad()
@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_blockwise_forward_equals_the_library(family, pooling):
    name, root = family
    backbone = HFTextBackbone(root / "base", max_length=16, pooling=pooling)
    batch = backbone.collate(TEXTS)
    assert batch["attention_mask"].min() == 0  # padding is exercised
    hidden = AutoModel.from_pretrained(root / "base").eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = {
        "cls": hidden[:, 0],
        "mean": (hidden * mask).sum(1) / mask.sum(1),
        "max": hidden.masked_fill(mask == 0, -1e9).max(1).values,
    }[pooling]
    torch.testing.assert_close(backbone(batch), want, atol=1e-5, rtol=0)
    assert backbone.num_blocks == 2 and backbone.width == 32 and backbone.model_type == name


@torch.no_grad()
def test_classifier_logits_equal_the_library(family):
    name, root = family
    base = HFTextBackbone(root / "base", max_length=16, pooling="cls")
    loaded = load_expert(_source(root / "topic", base, TASKS["topic"]))
    assert loaded.format == "transformers" and loaded.classes == ["a", "b", "c"]
    assert loaded.head.hidden_weight is not None  # the classification path stays per task
    assert not any("pooler" in k or "classifier" in k for k in loaded.state)
    model = _expert_model(base, loaded)
    batch = base.collate(TEXTS)
    ours = model(batch, torch.zeros(len(TEXTS), dtype=torch.long))
    library = AutoModelForSequenceClassification.from_pretrained(root / "topic").eval()
    want = library(**batch).logits
    assert want.abs().max() > 0.5  # logits far from zero: parity is not trivially met
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


def _random_head(classes: int, dim: int, scale: float) -> TaskHead:
    generator = torch.Generator().manual_seed(classes)
    weight = torch.randn(classes, dim, generator=generator) * scale
    return TaskHead(weight, torch.randn(classes, generator=generator))


def _sentence_transformer(out, encoder_dir, pooling: str, normalize: bool) -> SentenceTransformer:
    transformer = Transformer(str(encoder_dir), max_seq_length=16)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling)]
    st = SentenceTransformer(modules=modules + ([Normalize()] if normalize else []))
    st.save(str(out))
    return st


@torch.no_grad()
@pytest.mark.parametrize(
    "pooling,normalize", [("mean", False), ("mean", True), ("cls", False), ("max", True)]
)
def test_sentence_transformers_folder_with_a_head_file(tmp_path, pooling, normalize):
    root = write_family(tmp_path / "bert", "bert", {})
    encoder = classifier("bert", ["x", "y"], seed=3).base_model
    encoder.save_pretrained(copy_tokenizer(tmp_path / "encoder"))
    _sentence_transformer(tmp_path / "st", tmp_path / "encoder", pooling, normalize)
    generator = torch.Generator().manual_seed(0)
    head = TaskHead(
        torch.randn(3, 32, generator=generator) * 2, torch.randn(3, generator=generator)
    )
    write_head_file(tmp_path / "st" / "head.safetensors", head, ["p", "q", "r"], normalize)

    base = HFTextBackbone(root / "base", max_length=16, pooling=pooling)
    loaded = load_expert(_source(tmp_path / "st", base))
    assert loaded.format == "sentence-transformers" and loaded.pooling == pooling
    assert loaded.normalize == normalize and loaded.classes == ["p", "q", "r"]
    model = _expert_model(base, loaded)
    embeddings = SentenceTransformer(str(tmp_path / "st")).encode(TEXTS, convert_to_tensor=True)
    want = embeddings.cpu() @ head.weight.T + head.bias
    ours = model(base.collate(TEXTS), torch.zeros(len(TEXTS), dtype=torch.long))
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_packaged_all_minilm_is_a_sentence_transformers_expert(tmp_path):
    """The real all-MiniLM-L6-v2 folder (mean pooling + Normalize) with a head file given by
    the task's head key: logits = head(the library's own sentence embedding)."""
    generator = torch.Generator().manual_seed(1)
    head = TaskHead(
        torch.randn(4, 384, generator=generator) * 5, torch.randn(4, generator=generator)
    )
    write_head_file(tmp_path / "head.safetensors", head)
    base = HFTextBackbone(minilm_dir(), max_length=128, pooling="mean")
    loaded = load_expert(_source(minilm_dir(), base, head=str(tmp_path / "head.safetensors")))
    assert loaded.normalize and loaded.pooling == "mean" and loaded.classes is None
    model = _expert_model(base, loaded)
    embeddings = SentenceTransformer(str(minilm_dir())).encode(TEXTS, convert_to_tensor=True)
    ours = model(base.collate(TEXTS), torch.zeros(len(TEXTS), dtype=torch.long))
    torch.testing.assert_close(
        ours, embeddings.cpu() @ head.weight.T + head.bias, atol=1e-5, rtol=0
    )


# ---- bad experts: one line naming the problem, before any work ------------------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("bert-errors"), "bert", TASKS)


@pytest.fixture(scope="module")
def bert_base(bert):
    return HFTextBackbone(bert / "base", max_length=16, pooling="cls")


def _message(source) -> str:
    with pytest.raises(UserError) as err:
        load_expert(source)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_format_says_what_was_expected(tmp_path, bert_base):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path / "empty", tmp_path / "notes.txt"):
        message = _message(_source(path, bert_base))
        assert "no known format" in message and "ForSequenceClassification" in message
        assert "modules.json" in message


def test_architecture_mismatch_names_the_tensor(tmp_path, bert_base):
    wider = FAMILIES["bert"]()
    wider.intermediate_size = 48
    classifier("bert", ["a", "b"], 1, wider).save_pretrained(copy_tokenizer(tmp_path / "wide"))
    message = _message(_source(tmp_path / "wide", bert_base))
    assert "model.encoder.layer.0.intermediate.dense.weight" in message
    assert "[48, 32]" in message and "[64, 32]" in message
    classifier("roberta", ["a", "b"], 1).save_pretrained(copy_tokenizer(tmp_path / "roberta"))
    assert "model_type is 'roberta'" in _message(_source(tmp_path / "roberta", bert_base))


def test_head_with_the_wrong_class_count(bert, bert_base):
    message = _message(_source(bert / "topic", bert_base, ["x", "y"]))
    assert "head has 3 classes" in message and "has 2" in message


def test_pooling_the_head_does_not_read(bert):
    mean = HFTextBackbone(bert / "base", max_length=16, pooling="mean")
    assert 'set [backbone] pooling = "cls"' in _message(_source(bert / "topic", mean))


def test_corrupt_weights_and_head_files(tmp_path, bert, bert_base):
    shutil.copytree(bert / "topic", tmp_path / "topic")
    weights = tmp_path / "topic" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "cannot be loaded by transformers" in _message(_source(tmp_path / "topic", bert_base))
    (tmp_path / "head.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    source = _source(minilm_dir(), bert_base, head=str(tmp_path / "head.safetensors"))
    assert "not a readable safetensors file" in _message(source)


def test_regressor_unsupported_module_and_missing_head(tmp_path, bert, bert_base):
    classifier("bert", ["score"], 1).save_pretrained(copy_tokenizer(tmp_path / "regressor"))
    assert "regressor" in _message(_source(tmp_path / "regressor", bert_base))
    shutil.copytree(minilm_dir(), tmp_path / "st")
    assert "carries no classification head" in _message(_source(tmp_path / "st", bert_base))
    modules = json.loads((tmp_path / "st" / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "x.models.Dense"})
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    assert "module Dense is not supported" in _message(_source(tmp_path / "st", bert_base))


# ---- class names matched to the task's ------------------------------------------------------


def _logits(folder, loaded) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, the library's) logits of TEXTS: the loaded expert on a fresh base backbone, and
    the transformers classifier in ``folder``."""
    base = HFTextBackbone(folder, max_length=16, pooling="cls")
    with torch.no_grad():
        ours = _expert_model(base, loaded)(
            base.collate(TEXTS), torch.zeros(len(TEXTS), dtype=torch.long)
        )
        library = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        return ours, library(**base.collate(TEXTS)).logits


@pytest.mark.parametrize("task", [["c", "b", "a"], ["b", "c", "a"]], ids=["reversed", "cycled"])
def test_classes_in_another_order_are_remapped(bert, bert_base, task, caplog):
    """The expert's id2label is a, b, c; the task lists the same names in another order: the
    head's rows are reordered so that output i is the task's class i."""
    caplog.set_level("INFO", logger="deepsurgery")
    loaded = load_expert(_source(bert / "topic", bert_base, task))
    assert loaded.classes == task
    ours, library = _logits(bert / "topic", loaded)
    assert library.abs().max() > 0.5 and not torch.allclose(ours, library, atol=1e-3)
    order = [["a", "b", "c"].index(name) for name in task]
    torch.testing.assert_close(ours, library[:, order], atol=1e-5, rtol=0)
    lines = [r.getMessage() for r in caplog.records if "another order" in r.getMessage()]
    assert len(lines) == 1 and "(a, b, c)" in lines[0] and f"({', '.join(task)})" in lines[0]


def test_names_are_compared_case_and_spacing_blind(bert, bert_base, caplog):
    caplog.set_level("INFO", logger="deepsurgery")
    loaded = load_expert(_source(bert / "topic", bert_base, [" A", "b ", "C"]))
    assert loaded.classes == [" A", "b ", "C"]  # the same order: nothing to say
    assert not [r for r in caplog.records if r.name == "deepsurgery"]
    ours, library = _logits(bert / "topic", loaded)
    torch.testing.assert_close(ours, library, atol=1e-5, rtol=0)
    assert class_key("Sci/Tech") == class_key("sci/tech")
    assert class_key("annual_crop") == class_key("Annual  Crop") == class_key("annual-crop")
    assert class_key("sci") != class_key("science")


def test_class_names_that_are_not_the_tasks_are_refused(bert, bert_base):
    message = _message(_source(bert / "topic", bert_base, ["a", "b", "x"]))
    assert "its classes (a, b, c) are not those of task 't' (a, b, x)" in message
    assert "'c' is not among them" in message and "id2label" in message
    # names that differ only in case are compared case-sensitively (here: "c" is missing)
    assert "'c' is not among them" in _message(_source(bert / "topic", bert_base, "abB"))
    assert "task 't' names class 'b ' twice" in _message(
        _source(bert / "topic", bert_base, ["a", "b", "b "])
    )


def test_generic_label_names_keep_the_index_order(tmp_path, bert, bert_base, caplog):
    """A classifier saved without id2label names its classes LABEL_0, LABEL_1, ... (what
    transformers writes by default): its outputs are the task's classes in index order."""
    config = FAMILIES["bert"]()
    config.num_labels = 3
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(copy_tokenizer(tmp_path / "generic"))
    caplog.set_level("INFO", logger="deepsurgery")
    loaded = load_expert(_source(tmp_path / "generic", bert_base, ["x", "y", "z"]))
    assert loaded.classes == ["x", "y", "z"]
    ours, library = _logits(tmp_path / "generic", loaded)
    torch.testing.assert_close(ours, library, atol=1e-5, rtol=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "deepsurgery"]
    assert len(lines) == 1 and "its class names LABEL_0, LABEL_1, LABEL_2 are generic" in lines[0]
    assert "taken in index order as the task's classes (x, y, z)" in lines[0]
    generic = ["LABEL_0", "LABEL_1", "LABEL_2"]  # the task's names say nothing: index order
    loaded = load_expert(_source(bert / "topic", bert_base, generic))
    ours, library = _logits(bert / "topic", loaded)
    torch.testing.assert_close(ours, library, atol=1e-5, rtol=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "deepsurgery"]
    assert len(lines) == 2 and "the task's class names LABEL_0, LABEL_1" in lines[1]


def test_a_head_file_names_its_classes_in_another_order(tmp_path, bert_base, caplog):
    head = _random_head(3, 384, 1.0)
    write_head_file(tmp_path / "head.safetensors", head, ["p", "q", "r"])
    base = HFTextBackbone(minilm_dir(), max_length=128, pooling="mean")
    source = _source(minilm_dir(), base, ["r", "p", "q"], str(tmp_path / "head.safetensors"))
    loaded = load_expert(source)
    torch.testing.assert_close(loaded.head.weight, head.weight[[2, 0, 1]])
    torch.testing.assert_close(loaded.head.bias, head.bias[[2, 0, 1]])
    caplog.set_level("INFO", logger="deepsurgery")
    write_head_file(tmp_path / "unnamed.safetensors", head)  # no names: taken in order
    source = _source(minilm_dir(), base, ["r", "p", "q"], str(tmp_path / "unnamed.safetensors"))
    torch.testing.assert_close(load_expert(source).head.weight, head.weight)
    lines = [r.getMessage() for r in caplog.records if r.name == "deepsurgery"]
    assert len(lines) == 1 and "names no classes" in lines[0]
