"""Images in, CLIP-ready tensors out.

CLIP was trained on images prepared in one particular way; features only mean something if we
prepare ours identically:

    any PIL image --to RGB--> resize shortest side to 224 (bicubic) --> center crop 224x224
                  --> scale to [0, 1] --> normalise with CLIP's mean/std --> FloatTensor[3, 224, 224]

Everything here is pillow + numpy, so results match the reference ``CLIPImageProcessor`` (which also
resizes with pillow on 8-bit pixels) to about 1e-6.

Two guards keep a hostile file from taking the machine down: `load_image` refuses images of more than
MAX_IMAGE_PIXELS pixels before decoding them, and an extremely thin image (1 x 40000) is not resized to
millions of pixels only to throw all but 224 rows away: it is resized through a box that covers just
the part the centre crop keeps (see `resize_and_crop`).
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..common import atomic_write

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The most pixels `load_image` decodes: 100 MP (8-bit RGB: 300 MB). A 48 MP phone photo loads; a
# 15000 x 15000 "decompression bomb" (a few KB of PNG that decodes to gigabytes) is refused up front.
# Raise it (minivlm.processing.MAX_IMAGE_PIXELS = ...) for genuinely larger images.
MAX_IMAGE_PIXELS = 100_000_000

# Aspect ratios up to this are resized whole and then cropped, exactly as CLIP's reference does;
# beyond it only the part that survives the crop is resized (same pixels, see `resize_and_crop`).
MAX_PLAIN_ASPECT = 8


class ImageLoadError(ValueError):
    """An image file could not be read; the message names the file."""


def too_large(path, pixels) -> ImageLoadError:
    return ImageLoadError(f"{path}: {pixels:,} pixels is more than MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,} "
                          f"(minivlm.processing); refusing to decode it")


def save_image(image: Image.Image, path, **params):
    """Write an image file whole or not at all (common.atomic_write), in the format its extension names
    (PNG when it names none PIL knows). `params` go to PIL, e.g. compress_level=1."""
    fmt = Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower(), "PNG")
    atomic_write(path, lambda f: image.save(f, format=fmt, **params))


def load_image(path) -> Image.Image:
    """Open an image file fully (not lazily), apply its EXIF orientation, return it in RGB.
    Any unreadable or oversized file is an ImageLoadError naming it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; ours (checked below, before decoding) decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise too_large(path, im.width * im.height)
                im.load()  # force decoding now, so truncated files fail here and not later
                im = ImageOps.exif_transpose(im)  # phone photos store "rotate me" in EXIF
                return to_rgb(im)
    except Image.DecompressionBombError as e:  # past Pillow's hard limit: raised by Image.open itself
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise too_large(path, int(m.group(1))) if m else ImageLoadError(f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageLoadError):
            raise
        raise ImageLoadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB. Transparent pixels are composited on white (as CLIP's reference
    preprocessing does), 16-bit and float greyscale are scaled to 8 bits instead of clipped."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = grey_to_8bit(image)
    # An alpha band, or a colour key ("transparency" in P, L and RGB PNGs), means see-through pixels.
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def grey_to_8bit(image: Image.Image, strip_pixels: int = 1 << 16) -> Image.Image:
    """16-bit, 32-bit or float greyscale -> 8-bit "L", scaled (not clipped): 16-bit by 65535, others by
    255 unless their values go higher (then 65535), float images holding [0, 1] by 1.

    A strip of about `strip_pixels` pixels at a time: a float64 copy of the whole image (and the
    temporaries of the arithmetic on it) cost several times the RGB image it becomes, before the
    conversion even started; this costs the 1-byte result and one small strip."""
    _, high = image.getextrema()  # no copy of the pixels
    top = 65535.0 if image.mode.startswith("I;16") or high > 255 else 255.0
    if image.mode == "F" and high <= 1.0:
        top = 1.0
    w, h = image.size
    rows = max(1, strip_pixels // max(w, 1))
    out = np.empty((h, w), dtype=np.uint8)
    for y in range(0, h, rows):
        strip = np.asarray(image.crop((0, y, w, min(h, y + rows))), dtype=np.float64)
        strip *= 255.0 / top  # in place: one float64 strip is all the arithmetic holds
        strip += 0.5
        out[y:y + rows] = np.clip(strip, 0, 255, out=strip)
    return Image.fromarray(out, mode="L")


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """The size after resizing the shortest side to `size` (the long side truncated, like the reference)."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    new_w, new_h = resized_size(*image.size, size)
    if (new_w, new_h) == image.size:
        return image
    return image.resize((new_w, new_h), resample=Image.BICUBIC, reducing_gap=None)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def resize_and_crop(image: Image.Image, size: int, plain_aspect: float = MAX_PLAIN_ASPECT) -> Image.Image:
    """Resize the shortest side to `size` (bicubic), then centre-crop `size` x `size`.

    Up to an aspect ratio of `plain_aspect` this is literally resize, then crop: CLIP's reference,
    bit for bit. A 1 x 40000 strip would first become 224 x 8,960,000 pixels (6 GB), so beyond that
    ratio Pillow is asked for the crop only: a resize through a `box` with the scale of the full
    resize. Pillow then computes just the kept rows and columns (still reading the source pixels the
    bicubic kernel needs around the box), so memory stays about that of the source image. It is not
    bit-identical to resize-then-crop: Pillow takes the box in float32 and may run the two passes in
    the other order, which moves a pixel by a few levels of 255 on smooth images (more on pure noise;
    tests/test_reliability.py measures it). Such images are far from CLIP's training data anyway.
    """
    w, h = image.size
    new_w, new_h = resized_size(w, h, size)
    if max(w, h) <= plain_aspect * min(w, h) or (new_w, new_h) == (w, h):
        return center_crop(resize_shortest_side(image, size), size)
    sx, sy = w / new_w, h / new_h  # source pixels per output pixel, as in the full resize
    left, top = (new_w - size) // 2, (new_h - size) // 2
    box = (left * sx, top * sy, min(w, (left + size) * sx), min(h, (top + size) * sy))
    return image.resize((size, size), resample=Image.BICUBIC, box=box, reducing_gap=None)


def preprocess_image(image: Image.Image, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """A PIL image of any mode and size -> normalised FloatTensor[3, size, size]."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL image, got {type(image).__name__}")
    image = resize_and_crop(to_rgb(image), size)
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # (size, size, 3) in [0, 1]
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, size, size)


SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def squash(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize to size x size, the aspect ratio not kept (SigLIP's geometry; CLIP's is resize_and_crop)."""
    return image.resize((size, size), resample=resample, reducing_gap=None)


def squash_image(image: Image.Image, size: int, resample: int = Image.BICUBIC, mean=SIGLIP_MEAN,
                 std=SIGLIP_STD) -> torch.Tensor:
    """SigLIP's preparation (Hugging Face's SiglipImageProcessor): RGB, resized to size x size with no crop
    (the aspect ratio is not kept), scaled by 1/255 as HF does (in float64), normalised -> [3, size, size]."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"squash_image expects a PIL image, got {type(image).__name__}")
    image = squash(to_rgb(image), size, resample)
    x = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)  # (size, size, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, size, size)


class ImageTransform:
    """How one vision tower wants its pixels: CLIP (shortest side + centre crop, CLIP's mean/std) or SigLIP
    (squashed to a square, mean = std = 0.5). Datasets, generation and the feature cache take one of these
    (or a plain int: CLIP at that size), so a model of either generation reads images the way it was trained."""

    def __init__(self, size: int = 224, crop: bool = True, resample: int = Image.BICUBIC, mean=None, std=None):
        self.size, self.crop, self.resample = size, crop, resample
        self.mean = tuple(mean or (CLIP_MEAN if crop else SIGLIP_MEAN))
        self.std = tuple(std or (CLIP_STD if crop else SIGLIP_STD))

    def resize(self, image: Image.Image) -> Image.Image:
        """The size x size RGB image the model sees, before scaling and normalising (what the web page shows)."""
        image = to_rgb(image)
        return resize_and_crop(image, self.size) if self.crop else squash(image, self.size, self.resample)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.crop:
            return preprocess_image(image, self.size, self.mean, self.std)
        return squash_image(image, self.size, self.resample, self.mean, self.std)

    def __repr__(self) -> str:
        how = "resize shortest side bicubic, center crop" if self.crop else f"squash, resample {self.resample}"
        return f"{self.size}px rgb, {how}, mean {self.mean}, std {self.std}"

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageTransform) and repr(self) == repr(other)


def as_transform(spec) -> ImageTransform:
    """An ImageTransform, or an int (CLIP's preparation at that size) -> ImageTransform."""
    return spec if isinstance(spec, ImageTransform) else ImageTransform(int(spec))
