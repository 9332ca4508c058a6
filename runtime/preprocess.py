"""Turn a request's input into one model row, exactly as the manifest says training did.

Image (open_clip's eval transform): convert("RGB"); resize so the shorter side equals the
target (PIL resize, aspect kept, long side int(size * long / short) like torchvision); center
crop (top = int(round((h - th) / 2))); float32 / 255; (x - mean) / std; CHW. transformers'
image processors (PIL backend) set ``resize_size`` (a shortest edge, or [h, w] with
``resize: exact_then_center_crop``) apart from the crop ``image_size``, and ``crop_offset:
floor`` (top = (h - th) // 2).
Text: the export's `tokenizer.json` with truncation to max_length; rows of one batch are padded
to the batch's longest row with the manifest's pad id and attention_mask 0.
Only numpy, pillow and tokenizers: the server must run without torch.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.api import InvalidArgument
from runtime.manifest import ModelSpec

MAX_IMAGE_PIXELS = 40_000_000  # ~6300x6300; beyond this decoding alone would stall a worker
_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class InputError(InvalidArgument):
    """The request's input cannot be turned into a model row (INVALID_ARGUMENT)."""


def _shortest_edge_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """(new_h, new_w) covering (th, tw) with aspect kept, rounded as torchvision's Resize."""
    if th == tw:
        size = th
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)
    scale = max(th / h, tw / w)  # non-square target: scale until both sides cover it
    return max(th, round(h * scale)), max(tw, round(w * scale))


class ImagePreprocessor:
    """Encoded image bytes -> pixel_values row [3, H, W] float32."""

    modality = "image"

    def __init__(self, cfg: dict[str, Any]):
        self.size = (int(cfg["image_size"][0]), int(cfg["image_size"][1]))
        self.mean = np.asarray(cfg["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(cfg["std"], dtype=np.float32).reshape(3, 1, 1)
        interp = cfg.get("interpolation", "bicubic")
        if interp not in _INTERPOLATION:
            raise ValueError(f"manifest interpolation {interp!r} not one of {list(_INTERPOLATION)}")
        self.resample = _INTERPOLATION[interp]
        resize = cfg.get("resize", "shortest_edge_then_center_crop")
        if resize not in ("shortest_edge_then_center_crop", "exact_then_center_crop"):
            raise ValueError(f"manifest resize {resize!r} is not supported")
        self.exact = resize == "exact_then_center_crop"
        self.resize_size = cfg.get("resize_size")  # None: resize to the crop size itself
        if self.exact and self.resize_size is None:
            self.resize_size = list(self.size)
        self.floor_crop = cfg.get("crop_offset", "round") == "floor"
        self.row_shape = (3, *self.size)
        self.row_dtype = np.dtype(np.float32)

    def pil_to_row(self, img: Image.Image) -> np.ndarray:
        """A decoded PIL image -> [3, H, W] float32, normalized."""
        img = img.convert("RGB")
        th, tw = self.size
        w, h = img.size
        if self.exact:
            new_h, new_w = (int(s) for s in self.resize_size)
        elif self.resize_size is not None:
            new_h, new_w = _shortest_edge_size(h, w, int(self.resize_size), int(self.resize_size))
        else:
            new_h, new_w = _shortest_edge_size(h, w, th, tw)
        if (new_h, new_w) != (h, w):
            img = img.resize((new_w, new_h), resample=self.resample)
        if self.floor_crop:
            top, left = (new_h - th) // 2, (new_w - tw) // 2
        else:
            top = int(round((new_h - th) / 2.0))
            left = int(round((new_w - tw) / 2.0))
        if (top, left, th, tw) != (0, 0, new_h, new_w):
            img = img.crop((left, top, left + tw, top + th))
        x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        x = x.transpose(2, 0, 1)
        return np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)

    def image(self, data: bytes) -> np.ndarray:
        if not data:
            raise InputError("input.image is empty; send the encoded file's bytes (PNG, JPEG, ...)")
        try:
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"input.image is {w}x{h} pixels, over the {MAX_IMAGE_PIXELS} limit; "
                    "downscale it before sending"
                )
            img.load()
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(
                f"input.image could not be decoded ({len(data)} bytes: {e}); "
                "send a complete PNG, JPEG, PPM or other file pillow reads"
            ) from None
        return self.pil_to_row(img)

    def text(self, text: str) -> np.ndarray:
        raise InputError("this model classifies images: send input.image or input.tensor, not text")

    def tensor_row(self, arr: np.ndarray) -> np.ndarray:
        if not np.isfinite(arr).all():
            raise InputError("input.tensor holds NaN or Inf; send finite normalized pixel values")
        return arr

    def collate(self, rows: list[np.ndarray]) -> dict[str, np.ndarray]:
        """rows of [3, H, W] -> {"pixel_values": [B, 3, H, W]}."""
        return {"pixel_values": np.stack(rows)}


