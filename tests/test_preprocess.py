"""Safe decoding, mode conversion and crop geometry of serving.preprocess."""
from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image, ImageFile

from serving.errors import InvalidInput
from serving.preprocess import (DecodeOptions, configure_pillow, crops_from_square, decode, preprocess,
                                resize_centre, resized_size)
from serving.repository import Preprocess

EXIF_ORIENTATION = 0x0112


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(width: int = 1024, height: int = 768) -> Image.Image:
    """A real photograph (scikit-learn's sample), resized to the requested size."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg")).resize((width, height), Image.Resampling.BICUBIC)


def coordinate_square(size: int) -> np.ndarray:
    """An RGB square whose red channel is the column and green channel the row of each pixel."""
    ys, xs = np.mgrid[0:size, 0:size]
    return np.stack([xs, ys, np.full_like(xs, 7)], axis=-1).astype(np.uint8)


@pytest.fixture
def pillow_limit() -> Iterator[None]:
    """Restore Pillow's process-wide limit after a test changes it."""
    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


# ---------------------------------------------------------------- orientation and modes

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))        # stored: red left half, blue right half
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6                        # "rotate 90 degrees clockwise to display"
    img = decode(encode(stored, fmt, exif=exif), channels=3)
    assert img.size == (20, 40)
    px = np.asarray(img).astype(int)
    assert np.abs(px[2, 10] - (255, 0, 0)).max() <= 3      # the left half is now on top
    assert np.abs(px[-3, 10] - (0, 0, 255)).max() <= 3


def test_without_exif_nothing_rotates() -> None:
    img = decode(encode(Image.new("RGB", (40, 20))), channels=3)
    assert img.size == (40, 20)


def _palette_image(transparent: bool) -> Image.Image:
    p = Image.new("P", (8, 6), 1)
    p.putpalette([0, 0, 0, 200, 40, 10] + [0] * 254 * 3)
    p.paste(0, (0, 0, 4, 6))
    if transparent:
        p.info["transparency"] = 1
    return p


# (source image, encoding format, expected "L" value, expected "RGB" value) of pixel (row 0, column 7)
MODE_CASES = {
    "L": (Image.new("L", (8, 6), 90), "PNG", 90, (90, 90, 90)),
    "1": (Image.new("1", (8, 6), 1), "PNG", 255, (255, 255, 255)),
    "RGB": (Image.new("RGB", (8, 6), (200, 40, 10)), "PNG", 84, (200, 40, 10)),
    "RGBA": (Image.new("RGBA", (8, 6), (200, 40, 10, 128)), "PNG", 42, (100, 20, 5)),
    "LA": (Image.new("LA", (8, 6), (200, 128)), "PNG", 100, (100, 100, 100)),
    "P": (_palette_image(False), "PNG", 84, (200, 40, 10)),
    "P+transparency": (_palette_image(True), "PNG", 0, (0, 0, 0)),
    "GIF+transparency": (_palette_image(True), "GIF", 0, (0, 0, 0)),
    "CMYK": (Image.new("CMYK", (8, 6), (0, 255, 0, 0)), "TIFF", 105, (255, 0, 255)),
    "I;16": (Image.fromarray(np.full((6, 8), 40000, np.uint16)), "PNG", 156, (156, 156, 156)),
    "I": (Image.fromarray(np.full((6, 8), 65535, np.int32)), "TIFF", 255, (255, 255, 255)),
    "F": (Image.fromarray(np.full((6, 8), 77.4, np.float32)), "TIFF", 77, (77, 77, 77)),
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_is_converted_to_the_model_channels(case: str, channels: int) -> None:
    img, fmt, grey, rgb = MODE_CASES[case]
    data = encode(img, fmt, transparency=img.info["transparency"]) if "transparency" in img.info else encode(img, fmt)
    out = decode(data, channels=channels)
    assert out.mode == ("L" if channels == 1 else "RGB")
    px = np.asarray(out).astype(int)
    assert px.shape[:2] == (6, 8)
    want = np.array(grey if channels == 1 else rgb)
    assert np.abs(px[0, 7] - want).max() <= 1, (case, px[0, 7], want)


def test_alpha_is_composited_on_black_not_white() -> None:
    clear = Image.new("RGBA", (4, 4), (255, 255, 255, 0))      # white but fully transparent
    assert np.asarray(decode(encode(clear), channels=3)).max() == 0


def test_sixteen_bit_keeps_the_full_range() -> None:
    ramp = np.linspace(0, 65535, 64 * 4).astype(np.uint16).reshape(4, 64)
    out = np.asarray(decode(encode(Image.fromarray(ramp)), channels=1))
    assert out.min() == 0 and out.max() == 255
    assert np.abs(out.astype(int) - ramp / 257).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "WEBP", "TIFF", "PNG", "JPEG"])
