"""Safe image decoding and the crop geometry of the model's preprocessing.

Pure, synchronous functions (the data plane runs them in a thread pool).
The geometry follows torchvision exactly so models trained with
``Resize(S) -> CenterCrop(S) -> CenterCrop(C) / TenCrop(C)`` see the same pixels:

* resize: the shorter side becomes S, the longer ``int(S * long / short)``,
  bilinear with Pillow's antialiasing (what torchvision does for PIL images);
* centre crops use ``round((size - crop) / 2)`` (Python's round, as torchvision);
* ten-crop: top-left, top-right, bottom-left, bottom-right, centre of the S x S
  square, then the same five of its horizontal mirror (torchvision's TenCrop
  order; the mirror's top-left is the flipped top-right, and so on).

Decoding defends against hostile input: a pixel limit checked from the header
before any pixel is decoded, full loads so truncated files are rejected
(``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False), PNG chunk CRCs and IEND
verified, and every decoder failure becomes an ``InvalidInput`` naming the
image's index in the request.

Conversions to the model's channels (1 -> "L", 3 -> "RGB"):

* EXIF orientation is applied first (phone photos are stored sideways);
* transparency (RGBA, LA, palette with transparency) is composited on **black**:
  that is what dropping alpha from premultiplied data gives and what MNIST-style
  models (white strokes on a black background) expect;
* 16-bit greyscale ("I;16*", "I") is scaled to 8 bits (``v / 257``, clipped to
  0..65535 first); float ("F") images are clipped to 0..255;
* CMYK, YCbCr, LAB, HSV, palette and bilevel images go through Pillow's convert.

JPEGs much larger than the target use libjpeg's DCT scaling (``Image.draft``):
the decoder skips most of the work and returns the image at 1/2, 1/4 or 1/8
size, never smaller than S x S, and the bilinear resize does the rest.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from serving.errors import InvalidInput
from serving.repository import Preprocess

log = logging.getLogger(__name__)

TEN_CROP_COUNT = 10
_ALPHA_MODES = {"RGBA", "LA", "PA"}
_PREMULTIPLIED_MODES = {"RGBa": "RGB", "La": "L"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class DecodeOptions:
    """Limits and switches of decoding; built once from Settings."""

    max_pixels: int = 50_000_000
    draft: bool = True


def configure_pillow(max_pixels: int) -> None:
    """Set Pillow's process-wide guards to our limit.

    Our own header check in ``decode`` is the real guard; this keeps Pillow's
    DecompressionBombError (raised at twice the limit, also inside other
    plugins' code paths) in line with it. Truncated images must never load.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode(data: bytes, *, channels: int, index: int = 0, target: int | None = None,
           options: DecodeOptions = DecodeOptions()) -> Image.Image:
    """Decode untrusted bytes into an "L" (channels=1) or "RGB" (channels=3) image.

    ``target`` is the size the image will be resized to (S); it lets JPEG
    decoding use DCT scaling. Raises InvalidInput for anything that is not a
    complete image within the pixel limit.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not data:
        raise InvalidInput(f"image {index}: empty image data")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; refusing to decode untrusted images")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"image {index}: too many pixels (limit {options.max_pixels}): {exc}") from None
    except Image.UnidentifiedImageError:
        raise InvalidInput(f"image {index}: not a recognised image format "
                           f"({len(data)} bytes starting {data[:8]!r})") from None
    except MemoryError:
        raise
    except Exception as exc:  # any decoder failure on untrusted bytes is bad input
        raise InvalidInput(f"image {index}: cannot read image header: {exc}") from None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise InvalidInput(f"image {index}: empty image ({width}x{height})")
        if width * height > options.max_pixels:
            raise InvalidInput(f"image {index}: {width}x{height} = {width * height} pixels exceeds "
                               f"the limit of {options.max_pixels}")
        if img.format == "PNG":
            _verify_png(data, index)
        if options.draft and target is not None and img.format == "JPEG":
            img.draft("L" if channels == 1 else "RGB", (target, target))
        try:
            img.load()  # force the full decode now: a truncated file fails here
        except Image.DecompressionBombError as exc:
            raise InvalidInput(f"image {index}: too many pixels: {exc}") from None
        except MemoryError:
            raise
        except Exception as exc:
            raise InvalidInput(f"image {index}: cannot decode {img.format or 'image'} data: {exc}") from None
        img = _apply_orientation(img, index)
        return _to_channels(img, channels)
    except InvalidInput:
        img.close()
        raise


def _verify_png(data: bytes, index: int) -> None:
    """Check chunk CRCs and that IEND is present (~0.2 ms for 0.5 MB).

    Pillow's load stops after the last IDAT and tolerates a missing tail; like
    libpng we refuse a PNG whose chunks are cut short or corrupted.
    """
    try:
        with Image.open(io.BytesIO(data)) as check:
            check.verify()
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidInput(f"image {index}: corrupt or truncated PNG: {exc}") from None


def _apply_orientation(img: Image.Image, index: int) -> Image.Image:
    """Honour EXIF orientation; a broken EXIF block is ignored (browsers do the same)."""
    try:
        rotated = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF must not reject an otherwise valid photo
        log.debug("image %d: ignoring unreadable EXIF orientation: %s", index, exc)
        return img
    return rotated if rotated is not None else img


def _to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to "L" or "RGB" (see the module docstring for the rules)."""
    target = "L" if channels == 1 else "RGB"
    mode = img.mode
    if mode == target:
        return img
    if mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.int64)
        eight = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)
        return _to_channels(Image.fromarray(eight, mode="L"), channels)
    if mode == "F":
        eight = np.clip(np.rint(np.asarray(img, dtype=np.float32)), 0, 255).astype(np.uint8)
        return _to_channels(Image.fromarray(eight, mode="L"), channels)
    if mode in _PREMULTIPLIED_MODES:  # colour already multiplied by alpha = composited on black
        colour = np.ascontiguousarray(np.asarray(img)[..., :-1])
        return _to_channels(Image.fromarray(colour.squeeze(-1) if colour.shape[-1] == 1 else colour,
                                            mode=_PREMULTIPLIED_MODES[mode]), channels)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    elif mode == "P":
        img = img.convert("RGB")
        mode = "RGB"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
        mode = "RGB"
    if mode == target:
        return img
    if target == "L" and mode not in ("RGB", "1"):
        img = img.convert("RGB")  # CMYK/YCbCr/LAB/HSV -> RGB -> L
    return img.convert(target)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to ``size`` (torchvision's rule, truncating)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _centre_offset(extent: int, crop: int) -> int:
    return int(round((extent - crop) / 2.0))


def resize_centre(img: Image.Image, size: int, *, index: int = 0, max_pixels: int | None = None) -> np.ndarray:
    """Resize the shorter side to ``size`` (bilinear), centre-crop size x size; [S, S] or [S, S, 3] uint8."""
    new_w, new_h = resized_size(img.width, img.height, size)
    if max_pixels is not None and new_w * new_h > max_pixels:
        raise InvalidInput(f"image {index}: aspect ratio {img.width}x{img.height} is too extreme "
                           f"({new_w}x{new_h} after resizing)")
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = _centre_offset(new_h, size), _centre_offset(new_w, size)
    return np.asarray(img.crop((left, top, left + size, top + size)))


def crops_from_square(square: np.ndarray, crop: int, ten_crop: bool) -> np.ndarray:
    """The model inputs of one S x S image: [1 or 10, C, C, channels] uint8, C-contiguous."""
    if square.ndim == 2:
        square = square[:, :, None]
    h, w = square.shape[:2]
    if crop > h or crop > w:
        raise ValueError(f"crop {crop} larger than image {w}x{h}")
    top, left = _centre_offset(h, crop), _centre_offset(w, crop)
    centre = square[top:top + crop, left:left + crop]
    if not ten_crop:
        return np.ascontiguousarray(centre[None])
    out = np.empty((TEN_CROP_COUNT, crop, crop, square.shape[2]), dtype=np.uint8)
    for half, img in enumerate((square, square[:, ::-1])):
        base = half * 5
        out[base + 0] = img[:crop, :crop]
        out[base + 1] = img[:crop, w - crop:]
        out[base + 2] = img[h - crop:, :crop]
        out[base + 3] = img[h - crop:, w - crop:]
        out[base + 4] = img[top:top + crop, left:left + crop]
    return out


LETTERBOX_FILL = 114  # the grey detectors conventionally pad with; training pads the same way


@dataclass(frozen=True)
class Letterbox:
    """Where an original image sits inside the S x S model input, so results can be mapped back.

    The image (width x height) was scaled by (scale_x, scale_y) to new_w x new_h (aspect kept up
    to rounding) and pasted at (pad_x, pad_y); everything else is LETTERBOX_FILL.
    """

    width: int
    height: int
    size: int
    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int

    @property
    def new_width(self) -> int:
        return int(round(self.width * self.scale_x))

    @property
    def new_height(self) -> int:
        return int(round(self.height * self.scale_y))

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """x1,y1,x2,y2 in model-input pixels -> original-image pixels, clipped to the image."""
        out = np.asarray(boxes, dtype=np.float32).copy()
        out[..., 0::2] = np.clip((out[..., 0::2] - self.pad_x) / self.scale_x, 0.0, self.width)
        out[..., 1::2] = np.clip((out[..., 1::2] - self.pad_y) / self.scale_y, 0.0, self.height)
        return out

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Original-image pixels -> model-input pixels (the inverse of boxes_to_original)."""
        out = np.asarray(boxes, dtype=np.float32).copy()
        out[..., 0::2] = out[..., 0::2] * self.scale_x + self.pad_x
        out[..., 1::2] = out[..., 1::2] * self.scale_y + self.pad_y
        return out

    def unpadded(self, plane: np.ndarray) -> np.ndarray:
        """The part of an [..., S, S] model-input-aligned array that covers the image (no padding)."""
        return plane[..., self.pad_y:self.pad_y + self.new_height, self.pad_x:self.pad_x + self.new_width]

    def mask_to_original(self, labels: np.ndarray) -> np.ndarray:
        """An S x S class-index mask -> height x width (nearest neighbour), uint8."""
        inner = np.ascontiguousarray(self.unpadded(labels).astype(np.uint8))
        if inner.shape == (self.height, self.width):
            return inner
        return np.asarray(Image.fromarray(inner, mode="L").resize((self.width, self.height),
                                                                  Image.Resampling.NEAREST))

    def scores_to_original(self, scores: np.ndarray) -> np.ndarray:
        """[C, S, S] per-class scores -> [C, height, width] (bilinear), float32."""
        inner = self.unpadded(np.asarray(scores, dtype=np.float32))
        if inner.shape[1:] == (self.height, self.width):
            return np.ascontiguousarray(inner)
        return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c), mode="F").resize(
            (self.width, self.height), Image.Resampling.BILINEAR)) for c in inner])


def letterbox(img: Image.Image, size: int, fill: int = LETTERBOX_FILL) -> tuple[np.ndarray, Letterbox]:
    """Scale ``img`` to fit size x size keeping its aspect ratio, pad the rest with ``fill``.

    Returns the uint8 [S, S] ("L") or [S, S, 3] ("RGB") model input and the record that undoes it.
    The scaled image is centred: pad_x = (S - new_w) // 2, pad_y = (S - new_h) // 2.
    """
    width, height = img.size
    scale = size / max(width, height)
    new_w = min(size, max(1, int(round(width * scale))))
    new_h = min(size, max(1, int(round(height * scale))))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    pixels = np.asarray(img)
    canvas = np.full((size, size) + pixels.shape[2:], fill, dtype=np.uint8)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = pixels
    return canvas, Letterbox(width=width, height=height, size=size, scale_x=new_w / width, scale_y=new_h / height,
                             pad_x=pad_x, pad_y=pad_y)


def preprocess(data: bytes, pre: Preprocess, *, ten_crop: bool, index: int = 0,
               options: DecodeOptions = DecodeOptions()) -> np.ndarray:
    """Bytes of one image -> its model input crops, uint8 [n_crops, C, C, channels]."""
    img = decode(data, channels=pre.channels, index=index, target=pre.resize, options=options)
    try:
        square = resize_centre(img, pre.resize, index=index, max_pixels=options.max_pixels)
    finally:
        img.close()
    return crops_from_square(square, pre.crop, ten_crop)


def crops_per_image(ten_crop: bool) -> int:
    return TEN_CROP_COUNT if ten_crop else 1
