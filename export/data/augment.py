"""Training augmentation and evaluation crops, as in AlexNet (Krizhevsky et al., 2012).

Geometry matches what the gateway serves (serving/preprocess.py), so a model
sees the same pixels in training evaluation and in production:

* train: resize the shorter side to S, centre-crop S x S, take a random C x C
  crop, flip horizontally with probability 0.5, then "PCA colour jitter";
* eval: resize S, centre-crop S x S, centre-crop C x C;
* ten-crop eval: resize S, centre-crop S x S, the four corner and the centre
  C x C crops plus their mirrors (torchvision's TenCrop order).

PCA colour jitter (the paper's "altering the intensities of the RGB channels"):
with p_i, lambda_i the eigenvectors and eigenvalues of the 3x3 covariance of the
training set's RGB pixels, each *image* gets one draw alpha_i ~ N(0, 0.1) and
every pixel gets ``[p1 p2 p3] [alpha1 lambda1, alpha2 lambda2, alpha3 lambda3]^T``
added. Pixels are on the [0, 1] scale (on 0-255 the eigenvalues would be 255^2
larger and the shift absurd), so on natural images the shift is a few grey
levels along the directions in which the data's colours actually vary: the
network learns that illumination colour and intensity do not change the class.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

PCA_ALPHA_STD = 0.1


@dataclass(frozen=True)
class RGBPCA:
    """Principal components of RGB pixel values on the [0, 1] scale.

    eigvals: [3] float, descending (variances along each component);
    eigvecs: [3, 3] float, column i is the unit eigenvector p_i.
    """

    eigvals: tuple[float, float, float]
    eigvecs: tuple[tuple[float, float, float], ...]
    pixels: int = 0

    def vectors(self) -> np.ndarray:
        return np.asarray(self.eigvecs, dtype=np.float64)

    def values(self) -> np.ndarray:
        return np.asarray(self.eigvals, dtype=np.float64)

    def to_dict(self) -> dict[str, object]:
        return {"eigvals": list(self.eigvals), "eigvecs": [list(r) for r in self.eigvecs], "pixels": self.pixels}

    @classmethod
    def from_dict(cls, data: dict) -> "RGBPCA":
        vals = tuple(float(v) for v in data["eigvals"])
        vecs = tuple(tuple(float(v) for v in row) for row in data["eigvecs"])
        if len(vals) != 3 or len(vecs) != 3 or any(len(r) != 3 for r in vecs):
            raise ValueError("an RGB PCA needs 3 eigenvalues and a 3x3 eigenvector matrix")
        return cls(vals, vecs, int(data.get("pixels", 0)))  # type: ignore[arg-type]


def rgb_pca(pixels: np.ndarray) -> RGBPCA:
    """Eigen-decomposition of the covariance of ``pixels`` ([M, 3], values in [0, 1])."""
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 3)
    if pixels.shape[0] < 2:
        raise ValueError("need at least two pixels for a covariance")
    cov = np.cov(pixels, rowvar=False)
    vals, vecs = np.linalg.eigh(cov)  # symmetric: real values, orthonormal vectors, ascending
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    return RGBPCA(tuple(float(v) for v in vals),  # type: ignore[arg-type]
                  tuple(tuple(float(v) for v in row) for row in vecs), int(pixels.shape[0]))


def rgb_pca_of_images(paths: Sequence[Path | str], *, max_images: int = 2000, pixels_per_image: int = 1024,
                      seed: int = 0) -> RGBPCA:
    """The RGB PCA of a training set, estimated from a seeded sample of its images and pixels.

    A sample is enough: the 3x3 covariance of a few hundred thousand pixels is
    stable to well below the jitter's own noise.
    """
    if not paths:
        raise ValueError("no images to compute the RGB PCA from")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(max_images, len(paths)), replace=False)
    samples = []
    for i in sorted(chosen):
        with Image.open(paths[i]) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32).reshape(-1, 3) / 255.0
        take = rng.choice(arr.shape[0], size=min(pixels_per_image, arr.shape[0]), replace=False)
        samples.append(arr[take])
    return rgb_pca(np.concatenate(samples))


class PCALighting:
    """AlexNet's RGB intensity jitter on a [3, H, W] float tensor in [0, 1] (see the module docstring).

    Uses torch's global generator, so seeding torch (and DataLoader workers) makes it repeatable.
    Not clamped: the paper does not clamp, and normalization follows.
    """

    def __init__(self, pca: RGBPCA, alpha_std: float = PCA_ALPHA_STD) -> None:
        if alpha_std < 0:
            raise ValueError(f"alpha_std must be >= 0, got {alpha_std}")
        self.alpha_std = float(alpha_std)
        self.eigvals = torch.tensor(pca.eigvals, dtype=torch.float32)
        self.eigvecs = torch.tensor(pca.eigvecs, dtype=torch.float32)

    def shift(self) -> torch.Tensor:
        """One image's RGB offset: sum_i alpha_i lambda_i p_i."""
        alpha = torch.randn(3) * self.alpha_std
        return self.eigvecs @ (alpha * self.eigvals)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"PCALighting needs a [3, H, W] tensor, got {tuple(img.shape)}")
        if self.alpha_std == 0:
            return img
        return img + self.shift().to(img.dtype).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha_std={self.alpha_std}, eigvals={[round(float(v), 5) for v in self.eigvals]})"


