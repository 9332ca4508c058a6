"""python -m trainer.export_experts: this project's experts written in their libraries'
formats, then merged back as given experts, reproduce the original table exactly (text:
sentence-transformers folders and transformers classifiers; images: an open_clip tower on a
base pre-trained here)."""

from __future__ import annotations

import json
import tomllib

import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModelForSequenceClassification

from tests.trainer.experts_kit import write_family
from tests.trainer.test_pretrain import _colour_npz
from trainer.backbones import HFTextBackbone
from trainer.export_experts import dump_toml
from trainer.export_experts import main as export_main
from trainer.fit import main as fit_main

TINY_RUN = """
[eval]
batch_size = 16
[merge]
methods = ["task_arithmetic", "adamerging"]
adamerging = {{ iterations = 2 }}
[surgery]
modes = ["none", "surgery", "surgeryv2"]
methods = ["task_arithmetic"]
rank = 4
iterations = 4
batch_size = 8
# transductive: the text_tasks fixture repeats its six sentences per task in train and test
unlabeled = "test"
"""


def _fit(config, tmp_path, out: str) -> dict:
    args = ["--config", str(config), "--data", str(tmp_path / "data"), "--out", str(tmp_path / out)]
    assert fit_main([*args, "--cache", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    return json.loads((tmp_path / out / "results.json").read_text())


def _round_trip(config, tmp_path) -> tuple[dict, dict]:
    """fit, export the experts, fit the exported config: (original, from exported experts)."""
    original = _fit(config, tmp_path, "original")
    args = ["--config", str(config), "--data", str(tmp_path / "data")]
    args += ["--out", str(tmp_path / "exported"), "--cache", str(tmp_path / "cache")]
    assert export_main([*args, "--device", "cpu"]) == 0
    again = _fit(tmp_path / "exported" / "experts.toml", tmp_path, "again")
    return original, again


def test_demo_suite_round_trip_through_sentence_transformers(tmp_path, tiny_bert_dir):
    config = tmp_path / "demo.toml"
    config.write_text(
        f"""
name = "tinydemo"
[demo]
train = 48
test = 24
tasks = ["creature", "feeling"]
[backbone]
kind = "hf_text"
path = "{tiny_bert_dir}"
max_length = 16
[finetune]
steps = 6
batch_size = 8
lr = 1e-3
"""
        + TINY_RUN.format()
    )
    original, again = _round_trip(config, tmp_path)
    assert again["rows"] == original["rows"] and again["bias"] == original["bias"]
    assert again["suite"] == "tinydemo-experts"
    exported = tmp_path / "exported"
    raw = tomllib.loads((exported / "experts.toml").read_text())
    assert "demo" not in raw and [t["name"] for t in raw["tasks"]] == ["creature", "feeling"]
    assert (exported / "data" / "creature" / "test.jsonl").is_file()
    # the folder is what sentence-transformers reads: its embedding is our expert's feature
    backbone = HFTextBackbone(tiny_bert_dir, max_length=16)
    state = load_file(next((tmp_path / "cache" / "experts").glob("creature-*.safetensors")))
    backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
    texts = ["the owl rested happily", "a wasp waited sadly in the city at dusk"]
    with torch.no_grad():
        ours = backbone(backbone.collate(texts))
    library = SentenceTransformer(str(exported / "creature")).encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(library.cpu(), ours, atol=1e-5, rtol=0)


def test_transformers_classifiers_round_trip(tmp_path, text_tasks):
    """Experts that came as BertForSequenceClassification go back out as such."""
    classes = {"animals": ["animal", "vehicle"], "colours": ["colour", "mood", "furniture"]}
    bert = write_family(tmp_path / "experts", "bert", classes)
    config = tmp_path / "bert.toml"
    tasks = "".join(
        f'[[tasks]]\nname = "{n}"\npath = "{{data}}/{n}"\nexpert = "{bert / n}"\n' for n in classes
    )
    config.write_text(
        f'name = "bert"\n[backbone]\npath = "{bert / "base"}"\nmax_length = 16\n'
        f'pooling = "cls"\n{TINY_RUN.format()}{tasks}'
    )
    original, again = _round_trip(config, tmp_path)
    assert again["rows"] == original["rows"] and again["bias"] == original["bias"]
    folder = tmp_path / "exported" / "colours"
    written = AutoModelForSequenceClassification.from_pretrained(folder)
    source = AutoModelForSequenceClassification.from_pretrained(bert / "colours")
    assert written.config.id2label == source.config.id2label
    for key, value in source.state_dict().items():
        torch.testing.assert_close(written.state_dict()[key], value, atol=0, rtol=0)


def test_open_clip_experts_on_a_base_pretrained_here(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _colour_npz(data / "corpus.npz", ["r", "g", "b"], 64, 32, 0)
    _colour_npz(data / "one.npz", ["r", "g", "b"], 32, 16, 1)
    _colour_npz(data / "two.npz", ["r", "g", "b", "dim-r", "dim-g"], 32, 16, 2)
    config = tmp_path / "vision.toml"
    config.write_text(
        """
name = "vision"
[backbone]
kind = "open_clip_vit"
path = ""
vision_cfg = { image_size = 16, patch_size = 8, width = 32, layers = 2, head_width = 16 }
embed_dim = 32
[pretrain]
name = "corpus"
path = "{data}/corpus.npz"
steps = 4
batch_size = 16
[finetune]
steps = 4
batch_size = 8
lr = 1e-3
[[tasks]]
name = "one"
path = "{data}/one.npz"
[[tasks]]
name = "two"
path = "{data}/two.npz"
"""
        + TINY_RUN.format()
    )
    original, again = _round_trip(config, tmp_path)
    assert again["rows"] == original["rows"] and again["bias"] == original["bias"]
    raw = tomllib.loads((tmp_path / "exported" / "experts.toml").read_text())
    assert "pretrain" not in raw and raw["backbone"]["path"].endswith("base/visual.safetensors")
    assert raw["tasks"][0]["head"].endswith("one/head.safetensors")


def test_dump_toml_reads_back():
    raw = {
        "name": "x",
        "seed": 3,
        "backbone": {"kind": "open_clip_vit", "vision_cfg": {"width": 32}, "path": 'a "b"'},
        "merge": {"methods": ["ties_merging"], "ties_merging": {"k": 20, "lam": 0.3}},
        "surgery": {"lr": 1e-05, "modes": ["none"], "enabled": True},
        "tasks": [{"name": "t", "path": "{data}/t"}, {"name": "u", "path": "/p/u"}],
    }
    assert tomllib.loads(dump_toml(raw)) == raw


def test_hf_vision_expert_and_base_written_in_their_format_and_read_back(tmp_path):
    """The hf_vision kind's writers: save_pretrained + preprocessor + head file, read back by
    the hf_vision expert format to the same tensors; the base reloads as the same function."""
    from transformers import ViTConfig, ViTModel

    from trainer.backbones import HFVisionBackbone
    from trainer.experts.expert import Expert
    from trainer.experts.formats import ExpertSource, load_expert
    from trainer.export_experts import write_base, write_expert
    from trainer.surgery.model import TaskHead

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    base = HFVisionBackbone(tmp_path / "vit")
    generator = torch.Generator().manual_seed(1)
    state = {
        k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in base.state_dict().items()
    }
    head = TaskHead(torch.randn(2, base.feature_dim, generator=generator), torch.zeros(2))
    files = write_expert(
        tmp_path / "cats", base, Expert("cats", state, head, "fine-tuned"), ["a", "b"]
    )
    assert files == {"expert": ".", "head": "head.safetensors"}
    source = ExpertSource(tmp_path / "cats", "cats", ["a", "b"], base, base.state_dict())
    loaded = load_expert(source)
    assert loaded.format == "hf_vision" and loaded.classes == ["a", "b"]
    for key, value in state.items():
        torch.testing.assert_close(loaded.state[key], value, atol=0, rtol=0)
    torch.testing.assert_close(loaded.head.weight, head.weight, atol=0, rtol=0)
    assert write_base(tmp_path / "base", base) == "."
    again = HFVisionBackbone(tmp_path / "base")
    pixels = torch.randn(2, 3, 16, 16, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(again({"pixel_values": pixels}), base({"pixel_values": pixels}))
