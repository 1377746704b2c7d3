"""Detect and Segment through the real gateway (gRPC, HTTP, v2) over a fake engine, in-process.

The fake detector and segmenter (tests/fakes.py) answer from the pixels they are given: the
object is every bright pixel of the letterboxed input. So every number below follows from
the gateway's own geometry (decode, letterbox, mirror for TTA, map back to the original),
and a wrong offset, scale or flip shows up as a box or mask in the wrong place.
"""
from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http.aio as thttp_aio
from PIL import Image
from tritonclient.utils import InferenceServerException

from clients.sdk import AsyncImageClient, ImageClient, InvalidArgument
from serving.repository import RepositoryError, TensorSpec
from serving.tasks import check_servable, handler_for
from serving.tasks.detection import fuse_boxes
from serving.tasks.masks import coco_rle, palette_png, rle_counts
from tests.fakes import (DETECT_K, ScriptedBackend, grey_png, grpc_target, http_url, rectangle_png, running_gateway,
                         tiny_detector_spec, tiny_segmenter_spec, tiny_spec)
from tests.requirements import require_module

pytestmark = pytest.mark.timeout(120)

# (width, height, box) cases: wide, tall, square, and a box touching the image edge
CASES = [(150, 90, (30, 20, 100, 70)), (64, 200, (10, 120, 50, 190)), (96, 96, (0, 0, 40, 30)),
         (300, 120, (250, 60, 300, 120))]


def backend() -> ScriptedBackend:
    return ScriptedBackend(tiny_spec(), tiny_detector_spec(), tiny_segmenter_spec())


def box_error(got: tuple[float, ...], want: tuple[int, ...]) -> float:
    return float(np.max(np.abs(np.array(got) - np.array(want, dtype=float))))


def max_box_tolerance(width: int, height: int) -> float:
    """One input pixel of the 32 px letterbox is this many original pixels (plus rounding)."""
    return max(width, height) / 32 + 1.0


@pytest.mark.parametrize("target", ["grpc", "http"])
async def test_detect_boxes_come_back_in_original_pixels(target: str) -> None:
    fake = backend()
    async with running_gateway(fake) as gw:
        url = grpc_target(gw) if target == "grpc" else http_url(gw)
        async with AsyncImageClient(url, timeout=30) as client:
            images = [rectangle_png(w, h, box) for w, h, box in CASES]
            result = await client.detect(images, "tinydet")
    assert result.model == "tinydet" and not result.tta and len(result) == len(CASES)
    for (w, h, box), image in zip(CASES, result):
        assert (image.width, image.height) == (w, h)
        assert len(image) == 1, "the default threshold (0.3) drops the 0.2 whole-image box"
        det = image[0]
        assert det.label == "bright" and det.index == 0 and det.score == pytest.approx(0.9)
        assert box_error(det.box, box) <= max_box_tolerance(w, h), (det.box, box)


async def test_detect_options_threshold_limit_and_flip_tta() -> None:
    fake = backend()
    w, h, box = CASES[0]
    async with running_gateway(fake) as gw:
        async with AsyncImageClient(grpc_target(gw), timeout=30) as client:
            both = await client.detect(rectangle_png(w, h, box), "tinydet", score_threshold=0.1)
            one = await client.detect(rectangle_png(w, h, box), "tinydet", score_threshold=0.1, max_detections=1)
            plain = await client.detect(rectangle_png(w, h, box), "tinydet")
            calls_before = len(fake.calls)
            flipped = await client.detect(rectangle_png(w, h, box), "tinydet", tta=True)
    assert [d.label for d in both[0]] == ["bright", "dim"]
    whole = both[0][1]
    assert box_error(whole.box, (0, 0, w, h)) <= max_box_tolerance(w, h), "the whole input maps to the whole image"
    assert [d.label for d in one[0]] == ["bright"]
    # TTA: two views, the second exactly the mirror of the first, and the fused box where the plain one is
    (_, sent), = fake.calls[calls_before:]
    assert sent.shape[0] == 2
    np.testing.assert_array_equal(sent[1], sent[0][:, ::-1])
    assert flipped.tta and len(flipped[0]) == 1
    assert box_error(flipped[0][0].box, plain[0][0].box) <= 1.0
    assert flipped[0][0].score == pytest.approx(0.9), "agreeing views keep their score"