def test_common_formats_decode(fmt: str) -> None:
    out = decode(encode(Image.new("RGB", (30, 20), (10, 120, 240)), fmt), channels=3)
    assert out.size == (30, 20) and out.mode == "RGB"


# ---------------------------------------------------------------- hostile input

def test_empty_bytes_rejected() -> None:
    with pytest.raises(InvalidInput, match="image 2: empty"):
        decode(b"", channels=3, index=2)


def test_text_rejected() -> None:
    with pytest.raises(InvalidInput, match="image 0: not a recognised image"):
        decode(b"hello, this is definitely not a picture", channels=3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_rejected(fmt: str) -> None:
    data = encode(photo(200, 150), fmt)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for keep in (len(data) // 2, len(data) - 20, len(data) - 8):
        with pytest.raises(InvalidInput, match="image 3: "):
            decode(data[:keep], channels=3, index=3)


def test_png_with_corrupt_chunk_rejected() -> None:
    data = bytearray(encode(photo(64, 48), "PNG"))
    data[len(data) // 2] ^= 0xFF                                # one flipped byte inside IDAT
    with pytest.raises(InvalidInput, match="image 1: corrupt or truncated PNG"):
        decode(bytes(data), channels=3, index=1)


def test_header_only_file_rejected() -> None:
    with pytest.raises(InvalidInput, match="image 0"):
        decode(encode(photo(64, 48), "JPEG")[:200], channels=3)


def test_pixel_limit_checked_before_decoding() -> None:
    bomb = encode(Image.new("L", (6000, 6000)), "PNG")          # 36 Mpixel in a few tens of KB
    assert len(bomb) < 200_000
    with pytest.raises(InvalidInput, match="exceeds the limit of 1000000"):
        decode(bomb, channels=1, options=DecodeOptions(max_pixels=1_000_000))
    # Header only: the pixel data is cut off and replaced by garbage. Had decoding (or the PNG
    # check) run before the pixel limit, this would fail as corrupt data instead.
    idat = bomb.index(b"IDAT") - 4                              # the chunk's length field
    header_only = bomb[:idat + 8] + b"\xde\xad" * 8
    with pytest.raises(InvalidInput, match="exceeds the limit of 1000000"):
        decode(header_only, channels=1, options=DecodeOptions(max_pixels=1_000_000))
    with pytest.raises(InvalidInput, match="corrupt|cannot decode"):  # the same bytes within the limit
        decode(header_only, channels=1, options=DecodeOptions(max_pixels=10**8))


def test_pillow_bomb_error_becomes_invalid_input(pillow_limit: None) -> None:
    configure_pillow(1_000)                                     # Pillow raises at twice its limit
    with pytest.raises(InvalidInput, match="too many pixels"):
        decode(encode(Image.new("L", (100, 100))), channels=1, options=DecodeOptions(max_pixels=10**9))


def test_extreme_aspect_ratio_rejected() -> None:
    thin = encode(Image.new("L", (5000, 1)), "PNG")
    with pytest.raises(InvalidInput, match="aspect ratio"):
        preprocess(thin, Preprocess(resize=100, crop=90, channels=1), ten_crop=False,
                   options=DecodeOptions(max_pixels=1_000_000))


# ---------------------------------------------------------------- draft (DCT scaling)

def test_draft_decodes_large_jpeg_at_reduced_size() -> None:
    data = encode(photo(), "JPEG", quality=90)
    assert decode(data, channels=3).size == (1024, 768)
    small = decode(data, channels=3, target=72)
    assert small.size == (128, 96)                  # 1/8 scale, still >= 72 on the short side
    assert min(decode(data, channels=3, target=300).size) >= 300
    assert decode(data, channels=3, target=72, options=DecodeOptions(draft=False)).size == (1024, 768)
    assert decode(encode(photo(), "PNG"), channels=3, target=72).size == (1024, 768)   # JPEG only


@pytest.mark.parametrize("resize,crop,channels", [(72, 64, 3), (256, 224, 3), (28, 28, 1)])
def test_draft_gives_nearly_the_same_pixels(resize: int, crop: int, channels: int) -> None:
    data = encode(photo(), "JPEG", quality=90)
    pre = Preprocess(resize=resize, crop=crop, channels=channels)
    fast = preprocess(data, pre, ten_crop=True).astype(int)
    exact = preprocess(data, pre, ten_crop=True, options=DecodeOptions(draft=False)).astype(int)
    assert fast.shape == exact.shape
    diff = np.abs(fast - exact)
    assert diff.mean() < 2.5, diff.mean()
    assert np.percentile(diff, 99) < 16


# ---------------------------------------------------------------- geometry

@pytest.mark.parametrize("w,h", [(640, 427), (427, 640), (100, 100), (333, 101), (50, 1000), (10, 9)])
def test_resized_size_follows_torchvision(w: int, h: int) -> None:
    import torchvision.transforms.functional as TF

    expected = TF.resize(Image.new("L", (w, h)), 64).size
    assert resized_size(w, h, 64) == expected


def test_resize_centre_takes_the_middle_of_the_long_side() -> None:
    img = np.zeros((200, 300), np.uint8)
    img[:, 145:155] = 255                              # a vertical stripe in the middle
    img[:, :20] = 128                                  # a band at the far left that must be cut away
    square = resize_centre(Image.fromarray(img), 100)
    assert square.shape == (100, 100)
    assert square[:, 48:52].min() > 200                # the stripe lands in the centre of the crop
    assert square[:, :40].max() == 0 and square[:, 60:].max() == 0


def test_single_crop_is_the_centre() -> None:
    square = coordinate_square(72)
    (crop,) = crops_from_square(square, 64, ten_crop=False)
    assert crop.shape == (64, 64, 3)
    assert crop[0, 0, 0] == 4 and crop[0, 0, 1] == 4          # round((72 - 64) / 2) = 4


def test_ten_crop_geometry_and_order() -> None:
    s, c = 72, 61                                              # odd margin: 11, centre offset round(5.5) = 6
    square = coordinate_square(s)
    crops = crops_from_square(square, c, ten_crop=True)
    assert crops.shape == (10, c, c, 3) and crops.dtype == np.uint8 and crops.flags.c_contiguous
    xy = [(int(k[0, 0, 0]), int(k[0, 0, 1])) for k in crops]   # (column, row) of each crop's top-left pixel
    far = s - c
    centre = round(far / 2)
    assert xy[:5] == [(0, 0), (far, 0), (0, far), (far, far), (centre, centre)]
    # the flipped five are crops of the mirrored square: their top-left pixel is the mirror's
    assert xy[5:] == [(s - 1, 0), (c - 1, 0), (s - 1, far), (c - 1, far), (s - 1 - centre, centre)]
    for k in crops[5:]:
        assert (np.diff(k[0, :, 0].astype(int)) == -1).all()   # columns run right to left
    for k in crops[:5]:
        assert (np.diff(k[:, 0, 1].astype(int)) == 1).all()    # rows are never flipped


def test_ten_crop_matches_torchvision_tencrop() -> None:
    import torchvision.transforms as T

    square = coordinate_square(72)
    ours = crops_from_square(square, 61, ten_crop=True)
    theirs = [np.asarray(k) for k in T.TenCrop(61)(Image.fromarray(square))]
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_preprocess_output_layout() -> None:
    data = encode(photo(320, 240), "JPEG")
    rgb = preprocess(data, Preprocess(resize=72, crop=64, channels=3), ten_crop=True)
    assert rgb.shape == (10, 64, 64, 3) and rgb.dtype == np.uint8
    grey = preprocess(data, Preprocess(resize=28, crop=28, channels=1), ten_crop=False)
    assert grey.shape == (1, 28, 28, 1) and grey.dtype == np.uint8
    assert grey.std() > 5                                      # a photo, not a blank