class TextPreprocessor:
    """Text -> input_ids row [S] int64 (S <= max_length); collate pads a batch."""

    modality = "text"

    def __init__(self, cfg: dict[str, Any], root: Path):
        from tokenizers import Tokenizer

        path = root / cfg.get("tokenizer", "tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"{path}: cannot load tokenizer ({e})") from None
        self.max_length = int(cfg["max_length"])
        self.pad_id = int(cfg.get("pad_token_id", 0))
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.no_padding()  # padding is per batch, in collate
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.row_shape = None  # [S], S varies
        self.row_dtype = np.dtype(np.int64)

    def image(self, data: bytes) -> np.ndarray:
        raise InputError("this model classifies text: send input.text or input.tensor, not image")

    def text(self, text: str) -> np.ndarray:
        if not text or not text.strip():
            raise InputError("input.text is empty or whitespace only; send the text to classify")
        ids = self.tokenizer.encode(text).ids
        return np.asarray(ids, dtype=np.int64)

    def tensor_row(self, arr: np.ndarray) -> np.ndarray:
        if arr.shape[0] == 0 or arr.shape[0] > self.max_length:
            raise InputError(
                f"input.tensor has {arr.shape[0]} token ids; send 1..{self.max_length} "
                "(the manifest's max_length)"
            )
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            raise InputError(
                f"input.tensor token ids must be in [0, {self.vocab_size}) (the tokenizer's "
                f"vocabulary); got values in [{lo}, {hi}]"
            )
        return arr

    def collate(self, rows: list[np.ndarray]) -> dict[str, np.ndarray]:
        """rows of [S_i] -> input_ids and attention_mask [B, max S_i], right-padded."""
        length = max(len(r) for r in rows)
        ids = np.full((len(rows), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


Preprocessor = ImagePreprocessor | TextPreprocessor
_DTYPES = {"float32": np.float32, "int64": np.int64}


def make_preprocessor(spec: ModelSpec) -> Preprocessor:
    if spec.modality == "image":
        return ImagePreprocessor(spec.preprocessing)
    return TextPreprocessor(spec.preprocessing, spec.root)


def decode_tensor(pre: Preprocessor, dtype: str, shape: list[int], data: bytes) -> np.ndarray:
    """A proto Tensor -> one checked row (the batch dimension, if sent, must be 1)."""
    want = pre.row_dtype
    if dtype not in _DTYPES or np.dtype(_DTYPES[dtype]) != want:
        raise InputError(
            f"input.tensor dtype {dtype!r} is wrong; this {pre.modality} model takes {want.name}"
        )
    shape = list(shape)
    want_rank = 3 if pre.modality == "image" else 1
    if len(shape) == want_rank + 1 and shape[0] == 1:
        shape = shape[1:]
    expected = "[3, H, W]" if pre.modality == "image" else "[S] token ids"
    if pre.row_shape is not None:
        ok = tuple(shape) == pre.row_shape
        expected = str(list(pre.row_shape))
    else:
        ok = len(shape) == 1
    if not ok or any(s < 0 for s in shape):
        raise InputError(f"input.tensor shape {list(shape)} is wrong; this model takes {expected}")
    count = math.prod(shape)
    if len(data) != count * want.itemsize:
        raise InputError(
            f"input.tensor data has {len(data)} bytes; shape {shape} of {want.name} needs "
            f"{count * want.itemsize} (raw little-endian, row-major)"
        )
    arr = np.frombuffer(data, dtype=want.newbyteorder("<")).reshape(shape).astype(want)
    return pre.tensor_row(arr)
