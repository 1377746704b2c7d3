"""Object-crop pretraining (export/recipes/pretrain.py): objects from masks, crops at the serving scale, and
an encoder that learns from them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from export.dense_models import Encoder
from export.recipes.pretrain import SHIFT_FRACTION, mask_objects, object_crops, pretrain_encoder


def test_mask_objects_finds_each_region_of_each_class_and_skips_specks_and_void() -> None:
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[2:10, 3:13] = 1          # class 1, region A
    mask[20:30, 40:55] = 1        # class 1, region B
    mask[15:25, 10:18] = 2        # class 2
    mask[35:37, 0:3] = 2          # a 6-pixel speck: not an object
    mask[0:5, 50:60] = 255        # void
    boxes, labels = mask_objects(mask, num_classes=3)
    found = sorted(zip(labels.tolist(), boxes.tolist()))
    assert found == [(0, [3, 2, 13, 10]), (0, [40, 20, 55, 30]), (1, [10, 15, 18, 25])]


def test_crops_are_centred_on_objects_at_the_serving_letterbox_scale() -> None:
    # A 200 x 100 image letterboxes to 64 x 32 (scale 0.32), centred with 16 rows of padding above.
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[40:60, 150:170] = 255                        # a white square centred at (160, 50)
    image = Image.fromarray(pixels)
    crops = object_crops([(image, np.array([[150, 40, 170, 60]]), np.array([3]))], size=64, window=16)
    margin = int(round(16 * SHIFT_FRACTION))
    assert crops.pixels.shape == (1, 16 + 2 * margin, 16 + 2 * margin, 3) and crops.labels.tolist() == [3]
    centre = crops.pixels[0, crops.pixels.shape[1] // 2, crops.pixels.shape[2] // 2]
    assert centre.min() > 200                           # the object sits in the middle of its window
    corner = crops.pixels[0, 0, 0]
    assert corner.max() < 200                           # and the window is not all object (scaled down to ~6 px)


def test_an_object_at_the_edge_gets_the_letterbox_fill_beyond_the_image() -> None:
    from serving.preprocess import LETTERBOX_FILL

    pixels = np.full((64, 64, 3), 10, dtype=np.uint8)
    crops = object_crops([(Image.fromarray(pixels), np.array([[0, 0, 4, 4]]), np.array([0]))], size=64, window=32)
    assert (crops.pixels[0, 0, 0] == LETTERBOX_FILL).all() and (crops.pixels[0, -1, -1] == 10).all()


def test_no_objects_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no objects"):
        object_crops([(Image.new("RGB", (32, 32)), np.zeros((0, 4)), np.zeros(0))], size=32, window=16)


def test_the_encoder_learns_classes_that_only_shape_separates() -> None:
    # Two classes with the same colour and area: a horizontal bar and a vertical bar, randomly placed.
    rng = np.random.default_rng(0)
    pixels, labels = [], []
    for i in range(256):
        img = rng.integers(0, 60, size=(20, 20, 3), dtype=np.uint8)
        y, x = rng.integers(4, 12, size=2)
        if i % 2:
            img[y:y + 3, x - 4:x + 5] = 220
        else:
            img[y - 4:y + 5, x:x + 3] = 220
        pixels.append(img)
        labels.append(i % 2)
    from export.recipes.pretrain import ObjectCrops

    crops = ObjectCrops(np.stack(pixels), np.array(labels, dtype=np.int64), window=16)
    torch.manual_seed(0)
    encoder = Encoder((8, 16, 16, 16), blocks=(0, 1, 1, 0))
    before = [p.detach().clone() for p in encoder.parameters()]
    result = pretrain_encoder(encoder, crops, num_classes=2, mean=(0.5,) * 3, std=(0.25,) * 3, epochs=12, lr=1e-2,
                              batch_size=32, progress=False)
    assert result.crops == 256 and result.epochs == 12
    assert result.train_accuracy > 0.9, result              # chance is 0.5
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.parameters()))  # the encoder itself moved
