"""Detection/segmentation augmentations move boxes and masks with the pixels (flips, rescales, crops)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from export.data.dense_augment import (ColourJitter, Letterbox, RandomHorizontalFlip, RandomLetterbox, RandomMaskCrop,
                                       place_boxes,
                                       train_transforms)
from export.data.scenes import ScenesConfig, generate_scene

SIZE = 128


def _scene_target(index: int) -> tuple[Image.Image, dict]:
    """A generated scene with an instance-id mask as the "mask" and the instance ids as "labels", so every
    box can be checked against where its own pixels went."""
    scene = generate_scene(ScenesConfig(seed=11), "val", index)
    ids = np.zeros(scene.classes.shape, np.uint8)
    for k, obj in enumerate(scene.objects, start=1):
        ids[obj.mask] = k
    boxes = np.array([o.box for o in scene.objects], np.float32).reshape(-1, 4)
    return scene.image, {"boxes": boxes, "labels": np.arange(1, len(boxes) + 1), "mask": ids}


def _mask_box(mask: np.ndarray, k: int) -> np.ndarray | None:
    ys, xs = np.nonzero(mask == k)
    return None if xs.size == 0 else np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("seed", range(12))
def test_boxes_follow_their_pixels_through_the_training_pipeline(seed: int) -> None:
    random.seed(seed)
    image, target = _scene_target(seed)
    pixels, out = train_transforms(SIZE, zoom=(0.5, 1.4), aspect=0.3)(image, target)
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    assert out["mask"].shape == (SIZE, SIZE)
    for box, k in zip(out["boxes"], out["labels"]):
        seen = _mask_box(out["mask"], k)
        assert seen is not None, f"instance {k} kept a box but lost all its pixels"
        # Scaled by up to 1.4 (and a 1-2 px gap between the drawn extent and centre-sampled pixels): 3 px.
        assert np.abs(seen - box).max() <= 3.0, (seen, box)
    assert np.all((out["boxes"] >= 0) & (out["boxes"] <= SIZE))


def test_flip_mirrors_pixels_boxes_and_masks() -> None:
    random.seed(0)
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[10:30, 5:25] = 255
    mask = (image[..., 0] > 0).astype(np.uint8)
    target = {"boxes": np.array([[5, 10, 25, 30]], np.float32), "labels": np.array([1]), "mask": mask}
    flipped, out = RandomHorizontalFlip(p=1.0)(image, target)
    np.testing.assert_array_equal(out["boxes"], [[SIZE - 25, 10, SIZE - 5, 30]])
    np.testing.assert_array_equal(_mask_box(out["mask"], 1), out["boxes"][0])
    np.testing.assert_array_equal(_mask_box((flipped[..., 0] > 0).astype(np.uint8), 1), out["boxes"][0])
    same, out2 = RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and out2 is target


def test_random_letterbox_without_jitter_is_the_serving_letterbox() -> None:
    """zoom 1, no aspect jitter and a centred position give exactly serving.preprocess.letterbox's pixels."""
    image, target = _scene_target(3)
    served, record = Letterbox(SIZE)(image, target)[0], Letterbox(SIZE)(image, target)[1]["letterbox"]
    random.seed(0)
    rl = RandomLetterbox(SIZE, zoom=(1.0, 1.0), aspect=0.0)
    for _ in range(50):  # the position is random; find the draws that centre it
        pixels, out = rl(image, target)
        if np.array_equal(pixels, served):
            np.testing.assert_allclose(out["boxes"], record.boxes_to_input(target["boxes"]), atol=1e-4)
            return
    pytest.fail("no centred draw in 50 tries")


def test_place_boxes_clips_and_drops() -> None:
    boxes = np.array([[0, 0, 10, 10], [90, 90, 110, 110], [120, 0, 140, 10]], np.float32)
    out, labels = place_boxes(boxes, np.array([0, 1, 2]), 1.0, 1.0, 0, 0, 100)
    np.testing.assert_array_equal(out, [[0, 0, 10, 10]])  # a quarter left of box 1: dropped; box 2 outside
    out, labels = place_boxes(boxes, np.array([0, 1, 2]), 0.5, 0.5, 10, 20, 100)
    np.testing.assert_allclose(out, [[10, 20, 15, 25], [55, 65, 65, 75], [70, 20, 80, 25]])
    assert labels.tolist() == [0, 1, 2]


def test_colour_jitter_keeps_geometry() -> None:
    random.seed(1)
    image, target = _scene_target(0)
    jittered, out = ColourJitter(0.4, 0.4, 0.4)(image, target)
    assert jittered.size == image.size and out is target
    assert not np.array_equal(np.asarray(jittered), np.asarray(image))


@pytest.mark.parametrize("seed", range(6))
def test_mask_crop_cuts_pixels_and_mask_at_the_same_window(seed: int) -> None:
    random.seed(seed)
    image, target = _scene_target(seed)
    del target["boxes"], target["labels"]
    # Pixels that encode their own position, so the crop's origin can be read back from the image.
    pixels, out = train_transforms(SIZE, zoom=(1.0, 1.0), aspect=0.0, flip_p=0.0, colour=0.0, crop=96)(image, target)
    assert pixels.shape == (96, 96, 3) and out["mask"].shape == (96, 96)
    assert out["mask"].any(), "the window should hold part of the scene, not only the letterbox's bars"
    canvas = np.arange(SIZE * SIZE, dtype=np.int64).reshape(SIZE, SIZE)
    coded = np.stack([canvas % 256, canvas // 256, np.zeros_like(canvas)], -1).astype(np.uint8)
    random.seed(seed)
    cropped, moved = RandomMaskCrop(96)(coded, {"mask": (canvas % 7).astype(np.uint8)})
    y, x = divmod(int(cropped[0, 0, 0]) + 256 * int(cropped[0, 0, 1]), SIZE)
    np.testing.assert_array_equal(cropped, coded[y:y + 96, x:x + 96])
    np.testing.assert_array_equal(moved["mask"], (canvas % 7)[y:y + 96, x:x + 96])


def test_mask_crop_refuses_boxes_and_oversized_windows() -> None:
    with pytest.raises(ValueError, match="masks only"):
        RandomMaskCrop(64)(np.zeros((SIZE, SIZE, 3), np.uint8), {"mask": np.zeros((SIZE, SIZE), np.uint8),
                                                                  "boxes": np.zeros((0, 4), np.float32)})
    with pytest.raises(ValueError, match="larger than"):
        RandomMaskCrop(160)(np.zeros((SIZE, SIZE, 3), np.uint8), {"mask": np.zeros((SIZE, SIZE), np.uint8)})
