"""Images in, CLIP-ready tensors out.

CLIP was trained on images prepared in one particular way; features only mean something if we
prepare ours identically:

    any PIL image --to RGB--> resize shortest side to 224 (bicubic) --> center crop 224x224
                  --> scale to [0, 1] --> normalise with CLIP's mean/std --> FloatTensor[3, 224, 224]

Everything here is pillow + numpy, so results match the reference ``CLIPImageProcessor`` (which also
resizes with pillow on 8-bit pixels) to about 1e-6.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageLoadError(ValueError):
    """An image file could not be read; the message names the file."""


def load_image(path) -> Image.Image:
    """Open an image file fully (not lazily), apply its EXIF orientation, return it in RGB."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()  # force decoding now, so truncated files fail here and not later
            im = ImageOps.exif_transpose(im)  # phone photos store "rotate me" in EXIF
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB. Transparent pixels are composited on white (as CLIP's reference
    preprocessing does), 16-bit and float greyscale are scaled to 8 bits instead of clipped."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        if image.mode == "F" and a.max() <= 1.0:
            top = 1.0
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    # An alpha band, or a colour key ("transparency" in P, L and RGB PNGs), means see-through pixels.
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # truncated, like the reference
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), resample=Image.BICUBIC, reducing_gap=None)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess_image(image: Image.Image, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """A PIL image of any mode and size -> normalised FloatTensor[3, size, size]."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL image, got {type(image).__name__}")
    image = center_crop(resize_shortest_side(to_rgb(image), size), size)
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # (size, size, 3) in [0, 1]
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, size, size)

