"""The one multi-task forward pass: adapters, heads, mixed-task batches."""

import copy

import pytest
import torch

from trainer.backbones import HFTextBackbone, OpenClipViTBackbone
from trainer.surgery.adapters import Adapters
from trainer.surgery.model import PAD_LOGIT, Heads, MultiTaskModel


def _model(tiny_bert_dir, mode, rank=4):
    torch.manual_seed(0)
    backbone = HFTextBackbone(tiny_bert_dir, max_length=16)
    heads = Heads([torch.randn(2, 32), torch.randn(3, 32)], [torch.randn(2), torch.randn(3)])
    return MultiTaskModel(backbone, heads, ["a", "b"], mode, rank).eval()


@torch.no_grad()
def test_step_zero_surgered_model_is_the_merged_model(tiny_bert_dir):
    plain = _model(tiny_bert_dir, "none")
    batch = plain.backbone.collate(["one text", "another longer text here", "x"])
    ids = torch.tensor([0, 1, 1])
    for mode in ("surgery", "surgeryv2"):
        surgered = _model(tiny_bert_dir, mode)
        surgered.backbone.load_state_dict(plain.backbone.state_dict())
        assert torch.equal(surgered(batch, ids), plain(batch, ids))
        assert surgered.adapter_parameters()[0].abs().sum() > 0  # W_down is not zero


@torch.no_grad()
def test_mixed_task_batch_equals_per_task_batches(tiny_bert_dir):
    model = _model(tiny_bert_dir, "surgeryv2")
    for p in model.adapter_parameters():
        p.normal_(0, 0.3)  # non-trivial adapters
    texts = ["alpha beta", "gamma delta epsilon", "zeta", "eta theta"]
    ids = torch.tensor([1, 0, 1, 0])
    mixed = model(model.backbone.collate(texts), ids)
    for i, text in enumerate(texts):
        alone = model(model.backbone.collate([text]), ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)


def test_adapter_formula_and_task_isolation():
    adapters = Adapters(positions=1, num_tasks=3, rank=2, dim=4, seed=0)
    with torch.no_grad():
        adapters.up.normal_()
    x = torch.randn(3, 4)
    ids = torch.tensor([2, 0, 1])
    out = adapters(0, x, adapters.route(ids))
    for row, t in enumerate(ids.tolist()):
        down, up = adapters.down[0, t], adapters.up[0, t]
        expected = x[row] - up @ torch.relu(down @ x[row])
        torch.testing.assert_close(out[row], expected)
    # a row's loss gives gradient to its own task's adapter only
    out[0].sum().backward()
    assert adapters.up.grad[0, 2].abs().sum() > 0
    assert adapters.up.grad[0, 0].abs().sum() == 0 and adapters.up.grad[0, 1].abs().sum() == 0


def test_heads_pad_columns():
    heads = Heads([torch.ones(2, 4), torch.ones(3, 4)], [torch.zeros(2), torch.zeros(3)])
    logits = heads(torch.ones(2, 4), torch.tensor([0, 1]))
    assert logits.shape == (2, 3)
    assert logits[0, 2] == PAD_LOGIT and logits[1, 2] == 4.0