async def test_same_image_alone_and_inside_a_batch_gives_identical_detections() -> None:
    fake = backend()
    images = [rectangle_png(w, h, box) for w, h, box in CASES * 2]
    async with running_gateway(fake) as gw:
        async with AsyncImageClient(grpc_target(gw), timeout=30) as client:
            alone = [await client.detect(image, "tinydet") for image in images]
            together = await client.detect(images, "tinydet")
    assert [a[0] for a in alone] == list(together.images)


@pytest.mark.parametrize("target", ["grpc", "http"])
async def test_segment_mask_at_original_size(target: str) -> None:
    fake = backend()
    async with running_gateway(fake) as gw:
        url = grpc_target(gw) if target == "grpc" else http_url(gw)
        async with AsyncImageClient(url, timeout=30) as client:
            result = await client.segment([rectangle_png(w, h, box) for w, h, box in CASES], "tinyseg", rle=True)
            tta = await client.segment(rectangle_png(*CASES[0][:2], CASES[0][2]), "tinyseg", tta=True)
    for (w, h, (x1, y1, x2, y2)), image in zip(CASES, result):
        mask = image.mask
        assert mask.shape == (h, w) and mask.dtype == np.uint8
        want = np.zeros((h, w), np.uint8)
        want[y1:y2, x1:x2] = 1
        wrong = int((mask != want).sum())
        # only pixels along the rectangle's edge may differ (upsampling from a 32 px input)
        edge = 2 * ((x2 - x1) + (y2 - y1)) * max_box_tolerance(w, h)
        assert wrong <= edge, (wrong, edge)
        fractions = {c.label: c.fraction for c in image.classes}
        assert fractions["bright"] == pytest.approx(mask.mean(), abs=1e-6)
        assert set(image.rle) == {0, 1} and image.rle[1]["size"] == [h, w]
        with Image.open(io.BytesIO(image.mask_png)) as png:
            assert png.mode == "P" and png.size == (w, h)
    assert tta.tta
    np.testing.assert_array_equal(tta[0].mask, result[0].mask)


async def test_segment_rle_matches_pycocotools() -> None:
    mask_utils = require_module("pycocotools.mask", "COCO RLE is checked against pycocotools' own encoder")
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (40, 31), (64, 64)]:
        binary = (rng.random(shape) > 0.6).astype(np.uint8)
        ours = coco_rle(binary)
        theirs = mask_utils.encode(np.asfortranarray(binary))
        assert ours["counts"] == theirs["counts"].decode() and ours["size"] == list(theirs["size"])
        np.testing.assert_array_equal(mask_utils.decode({"size": ours["size"], "counts": ours["counts"].encode()}),
                                      binary)
    assert rle_counts(np.ones((2, 2))) == [0, 4]


async def test_palette_png_keeps_class_indices() -> None:
    mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
    with Image.open(io.BytesIO(palette_png(mask))) as img:
        assert img.mode == "P"
        np.testing.assert_array_equal(np.array(img), mask)
        assert img.getpalette()[3:6] == [128, 0, 0], "PASCAL VOC colours: class 1 is dark red"


async def test_v2_detector_and_segmenter_outputs_in_original_pixels() -> None:
    fake = backend()
    w, h, box = CASES[1]
    png = rectangle_png(w, h, box)
    async with running_gateway(fake) as gw:
        client = tgrpc_aio.InferenceServerClient(grpc_target(gw))
        try:
            inp = tgrpc_aio.InferInput("image", [2], "BYTES")
            inp.set_data_from_numpy(np.array([png, png], dtype=np.object_))
            params = {"score_threshold": 0.1, "max_detections": 2}
            det = await client.infer("tinydet", [inp], parameters=params)
            seg = await client.infer("tinyseg", [inp])
            meta = await client.get_model_metadata("tinydet", as_json=True)
        finally:
            await client.close()
        http = thttp_aio.InferenceServerClient(f"127.0.0.1:{gw.http_port}")
        try:
            hinp = thttp_aio.InferInput("image", [2], "BYTES")
            hinp.set_data_from_numpy(np.array([png, rectangle_png(w + 1, h, box)], dtype=np.object_))
            with pytest.raises(InferenceServerException, match="different sizes"):
                await http.infer("tinyseg", [hinp])
            hinp.set_data_from_numpy(np.array([png, png], dtype=np.object_), binary_data=True)
            hdet = await http.infer("tinydet", [hinp], outputs=[thttp_aio.InferRequestedOutput("detection_boxes")])
        finally:
            await http.close()
    assert det.as_numpy("num_detections").tolist() == [[2], [2]]
    boxes = det.as_numpy("detection_boxes")
    assert boxes.shape == (2, 2, 4) and det.as_numpy("detection_classes").dtype == np.int32
    assert box_error(tuple(boxes[0, 0]), box) <= max_box_tolerance(w, h)
    np.testing.assert_array_equal(hdet.as_numpy("detection_boxes")[:, :1], boxes[:, :1])
    labels = seg.as_numpy("labels")
    assert labels.shape == (2, h, w) and labels.dtype == np.uint8
    assert [o["name"] for o in meta["outputs"]] == ["num_detections", "detection_boxes", "detection_scores",
                                                   "detection_classes"]


