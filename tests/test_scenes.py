"""``imgserve make-dataset scenes``: valid COCO and VOC files, masks that agree with boxes, readers, and the
letterbox round trip of the generator's ground-truth boxes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.data.coco import CocoDetection
from export.data.make_dataset import ScenesLayout, main, make_scenes
from export.data.scenes import SCENE_CLASSES, ScenesConfig, generate_scene
from export.data.voc import VocSegmentation, load_mask
from serving.preprocess import letterbox

COUNTS = {"train": 6, "val": 3, "test": 12}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "data"
    assert main(["scenes", str(root), "--train", str(COUNTS["train"]), "--val", str(COUNTS["val"]),
                 "--test", str(COUNTS["test"]), "--seed", "3", "--no-progress"]) == 0
    return root


def test_layout_and_manifest(scenes: Path) -> None:
    manifest = json.loads((scenes / "dataset.json").read_text())
    assert manifest["generator"] == "scenes" and manifest["counts"] == COUNTS
    assert (scenes / "labels.txt").read_text().split() == ["background", *SCENE_CLASSES]
    for split, n in COUNTS.items():
        layout = ScenesLayout(scenes, split)
        assert len(list(layout.images.glob("*.png"))) == n == len(list(layout.masks.glob("*.png")))
        assert layout.annotations.is_file()


def test_coco_json_is_valid_for_pycocotools(scenes: Path) -> None:
    from pycocotools.coco import COCO

    coco = COCO(str(ScenesLayout(scenes, "test").annotations))
    assert len(coco.getImgIds()) == COUNTS["test"]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SCENE_CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= COUNTS["test"]  # 1-6 objects per image
    for ann in anns:
        img = coco.imgs[ann["image_id"]]
        mask = coco.annToMask(ann)  # the RLE decodes to the image's size
        assert mask.shape == (img["height"], img["width"])
        assert mask.sum() == ann["area"] > 0 and ann["iscrowd"] == 0
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"] and w > 0 and h > 0


def test_masks_match_boxes_and_classes(scenes: Path) -> None:
    """Every instance's pixels carry its class in the palette mask and lie inside its box (to the pixel)."""
    from pycocotools.coco import COCO

    layout = ScenesLayout(scenes, "test")
    coco = COCO(str(layout.annotations))
    for image_id, img in coco.imgs.items():
        classes = load_mask(layout.masks / img["file_name"])
        assert classes.shape == (img["height"], img["width"])
        covered = np.zeros_like(classes, dtype=bool)
        for ann in coco.imgToAnns[image_id]:
            inst = coco.annToMask(ann).astype(bool)
            assert np.all(classes[inst] == ann["category_id"])  # category k is class index k in the masks
            ys, xs = np.nonzero(inst)
            x, y, w, h = ann["bbox"]
            assert xs.min() >= np.floor(x) and xs.max() + 1 <= np.ceil(x + w)
            assert ys.min() >= np.floor(y) and ys.max() + 1 <= np.ceil(y + h)
            # Tight: the box is the drawn extent (sub-pixel), the mask each pixel's centre sample; thin tips differ.
            assert xs.min() - x < 2 and x + w - (xs.max() + 1) < 2 and ys.min() - y < 2 and y + h - (ys.max() + 1) < 2
            covered |= inst
        assert np.all(classes[~covered] == 0)  # everything else is background


def test_scenes_vary_in_size_and_are_reproducible(scenes: Path) -> None:
    coco = json.loads(ScenesLayout(scenes, "test").annotations.read_text())
    assert any(im["width"] != im["height"] for im in coco["images"])  # the letterbox is exercised
    again = generate_scene(ScenesConfig(size=128, seed=3), "test", 0)
    with Image.open(ScenesLayout(scenes, "test").images / "000000.png") as stored:
        assert np.array_equal(np.asarray(stored), np.asarray(again.image))
    other = generate_scene(ScenesConfig(size=128, seed=4), "test", 0)
    assert not np.array_equal(np.asarray(other.image), np.asarray(again.image)) or other.image.size != again.image.size


def test_refuses_to_overwrite(scenes: Path) -> None:
    with pytest.raises(FileExistsError):
        make_scenes(scenes, train=1, val=0, test=0, progress=False)


def test_readers(scenes: Path) -> None:
    layout = ScenesLayout(scenes, "val")
    det = CocoDetection(layout.images, layout.annotations)
    seg = VocSegmentation(layout.images, layout.masks)
    assert len(det) == len(seg) == COUNTS["val"] and det.classes == list(SCENE_CLASSES)
    image, target = det[0]
    assert target["boxes"].dtype == np.float32 and target["boxes"].shape[1] == 4
    assert target["labels"].min() >= 0 and target["labels"].max() < len(SCENE_CLASSES)
    image2, target2 = seg[0]
    assert image.size == image2.size == target2["mask"].shape[::-1]


def _box_coverage(box: tuple[float, float, float, float], width: int, height: int) -> Image.Image:
    """A float image of how much of each pixel the box covers (its edges anti-aliased, sub-pixel exact)."""
    x1, y1, x2, y2 = box
    cols = np.clip(np.minimum(np.arange(width) + 1, x2) - np.maximum(np.arange(width), x1), 0, 1)
    rows = np.clip(np.minimum(np.arange(height) + 1, y2) - np.maximum(np.arange(height), y1), 0, 1)
    return Image.fromarray(np.outer(rows, cols).astype(np.float32), mode="F")


@pytest.mark.parametrize("upscale", [0.7, 1.0, 2.3])
def test_ground_truth_boxes_survive_resize_and_letterbox(scenes: Path, upscale: float) -> None:
    """A user's copy of each scene at another resolution, letterboxed as the gateway does it: where each
    ground-truth box's pixels land in the model input (resampled like the image), mapped back with the
    Letterbox record, is the box again within 2 px at the original size."""
    from pycocotools.coco import COCO

    layout = ScenesLayout(scenes, "test")
    coco = COCO(str(layout.annotations))
    worst, checked = 0.0, 0
    for image_id, img in coco.imgs.items():
        size = (round(img["width"] * upscale), round(img["height"] * upscale))
        with Image.open(layout.images / img["file_name"]) as original:
            _, record = letterbox(original.resize(size, Image.Resampling.BILINEAR), 128)
        for ann in coco.imgToAnns[image_id]:
            x, y, w, h = ann["bbox"]
            truth = np.array([x, y, x + w, y + h])
            user = _box_coverage(tuple(truth * upscale), *size)  # the box in the user's copy
            model_input = np.zeros((128, 128), dtype=np.float32)
            model_input[record.pad_y:record.pad_y + record.new_height, record.pad_x:record.pad_x + record.new_width] = \
                np.asarray(user.resize((record.new_width, record.new_height), Image.Resampling.BILINEAR))
            ys, xs = np.nonzero(model_input >= 0.5)
            seen = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
            back = record.boxes_to_original(seen) / upscale
            worst = max(worst, float(np.abs(back - truth).max()))
            checked += 1
            # The record's two directions are exact inverses of each other.
            np.testing.assert_allclose(record.boxes_to_original(record.boxes_to_input(truth * upscale)) / upscale,
                                       truth, atol=1e-3)
    assert checked >= COUNTS["test"]
    assert worst <= 2.0, f"a ground-truth box moved {worst:.2f} px through resize + letterbox + back"
