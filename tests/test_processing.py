import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.data.processing import CLIP_MEAN, CLIP_STD, ImageLoadError, load_image, preprocess_image, to_rgb


def unnormalise(x):
    return x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)


def test_output_shape_and_normalisation():
    x = preprocess_image(Image.new("RGB", (500, 300), (255, 0, 128)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(unnormalise(x)[:, 100, 100], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-5, rtol=0)


def test_resize_short_side_then_center_crop():
    # a 448x224 image: left half black, right half white -> the crop keeps the middle 224 columns
    a = np.zeros((224, 448, 3), np.uint8)
    a[:, 224:] = 255
    x = unnormalise(preprocess_image(Image.fromarray(a)))
    assert x[0, 10, 5] < 0.01 and x[0, 10, 218] > 0.99  # crop offset (448 - 224) // 2 = 112
    assert preprocess_image(Image.new("RGB", (20, 30)), size=96).shape == (3, 96, 96)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "I", "F", "CMYK", "1"])
def test_every_mode_becomes_rgb(mode):
    im = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode) if mode not in ("I;16", "I", "F") else None
    if mode == "I;16":
        im = Image.fromarray(np.full((30, 40), 65535 // 2, np.uint16))
    elif mode == "I":
        im = Image.fromarray(np.full((30, 40), 30000, np.int32))
    elif mode == "F":
        im = Image.fromarray(np.full((30, 40), 0.5, np.float32))
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode in ("I;16", "I", "F"):  # scaled to 8 bits, not clipped to white
        assert 100 < np.asarray(out)[0, 0, 0] < 160


def test_transparent_pixels_composite_on_white():
    im = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert np.asarray(to_rgb(im))[0, 0].tolist() == [255, 255, 255]
    im = Image.new("LA", (10, 10), (0, 128))
    assert np.asarray(to_rgb(im))[0, 0].tolist() == [127, 127, 127]


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # wide image, red on the left
    a[:, :20] = (255, 0, 0)
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)  # now tall
    px = np.asarray(out)
    assert px[5, 10, 0] > 200 and px[35, 10, 0] < 60  # red is now at the top


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nope\.png: image file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageLoadError, match=r"text\.png: not a readable image"):
        load_image(tmp_path / "text.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(TypeError):
        preprocess_image(np.zeros((4, 4, 3)))