@pytest.mark.parametrize("target", ["grpc", "http"])
async def test_bad_detect_and_segment_input_is_invalid_argument(target: str) -> None:
    fake = backend()
    image = rectangle_png(*CASES[0][:2], CASES[0][2])
    async with running_gateway(fake) as gw:
        url = grpc_target(gw) if target == "grpc" else http_url(gw)
        async with AsyncImageClient(url, timeout=30) as client:
            cases = [
                (client.detect(grey_png(1), "tiny"), "tiny.*classification model.*Classify"),
                (client.classify(image, "tinydet"), "tinydet.*detection model.*Detect"),
                (client.segment(image, "tinydet"), "tinydet.*detection model"),
                (client.detect(image, "tinyseg"), "tinyseg.*segmentation model.*Segment"),
                (client.detect(image, "tinydet", score_threshold=1.5), r"score_threshold must be in \[0, 1\]"),
                (client.detect(image, "tinydet", score_threshold=-0.1), r"score_threshold must be in \[0, 1\]"),
                (client.detect(image, "tinydet", max_detections=0), f"max_detections .* 1 to {DETECT_K}"),
                (client.detect(image, "tinydet", max_detections=DETECT_K + 1), f"max_detections .* 1 to {DETECT_K}"),
            ]
            for call, message in cases:
                with pytest.raises(InvalidArgument, match=message):
                    await call
            ok = await client.detect(image, "tinydet")  # the gateway is still serving
    assert len(ok[0]) == 1
    assert all(name != "tinydet" or len(batch) for name, batch in fake.calls)


def test_sync_client_detect_and_segment() -> None:
    async def scenario() -> None:
        async with running_gateway(backend()) as gw:
            def call(url: str) -> tuple[object, object, object]:
                with ImageClient(url, timeout=30) as client:
                    return (client.detect(rectangle_png(*CASES[0][:2], CASES[0][2]), "tinydet"),
                            client.segment(rectangle_png(*CASES[0][:2], CASES[0][2]), "tinyseg"),
                            client.models())
            for url in (grpc_target(gw), http_url(gw)):
                det, seg, models = await asyncio.to_thread(call, url)
                assert det[0][0].label == "bright" and seg[0].mask.shape == (CASES[0][1], CASES[0][0])
                by_name = {m.name: m for m in models}
                assert by_name["tinydet"].task == "detection" and by_name["tinydet"].geometry == "letterbox"
                assert by_name["tinyseg"].labels == ("background", "bright")
                assert by_name["tiny"].task == "classification"
    asyncio.run(scenario())


def test_models_whose_outputs_do_not_fit_their_task_are_refused() -> None:
    good = tiny_detector_spec()
    check_servable(good)
    check_servable(tiny_segmenter_spec())
    from dataclasses import replace
    no_boxes = replace(good, outputs=tuple(o for o in good.outputs if o.name != "detection_boxes"))
    with pytest.raises(RepositoryError, match="needs an output 'detection_boxes'"):
        check_servable(no_boxes)
    wrong_type = replace(good, outputs=tuple(TensorSpec(o.name, "FP32", o.dims) if o.name == "num_detections" else o
                                             for o in good.outputs))
    with pytest.raises(RepositoryError, match="num_detections.*INT32"):
        check_servable(wrong_type)
    with pytest.raises(RepositoryError, match="letterbox"):
        check_servable(replace(good, preprocess=tiny_spec().preprocess))
    with pytest.raises(RepositoryError, match="unknown task 'style'"):
        handler_for("style")


