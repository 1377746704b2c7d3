"""The sample images in examples/images/ are what scripts/make_sample_images.py makes from packaged data."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_sample_images  # noqa: E402


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def test_committed_samples_match_the_script() -> None:
    """Decoded pixels, not bytes: PNG/JPEG encoders differ a little between library versions."""
    expected = make_sample_images.sample_images()
    folder = ROOT / "examples" / "images"
    assert sorted(expected) == sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
    for name, data in expected.items():
        committed, fresh = pixels((folder / name).read_bytes()), pixels(data)
        assert committed.shape == fresh.shape, name
        if name.endswith(".png"):
            assert np.array_equal(committed, fresh), name
        else:
            assert np.abs(committed - fresh).mean() < 2.0, name
    assert Image.open(folder / "digit_7.png").size == (28, 28) and Image.open(folder / "digit_7.png").mode == "L"
    assert Image.open(folder / "flower.jpg").mode == "RGB"