def test_gather_form_equals_masked_form_values_and_gradients():
    torch.manual_seed(0)
    for shape in ((5, 8), (5, 3, 8)):  # pooled [B, D] and tokens [B, N, D]
        masked = Adapters(positions=2, num_tasks=4, rank=3, dim=8, seed=1)
        with torch.no_grad():
            masked.up.normal_()
        gather = Adapters(positions=2, num_tasks=4, rank=3, dim=8, seed=1, form="gather")
        gather.load_state_dict(masked.state_dict())
        x, ids = torch.randn(*shape), torch.tensor([3, 0, 3, 1, 2])
        a, b = masked(1, x, masked.route(ids)), gather(1, x, gather.route(ids))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        a.square().sum().backward()
        b.square().sum().backward()
        torch.testing.assert_close(masked.down.grad, gather.down.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(masked.up.grad, gather.up.grad, atol=1e-5, rtol=0)


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_branch_block_places_adapters_after_blocks_k_plus_1_to_L(tiny_bert_dir):
    plain = _model(tiny_bert_dir, "none")
    for k, positions in ((0, 2), (1, 1), (2, 0)):
        model = MultiTaskModel(plain.backbone, plain.heads, ["a", "b"], "surgeryv2", 4, 0, k)
        assert model.shared_blocks == (2 if k == 2 else k)
        got = 0 if model.block_adapters is None else model.block_adapters.down.shape[0]
        assert got == positions
    # k = L keeps only the final adapter: the same model as Surgery
    full = _randomise(MultiTaskModel(plain.backbone, plain.heads, ["a", "b"], "surgeryv2", 4, 0, 2))
    v1 = MultiTaskModel(plain.backbone, plain.heads, ["a", "b"], "surgery", 4)
    v1.load_state_dict(full.state_dict())
    batch, ids = plain.backbone.collate(["one text", "two words here"]), torch.tensor([1, 0])
    with torch.no_grad():
        torch.testing.assert_close(full(batch, ids), v1(batch, ids))


@torch.no_grad()
def test_rows_of_repeated_inputs_fan_out_after_the_shared_blocks(tiny_bert_dir):
    """forward(distinct inputs, task_ids, input_index) == forward(every row's own input)."""
    plain = _model(tiny_bert_dir, "none")
    texts = ["alpha beta", "gamma delta epsilon zeta", "eta"]
    index = torch.tensor([2, 0, 0, 1, 2, 0])  # repeated inputs, tasks mixed
    ids = torch.tensor([0, 0, 1, 1, 1, 0])
    distinct = plain.backbone.collate(texts)
    expanded = plain.backbone.collate([texts[i] for i in index])
    for mode, k in (("none", 0), ("surgery", 0), ("surgeryv2", 0), ("surgeryv2", 1)):
        model = MultiTaskModel(plain.backbone, plain.heads, ["a", "b"], mode, 4, 0, k)
        _randomise(model)
        for form in ("masked", "gather"):
            model.set_adapter_form(form)
            want = model(expanded, ids)
            torch.testing.assert_close(model(distinct, ids, index), want, atol=1e-5, rtol=0)
            final, means = model.representations(distinct, ids, True, index)
            ref_final, ref_means = model.representations(expanded, ids, True)
            torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=0)
            for a, b in zip(means, ref_means, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
def test_fan_out_on_a_vit():
    backbone = OpenClipViTBackbone(
        vision_cfg={"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        embed_dim=32,
    )
    heads = Heads([torch.randn(2, 32), torch.randn(3, 32)], [torch.randn(2), torch.randn(3)], True)
    model = _randomise(MultiTaskModel(backbone, heads, ["a", "b"], "surgeryv2", 4, 0, 1))
    images = torch.randn(2, 3, 16, 16)
    index, ids = torch.tensor([1, 1, 0]), torch.tensor([0, 1, 1])
    want = model({"pixel_values": images[index]}, ids)
    torch.testing.assert_close(model({"pixel_values": images}, ids, index), want, atol=1e-5, rtol=0)


# ---- attention adapters ------------------------------------------------------------------


def _text_backbone(family: str, root, tokenizer_dir) -> HFTextBackbone:
    """A tiny seeded 2-block encoder of ``family`` written by transformers itself."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = tokenizer.vocab_size
    if family == "distilbert":
        config = transformers.DistilBertConfig(
            dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=vocab
        )
    else:
        cls = {
            "roberta": transformers.RobertaConfig,
            "electra": transformers.ElectraConfig,
            "mpnet": transformers.MPNetConfig,
        }[family]
        config = cls(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=vocab,
        )
    torch.manual_seed(0)
    folder = root / family
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return HFTextBackbone(folder, max_length=16)


def _vision_backbone(family: str, root):
    import transformers

    from trainer.backbones import HFVisionBackbone

    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    if family == "vit":
        model = transformers.ViTModel(
            transformers.ViTConfig(**tiny, intermediate_size=64, image_size=16, patch_size=8),
            add_pooling_layer=False,
        )
        processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16})
    elif family == "dinov2":
        model = transformers.Dinov2Model(
            transformers.Dinov2Config(
                **tiny, mlp_ratio=2, image_size=16, patch_size=8, layerscale_value=0.5
            )
        )
        processor = transformers.BitImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        )
    else:
        model = transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(**tiny, intermediate_size=64, image_size=16, patch_size=8)
        )
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        )
    folder = root / family
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return HFVisionBackbone(folder)


def _backbone(family, root, tiny_bert_dir):
    if family == "bert":
        return HFTextBackbone(tiny_bert_dir, max_length=16)
    if family in ("roberta", "distilbert", "electra", "mpnet"):
        return _text_backbone(family, root, tiny_bert_dir)
    if family == "open_clip":
        return OpenClipViTBackbone(
            vision_cfg={
                "image_size": 16,
                "patch_size": 8,
                "width": 32,
                "layers": 2,
                "head_width": 16,
            },
            embed_dim=32,
        )
    return _vision_backbone(family, root)


FAMILIES = (
    "bert",
    "roberta",
    "distilbert",
    "electra",
    "mpnet",
    "vit",
    "dinov2",
    "clip",
    "open_clip",
)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_adapters_sit_on_the_attention_output(family, tmp_path, tiny_bert_dir):
    """An attention adapter that cancels its input (W_down = [I; -I], W_up = [I, -I]: the
    ReLU pair rebuilds x, so x - x = 0) must act exactly as a zeroed attention output
    projection: the model then equals the plain model on a backbone whose adapted blocks'
    attention projection weights are zero. Block 0 is shared (branch_block = 1), so only
    block 1's attention is removed; at step 0 (W_up = 0) nothing changes at all."""
    torch.manual_seed(0)
    backbone = _backbone(family, tmp_path, tiny_bert_dir).eval()
    dim, width = backbone.feature_dim, backbone.width
    heads = Heads([torch.randn(2, dim), torch.randn(3, dim)], [torch.randn(2), torch.randn(3)])
    if backbone.modality == "text":
        batch = backbone.collate(["one text", "another longer text here", "x"])
    else:
        batch = {"pixel_values": torch.randn(3, 3, 16, 16)}
    ids = torch.tensor([0, 1, 1])
    plain = MultiTaskModel(backbone, heads, ["a", "b"], "none").eval()
    model = MultiTaskModel(
        backbone, heads, ["a", "b"], "surgeryv2", 2 * width, 0, 1, attention_adapters=True
    ).eval()
    assert model.attention_adapters.down.shape == (1, 2, 2 * width, width)
    torch.testing.assert_close(model(batch, ids), plain(batch, ids), atol=1e-6, rtol=0)

    eye = torch.eye(width)
    model.attention_adapters.down.copy_(torch.cat([eye, -eye]).expand(1, 2, -1, -1))
    model.attention_adapters.up.copy_(torch.cat([eye, -eye], dim=1).expand(1, 2, -1, -1))
    zeroed = copy.deepcopy(backbone)
    projection = zeroed.attention_output(1)
    if not list(projection.parameters()):  # open_clip's ls_1 is an Identity: zero the MHA's
        projection = zeroed.visual.transformer.resblocks[1].attn.out_proj
    for p in projection.parameters():
        p.zero_()
    reference = MultiTaskModel(zeroed, heads, ["a", "b"], "none").eval()
    want = reference(batch, ids)
    assert (want - plain(batch, ids)).abs().max() > 1e-3  # removing the attention matters
    for form in ("masked", "gather"):
        model.set_adapter_form(form)
        torch.testing.assert_close(model(batch, ids), want, atol=1e-5, rtol=0)
    # the hooks live only inside the forward pass: the shared backbone is left as it was
    assert not any(m._forward_hooks for m in backbone.modules())


@torch.no_grad()
def test_attention_adapters_keep_rows_apart_and_fan_out(tiny_bert_dir):
    plain = _model(tiny_bert_dir, "none")
    model = MultiTaskModel(
        plain.backbone, plain.heads, ["a", "b"], "surgeryv2", 4, 0, 1, attention_adapters=True
    )
    _randomise(model)
    assert len(model.adapter_parameters()) == 6  # block, attention and final: down and up
    texts = ["alpha beta", "gamma delta epsilon zeta", "eta"]
    index, ids = torch.tensor([2, 0, 0, 1, 2]), torch.tensor([0, 0, 1, 1, 1])
    expanded = plain.backbone.collate([texts[i] for i in index])
    mixed = model(expanded, ids)
    for row in range(len(index)):  # a mixed batch equals each row alone
        alone = model(plain.backbone.collate([texts[index[row]]]), ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        model(plain.backbone.collate(texts), ids, index), mixed, atol=1e-5, rtol=0
    )
    # the attention adapters change the output (they are in the graph, not only in the state)
    without = MultiTaskModel(plain.backbone, plain.heads, ["a", "b"], "surgeryv2", 4, 0, 1)
    state = {k: v for k, v in model.state_dict().items() if "attention_adapters" not in k}
    without.load_state_dict(state)
    assert (without(expanded, ids) - mixed).abs().max() > 1e-4


def test_attention_adapters_need_an_exposed_attention_output(tiny_bert_dir):
    from trainer.backbones.base import Backbone
    from trainer.errors import UserError

    class Opaque(Backbone):
        kind, num_blocks, width, feature_dim = "opaque", 2, 8, 8

    heads = Heads([torch.randn(2, 8)], [torch.randn(2)])
    with pytest.raises(UserError, match="does not expose its attention outputs"):
        MultiTaskModel(Opaque(), heads, ["a"], "surgeryv2", 2, attention_adapters=True)
    # without SurgeryV2 the setting adds nothing, and asks nothing of the backbone
    assert MultiTaskModel(Opaque(), heads, ["a"], "surgery", 2, attention_adapters=True)