def test_weighted_box_fusion() -> None:
    a = (np.array([[10, 10, 50, 50], [100, 100, 120, 120]], np.float32), np.array([0.9, 0.8], np.float32),
         np.array([0, 1], np.int32))
    b = (np.array([[12, 10, 52, 50]], np.float32), np.array([0.6], np.float32), np.array([0], np.int32))
    boxes, scores, classes = fuse_boxes([a, b])
    order = np.argsort(-scores)
    boxes, scores, classes = boxes[order], scores[order], classes[order]
    # the two class-0 boxes fuse, weighted 0.9 : 0.6; the lone class-1 box keeps half its score
    np.testing.assert_allclose(boxes[0], [10.8, 10, 50.8, 50], atol=1e-4)
    assert scores.tolist() == pytest.approx([0.75, 0.4]) and classes.tolist() == [0, 1]
    # different classes never fuse
    c = (np.array([[10, 10, 50, 50]], np.float32), np.array([0.7], np.float32), np.array([1], np.int32))
    assert len(fuse_boxes([a, c])[0]) == 3


def test_cli_detect_draw_and_segment_overlay(tmp_path, capsys) -> None:
    """`imgserve detect --draw` paints the box where the object is; `segment --overlay/--mask` write pictures."""
    import json

    from clients.commands import detect as detect_cmd
    from clients.commands import segment as segment_cmd

    w, h, (x1, y1, x2, y2) = CASES[0]
    source = tmp_path / "scene.png"
    source.write_bytes(rectangle_png(w, h, (x1, y1, x2, y2)))

    async def scenario() -> list[int]:
        async with running_gateway(backend()) as gw:
            target = grpc_target(gw)
            return [
                await asyncio.to_thread(detect_cmd.main, [str(source), "-m", "tinydet", "-s", target,
                                                          "--draw", str(tmp_path / "boxes.png")]),
                await asyncio.to_thread(detect_cmd.main, [str(source), str(source), "-m", "tinydet", "-s",
                                                          http_url(gw), "--json", "--score-threshold", "0.1"]),
                await asyncio.to_thread(segment_cmd.main, [str(source), "-m", "tinyseg", "-s", target,
                                                           "--overlay", str(tmp_path / "over.png"),
                                                           "--mask", str(tmp_path / "mask.png")]),
                await asyncio.to_thread(detect_cmd.main, [str(source), "-m", "tinyseg", "-s", target]),
            ]

    codes = asyncio.run(scenario())
    out, err = capsys.readouterr()
    assert codes == [0, 0, 0, 1]
    assert "bright" in out and "(150x90, 1 detections)" in out
    doc = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert [len(im["detections"]) for im in doc["images"]] == [2, 2] and doc["images"][0]["image"] == str(source)
    assert "INVALID_ARGUMENT" in err and "segmentation model" in err
    drawn = np.asarray(Image.open(tmp_path / "boxes.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(source).convert("RGB")).astype(int)
    changed = np.abs(drawn - original).sum(axis=-1) > 0
    ys, xs = np.nonzero(changed)
    assert abs(xs.min() - x1) <= 6 and abs(xs.max() - x2) <= 6 and abs(ys.max() - y2) <= 6, "box drawn elsewhere"
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (h, w) and set(np.unique(mask)) == {0, 1}
    over = np.asarray(Image.open(tmp_path / "over.png").convert("RGB")).astype(int)
    tinted = np.abs(over - original).sum(axis=-1) > 0
    assert (tinted == (mask == 1)).mean() > 0.99, "only the object's pixels are tinted"


async def test_large_jpeg_boxes_and_masks_come_back_at_its_full_size() -> None:
    """A JPEG several times the model's input: JPEG draft decoding must not shrink the reported size."""
    w, h, box = 600, 400, (120, 80, 420, 300)
    jpeg = rectangle_png(w, h, box, fmt="JPEG")
    async with running_gateway(backend()) as gw:
        async with AsyncImageClient(grpc_target(gw), timeout=30) as client:
            det = await client.detect(jpeg, "tinydet")
            seg = await client.segment(jpeg, "tinyseg")
    assert (det[0].width, det[0].height) == (w, h) and seg[0].mask.shape == (h, w)
    assert box_error(det[0][0].box, box) <= max_box_tolerance(w, h)