class RandomCropFlip:
    """A random C x C crop and a horizontal flip with probability ``flip_p``, from Python's ``random``.

    Kept separate from torchvision's pair so its geometry is explicit and testable.
    """

    def __init__(self, crop: int, flip_p: float = 0.5) -> None:
        if crop <= 0:
            raise ValueError(f"crop must be positive, got {crop}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {flip_p}")
        self.crop, self.flip_p = crop, flip_p

    def params(self, width: int, height: int) -> tuple[int, int, bool]:
        """(left, top, flip) for an image of this size."""
        if width < self.crop or height < self.crop:
            raise ValueError(f"cannot take a {self.crop}x{self.crop} crop of a {width}x{height} image")
        return random.randint(0, width - self.crop), random.randint(0, height - self.crop), random.random() < self.flip_p

    def __call__(self, img: Image.Image) -> Image.Image:
        left, top, flip = self.params(*img.size)
        out = img.crop((left, top, left + self.crop, top + self.crop))
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(crop={self.crop}, flip_p={self.flip_p})"


def _check_sizes(resize: int, crop: int) -> None:
    if crop <= 0 or resize < crop:
        raise ValueError(f"need 0 < crop <= resize, got resize={resize} crop={crop}")


def _square(resize: int) -> list:
    # Bilinear with antialiasing on PIL images: the resize the gateway does.
    return [T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(resize)]


def train_transform(resize: int, crop: int, mean: Sequence[float], std: Sequence[float], *,
                    pca: RGBPCA | None = None, pca_std: float = PCA_ALPHA_STD, flip_p: float = 0.5) -> T.Compose:
    """PIL image -> normalized [C, crop, crop] tensor with random crop, flip and (RGB only) PCA jitter."""
    _check_sizes(resize, crop)
    steps: list = [*_square(resize), RandomCropFlip(crop, flip_p), T.ToTensor()]
    if pca is not None and pca_std > 0:
        if len(mean) != 3:
            raise ValueError("PCA colour jitter applies to RGB images only")
        steps.append(PCALighting(pca, pca_std))
    steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def eval_transform(resize: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """PIL image -> normalized [C, crop, crop] centre crop (what the gateway's 1-crop path sees)."""
    _check_sizes(resize, crop)
    return T.Compose([*_square(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])


def ten_crop_transform(resize: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """PIL image -> normalized [10, C, crop, crop]: corners + centre and their mirrors, as the gateway does."""
    _check_sizes(resize, crop)
    return T.Compose([*_square(resize), T.TenCrop(crop), StackNormalize(mean, std)])


class StackNormalize:
    """A sequence of PIL crops -> one normalized [n, C, H, W] tensor (a class, so DataLoader workers can pickle it)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, crops: Iterable[Image.Image]) -> torch.Tensor:
        return torch.stack([self.normalize(c) for c in crops])
