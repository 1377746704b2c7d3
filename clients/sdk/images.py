"""Turn what users hold (paths, bytes, PIL images, numpy arrays) into encoded image bytes.

The gateway accepts encoded images only. Paths and bytes are sent untouched
(the server decodes them, so JPEGs are not re-compressed); PIL images and
uint8 arrays are encoded losslessly as PNG so the server sees exactly these pixels.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import Any, Union

import numpy as np
from PIL import Image

from clients.sdk.errors import InvalidArgument

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]
"""One image: a file path, encoded bytes, a PIL image, or a uint8 HxW / HxWxC array (C in 1, 3, 4)."""

# Modes PNG stores as they are; other modes (CMYK, YCbCr, ...) are converted to RGB first.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})
_SINGLE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of a PIL image."""
    if image.mode == "F":
        raise InvalidArgument("PIL images in mode 'F' (float) are ambiguous; convert to 'L' or 'RGB' first")
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # speed over size: the bytes go over a LAN
    return buf.getvalue()


def array_to_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA) array."""
    if array.dtype != np.uint8:
        raise InvalidArgument(
            f"numpy images must be uint8, got {array.dtype}; scale to 0..255 and use .astype(np.uint8)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InvalidArgument(
            f"numpy image must be HxW or HxWxC with C in (1, 3, 4), got shape {tuple(array.shape)}; "
            "pass a batch as a list of arrays or an N x H x W x C array")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidArgument(f"numpy image is empty: shape {tuple(array.shape)}")
    return encode_png(Image.fromarray(np.ascontiguousarray(array)))  # mode L, RGB or RGBA from the shape


def read_path(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read image file {os.fspath(path)!r}: {exc.strerror or exc}") from exc


def to_image_bytes(image: Any) -> bytes:
    """Encoded bytes for one image input (see ImageInput)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise InvalidArgument("image bytes are empty")
        return data
    if isinstance(image, (str, os.PathLike)):
        return read_path(image)
    if isinstance(image, Image.Image):
        return encode_png(image)
    if isinstance(image, np.ndarray):
        return array_to_png(image)
    if hasattr(image, "read"):  # an open binary file
        data = image.read()
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidArgument("file objects must be opened in binary mode ('rb')")
        return to_image_bytes(data)
    raise InvalidArgument(
        f"unsupported image type {type(image).__name__}: use a path, bytes, a PIL image or a uint8 numpy array")


def as_image_list(images: Any) -> list[Any]:
    """Split the ``images`` argument into individual images.

    A single path/bytes/PIL image/2-D or 3-D array is one image; a list, tuple or
    other iterable is many; a 4-D array is an N x H x W x C batch.
    """
    if isinstance(images, _SINGLE_TYPES) or hasattr(images, "read"):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise InvalidArgument(f"numpy images must have 2, 3 or 4 (a batch) dimensions, got shape {images.shape}")
    if isinstance(images, Iterable):
        return list(images)
    raise InvalidArgument(
        f"unsupported image type {type(images).__name__}: use a path, bytes, a PIL image, a uint8 numpy array "
        "or a list of those")


def encode_images(images: Any) -> list[bytes]:
    """Encoded bytes for each image of the ``images`` argument (one image or many)."""
    items = as_image_list(images)
    if not items:
        raise InvalidArgument("no images given")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(to_image_bytes(item))
        except InvalidArgument as exc:
            if len(items) == 1:
                raise
            raise InvalidArgument(f"image {i}: {exc.message}") from exc
    return out
