"""AlexNet's augmentations: PCA colour jitter, random crop/flip geometry, and eval crops that match serving."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from export.data.augment import (PCALighting, RandomCropFlip, RGBPCA, eval_transform, rgb_pca, rgb_pca_of_images,
                                 ten_crop_transform, train_transform)
from export.models import IMAGENET_MEAN, IMAGENET_STD
from serving.preprocess import preprocess
from serving.repository import Preprocess


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Correlated RGB pixels in [0, 1] with a known covariance structure."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, size=(20000, 1))
    return np.clip(np.hstack([base + rng.normal(0, s, size=(20000, 1)) for s in (0.05, 0.1, 0.2)]), 0, 1)


@pytest.fixture(scope="module")
def pca(pixels: np.ndarray) -> RGBPCA:
    return rgb_pca(pixels)


def test_eigenvectors_are_orthonormal_and_rebuild_the_covariance(pixels: np.ndarray, pca: RGBPCA) -> None:
    vecs, vals = pca.vectors(), pca.values()
    assert np.allclose(vecs.T @ vecs, np.eye(3), atol=1e-10)
    assert list(vals) == sorted(vals, reverse=True) and (vals >= 0).all()
    assert np.allclose(vecs @ np.diag(vals) @ vecs.T, np.cov(pixels, rowvar=False), atol=1e-10)
    assert pca.pixels == len(pixels)
    assert RGBPCA.from_dict(pca.to_dict()) == pca


def test_pca_of_image_files_is_seeded(tmp_path) -> None:
    rng = np.random.default_rng(1)
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    a = rgb_pca_of_images(paths, max_images=4, pixels_per_image=50, seed=3)
    b = rgb_pca_of_images(paths, max_images=4, pixels_per_image=50, seed=3)
    assert a == b and a.pixels == 200
    with pytest.raises(ValueError, match="no images"):
        rgb_pca_of_images([])


def test_pca_jitter_keeps_shape_dtype_and_adds_one_colour_per_image(pca: RGBPCA) -> None:
    torch.manual_seed(0)
    img = torch.rand(3, 9, 7)
    out = PCALighting(pca, 0.1)(img)
    assert out.shape == img.shape and out.dtype == img.dtype
    delta = out - img
    assert delta.abs().max() > 0
    # The same RGB offset at every pixel (before any clamping: the paper does not clamp).
    assert torch.allclose(delta, delta[:, :1, :1].expand_as(delta), atol=1e-6)


def test_pca_jitter_has_the_expected_magnitude(pca: RGBPCA) -> None:
    """Projected on p_i the offset is alpha_i * lambda_i with alpha_i ~ N(0, sigma^2): std sigma * lambda_i."""
    torch.manual_seed(0)
    sigma, n = 0.1, 20000
    jitter = PCALighting(pca, sigma)
    shifts = torch.stack([jitter.shift() for _ in range(n)]).double().numpy()  # [n, 3]
    along = shifts @ pca.vectors()  # coordinates along p_1..p_3
    expected = sigma * pca.values()
    assert np.allclose(along.std(axis=0), expected, rtol=0.05)
    assert np.allclose(along.mean(axis=0), 0.0, atol=4 * expected.max() / np.sqrt(n))
    # Total: E||shift||^2 = sigma^2 * sum(lambda_i^2).
    assert np.isclose((shifts ** 2).sum(1).mean(), sigma ** 2 * (pca.values() ** 2).sum(), rtol=0.05)


def test_pca_jitter_edge_cases(pca: RGBPCA) -> None:
    img = torch.rand(3, 4, 4)
    assert torch.equal(PCALighting(pca, 0.0)(img), img)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        PCALighting(pca)(torch.rand(1, 4, 4))
    with pytest.raises(ValueError):
        PCALighting(pca, -1.0)


def _ramp(width: int, height: int) -> Image.Image:
    """Every pixel unique: R = x, G = y, so a crop reveals exactly where it came from."""
    x = np.tile(np.arange(width, dtype=np.uint8), (height, 1))
    y = np.tile(np.arange(height, dtype=np.uint8)[:, None], (1, width))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1))


def test_random_crop_flip_geometry() -> None:
    img = _ramp(40, 30)
    random.seed(0)
    crop = RandomCropFlip(16, flip_p=0.5)
    lefts, tops, flips = set(), set(), []
    for _ in range(400):
        state = random.getstate()
        left, top, flip = crop.params(40, 30)
        random.setstate(state)
        out = np.asarray(crop(img))
        assert out.shape == (16, 16, 3)
        expected = np.asarray(img)[top:top + 16, left:left + 16]
        assert np.array_equal(out, expected[:, ::-1] if flip else expected)
        lefts.add(left), tops.add(top), flips.append(flip)
    assert min(lefts) == 0 and max(lefts) == 40 - 16 and min(tops) == 0 and max(tops) == 30 - 16
    assert 0.4 < np.mean(flips) < 0.6
    for _ in range(20):  # R grows left to right in the source: never mirrored at p=0, always at p=1
        kept, mirrored = np.asarray(RandomCropFlip(16, 0.0)(img)), np.asarray(RandomCropFlip(16, 1.0)(img))
        assert int(kept[0, 1, 0]) - int(kept[0, 0, 0]) == 1
        assert int(mirrored[0, 0, 0]) - int(mirrored[0, 1, 0]) == 1
    with pytest.raises(ValueError, match="cannot take"):
        RandomCropFlip(50)(img)


def test_train_transform_output(pca: RGBPCA) -> None:
    random.seed(0), torch.manual_seed(0)
    tf = train_transform(40, 32, IMAGENET_MEAN, IMAGENET_STD, pca=pca)
    out = tf(_ramp(60, 45))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="RGB images only"):
        train_transform(40, 32, (0.5,), (0.5,), pca=pca)
    with pytest.raises(ValueError, match="crop <= resize"):
        train_transform(30, 32, IMAGENET_MEAN, IMAGENET_STD)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pixels(t: torch.Tensor) -> np.ndarray:
    """Normalized CHW tensors back to uint8-scale HWC floats."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 3, 1, 1)
    return ((t.reshape(-1, *t.shape[-3:]) * std + mean) * 255).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("size", [(80, 61), (61, 80), (72, 72)])
def test_eval_crops_are_the_pixels_the_gateway_serves(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    pre = Preprocess(resize=40, crop=32, channels=3)
    served_one = preprocess(_png(img), pre, ten_crop=False).astype(np.float32)
    served_ten = preprocess(_png(img), pre, ten_crop=True).astype(np.float32)
    centre = eval_transform(40, 32, IMAGENET_MEAN, IMAGENET_STD)(img)
    ten = ten_crop_transform(40, 32, IMAGENET_MEAN, IMAGENET_STD)(img)
    assert centre.shape == (3, 32, 32) and ten.shape == (10, 3, 32, 32)
    assert np.abs(_pixels(centre) - served_one).max() < 0.01
    assert np.abs(_pixels(ten) - served_ten).max() < 0.01
    # Crop 4 is the centre crop; crops 5-9 mirror crops 0-4 (corners swap sides under the mirror).
    assert torch.allclose(ten[4], centre)
    assert torch.allclose(ten[9], centre.flip(-1))
